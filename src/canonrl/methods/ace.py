"""ACE: Asymmetric Confidence-aware Error penalty — stronger correction of over-confident errors.

Formula (best reading): with A_i the advantage of a ``base`` estimator (GRPO by default) and the sequence-level
confidence shift of response y_i (from the paper)

    c_i = log π_θ(y_i | x) - log π_ref(y_i | x) = sum_t (logprobs_{i,t} - ref_logprobs_{i,t})     (over the mask)

negative advantages are modulated (secondary source only):

    Ã_i = A_i * (1 + alpha * softplus(c_i))    if A_i < 0
    Ã_i = A_i                                  otherwise (correct rollouts unchanged)

so errors the policy has become more confident in than the reference (c_i > 0: "spuriously reinforced") get an
amplified penalty. The paper reports softplus beating ReLU (``activation="relu"``: the ablation, max(c_i, 0)) and
reads the gradient as a selective reverse-KL regularizer on over-confident errors (its Theorem 1).

Paper: "Overconfident Errors Need Stronger Correction: Asymmetric Confidence Penalties for Reinforcement Learning",
Xu et al. (arXiv 2602.21420). No official code was found. Setup: GRPO and DAPO in verl.

Inputs: rewards, group, mask, ``logprobs`` and ``ref_logprobs`` [B, T]: the per-token log-probs of the sampled
response under the policy (verl's ``old_log_probs``) and under the frozen reference (verl's ``ref_log_prob``; the
reference must be loaded even when the KL coefficient is 0). Padding may hold anything.

Hyperparameters:
- ``alpha``: strength of the modulation (default 1.0; the paper's value is unverified).
- ``activation``: "softplus" (default, the paper's choice) or "relu" (its ablation).
- ``length_normalize``: divide c_i by the response length (mask sum), i.e. a per-token mean log-ratio. Off by
  default: the paper defines c_i on whole sequences. Note that sequence sums grow with the length, so that with long
  responses softplus(c_i) ~ c_i can amplify a penalty many times; normalising (or a small alpha) bounds it.
- ``base`` / ``base_params``: the estimator giving A_i.

Conventions: "incorrect rollouts" are read as the rows with a negative base advantage (for binary rewards and a
group-relative base these are exactly the incorrect responses of mixed groups; all-incorrect groups have A = 0
and stay 0). A_i >= 0, singletons, all-equal groups: unchanged base values (0 by default). Fully masked rows get 0.
Log-probs outside the mask are ignored; NaN/Inf inside raise a ValueError naming the rows. Mask values weight the
tokens of c_i as verl's masked sums do.

Status: best reading (``verified = False``): c_i is from the paper; the exact modulation equation, alpha and
whether c_i is length-normalised could not be verified.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from canonrl.batch import RolloutBatch, describe_rows
from canonrl.methods._common import require_choice, require_range
from canonrl.methods._wrapped import BASE_HELP, BASE_PARAMS_HELP, WrapsBase, check_base
from canonrl.registry import Paper, param, register

ACE_PAPER = Paper(
    "Overconfident Errors Need Stronger Correction: Asymmetric Confidence Penalties for Reinforcement Learning",
    "2602.21420",
)
ACTIVATIONS = ("softplus", "relu")


@register
class ACE(WrapsBase):
    name = "ace"
    description = "Best reading: negative base advantages times 1 + alpha softplus(log pi/pi_ref of the response)"
    paper = ACE_PAPER
    requires = ("logprobs", "ref_logprobs")
    verified = False
    simulator_alignment = "z"
    works_in = "library, lab, verl (with the patch and a reference policy), TRL (beta > 0)"

    @dataclass
    class Params:
        alpha: float = param(1.0, "strength of the modulation of negative advantages (paper's value unverified)")
        activation: str = param("softplus", "'softplus' (paper) or 'relu' (its ablation) of the confidence shift")
        length_normalize: bool = param(False, "divide c_i by the response length (default: sequence sum, as the paper)")
        base: str = param("grpo", BASE_HELP)
        base_params: dict | None = param(None, BASE_PARAMS_HELP)

        def __post_init__(self) -> None:
            require_range("alpha", self.alpha, 0.0)
            require_choice("activation", self.activation, ACTIVATIONS)
            if not isinstance(self.length_normalize, bool):
                raise ValueError(f"length_normalize must be True or False, got {self.length_normalize!r}")
            check_base(self.base)

    def confidence_shift(self, batch: RolloutBatch) -> Tensor:
        """[B] float32 c_i: sum over the mask of logprobs - ref_logprobs (a mean if length_normalize); 0 if empty."""
        shift = batch.masked_row_sum("logprobs") - batch.masked_row_sum("ref_logprobs")
        if self.params.length_normalize:
            shift = shift / batch.lengths.clamp_min(1e-30)
        return torch.where(batch.valid, shift, 0.0)

    def sequence_advantages(self, batch: RolloutBatch) -> Tensor:
        p = self.params
        advantage = self.base_advantages(batch)
        shift = self.confidence_shift(batch)
        activated = F.softplus(shift) if p.activation == "softplus" else shift.clamp_min(0.0)
        modulated = advantage * (1.0 + p.alpha * activated)
        advantage = torch.where(advantage < 0, modulated, advantage).where(batch.valid, 0.0)
        overflow = ~torch.isfinite(advantage)
        if overflow.any():
            raise ValueError(
                f"ace: the modulated advantage overflows float32 at rows {describe_rows(overflow)} (confidence shift "
                f"{shift[overflow][:3].tolist()}); use length_normalize=True or a smaller alpha"
            )
        return advantage
