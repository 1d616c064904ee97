"""The lab trainer end to end on a tiny random policy: config, short runs, bit-exact resume, failures, and the CLI.

Everything runs with one torch thread and tiny sizes (a 2-layer, 32-wide Llama; 4 prompts x 4 samples; 16 tokens).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from canonrl.lab.config import ConfigError, TrainConfig, load_config
from canonrl.lab.tasks.base import Reward
from canonrl.lab.trainer import WALL_CLOCK_KEYS, Trainer, TrainingError, train
from conftest import ParityTask, train_until_interrupted, use_test_tasks

TINY = [
    "max_new_tokens=16",
    "prompts_per_step=4",
    "group_size=4",
    "eval_problems=8",
    "eval_samples=2",
    "threads=1",
    "tensorboard=false",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(policy_dir: Path, *overrides: str) -> TrainConfig:
    return load_config(None, [f"policy={policy_dir}", *TINY, *overrides])


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text, f"not one line: {text!r}"
    return text


# ----------------------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------------------


def test_defaults_validate():
    config = load_config()
    assert config == TrainConfig().validate()
    assert config.estimator == "canon" and config.estimator_params == {"split_by": "length", "mu": 1.0}


def test_overrides_are_yaml_typed():
    config = load_config(None, ["steps=7", "lr=0.001", "dual_clip=null", "tensorboard=false", "estimator=grpo", "label=base"])
    assert config.steps == 7 and isinstance(config.steps, int)
    assert config.lr == 1e-3 and isinstance(config.lr, float)
    assert config.dual_clip is None and config.tensorboard is False
    assert config.name == "base"
    # an int where a float is declared is accepted and stored as a float
    assert isinstance(load_config(None, ["temperature=1"]).temperature, float)


def test_nested_override_sets_one_estimator_param():
    config = load_config(None, ["estimator_params.mu=0.5"])
    assert config.estimator_params["mu"] == 0.5
    # "sets one entry": canon's other configured parameter (split_by=length) is kept, not reset to the registry's
    assert config.estimator_params == {"split_by": "length", "mu": 0.5}


def test_nested_override_on_a_new_estimator_starts_from_its_own_defaults():
    config = load_config(None, ["estimator=grpo", "estimator_params.eps=0.001"])
    assert config.estimator_params == {"eps": 0.001}
    config.build_estimator()


def test_exponent_notation_is_a_number(tmp_path):
    """`lr=1e-3` is how everyone writes a learning rate (the default, 5e-4, is printed that way too).

    PyYAML follows YAML 1.1, where a float needs a dot ("1.0e-3"), so "1e-3" parses as a *string*.
    """
    assert load_config(None, ["lr=1e-3"]).lr == pytest.approx(1e-3)
    path = tmp_path / "run.yaml"
    path.write_text("lr: 5e-4\nestimator: grpo\nestimator_params:\n  eps: 1e-5\n")
    config = load_config(path)
    assert config.lr == pytest.approx(5e-4)
    assert config.estimator_params == {"eps": pytest.approx(1e-5)}
    config = load_config(None, ["estimator=grpo", "estimator_params.eps=1e-5"])
    assert config.estimator_params == {"eps": pytest.approx(1e-5)}


def test_estimator_grpo_resets_canons_default_params():
    config = load_config(None, ["estimator=grpo"])
    assert config.estimator_params == {}
    config.build_estimator()  # grpo has no `metric`: it would fail had canon's defaults been carried over


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"estimator": "canon", "estimator_params": {"split_by": "entropy", "mu": 0.5},
                                    "steps": 5, "loss_agg": "token-mean", "task_options": {"max_operands": 4}}))  # fmt: skip
    config = load_config(path, ["steps=9", "estimator_params.mu=0.25"])
    assert config.steps == 9 and config.loss_agg == "token-mean"
    assert config.estimator_params == {"split_by": "entropy", "mu": 0.25}
    assert config.task_options == {"max_operands": 4}


def test_saved_config_round_trips(tmp_path):
    from canonrl.lab.config import save_config

    config = load_config(None, ["estimator=ktae", "dual_clip=null", "loss_scale_factor=32"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


@pytest.mark.parametrize("where", ["override", "file"])
def test_unknown_key_names_valid_keys(tmp_path, where):
    if where == "file":
        path = tmp_path / "bad.yaml"
        path.write_text("stepz: 3\n")
        args = (path, [])
    else:
        args = (None, ["foo=1"])
    with pytest.raises(ConfigError) as info:
        load_config(*args)
    message = one_line(info.value)
    assert "unknown config key" in message and "valid keys" in message
    for key in ("estimator", "estimator_params", "steps", "max_new_tokens", "loss_agg"):
        assert key in message


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("steps=abc", "steps must be an integer"),
        ("steps=1.5", "steps must be an integer"),
        ("steps=true", "steps must be an integer"),
        ("steps=null", "steps cannot be null"),
        ("lr=fast", "lr must be a number"),
        ("tensorboard=3", "tensorboard must be true or false"),
        ("estimator_params=5", "estimator_params must be a mapping"),
        ("policy=3", "policy must be a string"),
        ("steps=0", "steps must be >= 1"),
        ("kl_coef=-1", "kl_coef must be >= 0"),
        ("top_p=1.5", "top_p must be in (0, 1]"),
        ("loss_agg=token-sum", "unknown loss_agg"),
        ("kl_estimator=k3", "unknown kl_estimator"),
        ("steps.x=1", "steps has no sub-keys"),
        ("steps", "is not key=value"),
    ],
)
def test_bad_values_are_one_line_config_errors(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert fragment in one_line(info.value)


def test_unknown_estimator_names_the_choices():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["estimator=nope"])
    message = one_line(info.value)
    assert "unknown estimator 'nope'" in message
    for name in ("canon", "grpo", "dr_grpo", "ktae"):
        assert name in message


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (["estimator=grpo", "estimator_params.bogus=1"], "unknown hyperparameter 'bogus'"),
        (["estimator=grpo", "estimator_params.eps=-1"], "eps must lie in"),
        (["estimator_params.mu=2"], "mu must lie in"),
    ],
)
def test_bad_estimator_hyperparameter(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = one_line(info.value)
    assert message.startswith("estimator ") and fragment in message


def test_missing_or_malformed_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("steps: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_minibatches_must_divide_the_batch():
    with pytest.raises(ConfigError, match="minibatches"):
        load_config(None, ["prompts_per_step=3", "group_size=2", "minibatches=4"])
    assert load_config(None, ["prompts_per_step=3", "group_size=2", "minibatches=3"]).minibatches == 3
    assert load_config(None, ["prompts_per_step=3", "group_size=2", "minibatches=6"]).minibatches == 6


# ----------------------------------------------------------------------------------------------------------------
# short runs
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture
def parity(monkeypatch):
    """`task=parity` builds a `conftest.ParityTask`."""
    use_test_tasks(monkeypatch, {"parity": ParityTask})
    return "task=parity"


def weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(next(Path(directory).glob("*.safetensors")))


RUNS = {
    "grpo": ["estimator=grpo", "loss_agg=token-mean", "ppo_epochs=2", "minibatches=2"],
    "dr_grpo": ["estimator=dr_grpo", "loss_agg=seq-mean-token-sum-norm", "kl_coef=0.1"],
    "canon": ["estimator=canon", "estimator_params.split_by=entropy", "loss_agg=seq-mean-token-mean"],
    "ktae": ["estimator=ktae", "loss_agg=seq-mean-token-sum"],
}


def check_run(run_dir: Path, config: TrainConfig, steps: int) -> tuple[list[dict], list[dict]]:
    """What every finished run directory holds; returns its (train, eval) records."""
    records = read_metrics(run_dir)
    evals = [r for r in records if r["kind"] == "eval"]
    trains = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in evals] == [0, steps]
    assert [r["step"] for r in trains] == list(range(1, steps + 1))
    batch = config.prompts_per_step * config.group_size
    for r in trains:
        assert math.isfinite(r["loss"]), r
        for key in ("reward", "accuracy", "entropy", "response_length", "grad_norm", "pg_clipfrac", "ppo_kl", "lr"):
            assert math.isfinite(r[key]), (key, r)
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["pg_clipfrac"] <= 1
        assert r["verify_failures"] == 0 and r["verify_timeouts"] == 0
        assert 1 <= r["response_length"] <= config.max_new_tokens
        assert ("kl" in r) == (config.kl_coef > 0)
        if "kl" in r:
            assert math.isfinite(r["kl"]) and r["kl"] >= 0
    assert trains[-1]["tokens"] == sum(r["response_length"] * batch for r in trains)
    for r in evals:
        assert 0 <= r["accuracy"] <= 1 and r["k"] == config.eval_samples and "greedy_pass1" in r
        assert set(r["budget_accuracy"]) == {"16"}

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["estimator"] == config.estimator and summary["steps"] == steps
    assert summary["initial"]["step"] == 0 and summary["final"]["step"] == steps
    assert (run_dir / "policy" / "config.json").is_file()
    assert list((run_dir / "policy").glob("*.safetensors"))
    assert load_config(run_dir / "config.yaml") == config
    latest = run_dir / "checkpoints" / "latest"
    assert latest.is_file() and latest.read_text().strip() == f"step-{steps:06d}"
    assert (run_dir / "checkpoints" / f"step-{steps:06d}" / "trainer_state.pt").is_file()
    assert not (run_dir / "tensorboard").exists()
    return trains, evals


@pytest.mark.parametrize("name", list(RUNS))
def test_three_step_run(policy_dir, tmp_path, parity, name):
    config = tiny_config(policy_dir, "steps=3", parity, *RUNS[name])
    run_dir = tmp_path / name
    summary = train(config, run_dir)
    assert summary["estimator"] == name
    trains, _ = check_run(run_dir, config, 3)
    assert any(r["mixed_groups"] > 0 for r in trains)
    assert any(r["advantage_abs"] > 0 for r in trains)
    # real updates: the trained policy moved away from the initial one
    before, after = weights(policy_dir), weights(run_dir / "policy")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_three_step_run_on_the_lab_task(policy_dir, tmp_path):
    config = tiny_config(policy_dir, "steps=3", "estimator=grpo")
    summary = train(config, tmp_path / "lab")
    assert summary["task"] == "lab"
    trains, _ = check_run(tmp_path / "lab", config, 3)
    assert all("reward/correct" in r and "reward/formatted" in r for r in trains)


def test_train_refuses_an_existing_run_directory(policy_dir, tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="already holds a run"):
        train(tiny_config(policy_dir, "steps=1"), tmp_path)


def test_resume_without_a_checkpoint_is_an_error(policy_dir, tmp_path):
    with pytest.raises(ValueError, match="nothing to resume"):
        Trainer(tiny_config(policy_dir, "steps=1"), tmp_path, resume=True)


# ----------------------------------------------------------------------------------------------------------------
# resume is bit-exact
# ----------------------------------------------------------------------------------------------------------------


def test_resume_repeats_the_uninterrupted_run_bit_for_bit(policy_dir, tmp_path, parity):
    config = tiny_config(
        policy_dir, "steps=4", parity, "checkpoint_every=2", "eval_every=2", "estimator=canon",
        "estimator_params.split_by=entropy", "minibatches=2", "ppo_epochs=2",
    )  # fmt: skip
    Trainer(config, tmp_path / "a").train()

    train_until_interrupted(config, tmp_path / "b", at_step=3)
    interrupted = read_metrics(tmp_path / "b")
    assert interrupted[-1]["kind"] == "train" and interrupted[-1]["step"] == 3  # logged, but not checkpointed
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text().strip() == "step-000002"

    resumed = Trainer(config, tmp_path / "b", resume=True)
    assert resumed.step == 2
    resumed.train()

    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [(r["kind"], r["step"]) for r in a] == [
        ("eval", 0), ("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("train", 4), ("eval", 4)
    ]
    assert len(a) == len(b)
    for x, y in zip(a, b):
        strip = lambda r: {k: v for k, v in r.items() if k not in WALL_CLOCK_KEYS}  # noqa: E731
        assert strip(x) == strip(y)
    # the resumed log's clock continues from where the interrupted run's checkpoint left it
    times = [r["time"] for r in b]
    assert times == sorted(times)

    weights_a, weights_b = weights(tmp_path / "a" / "policy"), weights(tmp_path / "b" / "policy")
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key
    # ... and the updates were real, so this compares something
    initial = weights(policy_dir)
    assert any(not torch.equal(initial[k], weights_a[k]) for k in initial)
    assert any(r["kind"] == "train" and r["advantage_abs"] > 0 for r in a)
    summary_a = json.loads((tmp_path / "a" / "summary.json").read_text())
    summary_b = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary_a["final"]["accuracy"] == summary_b["final"]["accuracy"]


def trainer_state(run_dir: Path) -> dict:
    """The latest checkpoint's trainer state, read as plain values and tensors only."""
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return torch.load(run_dir / "checkpoints" / latest / "trainer_state.pt", weights_only=True)


