"""ARPO: GRPO on the final rewards of branched trajectories, broadcast to every segment of each trajectory
(``attribution="soft"``, what the official scripts run), or with the paper's hard attribution of shared segments
(``attribution="hard"``, a best reading).

Formula: every (branched) trajectory i of prompt group g gets the GRPO advantage of its final reward

    A_i = (r_i - mean_g(r)) / (std_g(r) + eps)        (unbiased std, eps = 1e-6, as verl's ``grpo``)

- ``soft`` (default, from the official code): every segment of trajectory i gets A_i. A shared prefix appears in
  every branch that contains it, so its tokens are trained once per branch with that branch's advantage: the
  paper's implicit ("soft") averaging.
- ``hard`` (best reading; secondary sources only): a segment reaching node k gets the mean of A_i over the
  trajectories that pass through k (every trajectory having a segment with ``node`` k), so all copies of a shared
  segment get one advantage; a segment of one trajectory only (a branch's own tail) keeps A_i.

Paper: "Agentic Reinforced Policy Optimization" (ARPO, arXiv 2507.19849). Official code: RUC-NLPIR/ARPO at a95cd08,
``ARPO/scripts/ARPO_*_1node.sh`` (``algorithm.adv_estimator=grpo``); the entropy-based branching lives in
``ARPO/verl_arpo_entropy/verl/workers/rollout/vllm_rollout/vllm_rollout_with_tools.py`` and is a rollout concern.

Inputs (row per branched trajectory, the official layout): ``turn_ids`` cutting each row into segments at its branch
points; per segment ``node`` (the prefix reached at the segment's end) and ``parent`` (the prefix it starts from;
None/-1 or a root id for the prompt). Ids are prefix identities, unique over the batch: a shared prefix carries the
same ``node`` id in every row that contains it. ``rewards`` [B] the final reward of each trajectory; ``group`` and
mask as usual. A row-per-step layout (``traj``, ``step_index``) works the same way. ``soft`` reads the tree only
through the steps; ``hard`` needs the node ids.

Edge cases:
- Statistics are over trajectories (one item per trajectory, its reward the ``rewards`` of its first step's row); a
  trajectory without mask tokens takes part in none and gets 0; a lone trajectory in its group gets 0
  (``singleton="zero"``, canonrl's GRPO default) or verl's r / (1 + eps) (``singleton="raw"``).
- A group whose rewards are all equal gets exactly 0 on every segment, in both modes.
- A tree without branching (each trajectory one chain) gives plain GRPO in both modes.
- ``hard`` averages over every trajectory through the node, also those whose copy of the segment has no mask token.

Differences from the official code (hence ``verified = False``; no parity test against verl's ``grpo`` run on
ARPO's rollouts): ``soft`` is verl's GRPO with canonrl's conventions (exact 0 for constant groups, masked
trajectories left out, singletons 0 unless ``singleton="raw"``). ``hard`` is not in the released code; the paper's
exact averaging (which trajectories, before or after normalisation) was not checked against the paper: here the
normalised advantages are averaged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch, make_batch
from canonrl.groups import Grouping
from canonrl.methods._common import require_choice, require_range, singleton_param
from canonrl.methods._normalise import STD_CHOICES, group_normalised
from canonrl.methods.fspo import trajectory_rewards_and_groups
from canonrl.registry import TREE_WORKS_IN, Paper, StepEstimator, param, register

ARPO_PAPER = Paper("Agentic Reinforced Policy Optimization", "2507.19849")

ATTRIBUTIONS = ("soft", "hard")


@register
class ARPO(StepEstimator):
    name = "arpo"
    works_in = TREE_WORKS_IN
    description = "GRPO of branched trajectories on every segment (soft); hard: shared segments get the branches' mean"
    paper = ARPO_PAPER
    requires = ("node", "parent")
    verified = False
    layouts = ("row-per-trajectory", "row-per-step")
    inputs_note = "`turn_ids` (segments between branch points), `node`, `parent` per segment"

    @dataclass
    class Params:
        attribution: str = param("soft", "'soft': each branch's GRPO advantage (official scripts); 'hard': the mean "
                                 "over the branches through a segment's node (paper, best reading)")
        eps: float = param(1e-6, "added to the group std (verl 1e-6)")
        std: str = param("unbiased", "'unbiased' (N-1, verl) or 'population' (N)")
        singleton: str = singleton_param()

        def __post_init__(self) -> None:
            require_choice("attribution", self.attribution, ATTRIBUTIONS)
            require_range("eps", self.eps, 0.0)
            require_choice("std", self.std, STD_CHOICES)

    def step_advantages(self, batch: RolloutBatch) -> Tensor:
        p, steps = self.params, batch.steps
        if steps.num_traj == 0:
            return torch.zeros(0, device=steps.device)
        has_member = torch.zeros(steps.num_traj, dtype=torch.long, device=steps.device)
        has_member = has_member.scatter_reduce(0, steps.traj, steps.member.long(), reduce="amax")
        # GRPO over trajectories reads only which of them have mask tokens, not their tokens
        trajectories = make_batch(**trajectory_rewards_and_groups(batch), mask=has_member[:, None].float())
        per_traj = group_normalised(
            trajectories, trajectories.rewards.float(), eps=p.eps, std=p.std, scale="group", singleton=p.singleton
        ).float()
        advantage = per_traj[steps.traj]
        if p.attribution == "hard":
            nodes = batch.nodes
            by_node = Grouping(nodes.step_node, torch.ones_like(steps.member), nodes.num_nodes)
            advantage = by_node.mean(advantage.double())[nodes.step_node].float()
        return torch.where(steps.member, advantage, 0.0)
