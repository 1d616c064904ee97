"""HAPO: token-level group average with entropy-differential advantage redistribution.

Formula (the advantage part of HAPO; the official code computes it in ``compute_hapo_outcome_advantage`` and
``ada_advantage``):

    mu_g, sigma_g = mean and population std of r over all response tokens of group g (r_i counted L_i times, so
                    longer responses weigh more)
    A_i     = (r_i - mu_g) / (sigma_g + eps)              (``scale=False``: r_i - mu_g)
    fallback: if |A_i| >= 5 for some response of the group, the whole group uses GRPO instead,
              (r_i - mean_g r) / (std_g r + eps) with the unbiased std over responses
    h_t     = log(max(H_t, 1e-8)) - Q_pivot,  Q_pivot the ``entropy_pivot`` quantile ("nearest") of the log-entropies
              of all mask tokens of the batch; h_t /= sqrt(max(mean over the batch's mask of h^2, 1e-8))
    h^_t    = h_t / max(h > 0) for h_t > 0,  h_t / |min(h < 0)| otherwise     ->  h^ in [-1, 1]
    A_t     = A_i                    for high-entropy tokens (h^_t > 0)
    A_t     = A_i (1 + beta h^_t)    for low-entropy tokens (h^_t <= 0)

The last two lines are ``ada_advantage`` at ratio pi_theta / pi_old = 1, which is what an advantage estimator sees:
the policy that sampled the batch is the one being updated, and ratio 1 lies inside the "neutral zone"
1 - eps_low'/2 < ratio < 1 + eps_high'/2. The official loss re-evaluates the switch at every mini-batch with the
current ratio (outside the zone high-entropy tokens get A (1 + beta h^) and low-entropy tokens A); that, and
HAPO's asymmetric adaptive clipping (eps_low' = eps_low (1 - alpha h^) for h^ <= 0, eps_high' = eps_high
(1 + alpha h^) for h^ > 0) are the loss's: :func:`canonrl.training.hapo_loss.hapo_policy_loss` (give it this
estimator's advantages with ``redistribute=False``); the adaptive sampling temperature is a rollout option.

Paper: "HAPO: Heterogeneous Adaptive Policy Optimization" (arXiv 2507.21848 per the official README badge, whose
link is a placeholder: the id is not verified). Official code: ``starriver030515/HAPO``
(``verl/trainer/ppo/core_algos.py``).

Inputs: rewards, group, mask, entropy [B, T] (the policy's per-token entropy; HAPO uses the current policy's, equal
to the sampler's at ratio 1). ``redistribute=False``, ``beta=0`` or ``h_hat="upstream"`` read no entropy.

Conventions:
- A group whose rewards are all equal gets exactly 0 (also for tokens, since A_t is a multiple of A_i); singletons
  get 0 (a one-response group is constant over its tokens).
- Fully masked rows get 0 and take part in no statistic; mask values weight tokens in mu_g and sigma_g.
- h^ is a batch statistic (the quantile and the RMS run over the whole batch), so with redistribution the
  advantages of a group depend on the other groups' entropies (as upstream, where they depend on the micro-batch).
- entropy may hold anything outside the mask; NaN or Inf inside it raises, naming the rows.

Differences from the official code, offered as options where they change numbers:
- ``h_hat="upstream"``: the released code (stored copy, commit 32164f0) scales negative h by ``1 / min(h < 0)``,
  a negative number, so h^ >= 0 everywhere and every token counts as "high entropy": at ratio 1 the redistribution
  does nothing (so this option reads no entropy and equals ``redistribute=False``; :func:`entropy_h_hat` gives
  upstream's h^ itself). ``h_hat="signed"`` (default) divides by ``|min(h < 0)|`` as the method describes
  (h^ in [-1, 1]).
- Upstream tests the fallback over the whole padded rows, where padding holds (0 - mu_g) / (sigma_g + eps), so
  padding alone can trigger it; here only response tokens count (not offered as an option: it depends on the width
  of the padding).
- Upstream's GRPO fallback gives a singleton r / (1 + eps); a singleton never reaches the fallback here.
- The quantile index is ``round(q (N - 1))`` with Python's round-half-to-even, as upstream's ``torch_quantile``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.methods._common import require_choice, require_range
from canonrl.methods._normalise import group_normalised
from canonrl.methods.progrpo import masked_token_values
from canonrl.registry import Estimator, Paper, param, register

HAPO_PAPER = Paper("HAPO: Heterogeneous Adaptive Policy Optimization", "2507.21848")
H_HAT_CHOICES = ("signed", "upstream")
LOG_FLOOR = 1e-8
VARIANCE_FLOOR = 1e-8


def entropy_h_hat(batch: RolloutBatch, pivot: float, h_hat: str = "signed") -> Tensor:
    """[B, T] float64 HAPO's normalised entropy h^ at mask positions (0 elsewhere), from the batch's ``entropy``."""
    inside = batch.mask != 0
    log_entropy = torch.log(masked_token_values(batch, "entropy").double().clamp_min(LOG_FLOOR))
    values = log_entropy[inside]
    if values.numel() == 0:
        return torch.zeros(batch.mask.shape, dtype=torch.float64, device=batch.device)
    index = round(pivot * (values.numel() - 1))  # "nearest", Python rounding as upstream
    quantile = torch.kthvalue(values, index + 1).values
    h = torch.where(inside, log_entropy - quantile, 0.0)
    rms = ((h * h).sum() / inside.sum()).clamp_min(VARIANCE_FLOOR).sqrt()
    h = h / rms
    positive_max = torch.where(inside & (h > 0), h, 0.0).max().clamp_min(LOG_FLOOR)
    negative_min = torch.where(inside & (h < 0), h, 0.0).min().clamp_max(-LOG_FLOOR)
    negative_scale = 1.0 / negative_min if h_hat == "upstream" else 1.0 / negative_min.abs()
    scaled = torch.where(h > 0, h / positive_max, h * negative_scale)
    return torch.where(inside, scaled, 0.0)


@register
class HAPO(Estimator):
    name = "hapo"
    description = "Token-level group average (length-weighted z-score) with entropy-differential redistribution"
    paper = HAPO_PAPER
    level = "token"
    requires = ("entropy",)
    verified = False
    simulator_alignment = "z"
    works_in = "library, lab, verl (with the patch), TRL"
    inputs_note = "`entropy` (unless `redistribute=False`)"

    @dataclass
    class Params:
        eps: float = param(1e-6, "added to the token-level std (and the fallback's std), as upstream")
        scale: bool = param(True, "divide by the token-level std (upstream norm_adv_by_std_in_grpo)")
        fallback_threshold: float = param(5.0, "a group with some |A_i| >= this uses GRPO (hard-coded 5 upstream)")
        redistribute: bool = param(True, "entropy-differential redistribution at ratio 1 (False: group average only)")
        beta: float = param(1.0, "adv_beta: low-entropy tokens get A (1 + beta h^)")
        entropy_pivot: float = param(0.8, "quantile of the batch's log-entropies that centres h (yaml 0.8)")
        h_hat: str = param("signed", "'signed': h^ in [-1, 1]; 'upstream': the released 1/min scaling, h^ >= 0")

        def __post_init__(self) -> None:
            require_range("eps", self.eps, 0.0)
            require_range("fallback_threshold", self.fallback_threshold, 0.0, low_open=True)
            require_range("beta", self.beta, 0.0)
            require_range("entropy_pivot", self.entropy_pivot, 0.0, 1.0)
            require_choice("h_hat", self.h_hat, H_HAT_CHOICES)

    @property
    def _redistributes(self) -> bool:
        # upstream's h^ >= 0 makes every token "high entropy": at ratio 1 nothing is redistributed
        return self.params.redistribute and self.params.beta > 0 and self.params.h_hat == "signed"

    def required_inputs(self) -> tuple[str, ...]:
        return self.requires if self._redistributes else ()

    @property
    def batch_level_reason(self) -> str | None:
        if self._redistributes:
            return "normalises the entropy by a quantile and an RMS over all tokens of the batch"
        return None

    def group_average(self, batch: RolloutBatch) -> Tensor:
        """[B] float32 per-response advantage of the token-level group average (with the GRPO fallback)."""
        p = self.params
        grouping = batch.grouping
        rewards = batch.rewards.double()
        weight = torch.where(batch.valid, batch.mask.double().sum(-1), 0.0)
        tokens = grouping.sum(weight).clamp_min(torch.finfo(torch.float64).tiny)
        mean = grouping.sum(weight * rewards) / tokens
        deviation = rewards - grouping.gather(mean)
        variance = grouping.sum(weight * deviation * deviation) / tokens
        advantage = deviation / (grouping.gather(variance.sqrt()) + p.eps) if p.scale else deviation
        constant = grouping.gather(grouping.is_constant(batch.rewards)) | ~batch.valid
        advantage = torch.where(constant, 0.0, advantage)
        too_large = grouping.max(torch.where(batch.valid, advantage.abs(), 0.0)) >= p.fallback_threshold
        if too_large.any():
            scale = "group" if p.scale else "none"
            grpo = group_normalised(batch, batch.rewards, eps=p.eps, std="unbiased", scale=scale, singleton="zero")
            advantage = torch.where(grouping.gather(too_large) & batch.valid, grpo.double(), advantage)
        return advantage.float()

    def compute(self, batch: RolloutBatch) -> Tensor:
        p = self.params
        advantage = batch.broadcast(self.group_average(batch))
        if not self._redistributes:
            return advantage
        h_hat = entropy_h_hat(batch, p.entropy_pivot, p.h_hat)
        factor = torch.where(h_hat > 0, 1.0, 1.0 + p.beta * h_hat)
        return (advantage.double() * factor).float()