@pytest.mark.parametrize(
    "overrides",
    [("estimator=hadw",), ("estimator=capo", "estimator_params.base=hadw", "estimator_params.switch_step=3")],
    ids=["hadw", "capo-over-hadw"],
)
def test_a_stateful_estimator_resumes_bit_for_bit_from_its_state_dict(policy_dir, tmp_path, parity, overrides):
    """HA-DW's anchor history travels in the checkpoint as a state dict (no pickled estimator), also as a base."""
    config = tiny_config(policy_dir, "steps=4", parity, "checkpoint_every=2", "eval_every=0", *overrides)
    Trainer(config, tmp_path / "a").train()
    train_until_interrupted(config, tmp_path / "b", at_step=3)

    # the checkpoint holds the estimator's name, hyperparameters and state dict, all readable with weights_only=True
    state = trainer_state(tmp_path / "b")
    assert state["step"] == 2 and state["estimator_name"] == config.estimator
    assert state["estimator_params"] == dataclasses.asdict(config.build_estimator().params)
    hadw = state["estimator"] if config.estimator == "hadw" else state["estimator"]["base"]
    assert hadw["estimator"] == "hadw" and len(hadw["accuracies"]) == 2 and hadw["last_step"] == 2

    resumed = Trainer(config, tmp_path / "b", resume=True)
    assert resumed.step == 2 and resumed.estimator.state_dict() == state["estimator"]
    resumed.train()

    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert len(a) == len(b)
    for x, y in zip(a, b):
        strip = lambda r: {k: v for k, v in r.items() if k not in WALL_CLOCK_KEYS}  # noqa: E731
        assert strip(x) == strip(y)
    assert any(r["kind"] == "train" and r["advantage_abs"] > 0 for r in a)
    weights_a, weights_b = weights(tmp_path / "a" / "policy"), weights(tmp_path / "b" / "policy")
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key
    assert trainer_state(tmp_path / "a")["estimator"] == trainer_state(tmp_path / "b")["estimator"]


