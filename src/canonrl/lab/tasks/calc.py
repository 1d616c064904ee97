"""lab-calc: the lab task's chains worked with a calculator tool, a multi-turn environment (`CalcTask`, ``"calc"``).

The problems are the lab task's (`canonrl.lab.tasks.lab.LabTask.problems`: the same prompts, answers and splits),
and the format is lab-tiny's own, so the shipped ``lab-tiny`` policy plays it without new tokens. The prompt (the
first observation) is the chain, e.g. ``7+5-3+8?``. Per turn the policy writes one action:

- an *operation* ``<int><+|-><int>=`` (e.g. ``7+5=``); the turn ends at ``=``. The calculator answers with the
  result and ``;`` (e.g. ``12;``), exactly what lab-tiny writes itself, so an episode's context reads like a lab
  response: ``7+5-3+8?`` ``7+5=`` ``12;`` ``12-3=`` ``9;`` ``9+8=`` ``17;`` ``ans=17``;
- ``wait;`` (rethinking; the turn ends at ``;``): the pass restarts from the first operand, the observation is
  empty (the policy writes the first operation next, as lab-tiny does after ``wait;``);
- the answer ``ans=<n>`` (ends at EOS, which lab-tiny writes after it, or at ``max_action_tokens``): the episode
  ends, with outcome 1.0 iff n is the chain's value.

Any other text (surrounding whitespace ignored) is an *invalid move*: ``valid=False``, reward
``-invalid_penalty``, the state's chain position unchanged, the observation ``;`` (it closes the broken text as a
step separator). `CalcTask.action_ended` is True when the text ends with ``;``, or ends with ``=`` and does not
start with ``ans``.

The calculator computes what it is asked (the policy's own left number, even a wrong one). With probability
`tool_noise` it drops the carry or borrow of an operation that crosses a ten (``+``: 10 less, ``-``: 10 more,
like the lab traces' slips; an operation within one ten is always exact, so the rate is per crossing operation).
The draw is a pure function of (prompt, turn index) — a stable hash — so any episode replays exactly.

State and rewards: `CalcState` holds the chain position ``step`` (chain operations done in the current pass: an
operation whose operator and right operand are the chain's next ones advances it, whatever its left number) and
the displayed running total ``total`` (the first operand at the start and after ``wait;``, else the last result
of a chain operation). The turn reward is ``match_reward`` (MatchTIR-style call matching) iff the action equals
`CalcTask.expert_action` exactly: the chain's next operation written from the running *true* total
(``<true total><op><operand>=``), or ``ans=<value>`` once the chain is done; 0 otherwise (``wait;``, an
off-chain operation, continuing from a slipped total). The episode ends at an answer, or after `max_turns` turns
with outcome 0. The anchor is ``(step, total)``: it repeats across a group's episodes of one chain.

Note: every pass of a rethought chain earns its match rewards again; `max_turns` bounds that.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Hashable
from dataclasses import dataclass, replace

from canonrl.lab.tasks import register_task
from canonrl.lab.tasks.base import Problem, Split
from canonrl.lab.tasks.environment import Transition
from canonrl.lab.tasks.lab import LabTask, chain_value

_OPERATION = re.compile(r"(\d{1,3})([+-])(\d{1,3})=")
_ANSWER = re.compile(r"ans=(\d{1,3})")
WAIT = "wait;"


@dataclass(frozen=True)
class CalcState:
    """One state of an episode: plain values, so any prefix of an episode replays from the start state."""

    prompt: str
    operands: tuple[int, ...]
    ops: tuple[str, ...]
    step: int = 0  # chain operations done in the current pass
    total: int = 0  # the displayed running total (the tool's last chain result, or the first operand)
    turns: int = 0  # turns taken so far, invalid ones included
    shown: str = ""  # the observation after the action that reached this state
    answer: int | None = None
    done: bool = False


def true_total(state: CalcState) -> int:
    """The chain's exact partial value after ``state.step`` operations."""
    return chain_value(list(state.operands[: state.step + 1]), list(state.ops[: state.step]))


