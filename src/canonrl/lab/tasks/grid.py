"""lab-grid: a procedurally generated text gridworld, the lab's multi-turn environment (`GridTask`, ``"grid"``).

Format (one token per character). A map is its rows joined by ``|``; cells are ``#`` wall, ``.`` floor, ``G``
goal, ``K`` key, ``D`` door. The prompt (the first observation) is the map, ``@``, then the start observation::

    #..G|.#..|K#D.|....@3,0,0;

An observation is ``<row>,<col>,<has_key>;`` (0-based row and column, key flag 0/1): always six tokens, e.g.
``3,1,0;`` after moving right from ``3,0``. An action is one token: ``u`` (row - 1), ``d`` (row + 1), ``l``
(col - 1), ``r`` (col + 1); `GridTask.action_ended` ends the turn after one token. The map never changes during an
episode: the key stays drawn once picked up (the flag says it is held), the door stays ``D``.

Dynamics and rewards (`GridTask.step`):

- a text that is not exactly one of ``u d l r`` (surrounding whitespace ignored) is an *invalid move*:
  ``valid=False``, the position is unchanged, the turn counts, reward ``-invalid_penalty``;
- a move into a wall, off the map, or into the door without the key is a *bump*: a valid move, no movement,
  reward ``-invalid_penalty / 2`` (half: the text was well formed, the move was wrong);
- any other move goes there; stepping on ``K`` picks the key up; the door can be entered holding the key.
  Reward ``progress_reward * (d_before - d_after)``, d the BFS distance to the goal from (cell, has_key) (so
  ``+progress_reward`` for a step along a shortest path, ``-progress_reward`` for a step away);
- reaching ``G`` ends the episode with outcome 1.0; after ``max_turns`` turns it ends with outcome 0.0
  (`GridTask.outcome` is 1.0 iff the agent stands on the goal).

Vocabulary (`VOCAB`): ``<pad> <s> </s> <unk>``, the five cell symbols, ``| @ , ;``, the digits and ``u d l r``;
`build_tokenizer` splits every character into a token and prepends BOS (left padding), like the lab task's.

Generation: rows and columns each uniform in ``[min_size, max_size]`` (so maps may be rectangular), each cell a
wall with probability `wall_fraction`, a start and a goal on distinct floor cells; with probability about
`key_door` a door is put on a cell that cuts the start off the goal and the key on a cell reachable from the start
without the door, so the key is needed (where no door fits after a few hundred draws, e.g. tiny or wall-free
maps, the problem has none). A maze is kept
only when the shortest path over (cell, has_key) states has 2 to ``max_turns - 3`` moves: solvable by
construction, with at least three turns of slack. Everything is a pure function of (split, seed) through
``random.Random(f"grid/{split}/{seed}")``. A problem is held out when a stable hash of its prompt falls in one
bucket of `heldout_buckets` (as the lab task), so the two splits never share a prompt. ``Problem.answer`` is the
expert's shortest action sequence (e.g. ``"rrd"``); ``Problem.meta`` holds the map, start, goal, distance and
``max_turns``.

Why these choices: small maps and a 2-valued key flag mean few states, so anchors ``(row, col, has_key)`` repeat
across the rollouts of one maze and within an episode (GiGPO's step groups); the exact BFS solver gives expert
actions (`GridTask.expert_action`, for warm-start traces and expert-state methods), dense process rewards
(distance progress) and the optimal value V* = -distance (`GridTask.distance`), a ground truth for critics and
step-value estimates. Observations are short, fixed-length and cheap, so a tiny Llama policy trains on CPU.

Warm start: `trace` is a noisy expert (a uniformly random action with probability `noise`, else the expert's;
a random action is the expert's one time in four). Its measured held-out success with the default options (500
held-out problems, seed 0, one episode each): 1.0 at noise 0, about 0.94 at 0.3, 0.74 at 0.5, 0.48 at 0.7
(``max_size=6``: 0.92, 0.71, 0.46). The shortest paths have 2-9 moves (median about 4) and 12 turns leave
slack, so even a fairly noisy expert succeeds; a policy fitted to the traces imitates them imperfectly, so
traces at noise 0.5-0.7 are the ones that should give a warm-started policy in the 30-60 % range.
"""

