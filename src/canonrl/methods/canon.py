"""CANON: Conditional Advantage Estimation.

Each prompt's valid responses are sorted by a metric (mean token entropy, length, or one the caller gives) and split
into two equal halves, G+ (higher metric) and G- (lower). With m_H, m_L the mean rewards of the halves:

    A_inter(o) = R_o - (mean reward of the other half)        (paper Eq. 3: which trend of the metric pays)
    A_intra(o) = R_o - (mean reward of its own half)          (paper Eq. 4: which response is better)
    A_CANON    = mu * A_inter + (1 - mu) * A_intra             (paper Eq. 5)

broadcast to every response token, with no std normalisation. mu = 1 is CANON-Inter, mu = 0 CANON-Intra, and with
equal halves mu = 0.5 is exactly Dr.GRPO. For even groups the closed form is

    A = (R_o - mean(R)) + (2 mu - 1) * s_o * (m_H - m_L) / 2,   s_o = +1 in G+, -1 in G-.

CANON-Eff (paper Eq. 9) weighs the inter term by alpha: a response in the discounted half D (default G+, i.e. the
longer responses when grouping by length) gets mu * (alpha R_o - m_other), the others mu * (R_o - alpha m_D).
alpha < 1 credits correct responses in D less and penalises the other half less. Unlike the deviation terms this
shaping does not vanish in all-correct groups: that is how CANON-Eff learns efficiency once groups saturate.

Paper: "Conditional Advantage Estimation for Reinforcement Learning in Large Reasoning Models", Chen et al.
(arXiv 2509.23962).

Inputs: rewards, group, mask; ``entropy`` [B, T] for ``split_by="entropy"`` (masked mean over the response);
``metric`` [B] for ``split_by="given"``. (``split_by`` was called ``metric`` before; that spelling still works, with
a DeprecationWarning.)

Conventions (the official verl-based code, ``biuboomc/CANON``, where the paper is silent):
- the split ranks by the metric with a stable ascending sort, ties kept in batch order; positions >= n // 2 form
  G+, so an odd group puts the extra response in the high half (then mu = 0.5 is not exactly Dr.GRPO);
- ``split_by="random"`` regroups at random (the paper's control ablation), seeded by ``seed`` and the step;
  ``split_by="index"`` splits by batch order as the official ``dr_random`` does;
- mu schedules (CANON-Dynamic): see :mod:`canonrl.methods._schedules`; ``step`` is the trainer step, 1-based;
- the official code divides by the maximum response length when the loss is ``seq-mean-token-sum``; here that is
  ``normalizer`` (default 1) — canonrl leaves length normalisation to the loss aggregation;
- the official entropy variant puts alpha on the low-entropy half (``discounted_half="low"``); its length variant
  and the paper's Eq. 9 on the high half (the default here);
- the official code's extra offset ``beta`` (default 0, not in the paper) is not implemented.
Edge cases: all-equal groups get exactly 0 when alpha = 1; fully masked rows get 0 and are not ranked; singletons
get 0 by default, ``singleton="raw"`` keeps R (the official code sets both half means to 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.groups import Grouping
from canonrl.methods._common import finish, require_choice, require_range, singleton_param
from canonrl.methods._schedules import ACCURACY_SCHEDULES, MU_SCHEDULES, batch_accuracy, scheduled_mu
from canonrl.registry import Paper, SequenceEstimator, param, register

CANON_PAPER = Paper("Conditional Advantage Estimation for Reinforcement Learning in Large Reasoning Models", "2509.23962")
METRICS = ("entropy", "length", "given", "random", "index")
HALVES = ("high", "low")


def split_halves(grouping: Grouping, key: Tensor) -> Tensor:
    """[B] bool: True for rows in the higher-metric half G+ of their group (ranks >= n // 2)."""
    rank = grouping.rank(key)
    return rank >= torch.div(grouping.row_count.long(), 2, rounding_mode="floor")


@register
class CANON(SequenceEstimator):
    name = "canon"
    description = "Regroup each group into metric halves; mix inter-half (mu) and intra-half (1 - mu) advantages"
    paper = CANON_PAPER
    #: with the default split_by="entropy"; split_by="given" needs ``metric``, "length"/"random"/"index" nothing more.
    requires = ("entropy",)
    simulator_alignment = "centred"
    works_in = "library, lab, verl (by entropy: with the patch), TRL"
    renamed_params = {"metric": "split_by"}
    inputs_note = '`entropy` (split_by="entropy") or `metric` (split_by="given")'

    @dataclass
    class Params:
        mu: float | str = param(1.0, "inter weight in [0, 1] (1 Inter, 0 Intra, 0.5 Dr.GRPO) or a schedule name")
        split_by: str = param("entropy", "regroup by 'entropy', 'length', a 'given' metric, 'random' or batch 'index'")
        alpha: float = param(1.0, "CANON-Eff weight on the discounted half (Eq. 9); 1 = plain CANON")
        discounted_half: str = param("high", "half alpha discounts: 'high' (paper Eq. 9) or 'low' (official entropy code)")
        mu_high: float = param(1.0, "cosine schedules: largest mu")
        mu_low: float = param(0.4, "cosine schedules: smallest mu")
        schedule_steps: int = param(150, "cosine schedules: total steps (warm-up + cycles), as the official code")
        warmup_steps: int = param(30, "cosine schedules: linear warm-up steps")
        cycles: int = param(3, "cosine schedules: number of restarts within schedule_steps")
        normalizer: float = param(1.0, "divide advantages by this (official code: max response length)")
        seed: int = param(0, "seed of split_by='random'")
        singleton: str = singleton_param()

        def __post_init__(self) -> None:
            if isinstance(self.mu, str):
                require_choice("mu", self.mu, MU_SCHEDULES)
            else:
                require_range("mu", float(self.mu), 0.0, 1.0)
            require_choice("split_by", self.split_by, METRICS)
            require_range("alpha", self.alpha, 0.0)
            require_choice("discounted_half", self.discounted_half, HALVES)
            require_range("mu_low", self.mu_low, 0.0, self.mu_high)
            require_range("mu_high", self.mu_high, self.mu_low, 1.0)
            require_range("warmup_steps", self.warmup_steps, 0, low_open=True)
            require_range("cycles", self.cycles, 0, low_open=True)
            if self.schedule_steps <= self.warmup_steps:
                raise ValueError(f"schedule_steps must exceed warmup_steps={self.warmup_steps}, got {self.schedule_steps}")
            require_range("normalizer", self.normalizer, 0.0, low_open=True)

    @property
    def batch_level_reason(self) -> str | None:
        return "mu is a function of the batch accuracy" if self.accuracy_schedule else None

    @property
    def reward_range(self) -> tuple[float, float]:
        return (0.0, 1.0) if self.accuracy_schedule else super().reward_range

    @property
    def accuracy_schedule(self) -> bool:
        """mu follows the batch accuracy (rewards must then lie in [0, 1])."""
        return isinstance(self.params.mu, str) and self.params.mu in ACCURACY_SCHEDULES

    def required_inputs(self) -> tuple[str, ...]:
        return {"entropy": ("entropy",), "given": ("metric",)}.get(self.params.split_by, ())

    def mu_at(self, step: int, accuracy: Tensor | float | None = None) -> Tensor | float:
        """mu at a trainer step (1-based); accuracy-based schedules also need the batch accuracy in [0, 1]."""
        p = self.params
        if not isinstance(p.mu, str):
            return float(p.mu)
        if p.mu in ACCURACY_SCHEDULES and accuracy is None:
            raise ValueError(f"mu={p.mu!r} needs the batch accuracy")
        return scheduled_mu(
            p.mu,
            step=step,
            accuracy=accuracy,
            mu_high=p.mu_high,
            mu_low=p.mu_low,
            total_steps=p.schedule_steps,
            warmup_steps=p.warmup_steps,
            cycles=p.cycles,
        )

    def mu(self, batch: RolloutBatch) -> Tensor | float:
        """mu for this batch at the current step."""
        accuracy = None
        if self.params.mu in ACCURACY_SCHEDULES:
            accuracy = batch_accuracy(batch.rewards, batch.valid)
        return self.mu_at(self.step, accuracy)

    def metric_values(self, batch: RolloutBatch) -> Tensor:
        """[B] float32 value of the grouping metric per response."""
        metric = self.params.split_by
        if metric == "entropy":
            return batch.masked_row_mean("entropy")
        if metric == "length":
            return batch.lengths
        if metric == "given":
            return batch.metric
        if metric == "index":
            return torch.arange(batch.batch_size, device=batch.device, dtype=torch.float32)
        generator = torch.Generator().manual_seed(self.params.seed * 1_000_003 + self.step)
        return torch.rand(batch.batch_size, generator=generator).to(batch.device)

    def sequence_advantages(self, batch: RolloutBatch) -> Tensor:
        p = self.params
        grouping = batch.grouping
        rewards = batch.rewards
        high = split_halves(grouping, self.metric_values(batch))

        halves = Grouping(2 * batch.group_index + high.long(), batch.valid, 2 * batch.num_groups)
        half_mean = torch.cat([halves.mean(rewards), rewards.new_zeros(1)])
        own_half = halves.bins
        other_half = torch.where(batch.valid, own_half ^ 1, own_half)
        # (R - m_own) + mu * (m_own - m_other): exactly 0 wherever the group's rewards are all equal.
        own_deviation = halves.centered(rewards)
        half_gap = half_mean[own_half] - half_mean[other_half]
        half_gap = half_gap.where(~grouping.gather(grouping.is_constant(rewards)), 0.0)
        mu = self.mu(batch)
        advantage = own_deviation + mu * half_gap

        if p.alpha != 1.0:
            in_discounted = high if p.discounted_half == "high" else ~high
            discounted_half = torch.where(in_discounted, own_half, other_half)
            weighted = torch.where(in_discounted, -rewards, half_mean[discounted_half])
            advantage = advantage + mu * (1 - p.alpha) * weighted
        advantage = advantage / p.normalizer
        return finish(batch, advantage, singleton=p.singleton, raw=rewards / p.normalizer)
