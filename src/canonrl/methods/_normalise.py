"""GRPO's group normalisation, shared by the GRPO-style estimators (GRPO, DAPO, AAPO, A-GRAE, GPG, PSR/NSR, ...).

(r - group mean) / (spread + eps), where the spread is the group's std (``scale="group"``), one std over the whole
batch (``"batch"``, TRL's ``scale_rewards="batch"``) or none (``"none"``, Dr.GRPO); the std unbiased (N - 1) or
population (N); singletons by the ``singleton`` policy (see :mod:`canonrl.methods.grpo` for the conventions).
"""

from __future__ import annotations

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.methods._common import finish, nonzero_or_one

STD_CHOICES = ("unbiased", "population")
SCALE_CHOICES = ("group", "batch", "none")


def group_normalised(batch: RolloutBatch, rewards: Tensor, *, eps: float, std: str, scale: str, singleton: str) -> Tensor:
    """[B] (r - group mean) / (scale + eps) with the singleton policy applied; shared by GRPO-style estimators."""
    grouping = batch.grouping
    centered = grouping.centered(rewards)
    unbiased = std == "unbiased"
    if scale == "group":
        spread = grouping.gather(grouping.variance(rewards, unbiased=unbiased).sqrt())
    elif scale == "batch":
        valid = batch.valid
        count = valid.sum()
        mean = (rewards * valid).sum() / count.clamp_min(1)
        deviation = (rewards - mean) * valid
        spread = ((deviation * deviation).sum() / (count - int(unbiased)).clamp_min(1)).sqrt()
    else:
        return finish(batch, centered, singleton=singleton, raw=rewards)
    denominator = nonzero_or_one(spread + eps)
    singleton_scale = denominator if scale == "batch" else torch.as_tensor(1.0 + eps)
    return finish(batch, centered / denominator, singleton=singleton, raw=rewards / singleton_scale)
