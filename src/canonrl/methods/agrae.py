"""A-GRAE: asymmetric group-relative advantage estimation, from the paper's equations.

Formula (paper eqs. 12-13), with z_i the GRPO z-score of response i, p the success rate of its group and
omega = the mean reward of the batch (the training-state proxy omega_s of the current step):

    A_i  = (omega / 2) z_i / sqrt(p) + ((1 - omega) / 2) z_i / sqrt(1 - p)     sample-level curriculum (eq. 12)
    A*_i = A_i min(1, omega / alpha)   if A_i > 0,   A_i otherwise              asymmetric suppression (eq. 13)

The first term focuses on hard prompts (small p), the second on easy ones; as the batch accuracy omega rises the
emphasis moves from easy to hard prompts, and positive advantages, suppressed early (exploration), recover. The
rescaling is skipped (A_i = z_i) when p is 0 or 1.

Paper: "Unveiling Implicit Advantage Symmetry: Why GRPO Struggles with Exploration and Difficulty Adaptation"
(arXiv 2602.05548).

Inputs: rewards in [0, 1] (binary in the paper), group, mask.

Hyperparameters:
- ``alpha`` in (0, 1] (default 1, the official code's comment for math; 0.5 for Geo3K / medical).
- ``eps`` (1e-6) and ``std`` ("unbiased") of the GRPO z-score (verl's, which the official code modifies).

p is the group's mean reward (its success rate for 0/1 rewards) and omega the mean reward over the batch's valid
responses; both need rewards in [0, 1], so a reward outside it on a valid row raises ``ValueError`` naming the rows.

Not the released code: ``Yu7-code/A-GRAE``'s ``compute_grpo_outcome_advantage`` differs from the paper — it uses
(1 - sqrt(mu)) instead of sqrt(1 - mu) in the easy term and omega = the mean of the group means, and its branch runs
only when ``grpo_weight == 2.0`` while ``ray_trainer.py`` anneals ``grpo_weight`` away from 2.0 from step 1, so
as released it trains plain GRPO. This implementation follows the paper's equations only.

Conventions: all-equal groups get exactly 0 (z = 0); fully masked rows get 0 and take part in no statistic (group or
omega); singletons get 0 by default (and do count in omega: their reward is part of the batch's accuracy);
``singleton="raw"`` gives verl's z = r / (1 + eps), with p in {0, 1} not rescaled unless 0 < r < 1. omega is a
batch statistic: a row's advantage depends on the other groups' rewards (through omega only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch, describe_rows
from canonrl.methods._common import require_choice, require_range, singleton_param
from canonrl.methods._normalise import STD_CHOICES, group_normalised
from canonrl.registry import Paper, SequenceEstimator, param, register

AGRAE_PAPER = Paper(
    "Unveiling Implicit Advantage Symmetry: Why GRPO Struggles with Exploration and Difficulty Adaptation",
    "2602.05548",
)


@register
class AGRAE(SequenceEstimator):
    name = "agrae"
    description = "Asymmetric GRAE: z x (w/2/sqrt(p) + (1-w)/2/sqrt(1-p)), w = batch accuracy; A > 0 x min(1, w/alpha)"
    paper = AGRAE_PAPER
    simulator_alignment = "z"

    @dataclass
    class Params:
        alpha: float = param(1.0, "positive advantages are scaled by min(1, omega / alpha); in (0, 1], 1 for math")
        eps: float = param(1e-6, "added to the group std of the z-score (verl)")
        std: str = param("unbiased", "z-score std: 'unbiased' (N-1, verl) or 'population' (N)")
        singleton: str = singleton_param()

        def __post_init__(self) -> None:
            require_range("alpha", self.alpha, 0.0, 1.0, low_open=True)
            require_range("eps", self.eps, 0.0)
            require_choice("std", self.std, STD_CHOICES)

    @property
    def batch_level_reason(self) -> str | None:
        return "omega is the batch's mean reward"

    @property
    def reward_range(self) -> tuple[float, float]:
        return (0.0, 1.0)  # p and omega are accuracies

    @property
    def z_score_bound(self) -> float | None:
        return 8.0  # the asymmetric weights w/2/sqrt(p) + (1-w)/2/sqrt(1-p)

    def sequence_advantages(self, batch: RolloutBatch) -> Tensor:
        p = self.params
        rewards, valid = batch.rewards, batch.valid
        outside = valid & ((rewards < 0) | (rewards > 1))
        if outside.any():
            raise ValueError(
                f"rewards must lie in [0, 1] for agrae (p and omega are accuracies), not at rows "
                f"{describe_rows(outside)}"
            )
        grouping = batch.grouping
        z = group_normalised(batch, rewards, eps=p.eps, std=p.std, scale="group", singleton=p.singleton)
        # float64 accumulation: p must be exactly 1 (or 0) only when every reward is, never by rounding.
        omega = (torch.where(valid, rewards, 0.0).double().sum() / valid.sum().clamp_min(1)).float()
        success = grouping.sum(rewards.double()) / grouping.count.double().clamp_min(1)
        success = grouping.gather(success)
        if p.singleton == "raw":
            success = torch.where(grouping.singleton, rewards.double(), success)
        inside = (success > 0) & (success < 1)
        hard = torch.rsqrt(torch.where(inside, success, 1.0))
        easy = torch.rsqrt(torch.where(inside, 1 - success, 1.0))
        scale = torch.where(inside, omega / 2 * hard + (1 - omega) / 2 * easy, 1.0).float()
        advantage = z * scale
        suppression = torch.clamp(omega / p.alpha, max=1.0)
        advantage = torch.where(advantage > 0, advantage * suppression, advantage)
        return torch.where(valid, advantage, 0.0)
