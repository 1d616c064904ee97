"""The lab trainer: on-policy RLVR with any registered estimator, PPO-clip updates, checkpoints and evaluation.

One step: draw `prompts_per_step` training problems, sample `group_size` responses each (recording the sampling
policy's log-probs and entropies), verify them, compute advantages with the configured estimator (which sees the
step, and through the rewards the batch accuracy, for its schedules), then update with PPO-clip over
`ppo_epochs` x `minibatches`. The sampling log-probs serve as the old log-probs, so an on-policy single-epoch
update needs no second forward pass.

Options (all off by default, leaving that step exactly as described): `policy_loss` swaps PPO-clip for Clip-Cov
or KL-Cov (`canonrl.losses.policy_loss`, computed per micro-batch); `prompt_sampler` picks the step's problems
from a fixed pool with a uniform or VADE sampler (`canonrl.prompt_sampling`), updated after each step with the
rows' correctness; `d3s` down-samples rows and tokens after the advantages (`canonrl.selection.d3s_keep`) and the
update trains on that loss mask (`Trainer.loss_mask`).

Estimator inputs beyond the rollouts' own (entropy, log-probs, token ids) are computed only when the estimator's
`required_inputs()` names them (and the reward components only for a `multi_reward` estimator), after sampling and
before the update: see `Trainer.extra_inputs`. Their cost is logged in the step's metrics.

Determinism: every random draw of step s comes from generators seeded by (seed, s), never from global RNG state,
so a run resumed from its checkpoint at step s repeats the uninterrupted run exactly on CPU — the same metrics,
bit for bit, apart from wall-clock fields (`time`, `step_seconds`, `*_per_second`).

A run directory holds config.yaml, metrics.jsonl, tensorboard/, checkpoints/step-NNNNNN/ (a Hugging Face model
directory plus optimizer and trainer state), policy/ (the final model) and summary.json.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from canonrl.lab.config import TrainConfig, load_config, save_config
from canonrl.losses import aggregate_loss, kl_penalty, policy_loss

WALL_CLOCK_KEYS = (
    "time", "step_seconds", "rollout_tokens_per_second", "greedy_seconds", "reference_seconds", "ref_logprobs_seconds",
)  # fmt: skip
#: batch inputs the lab can give an estimator beyond rewards, group and mask
ROLLOUT_INPUTS = ("entropy", "logprobs", "token_ids")
EXTRA_INPUTS = ("greedy_rewards", "reference_rewards", "ref_logprobs", "prompt_confidence", "metric")
SUPPORTED_INPUTS = ROLLOUT_INPUTS + EXTRA_INPUTS
CHECKPOINT_PREFIX = "step-"


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the last good checkpoint is left intact."""


def _seed(*parts: object) -> int:
    import hashlib

    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 62) - 1)


