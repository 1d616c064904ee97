"""AttnRL: TreeRL-style tree advantages (global + local, scaled by 1/sqrt(#leaves)) on attention-branched trees.

Formula (from the official code): V(node) = the mean reward of the leaves in the node's subtree (a leaf: its own
reward), V(root) = the mean over all the leaves of the prompt's tree, n(node) = the number of leaves in the subtree.
For every segment node on a root -> leaf path:

    global(node) = V(node) - V(root)        (r_leaf - V(root) at a leaf, where V(leaf) = r_leaf)
    local(node)  = V(node) - V(parent)      (V(parent) = V(root) for a node hanging from the root)
    A(node)      = (global(node) + local(node)) / sqrt(n(node))

broadcast to the node's tokens; each root -> leaf path is one training row, so a shared prefix appears in several
rows and the 1/sqrt(n) compensates. A path of one segment (a root response that was never branched) is not trained
(``drop_unbranched=True``, the official behaviour); with ``drop_unbranched=False`` it is a leaf under the root and
gets 2 (r - V(root)).

Paper: "Attention as a Compass: Efficient Exploration for Process-Supervised RL in Reasoning Models" (AttnRL, arXiv
2509.26628). Official code: RyanLiu112/AttnRL at 378c38e, ``recipe/attnrl/attnrl_core_algos.py``
(``leaf_normalize``, ``leaf_backpropagate``, ``path_from_root_to_node`` L287-353; used by ``build_trees``, where
paths with ``len(path) == 1`` are skipped). The branching itself (which steps to re-roll from: the steps with the
largest "FCI" attention score, one attention-extraction forward per response, and how many responses to branch by
prompt difficulty) is a rollout concern: this estimator reads the resulting tree only, so it needs no model pass.

Inputs (row per root -> leaf path, as ROSE): ``turn_ids`` cutting each row into its segments; per segment ``node``
(the prefix reached at the segment's end: a branch point, or the path's leaf for its last segment) and ``parent``
(the prefix it starts from: the previous branch point, or the prompt's root). Ids are prefix identities, unique
over the batch; a shared prefix carries the same ``node``/``parent`` in every row that contains it. ``rewards`` [B]
the final reward of each path (read at its leaf); ``group`` the prompt. A row-per-step layout (``traj``,
``step_index``) works the same way.

Edge cases:
- The prompt's root: a segment whose ``parent`` is None or -1, or an id that no segment reaches (an explicit root
  id), starts from the root. All the roots of one group are the prompt's one root: V(root) is the mean over the
  group's leaves (each leaf once), computed in float64.
- Unbranched paths still count as leaves in V(root) and in n(root) (the official tree holds them); only their own
  training row is dropped. The estimator cannot drop rows: it gives them advantage 0, and the trainer must drop
  them from the loss mask too (the official code removes them from the batch, so they leave the token-mean
  denominator). :func:`keep_rows` gives that [B] keep mask; no selection function in
  :mod:`canonrl.training.selection` computes it.
- A single-node tree (one leaf under the root) gives 0: V(root) = r (dropped anyway by default). A chain (every
  node with one child) gives 0 everywhere. A group whose leaves all carry the same reward gives exactly 0.
- Every path's last segment must reach a leaf (a node no segment starts from); otherwise ValueError naming the
  rows. Rows reaching one leaf must carry the same reward (ValueError naming the rows). A segment without mask tokens
  gets 0 but its leaf still counts.

Differences from the official code:
- The official ``leaf_normalize`` asserts that a prompt's tree has at least two leaves; here a one-leaf tree gives 0.
- The official code is only ever fed 0/1 accuracies; any finite reward works here.
- ``fill_in_paths`` (replacing a zero local advantage by the previous node's) exists in the official file but is not
  called in the training path (``build_trees``), so it is not implemented.
- ``filter_zero_std_adv_to_train`` and the dropping of solved prompts whose attention is below the running mean
  (``not_gather``) are prompt selection, not part of this estimator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch, describe_row_indices, make_batch
from canonrl.methods.rose import group_leaf_means
from canonrl.methods.spo_tree import leaf_rewards
from canonrl.nodes import NodeTable
from canonrl.registry import TREE_WORKS_IN, Paper, StepEstimator, param, register

ATTNRL_PAPER = Paper(
    "Attention as a Compass: Efficient Exploration for Process-Supervised RL in Reasoning Models", "2509.26628"
)


def from_root(nodes: NodeTable) -> Tensor:
    """[S] bool: steps that start from the prompt's root (parent None/-1, or an id that no step reaches)."""
    reached = torch.zeros(nodes.num_nodes, dtype=torch.bool, device=nodes.parent.device)
    reached[nodes.step_node] = True
    explicit_root = (nodes.parent < 0) & ~reached
    return (nodes.step_parent < 0) | (explicit_root[nodes.step_parent.clamp_min(0)] & (nodes.step_parent >= 0))


