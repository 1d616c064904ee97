"""QAE: Quantile Advantage Estimation — the group K-quantile as the baseline (best reading).

Formula: A_i = (r_i - b_K) / (std_g(r) + eps), with b_K the K-quantile of the group's rewards. By default it is the
right-continuous empirical quantile b_K = inf{x : F(x) >= K} = x_(ceil(K n)), the ceil(K n)-th smallest of the
group's n valid rewards (the paper's definition as summarised by a secondary source). With binary rewards and p the
group's success rate, b_K = 0 if p <= 1 - K (hard prompts: only the rare successes get a non-zero, positive
advantage) and 1 otherwise (easy prompts: only the remaining failures get a non-zero, negative advantage).

Paper: "Quantile Advantage Estimation for Entropy-Safe Reasoning" (arXiv 2509.22611). Official code:
``junkangwu/QAE`` (a verl fork; only its README was examined), which sets the group "mean" to
``torch.quantile(scores, quantile_k)`` and keeps the std path.

Inputs: rewards, group, mask.

Hyperparameters:
- ``k`` (0.4): the quantile level K in (0, 1]. The README recommends 0.4 (with DAPO / clip-higher) and 0.6 if early
  entropy collapse appears. (The official code falls back to the mean for K outside (0, 1); use ``grpo`` for that.)
- ``quantile``: "paper" (default, the order statistic x_(ceil(K n))) or "linear" (the official code's
  ``torch.quantile``, which interpolates linearly between x_(floor(K (n-1))) and the next order statistic). They
  differ e.g. at G = 8, K = 0.4 with 3 failures: linear gives b = 0.8, the paper b = 1; at G = 16, K = 0.4 they agree.
- ``eps`` (1e-6) and ``std`` ("unbiased"): the std normalisation, kept from verl's GRPO (as the official code).

Verification: **best reading** — the formula with the std and the right-continuous quantile come from a secondary
summary of the paper; the code was seen only through its README (``verified = False``).

Conventions: an all-equal group gets exactly 0 (b_K is its value); fully masked rows get 0 and are not in the
quantile or the std; singletons get 0 by default, ``singleton="raw"`` gives verl's r / (1 + eps) (whether the
official code keeps verl's singleton branch is unverified).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.groups import Grouping
from canonrl.methods._common import finish, nonzero_or_one, require_choice, require_range, singleton_param
from canonrl.methods._normalise import STD_CHOICES
from canonrl.ops import ceil_fraction
from canonrl.registry import Paper, SequenceEstimator, param, register

QAE_PAPER = Paper("Quantile Advantage Estimation for Entropy-Safe Reasoning", "2509.22611")
QUANTILE_CHOICES = ("paper", "linear")


def order_statistic(grouping: Grouping, values: Tensor, ranks: Tensor, position: Tensor) -> Tensor:
    """[G] the value at 0-based ``position`` [G] (long) in each group's ascending order; 0 for empty groups."""
    picked = grouping.member & (ranks == grouping.gather(position.to(ranks.dtype)))
    return grouping.sum(torch.where(picked, values, 0.0))


def group_quantile(grouping: Grouping, values: Tensor, k: float, method: str) -> Tensor:
    """[G] per-group K-quantile of ``values`` over member rows: 'paper' (x_(ceil(K n))) or 'linear' (torch)."""
    ranks = grouping.rank(values)
    count = grouping.count
    if method == "paper":
        position = ceil_fraction(count, k).clamp_min(1) - 1
        return order_statistic(grouping, values, ranks, position.clamp_max(count.long() - 1).clamp_min(0))
    # torch.quantile(..., interpolation="linear"), operation for operation: ranks q (n - 1) in the input's dtype.
    rank = torch.tensor(k, dtype=values.dtype, device=values.device) * (count.to(values.dtype) - 1).clamp_min(0)
    below, above = torch.floor(rank), torch.ceil(rank)
    low = order_statistic(grouping, values, ranks, below.long())
    high = order_statistic(grouping, values, ranks, above.long())
    return torch.lerp(low, high, rank - below)


@register
class QAE(SequenceEstimator):
    name = "qae"
    description = "Best reading: (r - group K-quantile) / (group std + eps); K = 0.4, right-continuous quantile"
    paper = QAE_PAPER
    verified = False
    simulator_alignment = "z"

    @dataclass
    class Params:
        k: float = param(0.4, "quantile level K in (0, 1] (README: 0.4, or 0.6 against early entropy collapse)")
        quantile: str = param("paper", "'paper' (x_(ceil(K n)), right-continuous) or 'linear' (torch.quantile, code)")
        eps: float = param(1e-6, "added to the group std (verl)")
        std: str = param("unbiased", "'unbiased' (N-1, verl) or 'population' (N)")
        singleton: str = singleton_param()

        def __post_init__(self) -> None:
            require_range("k", self.k, 0.0, 1.0, low_open=True)
            require_choice("quantile", self.quantile, QUANTILE_CHOICES)
            require_range("eps", self.eps, 0.0)
            require_choice("std", self.std, STD_CHOICES)

    @property
    def z_score_bound(self) -> float | None:
        return 1.0

    def sequence_advantages(self, batch: RolloutBatch) -> Tensor:
        p = self.params
        grouping = batch.grouping
        rewards = batch.rewards
        baseline = grouping.gather(group_quantile(grouping, rewards, p.k, p.quantile))
        constant = grouping.gather(grouping.is_constant(rewards))
        deviation = torch.where(constant, 0.0, rewards - baseline)
        spread = nonzero_or_one(grouping.gather(grouping.variance(rewards, unbiased=p.std == "unbiased").sqrt()) + p.eps)
        return finish(batch, deviation / spread, singleton=p.singleton, raw=rewards / (1.0 + p.eps))
