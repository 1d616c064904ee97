"""Dr. Kernel's turn-level GAE ("egae"): each turn's discounted return on its last token, then token-level GAE.

Formula: G_t = sum_{k >= t} gamma^(k - t) r_k over the turns of a trajectory (r_k the turn's reward); G_t is placed on
the last policy token of turn t's row and every other token reward is 0; then GAE with the critic's values exactly as
canonrl's ``gae`` (verl's recursion, mask holes skipped, whitened over the mask), and returns = A + V.

Paper: "Dr. Kernel: Reinforcement Learning Done Right for Triton Kernel Generations" (arXiv 2602.05885).
Official code: hkust-nlp/KernelGYM ``drkernel/kernel/kernel_trainer.py`` (``adv_estimator == "egae"``) at 3a84417,
with ``compute_multi_turn_returns`` and verl's ``compute_gae_advantage_return``. Not T-PPO's EGAE (``gae`` with
``bootstrap_values`` is that one).

Inputs (row per turn, the official grid): ``values`` [B, T], ``traj``, ``step_index`` (−1: a padding row),
``step_rewards`` (each turn's reward; the official code reads the row sum of ``token_level_rewards``), ``group``.

Conventions and differences from the official code:
- Turn order from ``step_index``; padding rows take no part (0, and out of the whitening).
- The official code overwrites the token reward at position ``response_length - 1`` with G and keeps the row's other
  token rewards (so a reward placed elsewhere is counted twice); canonrl puts G on the last policy token and nothing
  else. They agree when each turn's reward sits on its last token, as verl writes it.
- Rows masked out of the loss (all-zero mask) still feed earlier turns' returns, as in ``trloo``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.methods._common import require_range
from canonrl.methods.gae import checked_values, gae, on_last_policy_token
from canonrl.methods.trloo import DR_KERNEL
from canonrl.ops import masked_whiten
from canonrl.registry import CriticEstimator, param, register


@register
class EGAE(CriticEstimator):
    name = "egae"
    works_in = "library, lab (context=window:K); verl, TRL: no (a row per step: verl-agent's layout)"
    description = "Turn-level GAE: each turn's discounted return on its last token, then token GAE with the critic"
    paper = DR_KERNEL
    requires = ("values", "step_rewards")
    layouts = ("row-per-step",)
    inputs_note = "`values`, `step_rewards`, `traj`, `step_index`"

    @dataclass
    class Params:
        gamma: float = param(1.0, "discount of the turn returns and of the token recursion (the scripts' 1.0)")
        lam: float = param(1.0, "GAE lambda")
        whiten: bool = param(True, "whiten the advantages over the mask (verl's masked_whiten)")

        def __post_init__(self) -> None:
            require_range("gamma", self.gamma, 0.0, 1.0)
            require_range("lam", self.lam, 0.0, 1.0)

    @property
    def batch_level_reason(self) -> str | None:
        return "whitened over the batch's mask" if self.params.whiten else None

    def compute_returns(self, batch: RolloutBatch) -> tuple[Tensor, Tensor]:
        p, steps = self.params, batch.steps
        if steps.token_column is not None:
            raise ValueError("egae takes one turn per row (turn_ids='row'); pass traj and step_index")
        live = torch.zeros(batch.batch_size, dtype=torch.bool, device=batch.device)
        live[steps.occ_row] = True
        policy = (batch.mask > 0) & live[:, None]
        values = checked_values(batch, policy)
        turn_returns = steps.returns(steps.per_step("step_rewards", batch.step_rewards), p.gamma)
        per_row = torch.zeros(batch.batch_size, device=batch.device)
        per_row[steps.occ_row] = turn_returns[steps.occ_step]
        advantages = gae(on_last_policy_token(per_row, policy), values, policy, p.gamma, p.lam)
        returns = torch.where(policy, advantages + values, 0.0)
        if p.whiten:
            advantages = masked_whiten(advantages, batch.mask * live[:, None])
        return torch.where(policy, advantages, 0.0), returns
