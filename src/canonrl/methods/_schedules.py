"""Schedules for CANON's mixing coefficient mu (CANON-Dynamic, arXiv 2509.23962 Sec. 5.2 and App. C.6).

mu weighs the inter-group term (mu = 1, CANON-Inter) against the intra-group term (mu = 0, CANON-Intra).
"""

from __future__ import annotations

import math

from torch import Tensor

#: mu = 1 - batch accuracy: inter-group first (low accuracy), intra-group later. The paper's reported strategy.
FIRST_INTER_LATER_INTRA = "first-inter-later-intra"
#: mu = batch accuracy. This is what the official ``..._annel`` estimator ships (its commented line is the above).
FIRST_INTRA_LATER_INTER = "first-intra-later-inter"
#: mu follows a cosine from mu_high down to mu_low in each cycle, after a linear warm-up (official ``cosine_restart_r``).
COSINE_FIRST_INTER_LATER_INTRA = "cosine-first-inter-later-intra"
#: 1 - mu follows that cosine: mu rises from mu_low to mu_high in each cycle (official ``cosine_restart``).
COSINE_FIRST_INTRA_LATER_INTER = "cosine-first-intra-later-inter"

MU_SCHEDULES = (
    FIRST_INTER_LATER_INTRA,
    FIRST_INTRA_LATER_INTER,
    COSINE_FIRST_INTER_LATER_INTRA,
    COSINE_FIRST_INTRA_LATER_INTER,
)
ACCURACY_SCHEDULES = (FIRST_INTER_LATER_INTRA, FIRST_INTRA_LATER_INTER)


def cosine_annealing_with_restarts(
    step: int, *, total_steps: int, max_value: float, min_value: float, warmup_steps: int, cycles: int
) -> float:
    """The official CANON helper: linear warm-up max*(step+1)/warmup, then cosine cycles from max to min.

    The cycle length is (total_steps - warmup_steps) // cycles and cycling goes on past ``total_steps``.
    """
    if step < warmup_steps:
        return max_value * (step + 1) / warmup_steps
    cycle_length = max(1, (total_steps - warmup_steps) // cycles)
    position = (step - warmup_steps) % cycle_length
    return min_value + 0.5 * (max_value - min_value) * (1 + math.cos(math.pi * position / cycle_length))


def scheduled_mu(
    schedule: str,
    *,
    step: int,
    accuracy: Tensor | None,
    mu_high: float,
    mu_low: float,
    total_steps: int,
    warmup_steps: int,
    cycles: int,
) -> Tensor | float:
    """mu at a trainer step (1-based) for a named schedule; ``accuracy`` is the batch's mean 0/1 reward."""
    if schedule in ACCURACY_SCHEDULES:
        assert accuracy is not None
        return 1 - accuracy if schedule == FIRST_INTER_LATER_INTRA else accuracy
    cosine = dict(total_steps=total_steps, warmup_steps=warmup_steps, cycles=cycles)
    if schedule == COSINE_FIRST_INTER_LATER_INTRA:
        return cosine_annealing_with_restarts(step, max_value=mu_high, min_value=mu_low, **cosine)
    if schedule == COSINE_FIRST_INTRA_LATER_INTER:
        return 1 - cosine_annealing_with_restarts(step, max_value=1 - mu_low, min_value=1 - mu_high, **cosine)
    raise ValueError(f"mu must be a number in [0, 1] or one of {list(MU_SCHEDULES)}, got {schedule!r}")


def batch_accuracy(rewards: Tensor, valid: Tensor) -> Tensor:
    """Mean reward of the valid rows, as a 0-dim tensor (no host sync); rewards must lie in [0, 1]."""
    from canonrl.batch import describe_rows

    outside = valid & ((rewards < 0) | (rewards > 1))
    if outside.any():
        raise ValueError(f"accuracy-based mu schedules need rewards in [0, 1]; rewards is outside at rows {describe_rows(outside)}")
    return (rewards * valid).sum() / valid.sum().clamp_min(1)
