"""ROSE: the advantage of a tree segment is the mean outcome of the responses through its end minus that through its
start, with the official length-aware penalty on long correct responses.

Formula (from the official code): every response is cut into segments at the branch points on its path; V(k) = the
mean final reward of all responses of the prompt that contain branch point k, V(root) = the mean over the prompt's
responses, and the segment [k0, k1) of a response gets

    A = V(k1) - V(k0)            (the last segment uses the response's own final reward as V(k1))

raw differences, no std normalisation, broadcast to the segment's tokens. ``keying`` says what a branch point is:

- ``"prefix"`` (default): the prefix reached (``node``): V(node) = the mean reward of the leaves below it;
- ``"position"``: the official keying, the token position of the branch point within the prompt's group:
  V(g, k) = the mean final reward of the group's responses that have a segment ending at position k (not their
  last), so different prefixes that branch at the same position are averaged together (steps.md §5.5). Position k
  of a segment = where its ``turn_ids`` span ends in the row, counted from the start of the row's first segment.

Length-aware penalty (``length_penalty`` = lambda > 0; 0 = off, the official default): among the correct responses
of a group (|final reward| > 1e-6; at least two, else nothing), s = the shortest (length = mask tokens of its
segments; a tie goes to the first row); for every other correct response b, k_c = the deepest branch point b shares
with s (a common ``node`` under "prefix", a common position under "position"; the root when none), and

    pen = 1 - ((L_s - k_c) / (L_b - k_c))^lambda,      A <- A - |A| * pen   on b's segments after k_c

(lengths after k_c = mask tokens of the segments after it). k_c is a segment boundary of b, so the official
per-token rule is a per-segment rule; shorter-or-equal remaining length gives pen <= 0: no change.

Paper: "Reinforced Efficient Reasoning via Semantically Diverse Exploration" (ROSE, arXiv 2601.05053). Official code:
ZiqiZhao1/ROSE-rl at 2142dc7, ``verl/trainer/ppo/core_algos.py::compute_grpo_iterative_branching_outcome_advantage``
(registered as ``grpo_iterative_branching``); transcribed in tests/official_rose.py.

Inputs (row per response, the official layout): ``turn_ids`` cutting each row into its segments; per segment ``node``
(the prefix reached at the segment's end: a branch point, or the response's own end for its last segment) and
``parent`` (the prefix it starts from: the previous branch point, or the prompt's root). Ids are prefix identities,
unique over the batch; a shared prefix appears in every row that contains it, with the same ``node`` and ``parent``
ids. ``rewards`` [B] the final reward of each response; ``group`` and mask as usual. With ``keying="prefix"`` a
row-per-step layout (``traj``, ``step_index``) works the same way; ``keying="position"`` needs each response in one
row (its positions are columns of that row) and raises otherwise, naming the rows. The official ``tree_metadata``
(per response: ``parent_traj``, ``branch_pos``) becomes these inputs by cutting each response at the branch
positions on its path (tests/test_rose_parity.py builds them).

Edge cases:
- A segment whose ``parent`` is None or -1 starts from the prompt: its base is the mean reward of its group's
  responses (the official V(position 0)); or give each prompt's root an id of its own, which is the same.
- A response that never branches (one segment from the root) gets r - mean of the group, GRPO's centring; a
  group whose responses all have the same reward gets exactly 0 everywhere (means in float64 of float32 rewards),
  with or without the penalty.
- Every response's last segment must reach a leaf (a node no segment starts from): a response that ends exactly at
  a branch point is rejected, since its reward would not be one leaf below that point.
- A segment without mask tokens gets 0 (the official loop skips it the same way); under "position" it still marks
  its end as a branch point of its response.

Differences from the official code (parity: tests/test_rose_parity.py, ``keying="position"`` on random trees with
and without the penalty; ``"prefix"`` where no two prefixes of a prompt branch at one position):
- The default keys nodes by prefix identity; ``keying="position"`` reproduces the official keying.
- The official code rebuilds each response's branch positions from one (parent, position) edge per response; it
  adds every ancestor's position unconditionally, so a response branched off inside its parent's inherited prefix
  (position below the parent's own) also gets the parent's later branch position, which is not on its path. The
  official rollout never makes such a branch (it branches at the owner of the max-entropy token); here the segments
  are given, so this does not arise.
- Lengths: the official L is the row's mask count and positions are absolute columns; here lengths are mask tokens
  of the segments and positions count from the row's first segment. They agree when the mask covers the response
  contiguously from column 0, as in the official single-turn rows. The official trainer also passes
  ``responses`` and caps L at the response's count of non-zero token ids, so a response containing token id 0
  loses its last tokens' advantages (and the penalty's lengths shrink); that looks like a bug and is not followed.
- The official code reads ``config.get("length_penalty")`` unconditionally (``config=None`` fails) and prints on
  every call with a penalty; neither matters here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch, describe_row_indices
from canonrl.groups import Grouping
from canonrl.methods._common import require_choice, require_finite, require_range
from canonrl.methods.spo_tree import leaf_rewards
from canonrl.registry import TREE_WORKS_IN, Paper, StepEstimator, param, register
from canonrl.steps import StepTable, lexicographic_codes

ROSE_PAPER = Paper("Reinforced Efficient Reasoning via Semantically Diverse Exploration", "2601.05053")

KEYINGS = ("prefix", "position")

#: The official test for a correct response: |final reward| > 1e-6.
CORRECT_ABOVE = 1e-6


def group_leaf_means(batch: RolloutBatch, leaf_values: Tensor) -> Tensor:
    """[G] float64 mean of the leaf values reached by each prompt group's steps (each leaf once)."""
    steps, nodes = batch.steps, batch.nodes
    node_group = torch.full((nodes.num_nodes,), -1, dtype=torch.long, device=steps.device)
    node_group = node_group.scatter_reduce(0, nodes.step_node, steps.group, reduce="amax")
    leaves = Grouping(node_group, nodes.is_leaf & (node_group >= 0), steps.num_groups)
    return leaves.mean(leaf_values.double())


