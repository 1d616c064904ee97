"""canonrl advantages inside a real TRL GRPOTrainer run (tiny Llama, CPU, offline)."""

import warnings

import pytest
import torch

pytest.importorskip("trl")

import datasets  # noqa: E402

import canonrl  # noqa: E402
from canonrl.integrations.trl import SUPPORTED_TRL, CanonGRPOConfig, check_trl_version  # noqa: E402
from conftest import tiny_lab_model  # noqa: E402
from trl_recording import RecordingTrainer, cpu_config  # noqa: E402

NUM_GENERATIONS = 4
PROMPTS = ["3+4-2?", "7+5-3+8?", "9-4+1?", "2+2+2?"]


def reward_digits(completions, **kwargs):
    """Mixed rewards: the count of digits, mod 3."""
    return [float(sum(ch.isdigit() for ch in c) % 3) for c in completions]


def reward_sometimes(completions, **kwargs):
    """A second objective that is 'not applicable' (None) for completions of even length."""
    return [None if len(c) % 2 == 0 else float(";" in c) for c in completions]


def _args(tmp_path, estimator, params, **overrides):
    settings = dict(per_device_train_batch_size=8, num_generations=NUM_GENERATIONS, max_completion_length=8,
                    temperature=1.0, reward_weights=[1.0, 0.5])  # fmt: skip
    return cpu_config(tmp_path, estimator, params, **{**settings, **overrides})


