"""MAPO for multi-turn dialogue: turn returns of judge scores, normalised per turn position and over the batch, mixed.

Formula: G_t = sum_{k >= t} gamma^(k - t) s_k, the return of the per-turn judge scores s; A^turn = (G - mean) /
(std + eps) over the dialogues of the same scenario (prompt group) at the same turn position; A^batch = (G - mean) /
(std + eps) over every turn of the batch; A = beta * A^turn + (1 - beta) * A^batch.

Paper: "MAPO: Mixed Advantage Policy Optimization for Long-Horizon Multi-Turn Dialogue" (arXiv 2603.06194; not the
single-turn ``mapo`` of arXiv 2509.18849). No official code was found: this is the catalogue's reconstruction from
the abstract (``verified`` False); the mixing rule, beta, gamma and the turn-position grouping are hyperparameters.

Inputs: ``step_rewards`` the judge's score of each turn; ``turn_ids`` (row per dialogue) or ``traj``/``step_index``
(row per turn); ``group`` the scenario.

Conventions: unbiased std; a turn alone at its position gets A^turn = 0; constant groups give exactly 0; time order
from the turn order (``step_index``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.methods._common import require_range
from canonrl.methods._steps import group_relative
from canonrl.registry import Paper, StepEstimator, param, register

MAPO_DIALOGUE = Paper("MAPO: Mixed Advantage Policy Optimization for Long-Horizon Multi-Turn Dialogue", "2603.06194")


@register
class MAPODialogue(StepEstimator):
    name = "mapo_dialogue"
    description = "Multi-turn dialogue: mix of turn-position and batch z-scores of judge-score returns (best reading)"
    paper = MAPO_DIALOGUE
    requires = ("step_rewards",)
    verified = False

    @dataclass
    class Params:
        beta: float = param(0.5, "weight of the turn-level normalisation (1 - beta: batch-level)")
        gamma: float = param(1.0, "discount of the turn returns")
        eps: float = param(1e-6, "added to the std")

        def __post_init__(self) -> None:
            require_range("beta", self.beta, 0.0, 1.0)
            require_range("gamma", self.gamma, 0.0, 1.0)
            require_range("eps", self.eps, 0.0)

    @property
    def batch_level_reason(self) -> str | None:
        return None if self.params.beta == 1.0 else "mixes in z-scores over the whole batch (beta < 1)"

    def step_advantages(self, batch: RolloutBatch) -> Tensor:
        p, steps = self.params, batch.steps
        returns = steps.returns(steps.per_step("step_rewards", batch.step_rewards), p.gamma)
        options = dict(scale="unbiased", eps=p.eps, numerics="exact")
        per_turn = group_relative(steps.by(steps.group, steps.pos), returns, **options)
        whole_batch = group_relative(steps.by(), returns, **options)
        return p.beta * per_turn + (1 - p.beta) * whole_batch
