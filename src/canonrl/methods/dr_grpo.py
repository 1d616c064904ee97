"""Dr.GRPO: the group-mean baseline without std normalisation.

Formula: A_i = r_i - mean_g(r), broadcast to every response token.

Paper: "Understanding R1-Zero-Like Training: A Critical Perspective" (arXiv 2503.20783).

Inputs: rewards, group, mask.

The method's other half is the loss aggregation: sum each response's token losses and divide by a constant (the
maximum response length) instead of by the response's own length. In verl that is
``actor.loss_agg_mode=seq-mean-token-sum-norm`` (with ``norm_adv_by_std_in_grpo=False``); in TRL
``loss_type="dr_grpo"`` (with ``scale_rewards="none"``); in the canonrl lab ``loss_agg=seq-mean-token-sum-norm``.

Conventions: all-equal groups get exactly 0; fully masked rows get 0 and do not enter the mean; singletons get 0 by
default, ``singleton="raw"`` keeps the raw reward (verl; the official code reshapes by group size and gives 0).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.methods._common import finish, singleton_param
from canonrl.registry import Paper, SequenceEstimator, register

DR_GRPO = Paper("Understanding R1-Zero-Like Training: A Critical Perspective", "2503.20783")


@register
class DrGRPO(SequenceEstimator):
    name = "dr_grpo"
    description = "Group-mean baseline r - mean, no std (pair with a constant-normalised token-sum loss)"
    paper = DR_GRPO
    simulator_alignment = "centred"

    @dataclass
    class Params:
        singleton: str = singleton_param()

    def sequence_advantages(self, batch: RolloutBatch) -> Tensor:
        centered = batch.grouping.centered(batch.rewards)
        return finish(batch, centered, singleton=self.params.singleton, raw=batch.rewards)
