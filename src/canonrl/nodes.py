"""The node table: rollout trees over the steps of a batch (SPO-tree's edges, ROSE's and ARPO's branches).

Every step reaches a ``node`` from its ``parent`` (per-step ids: ints or hashables; a root's parent is None or −1).
Nodes are identified by these ids — by prefix, not by token position (steps.md §5.5) — across the whole batch, so an
id names one node however many rows carry it. A node that is no step's ``node`` but some step's ``parent`` is a
root (SPO-tree's tree root). Built once per batch, vectorized: pointer jumping for depths and ancestors, scatters for
the reductions over children; the only loops run over the depth of the deepest tree.

- ``value_from_children(leaf_values)``: V(leaf) given, V(node) = mean of its children's values, recursively
  (SPO-tree);
- ``mean_of_leaves(leaf_values)`` / ``leaf_sums``: the mean (sum and count) over the leaves below each node (ROSE,
  AttnRL, T-SPMO's prefix statistics);
- ``children_std(values)``: the population std of each node's children.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import Tensor

from canonrl.batch import dense_codes, describe_row_indices, encode_groups
from canonrl.steps import StepTable, per_occurrence


@dataclass
class NodeTable:
    """N nodes. ``parent`` [N] long (−1 for a root), ``step_node`` / ``step_parent`` [S] (−1: a step from a root
    given as None/−1)."""

    parent: Tensor
    step_node: Tensor
    step_parent: Tensor

    @property
    def num_nodes(self) -> int:
        return int(self.parent.shape[0])

    @cached_property
    def depth(self) -> Tensor:
        """[N] long: 0 for a root, its parent's depth + 1 otherwise."""
        return _depths(self.parent)

    @cached_property
    def max_depth(self) -> int:
        return int(self.depth.max().item()) if self.num_nodes else 0

    @cached_property
    def children(self) -> Tensor:
        """[N] float32 number of children of each node."""
        count = torch.zeros(self.num_nodes + 1, device=self.parent.device)
        return count.index_add_(0, _slot(self.parent, self.num_nodes), torch.ones_like(count[:-1]))[:-1]

    @cached_property
    def is_leaf(self) -> Tensor:
        return self.children == 0

    def _mean_over_children(self, values: Tensor) -> Tensor:
        sums = torch.zeros(self.num_nodes + 1, dtype=values.dtype, device=values.device)
        sums = sums.index_add_(0, _slot(self.parent, self.num_nodes), values)[:-1]
        return sums / self.children.to(values.dtype).clamp_min(1)

    def value_from_children(self, leaf_values: Tensor) -> Tensor:
        """[N] V(leaf) = ``leaf_values`` at leaves; V(node) = mean of its children's V, from the deepest level up."""
        values = torch.where(self.is_leaf, leaf_values.double(), 0.0)
        for level in range(self.max_depth - 1, -1, -1):
            update = (self.depth == level) & ~self.is_leaf
            values = torch.where(update, self._mean_over_children(values), values)
        return values.float()

    def leaf_sums(self, leaf_values: Tensor) -> tuple[Tensor, Tensor]:
        """([N] float64 sum of ``leaf_values`` over the leaves below each node, [N] float64 number of those
        leaves); a leaf counts itself."""
        leaf = self.is_leaf
        sums = torch.where(leaf, leaf_values.double(), 0.0)
        counts = leaf.double()
        total_sum, total_count = sums.clone(), counts.clone()
        ancestor = self.parent.clone()
        for _ in range(self.max_depth):
            has = ancestor >= 0
            total_sum.index_add_(0, ancestor[has], sums[has])
            total_count.index_add_(0, ancestor[has], counts[has])
            ancestor = torch.where(has, self.parent[ancestor.clamp_min(0)], -1)
        return total_sum, total_count

    def mean_of_leaves(self, leaf_values: Tensor) -> Tensor:
        """[N] the mean of ``leaf_values`` over the leaves below each node (a leaf: its own value)."""
        total_sum, total_count = self.leaf_sums(leaf_values)
        return (total_sum / total_count.clamp_min(1)).float()

    def children_std(self, values: Tensor) -> Tensor:
        """[N] the population std of the values of each node's children (0 for a leaf)."""
        values = values.double()
        mean = self._mean_over_children(values)
        parent_mean = torch.cat([mean, mean.new_zeros(1)])[_slot(self.parent, self.num_nodes)]
        deviation = torch.where(self.parent >= 0, values - parent_mean, 0.0)
        return self._mean_over_children(deviation * deviation).sqrt().float()


