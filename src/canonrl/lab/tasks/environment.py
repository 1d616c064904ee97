"""What a multi-turn lab task (an environment) is: problems from a seed on non-overlapping splits, a start state, a
step function from the policy's action text, observations as text, anchors, an expert and a final outcome.

An environment is any object with this interface (`Environment`); it registers with
`canonrl.lab.tasks.register_task` like a single-turn task, and the trainer recognises it by ``multi_turn = True``.
States are plain, immutable values, so any prefix of an episode can be replayed from its start state and its
actions (branching, Monte Carlo values, expert states).

One episode: the policy sees ``problem.prompt`` (the first observation), then per turn writes an action of at most
``max_action_tokens`` tokens (ending early where `action_ended` says so), the environment steps, and its
observation (`render` of the new state) is appended to the context as tokens the policy does not train on. The
episode ends when a step returns ``done`` or after ``max_turns`` turns; `outcome` of the last state is its reward.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from canonrl.lab.tasks.base import Problem, Split


@dataclass(frozen=True)
class Transition:
    """The result of one environment step."""

    state: Any
    #: the turn reward (progress, a tool's success): a step estimator's ``step_rewards``
    reward: float
    done: bool
    #: False when the environment could not parse or apply the action (an invalid move; the state is unchanged)
    valid: bool = True


@runtime_checkable
class Environment(Protocol):
    name: str
    multi_turn: bool  # True: the trainer runs it with the multi-turn rollout
    #: verdict components of an episode's outcome (as a single-turn task's)
    components: tuple[str, ...]
    max_turns: int
    max_action_tokens: int
    players: int

    def problems(self, split: Split, count: int, seed: int) -> list[Problem]:
        """`count` problems of `split`, a pure function of (split, count, seed); a "train" problem is never a
        "heldout" one. ``Problem.prompt`` is the first observation."""
        ...

    def reset(self, problem: Problem) -> Any:
        """The start state of `problem`."""
        ...

    def step(self, state: Any, action: str) -> Transition:
        """Apply the policy's action text; an unparsable action is an invalid move, never an exception."""
        ...

    def render(self, state: Any) -> str:
        """The observation appended after the action that reached `state`."""
        ...

    def anchor(self, state: Any) -> Hashable:
        """The state's identity for grouping steps that start from the same state (GiGPO's anchor)."""
        ...

    def expert_action(self, state: Any) -> str:
        """An optimal action from `state`."""
        ...

    def action_ended(self, action: str) -> bool:
        """Whether the action text written so far is complete (the turn ends before ``max_action_tokens``)."""
        ...

    def outcome(self, state: Any) -> float:
        """The episode's reward in [0, 1] when it ends in `state`."""
        ...


# Optional, where an environment has an exact solver (lab-grid's BFS): ``state_value(state) -> float`` (the optimal
# policy's expected outcome from `state`: V*, a step estimator's ``step_values``) and
# ``step_label(state, next_state) -> float`` (+1 when the turn was a right step, -1 otherwise: ``step_labels``).


# Optional: ``judge(first: Episode, second: Episode) -> float``, a deterministic pairwise judge of two episodes of
# one problem: 1.0 when the first is better, 0.0 when the second is, 0.5 for a tie (ArenaRL's comparator).


@dataclass(frozen=True)
class Episode:
    """What a judge sees of an episode: its outcome, its length in turns, its invalid moves and its turn rewards."""

    outcome: float
    turns: int
    invalid: int
    turn_reward: float


def has_judge(env: Any) -> bool:
    """Whether `env` judges pairs of episodes (``judge``)."""
    return callable(getattr(env, "judge", None))


def has_solver(env: Any) -> bool:
    """Whether `env` gives step values and labels (``state_value`` and ``step_label``)."""
    return callable(getattr(env, "state_value", None)) and callable(getattr(env, "step_label", None))


def is_multi_turn(task: Any) -> bool:
    return bool(getattr(task, "multi_turn", False))
