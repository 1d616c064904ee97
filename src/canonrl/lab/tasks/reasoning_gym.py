"""``rg:<dataset>``: `ReasoningGymTask`, any reasoning-gym dataset answered between ``<answer>`` tags, and
`ReasoningGymProblems`, the problem drawing it shares with `canonrl.lab.tasks.boxed`.

reasoning-gym is imported lazily (it is an optional ``lab`` dependency, and importing it costs seconds).

**Splits.** A question belongs to the held-out split when a hash of its text (whitespace collapsed) falls below
`heldout_fraction` (`in_split`); every other question belongs to train. `problems(split, count, seed)` draws
items from reasoning-gym in chunks of `CHUNK` items, each chunk from its own seed derived from
``(dataset, split, seed, chunk number)`` — so train and held-out come from different seed streams — and keeps
only the items of the requested split. Whatever the seeds, no question text is ever in both splits: the hash
filter guarantees it, even for generators with few distinct questions, where both seed streams produce the
same questions. The result is a pure function of (split, count, seed) and `problems(s, n, seed)` is a prefix of
`problems(s, m, seed)` for n < m. Held-out draws cost about ``1 / heldout_fraction`` generated items per
problem, train draws ``1 / (1 - heldout_fraction)``; the questions within one split may repeat when a
generator has few distinct ones.

**Rewards.** `ReasoningGymTask` extracts the text of the last ``<answer>…</answer>`` and scores it with the
dataset's ``score_answer``. Many datasets give 0.01 for any wrong non-empty answer and some give partial credit,
so by default (``binary=True``) the reward is 1 only for a full score; the dataset's own score is the ``raw``
component. Verifiers may raise (reasoning-gym's ``prime_factorization`` does on junk): `canonrl.lab.verification`
turns that into reward 0.
"""

from __future__ import annotations

import hashlib
from typing import Any

from canonrl.lab.tasks import register_task
from canonrl.lab.tasks.answers import ANSWER_INSTRUCTION, extract_answer_tag
from canonrl.lab.tasks.base import Problem, Reward, Split, check_split, text_fraction

__all__ = ["CHUNK", "ReasoningGymTask", "ReasoningGymProblems", "reasoning_gym_datasets"]

#: items per reasoning-gym dataset instance when drawing problems (fixed: some generators' items depend on
#: the dataset size, so a fixed chunk keeps problems a pure function of (split, count, seed))
CHUNK = 128


