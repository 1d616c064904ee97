"""The multi-turn rollout (canonrl.lab.multi_turn) on a toy environment over the lab-tiny vocabulary: the recorded
turns, holes that neither attend nor take a position (so the training forward reproduces the sampling log-probs),
environment errors that end one episode only, determinism."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from canonrl.lab.forward import SharedPrompts, sequence_logprobs
from canonrl.lab.multi_turn import run_episodes, turn_metrics
from canonrl.lab.policy import load_policy
from canonrl.lab.tasks.base import Problem
from canonrl.lab.tasks.environment import Environment, Transition


@dataclass(frozen=True)
class Count:
    turn: int
    total: int
    done: bool = False


class Adder:
    """Each action is a number ended by ';' (at most 3 tokens); the total grows by it; done above 20 or after 4
    turns. Observations alternate in length (``=7;`` and ``7?``), so rows wait for each other in both phases."""

    name, multi_turn, components = "adder", True, ("success",)
    max_turns, max_action_tokens, players = 4, 3, 1

    def __init__(self, fail_at_total: int | None = None, long_observation_at: int | None = None):
        self.fail_at_total, self.long_observation_at = fail_at_total, long_observation_at

    def problems(self, split, count, seed):
        return [Problem(f"{i}+{i}?", str(2 * i), {"i": i}) for i in range(count)]

    def reset(self, problem):
        return Count(0, problem.meta["i"])

    def step(self, state, action):
        if self.fail_at_total is not None and state.total == self.fail_at_total:
            raise RuntimeError("the environment broke")
        digits = action.rstrip(";")
        valid = digits.isdigit()
        total = state.total + (int(digits) if valid else 0)
        done = total > 20 or state.turn + 1 >= self.max_turns
        return Transition(Count(state.turn + 1, total, done), 0.1 if valid else -0.1, done, valid)

    def render(self, state):
        if self.long_observation_at is not None and state.turn == self.long_observation_at:
            return "=" * 40
        return f"={state.total};" if state.turn % 2 else f"{state.total}?"

    def anchor(self, state):
        return (state.turn, state.total)

    def expert_action(self, state):
        return "9;"

    def action_ended(self, action):
        return action.endswith(";")

    def outcome(self, state):
        return float(state.total > 20)


@pytest.fixture(scope="module")
def policy():
    return load_policy("lab-tiny")


def episodes(policy, env=None, seed=0, problems=3, repeats=4):
    env = env or Adder()
    generator = torch.Generator().manual_seed(seed)
    return run_episodes(policy, env, env.problems("train", problems, 0), repeats=repeats, generator=generator)


def test_the_toy_is_an_environment():
    assert isinstance(Adder(), Environment)


def test_turns_are_recorded_per_action_token(policy):
    rollouts, verdict = episodes(policy)
    turns = rollouts.turns
    rows = rollouts.response_ids.shape[0]
    assert rows == 12 and len(verdict.scores) == 12 and verdict.failures == 0
    action = turns.turn_ids >= 0
    assert torch.equal(action, rollouts.response_mask.bool())  # actions are the trained tokens
    assert (rollouts.attention.bool() | ~action).all()  # every action token is attended
    for row in range(rows):
        count = len(turns.step_rewards[row])
        assert count == len(turns.anchors[row]) == len(set(turns.turn_ids[row][action[row]].tolist()))
        assert 1 <= count <= Adder.max_turns
        assert turns.anchors[row][0] == (0, row // 4)  # the start state of the row's problem
    assert (rollouts.logprobs[~action] == 0).all() and (rollouts.logprobs[action] < 0).all()
    metrics = turn_metrics(turns, torch.arange(3).repeat_interleave(4))
    assert metrics["anchor_group_size"] >= 1 and 0 <= metrics["anchor_singletons"] <= 1


def test_holes_attend_nowhere_and_the_training_forward_reproduces_the_sampling_logprobs(policy):
    rollouts, _ = episodes(policy)
    holes = (rollouts.attention == 0) & (rollouts.attention.flip(1).cumsum(1).flip(1) > 0)
    assert holes.any()  # rows waited for others (actions and observations of different lengths)
    logprobs, _ = sequence_logprobs(policy.model, rollouts)
    torch.testing.assert_close(logprobs, rollouts.logprobs, atol=1e-4, rtol=0)
    rows = torch.arange(rollouts.response_ids.shape[0])
    shared = SharedPrompts(policy.model, rollouts, rows).logprobs(rows, rollouts.select(rows))
    torch.testing.assert_close(shared, rollouts.logprobs[:, : shared.shape[1]], atol=1e-4, rtol=0)


def test_select_keeps_turns_and_attention(policy):
    rollouts, _ = episodes(policy)
    rows = torch.tensor([5, 0])
    mini = rollouts.select(rows)
    assert mini.turns.step_rewards == [rollouts.turns.step_rewards[5], rollouts.turns.step_rewards[0]]
    width = mini.response_ids.shape[1]
    assert torch.equal(mini.attention, rollouts.attention[rows, :width])
    assert rollouts.attention[rows, width:].sum() == 0


def test_the_same_seed_gives_the_same_episodes(policy):
    first, _ = episodes(policy, seed=3)
    again, _ = episodes(policy, seed=3)
    assert torch.equal(first.response_ids, again.response_ids) and first.turns.anchors == again.turns.anchors


def test_an_environment_error_ends_that_episode_with_reward_zero(policy):
    rollouts, verdict = episodes(policy, Adder(fail_at_total=1), problems=2, repeats=2)
    # problem 1 starts at total 1: its first step raises; problem 0's episodes go on
    assert verdict.scores[2:] == [0.0, 0.0] and verdict.failures == 2
    assert rollouts.turns.errors.tolist() == [False, False, True, True]
    assert [len(r) for r in rollouts.turns.step_rewards[2:]] == [1, 1]
    too_long, verdict = episodes(policy, Adder(long_observation_at=1), problems=1, repeats=2)
    assert verdict.failures == 2 and verdict.scores == [0.0, 0.0]
