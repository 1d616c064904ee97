"""The lab trainer's policy losses (PPO-clip, Clip-Cov, KL-Cov), pool prompt samplers (uniform, VADE) and D^3S
down-sampling: config keys, what each changes in a step, and bit-exact resume.

Tiny sizes and one torch thread, as tests/test_lab_trainer.py (a 2-layer, 32-wide Llama; 4 prompts x 4 samples).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from canonrl.lab.config import ConfigError, TrainConfig, load_config
from canonrl.lab.seeds import seed_of as _seed
from canonrl.lab.trainer import WALL_CLOCK_KEYS, Trainer
from canonrl.training.losses import NGRPO_CLIP_HIGH, NGRPO_CLIP_LOW
from canonrl.training.policy_losses import ClipRange, get_loss
from canonrl.training.selection import d3s_keep
from conftest import ParityTask, train_until_interrupted, use_test_tasks

TINY = [
    "max_new_tokens=16",
    "prompts_per_step=4",
    "group_size=4",
    "eval_problems=8",
    "eval_samples=2",
    "threads=1",
    "tensorboard=false",
    "estimator=grpo",
]
CLIP_COV_WIDE = [  # every unclipped token is a candidate, half of the valid tokens are detached
    "policy_loss=clip_cov",
    "policy_loss_params.clip_cov_ratio=0.5",
    "policy_loss_params.clip_cov_lb=-100",
    "policy_loss_params.clip_cov_ub=100",
]
D3S = ["d3s={n_init: 2, n_final: 3, k_init: 0.5, k_final: 1.0}"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def parity(monkeypatch):
    use_test_tasks(monkeypatch, {"parity": ParityTask})


def tiny_config(policy_dir: Path, *overrides: str) -> TrainConfig:
    return load_config(None, [f"policy={policy_dir}", "task=parity", *TINY, *overrides])


def state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.policy.model.state_dict().items()}


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(next(Path(directory).glob("*.safetensors")))


# ----------------------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------------------


def test_defaults_are_off():
    config = TrainConfig()
    assert (config.policy_loss, config.policy_loss_params) == ("ppo_clip", {})
    assert (config.prompt_sampler, config.prompt_sampler_params, config.prompt_pool) == ("fresh", {}, 1024)
    assert config.d3s is None and config.d3s_schedule(1) is None
    assert config.clip_range() == ClipRange(0.2, 0.28, 3.0)
    assert type(config.build_policy_loss()).__name__ == "PPOClip"


def test_new_keys_from_overrides_and_yaml(tmp_path):
    config = load_config(None, ["policy_loss=kl_cov", "policy_loss_params.kl_cov_ratio=0.002", "prompt_sampler=vade",
                                "prompt_sampler_params.epsilon=0.1", "prompt_pool=64", "d3s.n_init=8", "d3s.n_final=4",
                                "d3s.k_init=1.0", "d3s.k_final=0.5", "steps=5"])  # fmt: skip
    loss = config.build_policy_loss()
    assert loss.params.kl_cov_ratio == 0.002 and not loss.clipped  # KL-Cov has no clip
    assert config.d3s == {"n_init": 8, "n_final": 4, "k_init": 1.0, "k_final": 0.5}
    assert [config.d3s_schedule(s) for s in (1, 3, 5)] == [(8, 1.0), (6, 0.75), (4, 0.5)]
    path = tmp_path / "run.yaml"
    path.write_text("policy_loss: clip_cov\npolicy_loss_params:\n  clip_cov_ratio: 2e-4\nprompt_sampler: uniform\n"
                    "d3s: {n_init: 8, n_final: 4, k_init: 1.0, k_final: 0.5, per_row: true}\n")  # fmt: skip
    config = load_config(path)
    assert config.policy_loss_params == {"clip_cov_ratio": pytest.approx(2e-4)}
    assert config.d3s_options() == {"per_row": True}
    from canonrl.lab.config import save_config

    save_config(config, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == config


def test_ngrpo_clip_values_are_accepted():
    config = load_config(None, [f"clip_low={NGRPO_CLIP_LOW}", f"clip_high={NGRPO_CLIP_HIGH}", "dual_clip=null"])
    assert config.clip_range() == ClipRange(0.16, 0.24, None)


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (["policy_loss=ppo"], "unknown policy_loss 'ppo'; choose from ppo_clip, clip_cov, kl_cov"),
        (["policy_loss_params.clip_cov_ratio=0.1"], "policy_loss 'ppo_clip' has no parameter 'clip_cov_ratio'"),
        (["policy_loss=kl_cov", "policy_loss_params.clip_cov_ratio=0.1"], "it takes kl_cov_ratio, ppo_kl_coef"),
        (["policy_loss=clip_cov", "policy_loss_params.clip_cov_ratio=2"], "clip_cov_ratio must be in (0, 1]"),
        (["policy_loss=clip_cov", "policy_loss_params.clip_cov_lb=6"], "clip_cov_lb must be < clip_cov_ub"),
        (["policy_loss=kl_cov", "policy_loss_params.kl_cov_ratio=abc"], "kl_cov_ratio must be a number"),
        (["policy_loss_params=3"], "policy_loss_params must be a mapping"),
        (["prompt_sampler=random"], "unknown prompt_sampler 'random'; choose from fresh, uniform, vade"),
        (["prompt_sampler=vade", "prompt_sampler_params.decay=0.9"], "unknown vade parameters"),
        (["prompt_sampler=vade", "prompt_sampler_params.epsilon=2"], "epsilon must be in [0, 1]"),
        (["prompt_sampler=uniform", "prompt_sampler_params.epsilon=0.1"], "takes no parameters"),
        (["prompt_sampler_params.epsilon=0.1"], "prompt_sampler 'fresh' takes no prompt_sampler_params"),
        (["prompt_sampler=uniform", "prompt_pool=8"], "prompts_per_step (16) must be <= prompt_pool (8)"),
        (["prompt_pool=0"], "prompt_pool must be >= 1"),
        (["d3s={n_init: 8, n_final: 4, k_init: 1.0, k_final: 0.5, top_k: 3}"], "unknown d3s key 'top_k'"),
        (["d3s.n_init=8"], "d3s needs n_init, n_final, k_init, k_final; missing n_final, k_init, k_final"),
        (["d3s={n_init: 8, n_final: 4, k_init: 1.5, k_final: 0.5}"], "k_init must be a fraction"),
        (["d3s={n_init: 2.5, n_final: 4, k_init: 1.0, k_final: 0.5}"], "n_init must be an int"),
        (["d3s={n_init: 8, n_final: 4, k_init: 1.0, k_final: 0.5, per_row: 1}"], "d3s.per_row must be true or false"),
        (["d3s=5"], "d3s must be a mapping"),
        (["device=tpu"], "device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        (["device=cuda:99"], "device 'cuda:99': torch sees no such CUDA device"),
    ],
)
def test_bad_values_are_one_line_config_errors(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert "\n" not in message and fragment in message, message


# ----------------------------------------------------------------------------------------------------------------
# policy losses
# ----------------------------------------------------------------------------------------------------------------

LOSSES = {
    "ppo_clip": [],
    "ngrpo": [f"clip_low={NGRPO_CLIP_LOW}", f"clip_high={NGRPO_CLIP_HIGH}", "dual_clip=null"],
    "clip_cov": CLIP_COV_WIDE,
    "kl_cov": ["policy_loss=kl_cov", "policy_loss_params.kl_cov_ratio=0.1", "ppo_epochs=2"],
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_each_policy_loss_trains(policy_dir, tmp_path, name):
    trainer = Trainer(tiny_config(policy_dir, *LOSSES[name]), tmp_path)
    before = state(trainer)
    records = [trainer.train_step(step).metrics for step in (1, 2)]
    after = state(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for metrics in records:
        assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
    if name == "clip_cov":
        assert all(0 < m["cov_clipped"] <= 1 for m in records)
        assert all(m["trained_rows"] == 1.0 for m in records)  # every row enters the covariance statistics
    else:
        assert "cov_clipped" not in records[0]
    if name == "kl_cov":
        assert all(0 < m["kl_cov_selected"] <= 1 for m in records)
        assert all(m["pg_clipfrac"] == 0 for m in records)  # no PPO clip
    else:
        assert "kl_cov_selected" not in records[0]


@pytest.mark.parametrize("name", ["clip_cov", "kl_cov", "ppo_clip"])
def test_the_trainer_uses_policy_loss_on_its_micro_batch(policy_dir, tmp_path, monkeypatch, name):
    """The token loss the update aggregates is the configured loss on the micro-batch's tensors; Clip-Cov's
    generator is seeded by (seed, loss name, step, micro-batch index)."""
    import canonrl.lab.update as update_module

    calls, aggregated = [], []
    real_aggregate = update_module.aggregate_loss

    def recording_aggregate(values, *args, **kwargs):
        aggregated.append(values)
        return real_aggregate(values, *args, **kwargs)

    monkeypatch.setattr(update_module, "aggregate_loss", recording_aggregate)
    overrides = {"clip_cov": CLIP_COV_WIDE, "kl_cov": ["policy_loss=kl_cov", "policy_loss_params.kl_cov_ratio=0.1"],
                 "ppo_clip": []}[name]  # fmt: skip
    config = tiny_config(policy_dir, *overrides, "micro_batch_size=5")
    trainer = Trainer(config, tmp_path)
    loss = trainer.updater.loss
    assert type(loss) is type(get_loss(name)) and trainer.updater.clip == config.clip_range()

    def recording_loss(logprobs, old_logprobs, advantages, mask, *, clip, generator=None):
        saved = generator.get_state() if generator is not None else None
        out = type(loss).__call__(loss, logprobs, old_logprobs, advantages, mask, clip=clip, generator=generator)
        calls.append((logprobs.detach().clone(), old_logprobs.clone(), advantages.clone(), mask.clone(), clip, saved,
                      out[0]))  # fmt: skip
        return out

    trainer.updater.loss = _Recording(loss, recording_loss)
    trainer.train_step(1)
    assert len(calls) >= 2  # several micro-batches
    for index, (logprobs, old, advantages, mask, clip, saved, used) in enumerate(calls):
        extra = {}
        if name == "clip_cov":
            expected = torch.Generator().manual_seed(_seed(config.seed, "clip_cov", 1, index))
            assert torch.equal(saved, expected.get_state())
            extra["generator"] = expected
        else:
            assert saved is None
        again, _ = get_loss(name, **config.policy_loss_params)(logprobs, old, advantages, mask, clip=clip, **extra)
        assert torch.equal(again, used.detach())
        assert any(values is used for values in aggregated)  # the loss the trainer aggregates is this one


class _Recording:
    """A policy loss whose calls go through `record` (its other attributes are the wrapped loss's)."""

    def __init__(self, loss, record):
        self._loss, self._record = loss, record

    def __getattr__(self, name):
        return getattr(self._loss, name)

    def __call__(self, *args, **kwargs):
        return self._record(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# prompt samplers
# ----------------------------------------------------------------------------------------------------------------


def test_fresh_default_draws_what_the_task_draws(policy_dir, tmp_path):
    config = tiny_config(policy_dir)
    trainer = Trainer(config, tmp_path)
    assert trainer.prompt_sampler is None and trainer.prompt_pool is None
    for step in (1, 2):
        expected = trainer.task.problems("train", config.prompts_per_step, seed=_seed(config.seed, "problems", step))
        problems, ids = trainer.draw_problems(step)
        assert ids is None
        assert [p.prompt for p in problems] == [p.prompt for p in expected]
    result = trainer.train_step(1)
    assert result.prompt_ids is None and result.loss_mask is None
    assert "prompt_success_estimate" not in result.metrics and "d3s_kept_rows" not in result.metrics


def test_uniform_sampler_walks_the_pool(policy_dir, tmp_path):
    config = tiny_config(policy_dir, "prompt_sampler=uniform", "prompt_pool=8")
    trainer = Trainer(config, tmp_path)
    pool = trainer.task.problems("train", 8, seed=_seed(config.seed, "prompt_pool"))
    assert [p.prompt for p in trainer.prompt_pool] == [p.prompt for p in pool]
    (first, ids1), (second, ids2) = trainer.draw_problems(1), trainer.draw_problems(2)
    assert sorted(torch.cat([ids1, ids2]).tolist()) == list(range(8))  # one epoch: every pool problem once
    assert [p.prompt for p in first + second] == [pool[i].prompt for i in torch.cat([ids1, ids2]).tolist()]


def test_vade_picks_from_the_pool_and_learns(policy_dir, tmp_path):
    config = tiny_config(policy_dir, "prompt_sampler=vade", "prompt_pool=16")
    trainer = Trainer(config, tmp_path)
    sampler = trainer.prompt_sampler
    assert sampler.name == "vade" and sampler.num_prompts == 16
    result = trainer.train_step(1)
    ids = result.prompt_ids
    assert ids.shape == (4,) and len(set(ids.tolist())) == 4
    assert result.metrics["prompt_success_estimate"] == 0.5  # flat prior before the first update
    counts = sampler.alpha + sampler.beta - 2.0  # evidence added to the Beta(1, 1) priors
    assert counts[ids].tolist() == [4.0] * 4 and counts.sum().item() == 16  # G = 4 responses per chosen prompt
    assert sampler.updates == 1
    assert (sampler.alpha - 1.0)[ids].sum().item() == pytest.approx(result.metrics["accuracy"] * 16)


# ----------------------------------------------------------------------------------------------------------------
# D^3S
# ----------------------------------------------------------------------------------------------------------------


def test_d3s_loss_mask_drops_rows_and_tokens(policy_dir, tmp_path, monkeypatch):
    config = tiny_config(policy_dir, "d3s={n_init: 2, n_final: 2, k_init: 0.5, k_final: 0.5}", "steps=3")
    trainer = Trainer(config, tmp_path)
    seen = []
    real = trainer.updater.accumulate

    def recording(step, micro, totals, sums):
        seen.append(({"tokens": totals.tokens, "responses": totals.responses}, micro.mask.clone()))
        return real(step, micro, totals, sums)

    monkeypatch.setattr(trainer.updater, "accumulate", recording)
    result = trainer.train_step(1)
    metrics, loss_mask, mask = result.metrics, result.loss_mask, result.rollouts.response_mask
    assert loss_mask is not None and bool((loss_mask <= mask).all())
    group = torch.arange(4).repeat_interleave(4)
    kept_rows, kept_tokens = d3s_keep(result.advantages, result.rollouts.entropy, mask, group, num_keep=2,
                                      top_fraction=0.5)  # fmt: skip
    assert torch.equal(loss_mask, mask * kept_tokens.float())
    assert kept_rows.view(4, 4).sum(dim=1).max().item() <= 2 and kept_rows.any()  # N = 2 of the G = 4 per group
    assert metrics["d3s_num_keep"] == 2 and metrics["d3s_top_fraction"] == 0.5
    assert metrics["d3s_kept_rows"] == kept_rows.float().mean().item()
    assert loss_mask.sum().item() == math.ceil(0.5 * mask[kept_rows].sum().item())  # top half of their tokens
    assert metrics["d3s_kept_tokens"] == pytest.approx(loss_mask.sum().item() / mask.sum().item())
    # GRPO's advantages are non-zero on every row of a mixed group: the rows that ran are those with a kept token
    rows = loss_mask.sum(dim=1) > 0
    assert 0 < rows.sum() < 16 and metrics["trained_rows"] == rows.float().mean().item()
    # the aggregation counts only the kept tokens and responses
    assert seen and all(t["tokens"].item() == loss_mask.sum().item() for t, _ in seen)
    assert all(t["responses"].item() == rows.sum().item() for t, _ in seen)
    assert sum(m.sum().item() for _, m in seen) == loss_mask.sum().item()


def test_a_full_loss_mask_changes_nothing(policy_dir, tmp_path):
    """`update(loss_mask=response_mask)` is the update without a loss mask: the plumbing alone moves no number."""
    config = tiny_config(policy_dir, "micro_batch_size=5")
    results = []
    for full in (False, True):
        trainer = Trainer(config, tmp_path / str(full))
        rollouts, verdict = trainer.rollout(1)
        advantages = trainer.advantages(1, rollouts, torch.tensor(verdict.scores, dtype=torch.float32))
        mask = rollouts.response_mask.clone() if full else None
        metrics = trainer.update(1, rollouts, advantages, loss_mask=mask)
        results.append((metrics, state(trainer)))
    (plain, plain_state), (masked, masked_state) = results
    assert plain == masked
    assert all(torch.equal(plain_state[k], masked_state[k]) for k in plain_state)


# ----------------------------------------------------------------------------------------------------------------
# resume is bit-exact
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        ["prompt_sampler=vade", "prompt_pool=12", "prompt_sampler_params.epsilon=0.2"],
        [*D3S, *CLIP_COV_WIDE, "micro_batch_size=3"],
    ],
    ids=["vade", "d3s+clip_cov"],
)
def test_resume_is_bit_exact(policy_dir, tmp_path, overrides):
    config = tiny_config(policy_dir, "steps=4", "checkpoint_every=2", "eval_every=0", "minibatches=2", "ppo_epochs=2",
                         *overrides)  # fmt: skip
    Trainer(config, tmp_path / "a").train()

    train_until_interrupted(config, tmp_path / "b", at_step=3)
    resumed = Trainer(config, tmp_path / "b", resume=True)
    assert resumed.step == 2
    if config.prompt_sampler == "vade":
        assert resumed.prompt_sampler.updates == 2
    resumed.train()

    strip = lambda r: {k: v for k, v in r.items() if k not in WALL_CLOCK_KEYS}  # noqa: E731
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [strip(r) for r in a] == [strip(r) for r in b]
    trains = [r for r in a if r["kind"] == "train"]
    if config.prompt_sampler == "vade":
        assert all("prompt_success_estimate" in r for r in trains)
    else:
        assert all(r["cov_clipped"] > 0 and 0 < r["d3s_kept_rows"] < 1 for r in trains)
        assert [r["d3s_num_keep"] for r in trains] == [2, 2, 3, 3]
    weights_a, weights_b = weights(tmp_path / "a" / "policy"), weights(tmp_path / "b" / "policy")
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    initial = weights(policy_dir)
    assert any(not torch.equal(initial[k], weights_a[k]) for k in initial)


