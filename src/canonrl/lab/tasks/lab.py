"""The lab task: chained one-digit additions and subtractions, worked step by step, with optional rethinking.

A prompt is a chain such as ``7+5-3+8?``; a response works it left to right, one step per ``;``::

    7+5=12;12-3=9;9+8=17;ans=17

and may, before answering, say ``wait;`` and work the whole chain again ("rethinking"); the last pass decides::

    7+5=12;12-3=8;8+8=16;wait;7+5=12;12-3=9;9+8=17;ans=17

The verifier is exact and fast: the response must end with ``ans=<integer>``, and the reward is 1 when the
integer is the chain's value. Components: ``correct`` (the reward) and ``formatted`` (an ``ans=`` ending: the
response is well formed, it ends with a parsable final answer); both are the reward components a multi-reward
estimator (GDPO) gets. Each prompt has a value (`LabTask.value`: harder chains are worth more points), the
per-prompt ``metric`` RLEV weights rewards by.

Why this task: the warm-start traces (`trace`) make deliberate, human-like slips — dropping a carry or borrow
when a step crosses a ten (often), off-by-one (rarely) — and rethink more often after a slip than after a clean
pass, with fewer slips the second time. A policy trained on them samples at temperature 1 with a per-step error
rate that RL can drive down, with rewards mixed within groups; responses vary in length (2–4 steps, rethinking
doubles them) and the uncertain digits raise entropy, so both metrics CANON regroups by carry signal.

Problems: 3–5 operands from 1–9, running totals kept in 0..49. A problem belongs to the held-out split when a
hash of its prompt falls in one bucket out of `heldout_buckets`, so the two splits can never share a prompt.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from canonrl.lab.tasks import register_task
from canonrl.lab.tasks._tokenizer import word_level_tokenizer
from canonrl.lab.tasks.base import Problem, Reward, Split, in_heldout_bucket

VOCAB: tuple[str, ...] = (
    "<pad>", "<s>", "</s>", "<unk>",
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9",
    "+", "-", "=", ";", "?", "wait", "ans",
)  # fmt: skip
MAX_TOTAL = 49
_ANSWER = re.compile(r"ans=(\d+)$")


@dataclass(frozen=True)
class TraceStyle:
    """How the warm-start traces slip and rethink (the policy learns these rates; RL is meant to improve them)."""

    slip_crossing: float = 0.5  # P(drop the carry/borrow) on a step that crosses a ten
    slip_plain: float = 0.15  # P(off by one) on any other step
    rethink_after_slip: float = 0.5  # P(rethink) when the first pass slipped
    rethink_clean: float = 0.2  # P(rethink) when it did not
    second_pass_slip_factor: float = 0.5  # slip rates are multiplied by this in the second pass


def chain_value(operands: list[int], ops: list[str]) -> int:
    total = operands[0]
    for op, x in zip(ops, operands[1:]):
        total = total + x if op == "+" else total - x
    return total


def _prompt(operands: list[int], ops: list[str]) -> str:
    return str(operands[0]) + "".join(op + str(x) for op, x in zip(ops, operands[1:])) + "?"



@register_task("lab")
class LabTask:
    """The lab task (see the module docstring). Verification is a regex and an integer compare."""

    name = "lab"
    components = ("correct", "formatted")
    #: rewards [B, 2] for multi-reward estimators: correct, and well formed (ends with ``ans=<integer>``)
    reward_components = ("correct", "formatted")
    cheap = True

    def __init__(self, min_operands: int = 3, max_operands: int = 5, heldout_buckets: int = 10):
        if not 2 <= min_operands <= max_operands <= 8:
            raise ValueError(f"operands must satisfy 2 <= min_operands <= max_operands <= 8, got {min_operands}, {max_operands}")
        if heldout_buckets < 2:
            raise ValueError(f"heldout_buckets must be >= 2, got {heldout_buckets}")
        self.min_operands = min_operands
        self.max_operands = max_operands
        self.heldout_buckets = heldout_buckets

    def _random_chain(self, rng: random.Random) -> tuple[list[int], list[str]]:
        operands = [rng.randint(1, 9)]
        ops: list[str] = []
        total = operands[0]
        for _ in range(rng.randint(self.min_operands, self.max_operands) - 1):
            x = rng.randint(1, 9)
            choices = [op for op, t in (("+", total + x), ("-", total - x)) if 0 <= t <= MAX_TOTAL]
            op = rng.choice(choices)
            total = total + x if op == "+" else total - x
            operands.append(x)
            ops.append(op)
        return operands, ops

    def in_split(self, prompt: str, split: Split) -> bool:
        return in_heldout_bucket(prompt, self.heldout_buckets, split)

    def problems(self, split: Split, count: int, seed: int) -> list[Problem]:
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        rng = random.Random(f"lab/{split}/{seed}")
        out: list[Problem] = []
        while len(out) < count:
            operands, ops = self._random_chain(rng)
            prompt = _prompt(operands, ops)
            if self.in_split(prompt, split):
                out.append(Problem(prompt, str(chain_value(operands, ops)), {"operands": operands, "ops": ops}))
        return out

    def value(self, problem: Problem) -> float:
        """The prompt's value for RLEV: its points (one per operation) over an exam of ten problems at the most
        operations, ops / (10 (max_operands - 1)); 0.05-0.1 with the defaults, so alpha = 10 gives bonuses
        0.5-1."""
        return len(problem.meta["ops"]) / (10 * (self.max_operands - 1))

    def difficulty(self, problem: Problem) -> int:
        """The problem's difficulty level for the held-out evaluation's ``by_difficulty``: its operand count."""
        return len(problem.meta["operands"])

    def verify(self, response: str, problem: Problem) -> Reward:
        match = _ANSWER.search(response.strip())
        if match is None:
            return Reward(0.0, {"correct": 0.0, "formatted": 0.0})
        correct = float(match.group(1) == problem.answer)
        return Reward(correct, {"correct": correct, "formatted": 1.0})


def _work_pass(operands: list[int], ops: list[str], rng: random.Random, style: TraceStyle, factor: float) -> tuple[str, int, bool]:
    """One left-to-right pass; returns (text, value it reaches, whether it slipped)."""
    steps = []
    total = operands[0]
    slipped = False
    for op, x in zip(ops, operands[1:]):
        exact = total + x if op == "+" else total - x
        crosses = exact // 10 != total // 10
        result = exact
        if crosses and rng.random() < style.slip_crossing * factor:
            result = exact - 10 if op == "+" else exact + 10  # carry/borrow dropped
        elif not crosses and rng.random() < style.slip_plain * factor:
            result = exact + rng.choice((-1, 1))
        result = min(max(result, 0), 99)
        slipped |= result != exact
        steps.append(f"{total}{op}{x}={result};")
        total = result
    return "".join(steps), total, slipped


def trace(problem: Problem, rng: random.Random, style: TraceStyle = TraceStyle()) -> str:
    """A warm-start response for `problem`: worked steps, maybe a slip, maybe a rethink, then ``ans=<n>``."""
    operands, ops = problem.meta["operands"], problem.meta["ops"]
    text, value, slipped = _work_pass(operands, ops, rng, style, 1.0)
    if rng.random() < (style.rethink_after_slip if slipped else style.rethink_clean):
        again, value, _ = _work_pass(operands, ops, rng, style, style.second_pass_slip_factor)
        text += "wait;" + again
    return f"{text}ans={value}"


def build_tokenizer():
    """The lab tokenizer: one token per character, except the words ``wait`` and ``ans``; BOS prepended.

    Built in code (no download) as a `transformers.PreTrainedTokenizerFast`, saved with the policy.
    """
    return word_level_tokenizer(VOCAB, r"wait|ans|.")
