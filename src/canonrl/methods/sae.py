"""SAE: segmental advantage estimation — GAE whose trace decays only across segment boundaries (reconstruction).

Formula (over the policy tokens of a row, mask-0 tokens skipped as in :mod:`canonrl.methods.gae`):

    delta_t = r_t + gamma * V_next - V_t                       (V_next: the value at the row's next policy token)
    lam_t   = lam if token t starts a segment, else 1
    A_t     = delta_t + gamma * lam_{t+1} * A_{t+1}            (A after the last policy token = 0)

Inside a segment the deltas telescope, so values are bootstrapped only at segment starts (plus each token's own
baseline V_t). Value targets: the same kernel with ``lam_critic`` at the boundaries (default 1: the Monte Carlo return)
plus V; advantages whitened over the batch's mask (unbiased variance), as ``gae``.

Relation to the other critic estimators: one GAE kernel with a per-token lambda. No boundary (or ``lam = 1``) gives
``gae`` with lam = 1; every token a boundary gives ``gae`` with lam; ``lam_critic`` is VC-PPO's decoupled critic
lambda; ``bootstrap_values`` is T-PPO's value after a truncated row's last token, as in ``gae``.

Paper: "Segmental Advantage Estimation: Enhancing PPO for Long-Context LLM Training", Gong et al. (SAE, arXiv
2601.07320). No official code was found and only the abstract could be read, so this is the reconstruction of
token-level.md §3 (``verified = False``): low-probability tokens start segments, bootstrapping is restricted to them.

Inputs: ``values`` [B, T], ``token_rewards`` [B, T] or ``rewards`` [B] (on each row's last policy token), the mask
(holes = observation/tool tokens), and the segments: ``segments="logprobs"`` (default) makes a policy token whose
rollout probability exp(``logprobs``) is strictly below ``prob_threshold`` start a segment (use the rollout policy's
log-probs, so that segments stay fixed within a PPO epoch); ``segments="turns"`` makes every step of the step table
(``turn_ids``; the whole row by default) a segment. ``bootstrap_values`` [B] optional.

Edge cases: a row with no policy token gets 0; a row without a boundary is one segment (the Monte Carlo return minus
V_t); log-probs off the mask are ignored, NaN/Inf inside raise; rewards on mask-0 tokens are moved to the row's last
policy token (``masked_rewards="move"``) or dropped (``"drop"``, verl); a batch with fewer than two mask tokens has
whitened advantages 0. The constants (``prob_threshold``, ``lam``) are unverified choices, hence parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch, describe_rows
from canonrl.methods._common import require_choice, require_range
from canonrl.methods.gae import MASKED_REWARDS, critic_outputs
from canonrl.registry import CriticEstimator, Paper, param, register

SAE_PAPER = Paper("Segmental Advantage Estimation: Enhancing PPO for Long-Context LLM Training", "2601.07320")
SEGMENTS = ("logprobs", "turns")


def reverse_scan(values: Tensor, factor: Tensor) -> Tensor:
    """[B, W] y_t = x_t + factor_t * y_{t+1} (y_W = 0) along the last dimension, by doubling in float64."""
    y, c = values.double(), factor.double()
    offset, width = 1, values.shape[-1]
    while offset < width:
        y = y + c * torch.nn.functional.pad(y[:, offset:], (0, offset))
        c = c * torch.nn.functional.pad(c[:, offset:], (0, offset))
        offset *= 2
    return y.float()


def segmental_gae(
    rewards: Tensor,
    values: Tensor,
    policy: Tensor,
    starts: Tensor,
    gamma: float,
    lam: float,
    bootstrap: Tensor | None = None,
) -> Tensor:
    """[B, T] float32 GAE advantages with lambda ``lam`` at segment ``starts`` ([B, T] bool) and 1 elsewhere, over
    each row's policy tokens (mask-0 tokens skipped, their order kept); 0 off the policy tokens."""
    B, T = policy.shape
    ones = policy.long()
    slot = ones.cumsum(1) - ones  # each policy token's index among its row's policy tokens
    trash = torch.where(policy, slot, T)

    def pack(x: Tensor) -> Tensor:
        return torch.zeros(B, T + 1, dtype=torch.float32, device=x.device).scatter_(1, trash, x.float())[:, :T]

    packed_values, count = pack(values), policy.sum(-1)
    following = torch.cat([packed_values[:, 1:], packed_values.new_zeros(B, 1)], 1)
    if bootstrap is not None:
        has_token = count > 0
        following[has_token, count[has_token] - 1] = bootstrap[has_token].float()
    delta = pack(rewards) + gamma * following - packed_values
    trace = torch.where(pack(starts.float()) > 0, lam, 1.0)
    factor = gamma * torch.cat([trace[:, 1:], trace.new_ones(B, 1)], 1)  # gamma * lam_{t+1}
    advantages = reverse_scan(delta, factor)
    return torch.where(policy, advantages.gather(1, slot), 0.0)


