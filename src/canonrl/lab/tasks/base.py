"""What a lab task is: problems from a seed on a split that never overlaps the other, and a verifier.

A task is any object with this interface; `canonrl.lab.tasks.get_task(name)` builds the registered ones (see
`canonrl.lab.tasks.register_task` to add one).

Multi-reward estimators (GDPO, ``multi_reward = True``) get K rewards per response instead of one: the verdict
components a task names in its optional ``reward_components`` attribute (see `reward_components`), stacked as
``rewards`` [B, K]. Every other estimator gets the score alone, as before.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

Split = Literal["train", "heldout"]
SPLITS: tuple[str, ...] = ("train", "heldout")


def check_split(split: str) -> None:
    """Raise ``ValueError`` unless `split` is one of `SPLITS`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def text_fraction(text: str) -> float:
    """A stable, uniform number in [0, 1) for a text (whitespace-insensitive): tasks that split problems by a hash
    of their question put it in the held-out split when this falls below their held-out fraction."""
    digest = hashlib.blake2b(" ".join(text.split()).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def in_heldout_bucket(prompt: str, buckets: int, split: str) -> bool:
    """Whether `prompt` belongs to `split` when the held-out split is one bucket of `buckets` by a stable hash of the
    prompt (the lab and lab-grid tasks' rule: the two splits never share a prompt)."""
    bucket = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "little") % buckets
    return (bucket == 0) == (split == "heldout")


@dataclass(frozen=True)
class Problem:
    """One prompt. `prompt` is the text the policy sees before the chat template (if any) is applied."""

    prompt: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Reward:
    """A verifier's verdict: `score` in [0, 1] plus named components (each in [0, 1]) where a task has several."""

    score: float
    components: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Task(Protocol):
    name: str
    #: reward components every verdict reports (empty when the score is the only one)
    components: tuple[str, ...]

    # Optional: ``reward_components: tuple[str, ...]``, the components (a subset of `components`, in order) that
    # a multi-reward estimator gets as rewards [B, K]; see `reward_components`.
    # Optional: ``value(problem) -> float``, the prompt's human value v >= 0 (RLEV's share of an exam's points),
    # which an estimator reading ``metric`` gets; see `prompt_values`.
    # Optional: ``difficulty(problem) -> int | str``, the problem's difficulty level (lab: its operand count): the
    # held-out evaluation then reports its metrics per level as well, under ``by_difficulty`` keyed by
    # ``str(level)`` (`canonrl.lab.evaluate.sample_metrics`). Levels sort as the values do (ints numerically).

    def problems(self, split: Split, count: int, seed: int) -> list[Problem]:
        """`count` problems of `split`, a pure function of (split, count, seed).

        A problem of the "train" split is never a problem of the "heldout" split, whatever the seeds.
        """
        ...

    def verify(self, response: str, problem: Problem) -> Reward:
        """Score one response. May raise or run long: callers bound it (see `canonrl.lab.verification`)."""
        ...


def reward_components(task: Task) -> tuple[str, ...]:
    """The verdict components a multi-reward estimator receives as ``rewards`` [B, K], in order.

    The task's ``reward_components`` when it declares them, else all its `components`; empty means the score
    alone (K = 1). Raises ``ValueError`` when a named component is not one the task's verdicts report.
    """
    declared = tuple(getattr(task, "components", ()) or ())
    names = getattr(task, "reward_components", None)
    names = declared if names is None else tuple(names)
    unknown = [name for name in names if name not in declared]
    if unknown:
        raise ValueError(
            f"task {getattr(task, 'name', task)!r}: reward_components {unknown} are not among its components {declared}"
        )
    return names


def prompt_values(task: Task, problems: list[Problem]) -> list[float]:
    """Each problem's value v (the task's optional ``value(problem)``): RLEV's per-prompt human value.

    Raises ``ValueError`` when the task defines no values, naming the task.
    """
    value = getattr(task, "value", None)
    if value is None:
        raise ValueError(f"task {getattr(task, 'name', task)!r} gives no per-prompt values (a `value(problem)` method)")
    return [float(value(problem)) for problem in problems]
