"""Each estimator against the truth on simulated groups: bias, variance, sign errors, zeros, difficulty weight.

An estimator's advantage A_hat of a response (the masked mean over its tokens for token-level estimators) is
compared with a target built from the true advantage r - p, after the scale alignment the estimator implies:

- ``centred``: target r - p. Estimators that subtract a baseline and keep the reward's scale (Dr.GRPO, RLOO,
  CANON, OPO, ReMax).
- ``z``: target (r - p) / sigma(p), the true advantage over the prompt's true reward std. Estimators that divide by
  the group's reward std (GRPO and the estimators built on it). Prompts with sigma(p) = 0 have target 0.
- ``fit``: target r - p, with A_hat multiplied by the least-squares scale c = <A_hat, r - p> / <A_hat, A_hat> over
  all simulated responses of that group size: the best any constant rescaling can do. Estimators whose scale is a
  batch statistic or a design choice (batch whitening, GPG's alpha, RLEV's value scale, W-REINFORCE, MAPO's mix);
  also the default for an estimator that declares nothing.

Each estimator declares its alignment (``Estimator.simulator_alignment``, in its module); a run may override it per
estimator (``align.<estimator>=...``). ``fitted_scale`` is reported for every estimator, so a wrong declaration
shows (a ``centred`` or ``z`` estimator should fit a scale near 1 at large G).

Measures, over all simulated responses unless said otherwise (err = aligned A_hat - target):

- bias = mean(err), variance = var(err), rmse = sqrt(mean(err^2));
- bias by true p (ten equal-width bins), over all groups and over *informative* groups only (rewards not all
  equal: the groups a group baseline learns from; "Your Group-Relative Advantage Is Biased" conditions on them);
- sign_error = fraction of responses with A_hat * target < 0 (among those whose target is not 0);
- zero_fraction = fraction of responses whose A_hat is exactly 0;
- weight by difficulty = each bucket's share of sum |A_hat| (hard p < 1/3, medium, easy p > 2/3), next to the
  truth's share of sum |r - p|.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from canonrl.fields import BASE, Consumer
from canonrl.registry import SIMULATOR_ALIGNMENTS as ALIGNMENTS
from canonrl.registry import estimator_class
from canonrl.simulate.model import DIFFICULTY_BUCKETS, SimulatedBatch

P_BINS = 10
#: the inputs the simulator gives an estimator when it asks for them
SIMULATOR = Consumer(
    "the simulator",
    {
        "entropy": "per-token entropies whose response mean correlates with the reward (model.entropy_corr)",
        "logprobs": "per-token log-probs", "token_ids": "random token ids", "ref_logprobs": "log-probs plus noise",
        "greedy_rewards": "a draw at the prompt's success probability", "reference_rewards": "a draw at p",
        "prompt_confidence": "a per-prompt draw in [0.3, 0.9]", "metric": "a per-prompt draw in [0, 0.1]",
        "human_values": "a per-prompt draw in [0, 0.1]", "token_scores": "uniform per-token draws in [0, 1)",
        "token_rewards": "r - p plus Gaussian noise (std 0.5) on every token (a token-level reward model's scores)",
        "indicators": "uniform per-response draws of (ERA, ERV, ER) in [-0.1, 0.1), [0, 1), [2, 12) (no signal)",
    },
    missing="it measures outcome-level estimators on simulated rollouts that lack this input",
)  # fmt: skip


@dataclass
class Measures:
    estimator: str
    group_size: int
    alignment: str
    fitted_scale: float
    bias: float
    variance: float
    rmse: float
    sign_error: float
    zero_fraction: float
    bias_by_p: list[float]  # P_BINS bins of true p; NaN where a bin is empty
    informative_bias_by_p: list[float]
    weight_by_difficulty: dict[str, float]
    true_weight_by_difficulty: dict[str, float]

    def as_dict(self) -> dict:
        return asdict(self)


def alignment_of(name: str, overrides: dict[str, str] | None = None) -> str:
    """The alignment ``name`` is measured after: the run's override, else the estimator's declared one."""
    overrides = overrides or {}
    alignment = overrides[name] if name in overrides else estimator_class(name).simulator_alignment
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment for {name!r} must be one of {', '.join(ALIGNMENTS)}, got {alignment!r}")
    return alignment


def estimator_advantages(estimator, batch: SimulatedBatch, step: int = 1) -> Tensor:
    """[B] float64: the estimator's advantage of each simulated response (token-level: the mean over its tokens)."""
    SIMULATOR.check(estimator)
    needed = [name for name in estimator.required_inputs() if name not in BASE]
    rewards = batch.inputs["reward_components"] if type(estimator).multi_reward else batch.rewards
    fields = {name: batch.inputs[name] for name in needed}
    advantages = estimator(rewards=rewards, group=batch.group, mask=batch.mask, step=step, **fields)
    if advantages.dim() == 2:
        advantages = (advantages * batch.mask).sum(-1) / batch.mask.sum(-1).clamp_min(1)
    return advantages.double()


def measure(name: str, advantages: Tensor, batch: SimulatedBatch, alignment: str) -> Measures:
    """The measures of one estimator's advantages [B] on `batch` (see the module docstring)."""
    truth = batch.true_advantage
    z_target = torch.where(batch.true_std > 0, truth / batch.true_std.clamp_min(1e-12), 0.0)
    denominator = float((advantages * advantages).sum())
    fitted_scale = float((advantages * (z_target if alignment == "z" else truth)).sum()) / denominator if denominator else 0.0
    if alignment == "z":
        aligned, target = advantages, z_target
    elif alignment == "fit":
        aligned, target = advantages * fitted_scale, truth
    else:
        aligned, target = advantages, truth
    err = aligned - target
    p = batch.p
    bins = (p * P_BINS).long().clamp(0, P_BINS - 1)
    informative = batch.informative
    signed = target != 0

    def weights(values: Tensor) -> dict[str, float]:
        total = float(values.abs().sum()) or 1.0
        return {
            label: float(values[(p >= low) & (p < high)].abs().sum()) / total for label, low, high in DIFFICULTY_BUCKETS
        }

    return Measures(
        estimator=name,
        group_size=batch.group_size,
        alignment=alignment,
        fitted_scale=fitted_scale,
        bias=float(err.mean()),
        variance=float(err.var(unbiased=False)),
        rmse=float(err.pow(2).mean().sqrt()),
        sign_error=float((aligned * target < 0)[signed].double().mean()) if signed.any() else 0.0,
        zero_fraction=float((advantages == 0).double().mean()),
        bias_by_p=_binned_mean(err, bins),
        informative_bias_by_p=_binned_mean(err[informative], bins[informative]),
        weight_by_difficulty=weights(advantages),
        true_weight_by_difficulty=weights(truth),
    )


def _binned_mean(values: Tensor, bins: Tensor) -> list[float]:
    sums = torch.zeros(P_BINS, dtype=torch.float64).index_add_(0, bins, values)
    counts = torch.zeros(P_BINS, dtype=torch.float64).index_add_(0, bins, torch.ones_like(values))
    return (sums / counts).tolist()  # an empty bin is 0 / 0 = NaN: "no data", shown as a gap
