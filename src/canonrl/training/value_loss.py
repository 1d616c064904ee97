"""PPO's clipped value loss, as verl's ``compute_value_loss`` (single process).

Formula: with V the critic's prediction, V_old its value at sampling time and R the value target (the estimator's
``returns``), L = 0.5 * agg(max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)) over the mask, c = `clip`;
``clipfrac`` is the share of mask tokens where the clipped term is the larger.

Source: verl 0.9 ``verl/trainer/ppo/core_algos.py::compute_value_loss`` (itself TRL's PPO value loss); the
aggregation is `canonrl.training.losses.aggregate_loss` (verl's ``agg_loss``), so micro-batches may pass the whole
batch's token and response counts.
"""

from __future__ import annotations

from torch import Tensor

from canonrl.training.losses import aggregate_loss


def clipped_value_loss(
    values: Tensor, returns: Tensor, old_values: Tensor, mask: Tensor, clip: float, loss_agg: str = "token-mean",
    total_tokens: float | Tensor | None = None, total_responses: float | Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(loss, clipfrac) for predictions `values` [B, T] against `returns` [B, T], clipped around `old_values`."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped - returns) ** 2
    loss = 0.5 * aggregate_loss(
        clipped_loss.maximum(unclipped_loss), mask, loss_agg, total_tokens=total_tokens, total_responses=total_responses
    )
    weight = mask.to(values.dtype)
    clipfrac = ((clipped_loss > unclipped_loss).to(values.dtype) * weight).sum() / weight.sum().clamp(min=1)
    return loss, clipfrac
