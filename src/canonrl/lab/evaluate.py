"""Held-out evaluation: greedy pass@1, mean@k and pass@k sampled, length, entropy, and accuracy at token budgets.

The headline "held-out accuracy" is mean@k at the training temperature: the quantity RL optimises. Greedy
pass@1 is reported next to it, and pass@k (the unbiased estimator of Chen et al. 2021) for every power of two
k <= the samples per problem: whether RL widens what the policy can solve or only sharpens what it already could.
Accuracy at a token budget counts an answer only when the response ended within that many tokens — the
performance–cost view the CANON paper uses for CANON-Eff. A task with a ``difficulty(problem)`` method gets the
same metrics per difficulty level (``by_difficulty``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import torch

from canonrl.lab.rewards import score_rollouts
from canonrl.lab.sampling import Rollouts, generate
from canonrl.lab.tasks.base import Task

DEFAULT_BUDGETS = (16, 24, 32, 48, 64, 96, 128, 256, 512)


def _sample_in_chunks(policy, prompts: list[str], chunk: int, repeats: int = 1, **sampling) -> list[Rollouts]:
    """Rollouts for `repeats` samples of each prompt, about `chunk` rows per generate call."""
    out = []
    per_call = max(1, chunk // repeats)
    for start in range(0, len(prompts), per_call):
        ids, mask = policy.encode_prompts(prompts[start : start + per_call])
        out.append(
            generate(policy.model, ids, mask, eos_id=policy.eos_id, pad_id=policy.pad_id, repeats=repeats, **sampling)
        )
    return out


@torch.no_grad()
def evaluate(
    policy,
    task: Task,
    *,
    problems: int = 256,
    seed: int = 0,
    samples: int = 4,
    max_new_tokens: int = 96,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = True,
    budgets: tuple[int, ...] = DEFAULT_BUDGETS,
    chunk: int = 256,
    timeout: float = 2.0,
    sample_seed: int | None = None,
) -> dict:
    """Evaluate `policy` on `problems` held-out problems of `task`.

    `seed` picks the problems, `sample_seed` (default: `seed`) the sampling; on CPU the result is a pure
    function of the two.
    """
    was_training = policy.model.training
    policy.model.eval()
    heldout = task.problems("heldout", problems, seed=seed)
    generator = torch.Generator(device=policy.device).manual_seed(seed if sample_seed is None else sample_seed)
    repeated = [p for p in heldout for _ in range(samples)]
    scores, lengths, entropies, finished = [], [], [], []
    for part in _sample_in_chunks(
        policy, [p.prompt for p in heldout], chunk, samples,
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, generator=generator,
    ):  # fmt: skip
        start = len(scores)
        _, verdict = score_rollouts(policy, task, part, repeated[start : start + part.response_ids.shape[0]], timeout)
        scores += verdict.scores
        lengths += part.lengths.tolist()
        token_count = part.response_mask.sum(dim=1).clamp(min=1)
        entropies += ((part.entropy * part.response_mask).sum(dim=1) / token_count).tolist()
        finished += part.finished.tolist()
    correct = [s >= 1.0 for s in scores]
    total_tokens = sum(lengths)
    per_sample = sample_metrics(task, heldout, scores, lengths, samples)
    result = {
        "accuracy": sum(scores) / len(scores),
        "k": samples,
        "response_length": total_tokens / len(lengths),
        "length_cv": _cv(lengths),
        "entropy": sum(entropies) / len(entropies),
        "finished": sum(finished) / len(finished),
        "tokens_per_correct": total_tokens / sum(correct) if any(correct) else math.inf,
        "budget_accuracy": {
            str(b): sum(c and n <= b for c, n in zip(correct, lengths)) / len(correct) for b in budgets if b <= max_new_tokens
        },
        **per_sample,
    }
    if greedy:
        greedy_scores = []
        for part in _sample_in_chunks(
            policy, [p.prompt for p in heldout], chunk, max_new_tokens=max_new_tokens, greedy=True
        ):
            start = len(greedy_scores)
            _, verdict = score_rollouts(policy, task, part, heldout[start : start + part.response_ids.shape[0]], timeout)
            greedy_scores += verdict.scores
        result["greedy_pass1"] = sum(greedy_scores) / len(greedy_scores)
    policy.model.train(was_training)
    return result


def pass_at_k(n: int, correct: Sequence[int] | torch.Tensor, k: int) -> torch.Tensor:
    """The unbiased pass@k estimate of each problem from `n` samples of which `correct[i]` were right (Chen et al.
    2021): 1 - C(n - c, k) / C(n, k), computed as 1 - prod_{i = n-c+1}^{n} (1 - k / i) in float64 (no large
    binomials); 1 when n - c < k. Returns a float64 tensor shaped like `correct`."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    c = torch.as_tensor(correct, dtype=torch.float64)
    if ((c < 0) | (c > n)).any():
        raise ValueError(f"correct counts must lie in [0, {n}]")
    flat = c.reshape(-1, 1)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    factors = torch.where(i > n - flat, 1.0 - k / i, torch.ones((), dtype=torch.float64))
    estimate = torch.where(n - flat.squeeze(1) < k, 1.0, 1.0 - factors.prod(dim=1))
    return estimate.reshape(c.shape)


