"""Side-by-side timing of the step and critic estimators on synthetic agent batches, in one process.

Two layouts of the same episodes: **row-per-step** (verl-agent's: one row per environment step, ``traj`` and
``step_index`` set) and **row-per-trajectory** (verl's agent loop: one row of ``tokens`` tokens per episode, its
turns separated by observation tokens that are mask holes). Each contender's time is reported as a ratio to the
memory floor of its layout — writing the [B, T] output from one value per step, the least any step estimator does —
and, where one exists, to the official implementation run on the same batch (verl-agent's GiGPO and HGPO loops,
verl's GAE loop). Three sizes show how the cost grows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

import canonrl
from canonrl.bench import _timed_blocks, keep_freed_memory_for_reuse, markdown
from canonrl.methods.gae import on_last_policy_token

#: (label, registry name, hyperparameters) timed on the row-per-step layout
ROW_PER_STEP = (
    ("gigpo (mean_std_norm)", "gigpo", {"mode": "mean_std_norm"}),
    ("hgpo (K = 2)", "hgpo", {}),
    ("trloo", "trloo", {}),
)
#: timed on the row-per-trajectory layout (GAE also reads the critic's values)
ROW_PER_TRAJECTORY = (
    ("gigpo (mean_std_norm)", "gigpo", {"mode": "mean_std_norm"}),
    ("gae (gamma 1, lam 0.95)", "gae", {"lam": 0.95}),
)
FLOOR = "floor: per-step value -> [B, T] output"
#: what only GAE reads (the critic's values and the token rewards it discounts)
CRITIC_FIELDS = ("values", "token_rewards")


@dataclass
class StepRow:
    layout: str
    size: str
    label: str
    seconds: float
    floor_seconds: float
    official_seconds: float | None = None

    def cells(self) -> tuple[str, ...]:
        speedup = "" if self.official_seconds is None else f"{self.official_seconds / self.seconds:.0f}×"
        return (self.layout, self.size, self.label, f"{self.seconds * 1e3:.1f}", f"{self.seconds / self.floor_seconds:.2f}",
                speedup)


COLUMNS = ("layout", "batch", "contender", "time (ms)", "× floor", "vs official")
LEFT_COLUMNS = ("layout", "batch", "contender")


def episodes(prompts: int, trajectories: int, max_steps: int, seed: int = 0) -> dict:
    """Per step (in trajectory, time order): prompt, trajectory, step index, reward, anchor; per trajectory: outcome.

    Anchors come from a few states per prompt so that anchor groups repeat across a group's trajectories."""
    g = torch.Generator().manual_seed(seed)
    count = prompts * trajectories
    lengths = torch.randint(1, max_steps + 1, (count,), generator=g)
    traj = torch.arange(count).repeat_interleave(lengths)
    step_index = torch.arange(len(traj)) - (torch.cumsum(lengths, 0) - lengths).repeat_interleave(lengths)
    prompt = traj // trajectories
    outcome = (torch.rand(count, generator=g) < 0.5).float()
    return {
        "prompt": prompt,
        "traj": traj,
        "step_index": step_index,
        "step_rewards": torch.where(torch.rand(len(traj), generator=g) < 0.2, 1.0, 0.0),
        "anchor": prompt * 8 + torch.randint(0, 8, (len(traj),), generator=g),
        "outcome": outcome,
        "lengths": lengths,
        "traj_prompt": torch.arange(count) // trajectories,
    }


def row_per_step(ep: dict, tokens_per_step: int, device: str) -> dict:
    rows = len(ep["traj"])
    return {
        "rewards": ep["outcome"][ep["traj"]].to(device),
        "group": ep["prompt"].to(device),
        "mask": torch.ones(rows, tokens_per_step, device=device),
        "traj": ep["traj"].to(device),
        "step_index": ep["step_index"].to(device),
        "step_rewards": ep["step_rewards"].to(device),
        "anchor": ep["anchor"].to(device),
    }


def row_per_trajectory(ep: dict, tokens: int, device: str) -> dict:
    """Each episode one row of ``tokens`` tokens: its steps as equal spans, each closed by a 4-token observation."""
    lengths = ep["lengths"]
    span = tokens // int(lengths.max())
    position = torch.arange(tokens)
    turn = position // span
    inside = (position % span) < span - 4
    turn_ids = torch.where(inside[None, :] & (turn[None, :] < lengths[:, None]), turn[None, :], -1)
    g = torch.Generator().manual_seed(1)
    mask = (turn_ids >= 0).float()
    return {
        "rewards": ep["outcome"].to(device),
        "token_rewards": on_last_policy_token(ep["outcome"], mask > 0).to(device),
        "group": ep["traj_prompt"].to(device),
        "mask": mask.to(device),
        "turn_ids": turn_ids.to(device),
        "step_rewards": ep["step_rewards"].to(device),
        "anchor": ep["anchor"].to(device),
        "values": torch.randn(len(lengths), tokens, generator=g).to(device),
    }


