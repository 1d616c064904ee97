"""MARS: turn-level returns of per-(game, player) centred turn scores, centred per player on their distinct values,
whitened.

Formula (self-play configuration): r~ = r - mean r over the turns of the same game tag and player;
G_k = sum_{k' >= k} r~_k' over the row's turns (gamma = 1); per player p over the whole batch (all tags),
U_p = the set of distinct values among the returns of p's turns, plus 0 if one of p's rows has a token after its
last turn end; A = G - mean(U_p) (``advantage_norm="mean"``; ``"mean_std"`` also divides by std(U_p) + 1e-6,
unbiased), 0 for a player whose U_p holds one value; then A is whitened over the batch's turn tokens (token-weighted
mean, unbiased variance, (A - mean) * rsqrt(var + 1e-8), as ``canonrl.ops.masked_whiten``).

Paper: "MARS: Reinforcing Multi-Agent Reasoning of LLMs through Self-Play in Strategic Games" (arXiv 2510.15414; v2
retitled "MARSHAL: Incentivizing Multi-Agent Reasoning via Self-Play with Strategic LLMs").
Official code: thu-nics/MARS (a fork of alibaba/ROLL) at 5979f75: ``roll/utils/functionals.py``
(``reward_postprocess_agentic``, ``reward_normalize_by_player``, ``compute_advantage``,
``compute_reinforce_return``, ``normalize_unique_values_by_player``, ``masked_whiten``),
``roll/pipeline/agentic/agentic_pipeline.py``, ``roll/agentic/rollout/env_manager.py``; defaults from
``examples/tictactoe/agentic_val_tictactoe_selfplay.yaml``. Transcribed as the test oracle ``tests/official_mars.py``.

Inputs (one row per (game, player): the player's whole multi-turn chat, response-aligned): ``turn_ids`` marking
each assistant turn's tokens (default: the mask runs), ``step_rewards`` the raw turn scores (or ``token_rewards``
with each turn's score on its last token, the official ``<|im_end|>`` placement), ``agent`` the player of each row
(the official ``_p0``/``_p1`` suffix of ``group_ids``), ``group`` the game/env tag (the official
``reward_normalization.grouping: tags``; pass one constant group for ``grouping: batch``).

Conventions (steps.md §5.2, §8):
- A turn ends on its last mask token. The "padding" of the distinct-value step is every column after a row's last
  turn end: the official code centres the distinct values of its whole [B, L-1] advantage tensor, where such a
  column holds a return of exactly 0 (prompt and observation columns before a turn end hold the next turn's
  return, already in the set). So a row adds a 0 to its player's values iff its last turn ends before the last
  column — trailing observation tokens and right padding alike; a row that fills the width adds none.
- Values are distinct up to float noise (``numerics="exact"``): the centring and the returns are computed in
  float64 and values closer than 2 float32 ulps of the batch's largest value count as one, so the set is the one
  of exact arithmetic. The official float32 set splits equal returns whose sums were rounded differently (with
  game scores such as -1, 0, 0.5, 1 and a cell mean of 1/3, (1 - 1/3) + (0 - 1/3) and 1/3 differ in the last bit):
  one extra distinct value moves the player's baseline. ``numerics="upstream"`` takes the official float32 path
  (mean = fl(sum / count), r - mean and the return recursion in float32, exact float equality), which reproduces
  that split wherever the official sums are exact (dyadic scores, as game scores usually are); it does not
  reproduce the float noise of ``whiten_rewards=True``.
- Exact zeros: in ``"exact"`` a (tag, player) of equal scores centres to exactly 0 (the official float32 mean of
  equal values can be off by an ulp); in both numerics equal advantages whiten to 0.
- ``whiten_rewards=True`` whitens the centred rewards over the turn tokens before the returns. Their exact mean is
  0 (they are centred per cell), so it is a rescale by rsqrt(var + 1e-8); the official code subtracts its float32
  mean (~1e-9, noise) from every response token, which makes the returns drift within a turn and every token a
  distinct value: its result depends on rounding order (differences up to 0.08, steps.md §5.2). Default False for
  that reason (the shipped self-play config sets True); with whiten_advantages the rescale hardly matters.
- A (tag, player) with a single turn gets r~ = 0 (the official ``masked_var`` raises). Any number of players,
  any hashable ids (the official code knows ``_p0`` and ``_p1`` only; rows of another player are left raw).
- Rows without turns (no mask token) take no part and add no 0. The mask is read as binary for the rewards
  (``whiten_rewards``); its values weight the whitening of the advantages, as ``masked_whiten``.
- A step without mask tokens (explicit ``turn_ids``) is still a turn of its row: its centred reward feeds the
  returns of earlier turns; it joins no statistic (mean, distinct values, whitening) and gets 0. Tokens in no
  turn get 0 and stay out of the whitening (the official whitening covers every response token).
- A batch with fewer than two turn tokens, or whose advantages are all equal, gets exactly 0 (the official
  ``masked_var`` raises on one token; equal values leave float noise times 1e4), in both numerics.
- ``compute_with_returns`` gives the turn returns G (of the centred, optionally whitened, rewards) as the
  returns, as the official ``compute_advantage`` does.

Not offered: the other reward normalisations (``identity``, ``mean_std``, ``asym_clip``, ``running``),
``reward_clip``, ``advantage_clip``, a discount (gamma = 1 in the self-play configs; the official gamma would
discount per token, not per turn).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.methods._common import require_choice
from canonrl.methods._steps import NUMERICS, float32_returns, turn_end_columns, turn_rewards
from canonrl.ops import WHITEN_EPS, whiten_broadcast_scores
from canonrl.registry import Paper, StepEstimator, param, register

MARS_PAPER = Paper("MARS: Reinforcing Multi-Agent Reasoning of LLMs through Self-Play in Strategic Games", "2510.15414")
ADVANTAGE_NORMS = ("mean", "mean_std", "none")
#: values of the distinct-value step closer than this many float32 ulps of the largest one are one value
DISTINCT_ULPS = 2.0


@register
class MARS(StepEstimator):
    name = "mars"
    description = "Turn returns of scores centred per (game, player), centred on the player's distinct values (games)"
    paper = MARS_PAPER
    requires = ("agent",)  # and step_rewards or token_rewards: checked when the turn rewards are read
    layouts = ("row-per-trajectory",)
    default_turns = "mask_runs"
    inputs_note = "`agent`, turn scores (`token_rewards` or `step_rewards`)"

    @dataclass
    class Params:
        advantage_norm: str = param("mean", "per player over distinct return values: 'mean', 'mean_std' or 'none'")
        whiten_advantages: bool = param(True, "whiten the advantages over the batch's turn tokens")
        whiten_rewards: bool = param(False, "whiten the centred rewards first (official config True, float-fragile)")
        numerics: str = param(
            "exact", "'exact': distinct values of exact arithmetic; 'upstream': the official float32 ones (equal "
            "returns rounded differently count twice)"
        )

        def __post_init__(self) -> None:
            require_choice("advantage_norm", self.advantage_norm, ADVANTAGE_NORMS)
            require_choice("numerics", self.numerics, NUMERICS)

    @property
    def batch_level_reason(self) -> str | None:
        return "a player's distinct values span every tag of the batch; the whitenings are batch-wide"

    def step_advantages(self, batch: RolloutBatch) -> Tensor:
        return self.step_advantages_and_returns(batch)[0]

    def step_advantages_and_returns(self, batch: RolloutBatch) -> tuple[Tensor, Tensor]:
        p, steps = self.params, batch.steps
        member = steps.member
        agent = steps.per_step_ids("agent", batch.agent, per_row=True)
        rewards = turn_rewards(batch, steps, self.name)
        cells = steps.by(steps.group, agent)
        upstream = p.numerics == "upstream"
        if upstream:  # the official float32 arithmetic: mean = fl(sum / count), r - mean in float32
            mean = cells.sum(rewards.double()).float() / cells.count.clamp_min(1)
            centred = rewards.float() - mean[cells.index]
        else:
            rewards = rewards.double()
            centred = torch.where(member, cells.centered(rewards), rewards - cells.mean(rewards)[cells.index])
        tokens = torch.where(member, steps.mass, 0.0).double()
        total = tokens.sum()
        if p.whiten_rewards:  # exact mean 0: a rescale by rsqrt(var + eps)
            variance = (torch.where(member, centred.double(), 0.0) ** 2).sum() / (total - 1).clamp_min(1)
            scale = torch.where(total > 1, torch.rsqrt(variance + WHITEN_EPS), 0.0)
            centred = centred * scale.to(centred.dtype)
        returns = float32_returns(steps, centred, 1.0) if upstream else steps.returns(centred, 1.0)
        advantages = returns.double()
        if p.advantage_norm != "none":
            ulps = 0.0 if upstream else DISTINCT_ULPS
            advantages = self._distinct_value_norm(batch, steps, agent, advantages, ulps)
        if p.whiten_advantages:
            advantages = _whiten(advantages, tokens, member)
        return torch.where(member, advantages, 0.0).float(), returns

    def _distinct_value_norm(self, batch: RolloutBatch, steps, agent: Tensor, values: Tensor, ulps: float) -> Tensor:
        """[S] values centred (and scaled, 'mean_std') on their player's distinct values, 0 from a trailing column
        included; 0 for a player with a single distinct value. Values closer than ``ulps`` float32 ulps of the
        largest one are one value (0: exact float equality, as ``torch.unique``)."""
        member = steps.member
        B, T = batch.mask.shape
        end = turn_end_columns(steps)
        rows = torch.arange(B, device=steps.device)
        last_end = torch.full((B,), -1, dtype=torch.long, device=steps.device)
        last_end = last_end.scatter_reduce(0, steps.occ_row, end, reduce="amax")
        last_occ = torch.full((B,), -1, dtype=torch.long, device=steps.device)
        occurrences = torch.arange(steps.num_occurrences, device=steps.device)
        last_occ = last_occ.scatter_reduce(0, steps.occ_row, occurrences, reduce="amax")
        takes_part = torch.zeros(B, dtype=torch.bool, device=steps.device)
        takes_part[steps.occ_row[member[steps.occ_step]]] = True
        trailing = rows[takes_part & (last_end < T - 1)]
        candidate_agent = torch.cat([agent[member], agent[steps.occ_step[last_occ[trailing]]]])
        candidate = torch.cat([values[member], values.new_zeros(trailing.shape[0])])
        if candidate.numel() == 0:
            return torch.zeros_like(values)
        # distinct (agent, value) pairs: sort by value, then stably by agent; a new value where the gap exceeds tol
        order = torch.sort(candidate, stable=True).indices
        order = order[torch.sort(candidate_agent[order], stable=True).indices]
        sorted_agent, sorted_value = candidate_agent[order], candidate[order]
        tolerance = ulps * torch.finfo(torch.float32).eps * sorted_value.abs().max()
        new = torch.ones_like(sorted_agent, dtype=torch.bool)
        new[1:] = (sorted_agent[1:] != sorted_agent[:-1]) | (sorted_value[1:] - sorted_value[:-1] > tolerance)
        distinct, distinct_agent = sorted_value[new], sorted_agent[new]
        agents = int(agent.max().item()) + 1
        count = torch.zeros(agents, dtype=torch.float64, device=steps.device).index_add_(
            0, distinct_agent, torch.ones_like(distinct)
        )
        mean = torch.zeros_like(count).index_add_(0, distinct_agent, distinct) / count.clamp_min(1)
        out = values - mean[agent]
        if self.params.advantage_norm == "mean_std":
            deviation = distinct - mean[distinct_agent]
            variance = torch.zeros_like(count).index_add_(0, distinct_agent, deviation * deviation)
            out = out / ((variance / (count - 1).clamp_min(1)).sqrt() + 1e-6)[agent]
        return torch.where(count[agent] > 1, out, 0.0)


def _whiten(values: Tensor, tokens: Tensor, member: Tensor) -> Tensor:
    """[S] masked whitening of per-step values weighted by their tokens (``whiten_broadcast_scores``); exactly 0
    when there are fewer than two tokens or the member values are all equal."""
    high = torch.where(member, values, float("-inf")).max() if member.any() else values.new_zeros(())
    low = torch.where(member, values, float("inf")).min() if member.any() else values.new_zeros(())
    return torch.where(high > low, whiten_broadcast_scores(values, tokens), 0.0)