def _train(tmp_path, estimator, params):
    torch.set_num_threads(1)
    model, tokenizer = tiny_lab_model()
    dataset = datasets.Dataset.from_list([{"prompt": p} for p in PROMPTS])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = RecordingTrainer(
            model=model,
            reward_funcs=[reward_digits, reward_sometimes],
            args=_args(tmp_path, estimator, params),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        trainer.train()
    return trainer


def _row_key(prompt_ids, completion_ids):
    return tuple(prompt_ids.tolist()) + (-1,) + tuple(completion_ids.tolist())


@pytest.mark.parametrize(
    "estimator,params",
    [("canon", {"split_by": "entropy", "mu": 0.5}), ("ktae", {})],
    ids=["canon-entropy", "ktae"],
)
def test_grpo_trainer_uses_canonrl_advantages(tmp_path, estimator, params):
    trainer = _train(tmp_path, estimator, params)
    assert trainer.state.global_step == 2
    assert len(trainer.generations) == 2 and len(trainer.loss_inputs) == 2

    for step, (gen, loss) in enumerate(zip(trainer.generations, trainer.loss_inputs), start=1):
        fields, out = gen["fields"], gen["output"]
        assert fields["step"] == step
        # the inputs are TRL's own tensors (single process: gathered == local)
        rpf = gen["rewards_per_func"]
        expected_rewards = (rpf * torch.tensor([1.0, 0.5])).nansum(1)
        torch.testing.assert_close(fields["rewards"], expected_rewards)
        n = rpf.shape[0]
        assert torch.equal(fields["group"], torch.arange(n) // NUM_GENERATIONS)
        assert torch.equal(fields["mask"], out["completion_mask"])
        if estimator == "ktae":
            assert torch.equal(fields["token_ids"], out["completion_ids"])
        if gen["entropy_check"] is not None:
            m = out["completion_mask"].bool()
            torch.testing.assert_close(fields["entropy"][m], gen["entropy_check"][m], atol=1e-5, rtol=1e-5)

        # recompute with a fresh estimator on the recorded inputs
        batch = {k: v for k, v in fields.items() if k != "step"}
        expected = canonrl.get_estimator(estimator, **params)(step=step, **batch)
        assert out["advantages"].shape == out["completion_ids"].shape  # (B, T), token level
        assert (out["advantages"] - expected).abs().max() <= 1e-6

        # the loss received exactly those advantages (TRL shuffles rows between generation and loss: match them)
        assert loss["advantages"].shape == out["advantages"].shape
        by_key = {}
        for j in range(n):
            by_key.setdefault(_row_key(out["prompt_ids"][j], out["completion_ids"][j]), []).append(expected[j])
        for i in range(loss["advantages"].shape[0]):
            candidates = by_key[_row_key(loss["prompt_ids"][i], loss["completion_ids"][i])]
            assert any((loss["advantages"][i] - c).abs().max() <= 1e-6 for c in candidates)
    # the run produced signal, and reward_sometimes' None (NaN) path was exercised
    assert any(torch.isnan(g["rewards_per_func"][:, 1]).any() for g in trainer.generations)
    if estimator == "canon":
        assert all(g["entropy_check"] is not None for g in trainer.generations)
    assert any(g["output"]["advantages"].abs().max() > 0 for g in trainer.generations)


def test_contract_parent_generate_and_score_output(tmp_path):
    """The keys and shapes the subclass relies on, read from TRL's own (parent) method on one batch."""
    import trl

    torch.set_num_threads(1)
    model, tokenizer = tiny_lab_model()
    dataset = datasets.Dataset.from_list([{"prompt": p} for p in PROMPTS])
    calls = []

    class Probe(trl.GRPOTrainer):
        def _calculate_rewards(self, *a):
            rewards_per_func = super()._calculate_rewards(*a)
            calls.append(rewards_per_func)
            return rewards_per_func

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Probe(
            model=model,
            reward_funcs=[reward_digits, reward_sometimes],
            args=_args(tmp_path, "grpo", {}),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
    batch = [{"prompt": p} for p in PROMPTS[:2] for _ in range(NUM_GENERATIONS)]
    out = trl.GRPOTrainer._generate_and_score_completions(trainer, batch)
    for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages", "num_items_in_batch"):
        assert key in out, f"TRL's _generate_and_score_completions no longer returns {key!r}"
    b, t = out["completion_ids"].shape
    assert b == len(batch) and out["completion_mask"].shape == (b, t)
    assert out["prompt_ids"].shape == out["prompt_mask"].shape and out["prompt_ids"].shape[0] == b
    assert out["advantages"].shape == (b,)
    assert len(calls) == 1 and calls[0].shape == (b, 2)  # _calculate_rewards: (N, n_funcs)
    # groups are num_generations consecutive rows: TRL's own advantages are zero-mean per block of G rows
    assert out["advantages"].view(-1, NUM_GENERATIONS).sum(1).abs().max() < 1e-4
    # the entropy forward the subclass uses
    logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model,
        torch.cat([out["prompt_ids"], out["completion_ids"]], 1),
        torch.cat([out["prompt_mask"], out["completion_mask"]], 1),
        t,
        compute_entropy=True,
    )
    assert logps.shape == (b, t) and entropies.shape == (b, t)
    assert trainer.reward_weights.tolist() == [1.0, 0.5]
    assert trainer.num_generations == NUM_GENERATIONS and trainer.multi_objective_aggregation == "sum_then_normalize"


def test_supported_range_and_version_check():
    import trl
    from packaging.specifiers import SpecifierSet

    assert trl.__version__ in SpecifierSet(SUPPORTED_TRL)
    with pytest.warns(UserWarning, match="tested with trl"):
        check_trl_version("99.0.0")


@pytest.mark.parametrize(
    "estimator,params,match",
    [
        ("nope", {}, "unknown estimator 'nope'"),
        ("canon", {"bogus": 1}, "unknown hyperparameter 'bogus'"),
        ("grpo", "{not json", "not valid JSON"),
        ("canon", {"split_by": "given"}, "needs metric \\(\\[B\\], a per-response number .*\\), which GRPOTrainer does not provide"),
    ],
)
def test_config_validation_is_one_line(tmp_path, estimator, params, match):
    with pytest.raises(ValueError, match=match) as info:
        CanonGRPOConfig(output_dir=str(tmp_path), advantage_estimator=estimator, advantage_params=params, use_cpu=True)
    assert "\n" not in str(info.value)


def test_config_accepts_json_params_and_rejects_normalize_then_sum(tmp_path):
    args = CanonGRPOConfig(
        output_dir=str(tmp_path), advantage_estimator="canon", advantage_params='{"mu": 0.5}', use_cpu=True, bf16=False
    )
    assert args.advantage_params == {"mu": 0.5}
    with pytest.raises(ValueError, match="sum_then_normalize"):
        CanonGRPOConfig(
            output_dir=str(tmp_path), multi_objective_aggregation="normalize_then_sum", use_cpu=True, bf16=False
        )


def test_importing_canonrl_does_not_import_trl():
    import subprocess
    import sys

    code = "import sys, canonrl; canonrl.estimators(); assert 'trl' not in sys.modules, 'canonrl imported trl'"
    subprocess.run([sys.executable, "-c", code], check=True)


_MULTI_PROCESS_SCRIPT = r'''
import sys, warnings, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
import datasets, canonrl
from pathlib import Path
from conftest import tiny_lab_model
from test_trl_integration import _args, reward_digits, reward_sometimes, PROMPTS, RecordingTrainer
warnings.simplefilter("ignore")
model, tok = tiny_lab_model()
ds = datasets.Dataset.from_list([{{"prompt": p}} for p in PROMPTS * 2])
tr = RecordingTrainer(model=model, reward_funcs=[reward_digits, reward_sometimes], train_dataset=ds,
                      processing_class=tok, args=_args(Path({out!r}), "ktae", {{}}, per_device_train_batch_size=4,
                                                       max_completion_length=24))
tr.train()
rank, world = tr.accelerator.process_index, tr.accelerator.num_processes
try:
    assert world == 2
    for step, g in enumerate(tr.generations, 1):
        f = {{k: v for k, v in g["fields"].items() if k != "step"}}
        full = canonrl.get_estimator("ktae")(step=step, **f)
        out = g["output"]; b, t = out["completion_ids"].shape
        assert full.shape[0] == b * world
        rows = slice(rank * b, (rank + 1) * b)
        assert (full[rows, t:] == 0).all()
        assert (out["advantages"] - full[rows, :t]).abs().max() <= 1e-6
        assert torch.equal(f["mask"][rows, :t], out["completion_mask"])
        assert torch.equal(f["token_ids"][rows, :t], out["completion_ids"])
        print(f"OK rank={{rank}} step={{step}} local_T={{t}} gathered_T={{full.shape[1]}}", flush=True)
finally:
    # A gloo group still alive when the interpreter finalizes can abort the process (SIGABRT, "terminate called
    # without an active exception": its worker threads outlive the objects they hold, pytorch/pytorch#190489).
    # Both ranks reach this point, so the barrier is safe; end_training() destroys the process group.
    tr.accelerator.wait_for_everyone()
    tr.accelerator.end_training()
'''


def test_two_processes_gather_and_slice(tmp_path):
    """Two CPU processes (gloo): the estimator sees the gathered batch (padded to the longest completion over
    processes) and each process trains on its own rows of canonrl's advantages."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "mp.py"
    script.write_text(_MULTI_PROCESS_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path / "out")))
    # --standalone: the launcher's store binds port 0 itself, so no other process can take the port between a probe
    # and the bind; --local-addr and GLOO_SOCKET_IFNAME keep the rendezvous and gloo's pairs on the loopback.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "GLOO_SOCKET_IFNAME": "lo"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr", "127.0.0.1",
         "--nproc_per_node", "2", str(script)],
        capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("OK rank=") == 4, result.stdout[-2000:]
