"""ROSE: the advantage of a tree segment is the mean outcome of the responses through its end minus that through its
start (best reading of the official code).

Formula (from the official code): every response is cut into segments at the branch points on its path; V(k) = the
mean final reward of all responses of the prompt that contain the prefix ending at branch point k (the leaves below
node k), V(root) = the mean over the prompt's responses, and the segment [k0, k1) of a response gets

    A = V(k1) - V(k0)            (the last segment uses the response's own final reward as V(k1))

raw differences, no std normalisation, broadcast to the segment's tokens.

Paper: "Reinforced Efficient Reasoning via Semantically Diverse Exploration" (ROSE, arXiv 2601.05053). Official code:
ZiqiZhao1/ROSE-rl at 2142dc7, ``verl/trainer/ppo/core_algos.py::compute_grpo_iterative_branching_outcome_advantage``
(registered as ``grpo_iterative_branching``).

Inputs (row per response, the official layout): ``turn_ids`` cutting each row into its segments; per segment ``node``
(the prefix reached at the segment's end: a branch point, or the response's own end for its last segment) and
``parent`` (the prefix it starts from: the previous branch point, or the prompt's root). Ids are prefix identities,
unique over the batch; a shared prefix appears in every row that contains it, with the same ``node`` and ``parent``
ids. ``rewards`` [B] the final reward of each response; ``group`` and mask as usual. A row-per-step layout
(``traj``, ``step_index``) works the same way.

Edge cases:
- A segment whose ``parent`` is None or -1 starts from the prompt: its base is the mean reward of its group's
  responses (the official V(position 0)); or give each prompt's root an id of its own, which is the same.
- A response that never branches (one segment from the root) gets r - mean of the group, GRPO's centring; a
  group whose responses all have the same reward gets exactly 0 everywhere (means in float64 of float32 rewards).
- Every response's last segment must reach a leaf (a node no segment starts from): a response that ends exactly at
  a branch point is rejected, since its reward would not be one leaf below that point.
- A segment without mask tokens gets 0 (the official loop skips it the same way).

Differences from the official code (hence ``verified = False``; no parity test against the official function):
- The official code keys node values by token position within a prompt, so two different prefixes that branch at
  the same position are averaged together (steps.md §5.5); here nodes are prefix identities. The official keying is
  not reproducible through ``node``/``parent``: it would give a node two parents.
- The length-aware penalty (``length_penalty`` > 0: A <- A - |A| (1 - (remaining short / remaining long)^lambda)
  after the branch point shared with the prompt's shortest correct response) is not implemented; the official yaml
  and example script set ``length_penalty = 0``, which is what this estimator computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch, describe_row_indices
from canonrl.groups import Grouping
from canonrl.methods.spo_tree import leaf_rewards
from canonrl.registry import Paper, StepEstimator, register

ROSE_PAPER = Paper("Reinforced Efficient Reasoning via Semantically Diverse Exploration", "2601.05053")


def group_leaf_means(batch: RolloutBatch, leaf_values: Tensor) -> Tensor:
    """[G] float64 mean of the leaf values reached by each prompt group's steps (each leaf once)."""
    steps, nodes = batch.steps, batch.nodes
    node_group = torch.full((nodes.num_nodes,), -1, dtype=torch.long, device=steps.device)
    node_group = node_group.scatter_reduce(0, nodes.step_node, steps.group, reduce="amax")
    leaves = Grouping(node_group, nodes.is_leaf & (node_group >= 0), steps.num_groups)
    return leaves.mean(leaf_values.double())


@register
class ROSE(StepEstimator):
    name = "rose"
    description = "Tree segments: mean outcome of the responses through the segment's end minus through its start"
    paper = ROSE_PAPER
    requires = ("node", "parent")
    verified = False
    layouts = ("row-per-trajectory", "row-per-step")
    inputs_note = "`turn_ids` (segments between branch points), `node`, `parent` per segment"

    @dataclass
    class Params:
        pass

    def step_advantages(self, batch: RolloutBatch) -> Tensor:
        steps, nodes = batch.steps, batch.nodes
        ends_inside = steps.is_last & ~nodes.is_leaf[nodes.step_node]
        if ends_inside.any():
            rows = describe_row_indices(steps.occ_row[steps.first_occ[ends_inside]], steps.batch_size)
            raise ValueError(f"rose: a response's last segment must reach a leaf node (its own end) at rows {rows}")
        leaves = leaf_rewards(batch, "rose")
        values = nodes.mean_of_leaves(leaves)
        from_root = nodes.step_parent < 0
        start = torch.where(
            from_root, group_leaf_means(batch, leaves)[steps.group].float(), values[nodes.step_parent.clamp_min(0)]
        )
        return torch.where(steps.member, values[nodes.step_node] - start, 0.0)
