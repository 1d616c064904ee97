"""Held-out evaluation: greedy pass@1, mean@k sampled, length, entropy, and accuracy at token budgets.

The headline "held-out accuracy" is mean@k at the training temperature: the quantity RL optimises. Greedy
pass@1 is reported next to it. Accuracy at a token budget counts an answer only when the response ended within
that many tokens — the performance–cost view the CANON paper uses for CANON-Eff.
"""

from __future__ import annotations

import math
import statistics

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


def _cv(values: list[float]) -> float:
    mean = statistics.fmean(values)
    return statistics.pstdev(values, mean) / mean if mean else 0.0
