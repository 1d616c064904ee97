"""The lab trainer: on-policy RLVR with any registered estimator, checkpoints and evaluation.

`Trainer.train_step` is the pipeline of one step; each stage is a module of its own:

    draw problems (the task, or a pool sampler: canonrl.training.prompt_sampling)
    -> rollout (canonrl.lab.rollout: sample group_size responses per problem, verify them)
    -> extra estimator inputs (canonrl.lab.inputs: only those the estimator names)
    -> critic values (canonrl.lab.critic; only for the critic estimators)
    -> rewards (canonrl.lab.rewards) -> advantages (the configured estimator, which sees the step)
    -> loss mask (D^3S, canonrl.training.selection; off by default)
    -> update (canonrl.lab.update: the registered policy loss over ppo_epochs x minibatches)
    -> critic update (on the estimator's returns; alone during `critic_warmup`)
    -> metrics, logged by canonrl.lab.run_log; checkpoints by canonrl.lab.checkpoints.

The sampling log-probs serve as the old log-probs, so an on-policy single-epoch update needs no second forward pass.

Determinism: every random draw of step s comes from generators seeded by (seed, purpose, s) (canonrl.lab.seeds),
never from global RNG state, so a run resumed from its checkpoint at step s repeats the uninterrupted run exactly
on CPU — the same metrics, bit for bit, apart from wall-clock fields (`time`, `step_seconds`, `*_per_second`).

A run directory holds config.yaml, metrics.jsonl, tensorboard/, checkpoints/step-NNNNNN/ (a Hugging Face model
directory plus optimizer and trainer state), policy/ (the final model) and summary.json.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from canonrl.lab import checkpoints
from canonrl.lab.answer_probe import has_answer_probe
from canonrl.lab.config import TrainConfig, load_config, save_config
from canonrl.lab.critic import Critic
from canonrl.lab.evaluate import evaluate
from canonrl.lab.inputs import (
    LAB,
    NEEDS_REFERENCE,
    PROVIDED,
    SOLVER_INPUTS,
    TREE_INPUTS,
    TURN_INPUTS,
    StepContext,
    extra_inputs,
    rollout_inputs,
    turn_inputs,
)
from canonrl.lab.multi_turn import MultiTurnRollout, evaluate_environment, turn_metrics
from canonrl.lab.policy import load_policy, resolve_device, save_policy_dir, task_policy
from canonrl.lab.report import read_run
from canonrl.lab.rewards import RewardScorer, estimator_rewards
from canonrl.lab.rollout import SingleTurnRollout
from canonrl.lab.run_log import RunLog
from canonrl.lab.seeds import seed_of
from canonrl.lab.tasks import get_task
from canonrl.lab.tasks.base import reward_components
from canonrl.lab.tasks.environment import has_judge, has_solver, is_multi_turn
from canonrl.lab.update import PolicyUpdate, TrainingError
from canonrl.training.selection import d3s_keep

WALL_CLOCK_KEYS = (
    "time", "step_seconds", "rollout_tokens_per_second", "greedy_seconds", "reference_seconds", "ref_logprobs_seconds",
    "rollout_seconds", "advantage_seconds", "update_seconds", "env_seconds", "critic_seconds",
)  # fmt: skip
CRITIC_STATE = "critic.pt"
__all__ = ["StepResult", "Trainer", "TrainingError", "WALL_CLOCK_KEYS", "default_run_dir", "train"]


@dataclass
class StepResult:
    metrics: dict
    rollouts: object
    advantages: torch.Tensor
    #: the extra batch inputs the estimator got (`canonrl.lab.inputs`), and `rewards` when given as [B, K]
    inputs: dict = field(default_factory=dict)
    #: [B, T] the loss mask the update used when D^3S is on (`Trainer.loss_mask`); None: the response mask
    loss_mask: torch.Tensor | None = None
    #: [prompts_per_step] the pool indices of the step's problems (a pool `prompt_sampler`); None: fresh problems
    prompt_ids: torch.Tensor | None = None


class Trainer:
    """Holds the run's components (policy, optimizer, estimator, rollout, update) and its directory; `train()` runs
    to `config.steps`."""

    def __init__(self, config: TrainConfig, run_dir: Path, *, resume: bool = False):
        config.check_values()  # the components below are built once each, here, which checks their parameters
        self.config = config
        self.run_dir = Path(run_dir)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.task = get_task(config.task, **config.task_options)
        if config.players > 1:
            self.task = with_players(self.task, config.task, config.players)
        self.estimator = config.build_estimator()
        self.inputs = tuple(self.estimator.required_inputs())
        self._check_inputs()
        #: the verdict components a multi-reward estimator gets as rewards [B, K]; None: the score, [B]
        self.reward_names = reward_components(self.task) if type(self.estimator).multi_reward else None
        self.step = 0
        self.tokens = 0
        checkpoint = self.latest_checkpoint() if resume else None
        if resume and checkpoint is None:
            raise ValueError(f"nothing to resume: {self.run_dir} has no checkpoint")
        self.device = resolve_device(config.device)
        self.policy_name = task_policy(config.policy, self.task)
        self.policy = load_policy(str(checkpoint) if checkpoint else self.policy_name, device=self.device)
        self.policy.model.train()
        # The frozen reference policy (the initial weights, so a resumed run rebuilds it): for the KL penalty, AAPO's
        # reference rollouts and ACE's reference log-probs. Loaded only when one of them needs it.
        self.reference = None
        if config.kl_coef > 0 or any(name in self.inputs for name in NEEDS_REFERENCE):
            self.reference = load_policy(self.policy_name, device=self.device).model.eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(
            self.policy.model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        if is_multi_turn(self.task):
            self.sample = MultiTurnRollout.from_config(config, self.task)
        else:
            self.sample = SingleTurnRollout.from_config(config, self.task, prompt_confidence="prompt_confidence" in self.inputs)
        self.critic = Critic.from_config(
            config, self.policy, lambda: load_policy(self.policy_name, device=self.device).model
        )
        self.updater = PolicyUpdate(config, self.policy, self.optimizer, config.build_policy_loss(), self.reference)
        # A pool prompt sampler picks indices into a fixed pool of training problems drawn once from the task;
        # "fresh" (None) draws new problems every step.
        self.prompt_sampler = config.build_prompt_sampler(seed_of(config.seed, "prompt_sampler"))
        self.prompt_pool = None
        if self.prompt_sampler is not None:
            self.prompt_pool = self.task.problems("train", config.prompt_pool, seed=seed_of(config.seed, "prompt_pool"))
            if len(self.prompt_pool) != config.prompt_pool:
                raise ValueError(
                    f"task {config.task!r} gave {len(self.prompt_pool)} problems for prompt_pool={config.prompt_pool}"
                )
        if checkpoint is not None:
            self._restore(checkpoint)
            self.inputs = tuple(self.estimator.required_inputs())

    def _check_inputs(self) -> None:
        """One-line errors at start for what the task, the rollout options and the estimator's inputs cannot meet."""
        LAB.check(self.estimator)
        self._check_rollout_options()
        self._check_multi_turn_inputs()
        self._check_task_inputs()

    def _check_rollout_options(self) -> None:
        config, window = self.config, self.config.context_window()
        if window is not None and not is_multi_turn(self.task):
            raise ValueError(f"context=window:{window} lays out episodes one row per step; task {config.task!r} is single-turn")
        if config.branching is not None and not is_multi_turn(self.task):
            raise ValueError(f"branching copies environment states, which only a multi-turn task has; task {config.task!r} is single-turn")
        if config.players > 1 and (window is not None or config.branching is not None):
            raise ValueError("a game of several players runs with context=full and no branching")
        if config.turn_order == "reverse" and (not is_multi_turn(self.task) or window is not None):
            raise ValueError("turn_order=reverse updates turn by turn, which needs a multi-turn task with context=full")

    def _check_multi_turn_inputs(self) -> None:
        """Turn, tree, player and per-episode inputs, and the layouts the context gives."""
        config, window = self.config, self.config.context_window()
        turn_inputs = [name for name in self.inputs if name in TURN_INPUTS]
        if turn_inputs and not is_multi_turn(self.task):
            raise ValueError(
                f"estimator {config.estimator!r} needs {', '.join(turn_inputs)}, which only a multi-turn task gives "
                f"(task=grid); task {config.task!r} is single-turn"
            )
        tree_inputs = [name for name in self.inputs if name in TREE_INPUTS]
        if tree_inputs and (not is_multi_turn(self.task) or config.branching is None):
            raise ValueError(
                f"estimator {config.estimator!r} needs {', '.join(tree_inputs)}, which a branched multi-turn rollout "
                f"gives: set branching (e.g. task=grid branching.at=[2,4] branching.width=2)"
            )
        provided = [name for name in self.inputs if name in PROVIDED]
        if window is not None and provided:
            raise ValueError(
                f"estimator {config.estimator!r} needs {', '.join(provided)}, which the lab gives per episode, not per "
                f"step row: use context=full"
            )
        if "agent" in self.inputs and config.players == 1:
            raise ValueError(
                f"estimator {config.estimator!r} needs agent, the player of each row, which a game of several players "
                f"gives: set players=2 (task=grid)"
            )
        cls = type(self.estimator)
        reads_turns = cls.level == "step" or any(name in TURN_INPUTS for name in self.inputs)
        layout = "row-per-step" if window is not None else "row-per-trajectory"
        # an episode row of turns is a response row of segments to the estimators defined on responses
        accepted = {"row-per-step"} if window is not None else {"row-per-trajectory", "row-per-response"}
        if is_multi_turn(self.task) and reads_turns and not accepted & set(cls.layouts):
            hint = "context=window:K" if window is None else "context=full"
            raise ValueError(
                f"estimator {config.estimator!r} is defined on the {' and '.join(cls.layouts)} layout; "
                f"context={config.context} gives {layout}: set {hint}"
            )

    def _check_task_inputs(self) -> None:
        """Inputs only some tasks give: an answer probe, a solver, a judge, per-prompt values."""
        config = self.config
        probed = "prompt_values" in self.inputs  # IGPO's answer probe gives step_values with prompt_values
        if probed and not has_answer_probe(self.task):
            raise ValueError(
                f"estimator {config.estimator!r} needs prompt_values and step_values from an answer probe, which task "
                f"{config.task!r} does not give (an environment gives it with `answer_probe(problem)`: task=calc)"
            )
        solver_inputs = [name for name in self.inputs if name in SOLVER_INPUTS and not (probed and name == "step_values")]
        if solver_inputs and is_multi_turn(self.task) and not has_solver(self.task):
            raise ValueError(
                f"estimator {config.estimator!r} needs {', '.join(solver_inputs)}, which only an environment with a "
                f"solver gives (task=grid); task {config.task!r} has none"
            )
        if "metric" in self.inputs and not has_judge(self.task):
            raise ValueError(
                f"estimator {config.estimator!r} needs metric, a judge's tournament over each group, which task "
                f"{config.task!r} does not give (an environment gives it with a `judge` method: task=grid)"
            )
        if "human_values" in self.inputs and not callable(getattr(self.task, "value", None)):
            raise ValueError(
                f"estimator {config.estimator!r} needs human_values, a per-prompt value, which task {config.task!r} does "
                f"not give (a task gives it with a `value(problem)` method; the built-in 'lab' task does)"
            )

    # ---------------------------------------------------------------- checkpoints
    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        return checkpoints.latest_checkpoint(self.checkpoint_root)

    def save_checkpoint(self) -> Path:
        """checkpoints/step-NNNNNN/: the policy, the optimizer and the trainer's state (never half-written)."""
        import dataclasses

        metrics_bytes = (self.run_dir / "metrics.jsonl").stat().st_size

        def write_state(directory: Path) -> None:
            torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
            # plain values and tensors only (the estimator's state_dict, not the object), read with weights_only=True
            state = {
                "step": self.step,
                "tokens": self.tokens,
                "estimator_name": self.estimator.name,
                "estimator_params": dataclasses.asdict(self.estimator.params),
                "estimator": self.estimator.state_dict(),
                "metrics_bytes": metrics_bytes,
            }
            if self.prompt_sampler is not None:
                state["prompt_sampler"] = self.prompt_sampler.state_dict()
            torch.save(state, directory / checkpoints.TRAINER_STATE)
            if self.critic is not None:
                torch.save(self.critic.state_dict(), directory / CRITIC_STATE)

        return checkpoints.save_checkpoint(
            self.checkpoint_root, self.step, self.policy, write_state, self.config.keep_checkpoints
        )

    def _restore(self, checkpoint: Path) -> None:
        import dataclasses
        import pickle

        self.optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
        try:
            state = torch.load(checkpoint / checkpoints.TRAINER_STATE, weights_only=True)
        except pickle.UnpicklingError:
            raise ValueError(
                f"{checkpoint / checkpoints.TRAINER_STATE} holds pickled objects (written by an older canonrl that "
                "pickled the estimator); it cannot be resumed"
            ) from None
        params = dataclasses.asdict(self.estimator.params)
        saved = (state.get("estimator_name"), state.get("estimator_params"))
        if saved != (self.estimator.name, params):
            raise ValueError(
                f"{checkpoint} was written with estimator {saved[0]!r} {saved[1]!r}, but the config builds "
                f"{self.estimator.name!r} {params!r}"
            )
        self.estimator.load_state_dict(state["estimator"])
        if self.critic is not None:
            self.critic.load_state_dict(torch.load(checkpoint / CRITIC_STATE, weights_only=True))
        self.step, self.tokens = state["step"], state["tokens"]
        if self.prompt_sampler is not None:
            if state.get("prompt_sampler") is None:
                raise ValueError(f"{checkpoint} holds no prompt_sampler state; it was written by a 'fresh' run")
            self.prompt_sampler.load_state_dict(state["prompt_sampler"])
        # drop whatever the killed run logged after this checkpoint, so the log continues exactly
        with open(self.run_dir / "metrics.jsonl", "r+b") as handle:
            handle.truncate(state["metrics_bytes"])

    def _last_good(self) -> str:
        last = self.latest_checkpoint()
        return f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"

    # ---------------------------------------------------------------- one step, stage by stage
    def draw_problems(self, step: int) -> tuple[list, torch.Tensor | None]:
        """(problems, pool indices): `prompt_sampler` "fresh" draws `prompts_per_step` new problems from the task
        with a generator seeded by (seed, step), indices None; "uniform" / "vade" pick indices into the pool."""
        config = self.config
        if self.prompt_sampler is None:
            return self.task.problems("train", config.prompts_per_step, seed=seed_of(config.seed, "problems", step)), None
        ids = self.prompt_sampler.sample(config.prompts_per_step)
        return [self.prompt_pool[i] for i in ids.tolist()], ids

    def rollout(self, step: int, problems=None):
        """The step's rollouts and verdicts (`canonrl.lab.rollout`); its problems are drawn here unless given."""
        problems = self.draw_problems(step)[0] if problems is None else problems
        return self.sample(self.policy, problems, step)

    def extra_inputs(self, step: int, problems, rollouts, scores: list[float] | None = None) -> tuple[dict, dict]:
        """The batch inputs beyond the rollouts' own that the estimator reads, and their costs
        (`canonrl.lab.inputs.extra_inputs`); `scores` are the rollouts' rewards."""
        scorer = RewardScorer(self.policy, self.task, self.config.verify_timeout, self.device)
        context = StepContext(step, problems, rollouts, self.policy, self.reference, self.task, self.config, scorer,
                              scores)  # fmt: skip
        return extra_inputs(self.inputs, context)

    def groups(self, rollouts=None) -> torch.Tensor:
        """[B] the prompt of each row (rows come in groups of `group_size`), on the trainer's device; for `rollouts`
        with one row per step (``context=window:K``), the prompt of each step row's episode."""
        config = self.config
        groups = torch.arange(config.prompts_per_step, device=self.device).repeat_interleave(config.group_size)
        episode = row_episodes(rollouts)
        return groups if episode is None else groups[episode.to(self.device)]

    def advantages(self, step: int, rollouts, rewards: torch.Tensor, **inputs) -> torch.Tensor:
        """The estimator's advantages; `inputs` are the extra batch fields (`extra_inputs`)."""
        return self.advantages_and_returns(step, rollouts, rewards, **inputs)[0]

    def advantages_and_returns(self, step: int, rollouts, rewards: torch.Tensor, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The estimator's (advantages, returns) (`compute_with_returns`: the returns are a critic estimator's value
        targets, the advantages again for the others)."""
        group = self.groups(rollouts)
        episode = row_episodes(rollouts)
        if episode is not None:  # one row per step: every step of an episode gets its outcome
            rewards = rewards[episode.to(rewards.device)]
        fields = {"rewards": rewards, "group": group, "mask": rollouts.response_mask}
        fields.update(rollout_inputs(self.inputs, rollouts))
        if rollouts.turns is not None:
            fields.update(turn_inputs(self.estimator, rollouts.turns, rollouts.response_mask, group))
        fields.update(inputs)  # a provider's fields over the rollout's (IGPO's answer probe gives its step_values)
        return self.estimator.compute_with_returns(step=step, **fields)

    def loss_mask(self, step: int, rollouts, advantages: torch.Tensor) -> tuple[torch.Tensor | None, dict]:
        """D^3S's loss mask [B, T] (`canonrl.training.selection.d3s_keep` at the step's (N, K) from `d3s_schedule`) and its
        metrics; (None, {}) when `d3s` is off. Rows it drops leave the loss entirely, denominators included."""
        config = self.config
        schedule = config.d3s_schedule(step)
        if schedule is None:
            return None, {}
        num_keep, top_fraction = schedule
        group = self.groups(rollouts)
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

    def update(self, step: int, rollouts, advantages: torch.Tensor, ref_logprobs=None, loss_mask=None) -> dict:
        """The policy update (`canonrl.lab.update.PolicyUpdate`); its metrics. With ``turn_order=reverse`` (SeeUPO),
        one update per turn position, the last first, each on that turn's tokens only: a turn's update sees the
        policy the later turns' updates left (its ratio to the sampling policy carries them); the metrics are the
        passes' means, with ``turn_passes``."""
        try:
            if self.config.turn_order == "joint":
                return self.updater(step, rollouts, advantages, ref_logprobs, loss_mask)
            base = rollouts.response_mask if loss_mask is None else loss_mask
            turn_ids = rollouts.turns.turn_ids.to(base.device)
            passes = []
            for turn in range(int(turn_ids.max()), -1, -1):
                turn_mask = base * (turn_ids == turn)
                if turn_mask.any():
                    passes.append(self.updater(step, rollouts, advantages, ref_logprobs, turn_mask))
            metrics = {key: sum(p[key] for p in passes) / len(passes) for key in passes[0]}
            return {**metrics, "turn_passes": len(passes)}
        except TrainingError as error:
            raise TrainingError(f"{error}; {self._last_good()}") from None

    def train_step(self, step: int) -> StepResult:
        """draw -> rollout -> extra inputs -> rewards -> advantages -> loss mask -> update -> metrics."""
        started = time.perf_counter()
        problems, prompt_ids = self.draw_problems(step)
        rollouts, verdict = self.rollout(step, problems)
        rollout_seconds = time.perf_counter() - started
        rewards = torch.tensor(verdict.scores, dtype=torch.float32, device=self.device)
        inputs, extra_metrics = self.extra_inputs(step, problems, rollouts, verdict.scores)
        reward_input = estimator_rewards(verdict, self.reward_names, self.device)
        advantage_started = time.perf_counter()
        if self.critic is not None:
            inputs["values"] = self.critic.values(rollouts)
        advantages, returns = self.advantages_and_returns(step, rollouts, reward_input, **inputs)
        loss_mask, selection_metrics = self.loss_mask(step, rollouts, advantages)
        update_started = time.perf_counter()
        if step > self.config.critic_warmup:
            metrics = self.update(step, rollouts, advantages, inputs.get("ref_logprobs"), loss_mask)
        else:
            metrics = {"lr": 0.0, "trained_rows": 0.0}  # the critic's warm-up: the policy stays as it is
        metrics.update(rollout_seconds=rollout_seconds, advantage_seconds=update_started - advantage_started,
                       update_seconds=time.perf_counter() - update_started)  # fmt: skip
        if self.critic is not None:
            critic_started = time.perf_counter()
            metrics.update(self.critic.update(step, rollouts, inputs["values"], returns))
            metrics["critic_seconds"] = time.perf_counter() - critic_started
        metrics.update(selection_metrics)
        if self.prompt_sampler is not None:
            metrics.update(self._update_prompt_sampler(prompt_ids, rewards))
        if self.reward_names is not None:
            inputs["rewards"] = reward_input
        new_tokens = int(rollouts.lengths.sum().item())
        self.tokens += new_tokens
        metrics.update(self._rollout_metrics(rollouts, verdict, rewards, advantages))
        metrics.update(
            verify_failures=verdict.failures + extra_metrics.pop("verify_failures"),
            verify_timeouts=verdict.timeouts + extra_metrics.pop("verify_timeouts"),
            **extra_metrics,
            tokens=self.tokens,
            step_seconds=time.perf_counter() - started,
            rollout_tokens_per_second=new_tokens / rollout_seconds,
        )
        if rollouts.turns is not None:
            metrics.update(turn_metrics(rollouts.turns.episodes, self.groups()))
        if self.config.players > 1:
            metrics.update(player_metrics(rewards, self.config.players))
        mu_at = getattr(self.estimator, "mu_at", None)
        if mu_at is not None:
            metrics["mu"] = float(mu_at(step, metrics["accuracy"]))
        return StepResult(metrics, rollouts, advantages, inputs, loss_mask, prompt_ids)

    def _rollout_metrics(self, rollouts, verdict, rewards: torch.Tensor, advantages: torch.Tensor) -> dict:
        """What the step's rollouts and advantages look like: rewards, lengths, entropy, mixed groups."""
        mask, lengths = rollouts.response_mask, rollouts.lengths
        group_rewards = rewards.view(self.config.prompts_per_step, self.config.group_size)
        adv_per_response = (advantages * mask).sum(dim=1) / lengths.clamp(min=1)
        return dict(
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
        )

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
        config = self.config
        if is_multi_turn(self.task):
            return evaluate_environment(
                self.policy, getattr(self.task, "evaluation_env", self.task), problems=config.eval_problems, seed=config.eval_seed,
                samples=config.eval_samples, temperature=config.temperature, top_p=config.top_p,
                sample_seed=seed_of(config.seed, "eval", step), window=config.context_window(),
            )  # fmt: skip
        return evaluate(
            self.policy, self.task, problems=config.eval_problems, seed=config.eval_seed, samples=config.eval_samples,
            max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
            timeout=config.verify_timeout, sample_seed=seed_of(config.seed, "eval", step),
        )  # fmt: skip

    # ---------------------------------------------------------------- the run
    def train(self, on_step: Callable[[int, dict], None] | None = None) -> dict:
        """Run (or continue) to `config.steps`; returns the summary written to summary.json."""
        config = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, self.run_dir / "config.yaml")
        with RunLog(self.run_dir, tensorboard=config.tensorboard, resumed_at_step=self.step) as log:
            if self.step == 0:
                initial = log.log("eval", 0, self.evaluate(0))
                if on_step:
                    on_step(0, {"eval": initial})
                if config.checkpoint_every:
                    self.save_checkpoint()
            while self.step < config.steps:
                step = self.step + 1
                result = self.train_step(step)
                self.step = step
                record = log.log("train", step, result.metrics)
                evaluation = None
                if (config.eval_every and step % config.eval_every == 0) or step == config.steps:
                    evaluation = log.log("eval", step, self.evaluate(step))
                if on_step:
                    on_step(step, {"train": record, "eval": evaluation})
                if config.checkpoint_every and (step % config.checkpoint_every == 0 or step == config.steps):
                    self.save_checkpoint()
        return self._write_summary(log.elapsed())

    def _write_summary(self, wall_time: float) -> dict:
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
        checkpoints.atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2, allow_nan=True) + "\n")
        return summary


def with_players(task, name: str, players: int):
    """The `players`-player version of a multi-turn task (its ``with_players``); a one-line error without one."""
    factory = getattr(task, "with_players", None)
    if not is_multi_turn(task) or factory is None:
        raise ValueError(f"task {name!r} has no game of {players} players (task=grid has a two-player race)")
    return factory(players)


def player_metrics(rewards: torch.Tensor, players: int) -> dict:
    """Each player's mean outcome (``reward/player<p>``) and the share of games every player won alike (ties)."""
    games = rewards.view(-1, players)
    metrics = {f"reward/player{p}": games[:, p].mean().item() for p in range(players)}
    metrics["tied_games"] = (games == games[:, :1]).all(dim=1).float().mean().item()
    return metrics


def row_episodes(rollouts) -> torch.Tensor | None:
    """[B] the episode of each row of a one-row-per-step rollout (`canonrl.lab.windowed.StepRows`); None otherwise."""
    return getattr(getattr(rollouts, "turns", None), "episode", None)


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

