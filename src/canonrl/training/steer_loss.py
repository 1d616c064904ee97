"""STEER's loss side: per-token loss weights from each token's predicted entropy change, inside dual-clip PPO.

Paper: "Rethinking Entropy Interventions in RLVR: An Entropy Change Perspective" (arXiv 2510.10150), STEER
("Stabilizing Token-level Entropy-changE via Reweighting"). Official code: ``zz-haooo/STEER``, commit
``b31df71652cd103ddc3512656a430c39ba15dd13`` (its only commit), ``verl/trainer/ppo/core_algos.py``:
``compute_token_weights`` (lines 580-676) and ``compute_policy_loss_with_entropy`` (680-809, registered as
``policy_loss.loss_mode=entropy_control``), ``agg_loss`` (543-576); the caller is
``verl/workers/actor/dp_actor.py`` (lines 502-549), the entropies come from ``verl/trainer/ppo/ray_trainer.py``
(1197-1217). :func:`steer_policy_loss` follows ``compute_policy_loss_with_entropy``.

Formula, per valid token t (mask != 0) with current log-prob log pi_t, old log-prob log pi_old,t, advantage A_t
and token entropy H_t::

    p_t     = clamp(exp(log pi_t), 1e-8, 1 - 1e-8)            (the *current* policy, detached)
    q_t     = clamp(exp(log pi_old,t), 1e-8, 1)               (the old policy)
    m_t     = | A_t / q_t * p_t (1 - p_t) (ln p_t + H_t) |    (non-finite m -> 0, as upstream)
    m_min, m_max = min / max of m over the valid tokens of this call (upstream: one micro-batch on one GPU)

    linear (``linear=True``):  w_t = w_max - (m_t - m_min) (w_max - w_min) / (m_max - m_min), clamped to
                               [w_min, w_max]; if m_max == m_min every w_t = (w_min + w_max) / 2
    exponential (``linear=False``):  k = -ln(w_min) / max(m_max, 0.02);  w_t = exp(-k m_t) clamped to [w_min, 1]
                               (w_max is not used)

    r_t    = exp(clamp(log pi_t - log pi_old,t, -20, 20))
    loss_t = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)) and, where A < 0, min(that, -A c)   (dual clip)
    loss   = aggregate over the mask of  w_t * loss_t          (token-mean upstream)

So the weights multiply the per-token loss *after* the dual clip and *before* aggregation; they are computed
under ``no_grad`` (upstream too), so the gradient flows only through the ratio r. Tokens whose update would change
the entropy most (large |m|) get the smallest weight.

Settings. The official function defaults are w_min 0.8, w_max 1.2, linear, c = 3 (used here as defaults). The
caller's fallbacks when the config lacks the keys are w_min 0.95, w_max 1.05. The run scripts (Qwen2.5-Math-7B,
clip_ratio_low 0.2, clip_ratio_high 0.28, clip_ratio_c 10, token-mean, 8 responses per micro-batch):
``run/run_exp.sh`` and ``run_exp_extreme.sh`` exponential, w_min 0.8, w_max 1.0 (unused); ``run/run_linear.sh``
and ``run_linear_extreme.sh`` linear, w_min 0.8, w_max 1.2 (the extreme scripts set clip 0.99 / 5). See
:data:`STEER_RUN_EXP` and :data:`STEER_RUN_LINEAR`.

Which entropy to pass: upstream passes the entropies the old-log-prob pass computed (``compute_log_prob`` with
``calculate_entropy=True`` before the update, stored as ``batch["entropys"]``), i.e. the *old* policy's H, while
p is the *current* policy's probability, recomputed in each micro-batch. At ratio 1 (the first mini-batch of an
on-policy update) the two coincide.

Edge cases:
- Entries outside the mask may hold anything (NaN, Inf); they get weight 0 and loss 0, and take no part in m_min /
  m_max or any statistic. NaN or Inf inside the mask raises a ValueError naming the rows.
- m_max == m_min (e.g. one valid token, or all A = 0): linear gives the midpoint (w_min + w_max) / 2; exponential
  gives w_min ** (m / max(m, 0.02)), i.e. w_min when m >= 0.02 and 1 when m = 0.
- w_min == w_max (linear) or w_min == 1 (exponential): every weight is 1 at w = 1, and the loss is canonrl's plain
  ``ppo_clip_loss`` aggregated with ``aggregate_loss``.
- A fully masked batch gives loss 0, weights 0 and statistics 0 (upstream returns zero weights, then its
  statistics take the mean / min of an empty tensor).

Differences from the official code:
- Weights are computed and returned in the dtype of `logprobs`; upstream stores them in a float32 tensor (equal to
  float32 rounding) and so raises on float64 log-probs (an index-put dtype mismatch); verl's log-probs are float32.
- Weights are 0 outside the mask and ignore the mask's values; upstream multiplies them by ``response_mask``
  (the same for 0/1 masks; upstream's aggregation then weighs by the mask a second time).
- Aggregation is canonrl's :func:`~canonrl.training.losses.aggregate_loss`: token-mean divides by max(mask sum, 1)
  where upstream's ``masked_mean`` divides by mask sum + 1e-8 (a relative difference of about 1e-8 / N);
  ``seq-mean-*`` modes leave fully masked rows out of the response count (upstream counts them), and upstream's
  ``seq-mean-token-sum-norm`` divides the *sum* over responses by T where canonrl divides their mean by T.
- Parameters are checked (upstream does not): linear needs 0 <= w_min <= w_max, exponential 0 < w_min <= 1;
  ``clip_ratio_c=None`` turns the dual clip off (upstream always applies it and asserts c > 1).
- Upstream prints a warning when m is non-finite; here it is silently set to 0 (the same value).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from canonrl.training.losses import _log_ratio, aggregate_loss, check_token_inputs, ppo_clip_loss

#: ``run/run_exp.sh`` (exponential mapping; w_max is unused there).
STEER_RUN_EXP = {"w_min": 0.8, "w_max": 1.0, "linear": False, "clip_low": 0.2, "clip_high": 0.28, "clip_ratio_c": 10.0}
#: ``run/run_linear.sh`` (linear mapping).
STEER_RUN_LINEAR = {
    "w_min": 0.8,
    "w_max": 1.2,
    "linear": True,
    "clip_low": 0.2,
    "clip_high": 0.28,
    "clip_ratio_c": 10.0,
}

_PROB_EPS = 1e-8
_EXP_METRIC_FLOOR = 0.02




def _check_weight_range(w_min: float, w_max: float, linear: bool) -> None:
    if linear:
        if not 0.0 <= w_min <= w_max:
            raise ValueError(f"linear mapping needs 0 <= w_min <= w_max; got w_min={w_min}, w_max={w_max}")
    elif not 0.0 < w_min <= 1.0:
        raise ValueError(f"exponential mapping needs 0 < w_min <= 1; got w_min={w_min}")


def _weights_and_metric(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    entropy: Tensor,
    inside: Tensor,
    w_min: float,
    w_max: float,
    linear: bool,
) -> tuple[Tensor, Tensor]:
    """Weights and |m| [B, T] in the dtype of `logprobs`, 0 outside `inside`; inputs already checked."""
    dtype = logprobs.dtype if logprobs.is_floating_point() else torch.get_default_dtype()
    with torch.no_grad():
        zero = torch.zeros((), dtype=dtype, device=logprobs.device)

        def valid(value: Tensor) -> Tensor:
            return torch.where(inside, value.detach().to(dtype), zero)

        p = valid(logprobs).exp().clamp(_PROB_EPS, 1.0 - _PROB_EPS)
        q = valid(old_logprobs).exp().clamp(_PROB_EPS, 1.0)
        metric = valid(advantages) / q * (p * (1 - p) * (p.log() + valid(entropy)))
        metric = torch.where(torch.isfinite(metric), metric, zero).abs()
        metric = torch.where(inside, metric, zero)
        weights = torch.zeros_like(metric)
        if inside.any():
            values = metric[inside]
            m_min, m_max = values.min(), values.max()
            if linear:
                if m_max > m_min:
                    w = w_max - (values - m_min) * ((w_max - w_min) / (m_max - m_min))
                else:
                    w = torch.full_like(values, (w_min + w_max) / 2)
                w = w.clamp(w_min, w_max)
            else:
                k = -math.log(w_min) / torch.clamp(m_max, min=_EXP_METRIC_FLOOR)
                w = torch.exp(-k * values).clamp(w_min, 1.0)
            weights[inside] = w
    return weights, metric


def steer_token_weights(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    entropy: Tensor,
    mask: Tensor,
    *,
    w_min: float = 0.8,
    w_max: float = 1.2,
    linear: bool = True,
) -> Tensor:
    """[B, T] STEER token weights (detached, dtype of `logprobs`, 0 outside the mask); see the module docstring.

    As upstream ``compute_token_weights``: `logprobs` are the *current* policy's (p), `old_logprobs` pi_old's,
    `entropy` the token entropies (upstream: the old policy's), m_min / m_max over the mask's tokens of this call.
    """
    _check_weight_range(w_min, w_max, linear)
    inside = check_token_inputs(
        {"logprobs": logprobs, "old_logprobs": old_logprobs, "advantages": advantages, "entropy": entropy}, mask
    )
    return _weights_and_metric(logprobs, old_logprobs, advantages, entropy, inside, w_min, w_max, linear)[0]


def steer_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    entropy: Tensor,
    mask: Tensor,
    *,
    w_min: float = 0.8,
    w_max: float = 1.2,
    linear: bool = True,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_ratio_c: float | None = 3.0,
    agg: str = "token-mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """STEER's policy loss (scalar) and statistics; see the module docstring for the formula.

    Args:
        logprobs: [B, T] log pi_theta of the sampled tokens (carries the gradient; also gives p for the weights).
        old_logprobs: [B, T] log pi_old of the sampled tokens.
        advantages: [B, T] advantages (upstream: GRPO's).
        entropy: [B, T] token entropies H (upstream passes the old policy's, from the old-log-prob pass).
        mask: [B, T] response mask (its values weight the aggregation, as in ``aggregate_loss``).
        w_min, w_max: ``token_weight_min`` / ``token_weight_max``; linear: the mapping (False: exponential).
        clip_low, clip_high: eps_low, eps_high (verl ``clip_ratio_low`` / ``clip_ratio_high``).
        clip_ratio_c: dual-clip c (None: off).
        agg: verl ``loss_agg_mode`` (token-mean upstream).

    Returns:
        The aggregated loss and a dict of detached statistics: scalars ``clipfrac`` (tokens where the clipped term
        wins), ``clipfrac_lower`` (dual-clipped tokens), ``ppo_kl`` (mean of log pi_old - log pi),
        ``weight_mean``, ``weight_min``, ``weight_max`` — over the mask's tokens, 0 for an empty mask — and
        per-token [B, T] tensors ``token_loss`` (weighted), ``weights`` and ``metric`` (|m|).
    """
    _check_weight_range(w_min, w_max, linear)
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low and clip_high must be >= 0; got {clip_low}, {clip_high}")
    if clip_ratio_c is not None and clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (verl's dual clip) or None; got {clip_ratio_c}")
    inside = check_token_inputs(
        {"logprobs": logprobs, "old_logprobs": old_logprobs, "advantages": advantages, "entropy": entropy}, mask
    )
    weights, metric = _weights_and_metric(logprobs, old_logprobs, advantages, entropy, inside, w_min, w_max, linear)
    dtype = weights.dtype
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)
    logprobs = torch.where(inside, logprobs.to(dtype), zero)
    old_logprobs = torch.where(inside, old_logprobs.to(dtype), zero)
    adv = torch.where(inside, advantages.to(dtype), zero)

    pg_loss, indicators = ppo_clip_loss(logprobs, old_logprobs, adv, clip_low, clip_high, clip_ratio_c)
    token_loss = torch.where(inside, pg_loss * weights, zero)
    loss = aggregate_loss(token_loss, mask, agg)

    with torch.no_grad():
        count = inside.sum().clamp(min=1).to(dtype)

        def mean(values: Tensor) -> Tensor:
            return torch.where(inside, values.to(dtype), zero).sum() / count

        any_valid = bool(inside.any())
        dual = indicators.get("dual_clipped", torch.zeros_like(pg_loss))
        stats = {
            "clipfrac": mean(indicators["clipped"]),
            "clipfrac_lower": mean(dual),
            "ppo_kl": mean(-_log_ratio(logprobs, old_logprobs)),
            "weight_mean": mean(weights),
            "weight_min": weights[inside].min() if any_valid else zero.clone(),
            "weight_max": weights[inside].max() if any_valid else zero.clone(),
            "token_loss": token_loss.detach(),
            "weights": weights,
            "metric": metric,
        }
    return loss, stats