def _official_step_contenders(batch: dict) -> dict[str, Callable[[], object]]:
    """verl-agent's GiGPO (step returns + advantage) and HGPO loops on the same row-per-step batch (CPU)."""
    from canonrl.reference import official_gigpo, official_hgpo

    cpu = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    n = len(cpu["rewards"])
    uid = np.array(cpu["group"].tolist(), dtype=object)
    traj = np.array(cpu["traj"].tolist(), dtype=object)
    anchor = np.array(cpu["anchor"].tolist(), dtype=object)
    token_rewards = torch.zeros_like(cpu["mask"])
    token_rewards[:, -1] = cpu["rewards"]
    active = np.ones(n, bool)

    def gigpo():
        returns = official_gigpo.step_discounted_returns(cpu["step_rewards"].numpy(), traj, active, 0.95)
        return official_gigpo.gigpo_advantage(token_rewards, returns, cpu["mask"], anchor, uid, traj, mode="mean_std_norm")

    def hgpo():
        returns = official_hgpo.step_discounted_returns(cpu["step_rewards"].numpy(), traj, active, 0.95)
        return official_hgpo.hgpo_advantage(token_rewards, returns, cpu["mask"], anchor, uid, traj, 2)

    return {"gigpo": gigpo, "hgpo": hgpo}


def _verl_gae(batch: dict) -> Callable[[], object] | None:
    """verl's GAE loop on the same token rewards (the outcome on each row's last policy token) and values."""
    try:
        from verl.trainer.ppo import core_algos
    except Exception:  # noqa: BLE001 — verl is optional
        return None
    return lambda: core_algos.compute_gae_advantage_return(
        batch["token_rewards"], batch["values"], batch["mask"], 1.0, 0.95
    )


def run_step_benchmark(
    *,
    sizes: tuple[int, ...] = (32, 128, 512),
    trajectories: int = 8,
    max_steps: int = 16,
    tokens_per_step: int = 256,
    tokens: int = 4096,
    repeats: int = 3,
    device: str = "cpu",
    official_up_to: int = 32,
    progress: Callable[[str], None] | None = None,
) -> list[StepRow]:
    """Every step contender at each size (prompts); the official loops only up to ``official_up_to`` prompts."""
    keep_freed_memory_for_reuse()
    rows: list[StepRow] = []
    for prompts in sizes:
        ep = episodes(prompts, trajectories, max_steps)
        for layout, build, cases in (
            ("row-per-step", lambda ep=ep: row_per_step(ep, tokens_per_step, device), ROW_PER_STEP),
            ("row-per-trajectory", lambda ep=ep: row_per_trajectory(ep, tokens, device), ROW_PER_TRAJECTORY),
        ):
            if progress:
                progress(f"{layout}, {prompts} prompts")
            batch = build()
            size = f"{prompts}×{trajectories}: {len(ep['traj']):,} steps, {int(batch['mask'].sum()):,} tokens"
            rows += _time_layout(layout, size, batch, cases, prompts <= official_up_to, device, repeats)
    return rows


def _time_layout(layout, size, batch, cases, with_official, device, repeats) -> list[StepRow]:
    steps = canonrl.make_batch(**{k: v for k, v in batch.items() if k not in CRITIC_FIELDS}).steps
    per_step = torch.rand(steps.num_steps, device=steps.device)
    contenders: list[tuple[str, Callable[[], object]]] = [(FLOOR, lambda: steps.broadcast(per_step))]
    for label, name, params in cases:
        estimator = canonrl.get_estimator(name, **params)
        fields = {k: v for k, v in batch.items() if k not in CRITIC_FIELDS or name == "gae"}
        contenders.append((label, lambda e=estimator, f=fields: e(**f)))
    official: dict[str, Callable[[], object]] = {}
    if with_official and layout == "row-per-step":
        official = _official_step_contenders(batch)
    elif layout == "row-per-trajectory" and (gae := _verl_gae(batch)) is not None:
        official = {"gae": gae}
    contenders += [(f"official {name}", fn) for name, fn in official.items()]
    times = _timed_blocks(contenders, device, repeats)
    floor = times[FLOOR]
    out = [StepRow(layout, size, FLOOR, floor, floor)]
    for label, name, _ in cases:
        out.append(StepRow(layout, size, f"canonrl {label}", times[label], floor, times.get(f"official {name}")))
    out += [StepRow(layout, size, f"official {name}", times[f"official {name}"], floor) for name in official]
    return out


def markdown_table(rows: list[StepRow]) -> str:
    return markdown(COLUMNS, LEFT_COLUMNS, rows)