def segment_end_positions(steps: StepTable, what: str) -> Tensor:
    """[S] long: where each step's ``turn_ids`` span ends in its row (one past its last token), counted from the
    start of the row's first step. Raises, naming the rows, where a response's steps lie in several rows."""
    row = steps.occ_row[steps.first_occ]
    low = torch.full((steps.num_traj,), steps.batch_size, dtype=torch.long, device=steps.device)
    high = torch.full((steps.num_traj,), -1, dtype=torch.long, device=steps.device)
    low = low.scatter_reduce(0, steps.traj, row, reduce="amin")
    high = high.scatter_reduce(0, steps.traj, row, reduce="amax")
    split = low[steps.traj] != high[steps.traj]
    if split.any():
        rows = describe_row_indices(row[split], steps.batch_size)
        raise ValueError(
            f"{what}: keying='position' needs each response in one row (row per trajectory, segments as turn_ids "
            f"spans), but a response's segments lie in several rows at rows {rows}"
        )
    if steps.token_column is None:  # every step is a whole row, so each response is one segment: no branch points
        return torch.zeros(steps.num_steps, dtype=torch.long, device=steps.device)
    token_occ = steps.token_occ
    inside = token_occ >= 0
    column = torch.arange(token_occ.shape[1], device=steps.device).expand_as(token_occ)
    end = torch.zeros(steps.num_occurrences, dtype=torch.long, device=steps.device)
    end = end.scatter_reduce(0, token_occ[inside], column[inside] + 1, reduce="amax")
    row_start = torch.where(inside, column, token_occ.shape[1]).amin(1)
    return (end - row_start[steps.occ_row])[steps.first_occ]


def per_trajectory(steps: StepTable, per_step: Tensor, at: Tensor) -> Tensor:
    """[num_traj]: ``per_step`` at the steps flagged by ``at`` (one per trajectory), 0 where none."""
    out = torch.zeros(steps.num_traj, dtype=per_step.dtype, device=steps.device)
    return out.index_put_((steps.traj[at],), per_step[at])


