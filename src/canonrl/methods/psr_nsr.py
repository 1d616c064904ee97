"""PSR / NSR / W-REINFORCE: reinforce correct answers, penalise wrong ones, or both with a weight (and GRPO-N).

Formulas (paper "The Surprising Effectiveness of Negative Reinforcement in LLM Reasoning", arXiv 2506.01347, and its
official code ``TianHongZXY/RLVR-Decomposed``, ``compute_psr_nsr_outcome_advantage``), with a response *correct* when
r > ``correct_threshold`` (0.5: 1 of 0/1 and +1 of -1/+1 rewards), no baseline and no group normalisation:

    mode="psr"          A = +1 on correct responses, 0 on the others (the official trainer drops them from the batch)
    mode="nsr"          A = -1 on incorrect responses, 0 on the others (dropped likewise)
    mode="w_reinforce"  A = +lambda on correct, -1 on incorrect; lambda = ``positive_weight`` = 0.1 (recommended)
    mode="grpo_n"       A = min(z_i, 0), z the GRPO z-score (unbiased std + eps): GRPO-N of "The Debate on RLVR
                        Reasoning Capability Boundary: Shrinkage, Expansion, or Both?" (arXiv 2510.04028). Best
                        reading: from the abstract and reviews (secondary sources); the exact masking is unverified.

The official trainer *subsets* the batch for PSR/NSR; here the excluded rows get 0, which gives the same gradient
direction, but a token-mean loss then averages over all tokens of the batch instead of the kept ones (scale the
loss, or drop the zero rows, to match exactly).

``form="code"`` reproduces the official arithmetic on the reward values: correct means r == 1, incorrect r in
{0, -1}; psr A = r on correct rows, nsr A = r - 1 on incorrect rows, w_reinforce A = lambda * r on correct and
r - 1 on incorrect rows (so -2 for a -1 reward) and A = r on rows that are neither. With 0/1 rewards the two forms
agree.

Inputs: rewards, group (read only by grpo_n), mask.

Loss: the standard PPO-clip token loss (script defaults: n = 8, lr 1e-6, no KL). Conventions: fully masked rows get
0; psr/nsr/w_reinforce have no baseline, so singletons and all-equal groups are ordinary rows (an all-correct group
gets +lambda); grpo_n follows GRPO (all-equal groups 0, singletons 0 or ``singleton="raw"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.methods._common import require_choice, require_finite, require_range, singleton_param
from canonrl.methods._normalise import group_normalised
from canonrl.registry import Paper, SequenceEstimator, param, register

NSR_PAPER = Paper("The Surprising Effectiveness of Negative Reinforcement in LLM Reasoning", "2506.01347")
MODES = ("w_reinforce", "psr", "nsr", "grpo_n")
FORMS = ("paper", "code")


@register
class PSRNSR(SequenceEstimator):
    name = "psr_nsr"
    description = "W-REINFORCE (+lambda correct, -1 wrong), PSR (+1 correct), NSR (-1 wrong) or GRPO-N min(z, 0)"
    paper = NSR_PAPER

    @dataclass
    class Params:
        mode: str = param("w_reinforce", "'w_reinforce', 'psr', 'nsr' or 'grpo_n' (GRPO-N: best reading)")
        positive_weight: float = param(0.1, "lambda of W-REINFORCE: the advantage of a correct response (0.1)")
        correct_threshold: float = param(0.5, "form='paper': a response is correct when r > this")
        form: str = param("paper", "'paper' (+lambda / -1 by correctness) or 'code' (official arithmetic on r)")
        eps: float = param(1e-6, "grpo_n: added to the group std")
        singleton: str = singleton_param()

        def __post_init__(self) -> None:
            require_choice("mode", self.mode, MODES)
            require_choice("form", self.form, FORMS)
            require_range("positive_weight", self.positive_weight, 0.0)
            require_range("eps", self.eps, 0.0)
            require_finite("correct_threshold", self.correct_threshold)

    @property
    def z_score_bound(self) -> float | None:
        return 1.0 if self.params.mode == "grpo_n" else None

    def sequence_advantages(self, batch: RolloutBatch) -> Tensor:
        p = self.params
        r = batch.rewards
        if p.mode == "grpo_n":
            z = group_normalised(batch, r, eps=p.eps, std="unbiased", scale="group", singleton=p.singleton)
            return z.clamp(max=0.0)
        if p.form == "paper":
            correct = r > p.correct_threshold
            positive = torch.where(correct, 1.0, 0.0)
            negative = torch.where(correct, 0.0, -1.0)
            weighted = torch.where(correct, p.positive_weight, -1.0)
        else:
            correct = r == 1
            incorrect = (r == 0) | (r == -1)
            positive = torch.where(correct, r, 0.0)
            negative = torch.where(incorrect, r - 1, 0.0)
            weighted = torch.where(correct, p.positive_weight * r, torch.where(incorrect, r - 1, r))
        advantage = {"psr": positive, "nsr": negative, "w_reinforce": weighted}[p.mode]
        return advantage.to(torch.float32).where(batch.valid, 0.0)