def _slot(parent: Tensor, num_nodes: int) -> Tensor:
    """Parent index with roots sent to the extra slot ``num_nodes``."""
    return torch.where(parent >= 0, parent, num_nodes)


def _depths(parent: Tensor) -> Tensor:
    """[N] depth by pointer jumping (log2 N rounds); raises when a chain never reaches a root (a cycle)."""
    n = parent.shape[0]
    jump, depth = parent.clone(), (parent >= 0).long()
    for _ in range(max(1, n).bit_length() + 1):
        has = jump >= 0
        if not has.any():
            return depth
        depth = torch.where(has, depth + depth[jump.clamp_min(0)], depth)
        jump = torch.where(has, jump[jump.clamp_min(0)], -1)
    raise ValueError("node/parent: the tree has a cycle (a node is its own ancestor)")


def build_node_table(steps: StepTable, node: Any, parent: Any) -> NodeTable:
    """The node table of per-step ``node`` and ``parent`` ids; errors name the field and the rows."""
    step_node, step_parent, num_nodes = _node_codes(_ids(steps, "node", node), _ids(steps, "parent", parent), steps)
    parent_of = torch.full((num_nodes,), -2, dtype=torch.long, device=steps.device)
    parent_of = parent_of.scatter_reduce(0, step_node, step_parent, reduce="amax")
    lowest = torch.full((num_nodes,), num_nodes, dtype=torch.long, device=steps.device)
    lowest = lowest.scatter_reduce(0, step_node, step_parent, reduce="amin")
    conflict = (parent_of[step_node] != lowest[step_node]) | (step_parent == step_node)
    if conflict.any():
        rows = describe_row_indices(steps.occ_row[steps.first_occ[conflict]], steps.batch_size)
        raise ValueError(f"node/parent: a node has two parents (or is its own) at rows {rows}")
    table = NodeTable(parent=torch.where(parent_of == -2, -1, parent_of), step_node=step_node, step_parent=step_parent)
    _ = table.depth  # a cycle raises here, once
    return table


def _node_codes(nodes: Tensor | np.ndarray, parents: Tensor | np.ndarray, steps: StepTable) -> tuple[Tensor, Tensor, int]:
    """[S] node codes, [S] parent codes (−1 for a root) and the number of nodes: integer ids stay on the device
    (no sort for ids of small span), other hashables go through numpy."""
    if isinstance(nodes, Tensor) and isinstance(parents, Tensor):
        from_root = parents == -1
        everything = torch.cat([nodes, parents[~from_root]])
        codes, num_nodes = dense_codes(everything) if everything.numel() else (everything, 0)
    else:
        nodes, parents = _objects(nodes), _objects(parents)
        from_root = torch.from_numpy(np.equal(parents, None) | np.equal(parents, -1)).to(steps.device)
        everything = np.concatenate([nodes, parents[~from_root.cpu().numpy()]])
        codes, num_nodes = encode_groups(everything, len(everything), steps.device)
    step_node = codes[: len(nodes)]
    step_parent = torch.full_like(step_node, -1)
    step_parent[~from_root] = codes[len(nodes):]
    return step_node, step_parent, num_nodes


def _objects(ids: Tensor | np.ndarray) -> np.ndarray:
    return np.array(ids.tolist(), dtype=object) if isinstance(ids, Tensor) else ids


def _ids(steps: StepTable, name: str, value: Any) -> Tensor | np.ndarray:
    """[S] per-step ids of ``name`` in step order: a long tensor for an int tensor, else an object array (a None
    stays None)."""
    if isinstance(value, Tensor):
        if value.dtype.is_floating_point or value.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer or hashable ids, got dtype {value.dtype}")
        return per_occurrence(steps, name, value.long())[steps.first_occ]
    if isinstance(value, list) and value and all(isinstance(row, list) for row in value):
        value = [v for row in value for v in row]  # per-row lists, flattened in (row, step) order
    ids = np.fromiter(value, dtype=object, count=len(value))  # tuples stay whole ids
    which = per_occurrence(steps, name, torch.arange(len(ids)))[steps.first_occ]
    return ids[which.cpu().numpy()]
