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
- `clip_cov_loss` / `kl_cov_loss`: the covariance-based token controls of "The Entropy Mechanism of RL for
  Reasoning LMs" (arXiv 2505.22617), with verl's ``policy_loss.loss_mode = clip_cov | kl_cov`` semantics. Like
  `ppo_clip_loss` they return the per-token loss [B, T] and per-token float indicators; aggregate the loss with
  `aggregate_loss`. Their selection ratios are *fractions* of the valid tokens (verl's ``clip_cov_ratio`` /
  ``kl_cov_ratio``); the official PRIME-RL scripts pass a *percent* ``k_percent`` that the code divides by 100 —
  convert with `cov_ratio_from_percent` (k_percent 0.2 -> 0.002).

- `cdpo_loss`: cDPO's token-weighted DPO loss ("Critical Tokens Matter", arXiv 2411.19943), an *offline
  preference* loss on chosen/rejected pairs, not an RLVR policy-gradient loss; `cdpo_rejected_weights` turns the
  contrastive-estimation probabilities into its rejected-side token weights.

A trainer picks one of them by name through the policy-loss registry, :mod:`canonrl.training.policy_losses`.

NGRPO's asymmetric clipping (arXiv 2509.18851) needs no new loss: its official ``compute_policy_loss`` is
``max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))`` with no dual clip, i.e.
``ppo_clip_loss(..., clip_low=NGRPO_CLIP_LOW, clip_high=NGRPO_CLIP_HIGH, dual_clip=None)``. In that form only the
upper bound 1 + 0.24 can bind for A > 0 and only the lower bound 1 - 0.16 for A < 0: the looser bound for positive
advantages and the tighter one for negative that the paper describes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from canonrl.batch import describe_rows

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("low_var_kl", "k1", "k2")

#: NGRPO's official script (``clip_ratio_low`` / ``clip_ratio_high``); use with ``dual_clip=None``.
NGRPO_CLIP_LOW = 0.16
NGRPO_CLIP_HIGH = 0.24


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


def check_token_inputs(tensors: dict[str, Tensor], mask: Tensor) -> Tensor:
    """[B, T] bool: the tokens inside `mask`, after checking that every tensor of `tensors` (name -> [B, T]) has the
    mask's shape and is finite inside it; errors name the argument and the rows."""
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        raise ValueError(f"mask must be a [B, T] tensor, got {getattr(mask, 'shape', type(mask).__name__)}")
    inside = mask != 0
    for name, value in tensors.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.shape != mask.shape:
            raise ValueError(f"{name} must have the shape of mask {list(mask.shape)}, got {list(value.shape)}")
        bad = (~torch.isfinite(value.detach()) & inside).any(-1)
        if bad.any():
            raise ValueError(f"{name} is NaN or Inf inside the mask at rows {describe_rows(bad)}")
    return inside


def _log_ratio(logprobs: Tensor, old_logprobs: Tensor) -> Tensor:
    """log(pi / pi_old), clamped so that an exploding ratio cannot overflow exp (verl clamps the same way)."""
    return (logprobs - old_logprobs).clamp(-20.0, 20.0)