def unbranched_steps(batch: RolloutBatch) -> Tensor:
    """[S] bool: steps that are a whole root -> leaf path on their own (a root response that was never branched)."""
    nodes = batch.nodes
    return from_root(nodes) & nodes.is_leaf[nodes.step_node]


def keep_rows(batch: RolloutBatch | None = None, /, **fields: Any) -> Tensor:
    """[B] bool: False for the rows AttnRL does not train on with ``drop_unbranched=True`` (rows holding an
    unbranched root -> leaf path), True otherwise; multiply it into the loss mask as the official code drops them."""
    batch = make_batch(**fields) if batch is None else batch
    steps = batch.steps
    dropped = unbranched_steps(batch)[steps.occ_step]
    flags = torch.zeros(steps.batch_size, dtype=torch.bool, device=steps.device)
    flags[steps.occ_row[dropped]] = True
    return ~flags


@register
class AttnRL(StepEstimator):
    name = "attnrl"
    works_in = TREE_WORKS_IN
    description = "Tree paths: (V(node) - V(root) + V(node) - V(parent)) / sqrt(#leaves below), leaf-mean values"
    paper = ATTNRL_PAPER
    requires = ("node", "parent")
    layouts = ("row-per-trajectory", "row-per-step")
    inputs_note = (
        "`turn_ids` (segments between branch points), `node`, `parent` per segment; one row per root-to-leaf path"
    )
    producer = None  # the attention (FCI) branching happens at rollout time; the advantage reads the tree only

    @dataclass
    class Params:
        drop_unbranched: bool = param(
            True, "a path of one segment (never branched) gets 0, as upstream skips it (drop its row from the loss)"
        )

        def __post_init__(self) -> None:
            if not isinstance(self.drop_unbranched, bool):
                raise ValueError(f"drop_unbranched must be a bool, got {self.drop_unbranched!r}")

    def step_advantages(self, batch: RolloutBatch) -> Tensor:
        steps, nodes = batch.steps, batch.nodes
        ends_inside = steps.is_last & ~nodes.is_leaf[nodes.step_node]
        if ends_inside.any():
            rows = describe_row_indices(steps.occ_row[steps.first_occ[ends_inside]], steps.batch_size)
            raise ValueError(f"attnrl: a path's last segment must reach a leaf node (its own end) at rows {rows}")
        leaves = leaf_rewards(batch, "attnrl")
        sums, counts = nodes.leaf_sums(leaves)
        values = sums / counts.clamp_min(1)
        root_value = group_leaf_means(batch, leaves)[steps.group]
        starts_at_root = from_root(nodes)
        value = values[nodes.step_node]
        parent_value = torch.where(starts_at_root, root_value, values[nodes.step_parent.clamp_min(0)])
        advantage = ((value - root_value) + (value - parent_value)) / counts[nodes.step_node].sqrt()
        keep = steps.member
        if self.params.drop_unbranched:
            keep = keep & ~(starts_at_root & nodes.is_leaf[nodes.step_node])
        return torch.where(keep, advantage, 0.0).float()
