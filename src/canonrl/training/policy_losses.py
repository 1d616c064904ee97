"""The policy-loss registry: each loss a trainer can optimise is one class with its ``Params``, like the estimators.

A policy loss turns the sampled tokens' log-probs under the current and the sampling policy and the advantages
into a per-token loss [B, T] plus per-token float indicators (for metrics); the trainer aggregates it
(`canonrl.training.losses.aggregate_loss`). The formulas are the pure functions of :mod:`canonrl.training.losses`; a class here adds
what a trainer needs to know about the loss:

- ``Params``: its own hyperparameters (``param(default, help)``), checked in ``__post_init__``;
- ``clipped``: whether it takes the trainer's PPO clip range (``clip_low``, ``clip_high``, ``dual_clip``);
- ``metrics``: the indicators it reports beyond PPO's clip fractions, each as a fraction of the loss tokens;
- ``needs_every_row``: whether a row whose advantage is 0 everywhere can still move the gradient (so a trainer must
  run every row, not only those with a non-zero advantage);
- ``random``: whether it draws random numbers (the trainer then passes a seeded generator).

Add a loss by writing one class with ``@register_loss``; ``canonrl train policy_loss=<name>
policy_loss_params.<key>=<value>`` then picks it, with no other file to edit.

Examples:
    >>> import torch
    >>> loss = get_loss("clip_cov", clip_cov_ratio=0.5)
    >>> logprobs = torch.zeros(2, 3)
    >>> per_token, indicators = loss(logprobs, logprobs, torch.ones(2, 3), torch.ones(2, 3), clip=ClipRange())
    >>> per_token.shape, sorted(indicators)
    (torch.Size([2, 3]), ['clipped', 'cov_clipped', 'dual_clipped'])
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from canonrl.registry import param
from canonrl.training.losses import clip_cov_loss, kl_cov_loss, ppo_clip_loss


@dataclass(frozen=True)
class ClipRange:
    """PPO's clip range: ratios outside [1 - low, 1 + high] are clipped; for A < 0 the loss is at most -A * dual
    (``dual=None``: no dual clip)."""

    low: float = 0.2
    high: float = 0.2
    dual: float | None = 3.0

    def __post_init__(self) -> None:
        if self.low < 0 or self.high < 0:
            raise ValueError(f"clip_low and clip_high must be >= 0; got {self.low}, {self.high}")
        if self.dual is not None and self.dual <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (verl's clip_ratio_c) or None; got {self.dual}")


class PolicyLoss(ABC):
    """Base class of the registered policy losses (see the module docstring)."""

    name: ClassVar[str]
    description: ClassVar[str]
    clipped: ClassVar[bool] = True
    metrics: ClassVar[tuple[str, ...]] = ()
    needs_every_row: ClassVar[bool] = False
    random: ClassVar[bool] = False

    @dataclass
    class Params:
        pass

    def __init__(self, **params: Any) -> None:
        known = {f.name for f in dataclasses.fields(self.Params)}
        unknown = sorted(set(params) - known)
        if unknown:
            takes = ", ".join(sorted(known)) or "no parameters"
            if self.clipped:
                takes += " (clip_low, clip_high and dual_clip are the trainer's own keys)"
            raise TypeError(f"policy_loss {self.name!r} has no parameter {unknown[0]!r}; it takes {takes}")
        self.params = self.Params(**params)

    @abstractmethod
    def __call__(
        self, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, clip: ClipRange,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(per-token loss [B, T], per-token float indicators) of a micro-batch."""


_LOSSES: dict[str, type[PolicyLoss]] = {}


def register_loss(cls: type[PolicyLoss]) -> type[PolicyLoss]:
    """Class decorator adding a policy loss to the registry under ``cls.name``."""
    if cls.name in _LOSSES and _LOSSES[cls.name] is not cls:
        raise ValueError(f"a policy loss named {cls.name!r} is already registered")
    _LOSSES[cls.name] = cls
    return cls


def loss_names() -> list[str]:
    return list(_LOSSES)


def loss_class(name: str) -> type[PolicyLoss]:
    if name not in _LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; choose from {', '.join(_LOSSES)}")
    return _LOSSES[name]


def get_loss(name: str, **params: Any) -> PolicyLoss:
    """The registered policy loss ``name`` with ``params`` (unknown names and parameters raise one line)."""
    return loss_class(name)(**params)


def _require_fraction(name: str, value: float) -> None:
    if not 0 < value <= 1:
        hint = " (a fraction of tokens; convert the official percent with cov_ratio_from_percent)" if value > 1 else ""
        raise ValueError(f"{name} must be in (0, 1]{hint}; got {value}")


@register_loss
class PPOClip(PolicyLoss):
    name = "ppo_clip"
    description = "PPO-clip with clip-higher and dual clip (verl's vanilla policy loss)"

    def __call__(self, logprobs, old_logprobs, advantages, mask, *, clip, generator=None):
        return ppo_clip_loss(logprobs, old_logprobs, advantages, clip.low, clip.high, clip.dual)


@register_loss
class ClipCov(PolicyLoss):
    name = "clip_cov"
    description = "Clip-Cov: PPO-clip, plus no gradient for a random few high-covariance tokens (arXiv 2505.22617)"
    metrics = ("cov_clipped",)
    needs_every_row = True  # every row enters the micro-batch's covariance statistics
    random = True

    @dataclass
    class Params:
        clip_cov_ratio: float = param(2e-4, "fraction of the valid tokens detached (verl's clip_cov_ratio)")
        clip_cov_lb: float = param(1.0, "lower bound of the covariance window of candidate tokens")
        clip_cov_ub: float = param(5.0, "upper bound of the covariance window of candidate tokens")

        def __post_init__(self) -> None:
            _require_fraction("clip_cov_ratio", self.clip_cov_ratio)
            if not self.clip_cov_lb < self.clip_cov_ub:
                raise ValueError(f"clip_cov_lb must be < clip_cov_ub; got {self.clip_cov_lb}, {self.clip_cov_ub}")

    def __call__(self, logprobs, old_logprobs, advantages, mask, *, clip, generator=None):
        p = self.params
        return clip_cov_loss(
            logprobs, old_logprobs, advantages, mask, p.clip_cov_ratio, p.clip_cov_lb, p.clip_cov_ub,
            clip.low, clip.high, clip.dual, generator,
        )  # fmt: skip


@register_loss
class KLCov(PolicyLoss):
    name = "kl_cov"
    description = "KL-Cov: -A r, plus |log ratio| on the highest-covariance tokens (arXiv 2505.22617)"
    clipped = False
    metrics = ("kl_cov_selected",)
    needs_every_row = True  # the KL term does not vanish with the advantage

    @dataclass
    class Params:
        kl_cov_ratio: float = param(2e-4, "fraction of the valid tokens that get the KL term (verl's kl_cov_ratio)")
        ppo_kl_coef: float = param(1.0, "weight of the |log pi - log pi_old| term (official code: 1)")

        def __post_init__(self) -> None:
            _require_fraction("kl_cov_ratio", self.kl_cov_ratio)
            if self.ppo_kl_coef < 0:
                raise ValueError(f"ppo_kl_coef must be >= 0; got {self.ppo_kl_coef}")

    def __call__(self, logprobs, old_logprobs, advantages, mask, *, clip, generator=None):
        return kl_cov_loss(logprobs, old_logprobs, advantages, mask, self.params.kl_cov_ratio, self.params.ppo_kl_coef)
