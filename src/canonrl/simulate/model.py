"""A model of rollouts in which the truth is known.

Each prompt n has a success probability p_n drawn from a difficulty distribution; each of its G responses gets

- a reward r: Bernoulli(p) (``reward="bernoulli"``), or Beta with mean p and concentration kappa
  (``reward="beta:KAPPA"``, continuous in [0, 1], variance p (1 - p) / (kappa + 1));
- a length and a mean token entropy, each driven by a latent standard score

      z = rho * s + sqrt(1 - rho^2) * eps,     s = (r - p) / sigma(p),  eps ~ N(0, 1)

  so that within a prompt corr(z, r) = rho exactly (``length_corr``, ``entropy_corr``; negative: correct answers
  are shorter / less uncertain). length = round(mean_length * exp(length_spread * z)), clamped to
  [1, max_length]; entropy = mean_entropy * exp(entropy_spread * z), the same at every token of the response;
- the other inputs estimators may read, drawn so that their relation to the truth is explicit: ``logprobs`` per
  token = -entropy * U(0.5, 1.5); ``token_ids`` uniform over ``vocab``; ``ref_logprobs`` = logprobs + N(0, 0.1);
  ``greedy_rewards`` (ReMax) one extra reward draw per prompt, ``reference_rewards`` (AAPO) one per row, both at p;
  ``prompt_confidence`` (ProGRPO) U(0.3, 0.9) per prompt; ``metric`` (RLEV's value) U(0, 0.1) per prompt; reward
  components [B, 2] for multi-reward estimators (``correct`` = r, ``formatted`` = 1 when correct, else 1 with
  probability 0.8); ``indicators`` [B, 3] (effective rank ERA, ERV, ER) with no signal: U(-0.1, 0.1), U(0, 1) and
  U(2, 12) per row.

The true advantage of a response is r - p (its reward minus the prompt's expected reward); sigma(p) is the true
reward std of the prompt, sqrt(p (1 - p)) for Bernoulli rewards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

#: the difficulty buckets reports use (by true p)
DIFFICULTY_BUCKETS = (("hard", 0.0, 1 / 3), ("medium", 1 / 3, 2 / 3), ("easy", 2 / 3, 1.0 + 1e-9))


@dataclass(frozen=True)
class RolloutModel:
    """The parameters of the simulated rollouts (see the module docstring)."""

    difficulty: str = "uniform"  # 'uniform', 'beta:A,B', or 'fixed:P1,P2,...' (cycled over prompts)
    reward: str = "bernoulli"  # 'bernoulli' or 'beta:KAPPA'
    length_corr: float = -0.3
    entropy_corr: float = -0.3
    mean_length: int = 24
    length_spread: float = 0.4
    max_length: int = 96
    mean_entropy: float = 0.6
    entropy_spread: float = 0.3
    vocab: int = 32

    def validate(self) -> RolloutModel:
        self.difficulty_values()  # parses and checks
        self.reward_concentration()
        for name in ("length_corr", "entropy_corr"):
            value = getattr(self, name)
            if not -1.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a correlation in [-1, 1], got {value}")
        if not 1 <= self.mean_length <= self.max_length:
            raise ValueError(f"need 1 <= mean_length <= max_length, got {self.mean_length}, {self.max_length}")
        for name in ("length_spread", "entropy_spread", "mean_entropy"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.vocab < 2:
            raise ValueError(f"vocab must be >= 2, got {self.vocab}")
        return self

    def difficulty_values(self) -> tuple[str, tuple[float, ...]]:
        """('uniform', ()), ('beta', (a, b)) or ('fixed', (p, ...)); raises on a bad spec or a p outside [0, 1]."""
        kind, _, rest = self.difficulty.partition(":")
        if kind == "uniform" and not rest:
            return kind, ()
        try:
            values = tuple(float(v) for v in rest.split(",")) if rest else ()
        except ValueError:
            values = None
        if kind == "beta" and values is not None and len(values) == 2 and min(values) > 0:
            return kind, values
        if kind == "fixed" and values:
            bad = [v for v in values if not 0.0 <= v <= 1.0 or math.isnan(v)]
            if bad:
                raise ValueError(f"difficulty: success probabilities must lie in [0, 1], got {bad}")
            return kind, values
        raise ValueError(
            f"difficulty must be 'uniform', 'beta:A,B' (A, B > 0) or 'fixed:P1,P2,...' (each in [0, 1]), "
            f"got {self.difficulty!r}"
        )

    def reward_concentration(self) -> float | None:
        """None for Bernoulli rewards, kappa for 'beta:KAPPA'."""
        if self.reward == "bernoulli":
            return None
        kind, _, rest = self.reward.partition(":")
        try:
            kappa = float(rest)
        except ValueError:
            kappa = -1.0
        if kind != "beta" or not kappa > 0:
            raise ValueError(f"reward must be 'bernoulli' or 'beta:KAPPA' (KAPPA > 0), got {self.reward!r}")
        return kappa

    def reward_std(self, p: Tensor) -> Tensor:
        """The true reward std sigma(p) of a prompt with success probability p."""
        kappa = self.reward_concentration()
        variance = p * (1 - p) / (1.0 if kappa is None else kappa + 1.0)
        return variance.clamp_min(0).sqrt()

    def draw_p(self, prompts: int, generator: torch.Generator) -> Tensor:
        kind, values = self.difficulty_values()
        if kind == "uniform":
            return torch.rand(prompts, generator=generator, dtype=torch.float64)
        if kind == "beta":
            return _beta(torch.full((prompts,), values[0]), torch.full((prompts,), values[1]), generator)
        return torch.tensor(values, dtype=torch.float64).repeat(math.ceil(prompts / len(values)))[:prompts]

    def draw_rewards(self, p: Tensor, generator: torch.Generator) -> Tensor:
        kappa = self.reward_concentration()
        if kappa is None:
            return (torch.rand(p.shape, generator=generator, dtype=torch.float64) < p).double()
        inside = p.clamp(1e-6, 1 - 1e-6)  # p = 0 or 1: a degenerate Beta, i.e. the constant p
        draws = _beta(inside * kappa, (1 - inside) * kappa, generator)
        return torch.where((p <= 0) | (p >= 1), p, draws)


@dataclass
class SimulatedBatch:
    """One batch of simulated groups: G consecutive rows per prompt, plus the truth."""

    group_size: int
    p: Tensor  # [B] float64, the prompt's success probability, repeated over its rows
    rewards: Tensor  # [B] float32
    group: Tensor  # [B] int64
    mask: Tensor  # [B, T]
    true_advantage: Tensor  # [B] float64, r - p
    true_std: Tensor  # [B] float64, sigma(p)
    inputs: dict = field(default_factory=dict)  # the other estimator inputs (see the module docstring)

    @property
    def informative(self) -> Tensor:
        """[B] bool: rows of groups whose rewards are not all equal (the groups a group baseline learns from)."""
        rows = self.rewards.view(-1, self.group_size)
        spread = rows.amax(1) > rows.amin(1)
        return spread.repeat_interleave(self.group_size)


def simulate_batch(model: RolloutModel, prompts: int, group_size: int, generator: torch.Generator) -> SimulatedBatch:
    """`prompts` groups of `group_size` responses from `model` (validated), drawn from `generator`."""
    if group_size < 1:
        raise ValueError(f"group size must be >= 1, got {group_size}")
    if prompts < 1:
        raise ValueError(f"prompts must be >= 1, got {prompts}")
    model.validate()
    rows = prompts * group_size
    p_prompt = model.draw_p(prompts, generator)
    p = p_prompt.repeat_interleave(group_size)
    rewards = model.draw_rewards(p, generator)
    sigma = model.reward_std(p)
    standardized = torch.where(sigma > 0, (rewards - p) / sigma.clamp_min(1e-12), 0.0)

    def latent(rho: float) -> Tensor:
        noise = torch.randn(rows, generator=generator, dtype=torch.float64)
        return rho * standardized + math.sqrt(max(0.0, 1 - rho * rho)) * noise

    lengths = (model.mean_length * torch.exp(model.length_spread * latent(model.length_corr))).round()
    lengths = lengths.clamp(1, model.max_length).long()
    width = int(lengths.max())
    mask = (torch.arange(width)[None, :] < lengths[:, None]).float()
    entropy_row = model.mean_entropy * torch.exp(model.entropy_spread * latent(model.entropy_corr))
    entropy = entropy_row.float()[:, None] * mask
    logprobs = -entropy * (0.5 + torch.rand(rows, width, generator=generator))
    correct = rewards.float()
    formatted = torch.where(correct > 0.5, 1.0, (torch.rand(rows, generator=generator) < 0.8).float())

    def per_prompt(low: float, high: float) -> Tensor:
        return (low + (high - low) * torch.rand(prompts, generator=generator)).repeat_interleave(group_size)

    inputs = {
        "entropy": entropy,
        "logprobs": logprobs * mask,
        "token_ids": torch.randint(0, model.vocab, (rows, width), generator=generator) * mask.long(),
        "ref_logprobs": (logprobs + 0.1 * torch.randn(rows, width, generator=generator)) * mask,
        "token_scores": torch.rand(rows, width, generator=generator) * mask,  # an importance with no signal
        "greedy_rewards": model.draw_rewards(p_prompt, generator).float().repeat_interleave(group_size),
        "reference_rewards": model.draw_rewards(p, generator).float(),
        "prompt_confidence": per_prompt(0.3, 0.9),
        "metric": per_prompt(0.0, 0.1),
        "human_values": per_prompt(0.0, 0.1),
        "reward_components": torch.stack([correct, formatted], dim=1),
        # a token-level RM's scores: the true advantage r - p plus noise on every token (the last draw, so adding it
        # left every earlier draw of a seed unchanged)
        "token_rewards": ((correct - p.float())[:, None] + 0.5 * torch.randn(rows, width, generator=generator)) * mask,
        # a producer's per-response indicators (effective rank ERA, ERV, ER) with no signal (the last draw, after
        # token_rewards, for the same reason)
        "indicators": torch.tensor([-0.1, 0.0, 2.0])
        + torch.rand(rows, 3, generator=generator) * torch.tensor([0.2, 1.0, 10.0]),
    }
    return SimulatedBatch(
        group_size=group_size,
        p=p,
        rewards=rewards.float(),
        group=torch.arange(prompts).repeat_interleave(group_size),
        mask=mask,
        true_advantage=rewards - p,
        true_std=sigma,
        inputs=inputs,
    )


def _beta(a: Tensor, b: Tensor, generator: torch.Generator) -> Tensor:
    """Beta(a, b) draws, reproducible from `generator` (torch's Beta sampler takes none): numpy's, seeded by it."""
    import numpy as np

    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.from_numpy(np.random.default_rng(seed).beta(a.double().numpy(), b.double().numpy()))
