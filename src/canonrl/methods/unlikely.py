"""Unlikeliness reward: penalise correct-but-likely responses, then GRPO.

Formula (official code, ``AndreHe02/rewarding-unlikely-release``, ``ray_lean_trainer.py::_compute_advantages``):
within each prompt group of G valid responses, rank the responses by their mean per-token (old) log-prob, ascending,
rank_i in {0..G-1} (the least likely response has rank 0), and reshape the reward

    r~_i = r_i * (1 - beta * rank_i / G),        beta = 0.25 (Lean script ``lean.rank_penalty``)

then A_i = (r~_i - mean_g(r~)) / (std_g(r~) + eps), the GRPO z-score (unbiased std, eps 1e-6, as verl).

Paper: "Rewarding the Unlikely: Lifting GRPO Beyond Distribution Sharpening" (EMNLP 2025, arXiv 2506.02355).
Best reading: the code was verified, the paper's own equation was not (``verified = False``). A third-party
re-implementation uses (1 + beta * rank / G) with rank 0 = most likely: same direction, another scale.

Inputs: rewards, group, mask, ``logprobs`` [B, T] (per-token log-probs of the sampled tokens under the rollout/old
policy; the masked row mean is the ranking key; padding positions are ignored).

Ties (equal mean log-probs within a group): ``ties="average"`` (default) gives tied responses the mean of the ranks
they span, so they get the same reshaped reward and the result does not depend on the order of the rows;
``ties="batch_order"`` breaks ties by batch order (a stable sort: the earlier row gets the lower rank). The official
code's ``argsort(argsort(...))`` breaks ties in an unspecified order.

Conventions: with binary rewards only correct responses change; an all-incorrect (all-zero) group stays exactly 0,
but an all-correct group becomes non-uniform and gets non-zero advantages (by design). Fully masked rows get 0 and
are neither ranked nor counted in G. Singletons get 0 by default; ``singleton="raw"`` gives r / (1 + eps) (verl's
mean 0, std 1; rank 0, so r~ = r).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.groups import Grouping
from canonrl.methods._common import require_choice, require_range, singleton_param
from canonrl.methods._normalise import STD_CHOICES, group_normalised
from canonrl.registry import Paper, SequenceEstimator, param, register

UNLIKELY_PAPER = Paper("Rewarding the Unlikely: Lifting GRPO Beyond Distribution Sharpening", "2506.02355")
TIES = ("average", "batch_order")


def tie_averaged_rank(grouping: Grouping, key: Tensor) -> Tensor:
    """[B] float32 0-based within-group rank by ascending ``key``, tied rows sharing the mean of their ranks.

    Non-member rows get -1. Sorted by (group, key), tied rows are consecutive: each run of equal (group, key)
    gets the mean of the ranks it spans.
    """
    order = torch.sort(key, stable=True).indices
    order = order[torch.sort(grouping.bins[order], stable=True).indices]
    bins, keys = grouping.bins[order], key[order]
    new_run = torch.ones_like(bins, dtype=torch.bool)
    new_run[1:] = (bins[1:] != bins[:-1]) | (keys[1:] != keys[:-1])
    run = torch.cumsum(new_run, 0) - 1
    size = torch.bincount(run).to(torch.float32)
    lowest = grouping.rank(key)[order][new_run]  # the rank of each run's first row
    average = torch.empty_like(key, dtype=torch.float32)
    average[order] = lowest[run].to(torch.float32) + (size[run] - 1) / 2
    return torch.where(grouping.member, average, -1.0)


@register
class Unlikeliness(SequenceEstimator):
    name = "unlikely"
    description = "GRPO on r * (1 - beta * rank / G), rank by mean log-prob (0 = least likely) (best reading)"
    paper = UNLIKELY_PAPER
    requires = ("logprobs",)
    verified = False
    simulator_alignment = "z"
    works_in = "library, lab, verl (with the patch), TRL"

    @dataclass
    class Params:
        beta: float = param(0.25, "rank penalty beta_rank (Lean script 0.25)")
        ties: str = param("average", "equal mean log-probs: 'average' rank or 'batch_order' (stable sort)")
        eps: float = param(1e-6, "added to the group std (verl 1e-6)")
        std: str = param("unbiased", "'unbiased' (N-1, verl) or 'population' (N)")
        singleton: str = singleton_param()

        def __post_init__(self) -> None:
            require_range("beta", self.beta, 0.0)
            require_choice("ties", self.ties, TIES)
            require_range("eps", self.eps, 0.0)
            require_choice("std", self.std, STD_CHOICES)

    @property
    def z_score_bound(self) -> float | None:
        return 1.0

    def reshaped_rewards(self, batch: RolloutBatch) -> Tensor:
        """[B] r * (1 - beta * rank / G) (r itself for rows that are not valid)."""
        grouping = batch.grouping
        key = batch.masked_row_mean("logprobs")
        if self.params.ties == "average":
            rank = tie_averaged_rank(grouping, key)
        else:
            rank = grouping.rank(key).to(torch.float32)
        size = grouping.row_count.clamp_min(1)
        factor = torch.where(grouping.member, 1 - self.params.beta * rank / size, 1.0)
        return batch.rewards * factor

    def sequence_advantages(self, batch: RolloutBatch) -> Tensor:
        p = self.params
        rewards = self.reshaped_rewards(batch)
        return group_normalised(batch, rewards, eps=p.eps, std=p.std, scale="group", singleton=p.singleton)