def ppo_clip_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    clip_low: float | Tensor = 0.2,
    clip_high: float | Tensor = 0.2,
    dual_clip: float | None = 3.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token PPO-clip loss [B, T] and per-token indicators `clipped` / `dual_clipped` (float, for metrics).

    The clip ranges are numbers, or [B, T] tensors of per-token ranges (HAPO's entropy-adaptive clipping)."""
    if any(bool((bound < 0).any()) if isinstance(bound, Tensor) else bound < 0 for bound in (clip_low, clip_high)):
        raise ValueError(f"clip_low and clip_high must be >= 0; got {clip_low}, {clip_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (verl's clip_ratio_c) or None; got {dual_clip}")
    ratio = torch.exp(_log_ratio(logprobs, old_logprobs))
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


def cov_ratio_from_percent(k_percent: float) -> float:
    """The official PRIME-RL ``k_percent`` (a percent: 0.2 for Qwen2.5-7B) as the fraction these losses take (0.002)."""
    if not k_percent > 0:
        raise ValueError(f"k_percent must be > 0; got {k_percent}")
    return k_percent / 100.0


def _check_cov_inputs(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, ratio: float, name: str
) -> None:
    shape = logprobs.shape
    for arg, value in (("old_logprobs", old_logprobs), ("advantages", advantages), ("mask", mask)):
        if value.shape != shape:
            raise ValueError(f"{arg} must have the shape of logprobs {list(shape)}, got {list(value.shape)}")
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must have shape [B, T], got {list(shape)}")
    if not 0 < ratio <= 1:
        hint = ""
        if ratio > 1:
            hint = " (a fraction of tokens; convert the official percent k_percent with cov_ratio_from_percent)"
        raise ValueError(f"{name} must be in (0, 1]{hint}; got {ratio}")


def _token_covariance(logprobs: Tensor, advantages: Tensor, valid: Tensor, eps: float) -> Tensor:
    """[B, T] centred product (A - mean A)(log pi - mean log pi), means over the valid tokens (+eps in the count)."""
    validf = valid.to(advantages.dtype)
    count = validf.sum() + eps
    mean_adv = (advantages * validf).sum() / count
    lp = logprobs.detach()
    mean_lp = (lp * validf.to(lp.dtype)).sum() / count.to(lp.dtype)
    return (advantages.detach() - mean_adv) * (lp - mean_lp)


def clip_cov_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_cov_ratio: float = 2e-4,
    clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clip-Cov per-token loss [B, T] and indicators ``clipped`` (PPO clip) / ``cov_clipped`` (detached by Cov).

    As verl's ``compute_policy_loss_clip_cov``: the PPO-clip loss ``max(-A r, -A clip(r, 1-clip_low, 1+clip_high))``
    (no dual clip unless `dual_clip` is given), then, among the valid tokens not clipped by PPO whose covariance
    ``Cov_t = (A_t - mean A)(log pi_t - mean log pi)`` (means over the valid tokens of this call) lies strictly in
    (`clip_cov_lb`, `clip_cov_ub`), ``min(max(1, floor(clip_cov_ratio * n_valid)), n_candidates)`` tokens chosen
    uniformly at random get loss 0 (no gradient). `clip_cov_ratio` is a fraction (verl's unit); the official
    scripts' percent ``k_percent`` converts with `cov_ratio_from_percent`. The official scripts also set
    clip_low = clip_high = 1 (PPO clipping effectively off) and dual-clip c = 10.

    The random choice is ``torch.randperm(n_candidates, generator=generator)`` over the candidates in row-major
    order, as verl draws it: with `generator` None it uses the global RNG, so after the same ``torch.manual_seed``
    it picks exactly the tokens verl picks; pass a seeded generator for reproducible runs.
    """
    _check_cov_inputs(logprobs, old_logprobs, advantages, mask, clip_cov_ratio, "clip_cov_ratio")
    if not clip_cov_lb < clip_cov_ub:
        raise ValueError(f"clip_cov_lb must be < clip_cov_ub; got {clip_cov_lb}, {clip_cov_ub}")
    loss, indicators = ppo_clip_loss(logprobs, old_logprobs, advantages, clip_low, clip_high, dual_clip)
    valid = mask > 0
    clipped = indicators["clipped"].bool() & valid
    cov = _token_covariance(logprobs, advantages, valid, 1e-8)
    candidate = valid & ~clipped & (cov > clip_cov_lb) & (cov < clip_cov_ub)
    flat = candidate.reshape(-1).nonzero().squeeze(-1)
    budget = max(int(clip_cov_ratio * valid.sum().item()), 1)
    detach = torch.zeros(candidate.numel(), dtype=torch.bool, device=candidate.device)
    if flat.numel() > 0:
        device = "cpu" if generator is None else generator.device
        perm = torch.randperm(flat.numel(), generator=generator, device=device)
        detach[flat[perm[:budget].to(flat.device)]] = True
    detach = detach.view_as(candidate)
    loss = torch.where(detach, torch.zeros_like(loss), loss)
    indicators["cov_clipped"] = detach.to(loss.dtype)
    return loss, indicators


def kl_cov_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    kl_cov_ratio: float = 2e-4,
    ppo_kl_coef: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KL-Cov per-token loss [B, T] and the indicator ``kl_cov_selected`` (tokens that got the KL term).

    As verl's ``compute_policy_loss_kl_cov``: no PPO clip, the loss is ``-A r``; the ``max(1, floor(kl_cov_ratio *
    n_valid))`` valid tokens with the largest covariance ``(A_t - mean A)(log pi_t - mean log pi)`` (plain means
    over the valid tokens) get ``+ ppo_kl_coef * |log pi - log pi_old|``. `kl_cov_ratio` is a fraction: 2e-3 for
    Qwen2.5-7B and 2e-4 for 32B in the paper, whose scripts pass the percent ``k_percent`` 0.2 / 0.02
    (`cov_ratio_from_percent`). ``ppo_kl_coef`` is 1 in the official code and in verl's function fallback; verl's
    ``PolicyLossConfig`` dataclass defaults it to 0.1, so pass it explicitly when matching a verl config. Ties in
    the covariance are broken as ``torch.topk`` breaks them.
    """
    _check_cov_inputs(logprobs, old_logprobs, advantages, mask, kl_cov_ratio, "kl_cov_ratio")
    if ppo_kl_coef < 0:
        raise ValueError(f"ppo_kl_coef must be >= 0; got {ppo_kl_coef}")
    log_ratio = _log_ratio(logprobs, old_logprobs)
    loss = -advantages * torch.exp(log_ratio)
    valid = mask > 0
    n_valid = int(valid.sum().item())
    selected = torch.zeros_like(valid)
    if n_valid > 0:
        cov = _token_covariance(logprobs, advantages, valid, 0.0)
        cov = torch.where(valid, cov, torch.full_like(cov, float("-inf")))
        k = max(1, int(n_valid * kl_cov_ratio))
        top = torch.topk(cov.reshape(-1), k, largest=True).indices
        selected = selected.reshape(-1).index_fill(0, top, True).view_as(valid)
    loss = torch.where(selected, loss + ppo_kl_coef * log_ratio.abs(), loss)
    return loss, {"kl_cov_selected": selected.to(loss.dtype)}


def cdpo_rejected_weights(scores: Tensor, mask: Tensor) -> Tensor:
    """cDPO's rejected-side token weights [B, T]: ``w_t = 1 - s_t``, and 1 on each row's last mask token.

    `scores` [B, T] are the contrastive-estimation probabilities ``s_t = softmax((1 + b) z_pos - b z_neg)(y_t)``
    (b = 1 in the official code) of the rejected response's tokens, e.g. canonrl's ``token_scores`` field. Tokens
    the contrastive model finds unlikely (the critical error tokens) get weight about 1. Off-mask positions get 0.
    """
    if scores.dim() != 2 or mask.shape != scores.shape:
        raise ValueError(
            f"scores and mask must have the same shape [B, T], got {list(scores.shape)}, {list(mask.shape)}"
        )
    valid = mask != 0
    positions = torch.arange(scores.shape[1], device=scores.device)
    last = torch.where(valid, positions, -1).amax(-1, keepdim=True)
    weights = torch.where(positions == last, torch.ones_like(scores), 1.0 - scores)
    return torch.where(valid, weights, torch.zeros_like(weights))


def cdpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    rejected_weights: Tensor,
    chosen_weights: Tensor | None = None,
    beta: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """cDPO's token-weighted DPO loss (scalar, mean over pairs) and per-pair statistics.

    Paper: "Critical Tokens Matter: Token-Level Contrastive Estimation Enhances LLM's Reasoning Capability"
    (arXiv 2411.19943); formula as in the official ``src/train/train_cdpo.py``::

        D_w = sum_t m^w_t w^w_t (log pi(y^w_t) - log pi_ref(y^w_t))     D_l = the same over the rejected tokens
        L   = mean over pairs of -log sigmoid(beta (D_w - D_l))

    Shapes: the chosen tensors are [B, Tw], the rejected ones [B, Tl] (per-token log-probs of the sampled tokens,
    masks over the response tokens). `rejected_weights` [B, Tl] usually come from `cdpo_rejected_weights`;
    `chosen_weights` None means 1 (the official ``only_neg=True``, the default). With all weights 1 this is plain
    DPO. The reference log-probs and the weights are constants: no gradient reaches them. beta = 0.1 in the paper.

    Statistics (detached, [B]): ``loss`` (per pair), ``chosen_rewards`` = beta D_w, ``rejected_rewards`` = beta D_l,
    ``margins`` (their difference) and ``accuracy`` (1 where the margin is > 0).
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0; got {beta}")
    sides = {
        "chosen": (policy_chosen_logps, ref_chosen_logps, chosen_mask, chosen_weights),
        "rejected": (policy_rejected_logps, ref_rejected_logps, rejected_mask, rejected_weights),
    }
    deltas = {}
    for side, (policy, ref, mask, weights) in sides.items():
        if policy.dim() != 2:
            raise ValueError(f"policy_{side}_logps must have shape [B, T], got {list(policy.shape)}")
        for arg, value in ((f"ref_{side}_logps", ref), (f"{side}_mask", mask), (f"{side}_weights", weights)):
            if value is not None and value.shape != policy.shape:
                raise ValueError(
                    f"{arg} must have the shape of policy_{side}_logps {list(policy.shape)}, got {list(value.shape)}"
                )
        token_weights = mask.to(policy.dtype)
        if weights is not None:
            token_weights = token_weights * weights.detach().to(policy.dtype)
        deltas[side] = ((policy - ref.detach().to(policy.dtype)) * token_weights).sum(-1)
    if policy_chosen_logps.shape[0] != policy_rejected_logps.shape[0]:
        raise ValueError(
            f"chosen and rejected must have the same number of pairs, got {policy_chosen_logps.shape[0]} and "
            f"{policy_rejected_logps.shape[0]}"
        )
    chosen, rejected = beta * deltas["chosen"], beta * deltas["rejected"]
    per_pair = -torch.nn.functional.logsigmoid(chosen - rejected)
    margins = (chosen - rejected).detach()
    stats = {
        "loss": per_pair.detach(),
        "chosen_rewards": chosen.detach(),
        "rejected_rewards": rejected.detach(),
        "margins": margins,
        "accuracy": (margins > 0).to(margins.dtype),
    }
    return per_pair.mean(), stats
