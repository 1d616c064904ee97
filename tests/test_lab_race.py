"""The two-player race in the trainer (``task=grid players=2``): games as consecutive row pairs that act in the same
turns and end together, the opponent's move in each observation, per-player agents and outcomes, MARS and
AdvEvo-MARL training by name, the config's rules, and resume bit-exact."""

from __future__ import annotations

import pytest
import torch

from canonrl.lab.config import ConfigError, load_config
from canonrl.lab.tasks.grid_race import GridRace
from canonrl.lab.trainer import Trainer
from conftest import SHORT_RESUME, assert_resume_is_bit_exact

TINY = ["task=grid", "players=2", "prompts_per_step=2", "group_size=4", "eval_problems=4", "eval_samples=2",
        "threads=1", "tensorboard=false"]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


def test_games_are_row_pairs_that_end_together(tmp_path):
    trainer = Trainer(load_config(None, [*TINY, "estimator=mars", "steps=1"]), tmp_path)
    assert isinstance(trainer.task, GridRace)
    rollouts, verdict = trainer.rollout(1)
    turns = rollouts.turns
    assert turns.agents.tolist() == [0, 1] * 4
    for game in range(4):
        first, second = 2 * game, 2 * game + 1
        assert len(turns.step_rewards[first]) == len(turns.step_rewards[second])  # the same turns
        assert sorted((verdict.scores[first], verdict.scores[second])) in ([0.0, 0.0], [0.0, 1.0], [0.5, 0.5])
        # every observation is the player's position and the opponent's move (7 tokens), read but not trained on
        observed = ((rollouts.attention[first] > 0) & (rollouts.response_mask[first] == 0)).sum().item()
        assert observed == 7 * (len(turns.step_rewards[first]) - 1) or observed == 7 * len(turns.step_rewards[first])
    text = trainer.policy.tokenizer.decode(rollouts.response_ids[0][rollouts.attention[0] > 0].tolist())
    assert text[1:8].count(",") == 2 and text[7] in "udlr."  # action, then e.g. "1,0,0;" and the opponent's move


@pytest.mark.parametrize("estimator", ["mars", "advevo_marl"])
def test_a_multi_agent_estimator_trains_on_the_race(estimator, tmp_path):
    trainer = Trainer(load_config(None, [*TINY, f"estimator={estimator}", "steps=1"]), tmp_path)
    result = trainer.train_step(1)
    assert torch.isfinite(result.advantages).all()
    assert (result.advantages[result.rollouts.response_mask == 0] == 0).all()
    metrics = result.metrics
    assert {"reward/player0", "reward/player1", "tied_games"} <= set(metrics)
    evaluation = trainer.evaluate(1)  # alone in the maze: the skill, not the self-play win rate
    assert 0 <= evaluation["accuracy"] <= 1


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (["task=grid", "estimator=mars"], ValueError, r"needs agent, the player of each row.*set players=2"),
        (["task=grid", "players=3", "estimator=mars"], ConfigError, r"players must be >= 1 and divide group_size"),
        (["players=2", "estimator=grpo"], ValueError, r"task 'lab' has no game of 2 players"),
        ([*TINY, "estimator=rose", "branching.at=[1]", "branching.width=2"], ValueError, r"no branching"),
    ],
)
def test_race_config_errors(overrides, error, message, tmp_path):
    with pytest.raises(error, match=message):
        Trainer(load_config(None, [*overrides, "steps=1"]), tmp_path)


def test_a_killed_race_resumes_bit_exactly(tmp_path):
    config = load_config(None, [*TINY, "estimator=mars", *SHORT_RESUME])
    assert_resume_is_bit_exact(config, tmp_path, at_step=2)
