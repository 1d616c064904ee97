"""Q-RM: a token-level reward model's scores, scaled by their batch std, used directly as token advantages.

Formula (from the official code), over the masked tokens t of rows i, with Z_{i,t} the Q-RM's score (``token_rewards``):

    r~_{i,t}  = (Z_{i,t} - c) / s              s = population std of Z over all masked tokens of the batch
                                               (``normalize="std"``, np.std; "none": s = 1); c = 0 (``center="none"``,
                                               the official default: no centring)
    r~_{i,L}  <- mean_t r~_{i,t}               the row's last masked token gets the row mean of r~, itself included
                                               (``eos="row_mean"``: ``re_scoring_eos_rewards``; "keep": no re-scoring)
    A_{i,t}   = r~_{i,t}                       (REINFORCE: no baseline, no return-to-go)
    A_{i,t}   = r~_{i,t} - c_v (V_{i,t} - c_V) / s_V      (``reward_is_q=True``: the PPO form, ``values`` [B, T]
                                               from a critic initialised from the Q-RM, s_V = std of V over the batch's
                                               mask, c_v = ``value_coef`` = 0.01; value targets = r~)

Paper: "Discriminative Policy Optimization for Token-Level Reward Models" (Q-RM, arXiv 2505.23363, ICML 2025).
Official code: homzer/Q-RM at 74fd338: ``src/ppo/buffer.py`` (``RolloutBuffer._set`` L155-181, normalisation with
``reward_normalize=True, reward_sub_mean=False``; ``compute_returns_and_advantage`` L188-198, the ``reward_is_q``
branch), ``policy_train_policy_gradient.py`` L20-27 (``re_scoring_eos_rewards``, applied after the normalisation).
The official REINFORCE run (``scripts/train-reinforce-with-q-rm.sh``) is the default here; the official PPO run
(``scripts/train-ppo-with-q-rm.sh``, ``--reward_is_q``) is ``reward_is_q=True, eos="keep"``: the PPO script does not
re-score the EOS token.

Inputs: ``token_rewards`` [B, T] the Q-RM's per-token score Z_t on the policy's own response (a second model's
forward, see ``producer``); ``values`` [B, T] with ``reward_is_q``; ``rewards`` are not read (when only
``token_rewards`` is given, the batch fills ``rewards`` with their row sums); ``group`` only with ``center="group"``.

Edge cases:
- Statistics weight each token by its mask value (a 0/1 mask gives np.std exactly); the output is 0 off the mask and
  multiplied by the mask on it (as every estimator's).
- s = 0 (all masked scores equal, or one masked token in the batch) divides by 1 instead of 0: the scores pass
  through unscaled (the official code would give Inf/NaN). The same holds for s_V.
- A row with no masked token gets 0; a batch with none gets all zeros.
- NaN/Inf in ``token_rewards`` (or ``values``) at a masked token raises ValueError naming the rows.
- No centring (the default) means all-positive scores push every sampled token up; equal rewards do not give 0.

Options beyond the official default:
- ``center="batch"``: subtract the mean score of the batch's masked tokens first (the official ``reward_sub_mean``;
  ``values`` are centred the same way); exactly 0 where every masked score is equal.
- ``center="group"`` (an adaptation, not in the official code): subtract the mean score over the masked tokens of the
  prompt group's rows (``values`` likewise); s stays the batch std of the raw scores. Exactly 0 for a group whose
  masked scores are all equal.

Differences from the official code:
- The KL penalty ``- kl_coef |log pi_old - log pi_ref|`` that the official buffer adds to r~ before the advantage is
  the trainer's (reference policy) and is not part of this estimator.
- ``use_last_token_reward`` / ``last_token_reward_only`` (an outcome RM's last-token score copied or kept alone) and
  the GAE path taken when ``reward_is_q`` is False in PPO are not implemented (use ``gae`` on ``token_rewards``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.groups import Grouping
from canonrl.methods._common import nonzero_or_one, require_choice, require_range
from canonrl.methods.progrpo import masked_token_values
from canonrl.registry import Estimator, Paper, param, register

QRM_PAPER = Paper("Discriminative Policy Optimization for Token-Level Reward Models", "2505.23363")
NORMALIZE = ("std", "none")
EOS = ("row_mean", "keep")
CENTER = ("none", "batch", "group")


def _centre(batch: RolloutBatch, values: Tensor, weight: Tensor, center: str) -> Tensor:
    """[B, T] float64 ``values`` minus the batch's or the group's weighted mean over the mask (``center``); exactly 0
    where all those masked values are equal."""
    if center == "none":
        return values
    inside = weight > 0
    big = torch.finfo(torch.float64).max
    row_sum, row_weight = (weight * values).sum(-1), weight.sum(-1)
    row_max = torch.where(inside, values, -big).amax(-1)
    row_min = torch.where(inside, values, big).amin(-1)
    if center == "batch":
        mean = (row_sum.sum() / row_weight.sum().clamp_min(1e-300)).expand_as(row_sum)
        constant = (row_max.max() <= row_min.min()).expand_as(row_sum)
    else:
        grouping = Grouping(batch.group_index, inside.any(-1), batch.num_groups)
        mean = grouping.gather(grouping.sum(row_sum) / grouping.sum(row_weight).clamp_min(1e-300))
        constant = grouping.gather((grouping.max(row_max) <= grouping.min(row_min)).double()) > 0
    return torch.where(constant[:, None], 0.0, values - mean[:, None])


def _batch_std(values: Tensor, weight: Tensor) -> Tensor:
    """Scalar float64 weighted population std of ``values`` over the mask (np.std for a 0/1 mask); 1 where it is 0."""
    total = weight.sum().clamp_min(1e-300)
    mean = (weight * values).sum() / total
    deviation = torch.where(weight > 0, values - mean, 0.0)
    return nonzero_or_one(((weight * deviation * deviation).sum() / total).sqrt())


@register
class QRM(Estimator):
    name = "qrm"
    description = "Token-level RM scores as advantages: Z_t / batch std(Z), the EOS token set to the row mean"
    paper = QRM_PAPER
    level = "token"
    requires = ("token_rewards",)
    simulator_alignment = "fit"
    works_in = "library, verl (a reward function writing the Q-RM scores to token_level_rewards); lab, TRL: no"
    inputs_note = "`token_rewards` (the Q-RM's per-token scores); `values` with `reward_is_q`"
    producer = "Q-RM per-token scores Z_t: one forward of a second model (a token-level discriminative RM) per response"

    @dataclass
    class Params:
        normalize: str = param("std", "'std': divide by the population std of the batch's masked scores; 'none'")
        eos: str = param("row_mean", "'row_mean': the last masked token gets the row mean (re_scoring_eos_rewards)")
        center: str = param("none", "'none' (official); 'batch' (reward_sub_mean); 'group' (adaptation)")
        reward_is_q: bool = param(False, "PPO form: A = r~ - value_coef V / std(V) (reads values; targets r~)")
        value_coef: float = param(0.01, "c_v, the weight of the normalised values in the reward_is_q form")

        def __post_init__(self) -> None:
            require_choice("normalize", self.normalize, NORMALIZE)
            require_choice("eos", self.eos, EOS)
            require_choice("center", self.center, CENTER)
            require_range("value_coef", self.value_coef, 0.0)

    def required_inputs(self) -> tuple[str, ...]:
        return ("token_rewards", "values") if self.params.reward_is_q else ("token_rewards",)

    @property
    def batch_level_reason(self) -> str | None:
        if self.params.normalize == "std":
            return "divided by the std of the token scores over the whole batch's mask"
        if self.params.center == "batch":
            return "centred by the mean token score of the whole batch"
        return None

    def _scaled(self, batch: RolloutBatch, name: str, weight: Tensor) -> Tensor:
        """[B, T] float64 (x - c) / s of the per-token input ``name`` at mask positions, 0 elsewhere."""
        values = masked_token_values(batch, name).double()
        scale = _batch_std(values, weight) if self.params.normalize == "std" else 1.0
        return torch.where(weight > 0, _centre(batch, values, weight, self.params.center) / scale, 0.0)

    def compute(self, batch: RolloutBatch) -> Tensor:
        return self.compute_returns(batch)[0]

    def compute_returns(self, batch: RolloutBatch) -> tuple[Tensor, Tensor]:
        p = self.params
        weight = batch.mask.double().clamp_min(0)
        rewards = self._scaled(batch, "token_rewards", weight)
        if p.eos == "row_mean":
            inside = weight > 0
            row_mean = (weight * rewards).sum(-1) / weight.sum(-1).clamp_min(1e-300)
            positions = torch.arange(weight.shape[1], device=weight.device)
            last = torch.where(inside, positions, -1).amax(-1)
            is_last = (positions[None, :] == last[:, None]) & inside
            rewards = torch.where(is_last, row_mean[:, None], rewards)
        advantages = rewards
        if p.reward_is_q:
            advantages = rewards - p.value_coef * self._scaled(batch, "values", weight)
        advantages = (advantages * weight).float()
        if not p.reward_is_q:
            return advantages, advantages
        return advantages, (rewards * weight).float()
