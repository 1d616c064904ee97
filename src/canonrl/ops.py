"""Token-level tensor operations shared by estimators: masked whitening, discounted returns, blocked scans."""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: verl's ``masked_whiten`` adds this to the variance before the reciprocal square root.
WHITEN_EPS = 1e-8


def whiten_broadcast_scores(scores: Tensor, lengths: Tensor, eps: float = WHITEN_EPS) -> Tensor:
    """Whiten per-response scores as if broadcast to every mask token, without materialising [B, T].

    Equals verl's ``masked_whiten(scores[:, None] * mask, mask)`` at mask positions: token-weighted mean, unbiased
    (N-1) token variance over all N mask tokens of the batch. Returns [B] whitened scores. With fewer than two mask
    tokens the variance is undefined and the result is 0 (verl raises instead).
    """
    total = lengths.sum()
    mean = (scores * lengths).sum() / total.clamp_min(1)
    centered = scores - mean
    variance = (lengths * centered * centered).sum() / (total - 1).clamp_min(1)
    whitened = centered * torch.rsqrt(variance + eps)
    return torch.where(total > 1, whitened, torch.zeros_like(whitened))


def ceil_fraction(count: Tensor, fraction: float, slack: float = 1e-9) -> Tensor:
    """Long ceil(fraction * count), elementwise, in float64 with ``slack`` so that a rounding error cannot push it up
    a whole step (0.3 * 10 is 3.0000000000000004)."""
    return torch.ceil(count.double() * fraction - slack).long()


def masked_whiten(values: Tensor, mask: Tensor, eps: float = WHITEN_EPS) -> Tensor:
    """verl's ``masked_whiten`` over all mask positions of a [B, T] tensor (unbiased variance), 0 outside the mask."""
    values = values.float()
    total = mask.sum(dtype=torch.float32)
    mean = (values * mask).sum() / total.clamp_min(1)
    centered = (values - mean) * mask
    variance = (centered * centered).sum() / (total - 1).clamp_min(1)
    whitened = (centered * torch.rsqrt(variance + eps)).float()  # float32 even for a float64 mask
    return torch.where(total > 1, whitened, torch.zeros_like(whitened))


def discounted_returns(token_rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """[B, T] float32 returns over mask positions, discounted per mask token; 0 outside the mask.

    G_t = sum over mask positions t' >= t of gamma^(k(t') - k(t)) * r_t', with k the index among the row's mask
    positions: masked spans (e.g. tool observations) are skipped, neither rewarded nor discounted, exactly as
    verl 0.9's REINFORCE++ loop carries its running return through them.

    Vectorized as a scaled reverse cumulative sum in float64, split into chunks short enough that gamma^-chunk
    cannot overflow; only the (few) chunks are looped over, never the tokens.
    """
    rewards = (token_rewards * mask).double()
    if gamma == 1.0:
        return (rewards.flip(-1).cumsum(-1).flip(-1) * mask).float()
    if gamma == 0.0:
        return rewards.float()
    weights = (mask != 0).double()
    # e(t): number of mask positions before t; the exponent of a reward at t' seen from t is e(t') - e(t).
    before = weights.cumsum(-1) - weights
    length = rewards.shape[-1]
    chunk = max(1, min(length, int(600 / abs(math.log(gamma)))))
    running = torch.empty_like(rewards)
    carry = torch.zeros(rewards.shape[0], dtype=torch.float64, device=rewards.device)
    carry_before = before[:, -1] + weights[:, -1]
    for end in range(length, 0, -chunk):
        start = max(0, end - chunk)
        exponent = before[:, start:end] - before[:, start : start + 1]
        scale = gamma**exponent
        tail = (rewards[:, start:end] * scale).flip(-1).cumsum(-1).flip(-1) / scale
        running[:, start:end] = tail + carry[:, None] * gamma ** (carry_before[:, None] - before[:, start:end])
        carry, carry_before = running[:, start], before[:, start]
    return (running * mask).float()


#: Tokens per block of :func:`reverse_discounted_cumsum`: one [64, 64] matrix product per block, a carry between.
SCAN_BLOCK = 64


def reverse_discounted_cumsum(values: Tensor, factor: float) -> Tensor:
    """[B, W] float32 y_t = sum_{k >= t} factor^(k - t) x_k along the last dimension, as a blocked scan.

    Within each block of ``SCAN_BLOCK`` positions the sums are one matrix product with the [block, block] matrix of
    powers of ``factor``; across blocks a carry runs backwards (a loop over W / 64 blocks, never over tokens).
    Float32, like the Python loops it replaces; ``factor`` in [0, 1].
    """
    rows, width = values.shape
    padded = -(-width // SCAN_BLOCK) * SCAN_BLOCK
    x = torch.nn.functional.pad(values.float(), (0, padded - width)).view(rows, -1, SCAN_BLOCK)
    offset = torch.arange(SCAN_BLOCK, device=values.device, dtype=torch.float64)
    exponent = offset[None, :] - offset[:, None]  # [i, j] = j - i
    powers = torch.where(exponent >= 0, factor ** exponent.clamp_min(0), 0.0).float()
    inner = x @ powers.T  # inner[..., i] = sum_{j >= i} factor^(j - i) x_j within the block
    carry = torch.zeros(rows, x.shape[1], dtype=torch.float32, device=values.device)  # y at the next block's start
    running = torch.zeros(rows, dtype=torch.float32, device=values.device)
    step = float(factor) ** SCAN_BLOCK
    for block in range(x.shape[1] - 1, -1, -1):
        carry[:, block] = running
        running = inner[:, block, 0] + step * running
    tail = (factor ** (SCAN_BLOCK - offset)).float()  # factor^(distance to the next block's start)
    return (inner + tail[None, None, :] * carry[:, :, None]).view(rows, padded)[:, :width]
