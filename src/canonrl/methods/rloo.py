"""RLOO: the leave-one-out baseline.

Formula: A_i = r_i - (1/(n-1)) * sum_{j != i} r_j = n/(n-1) * (r_i - mean_g(r)), n the group's valid responses.

Paper: "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs"
(arXiv 2402.14740).

Inputs: rewards, group, mask.

Conventions: all-equal groups get exactly 0; fully masked rows get 0 and are not siblings of anyone; singletons
(no sibling to leave out) get 0 by default as verl's ``rloo_vectorized`` and TRL do, ``singleton="raw"`` keeps the
raw reward as verl's loop ``rloo`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.methods._common import finish, singleton_param
from canonrl.registry import Paper, SequenceEstimator, register

RLOO_PAPER = Paper(
    "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs", "2402.14740"
)


@register
class RLOO(SequenceEstimator):
    name = "rloo"
    description = "Leave-one-out baseline: r minus the mean reward of the other responses of the group"
    paper = RLOO_PAPER
    simulator_alignment = "centred"
    works_in = "library, lab, verl (as `canonrl_rloo`), TRL"

    @dataclass
    class Params:
        singleton: str = singleton_param()

    def sequence_advantages(self, batch: RolloutBatch) -> Tensor:
        grouping = batch.grouping
        count = grouping.row_count
        advantage = grouping.centered(batch.rewards) * count / (count - 1).clamp_min(1)
        return finish(batch, advantage, singleton=self.params.singleton, raw=batch.rewards)
