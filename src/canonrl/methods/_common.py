"""Pieces several sequence-level estimators share: the singleton policy, validity masking, hyperparameter checks."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.groups import check_singleton_policy
from canonrl.registry import param

SINGLETON_HELP = (
    "group of one valid response: 'zero' gives 0 (no baseline exists); "
    "'raw' keeps the reward with a zero baseline and unit scale (verl's convention)"
)


def singleton_param():
    return param("zero", SINGLETON_HELP)


def finish(batch: RolloutBatch, advantage: Tensor, *, singleton: str, raw: Tensor) -> Tensor:
    """Apply the singleton policy (``raw`` is the value a singleton gets under 'raw') and zero invalid rows."""
    check_singleton_policy(singleton)
    grouping = batch.grouping
    singleton_value = raw if singleton == "raw" else 0.0
    advantage = advantage.where(~grouping.singleton, singleton_value)
    return advantage.where(batch.valid, 0.0)


def nonzero_or_one(denominator: Tensor) -> Tensor:
    """``denominator`` where it is > 0, else 1: a zero scale (eps = 0 on a constant group) divides by 1, never 0/0."""
    return torch.where(denominator > 0, denominator, torch.ones_like(denominator))


def require_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def require_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def require_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def require_range(name: str, value: float, low: float, high: float | None = None, *, low_open: bool = False) -> None:
    below = value <= low if low_open else value < low
    if below or (high is not None and value > high):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high if high is not None else 'inf'}]"
        raise ValueError(f"{name} must lie in {bound}, got {value!r}")
