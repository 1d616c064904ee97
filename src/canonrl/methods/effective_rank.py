"""VERL effective-rank advantage shaping: a base advantage plus a clipped bonus from hidden-state indicators.

Paper: "Beyond the Exploration-Exploitation Trade-off: A Hidden State Approach for LLM Reasoning in RLVR" (arXiv
2509.23808). Official code ``hf618/VERL`` (commit 3de68f16): ``verl/trainer/reward_manager_versions.py``
(RewardManager.__call__), ``verl/trainer/ppo/ray_trainer.py`` (compute_advantage, fit), ``train.sh``.

Inputs per response i: I_i = (ERA_i, ERV_i, ER_i) [B, 3] (:func:`canonrl.producers.effective_rank.
effective_rank_indicators`: effective rank of the response's hidden states and its first/second differences over
token prefixes), and the base advantage A_i (GRPO by default). State: mid_k, an EMA of the *batch means* of I_k
over training steps (one scalar per indicator, global over prompts), initialised at 0.

    dev_ik = clamp((I_ik - mid_k) / (|mid_k| + 1e-8), -5, 5)
    g_i    = sigmoid(gain * dev_i0)                         (dev of ERA, the first indicator)
    w_i    = g_i * w_explore + (1 - g_i) * w_exploit
    aux_i  = scale * sum_k tanh(dev_ik) * w_ik
    A'_i   = A_i + min(relu(aux_i), |A_i| / kappa)          (added at the last response token: code)

Timing (code): the first call gets no bonus (A' = A) and only records its batch means. At every later call the
bonus uses the current mid, and then mid <- (1 - alpha) mid + alpha * (batch means of the *previous* call) (the code
updates from ``metrics_old``, the previous step's logged ``cal/overall/.../mean``). So the second call compares
against mid = 0 (every dev is +-5) and call t uses the EMA of the means of calls 1..t-2.

Defaults: train.sh / TRAINING_CONFIG.md (the paper's run): w_explore = (0, 0, 1), w_exploit = (0, 1, 0) in (ERA,
ERV, ER) order, gain 2.0, alpha 0.3, kappa 2.0, scale = aux_reward_global_weight 1.0 with aux_fix=True, diff_stride
40 (the producer's). The yaml defaults (gain 1.5, alpha 0.7, weights (1, .25, .0625) / (1, .01, .001), stride 20,
aux_fix False) belong to its entropy indicators, not to effective rank, and are not used.

Differences from the official code:
- train.sh passes ``--add_reward False --add_adv True``, and the RewardManager computes aux only when
  ``add_reward`` is True: as launched, aux is identically 0 and the run is plain GRPO. This estimator implements
  the documented intent (``add_adv``: aux shapes the advantage only, the base sees the task reward alone). The
  code's other working setting (yaml: add_reward and add_adv True) also adds aux to the reward GRPO normalises.
- aux_fix=False (a dynamic scale 1 - (EMA of the batch score + 1)/2) is not implemented: ``scale`` is fixed.
- the code adds aux in bfloat16 to the reward and recovers it as a bf16 difference (rounding); here float32.
- batch means are over the valid rows; the code's EMA for validation batches is a separate object (ignored here).
- ``bonus_at='all'`` (the bonus on every response token) is a sequence-level reading, not the code's.
- Repeating a step is a new observation (no rollback).

Edge cases: fully masked rows get 0 and do not count in the batch means; a batch with no valid row leaves the state
unchanged; indicators must be finite at valid rows. The batch field ``indicators`` [B, 3] carries I; no rollout gives
it (the producer needs the policy's hidden states): the lab computes it (a no-grad forward per step), verl and TRL do
not feed it yet.

Examples:
    >>> import torch, canonrl
    >>> est = canonrl.get_estimator("effective_rank")
    >>> fields = dict(rewards=torch.tensor([1.0, 0.0, 1.0, 0.0]), group=[0, 0, 1, 1], mask=torch.ones(4, 2))
    >>> first = est(indicators=torch.ones(4, 3), **fields)   # the first call: the base advantage, no bonus
    >>> second = est(indicators=torch.full((4, 3), 2.0), **fields)
    >>> bool((second >= first).all())
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.methods._common import require_choice, require_range
from canonrl.methods._wrapped import BASE_HELP, BASE_PARAMS_HELP, HasBase, check_base
from canonrl.registry import Estimator, Paper, param, register

VERL_PAPER = Paper(
    "Beyond the Exploration-Exploitation Trade-off: A Hidden State Approach for LLM Reasoning in RLVR", "2509.23808"
)
K = 3
CLIP = 5.0
EPS = 1e-8
BONUS_AT = ("last", "all")


def _weights(name: str, value: Any) -> tuple[float, ...]:
    values = tuple(float(v) for v in value)
    if len(values) != K or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be {K} finite numbers (ERA, ERV, ER), got {value!r}")
    return values


def aux_reward(
    indicators: Tensor, mids: Tensor, w_explore: Tensor, w_exploit: Tensor, *, gain: float, scale: float
) -> Tensor:
    """[B] aux_i = scale * sum_k tanh(dev_ik) w_ik (float64) against the EMA baselines ``mids`` [K]."""
    dev = ((indicators - mids) / (mids.abs() + EPS)).clamp(-CLIP, CLIP)
    tendency = torch.sigmoid(gain * dev[:, :1])
    weights = tendency * w_explore + (1.0 - tendency) * w_exploit
    return scale * (torch.tanh(dev) * weights).sum(-1)


def bonus(base: Tensor, aux: Tensor, kappa: float) -> Tensor:
    """[B] the bonus min(relu(aux), |A| / kappa) that is added to the base advantage A."""
    return torch.minimum(torch.relu(aux), base.abs() / kappa)


@register
class EffectiveRank(HasBase, Estimator):
    name = "effective_rank"
    description = "Base advantage + min(relu(aux), |A|/kappa), aux from hidden-state effective rank vs EMA (VERL)"
    paper = VERL_PAPER
    level = "token"
    requires = ("indicators",)
    verified = False
    stateful = True
    simulator_alignment = "z"
    works_in = "library (needs the [B, 3] effective-rank indicators of the hidden states), lab"
    inputs_note = "`indicators` [B, 3] (ERA, ERV, ER) (+ the base's)"
    producer = "canonrl.producers.effective_rank.effective_rank_indicators: SVDs of the response's hidden states"

    @dataclass
    class Params:
        base: str = param("grpo", BASE_HELP)
        base_params: dict | None = param(None, BASE_PARAMS_HELP)
        w_explore: tuple = param((0.0, 0.0, 1.0), "exploration weights of (ERA, ERV, ER) (train.sh)")
        w_exploit: tuple = param((0.0, 1.0, 0.0), "exploitation weights of (ERA, ERV, ER) (train.sh)")
        gain: float = param(2.0, "modulation gain g of sigmoid(g dev_ERA) (train.sh 2.0; yaml 1.5)")
        ema_alpha: float = param(0.3, "EMA rate of the indicator baselines (train.sh 0.3; yaml 0.7)")
        kappa: float = param(2.0, "the bonus is at most |A| / kappa (code 2.0)")
        scale: float = param(1.0, "aux_reward_global_weight with aux_fix=True (train.sh 1.0)")
        bonus_at: str = param("last", "'last' response token (code) or 'all' response tokens")

        def __post_init__(self) -> None:
            check_base(self.base, "effective_rank")
            self.w_explore = _weights("w_explore", self.w_explore)
            self.w_exploit = _weights("w_exploit", self.w_exploit)
            require_range("gain", self.gain, 0.0)
            require_range("ema_alpha", self.ema_alpha, 0.0, 1.0)
            require_range("kappa", self.kappa, 0.0, low_open=True)
            require_range("scale", self.scale, 0.0)
            require_choice("bonus_at", self.bonus_at, BONUS_AT)

    # Group-local as its base: within a call a row's bonus reads only its own indicators and the history (the EMA of
    # *earlier* batches' means); this batch's means enter the history only after it (HasBase.batch_level_reason).

    def __init__(self, **hyperparameters: Any) -> None:
        super().__init__(**hyperparameters)
        self.reset()

    def reset(self) -> None:
        """Forget the history: the next batch is treated as the first."""
        self.mids: list[float] = [0.0] * K
        self.previous_means: list[float] | None = None

    def state_dict(self) -> dict[str, Any]:
        """The step, the base's state, the EMA baselines and the previous batch's means (plain floats)."""
        previous = None if self.previous_means is None else list(self.previous_means)
        return {**super().state_dict(), "mids": list(self.mids), "previous_means": previous}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state)

        def numbers(key: str, value: Any) -> list[float]:
            if not isinstance(value, (list, tuple)) or len(value) != K or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
            ):
                raise ValueError(f"estimator 'effective_rank' state: {key} must be {K} finite numbers, got {value!r}")
            return [float(v) for v in value]

        mids = numbers("mids", state["mids"])
        previous = None if state["previous_means"] is None else numbers("previous_means", state["previous_means"])
        super().load_state_dict(state)
        self.mids, self.previous_means = mids, previous

    def compute(self, batch: RolloutBatch) -> Tensor:
        indicators = batch.indicators
        if indicators is None:
            raise ValueError("estimator 'effective_rank' needs 'indicators' [B, 3], which was not given")
        if indicators.shape != (batch.batch_size, K):
            raise ValueError(
                f"indicators must have shape [{batch.batch_size}, {K}] (ERA, ERV, ER), got {list(indicators.shape)}"
            )
        valid = batch.valid
        values = indicators.to(device=batch.device, dtype=torch.float64)
        if not bool(torch.isfinite(values[valid]).all()):
            raise ValueError("indicators must be finite at every valid row")
        for name in self.base.required_inputs():
            if getattr(batch, name) is None:
                raise ValueError(f"estimator 'effective_rank' (base {self.base.name!r}) needs {name!r}")
        self.base.step = self.step
        base = self.base.sequence_advantages(batch).double()
        p = self.params
        advantage = batch.broadcast(base).double()
        if not bool(valid.any()):
            return advantage.float()
        if self.previous_means is not None:
            mids = torch.tensor(self.mids, dtype=torch.float64, device=batch.device)
            w_explore = torch.tensor(p.w_explore, dtype=torch.float64, device=batch.device)
            w_exploit = torch.tensor(p.w_exploit, dtype=torch.float64, device=batch.device)
            aux = aux_reward(values, mids, w_explore, w_exploit, gain=p.gain, scale=p.scale)
            extra = torch.where(valid, bonus(base, aux, p.kappa), 0.0)
            if p.bonus_at == "all":
                advantage = advantage + batch.broadcast(extra).double()
            else:
                inside = batch.mask != 0
                positions = torch.arange(inside.shape[1], device=batch.device)
                last = torch.where(inside, positions, -1).amax(-1)
                at_last = (positions[None, :] == last[:, None]) & inside
                advantage = advantage + at_last * extra[:, None]
            a = p.ema_alpha
            self.mids = [(1 - a) * m + a * v for m, v in zip(self.mids, self.previous_means)]
        self.previous_means = [float(v) for v in values[valid].mean(0)]
        return advantage.float()
