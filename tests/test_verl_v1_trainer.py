"""canonrl estimators through verl 0.9's default (v1) trainer: its real ``PPOTrainer._compute_advantage`` reading from
and writing to a real TransferQueue on a local Ray instance (CPU only).

The rows are put into TransferQueue the way verl's v1 agent loop and ``_compute_old_log_prob`` leave them (one jagged
row per response: ``uid``, ``response_mask``, ``rm_scores``, ``responses``, ``old_log_probs``, ``entropy``), then the
trainer's own advantage step runs and the advantages it writes back are compared with canonrl called directly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transfer_queue")  # the v1 trainer's storage; part of canonrl[verl]
ray = pytest.importorskip("ray")
trainer_base = pytest.importorskip("verl.trainer.ppo.v1.trainer_base")
from omegaconf import OmegaConf  # noqa: E402
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync  # noqa: E402
from verl.utils.tensordict_utils import list_of_dict_to_tensordict  # noqa: E402

import canonrl  # noqa: E402
from canonrl.integrations import verl as cv  # noqa: E402
from canonrl.registry import get_estimator  # noqa: E402

pytestmark = pytest.mark.verl

ATOL = 1e-5


@pytest.fixture(scope="module")
def transfer_queue():
    import transfer_queue as tq

    # TransferQueue's controller and storage unit are Ray actors of one CPU each; logical CPUs, not cores.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    tq.init(OmegaConf.create({"backend": {"SimpleStorage": {"num_data_storage_units": 1}}}))
    cv.register_all()
    yield tq
    cv.unpatch_compute_advantage()
    tq.close()
    ray.shutdown()


@pytest.fixture
def patched(transfer_queue):
    cv.patch_compute_advantage()
    yield
    cv.unpatch_compute_advantage()


_batches = iter(range(10**6))


def put_rollouts(tq, *, sizes=(4, 3, 5), seed=0, max_len=7, vocab=5, with_entropy=True, reward_extra_info=None):
    """Responses of unequal lengths in groups of unequal sizes, keyed as verl's agent loop keys them."""
    g = torch.Generator().manual_seed(seed)
    batch_id = next(_batches)
    rows, keys = [], []
    for prompt, size in enumerate(sizes):
        for session in range(size):
            length = int(torch.randint(2, max_len + 1, (1,), generator=g))
            score = torch.zeros(length)
            score[-1] = float(torch.rand(1, generator=g).round(decimals=1))
            row = {
                "uid": f"b{batch_id}p{prompt}",
                "response_mask": torch.ones(length, dtype=torch.int64),
                "rm_scores": score,
                "responses": torch.randint(0, vocab, (length,), generator=g),
                "old_log_probs": -torch.rand(length, generator=g),
            }
            if with_entropy:
                row["entropy"] = torch.rand(length, generator=g) * 2
            if reward_extra_info is not None:  # what the agent loop stores: the reward function's extra outputs
                row["extra_fields"] = {"reward_extra_info": reward_extra_info(len(rows), g), "min_global_steps": 1}
            rows.append(row)
            keys.append(f"b{batch_id}p{prompt}_{session}_0")
    order = torch.randperm(len(keys), generator=g).tolist()  # groups interleaved, as after balancing
    rows, keys = [rows[i] for i in order], [keys[i] for i in order]
    meta = tq.kv_batch_put(keys=keys, partition_id="train", fields=list_of_dict_to_tensordict(rows))
    return meta, rows


def trainer(estimator: str, global_steps: int = 1, cls=PPOTrainerSync, **algorithm) -> PPOTrainerSync:
    """verl's synchronous v1 trainer with only what its advantage step reads (no workers, no Ray actors)."""
    t = object.__new__(cls)
    t.config = OmegaConf.create(
        {
            "algorithm": {
                "adv_estimator": estimator,
                "use_kl_in_reward": False,
                "gamma": 1.0,
                "lam": 1.0,
                "norm_adv_by_std_in_grpo": True,
                **algorithm,
            },
            "actor_rollout_ref": {"rollout": {"n": 4}},
        }
    )
    t.global_steps = global_steps
    return t


def v1_advantages(tq, estimator: str, meta, *, global_steps: int = 1, field="advantages", **algorithm) -> torch.Tensor:
    trainer(estimator, global_steps, **algorithm)._compute_advantage(meta, metrics={})
    out = tq.kv_batch_get(keys=meta.keys, partition_id="train", select_fields=[field])
    return out[field].to_padded_tensor(0.0)


def padded(rows, key: str) -> torch.Tensor:
    return torch.nested.as_nested_tensor([r[key] for r in rows], layout=torch.jagged).to_padded_tensor(0)