def test_resume_refuses_a_checkpoint_of_another_estimator_configuration(policy_dir, tmp_path, parity):
    config = tiny_config(policy_dir, "steps=2", parity, "checkpoint_every=1", "eval_every=0", "estimator=hadw")
    Trainer(config, tmp_path).train()
    for overrides in (("estimator=hadw", "estimator_params.lambda_scale=1.5"), ("estimator=grpo",)):
        other = tiny_config(policy_dir, "steps=3", parity, "checkpoint_every=1", "eval_every=0", *overrides)
        with pytest.raises(ValueError) as info:
            Trainer(other, tmp_path, resume=True)
        assert "was written with estimator 'hadw'" in one_line(info.value)


# ----------------------------------------------------------------------------------------------------------------
# failures
# ----------------------------------------------------------------------------------------------------------------


def test_non_finite_loss_stops_with_the_last_good_checkpoint(policy_dir, tmp_path, monkeypatch, parity):
    from canonrl.lab.policy import load_policy

    original = Trainer.advantages_and_returns

    def poisoned(self, step, rollouts, rewards):
        advantages, returns = original(self, step, rollouts, rewards)
        return (advantages, returns) if step < 3 else (torch.full_like(advantages, float("nan")), returns)

    monkeypatch.setattr(Trainer, "advantages_and_returns", poisoned)
    config = tiny_config(policy_dir, "steps=4", "checkpoint_every=2", "estimator=grpo", parity)
    run_dir = tmp_path / "nan"
    with pytest.raises(TrainingError) as info:
        Trainer(config, run_dir).train()
    checkpoint = run_dir / "checkpoints" / "step-000002"
    message = one_line(info.value)
    assert "non-finite loss" in message and "step 3" in message
    assert str(checkpoint) in message
    # the named checkpoint is intact: it loads, and its state is that of step 2
    policy = load_policy(str(checkpoint))
    assert sum(p.numel() for p in policy.model.parameters()) > 0
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    assert state["step"] == 2
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000002"
    assert not (run_dir / "summary.json").exists()
    # and, with sane advantages again, the run resumes from it to the end
    monkeypatch.setattr(Trainer, "advantages_and_returns", original)
    summary = Trainer(config, run_dir, resume=True).train()
    assert summary["final"]["step"] == 4


