"""SPAE: a base outcome advantage shaped by the differences of given step potentials (best reading, unverified).

Formula (reconstruction; the training code is unreleased): with Phi_k the potential at the end of step k
(``step_values``) and A the ``base`` estimator's sequence-level advantage of the step's trajectory (GRPO by default),

    dPhi_k = Phi_k - Phi_{k-1}                    (dPhi = 0 for a trajectory's first step, as the probe script)
    s_k    = saturation_scale  if A > 0 and some earlier step j < k of the trajectory has Phi_j > threshold, else 1
    A_k    = s_k * A + xi * dPhi_k

so potential gains are amplified, drops penalised, and the positive advantage of the steps after the potential
saturates (post-solution checking) is scaled down.

Paper: "Step Potential Advantage Estimation: Harnessing Intermediate Confidence and Correctness for Efficient
Mathematical Reasoning", Wu et al. (SPAE, arXiv 2601.03823). Official code ``cii030/SPAE-RL`` at ed529f8 releases only
the probe (``inference/probe_mechanism_example.py``: Phi = 1.5 Acc Conf + 0.5 Acc - Conf in [-1, 1], saturation
diagnostic Phi > 0.9); the potential itself is computed outside this estimator and passed as ``step_values``.

Inputs: ``rewards``, ``group``, mask, ``step_values`` (Phi per step), the steps (``turn_ids`` marking the reasoning
steps of a response, or a row-per-step layout with ``traj`` / ``step_index``).

Conventions (all unverified readings, hence ``verified = False``):
- "Correct responses" are read as those with a positive base advantage (scaling a negative advantage down would
  reward checking); ``saturation_scale = 1`` turns the penalty off, ``xi = 0`` the shaping.
- The saturation test is strict (Phi > threshold) and applies to the steps strictly after the first saturated one.
- The base advantage is taken over trajectories (see :mod:`canonrl.methods.fspo`), so both layouts give the same
  numbers and duplicated or padding rows (``step_index = -1``) do not count.
- A step without mask tokens gets 0 but its potential still serves as Phi_{k-1} of the next step and can saturate.
- Equal potentials give dPhi = 0 exactly, and a trajectory whose potentials never pass the threshold keeps A.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.methods._common import require_finite, require_range
from canonrl.methods._wrapped import BASE_HELP, BASE_PARAMS_HELP, HasBase, check_base
from canonrl.methods.fspo import check_trajectory_base, trajectory_base_advantages
from canonrl.registry import SOLVER_WORKS_IN, Paper, StepEstimator, param, register

SPAE_PAPER = Paper(
    "Step Potential Advantage Estimation: Harnessing Intermediate Confidence and Correctness for Efficient "
    "Mathematical Reasoning",
    "2601.03823",
)


def potential_differences(steps, potentials: Tensor) -> Tensor:
    """[S] Phi_k - Phi_{k-1} within each trajectory, 0 for its first step."""
    previous = potentials[steps.prev.clamp_min(0)]
    return torch.where(steps.is_first, 0.0, potentials - previous)


def after_saturation(steps, potentials: Tensor, threshold: float) -> Tensor:
    """[S] bool: some earlier step of the step's trajectory has a potential above ``threshold``."""
    index = torch.arange(steps.num_steps, device=steps.device)
    first = torch.full((steps.num_traj,), steps.num_steps, dtype=torch.long, device=steps.device)
    first = first.scatter_reduce(0, steps.traj, torch.where(potentials > threshold, index, steps.num_steps), "amin")
    return index > first[steps.traj]


@register
class SPAE(HasBase, StepEstimator):
    name = "spae"
    works_in = SOLVER_WORKS_IN
    description = "Base advantage + xi * potential difference per step, scaled down after the potential saturates"
    paper = SPAE_PAPER
    requires = ("step_values",)
    verified = False
    layouts = ("row-per-response", "row-per-trajectory", "row-per-step")
    inputs_note = "`step_values` (the step potential Phi per step)"
    producer = "step potentials: an answer-forcing probe, one forward pass per step"

    @dataclass
    class Params:
        base: str = param("grpo", BASE_HELP + "; over trajectories, reading only rewards, group and mask")
        base_params: dict | None = param(None, BASE_PARAMS_HELP)
        xi: float = param(1.0, "weight of the potential difference (unverified)")
        threshold: float = param(0.9, "potential above which the response counts as solved (the probe's 0.9)")
        saturation_scale: float = param(0.5, "factor on a positive base advantage after saturation (unverified)")

        def __post_init__(self) -> None:
            check_base(self.base, "spae")
            require_finite("xi", self.xi)
            require_finite("threshold", self.threshold)
            require_range("saturation_scale", self.saturation_scale, 0.0, 1.0)

    def __init__(self, **hyperparameters) -> None:
        super().__init__(**hyperparameters)
        check_trajectory_base(self.name, self.base)

    def step_advantages(self, batch: RolloutBatch) -> Tensor:
        p, steps = self.params, batch.steps
        potentials = steps.per_step("step_values", batch.step_values)
        base = trajectory_base_advantages(self, batch)
        saturated = after_saturation(steps, potentials, p.threshold) & (base > 0)
        out = torch.where(saturated, p.saturation_scale * base, base) + p.xi * potential_differences(steps, potentials)
        return torch.where(steps.member, out, 0.0)
