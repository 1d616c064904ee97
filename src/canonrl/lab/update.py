"""The policy update: the configured policy loss over ``ppo_epochs`` x ``minibatches``, one optimizer step each.

A minibatch runs as micro-batches of similar lengths (rows sorted by response length, each micro-batch cut to its
own longest row) with gradients accumulated: the loss is that of the whole minibatch, since every micro-batch
divides by the minibatch's token and response counts, but no forward pays for the padding of the longest response
in the batch. The G responses of a prompt share one run of the prompt (`SharedPrompts`, Llama-architecture
models).

Rows whose advantage is 0 on every token (all-equal groups, under most estimators) add exactly nothing to the
loss's gradient, so unless the loss or a KL term needs every row they are not run at all; they still count in the
loss's denominators, and the gradients are zeroed rather than dropped so that AdamW steps exactly as if they had
been run. ``ppo_kl`` is then measured on the rows that ran.

A ``loss_mask`` [B, T] (D^3S), when given, replaces the response mask in the loss: aggregation, the token and
response counts, the metrics and the choice of rows to run. Rows with no token in it leave the loss entirely
(unlike zero-advantage rows, they count in no denominator). The forward still reads each row's real response.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from canonrl.lab.config import TrainConfig
from canonrl.lab.decoding import LlamaDecoder
from canonrl.lab.forward import SharedPrompts, sequence_logprobs
from canonrl.lab.sampling import Rollouts
from canonrl.lab.seeds import seed_of
from canonrl.training.losses import aggregate_loss, kl_penalty
from canonrl.training.policy_losses import PolicyLoss


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the last good checkpoint is left intact."""


@dataclass
class MicroBatch:
    """One micro-batch of a minibatch: its rows' rollouts and advantages, and what the update already has."""

    rollouts: Rollouts
    advantages: torch.Tensor  # [n, T]
    mask: torch.Tensor  # [n, T] the loss mask (the response mask unless D^3S is on)
    index: int  # within the step: seeds a random loss's generator
    logprobs: torch.Tensor | None = None  # from SharedPrompts; None: a full forward here
    ref_logprobs: torch.Tensor | None = None  # the KL reference's; None: a reference forward here (when KL is on)


@dataclass
class StepBatch:
    """What the update of one step trains on."""

    step: int
    rollouts: Rollouts
    advantages: torch.Tensor  # [B, T]
    ref_logprobs: torch.Tensor | None = None  # [B, T] the step's reference log-probs, when it has them (ACE)
    loss_mask: torch.Tensor | None = None  # [B, T] D^3S's loss mask; None: the response mask


@dataclass
class Totals:
    """The minibatch's denominators, which every micro-batch divides by."""

    tokens: torch.Tensor
    responses: torch.Tensor


@dataclass
class LossSums:
    """What the micro-batches of one minibatch add up: the loss, and token counts of the indicators."""

    loss: float = 0.0
    kl: float = 0.0
    clipped: float = 0.0
    dual_clipped: float = 0.0
    ppo_kl: float = 0.0
    extras: dict[str, float] = field(default_factory=dict)


@dataclass
class UpdateStats:
    """Sums over the step's optimizer steps; `metrics` gives their means."""

    extra_names: tuple[str, ...]
    loss: float = 0.0
    pg_clipfrac: float = 0.0
    pg_clipfrac_lower: float = 0.0
    ppo_kl: float = 0.0
    kl: float = 0.0
    grad_norm: float = 0.0
    extras: dict[str, float] = field(default_factory=dict)
    updates: int = 0

    def add(self, sums: LossSums, tokens: float, ppo_kl_tokens: float, grad_norm: float) -> None:
        """One optimizer step: its micro-batches' `sums`, the minibatch's loss tokens, and the tokens that ran."""
        self.loss += sums.loss
        self.kl += sums.kl
        self.pg_clipfrac += sums.clipped / tokens
        self.pg_clipfrac_lower += sums.dual_clipped / tokens
        for name in self.extra_names:
            self.extras[name] = self.extras.get(name, 0.0) + sums.extras.get(name, 0.0) / tokens
        self.ppo_kl += sums.ppo_kl / max(1.0, ppo_kl_tokens)
        self.grad_norm += grad_norm
        self.updates += 1

    def metrics(self, with_kl: bool) -> dict[str, float]:
        n = self.updates
        out = {"loss": self.loss / n, "pg_clipfrac": self.pg_clipfrac / n, "pg_clipfrac_lower": self.pg_clipfrac_lower / n,
               "ppo_kl": self.ppo_kl / n}  # fmt: skip
        if with_kl:
            out["kl"] = self.kl / n
        out["grad_norm"] = self.grad_norm / n
        out.update({name: self.extras.get(name, 0.0) / n for name in self.extra_names})
        return out


