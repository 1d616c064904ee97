"""KTAE as the spec describes it, one group and one token id at a time (Python loops and dicts).

The benchmark's "straightforward per-group loop" contender and a test oracle for :mod:`canonrl.methods.ktae`; it
shares only the Fisher p-value functions with it. GRPO (unbiased std, eps 1e-6) is the base advantage.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import torch
from torch import Tensor

from canonrl.methods._fisher import fisher_two_sided, fisher_two_sided_upstream


def _entropy(p: float) -> float:
    return -sum(x * math.log2(x) for x in (p, 1 - p) if x > 0)


def _group_keys(token_rows: list[list[int]], correct: list[bool], numerics: str) -> dict[int, float]:
    n_correct = sum(correct)
    n_incorrect = len(correct) - n_correct
    if n_correct == 0 or n_incorrect == 0:
        return {}
    presence: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    counts: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    length = [0, 0]
    for tokens, is_correct in zip(token_rows, correct):
        side = 0 if is_correct else 1
        length[side] += len(tokens)
        for token, occurrences in Counter(tokens).items():
            presence[token][side] += 1
            counts[token][side] += occurrences
    ids = sorted(presence)
    a = torch.tensor([presence[t][0] for t in ids], dtype=torch.float64)
    b = torch.tensor([presence[t][1] for t in ids], dtype=torch.float64)
    c, d = n_correct - a, n_incorrect - b
    if numerics == "upstream":
        width = torch.full_like(a, int(torch.minimum(a + b, a + c).max().item()) + 1).long()
        p_values = fisher_two_sided_upstream(a, b, c, d, width).tolist()
        fisher = [math.exp(-2 * p) if p != 1.0 else 0.0 for p in p_values]
    else:
        p_values = fisher_two_sided(a, b, c, d).tolist()
        fisher = [math.exp(-2 * p) if p < 1.0 else 0.0 for p in p_values]
    n = len(correct)
    average = (length[0] + length[1]) / 2
    keys = {}
    for i, token in enumerate(ids):
        ai, bi = presence[token]
        ci, di = n_correct - ai, n_incorrect - bi
        info = _entropy(n_correct / n) - (ai + bi) / n * _entropy(ai / (ai + bi)) - (
            (ci + di) / n * _entropy(ci / (ci + di)) if ci + di else 0.0
        )
        proportion = math.asin(math.sqrt(ai / (ai + ci + 1e-10))) - math.asin(math.sqrt(bi / (bi + di + 1e-10)))
        saturated = []
        for side in (0, 1):
            tf = counts[token][side] / length[side]
            saturated.append(tf * 3.0 / (tf + 2.0 * (0.5 + 0.5 * length[side] / average)))
        ratio = saturated[0] / (saturated[1] + 1e-5) - saturated[1] / (saturated[0] + 1e-5)
        z = (fisher[i] + info) * (proportion + ratio) / 2
        keys[token] = math.tanh(z / 2)  # = 2 sigmoid(z) - 1, without overflow
    return keys


def ktae_loop(rewards: Tensor, group, mask: Tensor, token_ids: Tensor, numerics: str = "exact") -> Tensor:
    """[B, T] KTAE advantages (GRPO base, code form, default weights) computed group by group."""
    group = group.tolist() if isinstance(group, Tensor) else list(group)
    out = torch.zeros(mask.shape)
    members: dict[object, list[int]] = defaultdict(list)
    for row, g in enumerate(group):
        members[g].append(row)
    for rows in members.values():
        scores = rewards[rows].float()
        if len(rows) > 1:
            advantage = (scores - scores.mean()) / (scores.std() + 1e-6)
        else:
            advantage = torch.zeros(1)
        token_rows = [token_ids[r][mask[r] != 0].tolist() for r in rows]
        keys = _group_keys(token_rows, [bool(rewards[r] > 0) for r in rows], numerics)
        for advantage_i, row in zip(advantage.tolist(), rows):
            for t in range(mask.shape[1]):
                if mask[row, t] != 0:
                    out[row, t] = advantage_i + keys.get(int(token_ids[row, t]), 0.0)
    return out
