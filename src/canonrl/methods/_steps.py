"""Pieces the step estimators share: group-relative scores over steps, the numerics choice, turn rewards read at
each turn's last token.

``numerics="exact"`` (canonrl's convention, steps.md §5.1): a group whose values are all equal gets exactly 0, and
statistics are two-pass. ``numerics="upstream"``: float32 statistics without that guard, as ``torch.mean`` and
``torch.std`` in the official loops, so that the official code's spurious advantages in constant groups (a mean
that is off by one ulp, divided by std + eps) show up too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.groups import Grouping
from canonrl.registry import param

NUMERICS = ("exact", "upstream")


def numerics_param():
    return param("exact", "'exact': constant groups give exactly 0; 'upstream': the official float32 statistics")


def group_relative(
    grouping: Grouping,
    values: Tensor,
    *,
    scale: str,
    eps: float,
    numerics: str,
    singleton: Tensor | float = 0.0,
    order: Tensor | None = None,
) -> Tensor:
    """[S] (x - group mean), divided by (group std + eps) unless ``scale="none"``; ``singleton`` where a member is
    alone in its group; 0 for non-members.

    ``order`` ([S] long, default: index order) is the order in which the official code lists a group's members (its
    batch order); only ``numerics="upstream"`` reads it, to sum in that order.
    """
    index = grouping.index
    if numerics == "upstream":
        mean, std = upstream_mean_std(grouping, values, unbiased=scale == "unbiased", order=order)
        centered = values - mean[index]
    else:
        centered = grouping.centered(values)
        if scale != "none":
            std = grouping.variance(values, unbiased=scale == "unbiased", centered=centered).sqrt()
    if scale != "none":
        centered = centered / (std[index] + eps)
    out = torch.where(grouping.singleton, singleton, centered)
    return torch.where(grouping.member, out, 0.0)


def upstream_mean_std(
    grouping: Grouping, values: Tensor, *, unbiased: bool, order: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """[G] float32 ``torch.mean`` and ``torch.std`` of each group's member values listed in ``order``, as the
    official loops compute them on one small tensor per group.

    The means of all groups of one size n come from one [g, n] row reduction, which runs the same kernel as the
    official 1-D call (a loop over distinct sizes). The 1-D ``torch.std`` differs in its last bits from every
    batched form (``var_mean``, row reductions give an exact 0 on constant groups where it does not), so the
    stds are taken one group at a time: this parity path loops over groups as the official code does and is never
    the default.
    """
    mean = torch.zeros(grouping.num_groups, dtype=torch.float32, device=values.device)
    std = torch.zeros_like(mean)
    position = torch.arange(values.shape[0], device=values.device) if order is None else order
    members = grouping.member.nonzero().flatten()
    by_group = members[torch.sort(position[members], stable=True).indices]
    by_group = by_group[torch.sort(grouping.index[by_group], stable=True).indices]
    counts = grouping.count.long()
    starts = torch.cumsum(counts, 0) - counts
    for size in torch.unique(counts[counts > 0]).tolist():
        groups = (counts == size).nonzero().flatten()
        matrix = values.float()[by_group[starts[groups][:, None] + torch.arange(size, device=values.device)]]
        mean[groups] = matrix.mean(1)
        if size > 1:
            std[groups] = torch.stack([torch.std(row, unbiased=unbiased) for row in matrix])
    return mean, std


def turn_end_columns(steps) -> Tensor:
    """[O] long: the column of each occurrence's last mask token (its last token if it has none). One row-wise
    scatter over the tokens, no loop."""
    B, T = steps.mask.shape
    column = torch.arange(T, device=steps.device).expand(B, T)
    key = column + T * (steps.mask > 0).long()  # mask tokens rank above the others
    if steps.token_column is None:  # one occurrence per row, covering the whole row
        best = key.amax(-1)[steps.occ_row] if T else torch.full_like(steps.occ_row, -1)
    else:
        best_by_column = torch.full((B, steps.width), -1, dtype=torch.long, device=steps.device)
        best_by_column = best_by_column.scatter_reduce(1, steps.token_column, key, reduce="amax")
        best = best_by_column[steps.occ_row, steps.occ_column]
    return best.clamp_min(0) % max(T, 1)


def turn_rewards(batch: RolloutBatch, steps, estimator: str) -> Tensor:
    """[S] float32 reward of each step: ``step_rewards`` if given, else the token reward on the step's last mask
    token (its last token if it has none)."""
    if batch.step_rewards is not None:
        return steps.per_step("step_rewards", batch.step_rewards)
    if batch.token_rewards is None:
        raise ValueError(
            f"estimator {estimator!r} needs turn rewards: token_rewards (each turn's reward on its last token) "
            f"or step_rewards (one per turn); neither was given"
        )
    end = turn_end_columns(steps)
    return batch.token_rewards.float()[steps.occ_row, end][steps.first_occ]


def float32_returns(steps, rewards: Tensor, gamma: float) -> Tensor:
    """[S] the official float32 recursion G_t = r_t + gamma * G_{t+1}, one turn position at a time over all
    trajectories (``numerics="upstream"`` only: its rounding is part of the official constant-group noise; a loop over
    the positions of the longest trajectory, never over rows or steps)."""
    rewards = rewards.float()
    returns = rewards.clone()
    for position in range(steps.max_length - 2, -1, -1):
        at = ((steps.pos == position) & ~steps.is_last).nonzero().flatten()
        returns[at] = rewards[at] + gamma * returns[at + 1]
    return returns
