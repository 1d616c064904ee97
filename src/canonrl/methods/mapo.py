"""MAPO: Mixed Advantage Policy Optimization — z-score and percent deviation mixed by the group's certainty.

Formula (paper eq. 6; the official code agrees):

    p       = N / n,  N = #{i : r_i = 1} the exact successes among the group's n valid responses
    lambda  = 1 - 4 p (1 - p)                      in [0, 1]: 0 at p = 1/2, 1 at p in {0, 1}
    A_i     = (1 - lambda) (r_i - mu) / (sigma + eps)  +  lambda (r_i - mu) / (mu + eps)

The second term is the "advantage percent deviation" (APD): high-certainty groups (p near 0 or 1) lean on it,
uncertain ones on the GRPO z-score. Binary rewards, G = 8, unbiased std: p = 1/8 gives +5.02 / -0.717, p = 1/2 is
GRPO (+-0.935), p = 7/8 gives +0.235 / -1.645. (The paper's Fig. 3 swaps lambda and 1 - lambda; eq. 6 and the code
agree and are followed here.)

Paper: "MAPO: Mixed Advantage Policy Optimization" (arXiv 2509.18849). Official code: ``WenkeHuang/MAPO``
(``GRPOMIXPRO`` in ``code/verl/trainer/ray_trainer.py``).

Inputs: rewards (>= 0; binary 0/1 in the paper), group, mask.

Hyperparameters (the method has none of its own):
- ``std``: "population" (default; the paper's algorithm box) or "unbiased" (the official code's ``torch.std``).
- ``eps`` (1e-6): added to sigma and to mu (paper and code).
- ``success_reward`` (1.0): the reward value that counts as a success in p (the paper's r_i = 1).

Reward sign: the APD term assumes rewards >= 0 (so mu >= 0, and mu = 0 only when every reward is 0). Negative
rewards (e.g. DAPO's -1/+1) would make mu <= 0 and the APD term explode or flip sign, so a negative reward on a valid
row raises ``ValueError`` naming the rows; map -1/+1 rewards to 0/1 first. With continuous rewards that never equal
``success_reward`` exactly, p = 0, lambda = 1 and the advantage is pure APD.

Conventions: an all-equal group gets exactly 0 (both terms; an all-zero group has APD 0 / eps = 0); the advantage
sums to 0 within each group (both terms are group-wide multiples of r - mu). Fully masked rows get 0 and take no part
(their rewards are not checked). Singletons (the official code asserts G > 1): 0 by default; ``singleton="raw"``
keeps the reward r (no baseline, unit scale).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from canonrl.batch import RolloutBatch, describe_rows
from canonrl.methods._common import (
    finish,
    nonzero_or_one,
    require_choice,
    require_finite,
    require_range,
    singleton_param,
)
from canonrl.methods._normalise import STD_CHOICES
from canonrl.registry import Paper, SequenceEstimator, param, register

MAPO_PAPER = Paper("MAPO: Mixed Advantage Policy Optimization", "2509.18849")


def certainty_weight(success_rate: Tensor) -> Tensor:
    """lambda(p) = 1 - 4 p (1 - p): 1 for certain groups (p in {0, 1}), 0 for p = 1/2."""
    return 1 - 4 * success_rate * (1 - success_rate)


@register
class MAPO(SequenceEstimator):
    name = "mapo"
    description = "Mix of z-score and percent deviation (r - mu)/(mu + eps), weight 1 - 4p(1-p); rewards >= 0"
    paper = MAPO_PAPER

    @dataclass
    class Params:
        std: str = param("population", "'population' (N, the paper's algorithm) or 'unbiased' (N-1, official code)")
        eps: float = param(1e-6, "added to the group std and to the group mean (paper and code)")
        success_reward: float = param(1.0, "reward value counted as a success in p = N / n (paper: r = 1)")
        singleton: str = singleton_param()

        def __post_init__(self) -> None:
            require_choice("std", self.std, STD_CHOICES)
            require_range("eps", self.eps, 0.0)
            require_finite("success_reward", self.success_reward)

    @property
    def reward_range(self) -> tuple[float, float]:
        return (0.0, float("inf"))  # the percent deviation divides by the group mean

    @property
    def z_score_bound(self) -> float | None:
        return 2.0  # a mix of the z-score and the percent deviation

    def sequence_advantages(self, batch: RolloutBatch) -> Tensor:
        p = self.params
        grouping = batch.grouping
        rewards = batch.rewards
        negative = batch.valid & (rewards < 0)
        if negative.any():
            raise ValueError(
                f"rewards must be >= 0 for mapo (its percent deviation divides by the group mean), negative at rows "
                f"{describe_rows(negative)}; map -1/+1 rewards to 0/1"
            )
        centered = grouping.centered(rewards)
        mean = grouping.mean(rewards)
        std = grouping.variance(rewards, unbiased=p.std == "unbiased").sqrt()
        success_rate = grouping.sum((rewards == p.success_reward).float()) / grouping.count.clamp_min(1)
        mixing = certainty_weight(success_rate)
        # Both denominators are > 0 unless eps = 0 on a constant (std) or all-zero (mean) group, where r - mu = 0.
        factor = (1 - mixing) / nonzero_or_one(std + p.eps) + mixing / nonzero_or_one(mean + p.eps)
        return finish(batch, centered * grouping.gather(factor), singleton=p.singleton, raw=rewards)
