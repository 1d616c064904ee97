"""``boxed[:<dataset>]``: `BoxedMathTask`, math problems from a reasoning-gym generator answered in ``\\boxed{}``
and checked with math-verify.

Problems and splits are those of `canonrl.lab.tasks.reasoning_gym` (a hash of the question decides its split).
The verifier parses only the content of the last ``\\boxed{…}`` with math-verify, against the gold answer wrapped
in ``$…$`` (a bare LaTeX gold string may not parse). reasoning-gym and math-verify are imported lazily (optional
``lab`` dependencies, slow to import).
"""

from __future__ import annotations

from typing import Any

from canonrl.lab.tasks import register_task
from canonrl.lab.tasks.answers import BOXED_INSTRUCTION, last_boxed, math_verify_equal, warm_up_math_verify
from canonrl.lab.tasks.base import Problem, Reward
from canonrl.lab.tasks.reasoning_gym import ReasoningGymProblems

__all__ = ["BoxedMathTask"]


@register_task("boxed[:<dataset>]", hint="default gsm_symbolic")
class BoxedMathTask(ReasoningGymProblems):
    """Math problems from a reasoning-gym generator, answered in ``\\boxed{}`` and checked with math-verify.

    Args:
        source: a reasoning-gym dataset with a single gold answer per item (default ``gsm_symbolic``, GSM8K-style
            word problems with numeric answers; other numeric generators such as ``basic_arithmetic`` work too).
        config, heldout_fraction, instruction: as for `~canonrl.lab.tasks.reasoning_gym.ReasoningGymTask`.
        max_boxed_chars: the last box's content is parsed only when at most this long; a longer one scores 0
            unparsed (cutting a formula would change it, and parsing 20k characters takes seconds).
        math_verify_timeout: seconds for each of math-verify's own parse and compare timeouts, used where they
            work (a process's main thread, e.g. a verification worker): a slow comparison such as
            ``9^{9^{9^{9}}}`` then scores 0 after ~1 s and the worker survives. Elsewhere they are off and
            `canonrl.lab.verification`'s per-sample deadline bounds the call.

    Components: ``correct`` (the reward), ``formatted`` (a closed ``\\boxed{}`` was found); multi-reward
    estimators (GDPO) get both.
    """

    components = ("correct", "formatted")
    #: rewards [B, 2] for multi-reward estimators: correct, and has an answer (a closed ``\\boxed{}``)
    reward_components = ("correct", "formatted")
    cheap = False

    def __init__(
        self,
        source: str = "gsm_symbolic",
        *,
        config: dict[str, Any] | None = None,
        heldout_fraction: float = 0.2,
        max_boxed_chars: int = 300,
        math_verify_timeout: int = 1,
        instruction: str = BOXED_INSTRUCTION,
    ) -> None:
        if max_boxed_chars < 1:
            raise ValueError(f"max_boxed_chars must be >= 1, got {max_boxed_chars}")
        if int(math_verify_timeout) != math_verify_timeout or math_verify_timeout < 1:
            raise ValueError(f"math_verify_timeout must be a whole number of seconds >= 1, got {math_verify_timeout}")
        self._init_source(source, config, heldout_fraction)
        self.name = f"boxed:{source}"
        self.max_boxed_chars = max_boxed_chars
        self.math_verify_timeout = int(math_verify_timeout)
        self.instruction = instruction

    def warm_up(self) -> None:
        """Import math-verify and run one comparison (its first call is ~0.1 s slower than later ones)."""
        warm_up_math_verify(self.math_verify_timeout)

    @property
    def source(self) -> str:
        return self.dataset

    def _problem(self, entry: dict[str, Any], split: str) -> Problem:
        if entry.get("answer") is None:
            raise ValueError(f"source: {self.dataset!r} has no single gold answer per item; use 'rg:{self.dataset}'")
        return super()._problem(entry, split)

    def verify(self, response: str, problem: Problem) -> Reward:
        content = last_boxed(response)
        if content is None:
            return Reward(0.0, {"correct": 0.0, "formatted": 0.0})
        if not content or len(content) > self.max_boxed_chars:
            return Reward(0.0, {"correct": 0.0, "formatted": 1.0})
        equal = math_verify_equal(problem.answer, content, self.math_verify_timeout)
        if equal is None:  # a task bug, not a wrong answer: raise so that verification counts a failure
            raise ValueError(f"answer: math-verify could not parse the gold answer {problem.answer!r}")
        correct = 1.0 if equal else 0.0
        return Reward(correct, {"correct": correct, "formatted": 1.0})

    def __repr__(self) -> str:
        return f"BoxedMathTask({self.dataset!r}, heldout_fraction={self.heldout_fraction})"