def segment_starts(batch: RolloutBatch, policy: Tensor, segments: str, prob_threshold: float) -> Tensor:
    """[B, T] bool: the policy tokens that start a segment (a row's first policy token always does)."""
    if segments == "logprobs":
        logprobs = torch.where(policy, batch.logprobs.float(), 0.0)
        bad = ~torch.isfinite(logprobs).all(-1)
        if bad.any():
            raise ValueError(f"logprobs is NaN or Inf inside the mask at rows {describe_rows(bad)}")
        return policy & (logprobs.exp() < prob_threshold)
    steps = batch.steps
    B, T = policy.shape
    if steps.token_occ is None:  # one step per row: one segment
        return torch.zeros_like(policy)
    occ = torch.where(policy, steps.token_occ, -2)
    # the occurrence of the previous policy token of the row (-2 before the first)
    column = torch.arange(T, device=policy.device).expand(B, T)
    last_policy = torch.where(policy, column, -1).cummax(1).values
    previous = torch.cat([last_policy.new_full((B, 1), -1), last_policy[:, :-1]], 1)
    previous_occ = torch.where(previous >= 0, occ.gather(1, previous.clamp_min(0)), -2)
    return policy & (occ != previous_occ)


@register
class SAE(CriticEstimator):
    name = "sae"
    description = "Critic-based token advantages: GAE whose lambda applies only at segment starts (low-prob tokens)"
    paper = SAE_PAPER
    verified = False
    layouts = ("row-per-response", "row-per-trajectory")
    inputs_note = "`values`, `token_rewards`, `logprobs` (segments) or `turn_ids` with `segments='turns'`"

    @dataclass
    class Params:
        gamma: float = param(1.0, "discount per policy token")
        lam: float = param(0.95, "lambda applied at segment starts (unverified; 1 elsewhere)")
        lam_critic: float = param(1.0, "lambda at segment starts for the value targets (1: Monte Carlo returns)")
        segments: str = param("logprobs", "'logprobs': low-probability tokens start segments; 'turns': the steps")
        prob_threshold: float = param(0.2, "a token with rollout probability below this starts a segment (unverified)")
        whiten: bool = param(True, "whiten the advantages over the batch's mask (verl's masked_whiten)")
        masked_rewards: str = param("move", "rewards on mask-0 tokens: 'move' to the last policy token, 'drop' (verl)")

        def __post_init__(self) -> None:
            require_range("gamma", self.gamma, 0.0, 1.0)
            require_range("lam", self.lam, 0.0, 1.0)
            require_range("lam_critic", self.lam_critic, 0.0, 1.0)
            require_choice("segments", self.segments, SEGMENTS)
            require_range("prob_threshold", self.prob_threshold, 0.0, 1.0)
            require_choice("masked_rewards", self.masked_rewards, MASKED_REWARDS)

    def required_inputs(self) -> tuple[str, ...]:
        return self.requires + (("logprobs",) if self.params.segments == "logprobs" else ())

    @property
    def batch_level_reason(self) -> str | None:
        return "whitened over the batch's mask" if self.params.whiten else None

    def compute_returns(self, batch: RolloutBatch) -> tuple[Tensor, Tensor]:
        p = self.params
        starts = segment_starts(batch, batch.mask > 0, p.segments, p.prob_threshold)

        def kernel(rewards: Tensor, values: Tensor, policy: Tensor, lam: float) -> Tensor:
            return segmental_gae(rewards, values, policy, starts, p.gamma, lam, batch.bootstrap_values)

        return critic_outputs(batch, kernel, lam=p.lam, lam_critic=p.lam_critic, whiten=p.whiten,
                              masked_rewards=p.masked_rewards)  # fmt: skip