def direct(name: str, rows, *, step=None, **hyperparameters) -> torch.Tensor:
    mask = padded(rows, "response_mask").float()
    est = get_estimator(name, **hyperparameters)
    row_keys = {"entropy": "entropy", "token_ids": "responses"}
    kwargs = {field: padded(rows, row_keys[field]) for field in est.required_inputs() if field in row_keys}
    return est(
        rewards=padded(rows, "rm_scores").sum(-1),
        group=np.array([r["uid"] for r in rows], dtype=object),
        mask=mask,
        step=step,
        **kwargs,
    )


def test_canon_by_entropy_gets_the_v1_trainers_entropies(transfer_queue, patched):
    meta, rows = put_rollouts(transfer_queue, seed=1)
    got = v1_advantages(transfer_queue, "canon", meta, canon={"split_by": "entropy", "mu": 0.75})
    want = direct("canon", rows, split_by="entropy", mu=0.75)
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # the estimator really regrouped by those entropies: another metric gives other advantages
    assert not torch.allclose(got, direct("canon", rows, split_by="length", mu=0.75), atol=1e-3)


def test_ktae_gets_the_response_token_ids(transfer_queue, patched):
    meta, rows = put_rollouts(transfer_queue, seed=2, sizes=(6, 5))
    got = v1_advantages(transfer_queue, "ktae", meta)
    want = direct("ktae", rows)
    assert (got - got.sum(-1, keepdim=True) / padded(rows, "response_mask").sum(-1, keepdim=True)).abs().max() > 0
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_schedules_see_the_trainers_global_steps(transfer_queue, patched):
    meta, rows = put_rollouts(transfer_queue, seed=3)
    schedule = {"split_by": "entropy", "mu": "cosine-first-inter-later-intra"}
    got = v1_advantages(transfer_queue, "canon", meta, global_steps=40, canon=schedule)
    torch.testing.assert_close(got, direct("canon", rows, step=40, **schedule), atol=ATOL, rtol=0)
    assert not torch.allclose(got, direct("canon", rows, step=1, **schedule), atol=1e-4)


@pytest.mark.parametrize("verl_name, canonrl_name", [("grpo", "canonrl_grpo"), ("rloo", "canonrl_rloo")])
def test_matches_verls_builtins_through_the_v1_trainer(transfer_queue, patched, verl_name, canonrl_name):
    meta, _ = put_rollouts(transfer_queue, seed=4)
    builtin = v1_advantages(transfer_queue, verl_name, meta)
    ours = v1_advantages(transfer_queue, canonrl_name, meta)
    assert builtin.abs().sum() > 0
    torch.testing.assert_close(ours, builtin, atol=ATOL, rtol=0)


def test_unpatched_v1_trainer_names_the_fix(transfer_queue):
    meta, _ = put_rollouts(transfer_queue, seed=5)
    with pytest.raises(ValueError, match="patch_compute_advantage"):
        v1_advantages(transfer_queue, "canon", meta, canon={"split_by": "entropy"})


def test_missing_entropies_name_the_transfer_queue_field(transfer_queue, patched):
    meta, _ = put_rollouts(transfer_queue, seed=6, with_entropy=False)  # e.g. rollout_correction.bypass_mode=true
    with pytest.raises(ValueError, match="'entropy'.*bypass_mode"):
        v1_advantages(transfer_queue, "canon", meta, canon={"split_by": "entropy"})


def test_reward_only_estimators_fetch_nothing_extra(transfer_queue, patched):
    meta, rows = put_rollouts(transfer_queue, seed=7, with_entropy=False)
    got = v1_advantages(transfer_queue, "canon", meta, canon={"split_by": "length", "mu": 0.5})
    torch.testing.assert_close(got, direct("canon", rows, split_by="length", mu=0.5), atol=ATOL, rtol=0)


GDPO_KEYS = ["accuracy_reward", "format_reward"]


def gdpo_components(row: int, g: torch.Generator) -> dict:
    return {"accuracy_reward": float(torch.randint(0, 2, (1,), generator=g)), "format_reward": 0.5 * (row % 3 == 0)}


def test_gdpo_gets_the_reward_components_from_extra_fields(transfer_queue, patched):
    meta, rows = put_rollouts(transfer_queue, seed=8, with_entropy=False, reward_extra_info=gdpo_components)
    config = {"gdpo_reward_keys": GDPO_KEYS, "gdpo_reward_weights": [1.0, 2.0], "canonrl_gdpo": {"eps": 1e-6}}
    got = v1_advantages(transfer_queue, "canonrl_gdpo", meta, **config)
    components = torch.tensor([[r["extra_fields"]["reward_extra_info"][k] for k in GDPO_KEYS] for r in rows])
    expected = get_estimator("gdpo", eps=1e-6, weights=(1.0, 2.0))(
        rewards=components,
        group=np.array([r["uid"] for r in rows], dtype=object),
        mask=padded(rows, "response_mask").float(),
    )
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_gdpo_reward_key_missing_from_extra_fields_is_named(transfer_queue, patched):
    meta, _ = put_rollouts(transfer_queue, seed=9, with_entropy=False, reward_extra_info=gdpo_components)
    with pytest.raises(ValueError, match="reward component 'length_reward'.*extra_fields"):
        v1_advantages(transfer_queue, "canonrl_gdpo", meta, gdpo_reward_keys=["accuracy_reward", "length_reward"])


