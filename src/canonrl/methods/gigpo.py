"""GiGPO: an episode-level group advantage plus a step-level advantage within anchor-state groups.

Formula: R_t = sum_{k >= t} gamma^(k - t) r_k (the step's discounted return within its trajectory);
A^E = (s - mean_g s) [/ (std_g s + eps)] over the prompt group g of the episode rewards s;
A^S = (R - mean R) [/ (std R + eps)] over the steps of group g that start from the same anchor state;
A = A^E + step_advantage_w * A^S, on the step's tokens. ``mode="mean_norm"`` leaves out both divisions,
``"mean_std_norm"`` keeps them (unbiased std).

Paper: "Group-in-Group Policy Optimization for LLM Agent Training" (arXiv 2505.10978).
Official code: langfengQ/verl-agent ``gigpo/core_gigpo.py`` at 20bd331 (``compute_step_discounted_returns``,
``compute_gigpo_outcome_advantage``), transcribed as the test oracle ``canonrl.reference.official_gigpo``.

Inputs (row-per-step, verl-agent's layout; also a row-per-trajectory batch with ``turn_ids``): ``rewards`` [B] the
episode reward on every step row (or ``token_rewards``, summed), ``group`` the prompt's uid, ``traj`` the
trajectory's uid, ``step_index`` the row's time position (−1: padding row), ``step_rewards`` the environment reward
of each step, ``anchor`` the environment state each step starts from (ids or hashables, without history).

Conventions:
- Episode statistics over the group's steps (``episode_stats="steps"``, the official hard default, which weighs a
  trajectory by its number of steps) or over its trajectories (``"trajectories"``, the textbook reading).
- A group with one member (step, or trajectory) keeps its raw episode reward (mean 0, std 1: s, or s / (1 + eps)),
  as the official code does; an anchor group of one step gets A^S = 0.
- A repeated ``(traj, step_index)`` is one step: counted once, every copy gets its advantage (the official
  trainer counts verl-agent's duplicated rows twice, steps.md §5.3).
- Time order is ``step_index``, never batch order (the official returns assume batch order).
- A step without mask tokens feeds its reward into earlier steps' returns, joins no statistic and gets 0.
- Constant groups give exactly 0 (the official float32 code gives up to |A| ~ 0.1 when all members of an anchor
  group share a return such as 0.95^3, steps.md §5.1); ``numerics="upstream"`` keeps the official float32 noise.

Not implemented: the official optional similarity clustering of text anchors (``enable_similarity``, difflib):
cluster anchors before the call and pass the cluster ids as ``anchor``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.methods._common import require_choice, require_finite, require_range
from canonrl.methods._steps import NUMERICS, group_relative, numerics_param
from canonrl.registry import Paper, StepEstimator, param, register

GIGPO_PAPER = Paper("Group-in-Group Policy Optimization for LLM Agent Training", "2505.10978")
MODES = ("mean_norm", "mean_std_norm")
EPISODE_STATS = ("steps", "trajectories")


def first_member_of_trajectory(steps) -> Tensor:
    """[S] bool: the first step of each trajectory that has mask mass (one representative per trajectory)."""
    index = torch.arange(steps.num_steps, device=steps.device)
    first = torch.full((steps.num_traj,), steps.num_steps, dtype=torch.long, device=steps.device)
    first = first.scatter_reduce(0, steps.traj, torch.where(steps.member, index, steps.num_steps), reduce="amin")
    return steps.member & (first[steps.traj] == index)


@register
class GiGPO(StepEstimator):
    name = "gigpo"
    description = "Episode group advantage + step advantage within anchor-state groups (agents, row per step)"
    paper = GIGPO_PAPER
    requires = ("step_rewards", "anchor")
    inputs_note = "`step_rewards`, `anchor` (+ `traj`, `step_index`)"

    @dataclass
    class Params:
        gamma: float = param(0.95, "discount of the step returns (the official scripts' 0.95; verl's yaml 1.0)")
        step_advantage_w: float = param(1.0, "weight w of the step-level advantage")
        mode: str = param("mean_norm", "'mean_norm' (no std division) or 'mean_std_norm' (unbiased std)")
        eps: float = param(1e-6, "added to the std in 'mean_std_norm'")
        episode_stats: str = param("steps", "episode statistics over the group's 'steps' (official) or 'trajectories'")
        numerics: str = numerics_param()

        def __post_init__(self) -> None:
            require_range("gamma", self.gamma, 0.0, 1.0)
            require_finite("step_advantage_w", self.step_advantage_w)
            require_choice("mode", self.mode, MODES)
            require_range("eps", self.eps, 0.0)
            require_choice("episode_stats", self.episode_stats, EPISODE_STATS)
            require_choice("numerics", self.numerics, NUMERICS)

    def step_advantages(self, batch: RolloutBatch) -> Tensor:
        p, steps = self.params, batch.steps
        scale = "unbiased" if p.mode == "mean_std_norm" else "none"
        returns = steps.returns(steps.per_step("step_rewards", batch.step_rewards), p.gamma)
        anchor = steps.per_step_ids("anchor", batch.anchor)
        episode = episode_advantages(batch, scale=scale, eps=p.eps, numerics=p.numerics, stats=p.episode_stats)
        options = dict(scale=scale, eps=p.eps, numerics=p.numerics, order=steps.first_occ)
        step = group_relative(steps.by(steps.group, anchor), returns, **options)
        return torch.where(steps.member, episode + p.step_advantage_w * step, 0.0)


def episode_advantages(batch: RolloutBatch, *, scale: str, eps: float, numerics: str, stats: str = "steps") -> Tensor:
    """[S] GiGPO's episode advantage A^E of each step: the group-relative episode reward (``rewards`` of the step's
    row), with statistics over the group's steps or trajectories; a group of one keeps s (or s / (1 + eps))."""
    steps = batch.steps
    reward = batch.rewards[steps.occ_row[steps.first_occ]]
    raw = reward / (1 + eps) if scale != "none" else reward
    options = dict(scale=scale, eps=eps, numerics=numerics, order=steps.first_occ, singleton=raw)
    if stats == "steps":
        return group_relative(steps.by(steps.group), reward, **options)
    representatives = steps.by(steps.group, member=first_member_of_trajectory(steps))
    per_representative = group_relative(representatives, reward, **options)
    member = representatives.member
    per_traj = torch.zeros(steps.num_traj, device=steps.device).index_add_(
        0, steps.traj[member], per_representative[member]
    )
    return per_traj[steps.traj]
