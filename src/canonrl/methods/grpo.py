"""GRPO: the group-normalised advantage.

Formula: A_i = (r_i - mean_g(r)) / (std_g(r) + eps), with the group statistics over the valid responses of
prompt group g, broadcast to every response token.

Paper: "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models" (arXiv 2402.03300).

Inputs: rewards, group, mask.

Conventions:
- ``std="unbiased"`` (N-1) by default, as verl (``torch.std``) and TRL (``nanstd``) do; ``"population"`` divides by N.
- ``eps`` = 1e-6 as verl; TRL uses 1e-4.
- ``scale``: ``"group"`` (the group std), ``"batch"`` (one std of the rewards over all valid rows of the batch,
  TRL's ``scale_rewards="batch"``), ``"none"`` (no division, i.e. Dr.GRPO).
- A group whose rewards are all equal gets exactly 0.
- Fully masked rows get 0 and are left out of their group's statistics (unlike verl, issue #6452).
- Singletons: 0 by default; ``singleton="raw"`` gives verl's r / (1 + eps) (mean 0, std 1).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.methods._common import require_choice, require_range, singleton_param
from canonrl.methods._normalise import SCALE_CHOICES, STD_CHOICES, group_normalised
from canonrl.registry import Paper, SequenceEstimator, param, register

DEEPSEEKMATH = Paper("DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models", "2402.03300")
@register
class GRPO(SequenceEstimator):
    name = "grpo"
    description = "Group-normalised outcome advantage (r - group mean) / (group std + eps)"
    paper = DEEPSEEKMATH
    simulator_alignment = "z"
    works_in = "library, lab, verl (as `canonrl_grpo`), TRL"

    @dataclass
    class Params:
        eps: float = param(1e-6, "added to the std (verl 1e-6, TRL 1e-4)")
        std: str = param("unbiased", "'unbiased' (N-1, verl and TRL) or 'population' (N)")
        scale: str = param("group", "'group' std, 'batch' std (TRL scale_rewards='batch') or 'none' (Dr.GRPO)")
        singleton: str = singleton_param()

        def __post_init__(self) -> None:
            require_range("eps", self.eps, 0.0)
            require_choice("std", self.std, STD_CHOICES)
            require_choice("scale", self.scale, SCALE_CHOICES)

    @property
    def batch_level_reason(self) -> str | None:
        return "divides by one std of all rewards of the batch" if self.params.scale == "batch" else None

    @property
    def z_score_bound(self) -> float | None:
        return 1.0 if self.params.scale == "group" else None

    def sequence_advantages(self, batch: RolloutBatch) -> Tensor:
        p = self.params
        return group_normalised(batch, batch.rewards, eps=p.eps, std=p.std, scale=p.scale, singleton=p.singleton)
