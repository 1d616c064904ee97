"""One row per environment step (``context=window:K``): the row-per-step layout of verl-agent's GiGPO and HGPO.

Each turn, every live episode's action is sampled from a prompt of its own: the problem's prompt and every earlier
(action, observation) while they fit the window, else the environment's prompt for the state K turns back
(``prompt_at(problem, state)``) followed by the last K (action, observation) pairs. The action is the row's
response (mask 1); the observation it causes goes into the next row's prompt. The prompts hold the very token ids
the policy sampled and the environment's observation tokens, so with K at least the episode's length a step's
prompt is the full-context rollout's prefix token for token (`canonrl.lab.multi_turn`).

Rows come in (episode, turn) order, episodes in `repeat_interleave` order of their problems. `StepRows` records
each row's episode (``traj``) and turn (``step_index``) and the episodes' turns; a step estimator gets ``traj``,
``step_index`` and one ``step_rewards``/``anchor`` (and, with a solver, ``step_values``/``step_labels``) per row,
and ``rewards`` is each row's episode outcome (the reward verl-agent gives every step of an episode).

Each turn prefills its prompts afresh (the window moves), so a step costs a prefill of every live episode's prompt
per turn, and the update trains on one row per step (about ``turns`` times as many rows as ``context=full``).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch

from canonrl.lab.decoding import make_decoder
from canonrl.lab.multi_turn import Turns, _act, _Columns, _Episodes
from canonrl.lab.sampling import Rollouts, left_padded
from canonrl.lab.verification import VerifyResult

CONTEXT_PATTERN = re.compile(r"^(full|window:(\d+))$")


def parse_context(context: str) -> int | None:
    """The window K of ``window:K`` (None for ``full``); raises ValueError for anything else."""
    match = CONTEXT_PATTERN.match(context.strip()) if isinstance(context, str) else None
    if match is None:
        raise ValueError(f"context must be 'full' or 'window:K' with K >= 0 an integer, got {context!r}")
    return None if match.group(2) is None else int(match.group(2))


@dataclass
class StepRows:
    """The rows of a row-per-step rollout: row r is turn `step_index[r]` of episode `episode[r]`; `episodes` is the
    per-episode record (`Turns`, with no token columns)."""

    episode: torch.Tensor
    step_index: torch.Tensor
    episodes: Turns

    def step_fields(self) -> dict:
        """A step estimator's fields: ``traj``, ``step_index`` and one step per row."""
        rows = list(zip(self.episode.tolist(), self.step_index.tolist()))
        fields = {"traj": self.episode, "step_index": self.step_index,
                  "step_rewards": torch.tensor([self.episodes.step_rewards[e][t] for e, t in rows]),
                  "anchor": [[self.episodes.anchors[e][t]] for e, t in rows]}  # fmt: skip
        if self.episodes.step_values is not None:
            fields["step_values"] = torch.tensor([self.episodes.step_values[e][t] for e, t in rows])
            fields["step_labels"] = torch.tensor([self.episodes.step_labels[e][t] for e, t in rows])
        return fields

    def select(self, rows: torch.Tensor, width: int) -> StepRows:
        return StepRows(self.episode[rows.cpu()], self.step_index[rows.cpu()], self.episodes)


@dataclass
class _Step:
    """One sampled step: its episode and turn, its prompt ids and its action's tokens, log-probs and entropies."""

    episode: int
    turn: int
    prompt: list[int]
    tokens: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor


class _Windows:
    """Each episode's prompt ids as the window moves: the problem's prompt, then (action + observation) per turn."""

    def __init__(self, policy, env, problems: list, repeats: int, window: int):
        self.policy, self.env, self.window, self.repeats = policy, env, window, repeats
        self.problems = problems
        ids, mask = policy.encode_prompts([p.prompt for p in problems])
        self.first = [row[keep.bool()].tolist() for row, keep in zip(ids.cpu(), mask.cpu())]
        rows = len(problems) * repeats
        self.turns: list[list[list[int]]] = [[] for _ in range(rows)]  # per episode, per turn: action + observation
        self.starts: list[list] = [[] for _ in range(rows)]  # per episode, per turn: the state it started from

    def prompt(self, row: int, state) -> list[int]:
        """The prompt ids of `row`'s next turn, which starts from `state`."""
        self.starts[row].append(state)
        turn = len(self.turns[row])
        if turn <= self.window:
            return self.first[row // self.repeats] + [t for ids in self.turns[row] for t in ids]
        start = self.starts[row][turn - self.window]
        text = self.env.prompt_at(self.problems[row // self.repeats], start)
        head = self.policy.encode_prompts([text])[0][0].tolist()
        return head + [t for ids in self.turns[row][turn - self.window :] for t in ids]


@torch.no_grad()
def run_windowed_episodes(
    policy, env, problems: list, *, repeats: int, window: int, generator: torch.Generator | None,
    temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False, max_observation_tokens: int = 16,
) -> tuple[Rollouts, VerifyResult]:  # fmt: skip
    """`repeats` episodes per problem, one row per step (see the module docstring); the verdicts are per episode."""
    tokenizer, device = policy.tokenizer, policy.device
    episodes = _Episodes.start(env, problems, repeats)
    windows = _Windows(policy, env, problems, repeats, window)
    live = [True] * len(episodes.states)
    steps: list[_Step] = []
    env_seconds = 0.0
    for turn in range(env.max_turns):
        rows = [row for row, going in enumerate(live) if going]
        if not rows:
            break
        prompts = [windows.prompt(row, episodes.states[row]) for row in rows]
        ids, mask = left_padded(prompts, policy.pad_id, device)
        decoder = make_decoder(policy.model, ids, mask, env.max_action_tokens)
        columns = _Columns()
        acting = torch.ones(len(rows), dtype=torch.bool, device=device)
        texts, _ = _act(decoder, decoder.logits, acting, turn, columns, env, tokenizer, policy.eos_id, policy.pad_id,
                        temperature, top_p, greedy, generator)  # fmt: skip
        out = columns.stacked(len(rows), device)
        started = time.perf_counter()
        for i, row in enumerate(rows):
            taken = out["mask"][i] > 0
            steps.append(_Step(row, turn, prompts[i], out["tokens"][i][taken], out["logprobs"][i][taken],
                               out["entropy"][i][taken]))  # fmt: skip
            going = episodes.step(row, texts[i]) and turn < env.max_turns - 1
            observation: list[int] = []
            if going:
                observation = tokenizer(env.render(episodes.states[row]), add_special_tokens=False).input_ids
                if len(observation) > max_observation_tokens:
                    episodes.errors[row], going = True, False
            windows.turns[row].append(steps[-1].tokens.tolist() + list(observation))
            live[row] = going
        env_seconds += time.perf_counter() - started
    steps.sort(key=lambda s: (s.episode, s.turn))
    outcomes = episodes.outcomes()
    record = Turns(torch.zeros(len(live), 0, dtype=torch.long), episodes.step_rewards, episodes.anchors,
                   torch.tensor(episodes.invalid), torch.tensor(episodes.errors), env_seconds, episodes.step_values,
                   episodes.step_labels)  # fmt: skip
    rollouts = _stacked(steps, record, policy.pad_id, device)
    verdict = VerifyResult(outcomes, {name: list(outcomes) for name in env.components}, failures=sum(episodes.errors))
    return rollouts, verdict


def _stacked(steps: list[_Step], record: Turns, pad_id: int, device) -> Rollouts:
    """The steps as one `Rollouts` (prompts left-padded, actions right-padded)."""
    prompt_ids, prompt_mask = left_padded([s.prompt for s in steps], pad_id, device)
    width = max((s.tokens.numel() for s in steps), default=0)
    rows = len(steps)
    tokens = torch.full((rows, width), pad_id, dtype=torch.long, device=device)
    mask, logprobs, entropy = (torch.zeros(rows, width, device=device) for _ in range(3))
    for row, s in enumerate(steps):
        n = s.tokens.numel()
        tokens[row, :n], mask[row, :n], logprobs[row, :n], entropy[row, :n] = s.tokens, 1.0, s.logprobs, s.entropy
    episode = torch.tensor([s.episode for s in steps], dtype=torch.long)
    turn = torch.tensor([s.turn for s in steps], dtype=torch.long)
    finished = ~record.errors[episode].to(device)
    return Rollouts(prompt_ids, prompt_mask, tokens, mask, logprobs, entropy, finished, repeats=1,
                    turns=StepRows(episode, turn, record))  # fmt: skip