class FlakyTask(ParityTask):
    """Lab problems; the verifier raises on responses of odd length and scores the others (1 if length % 4 == 0)."""

    name = "flaky"

    def verify(self, response, problem):
        if len(response) % 2:
            raise RuntimeError("verifier bug")
        score = 1.0 if len(response) % 4 == 0 else 0.0
        return Reward(score, {"correct": score})


def test_a_raising_verifier_does_not_stop_the_run(policy_dir, tmp_path, monkeypatch):
    built = []

    def flaky():
        built.append("flaky")
        return FlakyTask()

    use_test_tasks(monkeypatch, {"flaky": flaky})
    config = tiny_config(policy_dir, "steps=2", "task=flaky", "estimator=grpo")
    summary = Trainer(config, tmp_path / "flaky").train()
    assert built == ["flaky"]
    trains = [r for r in read_metrics(tmp_path / "flaky") if r["kind"] == "train"]
    assert len(trains) == 2 and all(math.isfinite(r["loss"]) for r in trains)
    failures = [r["verify_failures"] for r in trains]
    assert sum(failures) > 0
    assert all(f < 16 for f in failures)  # the others were verified normally
    assert all("reward/correct" in r for r in trains)
    assert summary["final"]["step"] == 2


# ----------------------------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli():
    from typer.testing import CliRunner

    from canonrl.cli import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:"), result.output
    return lines[0]