@register
class ROSE(StepEstimator):
    name = "rose"
    works_in = TREE_WORKS_IN
    description = "Tree segments: mean outcome of the responses through the segment's end minus through its start"
    paper = ROSE_PAPER
    requires = ("node", "parent")
    layouts = ("row-per-trajectory", "row-per-step")
    inputs_note = "`turn_ids` (segments between branch points), `node`, `parent` per segment"

    @dataclass
    class Params:
        keying: str = param(
            "prefix",
            "'prefix': node values keyed by prefix identity (`node`); 'position': by the branch point's token "
            "position within the group, as the official code (row per trajectory only)",
        )
        length_penalty: float = param(
            0.0,
            "lambda >= 0 of the official length-aware penalty on correct responses longer than the group's "
            "shortest correct one: A - |A| (1 - (remaining short / remaining long)^lambda); 0 = off",
        )

        def __post_init__(self) -> None:
            require_choice("keying", self.keying, KEYINGS)
            require_finite("length_penalty", self.length_penalty)
            require_range("length_penalty", self.length_penalty, 0.0)

    def step_advantages(self, batch: RolloutBatch) -> Tensor:
        p, steps, nodes = self.params, batch.steps, batch.nodes
        ends_inside = steps.is_last & ~nodes.is_leaf[nodes.step_node]
        if ends_inside.any():
            rows = describe_row_indices(steps.occ_row[steps.first_occ[ends_inside]], steps.batch_size)
            raise ValueError(f"rose: a response's last segment must reach a leaf node (its own end) at rows {rows}")
        leaves = leaf_rewards(batch, "rose")
        if p.keying == "prefix":
            values = nodes.mean_of_leaves(leaves)
            from_root = nodes.step_parent < 0
            start = torch.where(
                from_root, group_leaf_means(batch, leaves)[steps.group].float(), values[nodes.step_parent.clamp_min(0)]
            )
            advantage = values[nodes.step_node] - start
            key = nodes.step_node
        else:
            key = segment_end_positions(steps, "rose")
            advantage = self._position_advantages(batch, key)
        if p.length_penalty > 0:
            advantage = self._length_penalty(batch, key, advantage)
        return torch.where(steps.member, advantage, 0.0)

    @staticmethod
    def _position_advantages(batch: RolloutBatch, position: Tensor) -> Tensor:
        """[S] V(g, end) - V(g, start) with V keyed by (group, position); V(g, 0) = the group's mean reward."""
        steps = batch.steps
        reward = batch.rewards.double()[steps.occ_row[steps.first_occ]]
        inner, last = ~steps.is_last, steps.is_last
        key, count = lexicographic_codes([steps.group, position], steps.num_steps, steps.device)
        branch_value = Grouping(key, inner, count).mean(reward)
        root_value = Grouping(steps.group, last, steps.num_groups).mean(reward)
        end_value = torch.where(last, reward, branch_value[key])
        start_value = torch.where(steps.is_first, root_value[steps.group], end_value[steps.prev.clamp_min(0)])
        return (end_value - start_value).float()

    def _length_penalty(self, batch: RolloutBatch, branch_key: Tensor, advantage: Tensor) -> Tensor:
        """The official length-aware penalty, per segment (see the module docstring)."""
        steps, lam = batch.steps, self.params.length_penalty
        device, num_traj, last = steps.device, steps.num_traj, steps.is_last
        reward = per_trajectory(steps, batch.rewards.float()[steps.occ_row[steps.first_occ]], last)
        traj_group = per_trajectory(steps, steps.group, last)
        first_row = torch.full((num_traj,), steps.batch_size, dtype=torch.long, device=device)
        first_row = first_row.scatter_reduce(0, steps.traj, steps.occ_row[steps.first_occ], reduce="amin")
        mass = steps.mass.double()
        length = torch.zeros(num_traj, dtype=torch.float64, device=device).index_add_(0, steps.traj, mass)
        through = mass.cumsum(0)  # mask tokens from the trajectory's start through each step
        first = torch.arange(steps.num_steps, device=device) - steps.pos
        through = through - (through - mass)[first]
        # the group's shortest correct response (first row on ties); at least two correct responses needed
        correct = reward.abs() > CORRECT_ABOVE
        groups = Grouping(traj_group, correct, steps.num_groups)
        shortest = torch.full((steps.num_groups,), torch.inf, dtype=torch.float64, device=device)
        shortest = shortest.scatter_reduce(0, traj_group[correct], length[correct], reduce="amin")
        tied = correct & (length == shortest[traj_group])
        short_row = torch.full((steps.num_groups,), steps.batch_size, dtype=torch.long, device=device)
        short_row = short_row.scatter_reduce(0, traj_group[tied], first_row[tied], reduce="amin")
        is_short = tied & (first_row == short_row[traj_group])
        enough = (groups.count >= 2) & (shortest > 0)
        penalised = correct & ~is_short & enough[traj_group]
        # deepest branch point shared with the shortest: keys of its inner steps, and its mask tokens through them
        key, count = lexicographic_codes([steps.group, branch_key], steps.num_steps, device)
        inner = ~last
        of_short = inner & is_short[steps.traj]
        on_short = torch.zeros(count, dtype=torch.bool, device=device).index_fill_(0, key[of_short], True)
        short_through = torch.zeros(count, dtype=torch.float64, device=device)
        short_through = short_through.index_put_((key[of_short],), through[of_short])
        common = inner & on_short[key] & penalised[steps.traj]
        deepest = torch.full((num_traj,), -1, dtype=torch.long, device=device)
        deepest = deepest.scatter_reduce(0, steps.traj[common], steps.pos[common], reduce="amax")
        own_done = torch.zeros(num_traj, dtype=torch.float64, device=device)
        own_done = own_done.scatter_reduce(0, steps.traj[common], through[common], reduce="amax")
        short_done = torch.zeros(num_traj, dtype=torch.float64, device=device)
        short_done = short_done.scatter_reduce(0, steps.traj[common], short_through[key[common]], reduce="amax")
        remain_own = length - own_done
        remain_short = (shortest[traj_group] - short_done).clamp_min(0)
        factor = 1 - (remain_short / remain_own.clamp_min(1e-300)) ** lam
        apply = penalised & (remain_own > 0) & (factor > 0)
        after = apply[steps.traj] & (steps.pos > deepest[steps.traj])
        return torch.where(after, advantage - advantage.abs() * factor[steps.traj].float(), advantage)