def test_the_docs_key_table_is_the_config():
    from canonrl.lab.config import key_table

    docs = (Path(__file__).parent.parent / "docs" / "lab.md").read_text()
    table = docs.split("<!-- config-keys:begin -->\n", 1)[1].split("<!-- config-keys:end -->", 1)[0]
    assert table == key_table(), "docs/lab.md's key table is stale: paste the output of `canonrl lab keys` there"
    for field in TrainConfig.__dataclass_fields__.values():
        assert field.metadata.get("help"), f"config key {field.name} has no help"


def test_device_auto_is_the_cpu_here_and_the_policy_lives_there(policy_dir, tmp_path):
    from canonrl.lab.policy import resolve_device

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected and resolve_device("cpu").type == "cpu"
    trainer = Trainer(tiny_config(policy_dir, "device=cpu"), tmp_path)
    ids, mask = trainer.policy.encode_prompts(["1+2"])
    assert trainer.device.type == "cpu" and ids.device.type == "cpu" and trainer.groups().device.type == "cpu"


def test_a_new_policy_loss_is_one_class(policy_dir, tmp_path, monkeypatch):
    """Registering a PolicyLoss subclass is all it takes: the config checks its parameters, the update calls it and
    reports its declared metric, and it trains."""
    from dataclasses import dataclass

    from canonrl.registry import param
    from canonrl.training import policy_losses

    monkeypatch.setattr(policy_losses, "_LOSSES", dict(policy_losses._LOSSES))

    @policy_losses.register_loss
    class ScaledReinforce(policy_losses.PolicyLoss):
        name = "_test_scaled_reinforce"
        description = "-scale * A * ratio, no clip"
        clipped = False
        metrics = ("positive",)

        @dataclass
        class Params:
            scale: float = param(1.0, "loss scale")

        def __call__(self, logprobs, old_logprobs, advantages, mask, *, clip, generator=None):
            ratio = (logprobs - old_logprobs).exp()
            return -self.params.scale * advantages * ratio, {"positive": (advantages > 0).float()}

    with pytest.raises(ConfigError, match="has no parameter 'clip_cov_ratio'; it takes scale"):
        load_config(None, ["policy_loss=_test_scaled_reinforce", "policy_loss_params.clip_cov_ratio=0.1"])
    config = tiny_config(policy_dir, "policy_loss=_test_scaled_reinforce", "policy_loss_params.scale=0.5")
    trainer = Trainer(config, tmp_path)
    before = state(trainer)
    metrics = trainer.train_step(1).metrics
    assert 0 < metrics["positive"] < 1 and metrics["pg_clipfrac"] == 0
    assert any(not torch.equal(before[k], v) for k, v in state(trainer).items())
