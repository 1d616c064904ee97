"""Segment reductions over prompt groups: the vectorized building blocks every group-relative estimator uses.

Rows are mapped to "bins": the row's group, or one extra trash bin for rows that take no part (fully masked rows,
or rows a caller excludes). Sums, means, variances, extremes and within-group ranks are scatter/segment operations
over those bins: no Python loop over groups or rows, the same code on CPU and CUDA, float32 statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

SINGLETON_POLICIES = ("zero", "raw")


@dataclass
class Grouping:
    """Group membership of B rows: ``index`` [B] in 0..num_groups-1 and ``member`` [B] (rows that count)."""

    index: Tensor
    member: Tensor
    num_groups: int

    @cached_property
    def bins(self) -> Tensor:
        """[B] long: the group of each member row, ``num_groups`` (the trash bin) for the others."""
        return torch.where(self.member, self.index, self.num_groups)

    def sum(self, values: Tensor) -> Tensor:
        """[G] per-group sum of [B] ``values`` over member rows."""
        out = torch.zeros(self.num_groups + 1, dtype=values.dtype, device=values.device)
        return out.index_add_(0, self.bins, values)[:-1]

    @cached_property
    def count(self) -> Tensor:
        """[G] float32 number of member rows per group."""
        return self.sum(torch.ones_like(self.index, dtype=torch.float32))

    @cached_property
    def row_count(self) -> Tensor:
        """[B] float32 size of each row's group (0 for non-member rows)."""
        return torch.where(self.member, self.count[self.index], 0.0)

    def mean(self, values: Tensor) -> Tensor:
        """[G] per-group mean over member rows (0 for empty groups)."""
        return self.sum(values) / self.count.clamp_min(1)

    def gather(self, per_group: Tensor) -> Tensor:
        """[B] the per-group value of each row's group (0 for non-member rows)."""
        padded = torch.cat([per_group, per_group.new_zeros(1)])
        return padded[self.bins]

    def centered(self, values: Tensor) -> Tensor:
        """[B] value minus its group mean; exactly 0 in groups whose values are all equal and in non-member rows."""
        centered = values - self.gather(self.mean(values))
        return torch.where(self.gather(self.is_constant(values)) | ~self.member, 0.0, centered)

    def variance(self, values: Tensor, *, unbiased: bool = True, centered: Tensor | None = None) -> Tensor:
        """[G] per-group variance (two-pass, float32); 0 for groups too small to have one. ``centered``: the
        caller's ``self.centered(values)``, when it has it already."""
        deviation = self.centered(values) if centered is None else centered
        denominator = (self.count - 1) if unbiased else self.count
        return self.sum(deviation * deviation) / denominator.clamp_min(1)

    def max(self, values: Tensor) -> Tensor:
        """[G] largest member value per group (-inf for a group without members); float ``values``."""
        return self._extreme(values, "amax", float("-inf"))

    def min(self, values: Tensor) -> Tensor:
        """[G] smallest member value per group (inf for a group without members); float ``values``."""
        return self._extreme(values, "amin", float("inf"))

    def _extreme(self, values: Tensor, reduce: str, empty: float) -> Tensor:
        out = torch.full((self.num_groups + 1,), empty, dtype=values.dtype, device=values.device)
        return out.scatter_reduce(0, self.bins.to(values.device), values, reduce=reduce, include_self=True)[:-1]

    def is_constant(self, values: Tensor) -> Tensor:
        """[G] bool: every member value of the group is the same (true for empty and singleton groups)."""
        return (self.max(values) <= self.min(values)) | (self.count <= 1)

    @cached_property
    def singleton(self) -> Tensor:
        """[B] bool: member rows that are alone in their group."""
        return self.member & (self.row_count == 1)

    def rank(self, key: Tensor) -> Tensor:
        """[B] long: 0-based rank of each member row within its group by ascending ``key``.

        Ties keep batch order (a stable sort), as Python's ``sorted`` does in the official CANON code.
        Non-member rows get rank -1.
        """
        order = torch.sort(key, stable=True).indices
        order = order[torch.sort(self.bins[order], stable=True).indices]
        group_start = torch.cumsum(self.count, 0) - self.count
        ranks = torch.empty_like(self.bins)
        position = torch.arange(order.numel(), device=order.device)
        ranks[order] = position - torch.cat([group_start, group_start.new_zeros(1)]).long()[self.bins[order]]
        return torch.where(self.member, ranks, -1)


def check_singleton_policy(value: str) -> str:
    if value not in SINGLETON_POLICIES:
        raise ValueError(f"singleton must be one of {list(SINGLETON_POLICIES)}, got {value!r}")
    return value