def _unit(text: str) -> float:
    """A stable uniform draw in [0, 1) from `text`."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") / 2**64


@register_task("calc")
class CalcTask:
    """The lab chains with a calculator tool (see the module docstring): an
    `~canonrl.lab.tasks.environment.Environment`."""

    name = "calc"
    policy = "lab-tiny"  # the shipped policy `policy=auto` picks (its vocabulary is this task's)
    multi_turn = True
    cheap = True
    components = ("success",)
    players = 1
    max_action_tokens = 8  # the longest action, ``<2 digits><op><2 digits>=``, is 6 tokens; ``ans=<n></s>`` 5

    def __init__(
        self,
        tool_noise: float = 0.2,
        max_turns: int = 12,
        min_operands: int = 3,
        max_operands: int = 5,
        heldout_buckets: int = 10,
        match_reward: float = 0.1,
        invalid_penalty: float = 0.1,
    ):
        if not 0.0 <= tool_noise <= 1.0:
            raise ValueError(f"tool_noise must be a probability in [0, 1], got {tool_noise}")
        if not 2 <= max_turns <= 64:
            raise ValueError(f"max_turns must be in [2, 64], got {max_turns}")
        if match_reward < 0 or invalid_penalty < 0:
            raise ValueError(f"match_reward and invalid_penalty must be >= 0, got {match_reward}, {invalid_penalty}")
        self.lab = LabTask(min_operands, max_operands, heldout_buckets)  # validates the chain options
        self.tool_noise = tool_noise
        self.max_turns = max_turns
        self.match_reward = match_reward
        self.invalid_penalty = invalid_penalty

    # ------------------------------------------------------------------------------------------------------------
    # problems: the lab task's
    # ------------------------------------------------------------------------------------------------------------

    def problems(self, split: Split, count: int, seed: int) -> list[Problem]:
        return self.lab.problems(split, count, seed)

    def in_split(self, prompt: str, split: Split) -> bool:
        return self.lab.in_split(prompt, split)

    def difficulty(self, problem: Problem) -> int:
        """The problem's difficulty level (the held-out evaluation's ``by_difficulty``): its operand count."""
        return self.lab.difficulty(problem)

    # ------------------------------------------------------------------------------------------------------------
    # the environment
    # ------------------------------------------------------------------------------------------------------------

    def reset(self, problem: Problem) -> CalcState:
        operands = tuple(problem.meta["operands"])
        return CalcState(problem.prompt, operands, tuple(problem.meta["ops"]), total=operands[0])

    def calculate(self, prompt: str, turn: int, a: int, op: str, b: int) -> int:
        """The tool's result for ``a op b`` at turn `turn` (0-based) of the episode of `prompt`: exact, except that
        an operation crossing a ten drops its carry/borrow with probability `tool_noise` (a hash of prompt, turn)."""
        exact = a + b if op == "+" else a - b
        if exact // 10 != a // 10 and _unit(f"calc/{prompt}/{turn}") < self.tool_noise:
            return exact - 10 if op == "+" else exact + 10
        return exact

    def step(self, state: CalcState, action: str) -> Transition:
        if state.done:
            return Transition(state, 0.0, True, True)
        turns = state.turns + 1
        out_of_turns = turns >= self.max_turns
        text = action.strip() if isinstance(action, str) else ""
        reward = self.match_reward if text == self.expert_action(state) else 0.0
        answer = _ANSWER.fullmatch(text)
        if answer is not None:
            new = replace(state, turns=turns, shown="", answer=int(answer.group(1)), done=True)
            return Transition(new, reward, True, True)
        if text == WAIT:
            new = replace(state, step=0, total=state.operands[0], turns=turns, shown="", done=out_of_turns)
            return Transition(new, 0.0, out_of_turns, True)
        operation = _OPERATION.fullmatch(text)
        if operation is None:
            new = replace(state, turns=turns, shown=";", done=out_of_turns)
            return Transition(new, -self.invalid_penalty, out_of_turns, False)
        a, op, b = int(operation.group(1)), operation.group(2), int(operation.group(3))
        result = self.calculate(state.prompt, state.turns, a, op, b)
        step, total = state.step, state.total
        if step < len(state.ops) and (op, b) == (state.ops[step], state.operands[step + 1]):
            step, total = step + 1, result
        new = replace(state, step=step, total=total, turns=turns, shown=f"{result};", done=out_of_turns)
        return Transition(new, reward, out_of_turns, True)

    def render(self, state: CalcState) -> str:
        return state.shown

    def anchor(self, state: CalcState) -> Hashable:
        return (state.step, state.total)

    def expert_action(self, state: CalcState) -> str:
        """The chain's next operation from the true running total, or ``ans=<value>`` when the chain is done."""
        if state.step >= len(state.ops):
            return f"ans={chain_value(list(state.operands), list(state.ops))}"
        return f"{true_total(state)}{state.ops[state.step]}{state.operands[state.step + 1]}="

    def action_ended(self, action: str) -> bool:
        text = action.strip()
        return text.endswith(";") or (text.endswith("=") and not text.startswith("ans"))

    def answer_probe(self, problem: Problem) -> tuple[str, str]:
        """(prefix, ground-truth answer) whose probability after each turn IGPO's information gain reads."""
        return "ans=", problem.answer

    def outcome(self, state: CalcState) -> float:
        return float(state.answer is not None and state.answer == chain_value(list(state.operands), list(state.ops)))

    def solve(self, problem: Problem) -> list[str]:
        """The expert's actions from the start: the chain's true operations, then the answer."""
        state = self.reset(problem)
        actions: list[str] = []
        while not state.done:
            actions.append(self.expert_action(state))
            state = self.step(state, actions[-1]).state
        return actions
