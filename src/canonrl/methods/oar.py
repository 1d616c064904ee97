"""OAR: Outcome-grounded Advantage Reshaping — a base advantage spread over tokens by their influence on the answer.

Formula (official code ``calculate_oar_hybrid_weights``), per response i over its R response tokens r (the mask
positions), from a per-token importance I_r >= 0 given as ``token_scores``:

    s_r = log(1 + I_r)
    n_r = (s_r - min s) / (max s - min s)        (n = 0 when max s = min s)
    tau = quantile(n, q)                         (linear interpolation, as numpy)
    w_r = max(n_r / (tau + 1e-8), floor)          if n_r <  tau     ("noise suppression")
    w_r = 1 + beta (n_r - tau) / (1 - tau + 1e-8) if n_r >= tau     ("signal boosting")
    w_r <- w_r R / (sum w + 1e-8)                 if sum_to_length  (the total advantage mass is kept)
    A_{i,r} = A_i w_r

with A_i the advantage of the sequence-level ``base`` estimator (GRPO by default; any registered one).

OAR-P and OAR-G differ only in where I comes from: OAR-P takes I_r = KL(P_final || P_final with y_r replaced by
[PAD]) (one forward per token), OAR-G takes I_r = |<dJ/de_r, e_r>|, the gradient x input of J = KL(p0 || p_noisy)
with embedding noise sigma = 1e-3 on the reasoning positions (one forward-backward per response). Both are
computed outside the estimator (a lab-pass generator) and passed as ``token_scores``; this estimator is the
reshaping both feed.

Paper: "Outcome-Grounded Advantage Reshaping for Fine-Grained Credit Assignment in Mathematical Reasoning"
(arXiv 2601.07408). Official code: ``Valsure/Outcome-Grounded-Advantage-Reshaping`` (``OAR-main.py``, a fragment
without a runnable pipeline or defaults).

Inputs: rewards, group, mask, token_scores [B, T] (the importance; and whatever ``base`` needs).

Conventions:
- Every response token counts as "reasoning" (the code reshapes the first R response tokens and leaves the rest at
  weight 1; which span is "reasoning" is not specified).
- Constant importance (and R = 1) gives w = 1: the base advantage unchanged. A constant group gets 0 when its base
  gives 0. Fully masked rows get 0.
- Negative importance (possible with the code's ``answer_joint`` mode, phi - phi^(r)) is clamped at 0
  (``negative="clamp"``, the spec's unverified fix: log(1 + I) needs I > -1) or raises (``negative="error"``).
- token_scores may hold anything outside the mask; NaN or Inf inside it raises, naming the rows.

Differences from the official code: none in the formula; its call of the OAR-G scorer passes an extra argument
that does not match the scorer's signature (the fragment does not run as is). q, beta and sum_to_length have no
defaults upstream and the paper values are unverified: q = 0.5, beta = 1, sum_to_length = True are a best reading.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch, describe_rows
from canonrl.methods._common import require_choice, require_range
from canonrl.methods._wrapped import BASE_HELP, BASE_PARAMS_HELP, HasBase, check_base
from canonrl.methods.progrpo import masked_token_values
from canonrl.registry import Estimator, Paper, param, register

OAR_PAPER = Paper(
    "Outcome-Grounded Advantage Reshaping for Fine-Grained Credit Assignment in Mathematical Reasoning", "2601.07408"
)
NEGATIVE_CHOICES = ("clamp", "error")
EPS = 1e-8


def reshaping_weights(
    importance: Tensor, inside: Tensor, *, q: float, beta: float, floor: float, sum_to_length: bool
) -> Tensor:
    """[B, T] float64 OAR weights of each row's ``inside`` positions (0 elsewhere) from importance >= 0."""
    score = torch.log1p(importance.double())
    high, low = torch.where(inside, score, -torch.inf), torch.where(inside, score, torch.inf)
    top, bottom = high.amax(-1, keepdim=True), low.amin(-1, keepdim=True)
    spread = top - bottom
    spread = torch.where(torch.isfinite(spread) & (spread > 0), spread, 1.0)
    normalised = torch.where(inside, (score - bottom) / spread, 0.0)
    normalised = torch.where(inside & (top > bottom), normalised, 0.0)
    # Per-row linear quantile of the inside values: sort them first, padding (+inf) last.
    ordered = torch.sort(torch.where(inside, normalised, torch.inf), dim=-1).values
    count = inside.sum(-1, keepdim=True)
    position = q * (count - 1).clamp_min(0).double()
    lower = position.floor().long()
    upper = torch.minimum(lower + 1, (count - 1).clamp_min(0))
    fraction = position - lower
    at_lower, at_upper = ordered.gather(1, lower), ordered.gather(1, upper)
    at_upper = torch.where(torch.isfinite(at_upper), at_upper, at_lower)
    tau = torch.where(count > 0, at_lower + fraction * (at_upper - at_lower), 0.0)
    tau = torch.where(torch.isfinite(tau), tau, 0.0)
    suppressed = torch.clamp_min(normalised / (tau + EPS), floor)
    boosted = 1.0 + beta * (normalised - tau) / (1.0 - tau + EPS)
    weights = torch.where(inside, torch.where(normalised < tau, suppressed, boosted), 0.0)
    if sum_to_length:
        total = weights.sum(-1, keepdim=True)
        weights = torch.where(total > 0, weights * count / (total + EPS), inside.double())
    return weights


