"""Effective rank of a response's hidden states and its first and second differences over token prefixes.

Producer of the three per-response indicators of VERL ("Beyond the Exploration-Exploitation Trade-off: A Hidden
State Approach for LLM Reasoning in RLVR", arXiv 2509.23808; official code ``hf618/VERL`` at commit 3de68f16,
``verl/trainer/metrics_calculator.py`` and ``verl/trainer/metrics_utils.py``), in the official order
``(ERA, ERV, ER)`` (its ``indicator_names``: 'Effective Rank diff 2', 'Effective Rank diff', 'Effective Rank').

For a matrix H [k, d] of k token hidden states, centred over its tokens (Hc = H - mean_rows H), with singular
values s_j:

    p_j = s_j / (sum s + 1e-8),     ER(H) = exp(-sum_j p_j ln(p_j + 1e-8))      (0 when k < 2)

- ER: ER of all the response's valid tokens.
- ERV / ERA: over the response's valid tokens (only the *last* ``max_tokens`` = 512 of them: the calculator's
  ``max_seq_len``), the prefixes of length t + 1 for t = s, 2s, ... < L (s = ``diff_stride``) give
  m_1, ..., m_n = ER(prefix). For j >= 2, d_j = m_j - mean(m_1..m_{j-1}); for j >= 3, a_j = d_j - d_{j-1}.
  ERV = mean_j d_j, ERA = mean_j a_j, and 0 when there is none (L <= 2s for ERV, L <= 3s for ERA).
  The differences are over token prefixes of one response, not over training steps.

SVD: exact ``torch.linalg.svdvals``, batched over rows. The official code's launch script and yaml both set
``zeroth_order_svd_method='full'`` and ``diff_svd_method='full'`` (its ``svd_rank=50, svd_niter=5`` apply only to
``'lowrank'``), and its optimised difference path takes eigenvalues of the centred Gram matrix, whose square roots
are the same singular values. Differences from the code: the code stores ER in bfloat16 (here float32) and loops
over rows; the ER of a prefix from the Gram route may carry sqrt-of-rounding-noise singular values that svdvals
does not.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-8


def effective_rank(hidden: Tensor, valid: Tensor) -> Tensor:
    """[B] ER of each row's ``valid`` token hidden states (``hidden`` [B, T, d], ``valid`` [B, T] bool); 0 for rows
    with fewer than 2 valid tokens. Invalid positions are zeroed after centring, which leaves the singular values of
    the valid tokens unchanged."""
    weights = valid.to(hidden.dtype)[..., None]
    count = weights.sum(1, keepdim=True)
    mean = (hidden * weights).sum(1, keepdim=True) / count.clamp_min(1)
    centred = (hidden - mean) * weights
    singular = torch.linalg.svdvals(centred)
    p = singular / (singular.sum(-1, keepdim=True) + EPS)
    rank = torch.exp(-(p * torch.log(p + EPS)).sum(-1))
    return torch.where(count[:, 0, 0] >= 2, rank, torch.zeros_like(rank))


def _compact(hidden: Tensor, valid: Tensor, keep: int | None) -> tuple[Tensor, Tensor]:
    """Each row's valid tokens moved to the front (in order), keeping only the last ``keep`` of them."""
    batch, length, _ = hidden.shape
    positions = torch.arange(length, device=hidden.device).expand(batch, length)
    order = torch.sort(torch.where(valid, positions, positions + length), dim=1).indices
    count = valid.sum(1)
    start = (count - keep).clamp_min(0) if keep is not None else torch.zeros_like(count)
    width = length if keep is None else min(keep, length)
    index = (start[:, None] + torch.arange(width, device=hidden.device)).clamp(max=length - 1)
    gathered = order.gather(1, index)
    compact = hidden.gather(1, gathered[..., None].expand(-1, -1, hidden.shape[-1]))
    kept = torch.arange(width, device=hidden.device) < (count - start)[:, None]
    return compact, kept


def effective_rank_indicators(
    hidden: Tensor, mask: Tensor, *, diff_stride: int = 40, max_tokens: int | None = 512, dtype=torch.float32
) -> Tensor:
    """[B, 3] float32 (ERA, ERV, ER) of each response.

    Args:
        hidden: [B, T, d] hidden states of the response tokens (one layer).
        mask: [B, T] response mask (nonzero on the response's tokens).
        diff_stride: s, the prefix stride of the differences (official train.sh 40; yaml 20).
        max_tokens: the differences use only the last ``max_tokens`` valid tokens (official 512; None: all).
        dtype: computation dtype (official float32).
    """
    if hidden.dim() != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be [B, T, d] and mask [B, T], got {list(hidden.shape)} and {list(mask.shape)}")
    if isinstance(diff_stride, bool) or not isinstance(diff_stride, int) or diff_stride < 1:
        raise ValueError(f"diff_stride must be an int >= 1, got {diff_stride!r}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens must be an int >= 1 or None, got {max_tokens!r}")
    hidden = hidden.to(dtype)
    valid = mask != 0
    batch = hidden.shape[0]
    er = effective_rank(hidden, valid)
    out = torch.zeros(batch, 3, dtype=torch.float32, device=hidden.device)
    out[:, 2] = er.float()
    if batch == 0 or hidden.shape[1] == 0:
        return out
    compact, kept = _compact(hidden, valid, max_tokens)
    length = kept.sum(1)
    positions = torch.arange(compact.shape[1], device=hidden.device)
    windows = (int(length.max()) - 1) // diff_stride if int(length.max()) > 0 else 0
    history = torch.zeros(batch, dtype=dtype, device=hidden.device)  # sum of m_1..m_{j-1}
    prev = torch.zeros_like(history)
    sum_d, sum_a = torch.zeros_like(history), torch.zeros_like(history)
    n_d, n_a = torch.zeros_like(history), torch.zeros_like(history)
    for j in range(1, windows + 1):
        t = j * diff_stride
        exists = t < length  # the window t exists for this row
        m = effective_rank(compact, kept & (positions <= t)[None, :])
        if j >= 2:
            d = m - history / (j - 1)
            sum_d += torch.where(exists, d, 0.0)
            n_d += exists
            if j >= 3:
                sum_a += torch.where(exists, d - prev, 0.0)
                n_a += exists
            prev = d
        history = history + m
    out[:, 1] = torch.where(n_d > 0, sum_d / n_d.clamp_min(1), 0.0).float()
    out[:, 0] = torch.where(n_a > 0, sum_a / n_a.clamp_min(1), 0.0).float()
    return out
