"""GAE: generalized advantage estimation with a critic, in verl's multi-turn form; VC-PPO's and T-PPO's variants.

Formula (over the policy tokens of a row, mask-0 tokens skipped): delta_t = r_t + gamma * V_next - V_t, where V_next is
the value at the row's next policy token (0 after the last, or ``bootstrap_values``); A_t = delta_t + gamma * lam *
A_next; returns = A(lam_critic) + V; advantages = masked whitening of A(lam) over the batch's mask (unbiased
variance, as verl's ``masked_whiten``).

Papers: "High-Dimensional Continuous Control Using Generalized Advantage Estimation" (arXiv 1506.02438);
decoupled lambda from "What's Behind PPO's Collapse in Long-CoT? Value Optimization Holds the Secret" (VC-PPO,
arXiv 2503.01491: lam_critic = 1.0 for the value targets, lam = 0.95 for the policy); bootstrapped truncation
from "Truncated Proximal Policy Optimization" (T-PPO, arXiv 2506.15050: a row cut before its end is bootstrapped
by the critic's value after its last token).

Inputs: ``values`` [B, T] (the critic's), ``token_rewards`` [B, T] (verl's ``token_level_rewards``) — or ``rewards``
[B], placed on each row's last policy token — and the mask, whose holes are observation/tool tokens.
``bootstrap_values`` [B] (optional): the value after each row's last token, 0 for rows that ended.

Conventions:
- Mask-0 tokens are skipped as in verl 0.9 ``compute_gae_advantage_return``: they neither discount nor carry a TD
  error; the running value and advantage pass through them. The mask is read as binary (> 0) for the recursion
  and as weights for the whitening.
- Rewards on mask-0 tokens: verl drops them, which loses the outcome when an episode ends on an observation
  token (steps.md §5.4). ``masked_rewards="move"`` (default) adds a reward that sits after a row's last policy
  token to that token, and raises, naming the rows, for a reward on a hole before it (whose owner is ambiguous);
  ``"drop"`` is verl's behaviour.
- Outside the mask advantages and returns are 0 (verl leaves the carried values there).
- A batch with fewer than two mask tokens has no variance: whitened advantages are 0 (verl raises).
- ``group`` is accepted and unused. No group statistics: the estimator is batch-level through the whitening.

Differences from verl: a blocked float32 scan over each row's packed policy tokens instead of a Python loop over T
(parity within 1e-5), and the conventions above. With ``masked_rewards="drop"`` the outputs equal verl's at every mask position.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch, describe_rows
from canonrl.methods._common import require_choice, require_range
from canonrl.ops import masked_whiten, reverse_discounted_cumsum
from canonrl.registry import CriticEstimator, Paper, param, register

GAE_PAPER = Paper("High-Dimensional Continuous Control Using Generalized Advantage Estimation", "1506.02438")
MASKED_REWARDS = ("move", "drop")


def last_policy_position(policy: Tensor) -> Tensor:
    """[B] long: the column of each row's last policy token, −1 for a row without one."""
    return torch.where(policy, torch.arange(policy.shape[1], device=policy.device), -1).amax(-1)


def on_last_policy_token(per_row: Tensor, policy: Tensor) -> Tensor:
    """[B, T] float32: each row's value on its last policy token, 0 elsewhere (and on rows without one)."""
    position = torch.arange(policy.shape[1], device=policy.device)
    return torch.where(position[None, :] == last_policy_position(policy)[:, None], per_row.float()[:, None], 0.0)


def policy_rewards(batch: RolloutBatch, policy: Tensor, masked_rewards: str) -> Tensor:
    """[B, T] float32 token rewards on policy tokens only, with rewards on holes moved or dropped."""
    if batch.token_rewards is None:
        return on_last_policy_token(batch.rewards, policy)
    rewards = batch.token_rewards.float()
    on_holes = torch.where(policy, 0.0, rewards)
    rewards = torch.where(policy, rewards, 0.0)
    if masked_rewards == "drop" or not (on_holes != 0).any():
        return rewards
    position = torch.arange(policy.shape[1], device=policy.device)
    before_last = (on_holes != 0) & (position[None, :] < last_policy_position(policy)[:, None])
    if before_last.any():
        raise ValueError(
            f"token_rewards has rewards on mask-0 tokens before the row's last policy token at rows "
            f"{describe_rows(before_last.any(-1))}: put them on a policy token, or pass masked_rewards='drop' (verl)"
        )
    return rewards + on_last_policy_token(on_holes.sum(-1), policy)


def checked_values(batch: RolloutBatch, policy: Tensor) -> Tensor:
    """[B, T] float32 critic values; NaN or Inf off the policy tokens is padding (set to 0), inside them an error."""
    values = batch.values.float()
    if torch.isfinite(values.sum()):  # a finite sum has no NaN or Inf term (an overflow only takes the slow path)
        return values
    bad = ~torch.isfinite(torch.where(policy, values, 0.0)).all(-1)
    if bad.any():
        raise ValueError(f"values is NaN or Inf inside the mask at rows {describe_rows(bad)}")
    return torch.where(policy, values, 0.0)


