"""AAPO: the GRPO z-score plus a clipped "advantage momentum" against the frozen reference policy.

Formula (from the official code, ``JianxXiong/AAPO``, ``open-r1/trainer/AAPOTrainer.py``):

    delta_i = r(o_i) - r(o_ref_i)
    A_i = (r_i - mean_g(r)) / (std_g(r) + 1e-4) + clip(delta_i, clip_low, clip_high),   clip to [-0.2, 0.28]

where o_ref_i is one response that the frozen reference policy (TRL's ref model = the initial policy) sampled for
the same prompt row, scored with the same reward. The std is the unbiased (N-1) group std, as TRL's.

Paper: "AAPO: Enhancing the Reasoning Capabilities of LLMs with Advantage Momentum" (arXiv 2505.14264).
Best reading: the description is code-derived; the paper's own equation was not read (``verified = False``).

Inputs: rewards, group, mask, and ``reference_rewards`` [B]: the reward of the reference policy's response for each
row's prompt (doubles the generation cost).

Loss pairing: the official trainer uses a plain cross-entropy/REINFORCE loss, loss = -sum_tokens log pi(y_t) * A_i /
#tokens, with no ratio, no clipping and no KL term (its config sets beta = 0.1 only so that the reference model is
loaded).

Conventions: all-equal groups keep the momentum term clip(delta_i) (that is the point: they still get a gradient);
singletons get 0 for the z-score by default (``singleton="raw"``: r / (1 + eps), verl's convention) plus their
momentum term, which needs no group; fully masked rows get 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.methods._common import require_choice, require_range, singleton_param
from canonrl.methods._normalise import STD_CHOICES, group_normalised
from canonrl.registry import Paper, SequenceEstimator, param, register

AAPO_PAPER = Paper("AAPO: Enhancing the Reasoning Capabilities of LLMs with Advantage Momentum", "2505.14264")


@register
class AAPO(SequenceEstimator):
    name = "aapo"
    description = "GRPO z-score + clip(r - r(reference policy's response), -0.2, 0.28) (best reading, code-derived)"
    paper = AAPO_PAPER
    requires = ("reference_rewards",)
    verified = False
    simulator_alignment = "z"
    works_in = "library, lab, verl: no, TRL: no"

    @dataclass
    class Params:
        clip_low: float = param(-0.2, "lower bound of the momentum term r - r_ref (official -0.2)")
        clip_high: float = param(0.28, "upper bound of the momentum term r - r_ref (official 0.28)")
        eps: float = param(1e-4, "added to the group std (official/TRL 1e-4)")
        std: str = param("unbiased", "'unbiased' (N-1, TRL) or 'population' (N)")
        singleton: str = singleton_param()

        def __post_init__(self) -> None:
            if not self.clip_low <= 0.0 <= self.clip_high:
                raise ValueError(
                    f"clip_low must be <= 0 <= clip_high, got clip_low={self.clip_low!r}, clip_high={self.clip_high!r}"
                )
            require_range("eps", self.eps, 0.0)
            require_choice("std", self.std, STD_CHOICES)

    @property
    def z_score_bound(self) -> float | None:
        return 1.0

    def sequence_advantages(self, batch: RolloutBatch) -> Tensor:
        p = self.params
        z = group_normalised(batch, batch.rewards, eps=p.eps, std=p.std, scale="group", singleton=p.singleton)
        momentum = (batch.rewards - batch.reference_rewards).clamp(p.clip_low, p.clip_high)
        return (z + momentum).where(batch.valid, 0.0)
