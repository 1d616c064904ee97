"""Policy-gradient losses with verl's conventions: PPO-clip (clip-higher, dual clip), loss aggregation, KL penalty.

Pure tensor functions — the lab trainer uses them, and so can any trainer. Shapes are [B, T] with a response mask.

- `aggregate_loss` implements verl's ``loss_agg_mode`` values for one process (dp_size 1):
  ``token-mean`` (sum over all tokens / token count), ``seq-mean-token-mean`` (mean over responses of each
  response's token mean), ``seq-mean-token-sum`` (mean over responses of token sums) and
  ``seq-mean-token-sum-norm`` (the same divided by a constant, by default T: Dr.GRPO's constant normaliser).
  Fully masked responses are left out of the response count, as verl does.
- `ppo_clip_loss`: ``max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))``, and for A < 0 at most ``-A c`` (dual
  clip, c = 3 in verl; None turns it off). Returns the per-token loss and the clip fractions.
- `kl_penalty`: ``low_var_kl`` (Schulman's k3, clamped to [-10, 10] as verl does), ``k1`` and ``k2``.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("low_var_kl", "k1", "k2")


def aggregate_loss(
    loss: Tensor,
    mask: Tensor,
    mode: str,
    scale_factor: float | None = None,
    total_tokens: float | Tensor | None = None,
    total_responses: float | Tensor | None = None,
) -> Tensor:
    """One scalar from a per-token loss [B, T] under `mask`, as verl's `agg_loss` (single process).

    `total_tokens` / `total_responses` (verl's ``batch_num_tokens`` / ``global_batch_size``) replace this
    chunk's own counts when the batch is split into micro-batches: the chunks' losses then add up to the loss
    of the whole batch. For ``seq-mean-token-sum-norm`` pass `scale_factor` too (it defaults to this chunk's T).
    """
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg must be one of {', '.join(LOSS_AGG_MODES)}; got {mode!r}")
    mask = mask.to(loss.dtype)
    if mode == "token-mean":
        tokens = mask.sum().clamp(min=1) if total_tokens is None else total_tokens
        return (loss * mask).sum() / tokens
    token_count = mask.sum(dim=-1)
    responses = (token_count > 0).to(loss.dtype).sum().clamp(min=1) if total_responses is None else total_responses
    if mode == "seq-mean-token-mean":
        return ((loss * mask).sum(dim=-1) / token_count.clamp(min=1)).sum() / responses
    total = (loss * mask).sum(dim=-1).sum() / responses
    if mode == "seq-mean-token-sum-norm":
        total = total / (loss.shape[-1] if scale_factor is None else scale_factor)
    return total


def ppo_clip_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = 3.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token PPO-clip loss [B, T] and per-token indicators `clipped` / `dual_clipped` (float, for metrics)."""
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low and clip_high must be >= 0; got {clip_low}, {clip_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (verl's clip_ratio_c) or None; got {dual_clip}")
    # clamped so an exploding ratio cannot overflow exp (verl clamps the same way)
    ratio = torch.exp((logprobs - old_logprobs).clamp(-20.0, 20.0))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    indicators = {"clipped": (clipped > unclipped).float()}
    if dual_clip is not None:
        floor = -advantages * dual_clip
        dual = (advantages < 0) & (loss > floor)
        loss = torch.where(dual, floor, loss)
        indicators["dual_clipped"] = dual.float()
    return loss, indicators


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "low_var_kl") -> Tensor:
    """Per-token KL(pi || ref) estimate from sampled-token log-probs."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "low_var_kl":
        reverse = (-log_ratio).clamp(-20.0, 20.0)
        return (reverse.exp() - reverse - 1).clamp(-10.0, 10.0)
    raise ValueError(f"kl estimator must be one of {', '.join(KL_ESTIMATORS)}; got {estimator!r}")
