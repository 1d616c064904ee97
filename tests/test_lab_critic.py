"""The lab's critic: verl's clipped value loss, the value head and the separate critic, the config's rules, and GAE
and SAE training on lab-grid with resume bit-exact (critic state included) and VC-PPO's warm-up."""

from __future__ import annotations

import json

import pytest
import torch

from canonrl.lab.config import ConfigError, load_config
from canonrl.lab.critic import Critic, value_metrics
from canonrl.lab.trainer import CRITIC_STATE, Trainer
from canonrl.training.value_loss import clipped_value_loss
from conftest import SHORT_RESUME, assert_resume_is_bit_exact

TINY = ["task=grid", "prompts_per_step=2", "group_size=4", "eval_problems=4", "eval_samples=2", "threads=1",
        "tensorboard=false"]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


def test_clipped_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.0, 5.0]])
    old = torch.tensor([[0.0, 0.0, 0.0]])
    returns = torch.tensor([[2.0, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, clipfrac = clipped_value_loss(values, returns, old, mask, clip=0.5)
    # token 0: unclipped (1-2)^2 = 1, clipped (0.5-2)^2 = 2.25 -> 2.25; token 1: both (0-1)^2 = 1; token 2 masked
    assert loss.item() == pytest.approx(0.5 * (2.25 + 1.0) / 2)
    assert clipfrac.item() == pytest.approx(0.5)


def test_clipped_value_loss_matches_verl():
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    generator = torch.Generator().manual_seed(0)
    values, old, returns = (torch.randn(6, 9, generator=generator) for _ in range(3))
    mask = (torch.rand(6, 9, generator=generator) > 0.3).float()
    ours = clipped_value_loss(values, returns, old, mask, clip=0.2)
    theirs = core_algos.compute_value_loss(values, returns, old, mask, cliprange_value=0.2, loss_agg_mode="token-mean")
    assert ours[0].item() == pytest.approx(float(theirs[0]), rel=1e-6)
    assert ours[1].item() == pytest.approx(float(theirs[1]), rel=1e-6)


def test_value_metrics_by_hand():
    returns = torch.tensor([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    perfect = value_metrics(returns.clone(), returns, mask)
    assert perfect["value_explained_variance"] == pytest.approx(1.0)
    zero = value_metrics(torch.zeros(1, 3), returns, mask)  # Var(R) = 1 and Var(R - 0) = 1 -> 0
    assert zero["value_explained_variance"] == pytest.approx(0.0) and zero["value_mean"] == 0.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["estimator=gae"], r"estimator 'gae' reads a critic's values: set critic=head or critic=separate"),
        (["estimator=grpo", "critic=head"], r"estimator 'grpo' reads no values"),
        (["estimator=gae", "critic=shared"], r"unknown critic 'shared'; choose from none, head, separate"),
        (["estimator=gae", "critic=head", "critic_epochs=0"], r"critic_epochs must be >= 1"),
        (["estimator=gae", "critic=head", "value_clip=0"], r"value_clip must be > 0"),
    ],
)
def test_critic_config_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(None, overrides)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("kind", ["head", "separate"])
def test_the_critic_learns_the_returns_of_a_fixed_batch(kind, tmp_path):
    trainer = Trainer(load_config(None, [*TINY, "estimator=gae", f"critic={kind}", "steps=1"]), tmp_path)
    critic = trainer.critic
    assert isinstance(critic, Critic) and critic.kind == kind
    rollouts, _ = trainer.rollout(1)
    mask = rollouts.response_mask
    first = critic.values(rollouts)
    assert (first == 0).all()  # the head's last layer starts at 0
    returns = torch.where(mask > 0, torch.linspace(-1, 1, mask.shape[1]).expand_as(mask), 0.0)
    policy_before = [p.detach().clone() for p in trainer.policy.model.parameters()]
    losses = []
    for step in range(1, 6):
        old = critic.values(rollouts)
        losses.append(critic.update(step, rollouts, old, returns)["value_loss"])
    assert losses[-1] < losses[0]
    # the critic never moves the policy: the head reads its features without grad, a separate critic has its own
    assert all(torch.equal(a, b) for a, b in zip(policy_before, trainer.policy.model.parameters()))
    assert (critic.values(rollouts)[mask == 0] == 0).all()


@pytest.mark.parametrize("estimator", ["gae", "sae"])
def test_a_critic_estimator_trains_on_grid(estimator, tmp_path):
    trainer = Trainer(load_config(None, [*TINY, f"estimator={estimator}", "critic=head", "steps=1"]), tmp_path)
    result = trainer.train_step(1)
    assert "values" in result.inputs and result.inputs["values"].shape == result.rollouts.response_mask.shape
    assert torch.isfinite(result.advantages).all()
    assert {"value_loss", "value_clipfrac", "value_explained_variance", "critic_seconds"} <= set(result.metrics)


def test_the_critic_warmup_leaves_the_policy_alone(tmp_path):
    trainer = Trainer(load_config(None, [*TINY, "estimator=gae", "critic=head", "critic_warmup=1", "steps=2"]), tmp_path)
    before = [p.detach().clone() for p in trainer.policy.model.parameters()]
    head_before = [p.detach().clone() for p in trainer.critic.head.parameters()]
    metrics = trainer.train_step(1).metrics
    assert metrics["trained_rows"] == 0.0 and "value_loss" in metrics
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.policy.model.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(head_before, trainer.critic.head.parameters()))
    trainer.train_step(2)
    assert not all(torch.equal(a, b) for a, b in zip(before, trainer.policy.model.parameters()))


@pytest.mark.parametrize("kind", ["head", "separate"])
def test_a_killed_critic_run_resumes_bit_exactly(kind, tmp_path):
    config = load_config(None, [*TINY, "estimator=gae", f"critic={kind}", *SHORT_RESUME])
    records = assert_resume_is_bit_exact(config, tmp_path, at_step=2)
    assert (tmp_path / "b" / "checkpoints" / "step-000002" / CRITIC_STATE).is_file()
    assert any("value_loss" in r for r in records)


def test_compare_runs_a_critic_configuration_beside_a_step_estimator(tmp_path):
    from typer.testing import CliRunner

    from canonrl.cli import app

    gae = tmp_path / "gae.yaml"
    gae.write_text("estimator: gae\nlabel: gae-head\ncritic: head\n")
    out = tmp_path / "report"
    args = ["compare", "-e", "gigpo", "-e", str(gae), "--seeds", "0", "--jobs", "1", *TINY, "steps=1",
            "eval_every=0", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = (out / "summary.md").read_text()
    assert "gigpo" in summary and "gae-head" in summary
    record = json.loads((out / "runs" / "gae-head-seed0" / "summary.json").read_text())
    assert record["estimator"] == "gae" and record["task"] == "grid"
