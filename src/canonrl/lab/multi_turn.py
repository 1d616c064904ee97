"""The multi-turn rollout: episodes in an environment (`canonrl.lab.tasks.environment`), sampled with the KV cache.

All episodes of a step advance in lock step, one turn at a time, in one decoder (`canonrl.lab.decoding`):

    action:       sample up to ``max_action_tokens`` tokens per live episode (an episode whose action ended
                  waits: a hole, attended by nobody and taking no position)
    environment:  step each live episode with its action text; record the turn reward and the anchor of the
                  state the turn started from
    observation:  feed each live episode's observation tokens through the cache (no sampling, mask 0)

until every episode is done or ``max_turns`` turns have passed. One row per trajectory (``context=full``): the
response holds every action and observation, ``response_mask`` is 1 on actions only, ``response_attention`` on
both, and `Turns` records each action token's turn (``turn_ids``), the turn rewards and the anchors — the
row-per-trajectory layout of the step table. The training forward reads the same tokens at the same positions
(`canonrl.lab.forward`), so the sampling log-probs are the old log-probs as in the single-turn rollout.

An environment that raises, or whose observation is longer than ``max_observation_tokens`` tokens, ends that
episode with reward 0 and a counted error (``VerifyResult.failures``); the others go on.

Branching (`Branching`, for the tree estimators): the rollout starts ``roots`` episodes per problem and, at the start
of each turn in ``at``, copies every row ``width`` times — its KV cache, its columns and its environment state, so
the copies continue the very same episode prefix (replayed state, no re-prefill) and then diverge by sampling. The
copies of a row sit next to it, so a problem's rows stay contiguous (``group_size = roots * width ** len(at)``).
Each row records the row it branched from and the response column where it did (`Branches`), which
`canonrl.tree_from_branches` turns into the tree's ``node``/``parent`` and segments. A row whose episode had already
ended when a branch came is copied too (the shape stays fixed), but its copies are *ghosts*: identical to it, with
an empty response mask, so they add no leaf to the tree and nothing to the loss.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from canonrl.lab.decoding import make_decoder
from canonrl.lab.evaluate import sample_metrics
from canonrl.lab.sampling import Rollouts, draw_tokens
from canonrl.lab.seeds import seed_of
from canonrl.lab.tasks.environment import has_solver
from canonrl.lab.verification import VerifyResult


@dataclass
class Turns:
    """The turns of a batch of episodes (one row each)."""

    #: [N, T] long: the turn of each action token, -1 on observations and padding
    turn_ids: torch.Tensor
    #: per row, per turn: the environment's turn reward
    step_rewards: list[list[float]]
    #: per row, per turn: the anchor of the state the turn started from
    anchors: list[list]
    #: [N] long: invalid moves per episode
    invalid: torch.Tensor
    #: [N] bool: episodes ended by an environment error
    errors: torch.Tensor = field(default=None)
    #: seconds spent in the environment (steps, observations and their tokenization)
    env_seconds: float = 0.0
    #: per row, per turn, from the environment's solver (None without one): the value of the state each turn reached
    #: (``state_value``) and the turn's label (``step_label``)
    step_values: list[list[float]] | None = None
    step_labels: list[list[float]] | None = None
    #: how rows branched from each other (a branched rollout); None otherwise
    branches: Branches | None = None
    #: [N] long: the player of each row in a game of several players (``players=2``); None for one player
    agents: torch.Tensor | None = None

    def select(self, rows: torch.Tensor, width: int) -> Turns:
        picked = rows.tolist()

        def rows_of(lists):
            return None if lists is None else [lists[i] for i in picked]

        # the selected rows no longer hold their parents: the branches are a whole-batch record
        return Turns(self.turn_ids[rows, :width], rows_of(self.step_rewards), rows_of(self.anchors), self.invalid[rows],
                     self.errors[rows], self.env_seconds, rows_of(self.step_values), rows_of(self.step_labels),
                     agents=None if self.agents is None else self.agents[rows.cpu()])  # fmt: skip

    def step_fields(self) -> dict:
        """A step estimator's fields in the row-per-trajectory layout: ``turn_ids`` and per-row lists of turn rewards
        and anchors (and, with a solver, of values and labels)."""
        fields = {"turn_ids": self.turn_ids, "step_rewards": self.step_rewards, "anchor": self.anchors}
        if self.agents is not None:
            fields["agent"] = self.agents
        if self.step_values is not None:
            fields.update(step_values=self.step_values, step_labels=self.step_labels)
        return fields

    @property
    def episodes(self) -> Turns:
        """The per-episode record (this one: a row is an episode)."""
        return self

    @property
    def counts(self) -> torch.Tensor:
        """[N] turns per episode."""
        return torch.tensor([len(r) for r in self.step_rewards], dtype=torch.float32)


@dataclass(frozen=True)
class Branching:
    """Where a rollout branches: at the start of each turn in `at` (0-based, increasing, each >= 1) every row is
    copied `width` times."""

    at: tuple[int, ...]
    width: int

    def __post_init__(self):
        if self.width < 2:
            raise ValueError(f"branching width must be >= 2, got {self.width}")
        if not self.at or any(t < 1 for t in self.at) or list(self.at) != sorted(set(self.at)):
            raise ValueError(f"branching turns must be increasing turn numbers >= 1, got {list(self.at)}")

    @property
    def leaves_per_root(self) -> int:
        return self.width ** len(self.at)

    def roots(self, group_size: int) -> int:
        """Episodes started per problem for `group_size` rows per problem; raises unless it divides."""
        if group_size % self.leaves_per_root:
            raise ValueError(
                f"group_size ({group_size}) must be a multiple of width ** len(at) = {self.leaves_per_root} with "
                f"branching at turns {list(self.at)}, width {self.width}"
            )
        return group_size // self.leaves_per_root


@dataclass
class Branches:
    """A branched rollout's lineage, per row: `parent_row` [N] (-1 for a root episode), `branch_pos` [N] (the response
    column where the row left its parent), `ghost` [N] bool (a copy of an episode that had already ended)."""

    parent_row: torch.Tensor
    branch_pos: torch.Tensor
    ghost: torch.Tensor

    @classmethod
    def roots(cls, rows: int) -> Branches:
        return cls(torch.full((rows,), -1), torch.zeros(rows, dtype=torch.long), torch.zeros(rows, dtype=torch.bool))

    def branch(self, width: int, column: int, ended: torch.Tensor) -> Branches:
        """Every row copied `width` times at response column `column`; copy 0 continues the row (its parent maps to
        the parent's copy 0), copies 1.. branch from copy 0; copies of an `ended` row are ghosts."""
        rows = self.parent_row.shape[0]
        copy = torch.arange(width).repeat(rows)
        source = torch.arange(rows).repeat_interleave(width)
        parent = torch.where(self.parent_row[source] >= 0, self.parent_row[source] * width, -1)
        parent = torch.where(copy == 0, parent, source * width)
        position = torch.where(copy == 0, self.branch_pos[source], column)
        ghost = self.ghost[source] | ((copy > 0) & ended.cpu()[source])
        return Branches(parent, position, ghost)

    def tree(self, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tree inputs (`canonrl.tree_from_branches`) of the rows that are not ghosts; a ghost row has no step
        (``turn_ids`` -1, no ``node``)."""
        from canonrl.branches import tree_from_branches

        real = (~self.ghost).nonzero().squeeze(1)
        renumber = torch.full_like(self.parent_row, -1)
        renumber[real] = torch.arange(real.numel())
        parents = self.parent_row[real]
        parents = torch.where(parents >= 0, renumber[parents.clamp(min=0)], -1)
        tree = tree_from_branches(parents, self.branch_pos[real], mask[real.to(mask.device)])
        rows, device = mask.shape[0], mask.device
        out = {
            "turn_ids": torch.full(mask.shape, -1, dtype=torch.long, device=device),
            "node": torch.full((rows, tree["node"].shape[1]), -1, dtype=torch.long, device=device),
        }
        out["parent"] = out["node"].clone()
        for name, value in tree.items():
            out[name][real.to(device)] = value
        return out


def completions_of(tree: dict[str, torch.Tensor], group: torch.Tensor) -> dict[str, torch.Tensor]:
    """One step per row (Tree-OPO's completions) from a segment tree (`Branches.tree`): ``node`` [B] the prefix the
    row's last segment starts from, ``parent`` [B] that prefix's parent; the bare prompt of group g, where a row's
    first segment starts, is the node ``top + g`` (``top`` past every prefix id), whose parent is -1."""
    node, parent = tree["node"], tree["parent"]
    last = ((node >= 0).sum(1) - 1).clamp(min=0)
    prompt = group.to(node.device) + int(node.max().clamp(min=0)) + 1
    start = parent.gather(1, last[:, None]).squeeze(1)
    before = parent.gather(1, (last - 1).clamp(min=0)[:, None]).squeeze(1)
    row_node = torch.where(start >= 0, start, prompt)
    row_parent = torch.where(start < 0, -1, torch.where((last >= 1) & (before >= 0), before, prompt))
    return {"node": row_node, "parent": row_parent}


class _Columns:
    """The response columns as they are decoded: one [N] entry per column of each field, stacked at the end."""

    def __init__(self) -> None:
        self.tokens, self.mask, self.attention, self.logprobs, self.entropy, self.turn = [], [], [], [], [], []

    def add(self, tokens, mask, attention, logprobs, entropy, turn) -> None:
        for store, value in zip((self.tokens, self.mask, self.attention, self.logprobs, self.entropy, self.turn),
                                (tokens, mask, attention, logprobs, entropy, turn)):  # fmt: skip
            store.append(value)

    def branch(self, index: torch.Tensor) -> None:
        """Rows `index` of every column so far (a branching copies rows)."""
        for store in (self.tokens, self.mask, self.attention, self.logprobs, self.entropy, self.turn):
            store[:] = [column.index_select(0, index) for column in store]

    def stacked(self, rows: int, device) -> dict[str, torch.Tensor]:
        def stack(values, dtype):
            return torch.stack(values, dim=1) if values else torch.zeros(rows, 0, dtype=dtype, device=device)

        return {
            "tokens": stack(self.tokens, torch.long), "mask": stack(self.mask, torch.float32),
            "attention": stack(self.attention, torch.long), "logprobs": stack(self.logprobs, torch.float32),
            "entropy": stack(self.entropy, torch.float32), "turn": stack(self.turn, torch.long),
        }  # fmt: skip


@dataclass
class _Episodes:
    """The environment side of a batch of episodes: states, texts, turn records, errors."""

    env: object
    states: list
    step_rewards: list[list[float]]
    anchors: list[list]
    invalid: list[int]
    errors: list[bool]
    #: per row, per turn, where the environment has a solver (``state_value`` / ``step_label``): the value of the state the
    #: turn reached, and the turn's label (+1 a right step, -1 a wrong one); None otherwise
    step_values: list[list[float]] | None = None
    step_labels: list[list[float]] | None = None

    @classmethod
    def start(cls, env, problems: list, repeats: int) -> _Episodes:
        states = [env.reset(p) for p in problems for _ in range(repeats)]
        n = len(states)
        solver = has_solver(env)
        return cls(env, states, [[] for _ in range(n)], [[] for _ in range(n)], [0] * n, [False] * n,
                   [[] for _ in range(n)] if solver else None, [[] for _ in range(n)] if solver else None)

    def branch(self, index: list[int]) -> None:
        """Rows `index` of every record (a branching copies rows; states are plain values, shared safely)."""
        for name in ("states", "step_rewards", "anchors", "invalid", "errors", "step_values", "step_labels"):
            records = getattr(self, name)
            if records is not None:
                setattr(self, name, [list(records[i]) if isinstance(records[i], list) else records[i] for i in index])

    def step(self, row: int, action: str) -> bool:
        """Apply `row`'s action; True when its episode goes on."""
        env, state = self.env, self.states[row]
        self.anchors[row].append(env.anchor(state))
        try:
            transition = env.step(state, action)
        except Exception:  # noqa: BLE001 — any environment failure ends this episode only, counted
            self.step_rewards[row].append(0.0)
            if self.step_values is not None:
                self.step_values[row].append(0.0)
                self.step_labels[row].append(-1.0)
            self.errors[row] = True
            return False
        self.states[row] = transition.state
        self.step_rewards[row].append(float(transition.reward))
        self.invalid[row] += not transition.valid
        if self.step_values is not None:
            self.step_values[row].append(float(env.state_value(transition.state)))
            self.step_labels[row].append(float(env.step_label(state, transition.state)))
        return not transition.done

    def step_rows(self, rows: list[int], actions: list[str]) -> dict[int, bool]:
        """Apply the actions of `rows`; for each, whether its episode goes on."""
        return {row: self.step(row, actions[row]) for row in rows}

    def render(self, row: int) -> str:
        return self.env.render(self.states[row])

    def outcomes(self) -> list[float]:
        return [0.0 if error else float(self.env.outcome(state)) for state, error in zip(self.states, self.errors)]

    @property
    def agents(self) -> torch.Tensor | None:
        return None


class _Games(_Episodes):
    """Episodes of an environment of several players (``env.players > 1``): rows ``players * k ... players * k +
    players - 1`` are the players of game k, in order; they share one joint state, act in the same turns and end
    together (`step_joint`)."""

    def step_rows(self, rows: list[int], actions: list[str]) -> dict[int, bool]:
        players, going, live = self.env.players, {}, set(rows)
        for first in sorted({row - row % players for row in rows}):
            game = list(range(first, first + players))
            if not live.issuperset(game):  # a player's episode ended alone (an error): the game ends with it
                going.update({row: False for row in game if row in live})
                continue
            state = self.states[first]
            for player, row in enumerate(game):
                self.anchors[row].append(self.env.anchor(state, player))
            try:
                joint = self.env.step_joint(state, [actions[row] for row in game])
            except Exception:  # noqa: BLE001 — a failing game ends its players' episodes only, counted
                for row in game:
                    self.step_rewards[row].append(0.0)
                    self.errors[row], going[row] = True, False
                continue
            for player, row in enumerate(game):
                self.states[row] = joint.state
                self.step_rewards[row].append(float(joint.rewards[player]))
                self.invalid[row] += not joint.valid[player]
                going[row] = not joint.done
        return going

    def render(self, row: int) -> str:
        return self.env.render(self.states[row], row % self.env.players)

    def outcomes(self) -> list[float]:
        players = self.env.players
        return [0.0 if error else float(self.env.outcome(state, row % players))
                for row, (state, error) in enumerate(zip(self.states, self.errors))]  # fmt: skip

    @property
    def agents(self) -> torch.Tensor:
        return torch.arange(len(self.states)) % self.env.players


@torch.no_grad()
def run_episodes(
    policy, env, problems: list, *, repeats: int, generator: torch.Generator | None, temperature: float = 1.0,
    top_p: float = 1.0, greedy: bool = False, max_observation_tokens: int = 16, branching: Branching | None = None,
) -> tuple[Rollouts, VerifyResult]:  # fmt: skip
    """`repeats` episodes per problem (rows in `repeat_interleave` order), and their outcomes as verdicts; with
    `branching`, `repeats` leaves per problem from `branching.roots(repeats)` episodes (see the module docstring)."""
    model, tokenizer = policy.model, policy.tokenizer
    prompt_ids, prompt_mask = policy.encode_prompts([p.prompt for p in problems])
    started = repeats if branching is None else branching.roots(repeats)
    players = getattr(env, "players", 1)
    if players > 1 and (branching is not None or repeats % players):
        raise ValueError(f"a game of {players} players needs whole games per problem and no branching; got {repeats} "
                         f"rows per problem")  # fmt: skip
    episodes = (_Games if players > 1 else _Episodes).start(env, problems, started)
    rows, device = len(episodes.states), prompt_ids.device
    budget = env.max_turns * (env.max_action_tokens + max_observation_tokens)
    decoder = make_decoder(model, prompt_ids, prompt_mask, budget, started)
    if branching is not None and not getattr(decoder, "can_drop_rows", False):
        raise ValueError("a branched rollout copies rows of the KV cache, which needs a Llama-architecture policy")
    branches = None if branching is None else Branches.roots(rows)
    logits = decoder.logits  # per row: the distribution after the last token it read
    columns = _Columns()
    live = torch.ones(rows, dtype=torch.bool, device=device)
    zeros = torch.zeros(rows, device=device)
    env_seconds = 0.0
    for turn in range(env.max_turns):
        if branching is not None and turn in branching.at:
            branches = branches.branch(branching.width, len(columns.tokens), ~live)
            index = torch.arange(rows, device=device).repeat_interleave(branching.width)
            decoder.keep(index)
            columns.branch(index)
            episodes.branch(index.tolist())
            live, logits = live.index_select(0, index), logits.index_select(0, index)
            rows = index.numel()
            zeros = torch.zeros(rows, device=device)
        if not live.any():
            if branching is None or turn >= branching.at[-1]:
                break
            continue  # a branch still to come copies the ended rows (as ghosts), so the batch keeps its shape
        actions, logits = _act(decoder, logits, live, turn, columns, env, tokenizer, policy.eos_id, policy.pad_id,
                               temperature, top_p, greedy, generator)  # fmt: skip
        observations = {}
        env_started = time.perf_counter()
        live_rows = live.nonzero().squeeze(1).tolist()
        going = episodes.step_rows(live_rows, actions)
        for row in live_rows:
            going_on = going[row] and turn < env.max_turns - 1
            if going_on:
                ids = tokenizer(episodes.render(row), add_special_tokens=False).input_ids
                if len(ids) > max_observation_tokens:
                    episodes.errors[row], going_on = True, False
                else:
                    observations[row] = ids
            live[row] = going_on
        env_seconds += time.perf_counter() - env_started
        tokens, reads = _padded(observations, rows, policy.pad_id, device)
        for token, has in zip(tokens.unbind(1), reads.unbind(1)):
            columns.add(token, zeros, has.long(), zeros, zeros, torch.full_like(token, -1))
            decoder.step(token, has)
            logits = torch.where(has[:, None], decoder.logits, logits)
    out = columns.stacked(rows, device)
    used = int(out["attention"].flip(1).cumsum(1).gt(0).sum(1).max().item()) if rows and out["tokens"].numel() else 0
    outcomes = episodes.outcomes()
    if branches is not None:  # a ghost trains nothing
        out["mask"] = torch.where(branches.ghost.to(device)[:, None], 0.0, out["mask"])
    turns = Turns(out["turn"][:, :used], episodes.step_rewards, episodes.anchors,
                  torch.tensor(episodes.invalid), torch.tensor(episodes.errors), env_seconds, episodes.step_values,
                  episodes.step_labels, branches, episodes.agents)  # fmt: skip
    rollouts = Rollouts(
        prompt_ids.repeat_interleave(repeats, dim=0), prompt_mask.repeat_interleave(repeats, dim=0),
        out["tokens"][:, :used], out["mask"][:, :used], out["logprobs"][:, :used], out["entropy"][:, :used],
        finished=~torch.tensor(episodes.errors, device=device), repeats=repeats,
        response_attention=out["attention"][:, :used], turns=turns,
    )  # fmt: skip
    verdict = VerifyResult(outcomes, {name: list(outcomes) for name in env.components}, failures=sum(episodes.errors))
    return rollouts, verdict


def _padded(observations: dict[int, list[int]], rows: int, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """([rows, W] observation tokens, [rows, W] bool: which are real) of the rows that read one, right-padded."""
    width = max((len(ids) for ids in observations.values()), default=0)
    tokens = torch.full((rows, width), pad_id, dtype=torch.long)
    for row, ids in observations.items():
        tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    lengths = torch.zeros(rows, dtype=torch.long)
    lengths[list(observations)] = torch.tensor([len(ids) for ids in observations.values()], dtype=torch.long)
    return tokens.to(device), (torch.arange(width) < lengths[:, None]).to(device)


def _act(decoder, logits, live, turn, columns, env, tokenizer, eos_id, pad_id, temperature, top_p, greedy, generator):
    """One turn's action phase: sample until every live episode's action ended; returns (texts, logits)."""
    rows = live.shape[0]
    acting = live.clone()
    written: list[list[int]] = [[] for _ in range(rows)]
    texts = [""] * rows
    for _ in range(env.max_action_tokens):
        if not acting.any():
            break
        token, log_dist, dist = draw_tokens(logits, temperature, top_p, greedy, generator)
        token = torch.where(acting, token, torch.full_like(token, pad_id))
        picked = torch.where(acting, log_dist.gather(1, token.unsqueeze(1)).squeeze(1), 0.0)
        entropy = torch.where(acting, -(dist * log_dist).nansum(dim=-1), 0.0)
        columns.add(token, acting.float(), acting.long(), picked, entropy, torch.where(acting, turn, -1))
        decoder.step(token, acting)
        logits = torch.where(acting[:, None], decoder.logits, logits)
        for row in acting.nonzero().squeeze(1).tolist():
            written[row].append(int(token[row]))
            texts[row] = tokenizer.decode(written[row], skip_special_tokens=True)
            if written[row][-1] == eos_id or env.action_ended(texts[row]):
                acting[row] = False
    return texts, logits


@dataclass
class MultiTurnRollout:
    """The trainer's rollout for an environment: `group_size` episodes per problem from a generator seeded by
    (seed, "rollout", step)."""

    env: object
    group_size: int
    temperature: float
    top_p: float
    seed: int
    max_observation_tokens: int = 16
    branching: Branching | None = None
    #: K of ``context=window:K`` (one row per step, `canonrl.lab.windowed`); None: ``context=full``
    window: int | None = None

    @classmethod
    def from_config(cls, config, env) -> MultiTurnRollout:
        branching = config.build_branching()
        if branching is not None and branching.at[-1] >= env.max_turns:
            raise ValueError(f"branching.at: turn {branching.at[-1]} is past the episodes' last turn ({env.max_turns - 1})")
        window = config.context_window()
        if window is not None and window < env.max_turns and not callable(getattr(env, "prompt_at", None)):
            raise ValueError(f"context=window:{window} cuts episodes of up to {env.max_turns} turns, which needs the "
                             f"environment's prompt_at(problem, state); {type(env).__name__} has none")
        return cls(env, config.group_size, config.temperature, config.top_p, config.seed, branching=branching,
                   window=window)  # fmt: skip

    def __call__(self, policy, problems: list, step: int) -> tuple[Rollouts, VerifyResult]:
        generator = torch.Generator(device=policy.device).manual_seed(seed_of(self.seed, "rollout", step))
        policy.model.eval()
        try:
            if self.window is not None:
                from canonrl.lab.windowed import run_windowed_episodes

                return run_windowed_episodes(policy, self.env, problems, repeats=self.group_size, window=self.window,
                                             generator=generator, temperature=self.temperature, top_p=self.top_p,
                                             max_observation_tokens=self.max_observation_tokens)  # fmt: skip
            return run_episodes(policy, self.env, problems, repeats=self.group_size, generator=generator,
                                temperature=self.temperature, top_p=self.top_p,
                                max_observation_tokens=self.max_observation_tokens, branching=self.branching)  # fmt: skip
        finally:
            policy.model.train()


@torch.no_grad()
def evaluate_environment(
    policy, env, *, problems: int = 256, seed: int = 0, samples: int = 4, temperature: float = 1.0,
    top_p: float = 1.0, greedy: bool = True, chunk: int = 256, sample_seed: int | None = None, window: int | None = None,
) -> dict:  # fmt: skip
    """Held-out success of `policy` in `env`: the mean outcome of `samples` sampled episodes per problem (the
    "accuracy" RL optimises), greedy success (``greedy_pass1``), turns, invalid moves and errors per episode. With
    `window`, the episodes run as the ``context=window:K`` rollout does (`canonrl.lab.windowed`)."""
    was_training = policy.model.training
    policy.model.eval()
    heldout = env.problems("heldout", problems, seed=seed)
    generator = torch.Generator(device=policy.device).manual_seed(seed if sample_seed is None else sample_seed)
    context = {} if window is None else {"window": window}
    sampled = _episodes_in_chunks(policy, env, heldout, chunk, samples, generator=generator, temperature=temperature,
                                  top_p=top_p, **context)  # fmt: skip
    result = {"k": samples, **sampled}
    if greedy:
        greedy_run = _episodes_in_chunks(policy, env, heldout, chunk, 1, generator=None, greedy=True, **context)
        result["greedy_pass1"] = greedy_run["accuracy"]
    policy.model.train(was_training)
    return result


def _episodes_in_chunks(policy, env, problems: list, chunk: int, repeats: int, **sampling) -> dict:
    scores, turns, invalid, actions, entropy_sum, errors = [], [], [], [], 0.0, 0
    per_call = max(1, chunk // repeats)
    runner = run_episodes
    if "window" in sampling:
        from canonrl.lab.windowed import run_windowed_episodes as runner
    for start in range(0, len(problems), per_call):
        rollouts, verdict = runner(policy, env, problems[start : start + per_call], repeats=repeats, **sampling)
        record = rollouts.turns.episodes
        scores += verdict.scores
        turns += record.counts.tolist()
        invalid += record.invalid.tolist()
        actions += episode_action_tokens(rollouts).tolist()
        entropy_sum += float((rollouts.entropy * rollouts.response_mask).sum())
        errors += verdict.failures
    correct = sum(s >= 1.0 for s in scores)
    return {
        **sample_metrics(env, problems, scores, actions, repeats),  # pass@k, lengths by correctness, by_difficulty
        "accuracy": sum(scores) / len(scores),
        "turns": sum(turns) / len(turns),
        "invalid_moves": sum(invalid) / len(invalid),
        "env_errors": errors,
        "response_length": sum(actions) / len(actions),
        "entropy": entropy_sum / max(sum(actions), 1),
        "tokens_per_correct": sum(actions) / correct if correct else math.inf,
    }


def episode_action_tokens(rollouts: Rollouts) -> torch.Tensor:
    """[N] action tokens per episode, whatever the layout (one row per episode, or one per step)."""
    episode = getattr(rollouts.turns, "episode", None)
    if episode is None:
        return rollouts.lengths
    lengths = rollouts.lengths.cpu()
    return torch.zeros(rollouts.turns.episodes.invalid.shape[0]).index_add_(0, episode, lengths)


def turn_metrics(turns: Turns, group: torch.Tensor) -> dict:
    """A step's episodes: turns, invalid moves and errors per episode, the mean turn reward, and the anchor groups a
    step estimator sees (as verl-agent logs them): mean size of the (prompt, anchor) groups and their singleton share;
    for a branched rollout, the share of ghost rows (copies of ended episodes: the branching's waste)."""
    keys = [(int(g), anchor) for g, anchors in zip(group.tolist(), turns.anchors) for anchor in anchors]
    sizes: dict = {}
    for key in keys:
        sizes[key] = sizes.get(key, 0) + 1
    rewards = [r for row in turns.step_rewards for r in row]
    branched = {} if turns.branches is None else {"ghost_rows": float(turns.branches.ghost.float().mean())}
    return {
        **branched,
        "turns": float(turns.counts.mean()),
        "invalid_moves": float(turns.invalid.float().mean()),
        "env_errors": int(turns.errors.sum()),
        "turn_reward": sum(rewards) / max(len(rewards), 1),
        "env_seconds": turns.env_seconds,
        "anchor_group_size": len(keys) / max(len(sizes), 1),
        "anchor_singletons": sum(size == 1 for size in sizes.values()) / max(len(sizes), 1),
    }