@dataclass
class StepResult:
    metrics: dict
    rollouts: object
    advantages: torch.Tensor
    #: the extra batch inputs the estimator got (`Trainer.extra_inputs`), and `rewards` when given as [B, K]
    inputs: dict = field(default_factory=dict)
    #: [B, T] the loss mask the update used when D^3S is on (`Trainer.loss_mask`); None: the response mask
    loss_mask: torch.Tensor | None = None
    #: [prompts_per_step] the pool indices of the step's problems (a pool `prompt_sampler`); None: fresh problems
    prompt_ids: torch.Tensor | None = None


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class Trainer:
    """Holds the policy, optimizer, estimator and run directory; `train()` runs to `config.steps`."""

    def __init__(self, config: TrainConfig, run_dir: Path, *, resume: bool = False):
        from canonrl.lab.policy import load_policy
        from canonrl.lab.task import reward_components
        from canonrl.lab.tasks import get_task

        self.config = config.validate()
        self.run_dir = Path(run_dir)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.task = get_task(config.task, **config.task_options)
        self.estimator = config.build_estimator()
        self.inputs = tuple(self.estimator.required_inputs())
        unsupported = [name for name in self.inputs if name not in SUPPORTED_INPUTS]
        if unsupported:
            raise ValueError(
                f"estimator {config.estimator!r} needs {', '.join(unsupported)}, which the lab trainer does not "
                f"provide (it provides {', '.join(SUPPORTED_INPUTS)})"
            )
        if "metric" in self.inputs and not callable(getattr(self.task, "value", None)):
            raise ValueError(
                f"estimator {config.estimator!r} needs metric, a per-prompt value, which task {config.task!r} does "
                f"not give (a task gives it with a `value(problem)` method; the built-in 'lab' task does)"
            )
        #: the verdict components a multi-reward estimator gets as rewards [B, K]; None: the score, [B]
        self.reward_names = reward_components(self.task) if type(self.estimator).multi_reward else None
        self.step = 0
        self.tokens = 0
        checkpoint = self.latest_checkpoint() if resume else None
        if resume and checkpoint is None:
            raise ValueError(f"nothing to resume: {self.run_dir} has no checkpoint")
        self.policy = load_policy(str(checkpoint) if checkpoint else config.policy)
        self.policy.model.train()
        # The frozen reference policy (the initial weights, so a resumed run rebuilds it): for the KL penalty, AAPO's
        # reference rollouts and ACE's reference log-probs. Loaded only when one of them needs it.
        self.reference = None
        if config.kl_coef > 0 or "reference_rewards" in self.inputs or "ref_logprobs" in self.inputs:
            self.reference = load_policy(config.policy).model.eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(
            self.policy.model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        # A pool prompt sampler picks indices into a fixed pool of training problems drawn once from the task;
        # "fresh" (None) draws new problems every step.
        self.prompt_sampler = config.build_prompt_sampler(_seed(config.seed, "prompt_sampler"))
        self.prompt_pool = None
        if self.prompt_sampler is not None:
            self.prompt_pool = self.task.problems("train", config.prompt_pool, seed=_seed(config.seed, "prompt_pool"))
            if len(self.prompt_pool) != config.prompt_pool:
                raise ValueError(
                    f"task {config.task!r} gave {len(self.prompt_pool)} problems for prompt_pool={config.prompt_pool}"
                )
        if checkpoint is not None:
            self._restore(checkpoint)
            self.inputs = tuple(self.estimator.required_inputs())

    # ---------------------------------------------------------------- checkpoints
    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        pointer = self.checkpoint_root / "latest"
        if not pointer.is_file():
            return None
        path = self.checkpoint_root / pointer.read_text().strip()
        return path if (path / "trainer_state.pt").is_file() else None

    def save_checkpoint(self) -> Path:
        """Write step-NNNNNN/ through a temporary directory, then move the `latest` pointer: never half-written."""
        from canonrl.lab.policy import save_policy_dir

        name = f"{CHECKPOINT_PREFIX}{self.step:06d}"
        metrics_bytes = (self.run_dir / "metrics.jsonl").stat().st_size

        def trainer_files(directory: Path) -> None:
            torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
            state = {"step": self.step, "tokens": self.tokens, "estimator": self.estimator, "metrics_bytes": metrics_bytes}
            if self.prompt_sampler is not None:
                state["prompt_sampler"] = self.prompt_sampler.state_dict()
            torch.save(state, directory / "trainer_state.pt")

        final = save_policy_dir(self.policy.model, self.policy.tokenizer, self.checkpoint_root / name, trainer_files)
        _atomic_write_text(self.checkpoint_root / "latest", name + "\n")
        kept = sorted(p for p in self.checkpoint_root.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())
        for old in kept[: -self.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _restore(self, checkpoint: Path) -> None:
        self.optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
        state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
        self.step, self.tokens, self.estimator = state["step"], state["tokens"], state["estimator"]
        if self.prompt_sampler is not None:
            if state.get("prompt_sampler") is None:
                raise ValueError(f"{checkpoint} holds no prompt_sampler state; it was written by a 'fresh' run")
            self.prompt_sampler.load_state_dict(state["prompt_sampler"])
        # drop whatever the killed run logged after this checkpoint, so the log continues exactly
        with open(self.run_dir / "metrics.jsonl", "r+b") as handle:
            handle.truncate(state["metrics_bytes"])

    # ---------------------------------------------------------------- one step
    def lr_at(self, step: int) -> float:
        warmup = self.config.warmup_steps
        return self.config.lr * (min(1.0, step / warmup) if warmup else 1.0)

    @property
    def kl(self) -> bool:
        return self.config.kl_coef > 0

    def problems(self, step: int):
        """The step's training problems (`draw_problems`; with a pool sampler this advances the sampler)."""
        return self.draw_problems(step)[0]

    def draw_problems(self, step: int) -> tuple[list, torch.Tensor | None]:
        """(problems, pool indices): `prompt_sampler` "fresh" draws `prompts_per_step` new problems from the task
        with a generator seeded by (seed, step), indices None; "uniform" / "vade" pick indices into the pool."""
        config = self.config
        if self.prompt_sampler is None:
            return self.task.problems("train", config.prompts_per_step, seed=_seed(config.seed, "problems", step)), None
        ids = self.prompt_sampler.sample(config.prompts_per_step)
        return [self.prompt_pool[i] for i in ids.tolist()], ids

    def rollout(self, step: int, problems=None):
        """Sample `group_size` responses to each of the step's problems (drawn here unless given) and verify them.

        With an estimator that reads `prompt_confidence`, the rollouts carry it (read off the sampler's prefill).
        """
        from canonrl.lab.evaluate import score_rollouts
        from canonrl.lab.sampling import generate

        config = self.config
        problems = self.problems(step) if problems is None else problems
        prompt_ids, prompt_mask = self.policy.encode_prompts([p.prompt for p in problems])
        generator = torch.Generator().manual_seed(_seed(config.seed, "rollout", step))
        confidence = {"prompt_confidence": True} if "prompt_confidence" in self.inputs else {}
        self.policy.model.eval()
        rollouts = generate(
            self.policy.model, prompt_ids, prompt_mask,
            max_new_tokens=config.max_new_tokens, eos_id=self.policy.eos_id, pad_id=self.policy.pad_id,
            temperature=config.temperature, top_p=config.top_p, generator=generator, repeats=config.group_size,
            **confidence,
        )  # fmt: skip
        self.policy.model.train()
        repeated = [p for p in problems for _ in range(config.group_size)]
        _, verdict = score_rollouts(self.policy, self.task, rollouts, repeated, timeout=config.verify_timeout)
        return rollouts, verdict

    def extra_inputs(self, step: int, problems, rollouts) -> tuple[dict, dict]:
        """The batch inputs beyond the rollouts' own that the estimator reads: (fields, cost metrics).

        Each is computed only when `estimator.required_inputs()` names it, under the policy as it sampled (before
        this step's update):

        - ``greedy_rewards`` [B] (ReMax): one greedy response per prompt from the current policy, verified, and
          its reward repeated to the prompt's G rows. Costs one decode of `prompts_per_step` rows.
        - ``reference_rewards`` [B] (AAPO): one response per rollout row sampled by the frozen reference (initial)
          policy at the sampling temperature and top-p, from a generator seeded by (seed, "reference", step),
          verified. Costs a second rollout of B rows.
        - ``ref_logprobs`` [B, T] (ACE): the sampled responses' log-probs under the reference policy at the
          sampling temperature (`reference_logprobs`, the KL penalty's forward). Costs one forward, no backward.
        - ``prompt_confidence`` [B] (ProGRPO): already on the rollouts (the sampler's prefill); free.
        - ``metric`` [B] (RLEV): each prompt's value v from the task (`canonrl.lab.task.prompt_values`), repeated to
          its G rows; free.
        """
        from canonrl.lab.evaluate import score_rollouts
        from canonrl.lab.sampling import generate, reference_logprobs
        from canonrl.lab.task import prompt_values

        config = self.config
        fields: dict = {}
        metrics: dict = {"verify_failures": 0, "verify_timeouts": 0}
        groups = rollouts.repeats
        prompt_ids, prompt_mask = rollouts.prompt_ids[::groups], rollouts.prompt_mask[::groups]
        budget = {"max_new_tokens": config.max_new_tokens, "eos_id": self.policy.eos_id, "pad_id": self.policy.pad_id}

        def verify(responses, problems_of_rows) -> torch.Tensor:
            _, verdict = score_rollouts(
                self.policy, self.task, responses, problems_of_rows, timeout=config.verify_timeout
            )
            metrics["verify_failures"] += verdict.failures
            metrics["verify_timeouts"] += verdict.timeouts
            return torch.tensor(verdict.scores, dtype=torch.float32)

        if "greedy_rewards" in self.inputs:
            started = time.perf_counter()
            self.policy.model.eval()
            greedy = generate(self.policy.model, prompt_ids, prompt_mask, greedy=True, **budget)
            self.policy.model.train()
            scores = verify(greedy, problems)
            fields["greedy_rewards"] = scores.repeat_interleave(groups)
            metrics.update(
                greedy_reward=scores.mean().item(),
                greedy_tokens=int(greedy.lengths.sum().item()),
                greedy_seconds=time.perf_counter() - started,
            )
        if "reference_rewards" in self.inputs:
            started = time.perf_counter()
            generator = torch.Generator().manual_seed(_seed(config.seed, "reference", step))
            sampled = generate(
                self.reference, prompt_ids, prompt_mask, temperature=config.temperature, top_p=config.top_p,
                generator=generator, repeats=groups, **budget,
            )  # fmt: skip
            scores = verify(sampled, [p for p in problems for _ in range(groups)])
            fields["reference_rewards"] = scores
            metrics.update(
                reference_reward=scores.mean().item(),
                reference_tokens=int(sampled.lengths.sum().item()),
                reference_seconds=time.perf_counter() - started,
            )
        if "ref_logprobs" in self.inputs:
            started = time.perf_counter()
            fields["ref_logprobs"] = reference_logprobs(
                self.reference, rollouts, config.temperature, config.micro_batch_size
            )
            metrics["ref_logprobs_seconds"] = time.perf_counter() - started
        if "prompt_confidence" in self.inputs:
            fields["prompt_confidence"] = rollouts.prompt_confidence
            metrics["prompt_confidence"] = rollouts.prompt_confidence[::groups].mean().item()
        if "metric" in self.inputs:
            values = torch.tensor(prompt_values(self.task, problems), dtype=torch.float32)
            fields["metric"] = values.repeat_interleave(groups)
            metrics["prompt_value"] = values.mean().item()
        return fields, metrics

    def estimator_rewards(self, verdict, scores: torch.Tensor) -> torch.Tensor:
        """The estimator's `rewards`: the `scores` [B], or for a multi-reward estimator the reward components [B, K]
        (`canonrl.lab.task.reward_components`; the score alone, [B, 1], for a task without components)."""
        if self.reward_names is None:
            return scores
        if not self.reward_names:
            return scores.unsqueeze(1)
        components = [verdict.components[name] for name in self.reward_names]
        return torch.tensor(components, dtype=torch.float32).T.contiguous()

    def advantages(self, step: int, rollouts, rewards: torch.Tensor, **inputs) -> torch.Tensor:
        """The estimator's advantages; `inputs` are the extra batch fields (`extra_inputs`)."""
        config = self.config
        group = torch.arange(config.prompts_per_step).repeat_interleave(config.group_size)
        fields = {"rewards": rewards, "group": group, "mask": rollouts.response_mask, **inputs}
        available = {"entropy": rollouts.entropy, "logprobs": rollouts.logprobs, "token_ids": rollouts.response_ids}
        fields.update({name: available[name] for name in self.inputs if name in available})
        return self.estimator(step=step, **fields)

    def loss_mask(self, step: int, rollouts, advantages: torch.Tensor) -> tuple[torch.Tensor | None, dict]:
        """D^3S's loss mask [B, T] (`canonrl.selection.d3s_keep` at the step's (N, K) from `d3s_schedule`) and its
        metrics; (None, {}) when `d3s` is off. Rows it drops leave the loss entirely, denominators included."""
        from canonrl.selection import d3s_keep

        config = self.config
        schedule = config.d3s_schedule(step)
        if schedule is None:
            return None, {}
        num_keep, top_fraction = schedule
        group = torch.arange(config.prompts_per_step).repeat_interleave(config.group_size)
        mask = rollouts.response_mask
        rows, tokens = d3s_keep(
            advantages, rollouts.entropy, mask, group, num_keep=num_keep, top_fraction=top_fraction,
            **config.d3s_options(),
        )  # fmt: skip
        loss_mask = mask * tokens.to(mask.dtype)
        metrics = {
            "d3s_num_keep": num_keep,
            "d3s_top_fraction": top_fraction,
            "d3s_kept_rows": rows.float().mean().item(),
            "d3s_kept_tokens": (loss_mask.sum() / mask.sum().clamp(min=1)).item(),
        }
        return loss_mask, metrics

    def update(
        self, step: int, rollouts, advantages: torch.Tensor, ref_logprobs: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
    ) -> dict:
        """The policy loss (`policy_loss`, PPO-clip by default) over `ppo_epochs` x `minibatches`; each minibatch is
        one optimizer step.

        A minibatch runs as micro-batches of similar lengths (rows sorted by response length, each micro-batch
        cut to its own longest row) with gradients accumulated: the loss is that of the whole minibatch, since
        every micro-batch divides by the minibatch's token and response counts, but no forward pays for the
        padding of the longest response in the batch. The G responses of a prompt share one run of the prompt
        (`SharedPrompts`, Llama-architecture models).

        Rows whose advantage is 0 on every token (all-equal groups, under most estimators) add exactly nothing
        to the PPO loss's gradient, so without a KL term or a covariance loss they are not run at all; they still
        count in the loss's denominators, and the gradients are zeroed rather than dropped so that AdamW steps
        exactly as if they had been run. `ppo_kl` is then measured on the rows that ran.

        `ref_logprobs` [B, T], when given (the step's ACE input), serve the KL penalty in place of a reference
        forward per micro-batch.

        `loss_mask` [B, T] (D^3S, `loss_mask`), when given, replaces the response mask in the loss: aggregation, the
        token and response counts, the metrics and the choice of rows to run. Rows with no token in it leave the
        loss entirely (unlike zero-advantage rows, they count in no denominator). The forward still reads each
        row's real response.
        """
        from canonrl.lab.decoding import LlamaDecoder
        from canonrl.lab.sampling import SharedPrompts

        config = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        rows = rollouts.response_ids.shape[0]
        generator = torch.Generator().manual_seed(_seed(config.seed, "minibatches", step))
        scale = config.loss_scale_factor or config.max_new_tokens
        response_lengths = rollouts.lengths  # micro-batches group rows of similar length (what the forward pays)
        if loss_mask is None:
            lengths = response_lengths
            trains = self._rows_to_train(rollouts, advantages)
        else:
            lengths = loss_mask.sum(dim=1)
            trains = self._rows_to_train(rollouts, advantages, loss_mask)
        sums = {"loss": 0.0, "pg_clipfrac": 0.0, "pg_clipfrac_lower": 0.0, "ppo_kl": 0.0, "kl": 0.0, "grad_norm": 0.0}
        extra = {"clip_cov": "cov_clipped", "kl_cov": "kl_cov_selected"}.get(config.policy_loss)
        if extra:
            sums[extra] = 0.0
        updates = 0
        micro = 0  # the micro-batch's index within the step: seeds Clip-Cov's random choice
        for _ in range(config.ppo_epochs):
            order = torch.randperm(rows, generator=generator) if config.minibatches > 1 else torch.arange(rows)
            for part in order.chunk(config.minibatches):
                total_tokens = lengths[part].sum().clamp(min=1)
                total_responses = (lengths[part] > 0).float().sum().clamp(min=1)
                totals = {"tokens": total_tokens, "responses": total_responses}
                part = part[trains[part]]
                part = part[response_lengths[part].argsort(stable=True)]
                self.optimizer.zero_grad(set_to_none=False)
                counted = {"loss": 0.0, "kl": 0.0, "clipped": 0.0, "dual_clipped": 0.0, "ppo_kl": 0.0}
                if extra:
                    counted[extra] = 0.0
                shared = None
                if part.numel() and rollouts.repeats > 1 and LlamaDecoder.supports(self.policy.model):
                    shared = SharedPrompts(self.policy.model, rollouts, part, config.temperature)
                for chunk in part.split(config.micro_batch_size) if part.numel() else ():
                    mini = rollouts.select(chunk)
                    logprobs = shared.logprobs(chunk, mini) if shared else None
                    ref = None
                    if self.kl and ref_logprobs is not None:
                        ref = ref_logprobs[chunk, : mini.response_mask.shape[1]]
                    mask = None if loss_mask is None else loss_mask[chunk, : mini.response_mask.shape[1]]
                    self._accumulate(
                        step, mini, advantages[chunk], scale, totals, counted, logprobs, ref, mask=mask, micro=micro
                    )
                    micro += 1
                if shared is not None:
                    shared.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.model.parameters(), config.grad_clip)
                if not torch.isfinite(grad_norm):
                    raise TrainingError(f"non-finite gradient norm at step {step}; {self._last_good()}")
                self.optimizer.step()
                tokens = float(total_tokens)
                sums["loss"] += counted["loss"]
                sums["kl"] += counted["kl"]
                sums["pg_clipfrac"] += counted["clipped"] / tokens
                sums["pg_clipfrac_lower"] += counted["dual_clipped"] / tokens
                if extra:
                    sums[extra] += counted[extra] / tokens
                sums["ppo_kl"] += counted["ppo_kl"] / max(1.0, float(lengths[part].sum()))
                sums["grad_norm"] += grad_norm.item()
                updates += 1
        metrics = {key: value / updates for key, value in sums.items()}
        if not self.kl:
            del metrics["kl"]
        metrics["lr"] = self.lr_at(step)
        metrics["trained_rows"] = float(trains.float().mean())
        return metrics

    def _rows_to_train(self, rollouts, advantages: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Rows whose gradient can be non-zero: a non-zero advantage somewhere, or any row under a KL term or a
        covariance loss (`clip_cov` / `kl_cov`: every row enters the micro-batch's covariance statistics, and
        KL-Cov's penalty does not vanish with the advantage). With a `loss_mask` (D^3S) only rows with a token in
        it."""
        if loss_mask is None:
            if self.kl or self.config.policy_loss != "ppo_clip":
                return torch.ones(rollouts.response_ids.shape[0], dtype=torch.bool)
            return (advantages * rollouts.response_mask != 0).any(dim=1)
        if self.kl or self.config.policy_loss != "ppo_clip":
            return (loss_mask != 0).any(dim=1)
        return (advantages * loss_mask != 0).any(dim=1)

    def _accumulate(
        self, step: int, mini, advantages: torch.Tensor, scale: float, totals: dict, counted: dict, logprobs=None,
        ref_logprobs=None, *, mask: torch.Tensor | None = None, micro: int = 0,
    ) -> None:
        """Forward (unless `logprobs` came from shared prompts) and backward one micro-batch.

        The KL penalty's reference log-probs are `ref_logprobs` when given, else a reference forward here.
        `mask` is the micro-batch's loss mask (default: its response mask); `micro` its index within the step,
        which with (seed, step) seeds Clip-Cov's random choice.

        Its loss is its share of the minibatch's loss.
        """
        from canonrl.lab.sampling import sequence_logprobs

        config = self.config
        mask = mini.response_mask if mask is None else mask
        advantages = advantages[:, : mask.shape[1]]
        if logprobs is None:
            logprobs, _ = sequence_logprobs(self.policy.model, mini, config.temperature)
        params = config.loss_params()
        if config.policy_loss == "clip_cov":
            params["generator"] = torch.Generator().manual_seed(_seed(config.seed, "clip_cov", step, micro))
        token_loss, indicators = policy_loss(config.policy_loss, logprobs, mini.logprobs, advantages, mask, **params)

        def aggregate(values: torch.Tensor) -> torch.Tensor:
            return aggregate_loss(values, mask, config.loss_agg, scale, totals["tokens"], totals["responses"])

        loss = aggregate(token_loss)
        if self.kl:
            if ref_logprobs is None:
                with torch.no_grad():
                    ref_logprobs, _ = sequence_logprobs(self.reference, mini, config.temperature)
            kl = aggregate(kl_penalty(logprobs, ref_logprobs, config.kl_estimator))
            loss = loss + config.kl_coef * kl
            counted["kl"] += kl.item()
        if not torch.isfinite(loss):
            raise TrainingError(f"non-finite loss ({loss.item()}) at step {step}; {self._last_good()}")
        loss.backward()
        with torch.no_grad():
            counted["loss"] += loss.item()
            if "clipped" in indicators:
                counted["clipped"] += (indicators["clipped"] * mask).sum().item()
            for name in ("cov_clipped", "kl_cov_selected"):
                if name in indicators:
                    counted[name] += (indicators[name] * mask).sum().item()
            if "dual_clipped" in indicators:
                counted["dual_clipped"] += (indicators["dual_clipped"] * mask).sum().item()
            counted["ppo_kl"] += ((mini.logprobs - logprobs) * mask).sum().item()

    def _last_good(self) -> str:
        last = self.latest_checkpoint()
        return f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"

    def train_step(self, step: int) -> StepResult:
        started = time.perf_counter()
        problems, prompt_ids = self.draw_problems(step)
        rollouts, verdict = self.rollout(step, problems)
        rollout_seconds = time.perf_counter() - started
        rewards = torch.tensor(verdict.scores, dtype=torch.float32)
        inputs, extra_metrics = self.extra_inputs(step, problems, rollouts)
        estimator_rewards = self.estimator_rewards(verdict, rewards)
        advantages = self.advantages(step, rollouts, estimator_rewards, **inputs)
        loss_mask, selection_metrics = self.loss_mask(step, rollouts, advantages)
        masked = {} if loss_mask is None else {"loss_mask": loss_mask}
        metrics = self.update(step, rollouts, advantages, inputs.get("ref_logprobs"), **masked)
        metrics.update(selection_metrics)
        if self.prompt_sampler is not None:
            metrics.update(self._update_prompt_sampler(prompt_ids, rewards))
        if self.reward_names is not None:
            inputs["rewards"] = estimator_rewards
        mask = rollouts.response_mask
        lengths = rollouts.lengths
        new_tokens = int(lengths.sum().item())
        self.tokens += new_tokens
        group_rewards = rewards.view(self.config.prompts_per_step, self.config.group_size)
        adv_per_response = (advantages * mask).sum(dim=1) / lengths.clamp(min=1)
        metrics.update(
            reward=rewards.mean().item(),
            accuracy=(rewards >= 1.0).float().mean().item(),
            **{f"reward/{name}": sum(v) / len(v) for name, v in verdict.components.items()},
            response_length=lengths.mean().item(),
            response_length_max=lengths.max().item(),
            clipped_ratio=(~rollouts.finished).float().mean().item(),
            entropy=((rollouts.entropy * mask).sum() / mask.sum().clamp(min=1)).item(),
            mixed_groups=(group_rewards.std(dim=1) > 0).float().mean().item(),
            advantage_abs=adv_per_response.abs().mean().item(),
            zero_advantage=(adv_per_response == 0).float().mean().item(),
            verify_failures=verdict.failures + extra_metrics.pop("verify_failures"),
            verify_timeouts=verdict.timeouts + extra_metrics.pop("verify_timeouts"),
            **extra_metrics,
            tokens=self.tokens,
            step_seconds=time.perf_counter() - started,
            rollout_tokens_per_second=new_tokens / rollout_seconds,
        )
        mu_at = getattr(self.estimator, "mu_at", None)
        if mu_at is not None:
            metrics["mu"] = float(mu_at(step, metrics["accuracy"]))
        return StepResult(metrics, rollouts, advantages, inputs, loss_mask, prompt_ids)

    def _update_prompt_sampler(self, prompt_ids: torch.Tensor, rewards: torch.Tensor) -> dict:
        """Feed the step's per-row correctness (reward >= 1, as `accuracy`) to the pool sampler; its metrics."""
        sampler = self.prompt_sampler
        metrics = {}
        if hasattr(sampler, "mean"):  # VADE: the posterior success estimate of the chosen prompts, before this step
            metrics["prompt_success_estimate"] = sampler.mean[prompt_ids].mean().item()
        sampler.update(prompt_ids.repeat_interleave(self.config.group_size), (rewards >= 1.0).float())
        if hasattr(sampler, "epoch"):
            metrics["prompt_epoch"] = sampler.epoch
        return metrics

    def evaluate(self, step: int) -> dict:
        from canonrl.lab.evaluate import evaluate

        config = self.config
        return evaluate(
            self.policy, self.task, problems=config.eval_problems, seed=config.eval_seed, samples=config.eval_samples,
            max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
            timeout=config.verify_timeout, sample_seed=_seed(config.seed, "eval", step),
        )  # fmt: skip

    # ---------------------------------------------------------------- the run
    def _log(self, record: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record, allow_nan=True) + "\n")
        if self.writer is not None:
            prefix = "eval" if record["kind"] == "eval" else "train"
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "kind"):
                    self.writer.add_scalar(f"{prefix}/{key}", value, record["step"])
                elif isinstance(value, dict):
                    for sub, v in value.items():
                        self.writer.add_scalar(f"{prefix}/{key}/{sub}", v, record["step"])

    def train(self, on_step: Callable[[int, dict], None] | None = None) -> dict:
        """Run (or continue) to `config.steps`; returns the summary written to summary.json."""
        config = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, self.run_dir / "config.yaml")
        (self.run_dir / "metrics.jsonl").touch()
        self.writer = None
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.step + 1 if self.step else None)
        started = time.perf_counter()
        elapsed_before = self._elapsed_before()
        initial = None
        try:
            if self.step == 0:
                initial = self._evaluate_and_log(0, started, elapsed_before)
                if on_step:
                    on_step(0, {"eval": initial})
                if config.checkpoint_every:
                    self.save_checkpoint()
            while self.step < config.steps:
                step = self.step + 1
                result = self.train_step(step)
                self.step = step
                record = {"kind": "train", "step": step, "time": elapsed_before + time.perf_counter() - started, **result.metrics}
                self._log(record)
                evaluation = None
                if (config.eval_every and step % config.eval_every == 0) or step == config.steps:
                    evaluation = self._evaluate_and_log(step, started, elapsed_before)
                if on_step:
                    on_step(step, {"train": record, "eval": evaluation})
                if config.checkpoint_every and (step % config.checkpoint_every == 0 or step == config.steps):
                    self.save_checkpoint()
        finally:
            if self.writer is not None:
                self.writer.close()
        return self._write_summary(elapsed_before + time.perf_counter() - started)

    def _elapsed_before(self) -> float:
        last = 0.0
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    last = json.loads(line).get("time", last)
        return last

    def _evaluate_and_log(self, step: int, started: float, elapsed_before: float) -> dict:
        result = self.evaluate(step)
        record = {"kind": "eval", "step": step, "time": elapsed_before + time.perf_counter() - started, **result}
        self._log(record)
        return record

    def _write_summary(self, wall_time: float) -> dict:
        from canonrl.lab.policy import save_policy_dir
        from canonrl.lab.report import read_run

        run = read_run(self.run_dir)
        final_dir = save_policy_dir(self.policy.model, self.policy.tokenizer, self.run_dir / "policy")
        summary = {
            "estimator": self.config.estimator,
            "label": self.config.name,
            "seed": self.config.seed,
            "task": self.config.task,
            "steps": self.config.steps,
            "wall_time": wall_time,
            "initial": run.initial,
            "final": run.final,
            "policy": str(final_dir),
        }
        _atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2, allow_nan=True) + "\n")
        return summary


def default_run_dir(config: TrainConfig) -> Path:
    return Path("runs") / f"{config.name}-seed{config.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(config: TrainConfig | None = None, run_dir: Path | None = None, resume: bool = False, on_step=None) -> dict:
    """Train from a config (default: the shipped default) into `run_dir`; `resume` continues that run."""
    if resume:
        if run_dir is None:
            raise ValueError("resume needs the run directory")
        config = load_config(Path(run_dir) / "config.yaml")
    config = config or TrainConfig()
    run_dir = Path(run_dir) if run_dir else default_run_dir(config)
    if not resume and (run_dir / "metrics.jsonl").exists():
        raise ValueError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    return Trainer(config, run_dir, resume=resume).train(on_step)

