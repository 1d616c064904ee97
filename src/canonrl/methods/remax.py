"""ReMax: the greedy response's reward as the baseline.

Formula: A_i = r_i - r(greedy response to the prompt of row i), broadcast to every response token.

Paper: "ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for Aligning Large Language Models"
(arXiv 2310.10505).

Inputs: rewards, group, mask, and ``greedy_rewards`` [B]: for each row, the reward of one greedy (``do_sample=False``)
response to the same prompt (verl's ``reward_baselines``; the trainer decodes one extra greedy response per prompt
and repeats its score over the prompt's rows).

Conventions: no grouping and no std: a group of one response (G = 1) is the normal case, so there is no singleton
policy; ``group`` is accepted but not read. A response as good as the greedy one gets exactly 0. Fully masked rows
get 0. verl (``compute_remax_outcome_advantage``) subtracts the baseline from the token-level return-to-go; with an
outcome reward on the last token that return is r_i at every response token, so the two agree.

Verified against verl's implementation (the formula of the paper's Algorithm 1); the authors' own repository was not
checked.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.registry import Paper, SequenceEstimator, register

REMAX_PAPER = Paper(
    "ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for Aligning Large Language Models",
    "2310.10505",
)


@register
class ReMax(SequenceEstimator):
    name = "remax"
    description = "Greedy baseline: r minus the reward of a greedy response to the same prompt (needs greedy_rewards)"
    paper = REMAX_PAPER
    requires = ("greedy_rewards",)
    simulator_alignment = "centred"
    works_in = (
        "library, lab, verl: no (verl decodes greedy baselines only for its own `remax`, which `canonrl_remax` equals "
        "within 1e-5), TRL: no"
    )

    @dataclass
    class Params:
        pass

    def sequence_advantages(self, batch: RolloutBatch) -> Tensor:
        advantage = batch.rewards - batch.greedy_rewards
        return advantage.where(batch.valid, 0.0)
