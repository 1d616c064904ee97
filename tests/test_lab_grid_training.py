"""The trainer on lab-grid (a multi-turn environment) with the shipped lab-grid-tiny policy: step estimators train by
name with the rollout's turns, outcome-level ones see one reward per episode, a killed run resumes bit-exactly, and
a step estimator on a single-turn task is a one-line error at start."""

from __future__ import annotations

import json

import pytest
import torch

from canonrl.lab.config import load_config
from canonrl.lab.trainer import Trainer
from conftest import assert_resume_is_bit_exact

TINY = ["task=grid", "prompts_per_step=2", "group_size=4", "eval_problems=4", "eval_samples=2", "threads=1",
        "tensorboard=false"]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


def grid_config(*overrides: str):
    return load_config(None, [*TINY, *overrides])


@pytest.mark.parametrize("estimator", ["gigpo", "trloo", "igpo", "grpo", "spo_chain", "spae", "fspo"])
def test_an_estimator_trains_on_grid_by_name(estimator, tmp_path):
    trainer = Trainer(grid_config(f"estimator={estimator}", "steps=1"), tmp_path)
    assert trainer.policy_name == "lab-grid-tiny"  # policy=auto: the task's shipped policy
    result = trainer.train_step(1)
    rollouts, advantages = result.rollouts, result.advantages
    assert rollouts.turns is not None and torch.isfinite(advantages).all()
    assert (advantages[rollouts.response_mask == 0] == 0).all()
    metrics = result.metrics
    assert metrics["turns"] >= 1 and 0 <= metrics["anchor_singletons"] <= 1 and metrics["env_errors"] == 0
    per_turn = [set(advantages[row][rollouts.turns.turn_ids[row] == t].tolist())
                for row in range(advantages.shape[0]) for t in range(int(rollouts.turns.turn_ids[row].max()) + 1)]
    assert all(len(values) == 1 for values in per_turn)  # one advantage per turn (an action is one token here)
    rows_vary = any(len(set(advantages[row][rollouts.response_mask[row] > 0].tolist())) > 1
                    for row in range(advantages.shape[0]))  # fmt: skip
    if estimator in ("grpo", "gigpo", "fspo"):  # GRPO: one value per episode; these two vary along one
        assert rows_vary == (estimator != "grpo")
    if estimator in ("spo_chain", "spae", "fspo"):  # the solver's values and labels, one per turn
        turns = rollouts.turns
        assert [len(v) for v in turns.step_values] == [len(r) for r in turns.step_rewards]
        assert {x for labels in turns.step_labels for x in labels} <= {-1.0, 1.0}


def test_a_killed_grid_run_resumes_bit_exactly(tmp_path):
    config = grid_config("estimator=gigpo", "steps=3", "eval_every=2", "checkpoint_every=2")
    records = assert_resume_is_bit_exact(config, tmp_path)
    assert [r["kind"] for r in records].count("train") == 3


def test_a_step_estimator_needs_a_multi_turn_task(tmp_path):
    with pytest.raises(ValueError, match=r"needs step_rewards, anchor, which only a multi-turn task gives"):
        Trainer(load_config(None, ["estimator=gigpo", "steps=1"]), tmp_path)


def test_lab_grid_tiny_rebuilds_from_its_recipe(tmp_path):
    from typer.testing import CliRunner

    from canonrl.cli import app
    from canonrl.lab.policy import load_policy
    from canonrl.lab.tasks.grid import VOCAB
    from canonrl.lab.warmstart_grid import GridWarmstartConfig, warmstart_grid

    summary = warmstart_grid(tmp_path / "p", GridWarmstartConfig(steps=2, warmup_steps=1, eval_problems=2))
    assert summary["rebuild"] == "canonrl lab warmstart --policy lab-grid-tiny" and summary["recipe"]["noise"] == 0.6
    assert json.loads((tmp_path / "p" / "warmstart.json").read_text()) == summary
    policy = load_policy(str(tmp_path / "p"))
    assert policy.tokenizer.convert_ids_to_tokens(list(range(len(VOCAB)))) == list(VOCAB)
    refused = CliRunner().invoke(app, ["lab", "warmstart", "--policy", "lab-huge"])
    assert refused.exit_code != 0 and "lab-tiny, lab-grid-tiny" in refused.output