def pass_at_k_table(correct: Sequence[int] | torch.Tensor, n: int) -> dict[str, float]:
    """``{"1": ..., "2": ..., "4": ...}``: pass@k averaged over problems for every power of two k <= `n`."""
    table, k = {}, 1
    while k <= n:
        table[str(k)] = float(pass_at_k(n, correct, k).mean())
        k *= 2
    return table


def _group_metrics(scores: list[float], lengths: list[float], samples: int) -> dict:
    """pass@k and the length split by correctness for rows that come `samples` per problem, problem-major."""
    correct = [s >= 1.0 for s in scores]
    counts = torch.tensor(correct, dtype=torch.float64).view(-1, samples).sum(dim=1)
    right = [n for c, n in zip(correct, lengths) if c]
    wrong = [n for c, n in zip(correct, lengths) if not c]
    return {
        "pass_at_k": pass_at_k_table(counts, samples),
        "length_correct": sum(right) / len(right) if right else None,
        "length_incorrect": sum(wrong) / len(wrong) if wrong else None,
    }


def sample_metrics(task, problems: list, scores: list[float], lengths: list[float], samples: int) -> dict:
    """The metrics of `samples` scored rows per problem (rows problem-major, as the samplers lay them out):
    ``pass_at_k``, ``length_correct``, ``length_incorrect`` (None when no row is correct / incorrect) and, when
    the task has a ``difficulty(problem)`` method, ``by_difficulty``: per level (``str`` of the difficulty, levels
    in sorted order) the problems, accuracy (mean score), pass@k, tokens per correct answer, response length and
    the length split. A correct row is one whose score is >= 1."""
    if len(scores) != len(problems) * samples or len(lengths) != len(scores):
        raise ValueError(
            f"expected {len(problems)} x {samples} scored rows, got {len(scores)} scores, {len(lengths)} lengths"
        )
    result = _group_metrics(scores, lengths, samples)
    difficulty = getattr(task, "difficulty", None)
    if difficulty is None:
        return result
    rows_of: dict = {}
    for index, problem in enumerate(problems):
        rows_of.setdefault(difficulty(problem), []).append(index)
    try:
        levels = sorted(rows_of)
    except TypeError:  # mixed types: sort by their text
        levels = sorted(rows_of, key=str)
    by_difficulty = {}
    for level in levels:
        rows = [index * samples + j for index in rows_of[level] for j in range(samples)]
        level_scores = [scores[r] for r in rows]
        level_lengths = [lengths[r] for r in rows]
        solved = sum(s >= 1.0 for s in level_scores)
        by_difficulty[str(level)] = {
            "problems": len(rows_of[level]),
            "accuracy": sum(level_scores) / len(level_scores),
            "tokens_per_correct": sum(level_lengths) / solved if solved else math.inf,
            "response_length": sum(level_lengths) / len(level_lengths),
            **_group_metrics(level_scores, level_lengths, samples),
        }
    result["by_difficulty"] = by_difficulty
    return result


def _cv(values: list[float]) -> float:
    mean = statistics.fmean(values)
    return statistics.pstdev(values, mean) / mean if mean else 0.0
