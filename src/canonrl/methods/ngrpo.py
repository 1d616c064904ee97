"""NGRPO: Negative-enhanced GRPO — virtual maximum-reward samples in the group statistics.

Formula: each group's statistics include k virtual responses with the maximum reward r_max (they get no advantage
themselves):

    mu'    = (sum_i r_i + k r_max) / (n + k)
    sigma' = std of the n + k values (unbiased by default, as the official code's ``torch.std``)
    A_i    = (r_i - mu') / (sigma' + eps)

broadcast to every response token. An all-incorrect group now gets a negative advantage (G = 8, binary rewards:
-1/3 each, where GRPO gives 0), and every group is pushed towards the maximum reward:

    | group (G = 8) | correct | incorrect |
    | all incorrect | -       | -0.333    |
    | 1/8 correct   | +1.764  | -0.504    |
    | 4/8 correct   | +0.843  | -1.054    |
    | 7/8 correct   | +0.333  | -2.667    |
    | all correct   | 0       | -         |

Paper: "NGRPO: Negative-enhanced Group Relative Policy Optimization" (arXiv 2509.18851). Official code:
``nangongrui-ngr/NGRPO``,
``verl/trainer/ppo/core_algos.py::compute_ngrpo_outcome_advantage``.

Inputs: rewards, group, mask.

Hyperparameters: ``max_reward`` r_max (1.0, the code's ``algorithm.max_reward``), ``num_max`` k (1, the code's
``algorithm.add_max_reward_num``; 0 is GRPO), ``eps`` (1e-6), ``std`` ("unbiased" as the code; "population").
r_max should be the largest reward the task can give: rewards above it are accepted (the formula stays defined)
but then the virtual sample is no longer the best response of its group.

The rest of NGRPO is in the loss and the sampler (not done here): asymmetric clipping with ``clip_ratio_low=0.16``
(the bound applied where A < 0) and ``clip_ratio_high=0.24`` (where A > 0), see :data:`NGRPO_CLIP_LOW` /
:data:`NGRPO_CLIP_HIGH`; and the official script's group filter (``filter_groups.strategy=all_correct``), which drops
all-correct groups (advantage 0) and keeps all-incorrect ones.

Conventions: a group whose rewards all equal r_max gets exactly 0 (sigma' = 0); other all-equal groups do *not* get 0
(that is the method; with k = 0 they do, as in GRPO). Fully masked rows get 0 and are not counted in n. Singletons:
0 by default (although the virtual samples would give them statistics); ``singleton="raw"`` follows verl's singleton
rule as the official code (mean 0, std 1: r / (1 + eps)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch
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

NGRPO_PAPER = Paper("NGRPO: Negative-enhanced Group Relative Policy Optimization", "2509.18851")
#: The official script's PPO clip bounds: eps_low where A < 0, eps_high where A > 0 (for the loss, not computed here).
NGRPO_CLIP_LOW = 0.16
NGRPO_CLIP_HIGH = 0.24


@register
class NGRPO(SequenceEstimator):
    name = "ngrpo"
    description = "GRPO with k virtual max-reward samples in the group mean/std (loss: clip 0.16 low, 0.24 high)"
    paper = NGRPO_PAPER
    simulator_alignment = "z"

    @dataclass
    class Params:
        max_reward: float = param(1.0, "r_max, the reward of the virtual samples (code: algorithm.max_reward)")
        num_max: int = param(1, "k, the number of virtual samples (code: algorithm.add_max_reward_num; 0 = GRPO)")
        eps: float = param(1e-6, "added to the std (official code 1e-6)")
        std: str = param("unbiased", "'unbiased' (N-1 over the n + k values, official code) or 'population'")
        singleton: str = singleton_param()

        def __post_init__(self) -> None:
            require_finite("max_reward", self.max_reward)
            if isinstance(self.num_max, bool) or int(self.num_max) != self.num_max or self.num_max < 0:
                raise ValueError(f"num_max must be an integer >= 0, got {self.num_max!r}")
            self.num_max = int(self.num_max)
            require_range("eps", self.eps, 0.0)
            require_choice("std", self.std, STD_CHOICES)

    @property
    def z_score_bound(self) -> float | None:
        return 1.0

    def sequence_advantages(self, batch: RolloutBatch) -> Tensor:
        p = self.params
        grouping = batch.grouping
        rewards = batch.rewards
        k, r_max = float(p.num_max), p.max_reward
        count = grouping.count
        total = count + k
        # Statistics relative to r_max (exact for the virtual samples, and shift-free for the real ones).
        offset = torch.where(grouping.member, rewards - r_max, 0.0)
        mean_offset = grouping.sum(offset) / total.clamp_min(1)  # mu' - r_max
        deviation = offset - grouping.gather(mean_offset)  # r_i - mu'
        squares = grouping.sum(torch.where(grouping.member, deviation * deviation, 0.0)) + k * mean_offset**2
        denominator = total - 1 if p.std == "unbiased" else total
        spread = (squares / denominator.clamp_min(1)).sqrt()
        # All n + k values equal (the group is all r_max, or constant with k = 0): exactly 0, as 0 / (0 + eps).
        constant = grouping.is_constant(rewards)
        if p.num_max > 0:
            constant = constant & (grouping.sum(offset.abs()) == 0)
        deviation = torch.where(grouping.gather(constant), 0.0, deviation)
        scale = nonzero_or_one(grouping.gather(spread) + p.eps)
        return finish(batch, deviation / scale, singleton=p.singleton, raw=rewards / (1.0 + p.eps))
