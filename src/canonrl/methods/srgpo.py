"""SRGPO (SeeNav-Agent): an episode group advantage plus a step advantage of process rewards in random step groups.

Formula: A = A^E + step_advantage_w * A^S. A^E is GiGPO's episode advantage with std division: the group-relative
episode reward, mean and unbiased std over the group's step rows (a group of one keeps s / (1 + eps)). A^S is the
z-score (unbiased std, eps) of the step's immediate process reward r^step within random groups of
``step_group_size`` steps: the batch's steps (or each trajectory's, ``scope="trajectory"``) shuffled and cut into
chunks; a chunk of one gives 0. Process rewards are not discounted.

Paper: "SeeNav-Agent: Enhancing Vision-Language Navigation with Visual Prompt and Step-Level Policy Optimization"
(arXiv 2512.02631). Official code: WzcTHU/SeeNav-Agent ``verl-agent/srgpo/core_srgpo.py`` (L12–48 the advantage,
L101–167 the episode part, L170–220 the random step groups).

Inputs: row per step (verl-agent's layout), or a row-per-trajectory batch with ``turn_ids``: ``rewards`` the
episode reward, ``group``, ``traj``, ``step_index``, ``step_rewards`` the process reward of each step.

Conventions and differences from the official code:
- The random groups come from a generator seeded by (``seed``, the trainer step), so a run is reproducible and the
  groups change from step to step; the official code draws them from the global ``np.random``.
- ``scope="batch"`` is what the official code runs: its ``sample_within_task`` option is overridden by an ``if``
  that should be an ``elif`` (token-level.md B7); ``"task"`` groups within each prompt group, as the option meant;
  ``"trajectory"`` within each trajectory (``sample_within_traj``).
- Constant groups give exactly 0; a repeated ``(traj, step_index)`` is one step; time order from ``step_index``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.methods._common import require_choice, require_finite, require_int, require_range
from canonrl.methods._steps import group_relative
from canonrl.methods.gigpo import episode_advantages
from canonrl.registry import Paper, StepEstimator, param, register

SEENAV = Paper(
    "SeeNav-Agent: Enhancing Vision-Language Navigation with Visual Prompt and Step-Level Policy Optimization",
    "2512.02631",
)
SCOPES = ("batch", "task", "trajectory")


def random_chunks(steps, scope_key: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """[S] long chunk id: the member steps of each scope shuffled and cut into chunks of ``size``."""
    member = steps.member
    shuffle = torch.rand(steps.num_steps, generator=generator).to(steps.device)
    order = torch.argsort(shuffle)
    order = order[torch.sort(scope_key[order], stable=True).indices]  # by scope, randomly within it
    order = order[torch.sort((~member[order]).long(), stable=True).indices]  # members first
    scope_sorted = scope_key[order]
    start = torch.ones_like(scope_sorted, dtype=torch.bool)
    start[1:] = scope_sorted[1:] != scope_sorted[:-1]
    index = torch.arange(steps.num_steps, device=steps.device)
    first = torch.cummax(torch.where(start, index, 0), 0).values
    chunk_sorted = torch.stack([scope_sorted, (index - first) // size], 1)
    chunk = torch.empty_like(chunk_sorted)
    chunk[order] = chunk_sorted
    return chunk


@register
class SRGPO(StepEstimator):
    name = "srgpo"
    description = "Episode group advantage + z-scored process rewards in random step groups (embodied agents)"
    paper = SEENAV
    requires = ("step_rewards",)
    inputs_note = "`step_rewards` (+ `traj`, `step_index`)"

    @dataclass
    class Params:
        step_advantage_w: float = param(0.5, "weight w of the step-level advantage (the official script's 0.5)")
        step_group_size: int = param(16, "steps per random group; 0 puts every step of a scope in one group")
        scope: str = param("batch", "where the random groups are drawn: 'batch' (official), 'task', 'trajectory'")
        seed: int = param(0, "seed of the random groups (combined with the trainer step)")
        eps: float = param(1e-6, "added to the std")

        def __post_init__(self) -> None:
            require_finite("step_advantage_w", self.step_advantage_w)
            require_int("step_group_size", self.step_group_size, 0)
            require_choice("scope", self.scope, SCOPES)
            require_int("seed", self.seed, 0)
            require_range("eps", self.eps, 0.0)

    @property
    def batch_level_reason(self) -> str | None:
        return "random step groups drawn across the whole batch" if self.params.scope == "batch" else None

    def step_advantages(self, batch: RolloutBatch) -> Tensor:
        p, steps = self.params, batch.steps
        episode = episode_advantages(batch, scale="unbiased", eps=p.eps, numerics="exact")
        process = steps.per_step("step_rewards", batch.step_rewards)
        scope = {"batch": torch.zeros_like(steps.group), "task": steps.group, "trajectory": steps.traj}[p.scope]
        size = p.step_group_size or max(steps.num_steps, 1)
        generator = torch.Generator().manual_seed(p.seed * 1_000_003 + self.step)
        chunks = random_chunks(steps, scope, size, generator)
        step = group_relative(steps.by(chunks), process, scale="unbiased", eps=p.eps, numerics="exact")
        return torch.where(steps.member, episode + p.step_advantage_w * step, 0.0)
