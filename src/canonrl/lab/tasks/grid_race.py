"""lab-grid race: two players race through the same `~canonrl.lab.tasks.grid.GridTask` maze (`GridRace`,
``"grid-race"``).

Rules. Both players start on the same cell of the same maze (a `GridTask` problem, unchanged: same prompt, same
splits) and move simultaneously: each turn every player writes one action and `GridRace.step_joint` applies all
of them at once. Each player has its own position and key flag; the map never changes, so the key is not consumed
and both players may pick it up. Players do not block each other (they may share a cell). The race ends when at
least one player stands on the goal after a turn, or after ``max_turns`` turns.

Outcome (`GridRace.outcome`): 1.0 for a player that alone reached the goal, 0.5 each when both reached it on the
same turn, 0.0 otherwise (so 0.0 for both when nobody arrives in ``max_turns`` turns).

Turn rewards (`JointTransition.rewards`): exactly the single-player reward of each player's own move, computed by
`GridTask.step` on that player's own `GridState`: ``progress_reward`` times the BFS distance progress, a bump
``-invalid_penalty / 2``, an invalid move text ``-invalid_penalty`` (``valid=False``, the player stays).

Observation (`GridRace.render`) for player ``p`` after a turn: its own single-player observation (``GridTask.render``
of its own state, ``<row>,<col>,<has_key>;``) followed by one token, the opponent's action of that turn: its letter
``u d l r`` when the opponent's text was a valid move (a bump included), else ``.`` (an invalid text; also before
the first turn). Seven tokens, e.g. ``3,1,0;u``. The first observation is the problem's prompt, as in the grid.

Why: the race turns the single-player gridworld into a two-player game with no new vocabulary (every rendered
character is already in `~canonrl.lab.tasks.grid.VOCAB`, so the shipped grid policy and its tokenizer play it as
is), the same per-move rewards (so single-player and race numbers compare directly) and the same BFS expert. The
players do not interact, so the single-player expert is also optimal in the race; the opponent's token gives a
multi-agent method (MARS-style per-player advantages, a judge) a game whose outcome depends on both policies.
States are plain frozen values (`RaceState`), hashable, so any prefix replays from the start state.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from canonrl.lab.tasks.base import Problem, Split
from canonrl.lab.tasks.grid import MOVES, GridState, GridTask

NO_ACTION = "."  # the opponent token for an invalid move text, or before the first turn (a VOCAB symbol)


@dataclass(frozen=True)
class RaceState:
    """One state of a race: plain, hashable values, so any prefix of a race replays from the start state."""

    players: tuple[GridState, ...]  # each player's single-player state
    last_actions: tuple[str, ...]  # each player's last action letter, "." for an invalid one or none yet
    turn: int = 0  # turns taken so far


@dataclass(frozen=True)
class JointTransition:
    """The result of one simultaneous turn of every player."""

    state: RaceState
    rewards: tuple[float, ...]  # per player: `GridTask.step`'s reward of its own move
    valid: tuple[bool, ...]  # per player: False for an invalid move text
    done: bool


class GridRace:
    """Two players racing through one grid maze (see the module docstring); the options are `GridTask`'s."""

    name = "grid-race"
    players = 2
    multi_turn = True  # the trainer's multi-turn rollout plays it, two rows (players) per game
    cheap = True

    def __init__(self, **options):
        self.single = GridTask(**options)  # the single-player task: problems, dynamics, rewards, expert

    @property
    def max_turns(self) -> int:
        return self.single.max_turns

    @property
    def max_action_tokens(self) -> int:
        return self.single.max_action_tokens

    @property
    def components(self) -> tuple[str, ...]:
        return self.single.components

    @property
    def policy(self) -> str:
        return self.single.policy

    @property
    def evaluation_env(self) -> GridTask:
        """Where the trainer evaluates a race policy: alone in the maze (self-play's win rate is 0.5 by symmetry)."""
        return self.single

    def _check_player(self, player: int) -> None:
        if not 0 <= player < self.players:
            raise ValueError(f"player must be an int in [0, {self.players}), got {player!r}")

    def problems(self, split: Split, count: int, seed: int) -> list[Problem]:
        """The single-player task's problems, unchanged."""
        return self.single.problems(split, count, seed)

    def reset(self, problem: Problem) -> RaceState:
        start = self.single.reset(problem)
        return RaceState((start,) * self.players, (NO_ACTION,) * self.players, 0)

    def _at_goal(self, state: RaceState) -> tuple[bool, ...]:
        return tuple(bool(self.single.outcome(player)) for player in state.players)

    def done(self, state: RaceState) -> bool:
        """Whether the race is over: a player stands on the goal, or ``max_turns`` turns were taken."""
        return any(self._at_goal(state)) or state.turn >= self.max_turns

    def step_joint(self, state: RaceState, actions: Sequence[str]) -> JointTransition:
        """Apply one action text per player at once; an unparsable text is that player's invalid move."""
        if isinstance(actions, str) or len(actions) != self.players:
            raise ValueError(f"step_joint takes one action per player ({self.players}), got {actions!r}")
        if self.done(state):
            return JointTransition(state, (0.0,) * self.players, (True,) * self.players, True)
        steps = [self.single.step(player, action) for player, action in zip(state.players, actions)]
        texts = (action.strip() if isinstance(action, str) else "" for action in actions)
        last = tuple(text if text in MOVES else NO_ACTION for text in texts)  # as `GridTask.step` parses it
        new = RaceState(tuple(step.state for step in steps), last, state.turn + 1)
        return JointTransition(
            new, tuple(step.reward for step in steps), tuple(step.valid for step in steps), self.done(new)
        )

    def render(self, state: RaceState, player: int) -> str:
        """Player `player`'s observation: its own grid observation, then the opponent's last action token."""
        self._check_player(player)
        return self.single.render(state.players[player]) + state.last_actions[1 - player]

    def anchor(self, state: RaceState, player: int) -> Hashable:
        """``(row, col, has_key)`` of that player, as `GridTask.anchor`."""
        self._check_player(player)
        return self.single.anchor(state.players[player])

    def outcome(self, state: RaceState, player: int) -> float:
        """1.0 when `player` alone stands on the goal, 0.5 when both do, 0.0 otherwise."""
        self._check_player(player)
        at_goal = self._at_goal(state)
        return 1.0 / sum(at_goal) if at_goal[player] else 0.0

    def expert_action(self, state: RaceState, player: int) -> str:
        """The single-player expert's action for that player (the players do not interact, so it is optimal)."""
        self._check_player(player)
        return self.single.expert_action(state.players[player])

    def action_ended(self, action: str) -> bool:
        return self.single.action_ended(action)
