"""CANON's amplification: how much more of a condition's reward signal the inter-group term carries than Dr.GRPO.

The setting of CANON's Theorems 1-2 (arXiv 2509.23962, Sec. 4): each response satisfies a condition c1 with
probability ``share`` and, independently, a second condition c2 with probability ``share2``; its success
probability is

    p_i = clip(p + gap (c1_i - share) + gap2 (c2_i - share2), 0, 1),   p ~ the difficulty distribution,

and its metric is c1_i + ``noise`` * N(0, 1) (how well sorting by the metric recovers c1). CANON sorts each group by
the metric and puts the top k responses in C+ (k = G / 2 in CANON; any 1 <= k < G here: the split's balance), then

    A_inter(o) = R_o - mean(R over the other part)      (Eq. 3)         A_DR(o) = R_o - mean(R over the group)

The *signal* an advantage A carries about a condition c is the gap it opens between the responses that satisfy c
and those that do not, E[A | c] - E[A | not c] (over all simulated responses), and the amplification ratio is

    amplification(c) = signal of A_inter about c / signal of A_DR about c.

For c1 this is the amplification of the grouping metric; for the independent c2 Theorem 2 says it is a constant,
whatever c2's gap and share (it is G / (G - 1): A_inter leaves the response out of its baseline). The reward gap
scales both signals alike, so the ratio depends on how well the metric tracks the reward: the study sweeps the
metric's noise and reports, for each level, the within-prompt Pearson correlation of the metric with the reward.

At k = G / 2, A_inter is canonrl's ``canon`` estimator with ``mu=1`` and ``split_by="given"`` (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from canonrl.simulate.model import RolloutModel


@dataclass(frozen=True)
class ConditionModel:
    """The two conditions of the amplification study (see the module docstring)."""

    share: float = 0.5
    gap: float = 0.3
    share2: float = 0.5
    gap2: float = 0.2
    noise: float = 0.5

    def validate(self) -> ConditionModel:
        for name in ("share", "share2"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must lie in (0, 1), got {value}")
        for name in ("gap", "gap2"):
            value = getattr(self, name)
            if not -1.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [-1, 1], got {value}")
        if self.noise < 0:
            raise ValueError(f"noise must be >= 0, got {self.noise}")
        return self


@dataclass
class ConditionSample:
    rewards: Tensor  # [N, G] float64
    metric: Tensor  # [N, G] float64
    c1: Tensor  # [N, G] bool
    c2: Tensor  # [N, G] bool


def sample_conditions(
    rollouts: RolloutModel, conditions: ConditionModel, prompts: int, group_size: int, generator: torch.Generator
) -> ConditionSample:
    conditions.validate()
    if group_size < 2:
        raise ValueError(f"the amplification study needs groups of >= 2 responses, got {group_size}")
    p = rollouts.validate().draw_p(prompts, generator)[:, None]
    shape = (prompts, group_size)
    c1 = torch.rand(shape, generator=generator, dtype=torch.float64) < conditions.share
    c2 = torch.rand(shape, generator=generator, dtype=torch.float64) < conditions.share2
    success = p + conditions.gap * (c1.double() - conditions.share) + conditions.gap2 * (c2.double() - conditions.share2)
    rewards = (torch.rand(shape, generator=generator, dtype=torch.float64) < success.clamp(0, 1)).double()
    metric = c1.double() + conditions.noise * torch.randn(shape, generator=generator, dtype=torch.float64)
    return ConditionSample(rewards, metric, c1, c2)


def high_part(metric: Tensor, k: int) -> Tensor:
    """[N, G] bool: the k responses of each group (row) with the highest metric (ties: the later one is higher, as
    canonrl's CANON ranks with a stable ascending sort)."""
    group_size = metric.shape[1]
    if not 1 <= k < group_size:
        raise ValueError(f"split size k must satisfy 1 <= k < G = {group_size}, got {k}")
    rank = metric.argsort(dim=1, stable=True).argsort(dim=1)
    return rank >= group_size - k


def inter_advantage(rewards: Tensor, high: Tensor) -> Tensor:
    """CANON's Eq. 3 for any split: R_o minus the mean reward of the part o is not in."""
    high_f = high.double()
    high_mean = (rewards * high_f).sum(1, keepdim=True) / high_f.sum(1, keepdim=True)
    low_mean = (rewards * (1 - high_f)).sum(1, keepdim=True) / (1 - high_f).sum(1, keepdim=True)
    return rewards - torch.where(high, low_mean, high_mean)


def signal(advantages: Tensor, condition: Tensor) -> float:
    """E[A | condition] - E[A | not condition]."""
    return float(advantages[condition].mean() - advantages[~condition].mean())


def amplification(sample: ConditionSample, k: int) -> tuple[float, float]:
    """(amplification of c1, amplification of c2) with the split at k."""
    inter = inter_advantage(sample.rewards, high_part(sample.metric, k))
    dr = sample.rewards - sample.rewards.mean(1, keepdim=True)
    return signal(inter, sample.c1) / signal(dr, sample.c1), signal(inter, sample.c2) / signal(dr, sample.c2)


def metric_reward_correlation(sample: ConditionSample) -> float:
    """The within-prompt Pearson correlation of the metric with the reward (both centred per group)."""
    metric = sample.metric - sample.metric.mean(1, keepdim=True)
    rewards = sample.rewards - sample.rewards.mean(1, keepdim=True)
    denominator = float((metric.pow(2).sum() * rewards.pow(2).sum()).sqrt())
    return float((metric * rewards).sum()) / denominator if denominator else 0.0


@dataclass
class AmplificationStudy:
    group_size: int
    noises: list[float]  # metric noise levels: the less noise, the better sorting recovers c1
    correlations: list[float]  # per noise level: the metric-reward correlation it gives
    splits: list[int]  # k values
    ratio: list[list[float]]  # [noise][split]: amplification of c1
    independent: list[dict]  # c2 sweeps: {"gap2", "share2", "ratio"} at k = G / 2

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def amplification_study(
    rollouts: RolloutModel,
    conditions: ConditionModel,
    *,
    group_size: int = 16,
    prompts: int = 8192,
    noises: tuple[float, ...] = (0.1, 0.3, 0.6, 1.0, 2.0, 4.0),
    independent: tuple[tuple[float, float], ...] = ((0.1, 0.5), (0.3, 0.5), (-0.2, 0.5), (0.3, 0.2), (0.3, 0.8)),
    generator: torch.Generator,
) -> AmplificationStudy:
    """Amplification of c1 for every split k at each metric noise level (each giving a metric-reward correlation;
    the reward gap only scales both signals, so it leaves the ratio alone), and of the independent c2 at k = G / 2
    for each (gap2, share2) in `independent`."""
    zero = [gap2 for gap2, _ in independent if gap2 == 0]
    if zero:
        raise ValueError("independent: each gap2 must be non-zero (a condition without a reward gap has no signal)")
    splits = list(range(1, group_size))
    correlations, ratios = [], []
    for noise in noises:
        sample = sample_conditions(rollouts, replace(conditions, noise=noise), prompts, group_size, generator)
        correlations.append(metric_reward_correlation(sample))
        ratios.append([amplification(sample, k)[0] for k in splits])
    half = group_size // 2
    second = []
    for gap2, share2 in independent:
        sample = sample_conditions(rollouts, replace(conditions, gap2=gap2, share2=share2), prompts, group_size, generator)
        c1_ratio, c2_ratio = amplification(sample, half)
        second.append({"gap2": gap2, "share2": share2, "ratio": c2_ratio, "c1_ratio": c1_ratio})
    return AmplificationStudy(group_size, list(noises), correlations, splits, ratios, second)
