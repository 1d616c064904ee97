"""Tree-OPO: each completion's reward minus a tree-consistent value of the prefix it starts from, centred in its
group (Staged Advantage Estimation with the paper's cheap heuristic baselines; a best reading).

Formula (unverified; from the paper's abstract and secondary summaries, no official code): a teacher's MCTS traces
are cut into staged prefixes that form a tree; completion i starts from prefix p_i and gets reward r_i. With
subtree(p) = the completions that start from p or from any extension of p (its descendants in the tree),

    V(p) = mean {r_j : j in subtree(p)}     (baseline="expectation": empirical subtree success, the default)
    V(p) = max  {r_j : j in subtree(p)}     (baseline="optimistic": any success below p)
    V(p) = min  {r_j : j in subtree(p)}     (baseline="pessimistic": no failure below p)
    A_i = r_i - alpha * V(p_i)
    A_i <- A_i - mean_g(A)                  (center=True: mean-centred over the completions of prompt group g)

Every V is consistent with the tree's order: ``expectation`` is a count-weighted mean of its children's values and
its own completions, ``optimistic`` never decreases towards the root, ``pessimistic`` never increases.

Paper: "Tree-OPO: Off-policy Monte Carlo Tree-Guided Advantage Optimization for Multistep Reasoning" (arXiv
2509.09284). No official code located.

Inputs (row per completion, one step per row: ``turn_ids="row"``, the default): ``node`` the prefix the completion
starts from and ``parent`` that prefix's parent prefix (None or -1 for the tree's root prefix, the bare prompt);
completions from the same prefix carry the same ``node`` (and the same ``parent``). Ids are prefix identities, unique
over the batch (str, int or hashables). ``rewards`` [B] the completion's outcome; ``group`` the prompt (one tree per
group is the usual case; groups only set the centring) and mask as usual.

Edge cases:
- A prefix with no completion in the batch cannot be named (it is no row's ``node``): give its children its own
  parent instead; every subtree of the prefixes present, and so every V, stays the same.
- A tree with one prefix: A = r - alpha * (stat of the group's rewards); ``expectation`` with alpha = 1 is GRPO's
  centring without std. A lone completion gets 0 when centred.
- All rewards equal (in a group's tree): exactly 0 (statistics in float64 of float32 rewards; the centring gives
  exact zeros for constant values).
- A completion without mask tokens takes part in no statistic and gets 0.
- A trajectory of several steps (segments) is rejected: each row is one completion.

Differences from the paper (hence ``verified = False``): the exact quadratic-program projection onto the tree's
constraint set (and the sibling-triplet constraints of the paper's analysis) is not implemented, only the heuristic
baselines, whose definitions here come from secondary summaries; the weight ``alpha`` and the final group
centring are as summarised there (default alpha = 1, centring on). No std normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch, describe_row_indices
from canonrl.methods._common import require_choice, require_range
from canonrl.registry import TREE_WORKS_IN, Paper, StepEstimator, param, register

TREE_OPO_PAPER = Paper(
    "Tree-OPO: Off-policy Monte Carlo Tree-Guided Advantage Optimization for Multistep Reasoning", "2509.09284"
)

BASELINES = ("expectation", "optimistic", "pessimistic")


def subtree_statistic(nodes, step_values: Tensor, member: Tensor, baseline: str) -> Tensor:
    """[N] float64: mean, max or min of ``step_values`` over the member steps whose node is in each node's subtree
    (0 for a node with none); one scatter per tree level, following ancestors up."""
    values = step_values.double()[member]
    node = nodes.step_node[member]
    n, device = nodes.num_nodes, step_values.device
    if baseline == "expectation":
        sums = torch.zeros(n, dtype=torch.float64, device=device)
        counts = torch.zeros(n, dtype=torch.float64, device=device)
        ones = torch.ones_like(values)
    else:
        reduce, empty = ("amax", -torch.inf) if baseline == "optimistic" else ("amin", torch.inf)
        extreme = torch.full((n,), empty, dtype=torch.float64, device=device)
    for _ in range(nodes.max_depth + 1):
        if node.numel() == 0:
            break
        if baseline == "expectation":
            sums.index_add_(0, node, values)
            counts.index_add_(0, node, ones)
        else:
            extreme = extreme.scatter_reduce(0, node, values, reduce=reduce)
        up = nodes.parent[node]
        keep = up >= 0
        node, values = up[keep], values[keep]
        if baseline == "expectation":
            ones = ones[keep]
    if baseline == "expectation":
        return sums / counts.clamp_min(1)
    return torch.where(torch.isfinite(extreme), extreme, 0.0)


@register
class TreeOPO(StepEstimator):
    name = "tree_opo"
    works_in = TREE_WORKS_IN
    description = "Completion reward minus alpha * a subtree value of its MCTS prefix, centred in the group"
    paper = TREE_OPO_PAPER
    requires = ("node", "parent")
    verified = False
    layouts = ("row-per-trajectory",)
    inputs_note = "`node` = the prefix each completion starts from, `parent` = that prefix's parent (one row each)"
    tree_steps = "completions"

    @dataclass
    class Params:
        baseline: str = param("expectation", "V(prefix) over its subtree's completions: 'expectation' (mean), "
                              "'optimistic' (max) or 'pessimistic' (min)")
        alpha: float = param(1.0, "weight of the prefix value in r - alpha * V(prefix)")
        center: bool = param(True, "mean-centre r - alpha * V over the completions of each prompt group")

        def __post_init__(self) -> None:
            require_choice("baseline", self.baseline, BASELINES)
            require_range("alpha", self.alpha, 0.0)

    def step_advantages(self, batch: RolloutBatch) -> Tensor:
        p, steps = self.params, batch.steps
        several = steps.pos > 0
        if several.any():
            rows = describe_row_indices(steps.occ_row[steps.first_occ[several]], steps.batch_size)
            raise ValueError(f"tree_opo: each completion must be one step (one row, no segments); more at rows {rows}")
        nodes = batch.nodes
        reward = batch.rewards.float()[steps.occ_row[steps.first_occ]]
        values = subtree_statistic(nodes, reward, steps.member, p.baseline)
        advantage = (reward.double() - p.alpha * values[nodes.step_node]).float()
        if p.center:
            advantage = steps.by(steps.group).centered(advantage)
        return torch.where(steps.member, advantage, 0.0)
