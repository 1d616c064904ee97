"""FSPO: a base estimator's advantages with their sign set by each step's factuality label.

Formula: A = the ``base`` estimator's sequence-level advantage of the step's trajectory (GRPO by default); for a step
with verifier label s in {-1, 0, +1}:

    A_step = A    if s * A >= 0
    A_step = -A   otherwise

i.e. a factual step (s = +1) gets |A|, a non-factual one (s = -1) gets -|A|, an unlabelled one (s = 0) keeps A.

Paper: "The Hallucination Dilemma: Factuality-Aware Reinforcement Learning for Large Reasoning Models", Li & Ng
(FSPO, arXiv 2505.24630). Official code: ``nusnlp/FSPO`` at 7f5e4f9, ``verl/trainer/ppo/ray_trainer.py::
compute_advantage`` (grpo branch), labels from ``verl/workers/fsdp_workers.py::validate_model_reasoning``.

Inputs: ``rewards``, ``group``, mask, ``step_labels`` (per step, in {-1, 0, +1}: a sentence's verdict, ``> 0.5`` of
the verifier's score -> +1 else -1 upstream; 0 for no verdict), the steps (``turn_ids`` marking the sentences of a
response, or a row-per-step layout with ``traj`` / ``step_index``).

Conventions:
- The base advantage is taken over trajectories, not rows: one item per trajectory (its reward is the ``rewards`` of
  its first step's row; its mask the mask tokens of its steps, packed in time order), so both layouts give the same
  numbers and duplicated step rows or padding rows (``step_index = -1``) do not enter the base's statistics. The base
  must be a sequence-level estimator that reads nothing beyond rewards, group and mask.
- A step without mask tokens gets 0; tokens in no step get 0. Upstream, tokens past the aligned sentences keep the
  label +1, so the answer tail of a negative-advantage response is flipped to a positive advantage; here the tail
  is whatever step the caller makes of it: a step labelled 0 keeps A, one labelled +1 reproduces the official code.
- Labels are exact integers in {-1, 0, +1}; anything else raises, naming the rows.

Differences from the official code: sentence-to-token alignment is the caller's (``turn_ids``), not a re-tokenisation
counted from the response's start; the tail convention above; any sequence-level base instead of GRPO only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch, describe_row_indices, make_batch
from canonrl.methods._wrapped import BASE_HELP, BASE_PARAMS_HELP, HasBase, check_base
from canonrl.registry import SOLVER_WORKS_IN, Estimator, Paper, StepEstimator, param, register

FSPO_PAPER = Paper(
    "The Hallucination Dilemma: Factuality-Aware Reinforcement Learning for Large Reasoning Models", "2505.24630"
)


def check_trajectory_base(wrapper: str, base: Estimator) -> None:
    """Raise unless ``base`` reads nothing beyond rewards, group and mask (what a trajectory batch carries)."""
    extra = base.required_inputs()
    if extra:
        raise ValueError(
            f"estimator {wrapper!r} computes its base over trajectories, which carry only rewards, group and mask; "
            f"base {base.name!r} needs {', '.join(map(repr, extra))}"
        )


def trajectory_batch(batch: RolloutBatch) -> RolloutBatch:
    """A batch with one row per trajectory of ``batch.steps``: the reward of its first step's row, its group, and
    the mask values of its steps' mask tokens (first copies only) packed in time order."""
    steps = batch.steps
    B, T = batch.mask.shape
    device = steps.device
    if steps.token_occ is None:
        row_occ = torch.full((B,), -1, dtype=torch.long, device=device)
        row_occ[steps.occ_row] = torch.arange(steps.num_occurrences, device=device)
        token_occ = row_occ[:, None].expand(B, T)
    else:
        token_occ = steps.token_occ
    first_copy = steps.first_occ[steps.occ_step] == torch.arange(steps.num_occurrences, device=device)
    occ = token_occ.clamp_min(0)
    keep = (token_occ >= 0) & (batch.mask > 0)
    if steps.num_occurrences:
        keep = keep & first_copy[occ]
    rows, columns = keep.nonzero(as_tuple=True)
    step = steps.occ_step[occ[rows, columns]] if rows.numel() else rows
    order = torch.argsort(step * max(T, 1) + columns)  # steps are in (trajectory, time) order
    step, rows, columns = step[order], rows[order], columns[order]
    traj = steps.traj[step]
    count = torch.zeros(steps.num_traj, dtype=torch.long, device=device).index_add_(0, traj, torch.ones_like(traj))
    start = torch.cumsum(count, 0) - count
    rank = torch.arange(traj.numel(), device=device) - start[traj]
    mask = torch.zeros(steps.num_traj, max(int(count.max()) if steps.num_traj else 0, 1), device=device)
    mask[traj, rank] = batch.mask[rows, columns].float()
    return make_batch(**trajectory_rewards_and_groups(batch), mask=mask)


