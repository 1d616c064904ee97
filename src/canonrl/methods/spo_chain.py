"""SPO-chain: segment advantages from Monte Carlo values at the cut points, with the probability mask.

Formula (from the official code, steps.md §4 and §8): a response is cut into segments, each ending at a value point
(a cut point, then the response's last token); V_k is the Monte Carlo value of the state at the end of segment k
(``step_values``; the outcome score for the last segment). Then

    A_k = V_k - V_{k-1}                   for k > 0
    A_0 = V_0 - V_prompt                  when ``prompt_values`` gives V_prompt (a cut point at -1, the bare prompt)
    A_0 = 0                               otherwise (``first_segment="zero"``, the official code), or
    A_0 = V_0 - 0                         with ``first_segment="from_zero"`` (a base of 0)

and every token of segment k takes A_k. With the probability mask (``prob_mask=True``, the official episode builder)
a token sampled with probability exp(logprob) strictly above ``prob_threshold`` (0.9) gets 0, so only the
low-probability "decision" tokens carry the segment's advantage.

Paper: "Segment Policy Optimization: Effective Segment-Level Credit Assignment in RL for Large Language Models"
(SPO, arXiv 2505.23564). Official code: ``AIFrameResearch/SPO`` at b9fc6a2,
``src/treetune/episode_generators/math_episode_generator_with_mc_advantages.py`` (``_compute_token_advantages``)
and ``src/treetune/trainers/ppo_trainer.py`` (``use_prob_mask``). Parity: the official
code transcribed in tests/official_spo.py, checked in tests/test_spo_parity.py.

Inputs: ``rewards``, ``group`` (read by no statistic), mask, ``step_values`` (per step), ``prompt_values`` ([B]; NaN
= absent, per trajectory), ``logprobs`` ([B, T], when ``prob_mask``), and the segments:

- row per response: ``turn_ids`` [B, T] numbering the segments 0, 1, ... (a segment = the tokens up to and including
  its value point; tokens in no segment get 0);
- row per segment: one row per segment, ``traj`` and ``step_index`` giving its response and position (−1: padding).

The value before a trajectory's first segment is the ``prompt_values`` entry of the row of that first segment. Both
layouts give the same numbers.

Edge cases: a segment without mask tokens gets 0, but its value still serves as the base of the next segment; equal
values give exactly 0; a response with one segment and no prompt value gets 0 (no cut point: the official code's
"all advantages 0"); log-probs off the mask are ignored; a prompt value of +-Inf raises.

Differences from the official code: the cut points, the Monte Carlo rollouts and their values are the caller's (this
estimator takes the values); the trainer's extra loss-mask drop of tokens with exp(old_logprob) >= 0.9 is a loss-side
mask, not an advantage, and is not applied here (the advantage of those tokens is 0 except at exactly 0.9).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch, describe_row_indices
from canonrl.methods._common import require_choice, require_range
from canonrl.registry import Paper, StepEstimator, param, register

SPO_PAPER = Paper(
    "Segment Policy Optimization: Effective Segment-Level Credit Assignment in RL for Large Language Models",
    "2505.23564",
)
FIRST_SEGMENT = ("zero", "from_zero")


def first_bases(batch: RolloutBatch) -> Tensor:
    """[S] float32: the ``prompt_values`` entry of the row of each step (NaN where absent or not given)."""
    steps = batch.steps
    rows = steps.occ_row[steps.first_occ]
    if batch.prompt_values is None:
        return torch.full((steps.num_steps,), math.nan, device=steps.device)
    base = batch.prompt_values.float().to(steps.device)[rows]
    bad = steps.is_first & torch.isinf(base)
    if bad.any():
        raise ValueError(f"prompt_values is Inf at rows {describe_row_indices(rows[bad], batch.batch_size)}")
    return base


def probability_mask(batch: RolloutBatch, threshold: float) -> Tensor:
    """[B, T] bool: mask tokens sampled with probability exp(logprob) strictly above ``threshold``."""
    probability = batch.logprobs.double().exp()
    return (batch.mask > 0) & (probability > threshold)


@register
class SPOChain(StepEstimator):
    name = "spo_chain"
    works_in = "library, lab (task=grid's solver); verl, TRL: no"
    description = "Segment advantage V(segment end) - V(previous end) from MC values; tokens with p > 0.9 get 0"
    paper = SPO_PAPER
    requires = ("step_values",)
    layouts = ("row-per-response", "row-per-step")
    inputs_note = "`step_values` (MC value at each segment's end), `prompt_values` (NaN: absent), `logprobs`"
    producer = "Monte Carlo values at the cut points: completions sampled from each cut prefix"

    @dataclass
    class Params:
        prob_mask: bool = param(True, "give 0 to tokens sampled with probability > prob_threshold (needs logprobs)")
        prob_threshold: float = param(0.9, "probability above which a token gets 0 (the official code's 0.9)")
        first_segment: str = param(
            "zero", "first segment without a prompt value: 'zero' advantage (official) or 'from_zero' (A = V_0)"
        )

        def __post_init__(self) -> None:
            if not isinstance(self.prob_mask, bool):
                raise ValueError(f"prob_mask must be True or False, got {self.prob_mask!r}")
            require_range("prob_threshold", self.prob_threshold, 0.0, 1.0)
            require_choice("first_segment", self.first_segment, FIRST_SEGMENT)

    def required_inputs(self) -> tuple[str, ...]:
        return ("step_values", "logprobs") if self.params.prob_mask else ("step_values",)

    def step_advantages(self, batch: RolloutBatch) -> Tensor:
        steps = batch.steps
        values = steps.per_step("step_values", batch.step_values)
        base = first_bases(batch)
        no_base = values if self.params.first_segment == "from_zero" else torch.zeros_like(values)
        first = torch.where(torch.isnan(base), no_base, values - torch.nan_to_num(base))
        out = torch.where(steps.is_first, first, values - values[steps.prev.clamp_min(0)])
        return torch.where(steps.member, out, 0.0)

    def compute_returns(self, batch: RolloutBatch) -> tuple[Tensor, Tensor]:
        advantages = super().compute_returns(batch)[0]
        if self.params.prob_mask:
            advantages = torch.where(probability_mask(batch, self.params.prob_threshold), 0.0, advantages)
        return advantages, advantages
