"""SPO-tree: the advantage of a rollout-tree edge is its child's Monte Carlo value minus its parent's.

Formula (from the official code): V(leaf) = the leaf's outcome reward; V(node) = the mean of its children's values,
recursively (every child counts once, whatever the size of its subtree). For the edge (step) parent -> child:

    A = V(child) - V(parent)                                       (mode="rloo", the official default)
    A = (V(child) - V(parent)) / (std_children(parent) + eps)      (mode="grpo", population std, eps = 1e-8)

Paper: "Segment Policy Optimization: Effective Segment-Level Credit Assignment in RL for Large Language Models"
(SPO, arXiv 2505.23564). Official code: AIFrameResearch/SPO at b9fc6a2,
``src/treetune/episode_generators/tree_episode_generator.py`` (``extract_edges_from_tree``, ``adv_method``) and
``src/treetune/inference_strategies/hybrid_inference_strategy.py`` (``_construct_tree``). Parity: the official
code transcribed in tests/official_spo.py, checked in tests/test_spo_parity.py.

Inputs (row per edge, the official layout): ``node`` the node each row's segment reaches and ``parent`` the node it
starts from (per-step ids: str, int or hashables, unique over the batch; a depth-1 edge's parent is the tree's root,
which is no row's ``node``); ``rewards`` [B] read at the leaves (nodes that are no row's parent) and ignored on inner
edges; ``group`` and mask as usual. Any step table works (``turn_ids`` segments of a row-per-trajectory batch too):
a step's node and parent are what count.

Edge cases:
- A single edge from the root: V(root) = V(leaf), so A = 0; a chain gives 0 on every edge.
- A step whose ``parent`` is None or -1 reaches a root: it has no parent value and gets 0 (give the tree's root an
  id of its own instead, as the official layout does).
- A parent whose children all have the same value gets exactly 0 on those edges (values are means in float64 of
  float32 leaves, exact for equal leaves; ``grpo`` then divides 0 by eps).
- A node reached by several rows (a repeated edge) is one node; at a leaf, its rows must carry equal rewards.
- A step without mask tokens still defines its node (its leaf value counts in its parent's mean) and gets 0.

Differences from the official code:
- The official generator drops edges before a token-mean loss (``only_adv_greater_than_zero``, a misnomer), which
  changes the loss denominator (steps.md §5.6). Here such edges keep advantage 0; the drop as a loss mask belongs
  to the selection module and is not part of this estimator. The official test is A + P == 0 with the prover
  advantage P = BoK(V_child) - BoK(V_parent), BoK(v) = 1 - (1 - v)^4, computed even without ``use_pav``: for
  rewards in [0, 1] P has A's sign, so it drops exactly the edges with A == 0 (tests/test_spo_parity.py pins a
  reward outside [0, 1] where the two differ).
- ``use_pav`` (a token advantage of V(child) + 5 P, ``hybrid_episode_generator.py`` L479) is not implemented, nor
  the probability mask (a loss-side mask) or the replay buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch, describe_row_indices
from canonrl.methods._common import require_choice, require_range
from canonrl.registry import TREE_WORKS_IN, Paper, StepEstimator, param, register

SPO_PAPER = Paper(
    "Segment Policy Optimization: Effective Segment-Level Credit Assignment in RL for Large Language Models",
    "2505.23564",
)

MODES = ("rloo", "grpo")


def leaf_rewards(batch: RolloutBatch, what: str) -> Tensor:
    """[N] float32: each leaf node's reward (the ``rewards`` of a row whose step reaches it), 0 at inner nodes.

    Raises when the rows reaching one leaf disagree."""
    steps, nodes = batch.steps, batch.nodes
    reward = batch.rewards.float()[steps.occ_row[steps.first_occ]]
    at_leaf = nodes.is_leaf[nodes.step_node]
    node = nodes.step_node[at_leaf]
    high = torch.full((nodes.num_nodes,), -torch.inf, device=steps.device)
    low = torch.full((nodes.num_nodes,), torch.inf, device=steps.device)
    high = high.scatter_reduce(0, node, reward[at_leaf], reduce="amax")
    low = low.scatter_reduce(0, node, reward[at_leaf], reduce="amin")
    differ = at_leaf.clone()
    differ[at_leaf] = high[node] != low[node]
    if differ.any():
        rows = describe_row_indices(steps.occ_row[steps.first_occ[differ]], steps.batch_size)
        raise ValueError(f"{what}: rows reaching one leaf node carry different rewards at rows {rows}")
    return torch.where(nodes.is_leaf, high, 0.0)


def parent_values(nodes, per_node: Tensor) -> Tensor:
    """[S] the value of each step's parent node (the step's start); a step whose parent is None/-1 (its node is a
    root) takes its own node's value, so its difference is 0."""
    return per_node[torch.where(nodes.step_parent >= 0, nodes.step_parent, nodes.step_node)]


@register
class SPOTree(StepEstimator):
    name = "spo_tree"
    works_in = TREE_WORKS_IN
    description = "Tree Monte Carlo: V(child) - V(parent) per edge, V = recursive mean of children (row per edge)"
    paper = SPO_PAPER
    requires = ("node", "parent")
    layouts = ("row-per-step", "row-per-trajectory")
    inputs_note = "`node`, `parent` (one edge per row); `rewards` at the leaves"

    @dataclass
    class Params:
        mode: str = param("rloo", "'rloo': V(child) - V(parent); 'grpo': divided by the std of the parent's children")
        eps: float = param(1e-8, "added to the population std of the parent's children in 'grpo'")

        def __post_init__(self) -> None:
            require_choice("mode", self.mode, MODES)
            require_range("eps", self.eps, 0.0, low_open=True)

    def step_advantages(self, batch: RolloutBatch) -> Tensor:
        p, steps, nodes = self.params, batch.steps, batch.nodes
        values = nodes.value_from_children(leaf_rewards(batch, "spo_tree"))
        advantage = values[nodes.step_node] - parent_values(nodes, values)
        if p.mode == "grpo":
            spread = nodes.children_std(values)
            advantage = advantage / (parent_values(nodes, spread) + p.eps)
        return torch.where(steps.member, advantage, 0.0)
