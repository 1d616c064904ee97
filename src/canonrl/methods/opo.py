"""OPO: the length-weighted group-mean baseline ("optimal" reward baseline).

Formula: b_g = sum_j L_j r_j / sum_j L_j over the valid responses j of prompt group g (L_j = response length in
tokens, the row sum of the mask); A_i = r_i - b_g, broadcast to every response token. No std.

Paper: "On-Policy RL with Optimal Reward Baseline" (arXiv 2505.23585).

Inputs: rewards, group, mask (the lengths). A fractional mask value counts as that fraction of a token.

The paper's other half is *exact on-policy* training (one gradient step per batch): configure ``ppo_epochs=1`` and
mini-batch = batch; that part is outside the estimator (and was not verified here).

Conventions: all-equal groups get exactly 0; fully masked rows get 0 and take no part in the baseline; singletons get
0 by default, ``singleton="raw"`` keeps r (verl's b = 0). Not zero-sum within a group (the weights are lengths).

Verified against verl's ``compute_opo_outcome_advantage``; the authors' repository was not checked.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.methods._common import finish, singleton_param
from canonrl.registry import Paper, SequenceEstimator, register

OPO_PAPER = Paper("On-Policy RL with Optimal Reward Baseline", "2505.23585")


@register
class OPO(SequenceEstimator):
    name = "opo"
    description = "Length-weighted group baseline: r - sum(L r) / sum(L) over the group (L = response length)"
    paper = OPO_PAPER
    simulator_alignment = "centred"
    works_in = "library, lab, verl (as `canonrl_opo`), TRL"

    @dataclass
    class Params:
        singleton: str = singleton_param()

    def sequence_advantages(self, batch: RolloutBatch) -> Tensor:
        grouping = batch.grouping
        rewards, lengths = batch.rewards, batch.lengths
        baseline = grouping.sum(lengths * rewards) / grouping.sum(lengths).clamp_min(1e-30)
        advantage = rewards - grouping.gather(baseline)
        advantage = advantage.where(~grouping.gather(grouping.is_constant(rewards)), 0.0)
        return finish(batch, advantage, singleton=self.params.singleton, raw=rewards)
