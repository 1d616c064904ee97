"""TRLOO: turn-level REINFORCE leave-one-out over the trajectories of a prompt at the same turn.

Formula: G_t = sum_{k >= t} gamma^(k - t) r_k, the turn's return within its trajectory; over the steps of prompt
group g at turn position t, A = G - mean of the others' G = n / (n - 1) * (G - mean_{g,t} G); a step alone at its
turn keeps A = G.

Paper: "Dr. Kernel: Reinforcement Learning Done Right for Triton Kernel Generations" (arXiv 2602.05885).
Official code: hkust-nlp/KernelGYM ``drkernel/verl_patch/trainer/code/ppo/core_algos.py``
(``compute_multi_turn_rloo_outcome_advantage``) at 3a84417, transcribed as the test oracle
``tests/official_trloo.py``.

Inputs (row per turn, the official grid): ``traj``, ``step_index`` (the turn; −1 marks a padding row),
``step_rewards`` (each turn's reward; the official code reads the row sum of ``token_level_rewards``), ``group``.
A turn whose row is masked out of the loss (an all-zero mask) is still a turn: its reward feeds earlier returns,
it joins no statistic and gets 0.

Conventions:
- Positions come from ``step_index`` order within the trajectory, not from the grid's columns; padding rows take no
  part at all (the official code lets their reward, normally 0, into earlier returns).
- A constant group gives exactly 0 (the official float32 form G n/(n-1) - mean n/(n-1) can leave a few ulps);
  ``numerics="upstream"`` computes that form.
- ``compute_with_returns`` gives the turn returns G as the returns, as the official function does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.methods._common import require_choice, require_range
from canonrl.methods._steps import NUMERICS, numerics_param, upstream_mean_std
from canonrl.registry import Paper, StepEstimator, param, register

DR_KERNEL = Paper("Dr. Kernel: Reinforcement Learning Done Right for Triton Kernel Generations", "2602.05885")


@register
class TRLOO(StepEstimator):
    name = "trloo"
    description = "Turn-level leave-one-out: a turn's return minus the mean of the group's other returns at that turn"
    paper = DR_KERNEL
    requires = ("step_rewards",)
    inputs_note = "`step_rewards` (+ `traj`, `step_index`)"

    @dataclass
    class Params:
        gamma: float = param(1.0, "discount of the turn returns (the official scripts' 1.0)")
        numerics: str = numerics_param()

        def __post_init__(self) -> None:
            require_range("gamma", self.gamma, 0.0, 1.0)
            require_choice("numerics", self.numerics, NUMERICS)

    def step_advantages(self, batch: RolloutBatch) -> Tensor:
        return self.step_advantages_and_returns(batch)[0]

    def step_advantages_and_returns(self, batch: RolloutBatch) -> tuple[Tensor, Tensor]:
        steps = batch.steps
        returns = steps.returns(steps.per_step("step_rewards", batch.step_rewards), self.params.gamma)
        grouping = steps.by(steps.group, steps.pos)
        count = grouping.count[grouping.index]
        factor = count / (count - 1).clamp_min(1)
        if self.params.numerics == "upstream":
            mean = upstream_mean_std(grouping, returns, unbiased=True, order=steps.first_occ)[0][grouping.index]
            loo = returns * factor - mean * factor
        else:
            loo = factor * grouping.centered(returns)
        advantages = torch.where(grouping.singleton, returns, loo)
        return torch.where(steps.member, advantages, 0.0), returns
