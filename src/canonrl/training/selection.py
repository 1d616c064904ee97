"""Which groups, responses and tokens carry a learning signal.

- `dynamic_sampling_keep`: DAPO's dynamic-sampling filter ("DAPO: An Open-Source LLM Reinforcement Learning System
  at Scale", arXiv 2503.14476, Sec. 3.2).
- `d3s_sample_keep`, `d3s_token_keep`, `d3s_keep`, `d3s_schedule`: D^3S's dual-level down-sampling ("Dynamic
  Dual-Level Down-Sampling", arXiv 2509.22115): keep, per group, the responses whose advantages have the largest
  variance, then the top-K% tokens by |A|·H. They return boolean keep-masks ([B] rows, [B, T] tokens) that a
  trainer multiplies into its loss mask.
- `pivot_keep`: PivotRL's pivot selection ("PivotRL: High Accuracy Agentic Post-Training at Low Compute Cost", arXiv
  2603.21383): of the candidate states (one group of local rollouts each), keep those whose outcomes vary and whose
  success rate is below a threshold. No official code was found (best reading of secondary sources; the threshold
  is a parameter).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from canonrl.batch import describe_rows, encode_groups
from canonrl.groups import Grouping
from canonrl.ops import ceil_fraction


def dynamic_sampling_keep(metric: Tensor, group: Any, *, keep_singletons: bool = True) -> Tensor:
    """[B] bool: True for rows of groups whose ``metric`` (e.g. accuracy) is not the same for every response.

    DAPO over-samples prompts and trains only on groups whose metric varies: an all-correct or all-wrong group
    gives GRPO zero advantage and only dilutes the batch. verl's DAPO trainer filters on ``acc`` and keeps
    single-response groups (``keep_singletons=True``).
    """
    if metric.dim() != 1:
        raise ValueError(f"metric must have shape [B], got {list(metric.shape)}")
    index, num_groups = encode_groups(group, metric.shape[0], metric.device)
    grouping = Grouping(index, index >= 0, num_groups)
    constant = grouping.gather(grouping.is_constant(metric.float()))
    if keep_singletons:
        constant = constant & ~grouping.singleton
    return ~constant


def pivot_keep(rewards: Tensor, group: Any, *, max_success: float = 1.0, min_variance: float = 0.0) -> Tensor:
    """[B] bool: the rows of pivot states — groups (one candidate state each, its K local rollouts) whose reward
    variance exceeds ``min_variance`` and whose mean reward is below ``max_success``.

    PivotRL trains with GRPO only at states where sampled actions disagree: the GRPO signal there grows with
    sqrt(Var r). Population variance; a group of one has none and is never a pivot.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape [B], got {list(rewards.shape)}")
    bad = ~torch.isfinite(rewards)
    if bad.any():
        raise ValueError(f"rewards has NaN or Inf at rows {describe_rows(bad)}")
    index, num_groups = encode_groups(group, rewards.shape[0], rewards.device)
    grouping = Grouping(index, torch.ones_like(index, dtype=torch.bool), num_groups)
    values = rewards.float()
    variance = grouping.variance(values, unbiased=False)
    pivot = (variance > min_variance) & (grouping.mean(values) < max_success) & (grouping.count > 1)
    return grouping.gather(pivot)


# ---------------------------------------------------------------------------------------------------------------
# D^3S: dynamic dual-level down-sampling (arXiv 2509.22115, ICLR 2026).
#
# Reliability: the sample- and token-level rules and the linear schedule come from a secondary source only (spec
# section 25); the schedule endpoints are unverified and are required arguments here. Everything below is the
# documented form, with each uncertain choice a parameter and marked "best reading".
# ---------------------------------------------------------------------------------------------------------------

_TIE_TOLERANCE = 1e-9