# ------------------------------------------------------------------------------------------------------------------
# Step estimators in the v1 trainer, and canonrl's opt-in trainers (verl's v1 trainer registry)
# ------------------------------------------------------------------------------------------------------------------


def put_agent_rows(tq, *, seed=0, sizes=(3, 4), max_len=9, edit=lambda rows: None):
    """Agent-loop rows with tool holes in the response mask, the outcome on the last policy token, the critic's
    values, and per-turn scores and anchors in each row's ``extra_fields`` (where verl's tool agent loop keeps them)."""
    g = torch.Generator().manual_seed(seed)
    batch_id = next(_batches)
    rows, keys = [], []
    for prompt, size in enumerate(sizes):
        for session in range(size):
            length = int(torch.randint(4, max_len + 1, (1,), generator=g))
            mask = (torch.rand(length, generator=g) > 0.3).long()
            mask[0] = 1
            turns = int(canonrl.steps.mask_run_ids(mask[None].float()).amax()) + 1
            score = torch.zeros(length)
            score[int(mask.nonzero().max())] = float(torch.randint(0, 2, (1,), generator=g))
            rows.append({
                "uid": f"b{batch_id}p{prompt}",
                "response_mask": mask,
                "rm_scores": score,
                "values": torch.rand(length, generator=g),
                "extra_fields": {
                    "turn_scores": torch.rand(turns, generator=g).round(decimals=1).tolist(),
                    "anchor_obs": [f"s{int(x)}" for x in torch.randint(0, 3, (turns,), generator=g)],
                },
            })  # fmt: skip
            keys.append(f"b{batch_id}p{prompt}_{session}_0")
    edit(rows)
    meta = tq.kv_batch_put(keys=keys, partition_id="train", fields=list_of_dict_to_tensordict(rows))
    return meta, rows


def direct_steps(name: str, rows, **hyperparameters) -> tuple[torch.Tensor, torch.Tensor]:
    mask = padded(rows, "response_mask").float()
    return get_estimator(name, **hyperparameters).compute_with_returns(
        rewards=padded(rows, "rm_scores").sum(-1),
        group=np.array([r["uid"] for r in rows], dtype=object),
        mask=mask,
        token_rewards=padded(rows, "rm_scores"),
        values=padded(rows, "values"),
        turn_ids="mask_runs",
        step_rewards=[r["extra_fields"]["turn_scores"] for r in rows],
        anchor=[r["extra_fields"]["anchor_obs"] for r in rows],
    )


@pytest.fixture(scope="module")
def canonrl_trainers(transfer_queue):
    return cv.register_trainers()


@pytest.mark.parametrize("name, params", [("gigpo", {"gamma": 0.9}), ("trloo", {}), ("matchtir", {}),
                                          ("canonrl_gae", {"gamma": 0.9, "lam": 0.8})])  # fmt: skip
def test_step_estimators_in_canonrls_sync_trainer_read_turns_from_extra_fields(transfer_queue, canonrl_trainers,
                                                                             name, params):  # fmt: skip
    assert not cv.is_patched()  # verl's own seam: no global patch
    meta, rows = put_agent_rows(transfer_queue, seed=11)
    canonrl_name = name.removeprefix("canonrl_")
    t = trainer(name, cls=canonrl_trainers["canonrl_sync"], **{name: params})
    t._compute_advantage(meta, metrics={})
    out = transfer_queue.kv_batch_get(keys=meta.keys, partition_id="train", select_fields=["advantages", "returns"])
    want, want_returns = direct_steps(canonrl_name, rows, **params)
    assert want.abs().sum() > 0
    torch.testing.assert_close(out["advantages"].to_padded_tensor(0.0), want, atol=ATOL, rtol=0)
    torch.testing.assert_close(out["returns"].to_padded_tensor(0.0), want_returns, atol=ATOL, rtol=0)


def test_the_patched_v1_trainer_gives_step_estimators_the_same_inputs(transfer_queue, patched):
    meta, rows = put_agent_rows(transfer_queue, seed=12)
    got = v1_advantages(transfer_queue, "gigpo", meta)
    torch.testing.assert_close(got, direct_steps("gigpo", rows)[0], atol=ATOL, rtol=0)


