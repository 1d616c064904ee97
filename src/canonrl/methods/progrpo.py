"""ProGRPO: GRPO with ARM, the Advantage Re-weighting Mechanism by prompt and answer confidence.

Formula (best reading, secondary source only): with A_i the advantage of a ``base`` estimator (GRPO's
(R_i - mean) / (std + δ) by default),

    Ã_i = A_i                                   if the group has no correct response
    Ã_i = A_i + alpha * (c(q) - c(o_i | q))     otherwise

    c(o_i | q) = exp( mean_{t in T_low(o_i)} log π(o_{i,t} | q, o_{i,<t}) )     ("answer confidence")

where T_low(o_i) is the ceil(low_fraction * L_i) lowest-probability positions of the response (L_i = its number of
mask positions; at least one), and c(q) in (0, 1] is the "prompt confidence", exp of the mean log-prob of the
prompt's tokens under the policy (the inverse prompt perplexity). Over-confident correct paths (c(o|q) > c(q)) are
damped and rare correct paths boosted.

Paper: "Back to Basics: Revisiting Exploration in Reinforcement Learning for LLM Reasoning via Generative
Probabilities", Li et al. (arXiv 2602.05281). No official code was found. The paper trains with DAPO-style
asymmetric clipping [0.8, 1.28] (a loss setting, not part of the advantage).

Inputs: rewards, group, mask, ``logprobs`` [B, T] (the policy's per-token log-probs of the sampled response, as
verl's ``old_log_probs``; padding may hold anything) and ``prompt_confidence`` [B] (c(q) for each row's prompt,
the same for every row of a prompt; each row's own value is used as given).

Hyperparameters:
- ``alpha``: weight of the confidence term (default 1.0; the paper's value is unverified).
- ``low_fraction``: T_low, the fraction of lowest-probability tokens (default 0.2, secondary source); 1.0 uses every
  token (the geometric-mean token probability).
- ``correct_threshold``: a response is correct when its reward exceeds it (default 0.5: 0/1 and -1/+1 rewards; the
  summary's "sum of rewards = 0" test for 0/1 rewards).
- ``skip_all_correct``: also leave groups whose responses are all correct unchanged (one summary says so;
  unverified). Off by default, so an all-correct group gets the pure confidence term alpha (c(q) - c(o_i|q)).
- ``only_correct``: add the term to the correct responses only (a reading of "equilibrate the confidence across
  correct responses"); off by default: the summarised formula adds it to every response of the group.
- ``base`` / ``base_params``: the estimator giving A_i.

Conventions: fully masked rows get 0 and take no part; singletons get the base's value (0 by default) with no
confidence term (no group, no comparison); log-probs outside the mask are ignored, NaN/Inf inside raise a
ValueError naming the rows; fractional mask values only decide which positions are tokens. The lowest-fraction
selection is vectorized: each row's in-mask log-probs are sorted (padding sorts last as +inf) and the first
ceil(low_fraction * L_i) positions are averaged through a mask built from the per-row count.

Status: best reading (``verified = False``): the exact definitions of c(q) and c(o|q), the alpha default and the
handling of all-correct groups could not be checked against the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch, describe_rows
from canonrl.methods._common import require_finite, require_range
from canonrl.methods._wrapped import BASE_HELP, BASE_PARAMS_HELP, WrapsBase, check_base
from canonrl.ops import ceil_fraction
from canonrl.registry import Paper, param, register

PROGRPO_PAPER = Paper(
    "Back to Basics: Revisiting Exploration in Reinforcement Learning for LLM Reasoning via Generative Probabilities",
    "2602.05281",
)


def masked_token_values(batch: RolloutBatch, name: str) -> Tensor:
    """[B, T] float32 per-token input ``name`` at mask positions, 0 elsewhere (padding may hold NaN/garbage).

    Raises a ValueError naming the rows where the input is NaN or Inf inside the mask.
    """
    values = getattr(batch, name)
    if values is None:
        raise ValueError(f"{name} is required here but was not given")
    inside = batch.mask != 0
    bad = (~torch.isfinite(values) & inside).any(-1)
    if bad.any():
        raise ValueError(f"{name} is NaN or Inf inside the mask at rows {describe_rows(bad)}")
    return torch.where(inside, values.float(), 0.0)


def lowest_fraction_confidence(batch: RolloutBatch, low_fraction: float) -> Tensor:
    """[B] float32 exp(mean of the ceil(low_fraction * L_i) lowest in-mask log-probs of each row); 1 for empty rows."""
    inside = batch.mask != 0
    values = masked_token_values(batch, "logprobs")
    count = inside.sum(-1)
    take = torch.minimum(ceil_fraction(count, low_fraction).clamp_min(1), count)
    # only the smallest max(take) values of each row are needed: a partial sort (topk) instead of a full one
    widest = max(int(take.max().item()), 1) if take.numel() else 1
    ordered = torch.where(inside, values, float("inf")).topk(min(widest, values.shape[-1]), -1, largest=False).values
    positions = torch.arange(ordered.shape[-1], device=ordered.device)
    selected = positions[None, :] < take[:, None]
    total = torch.where(selected, ordered, 0.0).sum(-1, dtype=torch.float32)
    return torch.exp(total / take.clamp_min(1).float())


@register
class ProGRPO(WrapsBase):
    name = "progrpo"
    description = "Best reading: base advantage + alpha (c(prompt) - c(answer, 20% least likely tokens)) if any correct"
    paper = PROGRPO_PAPER
    requires = ("logprobs", "prompt_confidence")
    verified = False
    simulator_alignment = "z"
    works_in = "library, lab, verl: no, TRL: no"

    @dataclass
    class Params:
        alpha: float = param(1.0, "weight of the confidence term c(q) - c(o|q) (paper's value unverified)")
        low_fraction: float = param(0.2, "T_low: fraction of lowest-probability tokens averaged for c(o|q)")
        correct_threshold: float = param(0.5, "correct means reward > this")
        skip_all_correct: bool = param(False, "also leave all-correct groups unchanged (unverified reading)")
        only_correct: bool = param(False, "add the term to correct responses only (default: every response)")
        base: str = param("grpo", BASE_HELP)
        base_params: dict | None = param(None, BASE_PARAMS_HELP)

        def __post_init__(self) -> None:
            require_range("alpha", self.alpha, 0.0)
            require_range("low_fraction", self.low_fraction, 0.0, 1.0, low_open=True)
            require_finite("correct_threshold", self.correct_threshold)
            for name in ("skip_all_correct", "only_correct"):
                if not isinstance(getattr(self, name), bool):
                    raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
            check_base(self.base)

    def answer_confidence(self, batch: RolloutBatch) -> Tensor:
        """[B] c(o_i | q) of every row (1 for fully masked rows)."""
        return lowest_fraction_confidence(batch, self.params.low_fraction)

    def sequence_advantages(self, batch: RolloutBatch) -> Tensor:
        p = self.params
        advantage = self.base_advantages(batch)
        grouping = batch.grouping
        valid = batch.valid
        correct = valid & (batch.rewards > p.correct_threshold)
        n_correct = grouping.sum(correct.float())
        reweighted = n_correct > 0
        if p.skip_all_correct:
            reweighted &= n_correct < grouping.count
        apply = valid & ~grouping.singleton & grouping.gather(reweighted)
        if p.only_correct:
            apply &= correct
        term = p.alpha * (batch.prompt_confidence.float() - self.answer_confidence(batch))
        advantage = advantage + torch.where(apply, term, 0.0)
        return advantage.where(valid, 0.0)