def d3s_schedule(progress: float, *, n_init: int, n_final: int, k_init: float, k_final: float) -> tuple[int, float]:
    """(N, K) at training progress ``p`` in [0, 1]: ``(1 - p)·[n_init, k_init] + p·[n_final, k_final]``.

    N (responses kept per group) is rounded half up to an int; K is the fraction of tokens kept. The linear form is
    from a secondary source; the endpoint values are unverified (aggressive early, relaxed late: n_init < n_final,
    k_init < k_final; fewer than 20% of tokens used is claimed) — best reading, no defaults on purpose. A trainer
    passes ``p = step / total_steps``.
    """
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1] (step / total_steps); got {progress}")
    for name, n in (("n_init", n_init), ("n_final", n_final)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be an int >= 1 (responses kept per group); got {n!r}")
    for name, k in (("k_init", k_init), ("k_final", k_final)):
        if not 0.0 < k <= 1.0:
            raise ValueError(f"{name} must be a fraction of tokens in (0, 1]; got {k!r}")
    n = math.floor((1.0 - progress) * n_init + progress * n_final + 0.5)
    return max(1, n), (1.0 - progress) * k_init + progress * k_final


def _row_advantage(advantages: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """([B] float per-response advantage, [B] bool rows that take part)."""
    if not isinstance(advantages, Tensor) or not advantages.dtype.is_floating_point:
        raise TypeError("advantages must be a floating-point torch.Tensor of shape [B] or [B, T]")
    if advantages.dim() not in (1, 2):
        raise ValueError(f"advantages must have shape [B] or [B, T], got {list(advantages.shape)}")
    rows = advantages.shape[0]
    if mask is None:
        if advantages.dim() == 2:
            raise ValueError("advantages of shape [B, T] need the response mask [B, T]")
        valid = torch.ones(rows, dtype=torch.bool, device=advantages.device)
        return advantages, valid
    if mask.dim() != 2 or mask.shape[0] != rows or (advantages.dim() == 2 and mask.shape != advantages.shape):
        raise ValueError(f"mask must have shape [B, T] with B = {rows} (and the shape of [B, T] advantages), "
                         f"got {list(mask.shape)}")
    maskf = (mask > 0).to(advantages.dtype)
    valid = maskf.sum(1) > 0
    if advantages.dim() == 2:
        # a sequence-level advantage broadcast over tokens: its masked mean is the scalar
        advantages = (advantages * maskf).sum(1) / maskf.sum(1).clamp_min(1)
    return advantages, valid


def d3s_sample_keep(
    advantages: Tensor,
    group: Any,
    num_keep: int,
    *,
    mask: Tensor | None = None,
    cross_group: bool = False,
    drop_constant: bool = True,
    keep_singletons: bool = True,
) -> Tensor:
    """[B] bool keep-mask: per group, the ``num_keep`` responses whose advantages have the largest variance.

    D^3S's sample level: advantages are computed on the *full* group first (pass them here, [B] or [B, T] with
    `mask`; a [B, T] advantage is reduced to its masked mean), then a subset of size N = `num_keep` maximising the
    (population) variance of those advantages is kept — they are not re-normalised. The maximum-variance subset
    of size N is always "the k largest plus the N - k smallest" for some k (swapping an inside value for a more
    extreme outside one never lowers the variance), which is the paper's "N_pos largest positive plus N_neg most
    negative" (secondary source); all k in 0..N are scored at once from per-group prefix sums of the sorted
    advantages, so the choice is exact and vectorized (sort + scatter, no loop over groups). Ties between k are
    broken by the larger sum of squares (so N = 1 keeps the largest |A|), then by the smaller k; tied values keep
    batch order (the smallest values are taken earliest-first, the largest latest-first).

    Groups with at most N valid responses are kept whole. ``drop_constant`` drops groups whose advantages are all
    equal (zero variance: no signal; the spec lists them as excluded) except single-response groups when
    ``keep_singletons`` (verl gives them A = r). Fully masked rows (`mask`) are never kept. ``cross_group=True``
    is the paper's cross-group variant: one selection of N rows over the whole batch (N is then a batch total).

    Multiply the result into the trainer's loss mask (``mask * keep[:, None]``); with ``token-mean`` aggregation
    the dropped responses then leave the token count as well.
    """
    if isinstance(num_keep, bool) or not isinstance(num_keep, int) or num_keep < 1:
        raise ValueError(f"num_keep must be an int >= 1; got {num_keep!r}")
    values, valid = _row_advantage(advantages, mask)
    rows = values.shape[0]
    device = values.device
    bad = valid & ~torch.isfinite(values)
    if bad.any():
        raise ValueError(f"advantages has NaN/Inf at rows {describe_rows(bad)}")
    if cross_group:
        index, num_groups = torch.zeros(rows, dtype=torch.long, device=device), int(rows > 0)
    else:
        index, num_groups = encode_groups(group, rows, device)
    if rows == 0:
        return torch.zeros(0, dtype=torch.bool, device=device)
    grouping = Grouping(index, valid, num_groups)
    stats = values.double()
    rank = grouping.rank(stats)
    size = grouping.count.long()  # [G]
    width = int(size.max().item()) if num_groups > 0 else 0
    # [G, L] ascending advantages per group (padding after each group's end), prefix sums with a leading 0
    ordered = torch.zeros(num_groups, max(width, 1), dtype=torch.float64, device=device)
    ordered[index[valid], rank[valid]] = stats[valid]
    zero = ordered.new_zeros(num_groups, 1)
    prefix = torch.cat([zero, ordered.cumsum(1)], 1)
    prefix_sq = torch.cat([zero, ordered.square().cumsum(1)], 1)
    keep_n = size.clamp(max=num_keep)  # [G] subset size m
    k = torch.arange(num_keep + 1, device=device)[None, :]  # [1, N+1]: how many from the top
    feasible = k <= keep_n[:, None]
    bottom = (keep_n[:, None] - k).clamp(min=0)
    top_start = (size[:, None] - k).clamp(min=0)

    def subset_sum(cums: Tensor) -> Tensor:
        end = cums.gather(1, size[:, None])
        return cums.gather(1, bottom) + end - cums.gather(1, top_start)

    total, total_sq = subset_sum(prefix), subset_sum(prefix_sq)
    m = keep_n[:, None].clamp(min=1).double()
    variance = (total_sq / m - (total / m).square()).clamp(min=0)
    variance = torch.where(feasible, variance, float("-inf"))
    best = variance.max(1, keepdim=True).values
    near_best = feasible & (variance >= best - _TIE_TOLERANCE * (best.abs() + 1))
    chosen = torch.where(near_best, total_sq, float("-inf")).argmax(1)  # first maximum: the smaller k
    top_k = grouping.gather(chosen)
    row_size, row_m = grouping.gather(size), grouping.gather(keep_n)
    keep = valid & ((rank < row_m - top_k) | (rank >= row_size - top_k))
    if drop_constant:
        constant = grouping.gather(grouping.is_constant(stats)) & valid
        if keep_singletons:
            constant = constant & ~grouping.singleton
        keep = keep & ~constant
    return keep


def d3s_token_keep(
    advantages: Tensor,
    entropy: Tensor,
    mask: Tensor,
    top_fraction: float,
    *,
    row_keep: Tensor | None = None,
    per_row: bool = False,
) -> Tensor:
    """[B, T] bool keep-mask: the top-K% (K = `top_fraction`) valid tokens by ``|A_{i,t}| · H_{i,t}``.

    D^3S's token level (secondary source): only those tokens of the selected samples get gradients. H is the
    per-token policy entropy [B, T]; `advantages` is [B] (broadcast) or [B, T]. Candidates are the valid tokens
    (`mask` > 0) of the rows in `row_keep` (the sample-level result; all rows when None). The kept count is
    ``ceil(K · n)`` (at least one token of a non-empty candidate set) — best reading, as is the pooling: over all
    candidate tokens of the batch by default, or within each response when ``per_row=True``. Ties keep the earlier
    token (row-major order). Multiply into the loss mask (``mask * keep``).
    """
    if not isinstance(entropy, Tensor) or not isinstance(mask, Tensor):
        raise TypeError("entropy and mask must be torch.Tensors of shape [B, T]")
    if mask.dim() != 2:
        raise ValueError(f"mask must have shape [B, T], got {list(mask.shape)}")
    if entropy.shape != mask.shape:
        raise ValueError(f"entropy must have the mask's shape {list(mask.shape)}, got {list(entropy.shape)}")
    if advantages.shape not in (mask.shape, mask.shape[:1]):
        raise ValueError(f"advantages must have shape [B] or [B, T] = {list(mask.shape)}, got {list(advantages.shape)}")
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be a fraction of tokens in (0, 1]; got {top_fraction!r}")
    candidate = mask > 0
    if row_keep is not None:
        if row_keep.shape != mask.shape[:1] or row_keep.dtype != torch.bool:
            raise ValueError(f"row_keep must be a bool tensor of shape [{mask.shape[0]}], got "
                             f"{row_keep.dtype} {list(row_keep.shape)}")
        candidate = candidate & row_keep[:, None]
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    score = adv.abs().double() * entropy.double()
    bad = (candidate & ~torch.isfinite(score)).any(1)
    if bad.any():
        raise ValueError(f"advantages or entropy has NaN/Inf at rows {describe_rows(bad)}")
    negative = (candidate & (entropy < 0)).any(1)
    if negative.any():
        raise ValueError(f"entropy must be >= 0; negative at rows {describe_rows(negative)}")
    key = torch.where(candidate, score, float("-inf"))
    if per_row:
        order = torch.sort(key, dim=1, descending=True, stable=True).indices
        count = _kept_count(candidate.sum(1), top_fraction)[:, None]
        position = torch.arange(mask.shape[1], device=mask.device)[None, :].expand_as(order)
        return torch.zeros_like(candidate).scatter(1, order, position < count)
    flat = key.reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices
    count = _kept_count(candidate.sum(), top_fraction)
    position = torch.arange(flat.numel(), device=flat.device)
    return torch.zeros_like(candidate).reshape(-1).scatter(0, order, position < count).view_as(candidate)


def _kept_count(n: Tensor, fraction: float) -> Tensor:
    """ceil(fraction · n), robust to float error (0.7 · 10 keeps 7), at least 1 where n > 0."""
    count = ceil_fraction(n, fraction, slack=1e-6)
    return torch.where(n > 0, count.clamp(min=1), 0)


def d3s_keep(
    advantages: Tensor,
    entropy: Tensor,
    mask: Tensor,
    group: Any,
    *,
    num_keep: int,
    top_fraction: float,
    cross_group: bool = False,
    drop_constant: bool = True,
    keep_singletons: bool = True,
    per_row: bool = False,
) -> tuple[Tensor, Tensor]:
    """Both levels: ([B] rows kept by `d3s_sample_keep`, [B, T] tokens kept by `d3s_token_keep` within them).

    The token mask already implies the row mask and `mask`: a trainer uses ``loss_mask = mask * token_keep``.
    Take (N, K) = (`num_keep`, `top_fraction`) from `d3s_schedule` at the current training progress.
    """
    rows = d3s_sample_keep(
        advantages, group, num_keep, mask=mask, cross_group=cross_group, drop_constant=drop_constant,
        keep_singletons=keep_singletons,
    )
    tokens = d3s_token_keep(advantages, entropy, mask, top_fraction, row_keep=rows, per_row=per_row)
    return rows, tokens