def test_cli_train_unknown_key(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("train", "foo=1")
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert "'foo'" in line and "valid keys" in line and "estimator_params" in line
    assert not (tmp_path / "runs").exists()


def test_cli_train_unknown_estimator(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("train", "estimator=nope")
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert "unknown estimator 'nope'" in line and "grpo" in line


def test_cli_train_missing_policy(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("train", "policy=/nonexistent", *TINY)
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert "/nonexistent" in line and "lab-tiny" in line
    assert not (tmp_path / "runs").exists()


def test_cli_resume_needs_out(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("train", "--resume")
    assert result.exit_code == 2, result.output
    assert "--out" in error_line(result)


@pytest.fixture(scope="module")
def cli_run(cli, policy_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    result = cli("train", f"policy={policy_dir}", *TINY, "steps=2", "estimator=grpo", "--out", out)
    return result, out


def test_cli_train_tiny_run(cli_run):
    result, out = cli_run
    assert result.exit_code == 0, result.output
    assert "accuracy (mean@2" in result.output and "greedy pass@1" in result.output
    assert "plots:" in result.output
    plots = result.output.split("plots:", 1)[1].split(",")
    assert plots and all(Path(p.strip()).is_file() for p in plots if p.strip())
    assert (out / "summary.json").is_file() and (out / "policy" / "config.json").is_file()


def test_cli_train_refuses_to_overwrite_and_resume_refuses_overrides(cli, cli_run, policy_dir):
    _, out = cli_run
    result = cli("train", f"policy={policy_dir}", *TINY, "--out", out)
    assert result.exit_code == 2 and "already holds a run" in error_line(result)
    result = cli("train", "steps=3", "--resume", "--out", out)
    assert result.exit_code == 2 and "saved config" in error_line(result)


def test_cli_eval_run_directory(cli, cli_run):
    _, out = cli_run
    result = cli("eval", out, "--problems", 4, "--samples", 2, "--budgets", "8,16")
    assert result.exit_code == 0, result.output
    assert "accuracy within 8 tokens" in result.output and "accuracy within 16 tokens" in result.output
    assert "accuracy within 24 tokens" not in result.output
    assert "greedy pass@1" in result.output


def test_cli_eval_bad_budgets(cli, cli_run):
    _, out = cli_run
    result = cli("eval", out, "--problems", 4, "--budgets", "8,x")
    assert result.exit_code == 2 and "--budgets" in error_line(result)


def test_cli_compare(cli, policy_dir, tmp_path):
    out = tmp_path / "r"
    result = cli(
        "compare", "-e", "grpo", "-e", "dr_grpo", "--seeds", "0", "--jobs", "2",
        f"policy={policy_dir}", "steps=2", *TINY, "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = (out / "summary.md").read_text()
    assert "grpo" in summary and "dr_grpo" in summary
    for label in ("grpo", "dr_grpo"):
        run = out / "runs" / f"{label}-seed0"
        assert (run / "summary.json").is_file(), label
        assert json.loads((run / "summary.json").read_text())["estimator"] == label


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_skipping_zero_advantage_rows_changes_no_weight(policy_dir, tmp_path, parity, loss_agg):
    """Rows with advantage 0 everywhere are not run; the optimizer step must be the one that runs them all."""
    from canonrl.lab.trainer import Trainer

    config = tiny_config(policy_dir, parity, f"loss_agg={loss_agg}", "prompts_per_step=4", "group_size=4", "micro_batch_size=3")
    results = []
    for skip in (True, False):
        trainer = Trainer(config, tmp_path / f"skip-{skip}")
        if not skip:
            trainer.updater.rows_to_train = lambda rollouts, advantages, loss_mask=None: torch.ones(
                advantages.shape[0], dtype=torch.bool
            )
        rollouts, verdict = trainer.rollout(1)
        advantages = torch.randn(rollouts.response_mask.shape, generator=torch.Generator().manual_seed(0))
        advantages[::2] = 0.0  # every other row carries nothing
        for step in (1, 2):  # the second step checks AdamW's state after a step with skipped rows
            metrics = trainer.update(step, rollouts, advantages * rollouts.response_mask)
        results.append((metrics, {k: v.detach().clone() for k, v in trainer.policy.model.state_dict().items()}))
    (skipped_metrics, skipped), (full_metrics, full) = results
    assert skipped_metrics["trained_rows"] == 0.5 and full_metrics["trained_rows"] == 1.0
    assert skipped_metrics["loss"] == pytest.approx(full_metrics["loss"], abs=1e-6)
    assert skipped_metrics["pg_clipfrac"] == pytest.approx(full_metrics["pg_clipfrac"], abs=1e-6)
    for name in full:
        assert torch.allclose(skipped[name], full[name], atol=1e-6), name


def test_the_trainer_builds_each_component_once(policy_dir, tmp_path, monkeypatch):
    """The config checks its values; the trainer builds the estimator and the policy loss once each."""
    from canonrl.lab import config as config_module

    config = tiny_config(policy_dir)  # loaded and validated before counting
    built = []
    for factory in ("build_estimator", "build_policy_loss", "build_prompt_sampler"):
        real = getattr(config_module.TrainConfig, factory)
        monkeypatch.setattr(
            config_module.TrainConfig, factory,
            lambda self, *a, _real=real, _name=factory, **k: built.append(_name) or _real(self, *a, **k),
        )  # fmt: skip
    Trainer(config, tmp_path)
    assert sorted(built) == ["build_estimator", "build_policy_loss", "build_prompt_sampler"]
