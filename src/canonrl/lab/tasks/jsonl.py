"""``jsonl:<path>``: `JsonlTask`, your own dataset, one JSON object per line with a prompt and its gold answer.

    {"prompt": "What is 6 times 7?", "answer": "42"}
    {"prompt": "Simplify 2/4.", "answer": "\\\\frac{1}{2}", "split": "heldout"}

    canonrl train task=jsonl:data/problems.jsonl task_options.verifier=exact

**Fields.** `prompt_field` (default ``prompt``, a non-empty string) and `answer_field` (default ``answer``, a
string or a number) name the fields read; other fields are ignored. Blank lines are skipped. Every problem in
the file is checked when the task is built: an unreadable line, a line that is not a JSON object, or a missing or
mistyped field raises a one-line ``ValueError`` naming the file and line number.

**Splits.** A line with a `split_field` (default ``split``) of ``"train"`` or ``"heldout"`` (``"test"`` is read
as held-out) goes to that split; any other line goes to held-out when a stable hash of its prompt (whitespace
collapsed) falls below `heldout_fraction`, else to train. The same prompt on two lines must land in the same
split (a conflict is an error), so the splits never share a prompt. ``problems(split, count, seed)`` is a
seeded shuffle of the split's lines, reshuffled (with a seed of its own) each time it runs out, so it is a pure
function of (split, count, seed), ``problems(s, n, seed)`` is a prefix of ``problems(s, m, seed)`` for n < m,
and a split smaller than `count` repeats.

**Rewards.** The answer is extracted from the response by `answer_format`: ``"boxed"`` (default: the content of
the last ``\\boxed{…}``), ``"answer_tag"`` (the last ``<answer>…</answer>``) or ``"text"`` (the whole response,
stripped); the matching instruction is appended to every prompt unless `instruction` says otherwise (``""``:
none). An extracted answer equal to the gold one, whitespace normalised, scores 1. With ``verifier="math-verify"``
(the default ``"auto"`` picks it when math-verify is installed) an answer that does not match exactly is
compared with math-verify (``\\frac{1}{2}`` equals ``0.5``), under the same time bounds as the boxed task: its
own per-step timeouts where they work, and `canonrl.lab.verification`'s per-sample deadline in worker processes.
``verifier="exact"`` uses the exact comparison alone; it is linear in the response and cannot hang, so that task
is verified inline (``cheap = True``). Components: ``correct`` (the reward) and ``formatted`` (an answer was
extracted); multi-reward estimators (GDPO) get both.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from typing import Any

from canonrl.lab.tasks import register_task
from canonrl.lab.tasks.answers import (
    ANSWER_INSTRUCTION,
    BOXED_INSTRUCTION,
    extract_answer_tag,
    last_boxed,
    math_verify_equal,
    normalize,
    warm_up_math_verify,
)
from canonrl.lab.tasks.base import Problem, Reward, Split, check_split, text_fraction

__all__ = ["JsonlTask", "VERIFIERS", "ANSWER_FORMATS"]

#: `verifier` values: "auto" is "math-verify" when math-verify is installed, else "exact"
VERIFIERS: tuple[str, ...] = ("auto", "math-verify", "exact")
#: `answer_format` values and the instruction each appends to the prompts by default
ANSWER_FORMATS: dict[str, str] = {"boxed": BOXED_INSTRUCTION, "answer_tag": ANSWER_INSTRUCTION, "text": ""}
#: `split_field` values and the split each means
_SPLIT_VALUES = {"train": "train", "heldout": "heldout", "test": "heldout"}


def _math_verify_installed() -> bool:
    return importlib.util.find_spec("math_verify") is not None


@register_task("jsonl:<path>", hint="one JSON object per line with prompt and answer fields")
class JsonlTask:
    """A user's dataset in a JSON Lines file (see the module docstring).

    Args:
        path: the ``.jsonl`` file.
        prompt_field, answer_field: the fields holding each problem's prompt and gold answer.
        split_field: the optional field assigning a line to ``train`` or ``heldout`` (``test``); None: ignore it.
        heldout_fraction: share of the (unassigned) prompts, by hash, in the held-out split.
        verifier: ``"auto"`` (default), ``"math-verify"`` or ``"exact"``.
        answer_format: ``"boxed"`` (default), ``"answer_tag"`` or ``"text"``: where the answer is in a response.
        instruction: the line appended to every prompt (None: the answer format's own; ``""``: none).
        max_answer_chars: an extracted answer longer than this scores 0 unchecked.
        math_verify_timeout: seconds for each of math-verify's own parse and compare timeouts (where they work).
    """

    components = ("correct", "formatted")
    #: rewards [B, 2] for multi-reward estimators: correct, and has an answer in the expected format
    reward_components = ("correct", "formatted")
    #: modules the verification fork server imports once, so replacement workers start fast
    worker_preload: tuple[str, ...] = ("canonrl.lab.tasks.jsonl", "math_verify")

    def __init__(
        self,
        path: str | Path,
        *,
        prompt_field: str = "prompt",
        answer_field: str = "answer",
        split_field: str | None = "split",
        heldout_fraction: float = 0.2,
        verifier: str = "auto",
        answer_format: str = "boxed",
        instruction: str | None = None,
        max_answer_chars: int = 300,
        math_verify_timeout: int = 1,
    ) -> None:
        for option, value in (("prompt_field", prompt_field), ("answer_field", answer_field)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{option} must be a non-empty string, got {value!r}")
        if split_field is not None and (not isinstance(split_field, str) or not split_field):
            raise ValueError(f"split_field must be a non-empty string or None, got {split_field!r}")
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
        if verifier not in VERIFIERS:
            raise ValueError(f"verifier must be one of {', '.join(VERIFIERS)}, got {verifier!r}")
        if answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format must be one of {', '.join(ANSWER_FORMATS)}, got {answer_format!r}")
        if instruction is not None and not isinstance(instruction, str):
            raise ValueError(f"instruction must be a string or None, got {type(instruction).__name__}")
        if max_answer_chars < 1:
            raise ValueError(f"max_answer_chars must be >= 1, got {max_answer_chars}")
        if int(math_verify_timeout) != math_verify_timeout or math_verify_timeout < 1:
            raise ValueError(f"math_verify_timeout must be a whole number of seconds >= 1, got {math_verify_timeout}")
        if verifier == "auto":
            verifier = "math-verify" if _math_verify_installed() else "exact"
        elif verifier == "math-verify" and not _math_verify_installed():
            raise ValueError(
                "verifier: 'math-verify' needs the math-verify package (pip install 'canonrl[lab]'), "
                "or choose verifier='exact'"
            )
        self.path = str(path)
        self.name = f"jsonl:{self.path}"
        self.prompt_field = prompt_field
        self.answer_field = answer_field
        self.split_field = split_field
        self.heldout_fraction = heldout_fraction
        self.verifier = verifier
        self.answer_format = answer_format
        self.instruction = ANSWER_FORMATS[answer_format] if instruction is None else instruction
        self.max_answer_chars = max_answer_chars
        self.math_verify_timeout = int(math_verify_timeout)
        #: exact matching is a linear string compare: verified inline, without worker processes
        self.cheap = verifier == "exact"
        self._rows: list[tuple[str, str, str, int]] | None = None
        self._rows = self._load()

    # ------------------------------------------------------------------------------------------------------
    # Loading

    def _load(self) -> list[tuple[str, str, str, int]]:
        """(prompt, answer, split, line number) for every problem in the file, checked."""
        try:
            handle = Path(self.path).expanduser().open("rb")
        except FileNotFoundError:
            raise ValueError(f"path: no such file {self.path!r}") from None
        except OSError as error:
            raise ValueError(f"path: cannot read {self.path!r} ({error.strerror or error})") from None
        rows: list[tuple[str, str, str, int]] = []
        seen: dict[str, tuple[str, int]] = {}  # normalised prompt -> (split, line)
        with handle:
            for number, raw in enumerate(handle, 1):
                where = f"{self.path}, line {number}"
                try:
                    text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError:
                    raise ValueError(f"{where}: not UTF-8 text") from None
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{where}: invalid JSON ({error.msg}, column {error.colno})") from None
                prompt, answer, split = self._fields(record, where)
                key = normalize(prompt)
                other = seen.setdefault(key, (split, number))
                if other[0] != split:
                    raise ValueError(
                        f"{where}: the same prompt is in the {other[0]} split on line {other[1]}; "
                        "the splits must not share a prompt"
                    )
                rows.append((prompt, answer, split, number))
        if not rows:
            raise ValueError(f"path: {self.path!r} holds no problems (one JSON object per line)")
        return rows

    def _fields(self, record: Any, where: str) -> tuple[str, str, str]:
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {_json_type(record)}")
        for field_name in (self.prompt_field, self.answer_field):
            if field_name not in record:
                fields = ", ".join(repr(str(key)) for key in list(record)[:10]) or "none"
                raise ValueError(f"{where}: missing field {field_name!r} (fields: {fields})")
        prompt, answer = record[self.prompt_field], record[self.answer_field]
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(
                f"{where}: field {self.prompt_field!r} must be a non-empty string, got {_json_type(prompt)}"
            )
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError(
                f"{where}: field {self.answer_field!r} must be a non-empty string or a number, got {_json_type(answer)}"
            )
        if self.split_field is not None and self.split_field in record:
            value = record[self.split_field]
            if value not in _SPLIT_VALUES:
                raise ValueError(
                    f"{where}: field {self.split_field!r} must be one of {', '.join(map(repr, _SPLIT_VALUES))}, "
                    f"got {value!r}"[:300]
                )
            split = _SPLIT_VALUES[value]
        else:
            split = "heldout" if text_fraction(prompt) < self.heldout_fraction else "train"
        return prompt, answer, split

    def _all_rows(self) -> list[tuple[str, str, str, int]]:
        if self._rows is None:  # an unpickled copy (a verification worker) reloads only if asked for problems
            self._rows = self._load()
        return self._rows

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_rows"] = None  # workers verify from the problem alone: do not ship the dataset with every call
        return state

    # ------------------------------------------------------------------------------------------------------
    # The Task interface

    def in_split(self, prompt: str, split: Split) -> bool:
        """Whether the dataset's `prompt` (as in the file, before the instruction) is a problem of `split`."""
        check_split(split)
        key = normalize(prompt)
        return any(row[2] == split and normalize(row[0]) == key for row in self._all_rows())

    def split_size(self, split: Split) -> int:
        """The number of lines of the file in `split`."""
        check_split(split)
        return sum(1 for row in self._all_rows() if row[2] == split)

    def problems(self, split: Split, count: int, seed: int) -> list[Problem]:
        check_split(split)
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        pool = [row for row in self._all_rows() if row[2] == split]
        if count and not pool:
            raise ValueError(
                f"count: {self.path!r} has no {split} problems (of {len(self._all_rows())}); "
                f'mark some lines "{self.split_field or "split"}": "{split}" or change heldout_fraction'
            )
        out: list[Problem] = []
        epoch = 0
        while len(out) < count:
            order = list(pool)
            random.Random(f"jsonl/{split}/{seed}/{epoch}").shuffle(order)
            out.extend(self._problem(row) for row in order[: count - len(out)])
            epoch += 1
        return out

    def _problem(self, row: tuple[str, str, str, int]) -> Problem:
        prompt, answer, split, line = row
        text = f"{prompt.rstrip()}\n\n{self.instruction}" if self.instruction else prompt
        return Problem(prompt=text, answer=answer, meta={"line": line, "split": split, "source": self.path})

    def extract(self, response: str) -> str | None:
        """The answer in `response` by `answer_format`; None when there is none (an empty response for "text")."""
        if self.answer_format == "boxed":
            return last_boxed(response)
        if self.answer_format == "answer_tag":
            return extract_answer_tag(response)
        return response.strip() or None

    def warm_up(self) -> None:
        """Import math-verify and run one comparison (called by verification workers after loading the task)."""
        if self.verifier == "math-verify":
            warm_up_math_verify(self.math_verify_timeout)

    def verify(self, response: str, problem: Problem) -> Reward:
        content = self.extract(response)
        if content is None:
            return Reward(0.0, {"correct": 0.0, "formatted": 0.0})
        if not content or len(content) > self.max_answer_chars:
            return Reward(0.0, {"correct": 0.0, "formatted": 1.0})
        correct = normalize(content) == normalize(problem.answer)
        if not correct and self.verifier == "math-verify":
            # None: the gold answer is not math (a word, a name): the exact comparison was the whole check
            correct = bool(math_verify_equal(problem.answer, content, self.math_verify_timeout))
        score = 1.0 if correct else 0.0
        return Reward(score, {"correct": score, "formatted": 1.0})

    def __repr__(self) -> str:
        return f"JsonlTask({self.path!r}, verifier={self.verifier!r}, answer_format={self.answer_format!r})"


def _json_type(value: Any) -> str:
    """The JSON type name of a decoded value, for error messages (never the value itself: it may be long)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "an empty string" if not value.strip() else "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