def test_per_turn_scores_that_do_not_match_the_turns_name_the_rows(transfer_queue, canonrl_trainers):
    meta, _ = put_agent_rows(transfer_queue, seed=13, edit=lambda rows: rows[2]["extra_fields"]["turn_scores"].append(0.5))
    with pytest.raises(ValueError, match=r"step_rewards.*row.*2"):
        trainer("trloo", cls=canonrl_trainers["canonrl_sync"])._compute_advantage(meta, metrics={})


KL_AND_CORRECTION = {
    "use_kl_in_reward": True,
    "kl_penalty": "kl",
    "kl_ctrl": {"type": "fixed", "kl_coef": 0.05},
    "rollout_correction": {"rollout_is": "token", "rollout_is_threshold": 2.0, "rollout_rs": None,
                           "rollout_rs_threshold": None, "bypass_mode": False},  # fmt: skip
}


def test_canonrls_step_does_what_verls_step_does_around_the_estimator(transfer_queue, canonrl_trainers):
    """canonrl's advantage step repeats verl's KL-in-reward, rollout correction and write-back: with canonrl_grpo
    it writes what verl's own step writes with grpo, field by field, and reports the same metrics."""
    from verl.trainer.ppo import core_algos

    def run(name, cls):
        meta, rows = put_rollouts(transfer_queue, seed=14, with_entropy=False)  # the same rows under new keys
        for row in rows:
            n = row["response_mask"].shape[0]
            row["ref_log_prob"] = row["old_log_probs"] - 0.1 * torch.arange(n) / n
            row["rollout_log_probs"] = row["old_log_probs"] + 0.05
        meta = transfer_queue.kv_batch_put(keys=meta.keys, partition_id="train",
                                           fields=list_of_dict_to_tensordict(rows))  # fmt: skip
        t = trainer(name, cls=cls, **KL_AND_CORRECTION)
        t.kl_ctrl_in_reward = core_algos.get_kl_controller(t.config.algorithm.kl_ctrl)
        metrics = {}
        t._compute_advantage(meta, metrics=metrics)
        fields = ["advantages", "returns", "token_level_rewards", "rollout_is_weights"]
        out = transfer_queue.kv_batch_get(keys=meta.keys, partition_id="train", select_fields=fields)
        return {f: out[f].to_padded_tensor(0.0) for f in fields}, metrics

    verls, verl_metrics = run("grpo", PPOTrainerSync)
    ours, our_metrics = run("canonrl_grpo", canonrl_trainers["canonrl_sync"])
    assert (verls["rollout_is_weights"] != 1).any() and verls["advantages"].abs().sum() > 0
    for field, value in verls.items():
        torch.testing.assert_close(ours[field], value, atol=ATOL, rtol=0, msg=field)
    assert our_metrics.keys() == verl_metrics.keys() and len(verl_metrics) > 0
    for key, value in verl_metrics.items():
        np.testing.assert_allclose(our_metrics[key], value, atol=1e-6, err_msg=key)


def test_canonrls_trainers_are_verls_trainers_of_their_mode(canonrl_trainers):
    """Registered in verl's v1 trainer registry; built from verl's own config, each runs as verl's mode (verl's
    code compares trainer_mode with its own names) and keeps verl's advantage step for verl's estimators."""
    import os

    import verl
    from hydra import compose, initialize_config_dir
    from verl.trainer.ppo.v1 import get_trainer_cls
    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer, ReplayBufferAsync

    assert set(canonrl_trainers) == set(cv.TRAINER_MODES)
    with initialize_config_dir(config_dir=os.path.join(os.path.dirname(verl.__file__), "trainer", "config"),
                               version_base=None):  # fmt: skip
        for name, mode in cv.TRAINER_MODES.items():
            cls = get_trainer_cls(name)
            assert cls is canonrl_trainers[name] and issubclass(cls, get_trainer_cls(mode))
            if mode == "separate_async":
                continue  # its constructor asks for a hybrid-engine layout of actors; the mode logic is the same
            config = compose(config_name="ppo_trainer", overrides=[f"trainer.v1.trainer_mode={name}"])
            built = cls(config)
            assert built.trainer_mode == mode == config.trainer.v1.trainer_mode
            assert type(built.replay_buffer) is (ReplayBuffer if mode == "sync" else ReplayBufferAsync)


def test_the_entry_point_registers_the_trainers():
    import subprocess
    import sys

    code = ("import verl\nfrom verl.trainer.ppo.v1 import get_trainer_cls\n"
            "print(sorted(n for n in ('canonrl_sync', 'canonrl_colocate_async', 'canonrl_separate_async') "
            "if get_trainer_cls(n).__name__.startswith('Canonrl')))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == "['canonrl_colocate_async', 'canonrl_separate_async', 'canonrl_sync']"
