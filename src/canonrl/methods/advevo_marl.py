"""AdvEvo-MARL's public baseline: each agent's return minus the mean return of its functional group.

Formula: A = R - b, b = the mean of R over every step of the same prompt group and the same functional role
(``agent``: e.g. all defenders share one baseline, all attackers another) — instead of a baseline per agent.
R is the step's discounted return of ``step_rewards`` (gamma), or the row's outcome ``rewards`` when no step
rewards are given. ``scale="std"`` also divides by the role group's unbiased std + eps (not in the abstract).

Paper: "AdvEvo-MARL: Shaping Internalized Safety through Adversarial Co-Evolution in Multi-Agent Reinforcement
Learning" (arXiv 2510.01586). No official code was found: this is a best reading of the abstract (the registry's
``verified`` flag is False); whether a std division follows is unverified, so it is a hyperparameter.

Inputs: ``agent`` (the functional role of each row, or of each step), ``group``, ``rewards``; optional
``step_rewards`` with ``traj``/``step_index`` or ``turn_ids`` for multi-turn episodes.

Conventions: a role group of one step gets 0; constant role groups give exactly 0; time order from ``step_index``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.methods._common import require_choice, require_range
from canonrl.methods._steps import group_relative
from canonrl.registry import Paper, StepEstimator, param, register

ADVEVO = Paper(
    "AdvEvo-MARL: Shaping Internalized Safety through Adversarial Co-Evolution in Multi-Agent Reinforcement Learning",
    "2510.01586",
)


@register
class AdvEvoMARL(StepEstimator):
    name = "advevo_marl"
    description = "Public baseline: a return minus the mean return of the agent's functional role in its group"
    paper = ADVEVO
    requires = ("agent",)
    verified = False
    layouts = ("row-per-response", "row-per-step", "row-per-trajectory")
    inputs_note = "`agent` (+ optional `step_rewards`)"

    @dataclass
    class Params:
        gamma: float = param(1.0, "discount of the step returns when step_rewards are given")
        scale: str = param("none", "'none' (R - b, the abstract) or 'std' (divide by the role group's std + eps)")
        eps: float = param(1e-6, "added to the std when scale='std'")

        def __post_init__(self) -> None:
            require_range("gamma", self.gamma, 0.0, 1.0)
            require_choice("scale", self.scale, ("none", "std"))
            require_range("eps", self.eps, 0.0)

    def step_advantages(self, batch: RolloutBatch) -> Tensor:
        p, steps = self.params, batch.steps
        if batch.step_rewards is None:
            returns = batch.rewards[steps.occ_row[steps.first_occ]]
        else:
            returns = steps.returns(steps.per_step("step_rewards", batch.step_rewards), p.gamma)
        role = steps.per_step_ids("agent", batch.agent, per_row=True)
        scale = "unbiased" if p.scale == "std" else "none"
        return group_relative(steps.by(steps.group, role), returns, scale=scale, eps=p.eps, numerics="exact")