def reasoning_gym_datasets() -> list[str]:
    """The names of reasoning-gym's registered datasets, sorted (imports reasoning-gym)."""
    import reasoning_gym  # noqa: F401 - registers the datasets
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def _chunk_seed(dataset: str, split: str, seed: int, chunk: int) -> int:
    digest = hashlib.blake2b(f"canonrl/{dataset}/{split}/{seed}/{chunk}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def _dataset_config(dataset: str, config: dict[str, Any] | None) -> dict[str, Any]:
    """Validate `dataset` and `config` against reasoning-gym's registry; returns the kwargs for create_dataset."""
    valid = reasoning_gym_datasets()
    if dataset not in valid:
        raise ValueError(f"dataset: unknown reasoning-gym dataset {dataset!r}; valid: {', '.join(valid)}")
    config = dict(config or {})
    if "size" in config or "seed" in config:
        raise ValueError("config: must not set 'size' or 'seed' (problems(split, count, seed) chooses them)")
    if dataset == "composite":
        if not config.get("datasets"):
            raise ValueError(
                "dataset: 'composite' needs a config naming its parts, e.g. "
                "config={'datasets': [{'name': 'chain_sum', 'weight': 1.0, 'config': {}}, ...]}"
            )
        from reasoning_gym.composite import DatasetSpec

        specs = config["datasets"]
        config["datasets"] = [spec if isinstance(spec, DatasetSpec) else DatasetSpec(**spec) for spec in specs]
    return config


class ReasoningGymProblems:
    """Shared by the reasoning-gym task families: problem drawing, the split rule, and a cached scorer instance."""

    dataset: str
    config: dict[str, Any]
    heldout_fraction: float
    instruction: str
    #: modules the verification fork server imports once, so replacement workers start fast
    worker_preload: tuple[str, ...] = (
        "canonrl.lab.tasks.reasoning_gym",
        "canonrl.lab.tasks.boxed",
        "reasoning_gym",
        "math_verify",
    )

    def _init_source(self, dataset: str, config: dict[str, Any] | None, heldout_fraction: float) -> None:
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
        self.dataset = dataset
        self.config = _dataset_config(dataset, config)
        self.heldout_fraction = heldout_fraction
        try:  # surface config errors now rather than at the first problems() call
            self._scorer_instance = self._create(size=1, seed=0)
        except (TypeError, AssertionError, ValueError) as error:
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(f"config: invalid for reasoning-gym dataset {dataset!r}: {message}") from None

    def _create(self, size: int, seed: int):
        import reasoning_gym

        return reasoning_gym.create_dataset(self.dataset, size=size, seed=seed, **self.config)

    def _scorer(self):
        # score_answer is an instance method that may read the dataset's config, so score with an instance
        # built from the same config (not pickled: rebuilt in each worker).
        if self._scorer_instance is None:
            self._scorer_instance = self._create(size=1, seed=0)
        return self._scorer_instance

    def warm_up(self) -> None:
        """Import and build what `verify` needs (called by verification workers right after loading the task)."""
        self._scorer()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_scorer_instance"] = None
        return state

    def in_split(self, question: str, split: Split) -> bool:
        """Whether `question` belongs to `split` (see the module docstring: a hash bucket)."""
        heldout = text_fraction(question) < self.heldout_fraction
        return heldout if split == "heldout" else not heldout

    def problems(self, split: Split, count: int, seed: int) -> list[Problem]:
        check_split(split)
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        share = self.heldout_fraction if split == "heldout" else 1.0 - self.heldout_fraction
        # Generous: a split's share of items is binomial; 20x its expectation (plus slack) never runs out
        # unless the generator's questions all land in the other split.
        max_chunks = int(20 * count / (share * CHUNK)) + 8
        out: list[Problem] = []
        chunk = 0
        while len(out) < count:
            if chunk >= max_chunks:
                raise ValueError(
                    f"count: found only {len(out)} of {count} {split} problems of {self.dataset!r} in "
                    f"{chunk * CHUNK} items (too few distinct questions for this split?)"
                )
            items = self._create(size=CHUNK, seed=_chunk_seed(self.dataset, split, seed, chunk))
            for index in range(CHUNK):
                entry = items[index]
                if self.in_split(entry["question"], split):
                    out.append(self._problem(entry, split))
                    if len(out) == count:
                        break
            chunk += 1
        return out

    def _problem(self, entry: dict[str, Any], split: str) -> Problem:
        answer = entry.get("answer")
        prompt = f"{entry['question'].rstrip()}\n\n{self.instruction}"
        meta = {"entry": entry, "dataset": self.dataset, "split": split}
        return Problem(prompt=prompt, answer="" if answer is None else str(answer), meta=meta)


@register_task("rg:<dataset>", hint="e.g. rg:chain_sum, rg:basic_arithmetic, rg:gsm_symbolic, rg:prime_factorization")
class ReasoningGymTask(ReasoningGymProblems):
    """Any reasoning-gym dataset; the answer goes between ``<answer>`` tags and is scored by the dataset.

    Args:
        dataset: a reasoning-gym dataset name (`reasoning_gym_datasets()`); ``composite`` needs `config`.
        config: keyword arguments of the dataset's config (not size/seed), e.g. ``{"min_terms": 2}``.
        heldout_fraction: share of the question space reserved for the held-out split.
        binary: reward 1 only for a full score (default), else the dataset's score itself.
        max_answer_chars: an extracted answer longer than this scores 0 without calling the dataset's scorer
            (several scorers parse with sympy; no gold answer is that long for the default configs).
        cheap: verify inline, without worker processes (`canonrl.lab.verification`): only for datasets whose
            scorer is a plain comparison and cannot hang.
        instruction: the answer-format line appended to every question.

    Components: ``correct`` (the reward), ``formatted`` (an ``<answer>`` tag was found), ``raw`` (the dataset's
    score, 0 when no answer was extracted). Multi-reward estimators (GDPO) get ``correct`` and ``formatted``.
    """

    components = ("correct", "formatted", "raw")
    #: rewards [B, 2] for multi-reward estimators: correct, and has an answer (an ``<answer>`` tag)
    reward_components = ("correct", "formatted")
    cheap = False

    def __init__(
        self,
        dataset: str,
        *,
        config: dict[str, Any] | None = None,
        heldout_fraction: float = 0.2,
        binary: bool = True,
        max_answer_chars: int = 4096,
        cheap: bool = False,
        instruction: str = ANSWER_INSTRUCTION,
    ) -> None:
        if max_answer_chars < 1:
            raise ValueError(f"max_answer_chars must be >= 1, got {max_answer_chars}")
        self._init_source(dataset, config, heldout_fraction)
        self.name = f"rg:{dataset}"
        self.binary = binary
        self.max_answer_chars = max_answer_chars
        self.cheap = cheap
        self.instruction = instruction

    def verify(self, response: str, problem: Problem) -> Reward:
        answer = extract_answer_tag(response)
        if answer is None:
            return Reward(0.0, {"correct": 0.0, "formatted": 0.0, "raw": 0.0})
        if len(answer) > self.max_answer_chars:
            return Reward(0.0, {"correct": 0.0, "formatted": 1.0, "raw": 0.0})
        raw = float(self._scorer().score_answer(answer, problem.meta["entry"]))  # may raise: verification counts it
        full = 1.0 if raw >= 1.0 - 1e-9 else 0.0
        score = full if self.binary else raw
        return Reward(score, {"correct": score, "formatted": 1.0, "raw": raw})

    def __repr__(self) -> str:
        return f"ReasoningGymTask({self.dataset!r}, heldout_fraction={self.heldout_fraction}, binary={self.binary})"
