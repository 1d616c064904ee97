"""DAPO's advantage: the GRPO z-score on the correctness reward plus the soft overlong punishment.

Formula: r'_i = r_i + R_len(L_i) (see :func:`canonrl.training.shaping.overlong_penalty`); A_i = (r'_i - mean_g(r')) /
(std_g(r') + eps). With ``filter_groups`` (dynamic sampling) a group whose correctness ``r`` is the same for every
response gets exactly 0, as if it had been filtered out, even when the overlong term differs (verl filters on
``acc`` likewise). To drop such groups from the batch instead, use
:func:`canonrl.training.selection.dynamic_sampling_keep`.

Paper: "DAPO: An Open-Source LLM Reinforcement Learning System at Scale" (arXiv 2503.14476).

Inputs: rewards (correctness; DAPO's recipe uses +1 / -1), group, mask (lengths for the overlong term).

The rest of DAPO is in the loss: clip-higher (eps_low 0.2, eps_high 0.28) and token-mean aggregation.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.methods._common import require_choice, require_range, singleton_param
from canonrl.methods._normalise import STD_CHOICES, group_normalised
from canonrl.registry import Paper, SequenceEstimator, param, register
from canonrl.training.shaping import DAPO_BUFFER_LENGTH, DAPO_MAX_LENGTH, overlong_penalty

DAPO_PAPER = Paper("DAPO: An Open-Source LLM Reinforcement Learning System at Scale", "2503.14476")


@register
class DAPO(SequenceEstimator):
    name = "dapo"
    description = "GRPO z-score on correctness + soft overlong punishment; constant-accuracy groups get 0"
    paper = DAPO_PAPER
    simulator_alignment = "z"

    @dataclass
    class Params:
        overlong: bool = param(True, "add the soft overlong punishment to the reward")
        max_length: int = param(DAPO_MAX_LENGTH, "L_max: responses longer than this get -1 (DAPO: 20480)")
        buffer_length: int = param(DAPO_BUFFER_LENGTH, "L_cache: the punishment ramps over this many tokens (4096)")
        penalty_factor: float = param(1.0, "scale of the overlong punishment")
        filter_groups: bool = param(True, "groups with constant correctness get 0 (dynamic sampling)")
        eps: float = param(1e-6, "added to the group std")
        std: str = param("unbiased", "'unbiased' (N-1) or 'population' (N)")
        singleton: str = singleton_param()

        def __post_init__(self) -> None:
            require_range("eps", self.eps, 0.0)
            require_range("penalty_factor", self.penalty_factor, 0.0)
            require_choice("std", self.std, STD_CHOICES)
            if not 0 < self.buffer_length <= self.max_length:
                raise ValueError(
                    f"buffer_length must lie in (0, max_length={self.max_length}], got {self.buffer_length}"
                )

    @property
    def z_score_bound(self) -> float | None:
        return 1.0

    def sequence_advantages(self, batch: RolloutBatch) -> Tensor:
        p = self.params
        rewards = batch.rewards
        if p.overlong:
            rewards = rewards + overlong_penalty(
                batch.lengths, max_length=p.max_length, buffer_length=p.buffer_length, penalty_factor=p.penalty_factor
            )
        advantage = group_normalised(batch, rewards, eps=p.eps, std=p.std, scale="group", singleton=p.singleton)
        if p.filter_groups:
            grouping = batch.grouping
            filtered = grouping.gather(grouping.is_constant(batch.rewards)) & ~grouping.singleton
            advantage = advantage.where(~filtered, 0.0)
        return advantage
