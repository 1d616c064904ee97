"""Fisher's exact test on 2x2 tables, vectorized over many tables, exact (float64) or as KTAE's code has it (float32).

A table [[a, b], [c, d]] has row sums R1 = a + b, R2 = c + d, first column C1 = a + c and total n. Under
independence a follows the hypergeometric distribution P(k) = C(C1, k) C(n - C1, R1 - k) / C(n, R1) on
k in [max(0, R1 + C1 - n), min(R1, C1)]. The two-sided p-value sums P(k) over the k with P(k) <= P(a).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Relative tolerance when comparing hypergeometric probabilities: mathematically tied tables must count as tied
#: although their float64 values differ in the last bits (R's fisher.test uses the same 1e-7).
TIE_TOLERANCE = 1e-7


def _log_comb(n: Tensor, k: Tensor) -> Tensor:
    return torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)


def _support_grid(r1: Tensor, c1: Tensor, n: Tensor, width: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    k = torch.arange(width, dtype=dtype, device=r1.device).expand(r1.shape[0], width)
    k_min = (r1 + c1 - n).clamp_min(0)
    k_max = torch.minimum(r1, c1)
    inside = (k >= k_min[:, None]) & (k <= k_max[:, None])
    return k, inside


def fisher_two_sided(a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:
    """Exact two-sided p-values in float64 (agrees with scipy.stats.fisher_exact).

    A table whose observed probability is the largest of its support (within the tie tolerance) gets exactly 1,
    as scipy returns, instead of a float sum a few ulps below it.
    """
    a, b, c, d = (x.double() for x in (a, b, c, d))
    r1, c1 = a + b, a + c
    n = a + b + c + d
    if a.numel() == 0:
        return a.clone()
    width = int(torch.minimum(r1, c1).max().item()) + 1
    k, inside = _support_grid(r1, c1, n, width, torch.float64)
    log_total = _log_comb(n, r1)
    log_p = _log_comb(c1[:, None], k) + _log_comb((n - c1)[:, None], r1[:, None] - k) - log_total[:, None]
    p_k = torch.where(inside, log_p.exp(), 0.0)
    p_observed = (_log_comb(c1, a) + _log_comb(n - c1, r1 - a) - log_total).exp()
    as_extreme = inside & (p_k <= p_observed[:, None] * (1 + TIE_TOLERANCE))
    p_value = torch.where(as_extreme, p_k, 0.0).sum(-1).clamp_max(1.0)
    return torch.where((as_extreme == inside).all(-1), 1.0, p_value)


def fisher_two_sided_upstream(a: Tensor, b: Tensor, c: Tensor, d: Tensor, width: Tensor) -> Tensor:
    """Two-sided p-values as the official KTAE code computes them: float32, strict comparison, no tolerance.

    ``width`` [N] is the k-grid width each table was evaluated on upstream (its group's largest min(R1, C1) + 1);
    it only affects the float32 summation, which is reproduced grid by grid.
    """
    a, b, c, d = (x.float() for x in (a, b, c, d))
    r1, c1 = a + b, a + c
    n = r1 + c + d
    p_value = torch.zeros_like(a)
    for grid_width in torch.unique(width).tolist():  # a handful of distinct widths (at most G + 1)
        rows = (width == grid_width).nonzero().flatten()
        ra, r_r1, r_c1, r_n = a[rows], r1[rows], c1[rows], n[rows]
        k, inside = _support_grid(r_r1, r_c1, r_n, int(grid_width), torch.float32)
        c1_grid, r1_grid, n_grid = (x[:, None].expand_as(k) for x in (r_c1, r_r1, r_n))
        log_p = _log_comb(c1_grid, k) + _log_comb(n_grid - c1_grid, r1_grid - k) - _log_comb(n_grid, r1_grid)
        p_k = torch.exp(log_p) * inside.float()
        p_observed = torch.exp(_log_comb(r_c1, ra) + _log_comb(r_n - r_c1, r_r1 - ra) - _log_comb(r_n, r_r1))
        p_value[rows] = torch.sum(torch.where((p_k <= p_observed[:, None]) & inside, p_k, 0.0), dim=1)
    return p_value