from __future__ import annotations

import functools
import random
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, replace

from canonrl.lab.tasks import register_task
from canonrl.lab.tasks._tokenizer import word_level_tokenizer
from canonrl.lab.tasks.base import Problem, Split, check_split, in_heldout_bucket
from canonrl.lab.tasks.environment import Episode, Transition

VOCAB: tuple[str, ...] = (
    "<pad>", "<s>", "</s>", "<unk>",
    "#", ".", "G", "K", "D",
    "|", "@", ",", ";",
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9",
    "u", "d", "l", "r",
)  # fmt: skip
ACTIONS: tuple[str, ...] = ("u", "d", "l", "r")  # the expert breaks ties in this order
MOVES: dict[str, tuple[int, int]] = {"u": (-1, 0), "d": (1, 0), "l": (0, -1), "r": (0, 1)}
MAX_SIZE = 6
_ATTEMPTS = 10_000  # maze draws per problem before giving up (never reached with valid options)
_DOOR_ATTEMPTS = 300  # draws with a key and door before a problem falls back to none (where doors cannot fit)


@dataclass(frozen=True)
class GridState:
    """One state of an episode: plain values, so any prefix of an episode replays from the start state."""

    grid: tuple[str, ...]  # the rows of the map (constant in an episode)
    pos: tuple[int, int]  # (row, col)
    has_key: bool = False
    turns: int = 0  # turns taken so far, invalid ones included
    done: bool = False



def _find(grid: tuple[str, ...], symbol: str) -> tuple[int, int] | None:
    for r, row in enumerate(grid):
        c = row.find(symbol)
        if c >= 0:
            return r, c
    return None


def _move(
    grid: tuple[str, ...], pos: tuple[int, int], has_key: bool, action: str
) -> tuple[tuple[int, int], bool] | None:
    """Where `action` leads from (pos, has_key): the new (pos, has_key), or None for a bump (wall, edge, locked door)."""
    dr, dc = MOVES[action]
    r, c = pos[0] + dr, pos[1] + dc
    if not (0 <= r < len(grid) and 0 <= c < len(grid[0])):
        return None
    cell = grid[r][c]
    if cell == "#" or (cell == "D" and not has_key):
        return None
    return (r, c), has_key or cell == "K"


@functools.lru_cache(maxsize=4096)
def distances(grid: tuple[str, ...]) -> dict[tuple[int, int, bool], int]:
    """BFS distance (moves) to the goal from every (row, col, has_key) state that can reach it; the goal's is 0.

    A backward BFS over the state graph (entering the goal ends the episode, so the goal has no successors).
    """
    goal = _find(grid, "G")
    states = [
        (r, c, k) for r in range(len(grid)) for c in range(len(grid[0])) if grid[r][c] != "#" for k in (False, True)
    ]
    predecessors: dict[tuple[int, int, bool], list[tuple[int, int, bool]]] = {s: [] for s in states}
    for r, c, k in states:
        if (r, c) == goal or (grid[r][c] == "D" and not k) or (grid[r][c] == "K" and not k):
            continue  # terminal, or a state that cannot occur
        for action in ACTIONS:
            moved = _move(grid, (r, c), k, action)
            if moved is not None:
                predecessors[(*moved[0], moved[1])].append((r, c, k))
    dist: dict[tuple[int, int, bool], int] = {}
    if goal is None:
        return dist
    queue = deque()
    for k in (False, True):
        dist[(*goal, k)] = 0
        queue.append((*goal, k))
    while queue:
        state = queue.popleft()
        for prev in predecessors[state]:
            if prev not in dist:
                dist[prev] = dist[state] + 1
                queue.append(prev)
    return dist


def _reachable(
    grid: tuple[str, ...], start: tuple[int, int], blocked: tuple[int, int] | None = None
) -> set[tuple[int, int]]:
    """Cells reachable from `start` through non-wall cells, never entering `blocked` (keys and doors ignored)."""
    seen = {start}
    queue = deque([start])
    while queue:
        r, c = queue.popleft()
        for dr, dc in MOVES.values():
            n = (r + dr, c + dc)
            if (
                0 <= n[0] < len(grid)
                and 0 <= n[1] < len(grid[0])
                and grid[n[0]][n[1]] != "#"
                and n != blocked
                and n not in seen
            ):
                seen.add(n)
                queue.append(n)
    return seen


