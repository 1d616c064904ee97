"""ADORA: dynamic advantage weighting by a per-group length criterion (the 2025 official code).

Formula: with A_i the advantage of a ``base`` estimator (GRPO's z-score by default) and, per prompt group g,

    correct_i   = r_i > correct_threshold
    counted_i   = not correct_i and L_i < truncation_length      (incorrect, not truncated)
    advantageous(g) = max_{correct i in g} L_i  >  mean_{counted i in g} L_i
    Ã_i = A_i          if g is advantageous ("temporarily advantageous": the longest correct response is longer
                          than the mean length of the incorrect, non-truncated ones)
    Ã_i = lam * A_i    otherwise (the whole group is attenuated; lam = 0.1)

with L_i the response length (mask sum). Edge rules of the code: a group with correct responses but no counted
incorrect one (all correct, or every incorrect one truncated) is advantageous (its mean is -inf); a group with no
correct response gets lam in the Logic-RL LLM code (``no_correct="lam"``, default) and keeps weight 1 in the VL code
(``no_correct="one"``). With binary rewards a group without a correct response has A = 0 anyway; the option matters
for graded rewards.

Paper: "ADORA: Training Reasoning Models with Dynamic Advantage Estimation on Reinforcement Learning", Ren et al.
(arXiv 2602.10019); first published as a blog with code in March 2025. Official code: ``ShadeCloak/ADORA``
(``ADORA/verl/trainer/ppo/core_algos.py`` and ``ADORA_VL/openrlhf/.../experience_maker_vl.py::weight_func``).

Inputs: rewards, group, mask (and whatever ``base`` needs).

Hyperparameters:
- ``lam`` (λ, official ``lamda`` / ``--adora_lamda``): 0.1, the weight of a group that is not advantageous.
- ``correct_threshold``: a response is correct when its reward exceeds it. The VL code uses 0.5 (default; right for
  0/1 and for -1/+1 rewards); the Logic-RL code uses 1.01 for its graded {-3, ..., 3} rewards.
- ``truncation_length``: incorrect responses of at least this many tokens count as truncated and are left out of
  the incorrect mean. The official runs use 4054 (Logic-RL) and 4094 (VL) for a 4096-token limit; default None
  (nothing counts as truncated): set it just below your maximum response length to reproduce them.
- ``no_correct``: "lam" (LLM code) or "one" (VL code), see above.
- ``base`` / ``base_params``: the estimator giving A_i (grpo default; the code also applies ADORA to RLOO and
  REINFORCE-baseline advantages).

Conventions: fully masked rows get 0 and take no part in any statistic (lengths, maxima, means); singletons and
all-equal groups: whatever the base gives (0 by default), times the weight. The official LLM code keeps a
singleton's raw reward (GRPO base with ``base_params={'singleton': 'raw'}`` reproduces it, up to the 1 + eps).

Status: the 2025 code version is verified (``verified = True``). The 2026 paper generalises the criterion to
"temporarily advantageous / disadvantageous samples" with Length-Advantage and Difficulty-Advantage criteria and
modality-specific weights (attenuation for weaker VLMs, amplification for strong LLMs); those criteria and factors
are unverified and not implemented (``lam`` accepts values above 1, but that is not known to be the paper's
amplification).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.methods._common import require_choice, require_finite, require_int, require_range
from canonrl.methods._wrapped import BASE_HELP, BASE_PARAMS_HELP, WrapsBase, check_base
from canonrl.registry import Paper, param, register

ADORA_PAPER = Paper(
    "ADORA: Training Reasoning Models with Dynamic Advantage Estimation on Reinforcement Learning", "2602.10019"
)
NO_CORRECT = ("lam", "one")


@register
class ADORA(WrapsBase):
    name = "adora"
    description = "Base z-score times 1 or lam (0.1) per group: longest correct vs mean incorrect length (2025 code)"
    paper = ADORA_PAPER
    simulator_alignment = "z"

    @dataclass
    class Params:
        lam: float = param(0.1, "weight of groups that are not length-advantageous (official lamda 0.1)")
        correct_threshold: float = param(0.5, "correct means reward > this (VL code 0.5; Logic-RL code 1.01)")
        truncation_length: int | None = param(None, "incorrect responses this long count as truncated (4054/4094)")
        no_correct: str = param("lam", "group without a correct response: 'lam' (LLM code) or 'one' (VL code)")
        base: str = param("grpo", BASE_HELP)
        base_params: dict | None = param(None, BASE_PARAMS_HELP)

        def __post_init__(self) -> None:
            require_range("lam", self.lam, 0.0)
            require_finite("correct_threshold", self.correct_threshold)
            if self.truncation_length is not None:
                require_int("truncation_length", self.truncation_length, 1)
            require_choice("no_correct", self.no_correct, NO_CORRECT)
            check_base(self.base)

    def group_weights(self, batch: RolloutBatch) -> Tensor:
        """[B] float32 ADORA weight (1 or lam) of each row's group (1 for fully masked rows)."""
        p = self.params
        grouping = batch.grouping
        valid, lengths = batch.valid, batch.lengths
        correct = valid & (batch.rewards > p.correct_threshold)
        counted = valid & ~correct
        if p.truncation_length is not None:
            counted &= lengths < p.truncation_length
        # Longest correct response per group (-inf without one): a scatter-max over the group bins.
        bins = torch.where(correct, grouping.index, grouping.num_groups)
        longest = torch.full((grouping.num_groups + 1,), float("-inf"), device=lengths.device)
        longest = longest.scatter_reduce(0, bins, lengths, reduce="amax", include_self=True)[:-1]
        has_correct = grouping.sum(correct.float()) > 0
        n_counted = grouping.sum(counted.float())
        mean_incorrect = grouping.sum(lengths * counted) / n_counted.clamp_min(1)
        advantageous = has_correct & ((n_counted == 0) | (longest > mean_incorrect))
        if p.no_correct == "one":
            advantageous |= ~has_correct
        weight = torch.where(advantageous, 1.0, p.lam).float()
        return torch.where(valid, grouping.gather(weight), 1.0)

    def sequence_advantages(self, batch: RolloutBatch) -> Tensor:
        advantage = self.base_advantages(batch) * self.group_weights(batch)
        return advantage.where(batch.valid, 0.0)
