"""Token-level tensor operations shared by estimators: masked whitening and discounted returns."""

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


def masked_whiten(values: Tensor, mask: Tensor, eps: float = WHITEN_EPS) -> Tensor:
    """verl's ``masked_whiten`` over all mask positions of a [B, T] tensor (unbiased variance), 0 outside the mask."""
    values = values.float()
    total = mask.sum(dtype=torch.float32)
    mean = (values * mask).sum() / total.clamp_min(1)
    centered = (values - mean) * mask
    variance = (centered * centered).sum() / (total - 1).clamp_min(1)
    whitened = centered * torch.rsqrt(variance + eps)
    return torch.where(total > 1, whitened, torch.zeros_like(whitened))


def discounted_returns(token_rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """[B, T] float32 returns G_t = sum over mask positions t' >= t of gamma^(t'-t) * r_t'.

    Vectorized as a scaled reverse cumulative sum in float64, split into chunks short enough that gamma^-chunk
    cannot overflow; only the (few) chunks are looped over, never the tokens.
    """
    rewards = (token_rewards * mask).double()
    if gamma == 1.0:
        return rewards.flip(-1).cumsum(-1).flip(-1).float()
    if gamma == 0.0:
        return rewards.float()
    length = rewards.shape[-1]
    chunk = max(1, min(length, int(600 / abs(math.log(gamma)))))
    returns = torch.empty_like(rewards)
    carry = torch.zeros(rewards.shape[0], dtype=torch.float64, device=rewards.device)
    for end in range(length, 0, -chunk):
        start = max(0, end - chunk)
        offsets = torch.arange(end - start, dtype=torch.float64, device=rewards.device)
        scale = gamma**offsets  # gamma^(t - start) within the chunk
        scaled = rewards[:, start:end] * scale
        tail = scaled.flip(-1).cumsum(-1).flip(-1) / scale
        # A reward after the chunk contributes gamma^(end - t) * carry, carry being the return at `end`.
        returns[:, start:end] = tail + carry[:, None] * gamma ** (end - start - offsets)
        carry = returns[:, start]
    return returns.float()
