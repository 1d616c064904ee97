"""ArenaRL: a tournament's ranking of each prompt group turned into z-scored rewards (the rank -> reward map).

Formula, within prompt group g of N valid responses:
- ``topology="anchor"`` (the official default): ``metric`` is each response's score from the pairwise judge (the
  anchor response's is its pooled score, the mean of its scores against the others), higher is better;
  rank_i = 1 + #{j in g: s_j > s_i} (pandas ``rank(method="min", ascending=False)``: ties share the smallest
  rank), M = max rank, g_i = (M - rank_i) / (M - 1), all 0 when M = 1 (every score tied);
- ``topology="ranks"``: ``metric`` is each response's 0-based final rank (0 = best) from a tournament
  (single or double elimination), g_i = 1 - rank_i / (N - 1);
then r_i = (g_i - mean_g g) / (std_g g + eps) with the unbiased std. ``grpo_after`` (default, as the official
pipeline runs) z-scores r once more, as the downstream GRPO does: r_i / (std_g r + eps) (r already has mean 0);
it changes r by a factor of about 1 + 2 eps / std.

Paper: "ArenaRL: Scaling RL for Open-Ended Agents via Tournament-based Relative Ranking" (arXiv 2601.06487).
Official code (token-level.md B6): Alibaba-NLP/qqr at 8653a9abd77549459eafedfbece638df4460faf5,
``qqr/reward_models/arena/anchor.py`` L18–57 (the anchor map; the default ``group_reward_model_name = "anchor"`` of
``qqr/examples/*/config.py``), ``qqr/reward_models/arena/single_elimination.py`` L158–188 (final ranking and
``1 - rank / (N - 1)``; ``double_elimination.py`` L188–203 the same); ``round_robin.py`` L43–55 is the anchor map
over each response's number of wins. The GRPO pass is slime's group normalisation under
``--advantage-estimator grpo --group-rm`` (``scripts/*/run-*.sh``): mean, unbiased std + 1e-6.

Inputs: ``metric`` [B] (scores, or ranks), ``group``, ``mask``; ``rewards`` is not read (the judge's tournament is
the reward: run it before the call, e.g. in the lab, and pass its outcome as ``metric``).

Conventions and differences from the official code:
- Fully masked rows take no part (N counts the valid rows) and get 0; a group of one valid response gets 0 (the
  official z-score divides 0 by a NaN std; single elimination divides by N - 1 = 0).
- Ties are exact equality of the float32 scores.
- ``"ranks"`` takes any value in [0, N - 1], so that tied players given their mean rank get the mean of their
  rewards, which is how ``swiss.py`` L115–151 rewards ties (g is linear in the rank); values outside raise.
- The statistics are computed exactly: g_i = u_i / d with integer u_i and d for integer ranks, and
  r_i = (n u_i - sum u) / (n d (std + eps)) from float64 sums, so every row of a group gets its value
  independently of the batch order, and the second z-score uses that r has mean exactly 0 (the official float32
  passes leave about 1e-7 of noise). Constant groups give exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch, describe_rows
from canonrl.groups import Grouping
from canonrl.methods._common import require_choice, require_range
from canonrl.registry import Paper, SequenceEstimator, param, register

ARENARL_PAPER = Paper(
    "ArenaRL: Scaling RL for Open-Ended Agents via Tournament-based Relative Ranking", "2601.06487"
)
TOPOLOGIES = ("anchor", "ranks")


def min_rank_descending(grouping: Grouping, scores: Tensor) -> Tensor:
    """[B] long: the number of member rows of the row's group with a strictly higher score (pandas' min rank,
    descending, minus 1); -1 for non-member rows."""
    bins = grouping.bins
    order = torch.sort(-scores, stable=True).indices
    order = order[torch.sort(bins[order], stable=True).indices]  # by group, then by descending score
    sorted_bins, sorted_scores = bins[order], scores[order]
    index = torch.arange(order.numel(), device=order.device)
    new_group = torch.ones_like(sorted_bins, dtype=torch.bool)
    new_group[1:] = sorted_bins[1:] != sorted_bins[:-1]
    new_value = new_group.clone()
    new_value[1:] |= sorted_scores[1:] != sorted_scores[:-1]
    group_start = torch.cummax(torch.where(new_group, index, 0), 0).values
    value_start = torch.cummax(torch.where(new_value, index, 0), 0).values
    higher = torch.empty_like(order)
    higher[order] = value_start - group_start
    return torch.where(grouping.member, higher, -1)


@register
class ArenaRL(SequenceEstimator):
    name = "arenarl"
    description = "Tournament ranking within the group -> linear rank reward, z-scored (open-ended agents, LLM judge)"
    paper = ARENARL_PAPER
    requires = ("metric",)
    works_in = (
        "library, lab (an environment's judge: task=grid), verl (with the patch: batch key `canonrl_metric`), TRL: no"
    )
    inputs_note = "`metric` (the comparator's score or rank)"
    producer = "comparison scores: an LLM judge's tournament over the group's responses"

    @dataclass
    class Params:
        topology: str = param("anchor", "'anchor': metric = judge scores (min rank); 'ranks': metric = 0-based ranks")
        grpo_after: bool = param(True, "z-score again as the downstream GRPO does (the official pipeline)")
        eps: float = param(1e-6, "added to the std in both z-scores")

        def __post_init__(self) -> None:
            require_choice("topology", self.topology, TOPOLOGIES)
            if not isinstance(self.grpo_after, bool):
                raise ValueError(f"grpo_after must be True or False, got {self.grpo_after!r}")
            require_range("eps", self.eps, 0.0)

    def sequence_advantages(self, batch: RolloutBatch) -> Tensor:
        p, grouping = self.params, batch.grouping
        metric = batch.metric.double()
        size = grouping.count.double()
        if p.topology == "anchor":
            higher = min_rank_descending(grouping, batch.metric).double()
            spread = grouping.max(higher).clamp_min(0)  # M - 1 (0 for a group without members)
            points = grouping.gather(spread) - higher  # M - rank
        else:
            spread = size - 1  # N - 1
            bad = grouping.member & ((metric < 0) | (metric > grouping.gather(spread)))
            if bad.any():
                raise ValueError(
                    f"metric must hold 0-based ranks in [0, N - 1] (N valid responses in the group) with "
                    f"topology='ranks', not at rows {describe_rows(bad)}"
                )
            points = grouping.gather(spread) - metric  # N - 1 - rank
        points = torch.where(grouping.member, points, 0.0)
        # g = points / spread; n g_i - sum g = (n points_i - sum points) / spread
        deviation = grouping.gather(size) * points - grouping.gather(grouping.sum(points))
        deviation = torch.where(grouping.gather(grouping.is_constant(points)) | ~grouping.member, 0.0, deviation)
        scale = size * spread.clamp_min(1)  # n d
        std = (grouping.sum(deviation * deviation) / (size - 1).clamp_min(1)).sqrt() / scale.clamp_min(1)
        reward = deviation / (grouping.gather(scale.clamp_min(1)) * grouping.gather(std + p.eps))
        if p.grpo_after:
            reward = reward / grouping.gather(std / (std + p.eps) + p.eps)
        keep = grouping.member & grouping.gather((spread > 0) & (size > 1))
        return torch.where(keep, reward, 0.0).float()