def _path(grid: tuple[str, ...], start: tuple[int, int], goal: tuple[int, int]) -> list[tuple[int, int]] | None:
    """A shortest path of cells from `start` to `goal` through non-wall cells (keys and doors ignored), or None."""
    parent: dict[tuple[int, int], tuple[int, int] | None] = {start: None}
    queue = deque([start])
    while queue:
        cell = queue.popleft()
        if cell == goal:
            path = [cell]
            while parent[path[-1]] is not None:
                path.append(parent[path[-1]])
            return path[::-1]
        for dr, dc in MOVES.values():
            n = (cell[0] + dr, cell[1] + dc)
            if 0 <= n[0] < len(grid) and 0 <= n[1] < len(grid[0]) and grid[n[0]][n[1]] != "#" and n not in parent:
                parent[n] = cell
                queue.append(n)
    return None


def _observation(pos: tuple[int, int], has_key: bool) -> str:
    return f"{pos[0]},{pos[1]},{int(has_key)};"


def prompt_text(grid: tuple[str, ...], start: tuple[int, int]) -> str:
    """The first observation: the map, ``@``, then the start observation (key flag 0)."""
    return "|".join(grid) + "@" + _observation(start, False)


@register_task("grid")
class GridTask:
    """The lab gridworld (see the module docstring): an `~canonrl.lab.tasks.environment.Environment`."""

    name = "grid"
    policy = "lab-grid-tiny"  # the shipped policy `policy=auto` picks (its vocabulary is this task's)
    multi_turn = True
    cheap = True
    components = ("success",)
    players = 1
    max_action_tokens = 1

    def __init__(
        self,
        min_size: int = 4,
        max_size: int = 5,
        wall_fraction: float = 0.2,
        key_door: float = 0.3,
        max_turns: int = 12,
        heldout_buckets: int = 10,
        progress_reward: float = 0.1,
        invalid_penalty: float = 0.1,
    ):
        if not 3 <= min_size <= max_size <= MAX_SIZE:
            raise ValueError(f"sizes must satisfy 3 <= min_size <= max_size <= {MAX_SIZE}, got {min_size}, {max_size}")
        if not 0.0 <= wall_fraction <= 0.5:
            raise ValueError(f"wall_fraction must be in [0, 0.5], got {wall_fraction}")
        if not 0.0 <= key_door <= 1.0:
            raise ValueError(f"key_door must be a probability in [0, 1], got {key_door}")
        if not 5 <= max_turns <= 64:
            raise ValueError(
                f"max_turns must be in [5, 64] (shortest paths have 2 to max_turns - 3 moves), got {max_turns}"
            )
        if heldout_buckets < 2:
            raise ValueError(f"heldout_buckets must be >= 2, got {heldout_buckets}")
        if progress_reward < 0 or invalid_penalty < 0:
            raise ValueError(
                f"progress_reward and invalid_penalty must be >= 0, got {progress_reward}, {invalid_penalty}"
            )
        self.min_size = min_size
        self.max_size = max_size
        self.wall_fraction = wall_fraction
        self.key_door = key_door
        self.max_turns = max_turns
        self.heldout_buckets = heldout_buckets
        self.progress_reward = progress_reward
        self.invalid_penalty = invalid_penalty
        self.options = dict(min_size=min_size, max_size=max_size, wall_fraction=wall_fraction, key_door=key_door,
                            max_turns=max_turns, heldout_buckets=heldout_buckets, progress_reward=progress_reward,
                            invalid_penalty=invalid_penalty)  # fmt: skip

    def with_players(self, players: int):
        """The `players`-player version of this task (``players=2``: the race, `canonrl.lab.tasks.grid_race`)."""
        if players != 2:
            raise ValueError(f"lab-grid plays alone or as a two-player race; players={players}")
        from canonrl.lab.tasks.grid_race import GridRace

        return GridRace(**self.options)

    # ------------------------------------------------------------------------------------------------------------
    # problems
    # ------------------------------------------------------------------------------------------------------------

    def in_split(self, prompt: str, split: Split) -> bool:
        return in_heldout_bucket(prompt, self.heldout_buckets, split)

    def _draw(self, rng: random.Random, with_door: bool) -> tuple[tuple[str, ...], tuple[int, int]] | None:
        """One maze attempt: (rows, start) with the goal reachable (through a needed door when `with_door`), or
        None; the caller checks the split and the path length."""
        rows, cols = rng.randint(self.min_size, self.max_size), rng.randint(self.min_size, self.max_size)
        cells = [["#" if rng.random() < self.wall_fraction else "." for _ in range(cols)] for _ in range(rows)]
        floor = [(r, c) for r in range(rows) for c in range(cols) if cells[r][c] == "."]
        if len(floor) < 2:
            return None
        start, goal = rng.sample(floor, 2)
        cells[goal[0]][goal[1]] = "G"
        grid = tuple("".join(row) for row in cells)
        path = _path(grid, start, goal)
        if path is None:
            return None
        if with_door:
            # a door the start cannot get around: a cell of every path, so of this shortest one
            doors = [cell for cell in path[1:-1] if goal not in _reachable(grid, start, blocked=cell)]
            if not doors:
                return None
            door = rng.choice(doors)
            keys = sorted(_reachable(grid, start, blocked=door) - {start})
            if not keys:
                return None
            key = rng.choice(keys)
            cells[door[0]][door[1]] = "D"
            cells[key[0]][key[1]] = "K"
            grid = tuple("".join(row) for row in cells)
        return grid, start

    def problems(self, split: Split, count: int, seed: int) -> list[Problem]:
        check_split(split)
        rng = random.Random(f"grid/{split}/{seed}")
        out: list[Problem] = []
        while len(out) < count:
            # (a wall-free grid has no cell that cuts the start off the goal, so no door fits)
            with_door = rng.random() < self.key_door and self.wall_fraction > 0
            for attempt in range(_ATTEMPTS):
                drawn = self._draw(rng, with_door and attempt < _DOOR_ATTEMPTS)
                if drawn is None:
                    continue
                grid, start = drawn
                prompt = prompt_text(grid, start)
                if not self.in_split(prompt, split):
                    continue
                d = distances(grid).get((*start, False))
                if d is not None and 2 <= d <= self.max_turns - 3:
                    break
            else:
                raise RuntimeError(f"grid: no solvable maze in {_ATTEMPTS} attempts with these options")
            meta = {"grid": grid, "start": start, "goal": _find(grid, "G"), "distance": d, "max_turns": self.max_turns}
            problem = Problem(prompt, "", meta)
            out.append(Problem(prompt, "".join(self.solve(problem)), meta))
        return out

    def difficulty(self, problem: Problem) -> int:
        """The maze's difficulty level (the held-out evaluation's ``by_difficulty``): its shortest solution in
        moves, the key pickup included."""
        return problem.meta["distance"]

    # ------------------------------------------------------------------------------------------------------------
    # the environment
    # ------------------------------------------------------------------------------------------------------------

    def reset(self, problem: Problem) -> GridState:
        return GridState(tuple(problem.meta["grid"]), tuple(problem.meta["start"]))

    def distance(self, state: GridState) -> int:
        """BFS distance (moves) from the state to the goal, key pickup included; V* = -distance."""
        return distances(state.grid).get((*state.pos, state.has_key), 2 * len(state.grid) * len(state.grid[0]))

    def step(self, state: GridState, action: str) -> Transition:
        if state.done:
            return Transition(state, 0.0, True, True)
        turns = state.turns + 1
        out_of_turns = turns >= self.max_turns
        text = action.strip() if isinstance(action, str) else ""
        if text not in MOVES:
            return Transition(
                replace(state, turns=turns, done=out_of_turns), -self.invalid_penalty, out_of_turns, False
            )
        moved = _move(state.grid, state.pos, state.has_key, text)
        if moved is None:
            return Transition(
                replace(state, turns=turns, done=out_of_turns), -self.invalid_penalty / 2, out_of_turns, True
            )
        pos, has_key = moved
        at_goal = state.grid[pos[0]][pos[1]] == "G"
        new = GridState(state.grid, pos, has_key, turns, at_goal or out_of_turns)
        reward = self.progress_reward * (self.distance(state) - self.distance(new))
        return Transition(new, reward, new.done, True)

    def state_value(self, state: GridState) -> float:
        """V*: the optimal policy's outcome from `state`, 1.0 when the goal is reachable in the turns left."""
        if self.outcome(state):
            return 1.0
        return float(not state.done and self.distance(state) <= self.max_turns - state.turns)

    def step_label(self, state: GridState, next_state: GridState) -> float:
        """+1 when the turn brought the agent closer to the goal (a shortest-path move), -1 otherwise."""
        return 1.0 if self.distance(next_state) < self.distance(state) else -1.0

    def render(self, state: GridState) -> str:
        return _observation(state.pos, state.has_key)

    def prompt_at(self, problem: Problem, state: GridState) -> str:
        """The prompt of a step whose window starts at `state` (``context=window:K``): the map, ``@``, the state's
        observation — the prompt of an episode started there."""
        return "|".join(state.grid) + "@" + self.render(state)

    def anchor(self, state: GridState) -> Hashable:
        return (state.pos[0], state.pos[1], state.has_key)

    def expert_action(self, state: GridState) -> str:
        """The first of ``u d l r`` that lowers the BFS distance by one (``u`` at the goal)."""
        d = self.distance(state)
        table = distances(state.grid)
        for action in ACTIONS:
            moved = _move(state.grid, state.pos, state.has_key, action)
            if moved is not None and table.get((*moved[0], moved[1])) == d - 1:
                return action
        return ACTIONS[0]

    def action_ended(self, action: str) -> bool:
        return len(action) >= 1

    def outcome(self, state: GridState) -> float:
        return float(state.grid[state.pos[0]][state.pos[1]] == "G")

    def judge(self, first: Episode, second: Episode) -> float:
        """1.0 when `first` is the better episode, 0.0 when `second` is, 0.5 for a tie: the higher outcome wins,
        then the fewer turns (a shorter route to the goal, or a failure that wasted fewer), then the fewer invalid
        moves."""
        for mine, theirs in ((first.outcome, second.outcome), (-first.turns, -second.turns),
                             (-first.invalid, -second.invalid)):  # fmt: skip
            if mine != theirs:
                return 1.0 if mine > theirs else 0.0
        return 0.5

    # ------------------------------------------------------------------------------------------------------------
    # warm start
    # ------------------------------------------------------------------------------------------------------------

    def solve(self, problem: Problem) -> list[str]:
        """The expert's shortest action sequence from the start."""
        return self.trace(problem, random.Random(0), noise=0.0)

    def trace(self, problem: Problem, rng: random.Random, noise: float = 0.3) -> list[str]:
        """A noisy expert episode's actions: each turn a uniformly random action with probability `noise`, else
        the expert's; it stops at the goal or after ``max_turns`` turns."""
        state = self.reset(problem)
        actions: list[str] = []
        while not state.done:
            action = rng.choice(ACTIONS) if rng.random() < noise else self.expert_action(state)
            actions.append(action)
            state = self.step(state, action).state
        return actions

    def episode_text(self, problem: Problem, actions: list[str]) -> tuple[list[str], list[str]]:
        """(action texts, observations) of replaying `actions` from the start; it stops where the episode ends."""
        state = self.reset(problem)
        texts: list[str] = []
        observations: list[str] = []
        for action in actions:
            if state.done:
                break
            state = self.step(state, action).state
            texts.append(action)
            observations.append(self.render(state))
        return texts, observations


def _task_for(problem: Problem) -> GridTask:
    return GridTask(max_turns=problem.meta.get("max_turns", 12))


def trace(problem: Problem, rng: random.Random, noise: float = 0.3) -> list[str]:
    """`GridTask.trace` for a problem of any `GridTask` (the dynamics need only its ``meta``)."""
    return _task_for(problem).trace(problem, rng, noise)


def episode_text(problem: Problem, actions: list[str]) -> tuple[list[str], list[str]]:
    """`GridTask.episode_text` for a problem of any `GridTask`."""
    return _task_for(problem).episode_text(problem, actions)


def build_tokenizer():
    """The grid tokenizer: one token per character (every symbol of `VOCAB`); BOS prepended, left padding.

    Built in code (no download) as a `transformers.PreTrainedTokenizerFast`, saved with the policy.
    """
    return word_level_tokenizer(VOCAB, ".")
