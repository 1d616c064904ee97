"""T-SPMO: token-specific prefix matching — the mean reward after choosing a token minus the mean before it.

Formula (best reading, unverified: token-level.md §5b reconstructs it from secondary summaries). In a prompt group
with responses y_j (their mask tokens, in order) and rewards r_j, for the t-token prefix P and the next token v:

    S(P)    = { j in group : y_j[:t] = P }            (responses sharing the prefix; length >= t)
    A(P, v) = mean_{j in S(P v)} r_j - mean_{j in S(P)} r_j
    A_i,t   = A(y_i[:t], y_i[t]) / scale

with S(empty prefix) = the group's valid rows and ``scale`` = 1 (``scale="none"``, the default) or the group's reward
std + ``eps`` (``scale="std"``, unbiased std). A is non-zero only where a response's prefix splits from other group
members; once a prefix is unique, A = 0. That is the sparsity the paper reports ("fewer than 5% of tokens").

Paper: "Token-Efficient RL for LLM Reasoning" (v1: "Reinforcement Learning for LLM Reasoning Under Memory
Constraints"), Lee & Tong (arXiv 2504.20834). No official code was found.

Inputs: ``rewards``, ``group``, mask, ``token_ids`` [B, T]. The response is the row's mask tokens in column order
(prompt, padding and other mask-0 tokens are skipped, so they take no part in the prefix keys; EOS is an ordinary
token when it is in the mask).

Edge cases: identical responses, a group with all rewards equal, and a singleton group give exactly 0 (every mean is
taken over deviations from a member of the parent prefix, so an all-equal parent gives exactly 0 and a child equal
to its parent gives exactly its mean minus itself, 0); rows without mask tokens take no part and get 0; a response
that is a strict prefix of another counts in S(P) for its own prefixes, not after its end.

Differences from the paper (as far as summaries tell): the loss over unique (prefix, token) pairs U (each pair once
instead of once per response carrying it) is loss-side and not done here — every token gets its pair's A; the
paper's replay rollouts from intermediate states are the caller's (add them as more rows of the group).

Cost: one lexicographic ``unique`` of the group's packed token rows, one cumulative max and two scatters over [B, L]
(L the longest response): exact prefix identity, no hashing, no loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.methods._common import require_choice, require_range
from canonrl.registry import Estimator, Paper, param, register

T_SPMO_PAPER = Paper("Token-Efficient RL for LLM Reasoning", "2504.20834")
SCALES = ("none", "std")


def prefix_advantages(batch: RolloutBatch) -> Tensor:
    """[B, T] float64 A(y_i[:t], y_i[t]) at each mask token (the t-th one of its row), 0 elsewhere."""
    mask = (batch.mask > 0) & batch.valid[:, None]
    B, T = mask.shape
    device = mask.device
    out = torch.zeros(B, T, dtype=torch.float64, device=device)
    if not mask.any():
        return out
    lengths = mask.sum(-1)
    width = int(lengths.max())
    rank = mask.long().cumsum(-1) - 1
    rows, columns = mask.nonzero(as_tuple=True)
    tokens = batch.token_ids.long()
    sentinel = int(tokens[mask].min()) - 1  # after a response's end: below every token id
    packed = torch.full((B, width + 1), sentinel, dtype=torch.long, device=device)
    packed[rows, rank[rows, columns]] = tokens[rows, columns]
    group = torch.where(batch.valid, batch.group_index, -1)  # invalid rows: a group of their own, masked below
    keys = torch.cat([group[:, None], packed], 1)
    order = torch.argsort(torch.unique(keys, dim=0, return_inverse=True)[1], stable=True)
    ordered = keys[order]
    # shared prefix length of each row with the row before it in lexicographic order (-1: another group)
    shared = torch.cumprod((ordered[1:] == ordered[:-1]).long(), 1).sum(1) - 1
    levels = torch.arange(width + 1, device=device)  # prefix lengths 0..width
    index = torch.arange(B, device=device)
    breaks = torch.ones(B, width + 1, dtype=torch.bool, device=device)
    breaks[1:] = shared[:, None] < levels
    start = torch.cummax(torch.where(breaks, index[:, None], 0), 0).values  # first row of each prefix node
    member = (levels <= lengths[order][:, None]) & batch.valid[order][:, None]
    node = start * (width + 1) + levels
    reward = batch.rewards.double()[order]
    deviation = torch.where(member, reward[:, None] - reward[start], 0.0)  # from the node's first row
    size = width + 1
    total = torch.zeros(B * size, dtype=torch.float64, device=device).index_add_(0, node.flatten(), deviation.flatten())
    count = torch.zeros(B * size, dtype=torch.float64, device=device).index_add_(
        0, node.flatten(), member.double().flatten()
    )
    # a child's members deviate from its parent's first row: their sum, keyed by the child
    child_member = member[:, 1:]
    child_deviation = torch.where(child_member, deviation[:, :-1], 0.0)
    child_total = torch.zeros(B * size, dtype=torch.float64, device=device).index_add_(
        0, node[:, 1:].flatten(), child_deviation.flatten()
    )
    parent, child = node[:, :-1], node[:, 1:]
    advantage = child_total[child] / count[child].clamp_min(1) - total[parent] / count[parent].clamp_min(1)
    advantage = torch.where(child_member, advantage, 0.0)  # [B, width]: token k of each ordered row
    by_row = torch.empty_like(advantage)
    by_row[order] = advantage
    out[rows, columns] = by_row[rows, rank[rows, columns]]
    return out


@register
class TSPMO(Estimator):
    name = "t_spmo"
    description = "Token-level: mean reward of the group's responses sharing prefix + token minus those sharing prefix"
    paper = T_SPMO_PAPER
    level = "token"
    requires = ("token_ids",)
    verified = False
    inputs_note = "`token_ids`"

    @dataclass
    class Params:
        scale: str = param("none", "'none' (the reconstruction) or 'std': divide by the group's reward std + eps")
        eps: float = param(1e-6, "added to the std under scale='std'")

        def __post_init__(self) -> None:
            require_choice("scale", self.scale, SCALES)
            require_range("eps", self.eps, 0.0)

    def compute(self, batch: RolloutBatch) -> Tensor:
        out = prefix_advantages(batch)
        if self.params.scale == "std":
            grouping = batch.grouping
            std = grouping.variance(batch.rewards.double(), unbiased=True).sqrt()
            denominator = std[grouping.index] + self.params.eps
            out = out / torch.where(denominator > 0, denominator, 1.0)[:, None]
        return (out * batch.mask).float()
