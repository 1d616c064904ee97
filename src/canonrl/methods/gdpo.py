"""GDPO: group reward-decoupled normalisation for several rewards, then one batch normalisation.

Formula, for K reward components r^(1..K) of each response (paper eqs. 4-8):

    A_k,i = (r^(k)_i - mean_g r^(k)) / (std_g r^(k) + eps)        per-component group z-score
    S_i   = sum_k w_k A_k,i                                        weighted sum of the *normalised* components
    A_i   = (S_i - mean_B S) / (std_B S + batch_eps)               one normalisation over the batch

broadcast to every response token. The batch step keeps the scale from growing with K.

Conditioned variant (the paper's priority trick): ``condition=((k, l, t), ...)`` replaces component k by 0 in every
response whose component l is below t (r^(k) <- r^(k) if r^(l) >= t else 0) before the normalisation, e.g.
``condition=((1, 0, 1.0),)`` lets a length reward (component 1) count only when the answer is correct (component 0).
All conditions read the unconditioned components.

Paper: "GDPO: Group reward-Decoupled Normalization Policy Optimization for Multi-reward RL Optimization"
(arXiv 2601.05242). Official code: ``NVlabs/GDPO`` (a TRL and a verl version).

Inputs: rewards as [B, K] (one column per reward component; ``rewards`` [B] is K = 1), group, mask.

Hyperparameters:
- ``weights``: K non-negative weights w_k (default None: all 1).
- ``eps`` (1e-4) and ``std`` ("unbiased"): the per-component group z-score, as the official TRL code
  (``.std()`` + 1e-4); its verl code uses verl's GRPO (eps 1e-6).
- ``batch_norm``: "sample" (default; per-response batch mean and unbiased std + ``batch_eps``, the official TRL code
  and TRL's ``multi_objective_aggregation="normalize_then_sum"``), "token" (verl's ``masked_whiten``: token-weighted
  mean and unbiased variance, (S - mean) / sqrt(var + 1e-8), the official verl code), or "none" (the weighted sum
  S itself: a group-local variant, not the paper's method).
- ``batch_eps`` (1e-4): added to the batch std for ``batch_norm="sample"``.
- ``condition``: the conditioned variant above (default none).

Conventions:
- A component constant within a group contributes exactly 0 to S. An all-equal group (every component constant)
  has S = 0, and the batch step turns it into -mean_B / std_B. With per-response statistics ("sample") mean_B is
  exactly 0, since every group's z-scores sum to 0 (it is computed that way, so such groups get exactly 0), unless
  ``singleton="raw"`` rows enter the batch; with token weighting ("token") it is not 0 in general.
- Fully masked rows get 0 and take part in no statistic (group or batch).
- Singletons: with ``singleton="zero"`` (default) a group of one valid response has no baseline: it gets 0 and is
  left out of the batch statistics. ``singleton="raw"`` applies verl's rule per component (mean 0, std 1:
  A_k = r^(k) / (1 + eps)) and the row takes part in the batch step, as in the official verl code.
- A batch whose S values are all equal gets 0 (no spread to normalise by).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.groups import Grouping
from canonrl.methods._common import nonzero_or_one, require_choice, require_range, singleton_param
from canonrl.methods._normalise import STD_CHOICES
from canonrl.ops import whiten_broadcast_scores
from canonrl.registry import Paper, SequenceEstimator, param, register

GDPO_PAPER = Paper(
    "GDPO: Group reward-Decoupled Normalization Policy Optimization for Multi-reward RL Optimization", "2601.05242"
)
BATCH_NORM_CHOICES = ("sample", "token", "none")


def _check_condition(condition) -> tuple[tuple[int, int, float], ...]:
    if condition is None:
        return ()
    try:
        triples = tuple((int(k), int(l), float(t)) for k, l, t in condition)
    except (TypeError, ValueError):
        raise ValueError(
            f"condition must be a sequence of (k, l, threshold) triples, got {condition!r}"
        ) from None
    for k, l, t in triples:
        if k < 0 or l < 0 or k == l or not math.isfinite(t):
            raise ValueError(
                f"condition needs component indices k != l >= 0 and a finite threshold, got {(k, l, t)!r}"
            )
    return triples


@register
class GDPO(SequenceEstimator):
    name = "gdpo"
    description = "Multi-reward: per-component group z-scores, weighted sum, then normalised over the batch"
    paper = GDPO_PAPER
    multi_reward = True
    works_in = "library, lab, verl (as `canonrl_gdpo`, with the patch: `algorithm.gdpo_reward_keys`), TRL"
    inputs_note = "`rewards` [B, K]"

    @dataclass
    class Params:
        weights: tuple | None = param(None, "weights w_k of the K normalised reward components (None: all 1)")
        eps: float = param(1e-4, "added to each component's group std (official TRL code 1e-4; verl code 1e-6)")
        std: str = param("unbiased", "group std: 'unbiased' (N-1, official code) or 'population' (N)")
        batch_norm: str = param(
            "sample", "'sample' (batch mean/std per response, TRL), 'token' (verl masked_whiten) or 'none'"
        )
        batch_eps: float = param(1e-4, "added to the batch std for batch_norm='sample' (official TRL code 1e-4)")
        condition: tuple | None = param(
            None, "((k, l, t), ...): component k counts only where component l >= t (the paper's priority trick)"
        )
        singleton: str = singleton_param()

        def __post_init__(self) -> None:
            require_range("eps", self.eps, 0.0)
            require_range("batch_eps", self.batch_eps, 0.0)
            require_choice("std", self.std, STD_CHOICES)
            require_choice("batch_norm", self.batch_norm, BATCH_NORM_CHOICES)
            if self.weights is not None:
                try:
                    weights = tuple(float(w) for w in self.weights)
                except (TypeError, ValueError):
                    raise ValueError(f"weights must be a sequence of K numbers, got {self.weights!r}") from None
                if not weights or not all(math.isfinite(w) and w >= 0 for w in weights):
                    raise ValueError(f"weights must be K >= 1 finite non-negative numbers, got {self.weights!r}")
                self.weights = weights
            self.condition = _check_condition(self.condition) or None

    @property
    def batch_level_reason(self) -> str | None:
        return "the weighted sum is normalised over the batch" if self.params.batch_norm != "none" else None

    @property
    def z_score_bound(self) -> float | None:
        return 40.0  # weighted z-scores of the components, then the batch normalisation

    def sequence_advantages(self, batch: RolloutBatch) -> Tensor:
        p = self.params
        components = batch.reward_components
        if components is None:
            components = batch.rewards[:, None]
        num_components = components.shape[1]
        if p.weights is not None and len(p.weights) != num_components:
            raise ValueError(
                f"weights has {len(p.weights)} entries but rewards has K = {num_components} reward components"
            )
        if p.condition:
            components = self._conditioned(components)
        grouping = batch.grouping
        valid = batch.valid
        singleton = grouping.singleton
        unbiased = p.std == "unbiased"

        # Per-component group z-scores, all components at once: component k of group g is segment g * K + k.
        flat_index = grouping.index[:, None] * num_components + torch.arange(num_components, device=batch.device)
        flat = Grouping(
            flat_index.flatten(), valid[:, None].expand(-1, num_components).flatten(), batch.num_groups * num_components
        )
        values = components.flatten()
        centered = flat.centered(values)
        spread = nonzero_or_one(flat.gather(flat.variance(values, unbiased=unbiased).sqrt()) + p.eps)
        zscores = (centered / spread).view(-1, num_components)
        if p.singleton == "raw":
            zscores = torch.where(singleton[:, None], components / (1.0 + p.eps), zscores)
        weights = (
            torch.ones(num_components, device=batch.device)
            if p.weights is None
            else torch.tensor(p.weights, dtype=torch.float32, device=batch.device)
        )
        summed = (zscores * weights).sum(-1)

        # Rows that take part in the batch step: valid, and not a 'zero' singleton.
        member = valid & ~singleton if p.singleton == "zero" else valid
        summed = torch.where(member, summed, 0.0)
        if p.batch_norm == "sample":
            # Each group's z-scores sum to 0, so the batch mean of S is that of the 'raw' singletons' S alone (0 by
            # default): computing it this way keeps all-equal groups at exactly 0 instead of float32 noise.
            lone = member & singleton
            mean = torch.where(lone, summed, 0.0).sum() / member.sum().clamp_min(1)
            advantage = self._whiten_samples(summed, member, mean, p.batch_eps)
        elif p.batch_norm == "token":
            lengths = torch.where(member, batch.lengths, 0.0)
            advantage = whiten_broadcast_scores(summed, lengths)
            advantage = torch.where(self._constant(summed, member), 0.0, advantage)
        else:
            advantage = summed
        return torch.where(member, advantage, 0.0)

    @staticmethod
    def _constant(values: Tensor, member: Tensor) -> Tensor:
        """0-d bool: every member value is the same (no spread to normalise)."""
        high = torch.where(member, values, float("-inf")).amax()
        low = torch.where(member, values, float("inf")).amin()
        return high <= low

    def _whiten_samples(self, values: Tensor, member: Tensor, mean: Tensor, eps: float) -> Tensor:
        """(S - mean) / (unbiased std + eps) over the member rows; 0 for a constant batch."""
        count = member.sum()
        deviation = torch.where(member, values - mean, 0.0)
        std = ((deviation * deviation).sum() / (count - 1).clamp_min(1)).sqrt()
        return torch.where(self._constant(values, member), 0.0, deviation / nonzero_or_one(std + eps))

    def _conditioned(self, components: Tensor) -> Tensor:
        num_components = components.shape[1]
        keep = torch.ones_like(components, dtype=torch.bool)
        for k, l, threshold in self.params.condition:  # a handful of hyperparameter triples, not data
            if max(k, l) >= num_components:
                raise ValueError(
                    f"condition {(k, l, threshold)!r} names component {max(k, l)}, but rewards has "
                    f"K = {num_components} reward components"
                )
            keep[:, k] &= components[:, l] >= threshold
        return torch.where(keep, components, 0.0)
