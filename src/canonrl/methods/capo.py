"""CAPO: Curriculum Advantage Policy Optimization — positive-only advantages first, then all of them.

Formula (best reading, secondary source only): with A_i the advantage of a ``base`` estimator (GRPO by default),

    phase 1 ("imitation"),      step <= s*:  Ã_i = A_i if A_i >= 0, else 0
    phase 2 ("discrimination"), step >  s*:  Ã_i = A_i

a hard switch at the trainer step s* (the paper reports a switch after 20-30% of training as best, 10-20% also
mentioned; a gradual mix was reported worse).

Paper: "From Imitation to Discrimination: Toward A Generalized Curriculum Advantage Mechanism Enhancing
Cross-Domain Reasoning Tasks", Yang et al. (arXiv 2512.02580). No official code was found.

Inputs: rewards, group, mask (and whatever ``base`` needs); the trainer ``step`` (1-based, as verl's
``global_steps``; when not passed the estimator counts its own calls).

Hyperparameters:
- ``base`` / ``base_params``: the sequence-level estimator giving A_i (grpo, dr_grpo, rloo, dapo, canon, ...) and its
  hyperparameters, as KTAE's base.
- The switch: users think of it as a fraction of training, so ``switch_fraction`` (default 0.2, inside both reported
  ranges) of ``total_steps`` (default 150, as CANON's schedules; set it to your run's number of trainer steps) gives
  s* = floor(switch_fraction * total_steps), i.e. phase 1 is every step with step / total_steps <= switch_fraction.
  ``switch_step`` (an int, default None) gives s* directly and overrides the fraction: steps 1..switch_step are
  positive-only, all samples count from switch_step + 1 (``switch_step=0``: no imitation phase, the base itself).

Conventions: zero advantages are kept in phase 1 (A >= 0); zeroing A_i < 0 is how this library expresses "leave the
sample out of the policy-gradient term". The paper applies an indicator to the clipped surrogate with its KL term,
so in the paper a dropped sample also leaves the KL term and the loss's token count; here a zeroed sample still
counts in a ``token-mean`` denominator and in any KL penalty the trainer adds (a difference of normalisation only).
Singletons, all-equal groups and fully masked rows: whatever the base gives (0 by default for GRPO), then clamped.

Status: best reading (``verified = False``): only the abstract was checked against the paper; the mechanism and
the switch come from secondary summaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.methods._common import require_int, require_range
from canonrl.methods._wrapped import BASE_HELP, BASE_PARAMS_HELP, WrapsBase, check_base
from canonrl.registry import Paper, param, register

CAPO_PAPER = Paper(
    "From Imitation to Discrimination: Toward A Generalized Curriculum Advantage Mechanism Enhancing Cross-Domain "
    "Reasoning Tasks",
    "2512.02580",
)

@register
class CAPO(WrapsBase):
    name = "capo"
    description = "Best reading: base advantage with A < 0 set to 0 until a switch step, then all advantages"
    paper = CAPO_PAPER
    verified = False
    simulator_alignment = "z"

    @dataclass
    class Params:
        base: str = param("grpo", BASE_HELP)
        base_params: dict | None = param(None, BASE_PARAMS_HELP)
        switch_fraction: float = param(0.2, "phase 1 (A >= 0 only) while step / total_steps <= this (paper: 0.2-0.3)")
        total_steps: int = param(150, "number of trainer steps of the run, for switch_fraction")
        switch_step: int | None = param(None, "last positive-only step; overrides switch_fraction (0: no phase 1)")

        def __post_init__(self) -> None:
            check_base(self.base)
            require_range("switch_fraction", self.switch_fraction, 0.0, 1.0)
            require_int("total_steps", self.total_steps, 1)
            if self.switch_step is not None:
                require_int("switch_step", self.switch_step, 0)

    @property
    def switch_at(self) -> int:
        """s*: the last trainer step of the positive-only phase (0 = none)."""
        p = self.params
        if p.switch_step is not None:
            return p.switch_step
        return math.floor(p.switch_fraction * p.total_steps + 1e-9)

    def positive_only(self, step: int) -> bool:
        """Whether ``step`` (1-based) is in the imitation phase."""
        return step <= self.switch_at

    def sequence_advantages(self, batch: RolloutBatch) -> Tensor:
        advantage = self.base_advantages(batch)
        if self.positive_only(self.step):
            advantage = torch.where(advantage < 0, 0.0, advantage)
        return advantage.where(batch.valid, 0.0)
