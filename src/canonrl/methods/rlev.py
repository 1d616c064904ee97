"""RLEV: reinforcement learning with explicit human values — a value-weighted reward under any base estimator.

Formula (paper): each prompt x carries a human value v(x) in [0, 1] (its points divided by the exam's total), and

    s(x)   = 1 + min(alpha v(x), 1)          the value scale, in [1, 2]
    r'_i   = s(x_i) r_i                       r_i the correctness reward (1[correct] in the paper: r' in {0} u [1, 2])
    A_i    = base estimator on r'             RLOO by default; REINFORCE++, RLOO and GRPO in the paper

Paper: "Every Question Has Its Own Value: Reinforcement Learning with Explicit Human Values" (arXiv 2510.20187).
No official code was found.

Inputs: rewards (correctness), group, mask, ``human_values`` [B] = v, one value per response (the same for every
response of a prompt; not enforced: each row is scaled by its own v), plus whatever ``base`` reads. (v was passed as
``metric`` before; that spelling still works, with a DeprecationWarning.)

Hyperparameters:
- ``alpha`` (10, the paper's default; swept over 1/5/10/15/20).
- ``cap`` (1.0): the bonus alpha v is capped at this (the paper's min(., 1)); ``None`` gives the uncapped 1 + alpha v,
  which the paper reports as worse.
- ``base`` / ``base_params``: the sequence-level estimator run on r' and its hyperparameters (as KTAE's base).
  Token-level estimators (reinforce_pp, reinforce_pp_baseline) are not accepted as a base; scale the rewards with
  :func:`value_weighted_rewards` and call them directly.

Which base keeps the value signal: a per-prompt constant scale s(x) cancels *exactly* under GRPO's group std
normalisation, (s r - s mean) / (s std) = (r - mean) / std, so with ``base="grpo"`` (scale="group") RLEV is GRPO up
to eps (the paper still reports gains with GRPO; the mechanism is unverified). The value survives under estimators
without a per-group std: RLOO (the default here), Dr.GRPO, GRPO with ``scale="batch"`` or ``"none"``.

Input checks: v must be >= 0 on valid rows (a value is a share of exam points; a negative v would shrink or flip the
reward), else ``ValueError`` naming the rows. v > 1 is accepted (the cap bounds s). Rewards are multiplied as given:
with -1/+1 rewards a wrong answer to a valuable prompt is penalised more (the paper's wrong answers get 0).

Conventions: those of the base (all-equal groups, singletons, fully masked rows: 0 by default under RLOO; fully
masked rows never take part in a statistic and their v is not checked). The base sees the scaled outcome rewards
only (``token_rewards`` are not forwarded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch, describe_rows
from canonrl.methods._common import require_range
from canonrl.methods._wrapped import WrapsBase, check_base
from canonrl.registry import Paper, param, register

RLEV_PAPER = Paper("Every Question Has Its Own Value: Reinforcement Learning with Explicit Human Values", "2510.20187")


def value_weighted_rewards(rewards: Tensor, value: Tensor, *, alpha: float = 10.0, cap: float | None = 1.0) -> Tensor:
    """RLEV's reward (1 + min(alpha v, cap)) r, elementwise (``cap=None``: 1 + alpha v)."""
    bonus = alpha * value
    if cap is not None:
        bonus = bonus.clamp_max(cap)
    return (1 + bonus) * rewards


def _carry_cached(source: RolloutBatch, target: RolloutBatch) -> RolloutBatch:
    """Reuse the mask-derived cached properties (they do not depend on the rewards)."""
    for name in ("lengths", "valid", "grouping"):
        if name in source.__dict__:
            target.__dict__[name] = source.__dict__[name]
    return target


@register
class RLEV(WrapsBase):
    name = "rlev"
    description = "Human-value-weighted reward (1 + min(alpha v, 1)) r (v = human_values), then a base estimator (RLOO)"
    paper = RLEV_PAPER
    requires = ("human_values",)
    renamed_inputs = {"human_values": "metric"}
    works_in = "library, lab (the task's per-prompt values; the `lab` task has them), verl (with the patch), TRL: no"

    @dataclass
    class Params:
        alpha: float = param(10.0, "value weight: r' = (1 + min(alpha v, cap)) r (paper: 10)")
        cap: float | None = param(1.0, "cap on the bonus alpha v (paper: 1); None: uncapped 1 + alpha v")
        base: str = param("rloo", "sequence-level estimator run on r' (rloo, dr_grpo, grpo, ...); grpo cancels v")
        base_params: dict | None = param(None, "hyperparameters of the base estimator, e.g. {'scale': 'batch'}")

        def __post_init__(self) -> None:
            require_range("alpha", self.alpha, 0.0)
            if not math.isfinite(self.alpha):
                raise ValueError(f"alpha must be finite, got {self.alpha!r}")
            if self.cap is not None:
                require_range("cap", self.cap, 0.0)
                if not math.isfinite(self.cap):
                    raise ValueError(f"cap must be finite (None for no cap), got {self.cap!r}")
            check_base(self.base, "rlev")

    def sequence_advantages(self, batch: RolloutBatch) -> Tensor:
        p = self.params
        value = batch.human_values
        negative = batch.valid & (value < 0)
        if negative.any():
            raise ValueError(f"human_values (the value v) must be >= 0, negative at rows {describe_rows(negative)}")
        rewards = value_weighted_rewards(batch.rewards, value, alpha=p.alpha, cap=p.cap)
        rewards = torch.where(batch.valid, rewards, 0.0)
        overflow = ~torch.isfinite(rewards)
        if overflow.any():
            raise ValueError(
                f"the value-weighted reward overflows float32 at rows {describe_rows(overflow)} (human_values too large)"
            )
        return self.base_advantages(_carry_cached(batch, replace(batch, rewards=rewards, token_rewards=None)))