def trajectory_rewards_and_groups(batch: RolloutBatch) -> dict[str, Tensor]:
    """Per trajectory of ``batch.steps``: ``rewards`` (those of its first step's row) and ``group``. A trajectory
    without a step (a row whose ``turn_ids`` are all -1) gets reward 0 in group 0; it has no mask token in the
    trajectory batches built from these, so it takes part in no statistic."""
    steps = batch.steps
    S, device = steps.num_steps, steps.device
    first_step = torch.full((steps.num_traj,), S, dtype=torch.long, device=device)
    first_step = first_step.scatter_reduce(0, steps.traj, torch.arange(S, device=device), reduce="amin")
    has_step = first_step < S
    first_row = steps.occ_row[steps.first_occ[first_step[has_step]]]
    rewards = batch.rewards.new_zeros((steps.num_traj, *batch.rewards.shape[1:]))
    rewards[has_step] = batch.rewards[first_row]
    group = torch.zeros(steps.num_traj, dtype=torch.long, device=device).scatter_(0, steps.traj, steps.group)
    return {"rewards": rewards, "group": group}


def trajectory_base_advantages(estimator: Estimator, batch: RolloutBatch) -> Tensor:
    """[S] float32: the base estimator's advantage of each step's trajectory (0 for a trajectory without mask)."""
    steps = batch.steps
    if steps.num_traj == 0:
        return torch.zeros(0, device=steps.device)
    estimator.base.step = estimator.step
    per_traj = estimator.base.sequence_advantages(trajectory_batch(batch)).float()
    return per_traj[steps.traj]


def checked_labels(steps, value) -> Tensor:
    """[S] float32 labels in {-1, 0, +1}; anything else raises, naming the rows."""
    labels = steps.per_step("step_labels", value)
    bad = (labels != -1) & (labels != 0) & (labels != 1)
    if bad.any():
        rows = describe_row_indices(steps.occ_row[steps.first_occ[bad]], steps.batch_size)
        raise ValueError(f"step_labels must be -1, 0 or +1; other values at steps of rows {rows}")
    return labels


@register
class FSPO(HasBase, StepEstimator):
    name = "fspo"
    works_in = SOLVER_WORKS_IN
    description = "A base advantage with its sign set by each step's factuality label (step_labels in {-1, 0, +1})"
    paper = FSPO_PAPER
    requires = ("step_labels",)
    layouts = ("row-per-response", "row-per-trajectory", "row-per-step")
    inputs_note = "`step_labels` per step (sentences via `turn_ids`)"
    producer = "step factuality labels: a verifier run on each reasoning step"

    @dataclass
    class Params:
        base: str = param("grpo", BASE_HELP + "; over trajectories, reading only rewards, group and mask")
        base_params: dict | None = param(None, BASE_PARAMS_HELP)

        def __post_init__(self) -> None:
            check_base(self.base, "fspo")

    def __init__(self, **hyperparameters) -> None:
        super().__init__(**hyperparameters)
        check_trajectory_base(self.name, self.base)

    def step_advantages(self, batch: RolloutBatch) -> Tensor:
        steps = batch.steps
        labels = checked_labels(steps, batch.step_labels)
        base = trajectory_base_advantages(self, batch)
        out = torch.where(labels * base >= 0, base, -base)
        return torch.where(steps.member, out, 0.0)