@register
class OAR(HasBase, Estimator):
    name = "oar"
    description = "Token-level: base advantage x bi-level importance weights (OAR-P / OAR-G importance as input)"
    paper = OAR_PAPER
    level = "token"
    requires = ("token_scores",)
    verified = False
    simulator_alignment = "z"
    works_in = "library (token_scores needs an importance generator: OAR-P or OAR-G)"
    inputs_note = "`token_scores` (per-token importance, >= 0) (+ the base's)"
    producer = "per-token importance: perturbed forward passes (OAR-P) or one backward pass (OAR-G)"

    @dataclass
    class Params:
        base: str = param("grpo", BASE_HELP)
        base_params: dict | None = param(None, BASE_PARAMS_HELP)
        q: float = param(0.5, "quantile level of the threshold tau (code: args.threshold; unverified)")
        beta: float = param(1.0, "boost of tokens above tau (code: args.beta; unverified)")
        sum_to_length: bool = param(True, "rescale the weights to sum to the row's length (code: sum_to_L)")
        floor: float = param(0.1, "smallest weight of a suppressed token (hard-coded 0.1 upstream)")
        negative: str = param("clamp", "negative importance: 'clamp' at 0 (spec's fix) or 'error'")

        def __post_init__(self) -> None:
            check_base(self.base, "oar")
            require_range("q", self.q, 0.0, 1.0)
            require_range("beta", self.beta, 0.0)
            require_range("floor", self.floor, 0.0)
            require_choice("negative", self.negative, NEGATIVE_CHOICES)

    def weights(self, batch: RolloutBatch) -> Tensor:
        """[B, T] float64 reshaping weights at mask positions (0 elsewhere)."""
        p = self.params
        inside = batch.mask != 0
        importance = masked_token_values(batch, "token_scores").double()
        negative = (importance < 0).any(-1)
        if negative.any():
            if p.negative == "error":
                raise ValueError(f"token_scores (importance) is negative at rows {describe_rows(negative)}")
            importance = importance.clamp_min(0.0)
        return reshaping_weights(importance, inside, q=p.q, beta=p.beta, floor=p.floor, sum_to_length=p.sum_to_length)

    def compute(self, batch: RolloutBatch) -> Tensor:
        if batch.token_scores is None:
            raise ValueError("estimator 'oar' needs 'token_scores', which was not given")
        self.base.step = self.step
        sequence = self.base.sequence_advantages(batch)
        return (batch.broadcast(sequence).double() * self.weights(batch)).float()
