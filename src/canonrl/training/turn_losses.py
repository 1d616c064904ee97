"""Loss-side pieces of the multi-turn methods: ST-PPO's turn-level ratio and clipping, EPO's entropy regulariser.

Pure tensor functions over [B, T] with a response mask and the step table's turns (``turn_ids`` [B, T], −1 outside
every turn, as :mod:`canonrl.steps` reads them); aggregate the per-token losses with
:func:`canonrl.training.losses.aggregate_loss`.

- `turn_ppo_clip_loss` (ST-PPO, "ST-PPO: Stabilized Off-Policy Proximal Policy Optimization for Multi-Turn Agents",
  arXiv 2511.20718): one importance ratio per turn instead of per token — the geometric mean of the turn's token
  ratios, exp(mean over the turn's mask tokens of log pi - log pi_old) — and the PPO-clip surrogate with that ratio
  on every token of the turn. No official code was found; the length normalisation is the catalogue's reading
  (secondary sources), and the paper's clipping-bias correction, whose form could not be verified, is left out.
- `epo_entropy_regularizer` (EPO, "EPO: Entropy-regularized Policy Optimization for LLM Agents Reinforcement
  Learning", arXiv 2509.22576; official code ``WujiangXu/EPO`` ``dp_actor.py`` ``generate_entropy_penalty``): the
  term subtracted from the policy loss, entropy_coeff * (mean entropy - smooth_coeff * penalty), where the penalty
  acts on tokens whose entropy leaves the band (min_ratio, max_ratio) x the historical mean entropy of the same
  rollout step. The official penalty is a constant (``torch.where(inside, 0, out_range_penalty)``), so it carries no
  gradient and changes nothing in the update; ``penalty="hinge"`` (default) gives the penalty a gradient —
  out_range_penalty times the relative distance outside the band — and ``"official"`` keeps the constant.
- `epo_phase_weight`: the official phase-based smoothing weight (first half 1 - 0.2 (1 - e^{-2p}), second half
  0.8 e^{-3p}, p the progress within the half).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from canonrl.batch import describe_rows
from canonrl.training.losses import ppo_clip_loss

EPO_PENALTIES = ("hinge", "official")


def turn_log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, turn_ids: Tensor) -> Tensor:
    """[B, T]: each token's turn-level log-ratio, the mean of log pi - log pi_old over its turn's mask tokens
    (0 outside every turn). Tokens in no turn keep their own token-level log-ratio."""
    if turn_ids.shape != mask.shape:
        raise ValueError(f"turn_ids must have the mask's shape {list(mask.shape)}, got {list(turn_ids.shape)}")
    token = (logprobs - old_logprobs).float() * (mask > 0)
    inside = (turn_ids >= 0) & (mask > 0)
    width = int(turn_ids.max().item()) + 1 if turn_ids.numel() else 0
    key = torch.where(inside, turn_ids.long(), width)  # column `width` collects the tokens in no turn
    sums = torch.zeros(mask.shape[0], width + 1, device=mask.device).scatter_add_(1, key, token)
    counts = torch.zeros_like(sums).scatter_add_(1, key, inside.float())
    per_turn = sums / counts.clamp_min(1)
    return torch.where(inside, per_turn.gather(1, key), token)


def turn_ppo_clip_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    turn_ids: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token loss [B, T] (0 off the mask) and indicators of :func:`canonrl.training.losses.ppo_clip_loss`, with every
    token's ratio replaced by its turn's rho = exp(turn_log_ratio); no dual clip by default (not in the paper)."""
    turn_logprobs = old_logprobs + turn_log_ratio(logprobs, old_logprobs, mask, turn_ids)
    loss, indicators = ppo_clip_loss(turn_logprobs, old_logprobs, advantages, clip_low, clip_high, dual_clip)
    on = mask > 0
    return torch.where(on, loss, 0.0), {name: torch.where(on, value, 0.0) for name, value in indicators.items()}


def epo_entropy_regularizer(
    entropy: Tensor,
    mask: Tensor,
    reference_entropy: Tensor,
    *,
    entropy_coeff: float = 0.001,
    smooth_coeff: float = 1.0,
    min_ratio: float = 0.8,
    max_ratio: float = 1.2,
    out_range_penalty: float = 0.1,
    penalty: str = "hinge",
) -> Tensor:
    """Scalar to subtract from the policy loss: entropy_coeff * (token-mean entropy - smooth_coeff * mean penalty).

    ``reference_entropy`` [B] (or a scalar): the historical mean entropy of each row's rollout step (EPO keeps it per
    step index). The penalty of a token is 0 inside (min_ratio, max_ratio) x reference; outside it is
    out_range_penalty times the relative distance to the band (``"hinge"``, differentiable) or the constant
    out_range_penalty (``"official"``, no gradient).
    """
    if penalty not in EPO_PENALTIES:
        raise ValueError(f"penalty must be one of {list(EPO_PENALTIES)}, got {penalty!r}")
    reference = torch.as_tensor(reference_entropy, dtype=torch.float32, device=entropy.device)
    reference = reference.expand(entropy.shape[0]) if reference.dim() == 0 else reference
    bad = ~torch.isfinite(reference) | (reference <= 0)
    if bad.any():
        raise ValueError(f"reference_entropy must be a positive finite entropy, not at rows {describe_rows(bad)}")
    low, high = (min_ratio * reference)[:, None], (max_ratio * reference)[:, None]
    weight = mask.float()
    tokens = weight.sum().clamp_min(1)
    if penalty == "official":
        outside = (entropy <= low) | (entropy >= high)
        per_token = torch.where(outside, out_range_penalty, 0.0)
    else:
        distance = torch.relu(entropy - high) + torch.relu(low - entropy)
        per_token = out_range_penalty * distance / reference[:, None]
    entropy_term = (entropy * weight).sum() / tokens
    penalty_term = (per_token * weight).sum() / tokens
    return entropy_coeff * (entropy_term - smooth_coeff * penalty_term)


def epo_phase_weight(epoch: int, max_epochs: int = 150) -> float:
    """EPO's phase weight of the smoothing term: 1 -> ~0.83 over the first half of training, 0.8 -> ~0.04 after."""
    half = max_epochs / 2
    if epoch < half:
        return 1 - 0.2 * (1 - math.exp(-2 * epoch / half))
    return 0.8 * math.exp(-3 * min(epoch - half, half) / half)
