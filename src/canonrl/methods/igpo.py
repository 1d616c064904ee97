"""IGPO: information-gain turn rewards and the outcome, z-scored within the prompt group, summed over later turns.

Formula: each turn t < T of a trajectory earns its information gain IG_t, the rise of the policy's belief in the
ground-truth answer over the turn; the last turn T earns the outcome (F1) reward o of the trajectory. Within prompt
group g, the outcomes of its trajectories and the information gains of its turns are z-scored, separately
(``norm="separate"``) or together (``"joint"``):
n = (x - mu) / (sigma + eps), sigma = sqrt(mean (x - mu)^2 + 1e-8) (population), sigma := 1 for a single value;
``scale_by_std=False`` gives n = x - mu. Then A_t = n_t + gamma * A_{t+1} backwards over the trajectory's turns
(A_T = n_T), broadcast to the tokens of turn t.

Information gain (``info_gain``), from the teacher-forced mean log-prob l_t of the ground-truth answer after turn t
(l_0 before the first turn):
- ``"given"``: ``step_rewards`` holds IG_t per turn (a generator computed it); the last turn's value is ignored;
- ``"log_prob"``: IG_t = l_t - l_{t-1} (the code's ``log_prob_diff``, run by train.sh);
- ``"prob"``: IG_t = exp(l_t) - exp(l_{t-1}) (``prob_diff``, the code default); for both, ``step_values`` = l_t per
  turn (<= 0; the last turn's is not used) and ``prompt_values`` = l_0 per row.

Paper: "Information Gain-based Policy Optimization: A Simple and Effective Approach for Multi-Turn LLM Agents"
(arXiv 2510.14967).
Official code (the authors' Feb 2026 update, token-level.md B1): debajoycs98/IGPO at
745078b5a35d0b84d3d9184e0f0de05ed04e11ad, ``verl/trainer/ppo/core_algos.py`` L182–324
(``compute_grpo_outcome_advantage``: f1/IG masks, group statistics, separate/joint z-score) and L28–95
(``_compute_turn_level_advantage``: the turn accumulation); ``scrl/llm_agent/generation.py`` L318–345 and L559–615
(the information gain); ``verl/utils/reward_score/info_gain.py`` L162–295 (rewards on each turn's last token);
train.sh L55–57 (gamma 1.0, ``log_prob_diff``, ``separate``).

Inputs: ``rewards`` [B] the outcome of each trajectory (row-per-step: read from the row of the trajectory's last
step); ``group``; ``mask``; the turns as ``turn_ids`` (row-per-trajectory) or ``traj`` + ``step_index``
(row-per-step); ``step_rewards``, or ``step_values`` and ``prompt_values`` (row-per-step: the value of the row of
the trajectory's first step), as ``info_gain`` says.

Conventions and differences from the official code:
- Turns are explicit (``turn_ids`` or rows). The official code infers them from the positions of the non-zero
  normalised rewards, so a reward normalised to exactly 0 erases a turn boundary (that turn takes the next turn's
  advantage; the same numbers at gamma = 1, not at gamma < 1), and the tokens after the last non-zero one get 0.
- An information gain of exactly 0 counts in the statistics (``zero_info_gain="keep"``, the default): the official
  reward placement (info_gain.py L285–287) turns an exact 0 into 1e-10 so that the ``ig_mask`` of core_algos.py
  L225 keeps it. ``"drop"`` leaves it out and gives it n = 0, the ``ig_mask`` alone, which lets a caller mark a turn
  without a gain by 0.
- The outcome of a trajectory counts when any of its turns has mask tokens, and sits on its last turn: a last
  turn without mask tokens gets 0 but passes the outcome to earlier turns (times gamma); the official code puts it
  on the row's last response token (position mask sum - 1, which is the last one only when the mask has no holes).
  A turn without mask tokens takes no part in the information-gain statistics and gets 0.
- A trajectory of one turn has only its outcome term (the official fallback, info_gain.py L250). The official code
  also drops every gain of a trajectory whose number of gains is not turns - 1 (L258–265): canonrl takes one value
  per turn and raises on a wrong count.
- Constant groups give exactly 0; a value alone in its statistic gives 0; a repeated ``(traj, step_index)`` is one
  step; time order from ``step_index``.
- Not implemented: the curriculum weights (``use_curriculum``, off in train.sh), which scale the outcomes and the
  gains before the z-score; multiply ``rewards`` and ``step_rewards`` before the call instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch, describe_row_indices
from canonrl.groups import Grouping
from canonrl.methods._common import require_choice, require_range
from canonrl.registry import Paper, StepEstimator, param, register

IGPO_PAPER = Paper(
    "Information Gain-based Policy Optimization: A Simple and Effective Approach for Multi-Turn LLM Agents",
    "2510.14967",
)
INFO_GAINS = ("given", "log_prob", "prob")
NORMS = ("separate", "joint")
ZERO_INFO_GAIN = ("drop", "keep")
#: added to the population variance before the square root (core_algos.py L270)
VARIANCE_FLOOR = 1e-8


@register
class IGPO(StepEstimator):
    name = "igpo"
    description = "Information-gain turn rewards + outcome on the last turn, group z-scored, summed over later turns"
    paper = IGPO_PAPER
    requires = ("step_rewards",)
    inputs_note = "`step_rewards` (gains), or `step_values` + `prompt_values` (answer log-probs)"
    producer = "information gains: the policy's probability of the ground-truth answer after each turn"

    @dataclass
    class Params:
        info_gain: str = param("given", "'given' (step_rewards), or 'log_prob' / 'prob' (step_values, prompt_values)")
        norm: str = param("separate", "z-score outcomes and gains 'separate'ly (train.sh) or 'joint'ly (code default)")
        scale_by_std: bool = param(True, "divide by the group std + eps (norm_adv_by_std_in_grpo)")
        eps: float = param(1e-6, "added to the std")
        gamma: float = param(1.0, "discount over turns (train.sh's 1.0)")
        zero_info_gain: str = param("keep", "an exact 0 gain: 'keep' it in the statistics (official) or 'drop' it")

        def __post_init__(self) -> None:
            require_choice("info_gain", self.info_gain, INFO_GAINS)
            require_choice("norm", self.norm, NORMS)
            if not isinstance(self.scale_by_std, bool):
                raise ValueError(f"scale_by_std must be True or False, got {self.scale_by_std!r}")
            require_range("eps", self.eps, 0.0)
            require_range("gamma", self.gamma, 0.0, 1.0)
            require_choice("zero_info_gain", self.zero_info_gain, ZERO_INFO_GAIN)

    def required_inputs(self) -> tuple[str, ...]:
        return ("step_rewards",) if self.params.info_gain == "given" else ("step_values", "prompt_values")

    def step_advantages(self, batch: RolloutBatch) -> Tensor:
        p, steps = self.params, batch.steps
        gain = self._information_gain(batch)
        has_member = torch.zeros(steps.num_traj, device=steps.device).index_add_(0, steps.traj, steps.member.float())
        outcome = batch.rewards[steps.occ_row[steps.first_occ]]  # the row of each step; used on last steps only
        gain_member = steps.member & ~steps.is_last
        if p.zero_info_gain == "drop":
            gain_member = gain_member & (gain != 0)
        outcome_member = steps.is_last & (has_member[steps.traj] > 0)
        # 2S items: the gains of the steps, then the outcomes of the trajectories (on their last steps)
        values = torch.cat([gain, outcome])
        kind = 0 if p.norm == "joint" else steps.num_groups
        index = torch.cat([steps.group, steps.group + kind])
        grouping = Grouping(index, torch.cat([gain_member, outcome_member]), 2 * steps.num_groups)
        normalised = population_z_score(grouping, values, eps=p.eps, scale=p.scale_by_std)
        per_step = normalised[: steps.num_steps] + normalised[steps.num_steps :]
        advantages = steps.returns(per_step, p.gamma)
        return torch.where(steps.member, advantages, 0.0)

    def _information_gain(self, batch: RolloutBatch) -> Tensor:
        """[S] float32 information gain of each step (the last step's is not used)."""
        p, steps = self.params, batch.steps
        if p.info_gain == "given":
            return steps.per_step("step_rewards", batch.step_rewards)
        after = steps.per_step("step_values", batch.step_values).double()
        step_rows = steps.occ_row[steps.first_occ]
        before_first = batch.prompt_values[step_rows].double()
        _check_log_probs("step_values", after, step_rows, batch.batch_size)
        bad = steps.is_first & ~torch.isfinite(before_first)
        if bad.any():
            raise ValueError(f"prompt_values is NaN or Inf at rows {describe_row_indices(step_rows[bad], batch.batch_size)}")
        _check_log_probs("prompt_values", torch.where(steps.is_first, before_first, 0.0), step_rows, batch.batch_size)
        before = torch.where(steps.is_first, before_first, after[steps.prev.clamp_min(0)])
        if p.info_gain == "prob":
            after, before = after.exp(), before.exp()
        return (after - before).float()


def population_z_score(grouping: Grouping, values: Tensor, *, eps: float, scale: bool) -> Tensor:
    """(x - mu) / (sigma + eps) with sigma = sqrt(population variance + 1e-8), sigma := 1 for a single member
    (x - mu without ``scale``); exactly 0 in constant groups, for single members and for non-members."""
    centered = grouping.centered(values)
    if not scale:
        return centered
    sigma = (grouping.variance(values, unbiased=False) + VARIANCE_FLOOR).sqrt()
    sigma = torch.where(grouping.count <= 1, 1.0, sigma)
    return centered / (grouping.gather(sigma) + eps)


def _check_log_probs(name: str, values: Tensor, rows: Tensor, batch_size: int) -> None:
    bad = values > 0
    if bad.any():
        raise ValueError(f"{name} must be mean log-probs (<= 0), not at rows {describe_row_indices(rows[bad], batch_size)}")
