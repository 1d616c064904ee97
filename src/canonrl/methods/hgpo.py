"""HGPO: step advantages from a hierarchy of groups that share the last k anchor states, weighted toward deeper ones.

Formula: R_t is the step's discounted return (as GiGPO). For k = 1 .. K + 1, the steps of a prompt group whose last
k anchor states (the current one included) are equal form a group G_k; in every G_k of at least two steps,
a_k = (R - mean) / (std_pop + eps) (``mode="mean_std_norm"``) or R - mean (``"mean_norm"``). A step's items
(k, a_k) — with (0, A^E), GiGPO's episode advantage, first when ``base_group`` — lose those equal to exactly 0;
A = sum_k w_k a_k with w_k = (k + 1)^alpha / (sum of the kept (k + 1)^alpha + eps); 0 if no item is kept.

Paper: "Hierarchy-of-Groups Policy Optimization for Long-Horizon Agentic Tasks" (arXiv 2602.22817).
Official code: langfengQ/verl-agent ``recipe/hgpo/core_hgpo.py`` at 20bd331 (``hgpo_advantage_estimate``),
transcribed as the test oracle ``canonrl.reference.official_hgpo``.

Inputs: as GiGPO (row per step: ``rewards`` episode reward, ``group``, ``traj``, ``step_index``, ``step_rewards``,
``anchor``); ``history_length`` K must match the memory window the prompts show.

Conventions:
- History is taken in time order (``step_index``); the official code takes batch order within a trajectory, which
  verl-agent's trainer keeps only because its HGPO recipe moves the row duplication after the advantage.
- Population std (the official ``unbiased=False``), unlike GiGPO's unbiased std.
- Constant groups give exactly 0, so they drop out of the average (the official float32 code keeps their spurious
  non-zero values, steps.md §5.1); ``numerics="upstream"`` reproduces them.
- A repeated ``(traj, step_index)`` is one step; a step without mask tokens joins no group and gets 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.methods._common import require_choice, require_finite, require_int, require_range
from canonrl.methods._steps import NUMERICS, group_relative, numerics_param
from canonrl.methods.gigpo import MODES, episode_advantages
from canonrl.registry import Paper, StepEstimator, param, register

HGPO_PAPER = Paper("Hierarchy-of-Groups Policy Optimization for Long-Horizon Agentic Tasks", "2602.22817")


@register
class HGPO(StepEstimator):
    name = "hgpo"
    description = "Step advantages over groups sharing the last k anchor states, weighted (k+1)^alpha (agents)"
    paper = HGPO_PAPER
    requires = ("step_rewards", "anchor")
    inputs_note = "`step_rewards`, `anchor` (+ `traj`, `step_index`)"

    @dataclass
    class Params:
        history_length: int = param(2, "K: anchor states of history the prompts show (groups up to depth K + 1)")
        gamma: float = param(0.95, "discount of the step returns (the official scripts' 0.95)")
        mode: str = param("mean_std_norm", "'mean_std_norm' (population std) or 'mean_norm'")
        length_weight_alpha: float = param(1.0, "alpha in the weights (k + 1)^alpha; 0 gives uniform weights")
        base_group: bool = param(False, "add GiGPO's episode advantage as the item of depth 0")
        eps: float = param(1e-6, "added to the std and to the sum of weights")
        numerics: str = numerics_param()

        def __post_init__(self) -> None:
            require_int("history_length", self.history_length, 0)
            require_range("gamma", self.gamma, 0.0, 1.0)
            require_choice("mode", self.mode, MODES)
            require_finite("length_weight_alpha", self.length_weight_alpha)
            require_range("eps", self.eps, 0.0)
            require_choice("numerics", self.numerics, NUMERICS)

    def step_advantages(self, batch: RolloutBatch) -> Tensor:
        p, steps = self.params, batch.steps
        returns = steps.returns(steps.per_step("step_rewards", batch.step_rewards), p.gamma)
        anchor = steps.per_step_ids("anchor", batch.anchor)
        scale = "population" if p.mode == "mean_std_norm" else "none"
        numerator = torch.zeros(steps.num_steps, device=steps.device)
        weights = torch.zeros(steps.num_steps, device=steps.device)
        if p.base_group:
            episode_scale = "unbiased" if p.mode == "mean_std_norm" else "none"
            episode = episode_advantages(batch, scale=episode_scale, eps=p.eps, numerics=p.numerics)
            self._add_item(numerator, weights, episode, depth=0)
        history = steps.history(anchor, p.history_length + 1)
        for depth in range(1, p.history_length + 2):
            grouping = steps.by(steps.group, history[:, :depth], member=steps.pos >= depth - 1)
            item = group_relative(grouping, returns, scale=scale, eps=p.eps, numerics=p.numerics)
            self._add_item(numerator, weights, torch.where(grouping.singleton, 0.0, item), depth)
        kept = weights > 0
        return torch.where(kept & steps.member, numerator / (weights + p.eps), 0.0)

    def _add_item(self, numerator: Tensor, weights: Tensor, item: Tensor, depth: int) -> None:
        weight = float(depth + 1) ** self.params.length_weight_alpha
        kept = item != 0
        numerator.add_(torch.where(kept, weight * item, 0.0))
        weights.add_(torch.where(kept, weight, 0.0))