class PolicyUpdate:
    """The update of one step (see the module docstring); `reference` is the frozen KL reference, if any."""

    def __init__(self, config: TrainConfig, policy, optimizer: torch.optim.Optimizer, loss: PolicyLoss, reference=None):
        self.config, self.policy, self.optimizer, self.loss, self.reference = config, policy, optimizer, loss, reference
        # Zero gradients from the start, not None: AdamW skips a parameter whose grad is None, so a step that trains no
        # row (all advantages 0) would move the weights (momentum) in a run that had trained before and not in one
        # just resumed from a checkpoint, whose gradients are still None — and resume would not be bit-exact.
        for parameter in policy.model.parameters():
            if parameter.requires_grad and parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        self.clip = config.clip_range()
        self.scale = config.loss_scale_factor or config.max_new_tokens

    @property
    def kl(self) -> bool:
        return self.config.kl_coef > 0

    def lr_at(self, step: int) -> float:
        warmup = self.config.warmup_steps
        return self.config.lr * (min(1.0, step / warmup) if warmup else 1.0)

    def __call__(
        self, step: int, rollouts: Rollouts, advantages: torch.Tensor, ref_logprobs: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """Run the step's optimizer steps; returns the metrics (means over them, plus `lr` and `trained_rows`).

        `ref_logprobs` [B, T], when given (the step's ACE input), serve the KL penalty in place of a reference
        forward per micro-batch."""
        config = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        rows = rollouts.response_ids.shape[0]
        generator = torch.Generator().manual_seed(seed_of(config.seed, "minibatches", step))
        # [B] bookkeeping on the CPU, whatever the device: row choices and token counts
        response_lengths = rollouts.lengths.cpu()  # micro-batches group rows of similar length (what the forward pays)
        lengths = response_lengths if loss_mask is None else loss_mask.sum(dim=1).cpu()
        trains = self.rows_to_train(rollouts, advantages, loss_mask).cpu()
        stats = UpdateStats(self.loss.metrics)
        batch = StepBatch(step, rollouts, advantages, ref_logprobs, loss_mask)
        micro = 0
        for _ in range(config.ppo_epochs):
            order = torch.randperm(rows, generator=generator) if config.minibatches > 1 else torch.arange(rows)
            for part in order.chunk(config.minibatches):
                totals = Totals(lengths[part].sum().clamp(min=1), (lengths[part] > 0).float().sum().clamp(min=1))
                part = part[trains[part]]
                part = part[response_lengths[part].argsort(stable=True)]
                sums, micro = self.minibatch(batch, part, totals, micro)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.model.parameters(), config.grad_clip)
                if not torch.isfinite(grad_norm):
                    raise TrainingError(f"non-finite gradient norm at step {step}")
                self.optimizer.step()
                stats.add(sums, float(totals.tokens), float(lengths[part].sum()), grad_norm.item())
        metrics = stats.metrics(with_kl=self.kl)
        metrics["lr"] = self.lr_at(step)
        metrics["trained_rows"] = float(trains.float().mean())
        return metrics

    def minibatch(self, batch: StepBatch, part: torch.Tensor, totals: Totals, micro: int) -> tuple[LossSums, int]:
        """Zero the gradients, then forward and backward the minibatch's rows `part` in micro-batches (the first
        with index `micro`); returns their sums and the next micro-batch index."""
        rollouts, loss_mask, ref_logprobs = batch.rollouts, batch.loss_mask, batch.ref_logprobs
        self.optimizer.zero_grad(set_to_none=False)
        sums = LossSums()
        shared = None
        if part.numel() and rollouts.repeats > 1 and LlamaDecoder.supports(self.policy.model):
            shared = SharedPrompts(self.policy.model, rollouts, part, self.config.temperature)
        for chunk in part.split(self.config.micro_batch_size) if part.numel() else ():
            mini = rollouts.select(chunk)
            width = mini.response_mask.shape[1]
            micro_batch = MicroBatch(
                mini, batch.advantages[chunk, :width],
                mini.response_mask if loss_mask is None else loss_mask[chunk, :width], micro,
                logprobs=shared.logprobs(chunk, mini) if shared else None,
                ref_logprobs=ref_logprobs[chunk, :width] if self.kl and ref_logprobs is not None else None,
            )  # fmt: skip
            self.accumulate(batch.step, micro_batch, totals, sums)
            micro += 1
        if shared is not None:
            shared.backward()
        return sums, micro

    def rows_to_train(self, rollouts: Rollouts, advantages: torch.Tensor, loss_mask: torch.Tensor | None = None):
        """[B] bool: rows whose gradient can be non-zero — a non-zero advantage somewhere, or every row when a KL
        term or the loss needs them all (`PolicyLoss.needs_every_row`); with a `loss_mask`, only rows with a token
        in it."""
        mask = rollouts.response_mask if loss_mask is None else loss_mask
        if self.kl or self.loss.needs_every_row:
            if loss_mask is None:
                return torch.ones(rollouts.response_ids.shape[0], dtype=torch.bool)
            return (loss_mask != 0).any(dim=1)
        return (advantages * mask != 0).any(dim=1)

    def accumulate(self, step: int, micro: MicroBatch, totals: Totals, sums: LossSums) -> None:
        """Forward (unless the shared prompts gave the log-probs) and backward one micro-batch, whose loss is its
        share of the minibatch's loss; its loss and indicator counts are added to `sums`."""
        config, mask, mini = self.config, micro.mask, micro.rollouts
        logprobs = micro.logprobs
        if logprobs is None:
            logprobs, _ = sequence_logprobs(self.policy.model, mini, config.temperature)
        generator = None
        if self.loss.random:
            generator = torch.Generator().manual_seed(seed_of(config.seed, self.loss.name, step, micro.index))
        token_loss, indicators = self.loss(
            logprobs, mini.logprobs, micro.advantages, mask, clip=self.clip, generator=generator
        )

        def aggregate(values: torch.Tensor) -> torch.Tensor:
            return aggregate_loss(values, mask, config.loss_agg, self.scale, totals.tokens, totals.responses)

        loss = aggregate(token_loss)
        if self.kl:
            ref_logprobs = micro.ref_logprobs
            if ref_logprobs is None:
                with torch.no_grad():
                    ref_logprobs, _ = sequence_logprobs(self.reference, mini, config.temperature)
            kl = aggregate(kl_penalty(logprobs, ref_logprobs, config.kl_estimator))
            loss = loss + config.kl_coef * kl
            sums.kl += kl.item()
        if not torch.isfinite(loss):
            raise TrainingError(f"non-finite loss ({loss.item()}) at step {step}")
        loss.backward()
        with torch.no_grad():
            sums.loss += loss.item()
            if "clipped" in indicators:
                sums.clipped += (indicators["clipped"] * mask).sum().item()
            for name in self.loss.metrics:
                sums.extras[name] = sums.extras.get(name, 0.0) + (indicators[name] * mask).sum().item()
            if "dual_clipped" in indicators:
                sums.dual_clipped += (indicators["dual_clipped"] * mask).sum().item()
            sums.ppo_kl += ((mini.logprobs - logprobs) * mask).sum().item()
