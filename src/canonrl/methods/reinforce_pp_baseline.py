"""REINFORCE++-baseline: group-mean baseline, then whitening over every response token of the batch.

Formula: s_i = r_i - mean_g(r); A_{i,t} = (s_i - mean_tok(s)) / sqrt(var_tok(s) + 1e-8), where the token statistics
weight each response by its number of mask tokens and the variance is unbiased (verl's ``masked_whiten``).

Paper: "REINFORCE++: An Efficient RLHF Algorithm with Robustness to Both Prompt and Reward Models"
(arXiv 2501.03262).

Inputs: rewards, group, mask.

Conventions: because of the batch whitening an all-equal group does not get 0 but -mean_tok/std_tok (intended by
the method). Fully masked rows get 0 and do not enter their group's mean (verl counts them, issue #6452). A
singleton's baseline is 0 with ``singleton="raw"`` (verl) and its score is 0 before whitening with the default
``"zero"``. Computed from per-response sums: no [B, T] intermediate.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.methods._common import finish, singleton_param
from canonrl.methods.reinforce_pp import REINFORCE_PP
from canonrl.ops import whiten_broadcast_scores
from canonrl.registry import Estimator, register


@register
class ReinforcePlusPlusBaseline(Estimator):
    name = "reinforce_pp_baseline"
    description = "REINFORCE++-baseline: r - group mean, then whitened over all response tokens of the batch"
    paper = REINFORCE_PP
    level = "token"

    @dataclass
    class Params:
        singleton: str = singleton_param()

    @property
    def batch_level_reason(self) -> str | None:
        return "group baseline, then whitened over all tokens of the batch"

    def compute(self, batch: RolloutBatch) -> Tensor:
        centered = batch.grouping.centered(batch.rewards)
        scores = finish(batch, centered, singleton=self.params.singleton, raw=batch.rewards)
        return batch.broadcast(whiten_broadcast_scores(scores, batch.lengths))