def test_matchtir_trains_on_calc_with_the_shipped_lab_tiny(tmp_path):
    config = load_config(None, ["task=calc", "estimator=matchtir", "steps=1", "prompts_per_step=2", "group_size=4",
                                "eval_problems=4", "eval_samples=1", "threads=1", "tensorboard=false"])  # fmt: skip
    trainer = Trainer(config, tmp_path)
    assert trainer.policy_name == "lab-tiny"
    result = trainer.train_step(1)
    assert result.rollouts.turns is not None and torch.isfinite(result.advantages).all()
    assert result.metrics["turns"] >= 2  # operations and the answer, each a turn


def test_the_grid_judge_by_hand():
    from canonrl.lab.tasks.environment import Episode
    from canonrl.lab.tasks.grid import GridTask

    judge = GridTask().judge
    won_long, won_short, lost = Episode(1.0, 6, 0, 0.3), Episode(1.0, 4, 1, 0.4), Episode(0.0, 12, 0, -0.2)
    assert judge(won_long, lost) == 1.0 and judge(lost, won_long) == 0.0  # the outcome first
    assert judge(won_short, won_long) == 1.0  # then fewer turns, whatever the invalid moves
    assert judge(Episode(0.0, 12, 1, 0.0), lost) == 0.0  # then fewer invalid moves
    assert judge(lost, Episode(0.0, 12, 0, 0.5)) == 0.5  # the turn rewards do not count: a tie


def test_arenarl_trains_on_grid_with_round_robin_wins(tmp_path):
    from canonrl.lab.tasks.environment import Episode

    trainer = Trainer(grid_config("estimator=arenarl", "steps=1"), tmp_path)
    problems, _ = trainer.draw_problems(1)
    rollouts, verdict = trainer.rollout(1, problems)
    inputs, metrics = trainer.extra_inputs(1, problems, rollouts, verdict.scores)
    turns = rollouts.turns
    episodes = [Episode(s, len(r), int(i), sum(r)) for s, r, i in
                zip(verdict.scores, turns.step_rewards, turns.invalid.tolist())]  # fmt: skip
    for start in (0, 4):  # each problem's 4 episodes play a round robin of 6 games, one point each
        expected = [sum(trainer.task.judge(episodes[i], episodes[j]) for j in range(start, start + 4) if j != i)
                    for i in range(start, start + 4)]  # fmt: skip
        assert inputs["metric"][start : start + 4].tolist() == expected and sum(expected) == 6.0
    assert "judge_wins" in metrics
    result = trainer.train_step(1)
    assert torch.isfinite(result.advantages).all() and (result.advantages != 0).any()


def test_arenarl_needs_a_judge(tmp_path):
    with pytest.raises(ValueError, match=r"needs metric, a judge's tournament over each group"):
        Trainer(load_config(None, ["estimator=arenarl", "steps=1"]), tmp_path)


def test_seeupo_reverse_turn_order_updates_the_last_turn_first(tmp_path):
    trainer = Trainer(grid_config("estimator=grpo", "turn_order=reverse", "steps=1"), tmp_path)
    masks = []
    update = trainer.updater

    def recording(step, rollouts, advantages, ref_logprobs=None, loss_mask=None):
        masks.append(loss_mask.clone())
        return update(step, rollouts, advantages, ref_logprobs, loss_mask)

    trainer.updater = recording
    result = trainer.train_step(1)
    turn_ids, mask = result.rollouts.turns.turn_ids, result.rollouts.response_mask
    last = int(turn_ids.max())
    assert result.metrics["turn_passes"] == last + 1 == len(masks)
    for index, loss_mask in enumerate(masks):  # turn last, last - 1, ..., 0: each pass that turn's tokens only
        assert torch.equal(loss_mask, mask * (turn_ids == last - index))
    with pytest.raises(ValueError, match="turn_order=reverse updates turn by turn"):
        Trainer(load_config(None, ["estimator=grpo", "turn_order=reverse", "steps=1"]), tmp_path / "single")


def test_a_step_that_trains_no_row_steps_adamw_as_a_resumed_run_would(tmp_path):
    """Gradients exist (zeros) from the start, so a step whose advantages are all 0 steps AdamW on every parameter
    whether the run is fresh, continuing or just resumed (a None grad would make AdamW skip it)."""
    trainer = Trainer(grid_config("estimator=grpo", "steps=1"), tmp_path)
    assert all(p.grad is not None for p in trainer.policy.model.parameters())
    rollouts, _ = trainer.rollout(1)
    metrics = trainer.update(1, rollouts, torch.zeros_like(rollouts.response_mask))
    assert metrics["trained_rows"] == 0.0
    steps = [float(state["step"]) for state in trainer.optimizer.state_dict()["state"].values()]
    assert len(steps) == len(list(trainer.policy.model.parameters())) and set(steps) == {1.0}
