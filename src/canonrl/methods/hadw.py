"""HA-DW: History-Aware adaptive Difficulty Weighting of a group-relative advantage, with an evolving anchor.

Paper: "Your Group-Relative Advantage Is Biased" (arXiv 2601.08521), section 3 and appendices B/C/E/F; official
code ``yangfengkai/HA-DW`` (``verl/trainer/ppo/core_algos.py::compute_ha_dw_outcome_advantage``).

Weighting (paper): with A^_i the base advantage (GRPO by default), p^_g the mean reward of the prompt's group and
C_t^- the difficulty anchor before step t,

    diff_g = p^_g - C_t^-,   D_i = -sgn(A^_i) * sgn(diff_g),   M_g = min(|diff_g|, max_magnitude)
    Phi_i = lambda_scale * exp(D_i * M_g),   A_i = Phi_i * A^_i

so on prompts harder than the anchor correct responses are amplified and wrong ones shrunk, and the reverse on easy
prompts. The paper uses A_i in place of A^_i inside the PPO/GSPO/DAPO clip objective.

Anchor (state across steps; y_t = the batch accuracy, the mean reward of the valid rows of the batch):
- ``anchor="kalman"`` (paper default): the posterior of step t is the prior of step t+1,
  C_t^+ = (1 - eta_t) C_t^- + eta_t y_t, eta_t = min(1, eta * sigma_t), sigma_t = population std of the last
  ``m`` batch accuracies (the current one included). Best reading: the paper's eta and m values were not found
  (``eta=1``, ``m=10`` here), and "the std over the previous m batches" is read as the std of the observed batch
  accuracies: the std of the anchor's own past values would be 0 from a constant start and freeze it forever.
- ``anchor="hard"`` (paper App. F): C_t^+ = mean of the last ``h`` batch accuracies (the current one included);
  the weighting of step t uses C_t^- = C_{t-1}^+.
- ``anchor="official"``: the official code's simplified form: the anchor used at step t is the mean of the last
  ``window`` batch-mean rewards *including the current batch* (its ``trainer.reward_window_k``: 0 = current batch
  only, the code default; its example script uses 10, the default here). The code hard-codes lambda = 1.5 (set
  ``lambda_scale=1.5``) and has no Kalman update.
At the first step (no history) the prior is ``init_anchor`` when given, else the first batch's accuracy (then diff
is the group's accuracy minus the batch's).

Hyperparameters: lambda_scale (paper ablation best 1.3, default; official code 1.5), eta, m, h, window,
init_anchor, max_magnitude (a cap on M = |diff| so that exp stays finite for arbitrary reward scales; it never binds
for rewards in [0, 1] or {-1, +1}; the official code has no cap), base / base_params (the wrapped sequence-level
estimator, e.g. ``base="dr_grpo"``; the official code skips the weighting when ``norm_adv_by_std_in_grpo=False``,
here it is always applied).

State: ``anchor`` (the prior of the next step, None before the first batch), ``used_anchor`` (the C_t^- of the last
call), ``accuracies`` (the recent batch accuracies), ``eta_t``; :meth:`reset` clears it, :meth:`state` returns it,
:meth:`state_dict` / :meth:`load_state_dict` save and restore it (with the step and the base's state).
Steps: calling again with the same ``step`` as the previous call first rolls the state back to before that step, so
repeating a step is idempotent (the same batch gives the same advantages and state; a different batch replaces the
step's observation). Any other step (or ``step=None``, which counts calls) is a new observation. A batch with no
valid row leaves the state unchanged.

Inputs: rewards (the paper assumes accuracies in [0, 1]; with other scales M is not a probability difference),
group, mask, and whatever the base estimator needs.

Conventions: all-equal groups and singletons get exactly 0 whenever the base gives 0 (A^ = 0); fully masked rows get
0, do not count in y_t and do not change the state; ``singleton="raw"`` in the base keeps its raw value, weighted
with p^_g = the singleton's own reward (the official code uses mean 0 there). With diff = 0 every advantage is
multiplied by lambda_scale. The weights depend on the batch (the anchor), so HA-DW is not group-local.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.methods._common import require_choice, require_int, require_range
from canonrl.methods._wrapped import WrapsBase, check_base
from canonrl.registry import Paper, param, register

HADW_PAPER = Paper("Your Group-Relative Advantage Is Biased", "2601.08521")
ANCHORS = ("kalman", "hard", "official")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _pstd(values: list[float]) -> float:
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def _history(state: dict[str, Any], where: str) -> tuple:
    """(anchor, used_anchor, accuracies, eta_t) of a state dict, checked to be numbers (or None) and a list."""
    values = []
    for key in ("anchor", "used_anchor", "eta_t"):
        value = state[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"estimator 'hadw' {where}: {key} must be a number or None, got {value!r}")
        values.append(None if value is None else float(value))
    accuracies = state["accuracies"]
    if not isinstance(accuracies, (list, tuple)) or not all(
        isinstance(a, (int, float)) and not isinstance(a, bool) for a in accuracies
    ):
        raise ValueError(f"estimator 'hadw' {where}: accuracies must be a list of numbers, got {accuracies!r}")
    anchor, used_anchor, eta_t = values
    return anchor, used_anchor, [float(a) for a in accuracies], eta_t


@register
class HADW(WrapsBase):
    name = "hadw"
    description = "Base advantage x lambda exp(D |p_g - C|) vs an evolving difficulty anchor C (stateful; best reading)"
    paper = HADW_PAPER
    verified = False
    stateful = True
    simulator_alignment = "z"

    @dataclass
    class Params:
        anchor: str = param("kalman", "'kalman' (paper), 'hard' (mean of last h accuracies) or 'official' (code)")
        lambda_scale: float = param(1.3, "lambda_scale of Phi (paper ablation best 1.3; official code 1.5)")
        eta: float = param(1.0, "kalman: eta_t = min(1, eta * sigma_t) (unverified value)")
        m: int = param(10, "kalman: sigma_t is the std of the last m batch accuracies (unverified value)")
        h: int = param(10, "hard: the anchor is the mean of the last h batch accuracies")
        window: int = param(10, "official: mean of the last k batch rewards incl. the current (0 = current only)")
        init_anchor: float | None = param(None, "prior at the first step (None: the first batch's accuracy)")
        max_magnitude: float = param(2.0, "cap on M = |p_g - anchor| inside exp (keeps Phi finite)")
        base: str = param("grpo", "sequence-level estimator giving the base advantage (grpo, dr_grpo, rloo, ...)")
        base_params: dict | None = param(None, "hyperparameters of the base estimator, e.g. {'eps': 1e-4}")

        def __post_init__(self) -> None:
            require_choice("anchor", self.anchor, ANCHORS)
            require_range("lambda_scale", self.lambda_scale, 0.0, low_open=True)
            require_range("eta", self.eta, 0.0)
            for name, low in (("m", 1), ("h", 1), ("window", 0)):
                require_int(name, getattr(self, name), low)
            if self.init_anchor is not None and not math.isfinite(float(self.init_anchor)):
                raise ValueError(f"init_anchor must be a finite number or None, got {self.init_anchor!r}")
            require_range("max_magnitude", self.max_magnitude, 0.0, 80.0, low_open=True)
            check_base(self.base, "hadw")

    @property
    def batch_level_reason(self) -> str | None:
        # a fixed init_anchor on a fresh estimator weights the first batch by the prior alone (group-local then)
        if self.params.init_anchor is None or self.params.anchor == "official":
            return "the anchor follows the batch accuracy"
        return super().batch_level_reason

    def __init__(self, **hyperparameters: Any) -> None:
        super().__init__(**hyperparameters)
        self.reset()

    # --- state ---------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the history: the next batch is treated as the first."""
        self.anchor: float | None = None
        self.used_anchor: float | None = None
        self.accuracies: list[float] = []
        self.eta_t: float | None = None
        self._last_step: int | None = None
        self._before: tuple | None = None

    def state(self) -> dict[str, Any]:
        return {
            "anchor": self.anchor,
            "used_anchor": self.used_anchor,
            "accuracies": list(self.accuracies),
            "eta_t": self.eta_t,
            "step": self._last_step,
        }

    def state_dict(self) -> dict[str, Any]:
        """The step, the base's state and the anchor's history, including the snapshot that a repeat of the last
        step rolls back to (plain floats, lists and None)."""
        before = None
        if self._before is not None:
            anchor, used_anchor, accuracies, eta_t = self._before
            before = {"anchor": anchor, "used_anchor": used_anchor, "accuracies": list(accuracies), "eta_t": eta_t}
        return {
            **super().state_dict(),
            "anchor": self.anchor,
            "used_anchor": self.used_anchor,
            "accuracies": list(self.accuracies),
            "eta_t": self.eta_t,
            "last_step": self._last_step,
            "before": before,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state)
        history = _history(state, "state")
        last_step = state["last_step"]
        if last_step is not None and (isinstance(last_step, bool) or not isinstance(last_step, int)):
            raise ValueError(f"estimator 'hadw' state: last_step must be an int or None, got {last_step!r}")
        before = state["before"]
        if before is not None:
            if not isinstance(before, dict) or set(before) != {"anchor", "used_anchor", "accuracies", "eta_t"}:
                raise ValueError(
                    "estimator 'hadw' state: before must be None or a dict of anchor, used_anchor, accuracies and eta_t"
                )
            before = _history(before, "before")
        super().load_state_dict(state)
        self._restore(history)
        self._last_step = last_step
        self._before = before

    def _snapshot(self) -> tuple:
        return (self.anchor, self.used_anchor, list(self.accuracies), self.eta_t)

    def _restore(self, snapshot: tuple) -> None:
        self.anchor, self.used_anchor, accuracies, self.eta_t = snapshot
        self.accuracies = list(accuracies)

    def observe(self, accuracy: float, step: int) -> float:
        """Advance the anchor with the batch accuracy of ``step``; return the anchor the weighting of this step uses."""
        if step == self._last_step and self._before is not None:
            self._restore(self._before)
        self._before = self._snapshot()
        self._last_step = step
        p = self.params
        first = p.init_anchor if p.init_anchor is not None else accuracy
        if p.anchor == "kalman":
            prior = self.anchor if self.anchor is not None else float(first)
            self.accuracies = (self.accuracies + [accuracy])[-p.m :]
            self.eta_t = min(1.0, p.eta * _pstd(self.accuracies))
            self.anchor = (1.0 - self.eta_t) * prior + self.eta_t * accuracy
        elif p.anchor == "hard":
            prior = _mean(self.accuracies[-p.h :]) if self.accuracies else float(first)
            self.accuracies = (self.accuracies + [accuracy])[-p.h :]
            self.anchor = _mean(self.accuracies)
        else:
            self.accuracies = (self.accuracies + [accuracy])[-max(p.window, 1) :]
            prior = _mean(self.accuracies) if p.window > 0 else accuracy
            self.anchor = prior
        self.used_anchor = prior
        return prior

    # --- advantages ----------------------------------------------------------------------------------------
    def weights(self, batch: RolloutBatch, base: Tensor, anchor: float) -> Tensor:
        """[B] Phi = lambda exp(D M) for base advantages ``base`` against ``anchor``."""
        p = self.params
        grouping = batch.grouping
        diff = grouping.gather(grouping.mean(batch.rewards)) - anchor
        direction = -torch.sign(base) * torch.sign(diff)
        magnitude = diff.abs().clamp(max=p.max_magnitude)
        return p.lambda_scale * torch.exp(direction * magnitude)

    def sequence_advantages(self, batch: RolloutBatch) -> Tensor:
        base = self.base_advantages(batch)
        valid = batch.valid
        if not bool(valid.any()):
            return torch.zeros_like(batch.rewards)
        accuracy = float(batch.rewards[valid].mean(dtype=torch.float32).item())
        anchor = self.observe(accuracy, self.step)
        advantage = self.weights(batch, base, anchor) * base
        return advantage.where(valid, 0.0)
