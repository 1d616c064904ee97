"""REINFORCE++: discounted returns whitened over every response token of the batch (no groups).

Formula: G_t = sum_{t' >= t} gamma^(t'-t) r_t' over mask positions; A_t = (G_t - mean) / sqrt(var + 1e-8) with the
token-weighted mean and unbiased variance over all mask tokens of the batch (verl's ``masked_whiten``).

Paper: "REINFORCE++: An Efficient RLHF Algorithm with Robustness to Both Prompt and Reward Models"
(arXiv 2501.03262).

Inputs: rewards (or ``token_rewards`` [B, T], e.g. verl's ``token_level_rewards`` carrying a per-token KL penalty),
mask. ``group`` is accepted and ignored.

Conventions: an outcome reward given as ``rewards`` sits on the response's last mask token (verl's placement); with
gamma = 1 and no token rewards the returns equal the reward on every token and the whitening is computed from
per-response sums without materialising the returns. Discounting counts mask tokens: a masked span inside a
response (a tool observation) is skipped, neither rewarded nor discounted, as in verl 0.9. Fewer than two mask
tokens in the batch: 0 (verl raises).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.methods._common import require_range
from canonrl.ops import discounted_returns, masked_whiten, whiten_broadcast_scores
from canonrl.registry import Estimator, Paper, param, register

REINFORCE_PP = Paper(
    "REINFORCE++: An Efficient RLHF Algorithm with Robustness to Both Prompt and Reward Models", "2501.03262"
)


def outcome_on_last_token(rewards: Tensor, mask: Tensor) -> Tensor:
    """[B, T] float32 with each row's reward on its last mask position."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask != 0, positions, -1).amax(-1)
    return torch.where(positions == last[:, None], rewards[:, None], 0.0)


@register
class ReinforcePlusPlus(Estimator):
    name = "reinforce_pp"
    description = "REINFORCE++: discounted returns, whitened over all response tokens of the batch"
    paper = REINFORCE_PP
    level = "token"
    inputs_note = "optional `token_rewards`"

    @dataclass
    class Params:
        gamma: float = param(1.0, "discount per token (verl algorithm.gamma, 1.0 by default)")

        def __post_init__(self) -> None:
            require_range("gamma", self.gamma, 0.0, 1.0)

    @property
    def batch_level_reason(self) -> str | None:
        return "whitened over all tokens of the batch (no groups)"

    def compute(self, batch: RolloutBatch) -> Tensor:
        if batch.token_rewards is None and self.params.gamma == 1.0:
            whitened = whiten_broadcast_scores(batch.rewards, batch.lengths)
            return batch.broadcast(whitened)
        token_rewards = batch.token_rewards
        if token_rewards is None:
            token_rewards = outcome_on_last_token(batch.rewards, batch.mask)
        returns = discounted_returns(token_rewards, batch.mask, self.params.gamma)
        return masked_whiten(returns, batch.mask)
