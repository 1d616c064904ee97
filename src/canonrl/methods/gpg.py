"""GPG: Group Policy Gradient, the group-centred reward rescaled by the fraction of informative responses.

Formula (official code, ``AMAP-ML/GPG``, ``open-r1/src/open_r1/gpg_trainer.py``):

    A_i = alpha * (r_i - mean_g(r))            [ / (std_g(r) + 1e-4) with ``scale_std=True`` ]
    alpha = 1 / max(B_valid / B, min_inverse_alpha)

B = the valid responses of the batch, B_valid = those in groups whose rewards are not all equal (sigma_g > 0). The
official loss is divided by inverse_alpha = min(1, B_valid / B), i.e. multiplied by alpha = B / B_valid; its trainer
keeps sampling extra mini-batches until B_valid >= min_inverse_alpha * B, so inverse_alpha never falls below
``min_inverse_alpha`` (0.5 by default, ``configs.py``). An estimator sees only the final batch and cannot re-sample,
so it caps alpha at 1 / min_inverse_alpha instead (best reading of the guarantee; ``min_inverse_alpha=0`` removes the
cap). The official code counts groups of its fixed group size; with unequal groups this counts responses.

``alpha="verl"``: verl's port (``compute_gpg_outcome_advantage``) uses alpha = B / max(1, #non-zero rewards), which
counts non-zero rewards rather than responses in informative groups (it differs from the official definition).
``alpha="none"``: alpha = 1 (plain Dr.GRPO-style centring).

Paper: "GPG: A Simple and Strong Reinforcement Learning Baseline for Model Reasoning" (arXiv 2504.02546).

Inputs: rewards, group, mask.

Loss pairing: GPG is a plain REINFORCE loss, loss = -sum_tokens log pi(y_t) * A_i / #tokens, with no ratio, no
clipping, no KL and no reference model (verl: ``actor.policy_loss.loss_mode=gpg``). The official recipes run both
without std scaling (``scale_rewards False``, the default here) and with it.

Conventions: all-equal groups get exactly 0 (and lower B_valid, raising alpha); fully masked rows get 0 and are not
counted in B or B_valid; singletons get 0 by default (not counted in B_valid), ``singleton="raw"`` gives alpha * r
(verl's mean 0, std 1). alpha is a batch statistic: a row's advantage depends on the other groups through alpha.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.methods._common import finish, require_choice, require_range, singleton_param
from canonrl.methods._normalise import group_normalised
from canonrl.registry import Paper, SequenceEstimator, param, register

GPG_PAPER = Paper("GPG: A Simple and Strong Reinforcement Learning Baseline for Model Reasoning", "2504.02546")
ALPHA_CHOICES = ("official", "verl", "none")


@register
class GPG(SequenceEstimator):
    name = "gpg"
    description = "alpha * (r - group mean), alpha = B / B_valid (capped at 1/min_inverse_alpha); REINFORCE loss"
    paper = GPG_PAPER
    works_in = "library, lab, verl (as `canonrl_gpg`), TRL"

    @dataclass
    class Params:
        alpha: str = param("official", "'official' B/B_valid, 'verl' B/#non-zero rewards, or 'none' (alpha = 1)")
        min_inverse_alpha: float = param(0.5, "official: B_valid/B is taken as at least this (alpha <= 1/this)")
        scale_std: bool = param(False, "divide by the group std + eps (official scale_rewards; recipes use False)")
        eps: float = param(1e-4, "added to the group std when scale_std (TRL/official 1e-4)")
        singleton: str = singleton_param()

        def __post_init__(self) -> None:
            require_choice("alpha", self.alpha, ALPHA_CHOICES)
            require_range("min_inverse_alpha", self.min_inverse_alpha, 0.0, 1.0)
            require_range("eps", self.eps, 0.0)

    @property
    def batch_level_reason(self) -> str | None:
        if self.params.alpha != "none":
            return "alpha counts the informative rows (or non-zero rewards) of the batch"
        return None

    @property
    def z_score_bound(self) -> float | None:
        return 1.0 if self.params.scale_std else None

    def alpha(self, batch: RolloutBatch) -> Tensor:
        """The scalar (0-d float32 tensor) alpha of this batch."""
        p = self.params
        valid = batch.valid
        count = valid.sum().to(torch.float32)
        if p.alpha == "none":
            return torch.ones((), device=batch.device)
        if p.alpha == "verl":
            nonzero = ((batch.rewards != 0) & valid).sum().to(torch.float32)
            return count / nonzero.clamp_min(1)
        grouping = batch.grouping
        informative = ~grouping.gather(grouping.is_constant(batch.rewards)) & valid
        inverse = informative.sum().to(torch.float32) / count.clamp_min(1)
        inverse = inverse.clamp(max=1.0)
        if p.min_inverse_alpha > 0:
            inverse = inverse.clamp_min(p.min_inverse_alpha)
        # No informative response: every advantage is 0 whatever alpha is; take 1 rather than divide by 0.
        return torch.where(inverse > 0, 1.0 / inverse.clamp_min(1e-30), 1.0)

    def sequence_advantages(self, batch: RolloutBatch) -> Tensor:
        p = self.params
        scale = "group" if p.scale_std else "none"
        centered = group_normalised(batch, batch.rewards, eps=p.eps, std="unbiased", scale=scale, singleton="zero")
        alpha = self.alpha(batch)
        return finish(batch, alpha * centered, singleton=p.singleton, raw=alpha * batch.rewards)
