"""Which prompts to roll out next: a uniform sampler and VADE's Beta-posterior Thompson sampler.

VADE ("Variance-Aware Dynamic sampling via online sample-level Difficulty Estimation", arXiv 2511.18902) keeps a
Beta(α, β) posterior over each prompt's probability of being answered correctly, updated from the correctness of
the responses it already gets (no extra rollouts), and picks prompts by Thompson sampling toward those whose group
advantage has the most variance (p ≈ 0.5). Reliability (spec section 24): the mechanism is from the paper's
abstract and secondary sources; the information-gain expression, the decay rates and the priors are unverified.
This module implements the documented form with every uncertain constant a parameter — a best reading.

Both samplers share one interface, so a trainer can switch by name with `make_prompt_sampler`:

    sampler = make_prompt_sampler("vade", num_prompts=len(dataset), seed=0)
    ids = sampler.sample(batch_size)                # [batch_size] long prompt ids, distinct
    ...                                             # roll out G responses per id, score them
    sampler.update(response_prompt_ids, correct)    # [B] prompt id of each response, [B] correctness in [0, 1]
    state = sampler.state_dict()                    # checkpoint; load_state_dict(state) resumes the same draws

Torch only, vectorized over prompts (no Python loop over prompts or responses); state lives on the CPU in float64.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from canonrl.batch import describe_rows

PROMPT_SAMPLERS = ("uniform", "vade")


def _check_count(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return value


class _SamplerBase:
    name = ""

    def __init__(self, num_prompts: int, seed: int) -> None:
        self.num_prompts = _check_count("num_prompts", num_prompts)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int; got {seed!r}")
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def _check_batch(self, batch_size: int) -> int:
        _check_count("batch_size", batch_size)
        if batch_size > self.num_prompts:
            raise ValueError(f"batch_size ({batch_size}) must be <= num_prompts ({self.num_prompts}): a batch "
                             "holds distinct prompts")
        return batch_size

    def _check_update(self, prompt_ids: Tensor, correct: Tensor) -> tuple[Tensor, Tensor]:
        if not isinstance(prompt_ids, Tensor) or not isinstance(correct, Tensor):
            raise TypeError("prompt_ids and correct must be torch.Tensors of shape [B]")
        if prompt_ids.dtype.is_floating_point or prompt_ids.dtype == torch.bool or prompt_ids.dim() != 1:
            raise ValueError(
                f"prompt_ids must be a 1-D integer tensor, got {prompt_ids.dtype} {list(prompt_ids.shape)}"
            )
        if correct.shape != prompt_ids.shape:
            raise ValueError(f"correct must have the shape of prompt_ids {list(prompt_ids.shape)}, "
                             f"got {list(correct.shape)}")
        ids = prompt_ids.detach().cpu().long()
        outside = (ids < 0) | (ids >= self.num_prompts)
        if outside.any():
            raise ValueError(
                f"prompt_ids must be in [0, {self.num_prompts}); out of range at rows {describe_rows(outside)}"
            )
        values = correct.detach().cpu().double()
        invalid = ~torch.isfinite(values) | (values < 0) | (values > 1)
        if invalid.any():
            raise ValueError(f"correct must be in [0, 1] (1 = correct); invalid at rows {describe_rows(invalid)}")
        return ids, values

    def _base_state(self) -> dict[str, Any]:
        return {"name": self.name, "num_prompts": self.num_prompts, "seed": self.seed,
                "generator": self.generator.get_state()}

    def _load_base(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state_dict is for sampler {state.get('name')!r}, not {self.name!r}")
        if state.get("num_prompts") != self.num_prompts:
            raise ValueError(
                f"state_dict has num_prompts {state.get('num_prompts')}, this sampler {self.num_prompts}"
            )
        self.seed = state["seed"]
        self.generator.set_state(state["generator"])


class UniformPromptSampler(_SamplerBase):
    """Epoch-wise shuffling, as a shuffled data loader: every prompt once per epoch, in a fresh random order.

    A batch holds distinct prompts; one that crosses an epoch boundary takes the rest of the old epoch and the start
    of a new permutation, skipping prompts already in the batch. `update` only validates its inputs.
    """

    name = "uniform"

    def __init__(self, num_prompts: int, seed: int = 0) -> None:
        super().__init__(num_prompts, seed)
        self._order = torch.randperm(self.num_prompts, generator=self.generator)
        self._cursor = 0
        self.epoch = 0

    def sample(self, batch_size: int) -> Tensor:
        """[batch_size] long: the next distinct prompt ids."""
        self._check_batch(batch_size)
        taken = self._order[self._cursor : self._cursor + batch_size]
        self._cursor += taken.numel()
        missing = batch_size - taken.numel()
        if missing == 0:
            return taken.clone()
        self._order = torch.randperm(self.num_prompts, generator=self.generator)
        self.epoch += 1
        fresh = ~torch.isin(self._order, taken)
        # the new epoch's first `missing` prompts that are not already in this batch
        position = fresh.long().cumsum(0)
        chosen = fresh & (position <= missing)
        self._order = torch.cat([self._order[chosen], self._order[~chosen]])
        self._cursor = missing
        return torch.cat([taken, self._order[:missing]])

    def update(self, prompt_ids: Tensor, correct: Tensor) -> None:
        """Nothing to learn; checks the inputs so that switching samplers cannot hide a bad call."""
        self._check_update(prompt_ids, correct)

    def state_dict(self) -> dict[str, Any]:
        return {**self._base_state(), "order": self._order.clone(), "cursor": self._cursor, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_base(state)
        self._order = state["order"].clone()
        self._cursor = int(state["cursor"])
        self.epoch = int(state["epoch"])


class VADEPromptSampler(_SamplerBase):
    """VADE's Beta-posterior difficulty sampler (best reading; constants unverified, all parameters).

    State: per-prompt posteriors Beta(α_i, β_i) over the probability that a response to prompt i is correct,
    starting at the prior Beta(`prior_alpha`, `prior_beta`).

    Update (`update(prompt_ids, correct)`, one call per training step with every response of the step):
      1. global decay (all prompts): ``α ← α0 + global_decay·(α − α0)``, same for β — stale evidence fades as the
         policy drifts, even for prompts not seen lately;
      2. per-sample decay (prompts observed this step, once each): ``α ← α0 + sample_decay·(α − α0)`` — old
         evidence about a prompt counts less than the fresh rollouts about it;
      3. evidence: ``α += Σ correct``, ``β += Σ (1 − correct)`` over that prompt's responses (fractional
         correctness allowed).
      A decay of 1 turns that scale off. The two-scale form follows the spec's "global and per-sample prior
      decay"; the exact rule and rates are unverified.

    Selection (`sample(batch_size)`): Thompson sampling — draw p̃_i ~ Beta(α_i, β_i) for every prompt, score
    ``p̃_i (1 − p̃_i)`` (the Bernoulli variance, proportional to the expected variance of a group's rewards, which
    peaks at p = 0.5 where GRPO's advantages carry the most signal), and return the `batch_size` prompts with the
    largest scores (distinct, ties by the lower id). This is the best reading of the unverified "information
    gain" objective. Unseen prompts (flat prior) are drawn anywhere in [0, 1] and so are explored; prompts with
    much evidence near 0 or 1 are rarely chosen. ``epsilon`` mixes in uniform exploration: each slot is, with that
    probability, scored by a uniform random number instead (default 0).
    """

    name = "vade"

    def __init__(
        self,
        num_prompts: int,
        seed: int = 0,
        *,
        prior_alpha: float = 1.0,
        prior_beta: float = 1.0,
        global_decay: float = 1.0,
        sample_decay: float = 1.0,
        epsilon: float = 0.0,
    ) -> None:
        super().__init__(num_prompts, seed)
        for name, value in (("prior_alpha", prior_alpha), ("prior_beta", prior_beta)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0; got {value!r}")
        for name, value in (("global_decay", global_decay), ("sample_decay", sample_decay)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1] (1 = no decay); got {value!r}")
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1]; got {epsilon!r}")
        self.prior_alpha = float(prior_alpha)
        self.prior_beta = float(prior_beta)
        self.global_decay = float(global_decay)
        self.sample_decay = float(sample_decay)
        self.epsilon = float(epsilon)
        self.alpha = torch.full((self.num_prompts,), self.prior_alpha, dtype=torch.float64)
        self.beta = torch.full((self.num_prompts,), self.prior_beta, dtype=torch.float64)
        self.updates = 0

    @property
    def mean(self) -> Tensor:
        """[N] posterior mean success probability α / (α + β)."""
        return self.alpha / (self.alpha + self.beta)

    def draw(self) -> Tensor:
        """[N] one Thompson draw p̃ ~ Beta(α, β) per prompt (advances the generator)."""
        concentration = torch.stack([self.alpha, self.beta], dim=1)
        return torch._sample_dirichlet(concentration, generator=self.generator)[:, 0]

    def sample(self, batch_size: int) -> Tensor:
        """[batch_size] long: distinct prompt ids with the largest Thompson scores p̃(1 − p̃)."""
        self._check_batch(batch_size)
        p = self.draw()
        score = p * (1 - p)
        if self.epsilon > 0:
            explore = torch.rand(self.num_prompts, generator=self.generator, dtype=torch.float64) < self.epsilon
            score = torch.where(explore, torch.rand(self.num_prompts, generator=self.generator,
                                                    dtype=torch.float64) * 0.25, score)
        # stable sort: ties (e.g. both draws exactly 0) keep the lower id
        return torch.sort(score, descending=True, stable=True).indices[:batch_size].clone()

    def update(self, prompt_ids: Tensor, correct: Tensor) -> None:
        """Fold one step's evidence in: `prompt_ids` [B] (the prompt of each response), `correct` [B] in [0, 1]."""
        ids, values = self._check_update(prompt_ids, correct)
        self.updates += 1
        a0, b0 = self.prior_alpha, self.prior_beta
        if self.global_decay < 1:
            self.alpha = a0 + self.global_decay * (self.alpha - a0)
            self.beta = b0 + self.global_decay * (self.beta - b0)
        if ids.numel() == 0:
            return
        seen = torch.zeros(self.num_prompts, dtype=torch.bool).index_fill_(0, ids, True)
        if self.sample_decay < 1:
            self.alpha = torch.where(seen, a0 + self.sample_decay * (self.alpha - a0), self.alpha)
            self.beta = torch.where(seen, b0 + self.sample_decay * (self.beta - b0), self.beta)
        self.alpha = self.alpha.index_add(0, ids, values)
        self.beta = self.beta.index_add(0, ids, 1 - values)

    def state_dict(self) -> dict[str, Any]:
        params = dict(prior_alpha=self.prior_alpha, prior_beta=self.prior_beta, global_decay=self.global_decay,
                      sample_decay=self.sample_decay, epsilon=self.epsilon)
        return {**self._base_state(), "params": params, "alpha": self.alpha.clone(), "beta": self.beta.clone(),
                "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_base(state)
        for key, value in state["params"].items():
            setattr(self, key, float(value))
        self.alpha = state["alpha"].clone().double().cpu()
        self.beta = state["beta"].clone().double().cpu()
        self.updates = int(state["updates"])


def make_prompt_sampler(name: str, num_prompts: int, seed: int = 0, **params: Any):
    """A prompt sampler by name (`PROMPT_SAMPLERS`): ``uniform`` (no params) or ``vade`` (`VADEPromptSampler`'s)."""
    if name == "uniform":
        if params:
            raise ValueError(f"the uniform prompt sampler takes no parameters; got {sorted(params)}")
        return UniformPromptSampler(num_prompts, seed)
    if name == "vade":
        allowed = {"prior_alpha", "prior_beta", "global_decay", "sample_decay", "epsilon"}
        unknown = set(params) - allowed
        if unknown:
            raise ValueError(f"unknown vade parameters {sorted(unknown)}; allowed: {sorted(allowed)}")
        return VADEPromptSampler(num_prompts, seed, **params)
    raise ValueError(f"prompt_sampler must be one of {', '.join(PROMPT_SAMPLERS)}; got {name!r}")