def gae(
    rewards: Tensor, values: Tensor, policy: Tensor, gamma: float, lam: float, bootstrap: Tensor | None = None
) -> Tensor:
    """[B, T] float32 GAE advantages on policy tokens (0 elsewhere), mask-0 tokens skipped.

    The policy tokens of each row are packed to its front (their order kept, holes dropped), where the recursion
    is a plain reverse discounted sum of the TD errors: a blocked scan, then one gather unpacks it.
    """
    B, T = policy.shape
    # each policy token's index among its row's policy tokens (for a hole: the next policy token's, always < T)
    ones = policy.long()
    slot = ones.cumsum(1) - ones
    trash = torch.where(policy, slot, T)  # holes write to a spare column

    def pack(x: Tensor) -> Tensor:
        return torch.zeros(B, T + 1, dtype=torch.float32, device=x.device).scatter_(1, trash, x.float())[:, :T]

    packed_values, count = pack(values), policy.sum(-1)
    following = torch.cat([packed_values[:, 1:], packed_values.new_zeros(B, 1)], 1)  # V at the next policy token
    if bootstrap is not None:  # after a row's last policy token: the bootstrap value instead of 0
        has_token = count > 0
        following[has_token, count[has_token] - 1] = bootstrap[has_token].float()
    delta = pack(rewards) + gamma * following - packed_values  # 0 past each row's last policy token
    advantages = reverse_discounted_cumsum(delta, gamma * lam)
    return torch.where(policy, advantages.gather(1, slot), 0.0)


def critic_outputs(
    batch: RolloutBatch, kernel: Callable[[Tensor, Tensor, Tensor, float], Tensor], *, lam: float, lam_critic: float,
    whiten: bool, masked_rewards: str,
) -> tuple[Tensor, Tensor]:
    """(advantages, value targets) of a GAE-style ``kernel(rewards, values, policy, lam)``: the critic's values and the
    policy tokens' rewards checked, the kernel at ``lam`` (and at ``lam_critic`` for the targets when it differs),
    returns = A(lam_critic) + V, advantages whitened over the mask when asked; both 0 off the policy tokens."""
    policy = batch.mask > 0
    values = checked_values(batch, policy)
    rewards = policy_rewards(batch, policy, masked_rewards)
    advantages = kernel(rewards, values, policy, lam)
    critic = advantages if lam_critic == lam else kernel(rewards, values, policy, lam_critic)
    returns = torch.where(policy, critic + values, 0.0)
    if whiten:
        advantages = masked_whiten(advantages, batch.mask)
    return torch.where(policy, advantages, 0.0), returns


@register
class GAE(CriticEstimator):
    name = "gae"
    description = "Critic-based token advantages: GAE over policy tokens (verl's multi-turn skip), whitened"
    paper = GAE_PAPER
    layouts = ("row-per-response", "row-per-trajectory")
    inputs_note = "`values`, `token_rewards`"

    @dataclass
    class Params:
        gamma: float = param(1.0, "discount per policy token (verl default 1.0)")
        lam: float = param(1.0, "GAE lambda of the policy's advantages (verl default 1.0; VC-PPO 0.95)")
        lam_critic: float | None = param(None, "GAE lambda of the value targets (VC-PPO 1.0); None: same as lam")
        whiten: bool = param(True, "whiten the advantages over the batch's mask (verl's masked_whiten)")
        masked_rewards: str = param("move", "rewards on mask-0 tokens: 'move' to the last policy token, 'drop' (verl)")

        def __post_init__(self) -> None:
            require_range("gamma", self.gamma, 0.0, 1.0)
            require_range("lam", self.lam, 0.0, 1.0)
            if self.lam_critic is not None:
                require_range("lam_critic", self.lam_critic, 0.0, 1.0)
            require_choice("masked_rewards", self.masked_rewards, MASKED_REWARDS)

    @property
    def batch_level_reason(self) -> str | None:
        return "whitened over the batch's mask" if self.params.whiten else None

    def compute_returns(self, batch: RolloutBatch) -> tuple[Tensor, Tensor]:
        p = self.params

        def kernel(rewards: Tensor, values: Tensor, policy: Tensor, lam: float) -> Tensor:
            return gae(rewards, values, policy, p.gamma, lam, batch.bootstrap_values)

        lam_critic = p.lam if p.lam_critic is None else p.lam_critic
        return critic_outputs(batch, kernel, lam=p.lam, lam_critic=lam_critic, whiten=p.whiten,
                              masked_rewards=p.masked_rewards)  # fmt: skip
