"""HAPO's loss side: asymmetric adaptive clipping and differential advantage redistribution with the current ratio.

Paper: "HAPO: Heterogeneous Adaptive Policy Optimization" (arXiv 2507.21848 per the official README badge, whose
link is a placeholder: the id is not verified). Official code: ``starriver030515/HAPO``, commit
``7671dde3e268779a949954ec75ed3edda45f7e0a`` (the file was last changed in ``32164f0``, the commit
:mod:`canonrl.methods.hapo` cites), ``verl/trainer/ppo/core_algos.py``: ``ada_clip`` (lines 131-144),
``ada_advantage`` (147-156), ``compute_policy_loss`` (727-821), ``agg_loss`` (691-724), ``compute_entropy_h``
(86-128). :func:`hapo_policy_loss` follows ``compute_policy_loss`` with ``adaptive_clip`` / ``adaptive_advantage``.

Formula, per token t with normalised entropy h^_t (h^ > 0: high entropy), advantage A_t and
ratio r_t = exp(log pi_theta - log pi_old)::

    (c) eps_low'_t  = eps_low (1 - alpha h^_t)   if h^_t <= 0, else eps_low
        eps_high'_t = eps_high (1 + alpha h^_t)  if h^_t > 0,  else eps_high
    (d) A_ent = A (1 + beta h^);   zone_t = 1 - eps_low'_t / 2 < r_t < 1 + eps_high'_t / 2   (strict, r detached)
        A'_t = A_t if zone_t else A_ent_t    for h^_t > 0
        A'_t = A_ent_t if zone_t else A_t    for h^_t <= 0
    loss_t = max(-A' r, -A' clip(r, 1 - eps_low', 1 + eps_high'))
             and, where A' < 0, min(that, -A' c)                       (verl's dual clip, c = clip_ratio_c)
    loss   = token-mean of loss_t over the mask (or another verl ``loss_agg_mode``)

eps', the zone and A' are computed under ``no_grad`` (as upstream): the gradient flows only through r, never
through the switch. ``adaptive_clip=False`` keeps eps_low / eps_high; ``adaptive_advantage=False`` keeps A.

Which advantages to pass: the token-level group average *before* any redistribution — upstream feeds
``compute_hapo_outcome_advantage``'s output, which has none. canonrl's ``hapo`` estimator by default already
applies the redistribution at ratio 1, so pass ``canonrl.advantages("hapo", ..., redistribute=False)`` (or
``beta=0``) here; otherwise low-entropy tokens get (1 + beta h^) twice. Conversely, at ratio 1 (the first
mini-batch of an on-policy update) this loss with the group average equals plain PPO-clip with the estimator's
redistributed advantages.

Which h^ to pass: upstream recomputes h^ inside the loss, per micro-batch, from the *current* policy's token
entropies (``compute_entropy_h`` with ``entropy_pivot``; 0.8 in the yaml). :func:`hapo_entropy_hat` does that from
[B, T] tensors by calling the estimator's own :func:`canonrl.methods.hapo.entropy_h_hat` (``h_hat="signed"``:
h^ in [-1, 1], as the method describes; ``"upstream"``: the released ``1 / min(h < 0)`` scaling that makes every
h^ >= 0, so every token is "high entropy" — use it to reproduce the released code's numbers).

Edge cases:
- Entries outside the mask may hold anything (NaN, Inf); they get loss 0 and take part in no statistic. NaN or Inf
  inside the mask raises a ValueError naming the rows.
- h^ = 0 everywhere with alpha = beta = 0, or alpha = 0 and h^ = 0: plain dual-clip PPO (``ppo_clip_loss``).
- With eps_low' = 0 (or eps_high' = 0) the neutral zone is empty: every token is "outside".
- h^ is not checked to lie in [-1, 1]; eps' never shrinks for alpha >= 0, but beta h^ < -1 would flip a low-entropy
  token's advantage sign (and then the dual clip applies by the sign of A', as upstream).
- A fully masked batch gives loss 0 and statistics 0.

Differences from the official code:
- log(r) is clamped to [-20, 20] before exp (canonrl's ``ppo_clip_loss`` convention, as newer verl); upstream
  does not clamp. Equal wherever |log r| <= 20.
- Aggregation is canonrl's :func:`~canonrl.training.losses.aggregate_loss`: token-mean divides by max(mask sum, 1)
  where upstream's ``masked_mean`` divides by mask sum + 1e-8 (a relative difference of about 1e-8 / N);
  ``seq-mean-*`` modes leave fully masked rows out of the response count (upstream counts them).
- Upstream computes h^ inside the loss; here it is an input (see :func:`hapo_entropy_hat`).
- alpha, beta >= 0 are required here (upstream does not check); ``clip_ratio_c=None`` turns the dual clip off
  (upstream always applies it and asserts c > 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from canonrl.batch import make_batch
from canonrl.methods.hapo import entropy_h_hat
from canonrl.training.losses import _log_ratio, aggregate_loss, check_token_inputs, ppo_clip_loss


def hapo_entropy_hat(entropy: Tensor, mask: Tensor, entropy_pivot: float = 0.8, h_hat: str = "signed") -> Tensor:
    """[B, T] float64 HAPO's normalised entropy h^ of per-token entropies (0 outside the mask).

    The same function the ``hapo`` estimator uses (:func:`canonrl.methods.hapo.entropy_h_hat`); upstream's loss calls
    it on each micro-batch with the current policy's entropies (``compute_entropy_h``). NaN or Inf entropy inside
    the mask raises, naming the rows.
    """
    if h_hat not in ("signed", "upstream"):
        raise ValueError(f"h_hat must be 'signed' or 'upstream'; got {h_hat!r}")
    if not 0.0 <= entropy_pivot <= 1.0:
        raise ValueError(f"entropy_pivot must be in [0, 1]; got {entropy_pivot}")
    rows = mask.shape[0] if mask.dim() >= 1 else 0
    batch = make_batch(rewards=torch.zeros(rows), group=list(range(rows)), mask=mask, entropy=entropy)
    return entropy_h_hat(batch, entropy_pivot, h_hat)




def hapo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    entropy_hat: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    alpha: float = 1.0,
    beta: float = 1.0,
    clip_ratio_c: float | None = 3.0,
    adaptive_clip: bool = True,
    adaptive_advantage: bool = True,
    agg: str = "token-mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """HAPO's policy loss (scalar) and statistics; see the module docstring for the formula.

    Args:
        logprobs: [B, T] log pi_theta of the sampled tokens (carries the gradient).
        old_logprobs: [B, T] log pi_old of the sampled tokens.
        advantages: [B, T] group-average advantages *before* redistribution
            (``canonrl.advantages("hapo", ..., redistribute=False)``).
        entropy_hat: [B, T] normalised entropy h^ (e.g. :func:`hapo_entropy_hat` of the current policy's entropy).
        mask: [B, T] response mask (its values weight the aggregation, as in ``aggregate_loss``).
        clip_low, clip_high: eps_low, eps_high (verl ``clip_ratio_low`` / ``clip_ratio_high``).
        alpha: ``clip_alpha``; beta: ``adv_beta``; clip_ratio_c: dual-clip c (None: off).
        adaptive_clip, adaptive_advantage: HAPO's switches (both True in the yaml).
        agg: verl ``loss_agg_mode`` (token-mean upstream).

    Returns:
        The aggregated loss and a dict of detached statistics: scalars ``clipfrac`` (tokens where the clipped term
        wins), ``clipfrac_lower`` (dual-clipped tokens, A' < 0), ``ppo_kl`` (mean of log pi_old - log pi),
        ``eps_low_mean``, ``eps_high_mean``, ``neutral_frac`` (tokens inside the neutral zone),
        ``high_entropy_frac`` (h^ > 0), ``redistributed_frac`` (tokens given A_ent) — all means over the mask's
        tokens — and per-token [B, T] tensors ``token_loss``, ``advantages`` (A'), ``eps_low``, ``eps_high``,
        ``in_zone``.
    """
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low and clip_high must be >= 0; got {clip_low}, {clip_high}")
    if alpha < 0 or beta < 0:
        raise ValueError(f"alpha and beta must be >= 0; got {alpha}, {beta}")
    if clip_ratio_c is not None and clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (verl's dual clip) or None; got {clip_ratio_c}")
    inside = check_token_inputs(
        {
            "logprobs": logprobs,
            "old_logprobs": old_logprobs,
            "advantages": advantages,
            "entropy_hat": entropy_hat,
        },
        mask,
    )
    dtype = logprobs.dtype
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)
    logprobs = torch.where(inside, logprobs, zero)
    old_logprobs = torch.where(inside, old_logprobs.to(dtype), zero)
    log_ratio = _log_ratio(logprobs, old_logprobs)
    ratio = torch.exp(log_ratio)

    with torch.no_grad():
        h = torch.where(inside, entropy_hat.to(dtype), zero)
        high = h > 0
        eps_low = torch.full_like(h, clip_low)
        eps_high = torch.full_like(h, clip_high)
        if adaptive_clip:  # ada_clip
            eps_low = torch.where(high, eps_low, eps_low * (1 - h * alpha))
            eps_high = torch.where(high, eps_high * (1 + h * alpha), eps_high)
        in_zone = (ratio > 1.0 - eps_low / 2) & (ratio < 1.0 + eps_high / 2)

    adv = torch.where(inside, advantages.to(dtype), zero)
    uses_ent = torch.zeros_like(inside)
    if adaptive_advantage:  # ada_advantage
        with torch.no_grad():
            adv_ent = adv * (1 + beta * h)
            uses_ent = torch.where(high, ~in_zone, in_zone)
            adv = torch.where(uses_ent, adv_ent, adv)

    token_loss, indicators = ppo_clip_loss(logprobs, old_logprobs, adv, eps_low, eps_high, clip_ratio_c)
    clipped = indicators["clipped"]
    dual = indicators.get("dual_clipped", torch.zeros_like(clipped))
    token_loss = torch.where(inside, token_loss, zero)
    loss = aggregate_loss(token_loss, mask, agg)

    with torch.no_grad():
        count = inside.sum().clamp(min=1).to(dtype)

        def mean(values: Tensor) -> Tensor:
            return torch.where(inside, values.to(dtype), zero).sum() / count

        stats = {
            "clipfrac": mean(clipped),
            "clipfrac_lower": mean(dual),
            "ppo_kl": mean(-log_ratio),
            "eps_low_mean": mean(eps_low),
            "eps_high_mean": mean(eps_high),
            "neutral_frac": mean(in_zone),
            "high_entropy_frac": mean(high),
            "redistributed_frac": mean(uses_ent),
            "token_loss": token_loss.detach(),
            "advantages": adv.detach(),
            "eps_low": eps_low,
            "eps_high": eps_high,
            "in_zone": in_zone & inside,
        }
    return loss, stats
