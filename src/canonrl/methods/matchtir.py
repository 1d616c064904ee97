"""MatchTIR: the mean of a trajectory-level GRPO advantage and a turn-level z-score of the discounted turn return.

Formula: s = the row's outcome score (the sum of its token rewards); r_t = the reward of turn t (the token reward
on the turn's last token); G_t = r_t + gamma * G_{t+1} over the row's turns;
A^traj = (s - mean_g s) / (std_g s + eps) over the rows of prompt group g;
A^turn_t = (G_t - mean G) / (std G + eps) over the turns of group g at the same position t;
A_t = (A^traj + A^turn_t) / 2 on turn t's tokens. Unbiased stds; a row alone in its group, or a turn alone at its
position, keeps its raw value (mean 0, std 1: s / (1 + eps), G / (1 + eps)).

Paper: "MatchTIR: Fine-Grained Supervision for Tool-Integrated Reasoning via Bipartite Matching" (arXiv 2601.10712).
Official code: quchangle1/MatchTIR ``Code/verl/trainer/ppo/core_algos.py`` (``compute_grpo_outcome_advantage``,
modified in place by MatchTIR) at f614ce1, transcribed as the test oracle ``tests/official_matchtir.py``. The turn
rewards come from MatchTIR's bipartite matching of predicted and ground-truth tool calls
(``Code/verl/utils/reward_score/tool.py``), which is a reward generator, not part of this estimator.

Inputs (row-per-trajectory: one row per multi-turn dialogue, tool-observation tokens mask-0 holes):
``token_rewards`` [B, T] with each turn's reward on its last token (MatchTIR writes it on ``<|im_end|>``) — or
``step_rewards``, one per turn, given directly (then pass ``rewards`` too, normally their row sums); ``group`` the
prompt's uid; the mask. Turns are the maximal runs of mask > 0 (``turn_ids="mask_runs"``, the official
segmentation), or explicit ``turn_ids``.

Conventions:
- Without ``turn_ids`` the turns are the mask runs, unless ``traj`` or ``step_index`` is given (a row-per-step
  batch, whose rows are its turns: ``turn_ids="row"``).
- The outcome score is ``rewards`` ([B]; by default the sum of the token rewards over the mask). The trajectory
  statistics take one value per trajectory with a mask token.
- A turn's reward is the token reward on its last mask token (its last token if it has none).
- Constant groups give exactly 0 (the official float32 ``torch.mean`` of equal values is not always exact and its
  error is divided by std + 1e-6, steps.md §5.1); ``numerics="upstream"`` keeps the official float32 statistics
  and the official float32 return recursion (one loop over turn positions), so it reproduces that noise.
- A row without mask tokens has no turn: it gets 0 and takes part in no statistic (the official code crashes on
  it, ``torch.stack([])``).

Differences from the official code: the token-reward sum of the outcome score is taken over the mask (the official
code sums every column; equal when rewards sit on turn ends, as MatchTIR's reward function puts them); the
discounted returns are a float64 scan (parity within 1e-5); a group key is a uid, not ``str(uid)``, so uids ``1`` and
``"1"`` stay apart; ``norm_adv_by_std_in_grpo=False`` (no std division of the trajectory part) is not offered.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.methods._common import require_choice, require_range
from canonrl.methods._steps import NUMERICS, float32_returns, group_relative, numerics_param, turn_rewards
from canonrl.methods.gigpo import episode_advantages
from canonrl.registry import Paper, StepEstimator, param, register

MATCHTIR_PAPER = Paper(
    "MatchTIR: Fine-Grained Supervision for Tool-Integrated Reasoning via Bipartite Matching", "2601.10712"
)


@register
class MatchTIR(StepEstimator):
    name = "matchtir"
    description = "(Trajectory GRPO + z-score of the discounted turn return at each turn position) / 2 (tool use)"
    paper = MATCHTIR_PAPER
    requires = ()  # token_rewards or step_rewards: checked when the turn rewards are read
    layouts = ("row-per-trajectory",)
    default_turns = "mask_runs"
    inputs_note = "`token_rewards` on each turn's last token, or `step_rewards`; turns from the mask runs"

    @dataclass
    class Params:
        gamma: float = param(0.9, "discount of the turn returns (0.9, hard-coded in the official code)")
        eps: float = param(1e-6, "added to both stds")
        numerics: str = numerics_param()

        def __post_init__(self) -> None:
            require_range("gamma", self.gamma, 0.0, 1.0)
            require_range("eps", self.eps, 0.0, float("inf"), low_open=True)  # 0 would make a constant group 0 / 0
            require_choice("numerics", self.numerics, NUMERICS)

    def step_advantages(self, batch: RolloutBatch) -> Tensor:
        p, steps = self.params, batch.steps
        rewards = turn_rewards(batch, steps, self.name)
        upstream = p.numerics == "upstream"
        returns = float32_returns(steps, rewards, p.gamma) if upstream else steps.returns(rewards, p.gamma)
        # GiGPO's episode advantage over the group's trajectories: one score per trajectory, s / (1 + eps) alone
        trajectory = episode_advantages(batch, scale="unbiased", eps=p.eps, numerics=p.numerics, stats="trajectories")
        turn = group_relative(
            steps.by(steps.group, steps.pos), returns, scale="unbiased", eps=p.eps, numerics=p.numerics,
            singleton=returns / (1 + p.eps), order=steps.first_occ,
        )
        return torch.where(steps.member, (trajectory + turn) / 2, 0.0)
