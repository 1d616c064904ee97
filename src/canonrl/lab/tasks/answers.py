"""Answer extraction and math-verify checks shared by the reasoning-gym, boxed and jsonl tasks.

Extraction scans from the end with str.rfind, linear in the response length: a regex such as
``<answer>(.*?)</answer>`` is quadratic on adversarial inputs like "<answer>" repeated 100k times. math-verify is
imported only inside the functions that use it.
"""

from __future__ import annotations

import functools
import os
import threading

__all__ = [
    "ANSWER_INSTRUCTION",
    "BOXED_INSTRUCTION",
    "extract_answer_tag",
    "last_boxed",
    "normalize",
    "math_verify_timeout",
    "math_verify_equal",
    "warm_up_math_verify",
]

ANSWER_INSTRUCTION = "Give your final answer between <answer> and </answer> tags, e.g. <answer>your answer</answer>."
BOXED_INSTRUCTION = "Reason step by step, then put your final answer in \\boxed{}, e.g. \\boxed{42}."


def extract_answer_tag(response: str, tag: str = "answer") -> str | None:
    """The stripped text between the last ``</tag>`` and the ``<tag>`` before it; None when there is none."""
    close = response.rfind(f"</{tag}>")
    if close < 0:
        return None
    open_ = response.rfind(f"<{tag}>", 0, close)
    if open_ < 0:
        return None
    return response[open_ + len(tag) + 2 : close].strip()


def last_boxed(response: str) -> str | None:
    """The content of the last ``\\boxed{…}`` (braces matched); None when there is none or it is unclosed.

    An unclosed last box (a response cut at the token limit) does not fall back to an earlier one: the answer
    the model was writing is the one that counts.
    """
    start = response.rfind("\\boxed")
    if start < 0:
        return None
    i = start + len("\\boxed")
    while i < len(response) and response[i] == " ":
        i += 1
    if i >= len(response) or response[i] != "{":
        return None
    depth = 0
    for j in range(i, len(response)):
        c = response[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return response[i + 1 : j].strip()
    return None


def normalize(text: str) -> str:
    """`text` with runs of whitespace collapsed to one space and the ends stripped (for exact-match checks)."""
    return " ".join(text.split())


# ----------------------------------------------------------------------------------------------------------
# math-verify


@functools.lru_cache(maxsize=4096)
def _parse_gold(answer: str, timeout: int | None):
    from math_verify import parse

    return parse(f"${answer}$", parsing_timeout=timeout)


def math_verify_timeout(seconds: int) -> int | None:
    """math-verify's own timeouts use signal.alarm: usable only in a POSIX process's main thread (as in a
    verification worker). Elsewhere they raise, so they are disabled and `canonrl.lab.verification`'s deadline
    bounds the call."""
    if os.name == "posix" and threading.current_thread() is threading.main_thread():
        return seconds
    return None


def math_verify_equal(gold: str, content: str, seconds: int) -> bool | None:
    """Whether math-verify finds `content` (a predicted answer, parsed as ``\\boxed{content}``) equal to `gold`
    (parsed wrapped in ``$…$``: a bare LaTeX gold string may not parse); None when `gold` does not parse.

    `seconds` bounds each of math-verify's own parse and compare steps where its timeouts work (see
    `math_verify_timeout`).
    """
    from math_verify import parse, verify

    timeout = math_verify_timeout(seconds)
    parsed_gold = _parse_gold(gold, timeout)
    if not parsed_gold:
        return None
    predicted = parse(f"\\boxed{{{content}}}", parsing_timeout=timeout)
    return bool(predicted and verify(parsed_gold, predicted, timeout_seconds=timeout))


def warm_up_math_verify(seconds: int) -> None:
    """Import math-verify and run one comparison (its first call is ~0.1 s slower than later ones)."""
    from math_verify import parse, verify

    timeout = math_verify_timeout(seconds)
    verify(_parse_gold("1", timeout), parse("\\boxed{1}", parsing_timeout=timeout), timeout_seconds=timeout)
