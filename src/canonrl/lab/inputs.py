"""The batch inputs the lab gives an estimator beyond ``rewards``, ``group`` and ``mask``: what exists, what each
costs, and how it is computed.

The rollouts carry ``entropy``, ``logprobs`` and ``token_ids`` for free (`ROLLOUT_INPUTS`). The others come from a
provider registered here with ``@provides(name)``, run only when the estimator's ``required_inputs()`` names
them, after sampling and before the update, under the policy as it sampled (`extra_inputs`). `LAB_INPUTS` is what
the lab provides; an estimator that needs anything else is refused when the trainer starts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from canonrl.fields import Consumer
from canonrl.lab.answer_probe import answer_logprobs
from canonrl.lab.forward import micro_batches, reference_logprobs, response_hidden
from canonrl.lab.multi_turn import completions_of
from canonrl.lab.rewards import RewardScorer
from canonrl.lab.sampling import Rollouts, generate
from canonrl.lab.seeds import seed_of
from canonrl.lab.tasks.base import prompt_values
from canonrl.lab.tasks.environment import Episode

#: per-token inputs every rollout carries: batch field -> Rollouts attribute
ROLLOUT_INPUTS = {"entropy": "entropy", "logprobs": "logprobs", "token_ids": "response_ids"}


@dataclass
class StepContext:
    """What a provider may read: the step's problems and rollouts, the models, the task and the config."""

    step: int
    problems: list
    rollouts: Rollouts
    policy: object
    reference: object | None
    task: object
    config: object
    scorer: RewardScorer
    #: [B] the rollouts' rewards (the verdicts' scores)
    scores: list[float] | None = None

    @property
    def budget(self) -> dict:
        return {"max_new_tokens": self.config.max_new_tokens, "eos_id": self.policy.eos_id, "pad_id": self.policy.pad_id}

    @property
    def prompts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) of the step's prompts, one row per problem."""
        groups = self.rollouts.repeats
        return self.rollouts.prompt_ids[::groups], self.rollouts.prompt_mask[::groups]


#: ``provider(context) -> (value, metrics)``; a provider of several fields returns them as a dict ``{name: value}``
Provider = Callable[[StepContext], tuple[torch.Tensor | dict, dict]]
_PROVIDERS: dict[str, Provider] = {}
#: batch input -> how the lab gets it, in a few words (for errors and docs)
_HOW: dict[str, str] = {"entropy": "the sampler's", "logprobs": "the sampler's", "token_ids": "the sampled tokens"}


def provides(name: str, how: str) -> Callable[[Provider], Provider]:
    """Register the provider of batch input `name` (`how`: a few words on how it is computed):
    ``provider(context) -> (value, metrics)``."""

    def register(provider: Provider) -> Provider:
        _PROVIDERS[name] = provider
        _HOW[name] = how
        return provider

    return register


@provides("greedy_rewards", "one greedy decode per prompt, verified")
def greedy_rewards(ctx: StepContext):
    """[B] (ReMax): one greedy response per prompt from the current policy, verified, its reward repeated to the
    prompt's G rows. Costs one decode of `prompts_per_step` rows."""
    started = time.perf_counter()
    ctx.policy.model.eval()
    greedy = generate(ctx.policy.model, *ctx.prompts, greedy=True, **ctx.budget)
    ctx.policy.model.train()
    scores = ctx.scorer.scores(greedy, ctx.problems)
    metrics = {"greedy_reward": scores.mean().item(), "greedy_tokens": int(greedy.lengths.sum().item()),
               "greedy_seconds": time.perf_counter() - started}  # fmt: skip
    return scores.repeat_interleave(ctx.rollouts.repeats), metrics


@provides("reference_rewards", "one sample per row from the frozen initial policy, verified")
def reference_rewards(ctx: StepContext):
    """[B] (AAPO): one response per rollout row sampled by the frozen reference (initial) policy at the sampling
    temperature and top-p, from a generator seeded by (seed, "reference", step), verified. Costs a second rollout."""
    started = time.perf_counter()
    config, groups = ctx.config, ctx.rollouts.repeats
    generator = torch.Generator(device=ctx.policy.device).manual_seed(seed_of(config.seed, "reference", ctx.step))
    sampled = generate(ctx.reference, *ctx.prompts, temperature=config.temperature, top_p=config.top_p,
                       generator=generator, repeats=groups, **ctx.budget)  # fmt: skip
    scores = ctx.scorer.scores(sampled, [p for p in ctx.problems for _ in range(groups)])
    metrics = {"reference_reward": scores.mean().item(), "reference_tokens": int(sampled.lengths.sum().item()),
               "reference_seconds": time.perf_counter() - started}  # fmt: skip
    return scores, metrics


@provides("ref_logprobs", "a no-grad forward of the frozen initial policy")
def ref_logprobs(ctx: StepContext):
    """[B, T] (ACE): the sampled responses' log-probs under the reference policy at the sampling temperature (the
    KL penalty's forward). Costs one forward, no backward."""
    started = time.perf_counter()
    value = reference_logprobs(ctx.reference, ctx.rollouts, ctx.config.temperature, ctx.config.micro_batch_size)
    return value, {"ref_logprobs_seconds": time.perf_counter() - started}


@provides("prompt_confidence", "read off the sampler's prefill")
def prompt_confidence(ctx: StepContext):
    """[B] (ProGRPO): already on the rollouts (the sampler's prefill); free."""
    confidence = ctx.rollouts.prompt_confidence
    return confidence, {"prompt_confidence": confidence[:: ctx.rollouts.repeats].mean().item()}


@provides("human_values", "the task's value(problem)")
def human_values(ctx: StepContext):
    """[B] (RLEV): each prompt's value v from the task (`prompt_values`), repeated to its G rows; free."""
    values = torch.tensor(prompt_values(ctx.task, ctx.problems), dtype=torch.float32, device=ctx.policy.device)
    return values.repeat_interleave(ctx.rollouts.repeats), {"prompt_value": values.mean().item()}


@provides("metric", "round-robin wins under the environment's pairwise judge")
def judge_wins(ctx: StepContext):
    """[B] (ArenaRL): each episode's wins in a round robin against the other episodes of its problem under the
    environment's judge (`judge(first, second)`: 1 a win, 0.5 a tie); ArenaRL's anchor topology ranks them (its
    official ``round_robin.py``). Costs G * (G - 1) judge calls per problem; no model pass."""
    turns, groups = ctx.rollouts.turns, ctx.rollouts.repeats
    episodes = [Episode(score, len(rewards), int(invalid), sum(rewards)) for score, rewards, invalid
                in zip(ctx.scores, turns.step_rewards, turns.invalid.tolist())]  # fmt: skip
    wins = [0.0] * len(episodes)
    for start in range(0, len(episodes), groups):
        for i in range(start, start + groups):
            wins[i] = sum(ctx.task.judge(episodes[i], episodes[j]) for j in range(start, start + groups) if j != i)
    value = torch.tensor(wins, dtype=torch.float32, device=ctx.policy.device)
    return value, {"judge_wins": value.mean().item()}


@provides("indicators", "a no-grad forward for the responses' hidden states, then their SVDs")
def effective_rank_indicators(ctx: StepContext):
    """[B, 3] (VERL's effective-rank shaping): (ERA, ERV, ER) of each response's last-layer hidden states at its
    own tokens (`canonrl.producers.effective_rank`, the official stride 40 over the last 512 tokens), from a no-grad
    forward of the policy that sampled. Costs one forward and a batched SVD per prefix stride."""
    from canonrl.producers.effective_rank import effective_rank_indicators as indicators

    started = time.perf_counter()
    rollouts = ctx.rollouts
    out = torch.zeros(rollouts.response_ids.shape[0], 3, device=rollouts.response_ids.device)
    ctx.policy.model.eval()
    with torch.no_grad():
        for chunk, mini in micro_batches(rollouts, ctx.config.micro_batch_size):
            out[chunk] = indicators(response_hidden(ctx.policy.model, mini, before=False), mini.response_mask)
    ctx.policy.model.train()
    return out, {"effective_rank": out[:, 2].mean().item(), "indicators_seconds": time.perf_counter() - started}


@provides("prompt_values", "IGPO's answer probe: a teacher-forced pass of the environment's answer per turn")
def answer_probe(ctx: StepContext):
    """``prompt_values`` [B] and ``step_values`` (per row, per turn) (IGPO with ``info_gain`` log_prob or prob): the
    policy's mean log-prob of the ground-truth answer before the first turn and after each turn
    (`canonrl.lab.answer_probe`). Costs one forward per turn of each episode, no backward."""
    started = time.perf_counter()
    step_values, prompt_values = answer_logprobs(ctx.policy, ctx.rollouts, ctx.problems, ctx.task,
                                                 ctx.config.micro_batch_size)  # fmt: skip
    # the belief before the last turn (lab-calc's answer turn): after the turn before it, or the prompt's
    before_last = [v[-2] if len(v) > 1 else float(p) for v, p in zip(step_values, prompt_values.tolist())]
    metrics = {"answer_logprob_start": prompt_values.mean().item(),
               "answer_logprob_before_last_turn": sum(before_last) / len(before_last),
               "answer_probe_seconds": time.perf_counter() - started}  # fmt: skip
    return {"prompt_values": prompt_values.to(ctx.policy.device), "step_values": step_values}, metrics


#: what a multi-turn rollout gives a step estimator (`canonrl.lab.multi_turn.Turns`), and how
TURN_INPUTS = {
    "turn_ids": "the multi-turn rollout's turn of each action token",
    "step_rewards": "the environment's turn rewards",
    "anchor": "the environment's anchor of each turn's start state",
    "step_values": "the environment solver's V* of each turn's end state",
    "step_labels": "the environment solver's label of each turn (+1 right, -1 wrong)",
}
#: what a game of several players (``players=2``) gives
TURN_INPUTS["agent"] = "the player of each episode row (players=2: a game's players are consecutive rows)"
#: turn inputs only an environment with a solver gives (`canonrl.lab.tasks.environment.has_solver`)
SOLVER_INPUTS = ("step_values", "step_labels")
#: what a branched multi-turn rollout (config `branching`) gives a tree estimator
TREE_INPUTS = {
    "node": "a branched rollout (branching={at: [turns], width: n}): the prefix each segment reaches",
    "parent": "a branched rollout (branching={at: [turns], width: n}): the prefix each segment starts from",
}
_HOW.update(TURN_INPUTS)
_HOW.update(TREE_INPUTS)


def turn_inputs(estimator, turns, mask: torch.Tensor, group: torch.Tensor) -> dict:
    """A step-level estimator's turn fields from a multi-turn rollout's `turns` (all of them: they are free), and
    those of an estimator that reads turn inputs (EGAE); an outcome-level estimator gets none (it sees one reward per
    episode). A tree estimator gets the tree of a branched
    rollout instead: its segments between branch points as ``turn_ids``, with ``node`` and ``parent``
    (`canonrl.lab.multi_turn.Branches.tree`)."""
    if type(estimator).level != "step" and not set(estimator.required_inputs()) & set(TURN_INPUTS):
        return {}
    if "node" in estimator.required_inputs():
        tree = turns.branches.tree(mask)
        return completions_of(tree, group) if type(estimator).tree_steps == "completions" else tree
    return turns.step_fields()


#: what the lab's critic gives a critic estimator (`canonrl.lab.critic`), and how
CRITIC_INPUTS = {"values": "the lab's critic (critic=head or critic=separate)"}
_HOW.update(CRITIC_INPUTS)

#: what the lab gives an estimator beyond rewards, group and mask, and how
LAB = Consumer(
    "the lab trainer",
    dict(_HOW),
    missing="use the estimator in the library on your own batches, or add a provider in canonrl.lab.inputs",
)
LAB_INPUTS = (*ROLLOUT_INPUTS, *_PROVIDERS, *TURN_INPUTS, *TREE_INPUTS, *CRITIC_INPUTS)
#: the inputs a provider computes (per episode, in a multi-turn task)
PROVIDED = tuple(_PROVIDERS)
#: inputs that need the frozen reference policy
NEEDS_REFERENCE = ("reference_rewards", "ref_logprobs")


def extra_inputs(names: tuple[str, ...], ctx: StepContext) -> tuple[dict, dict]:
    """(fields, metrics): the provided inputs among `names`, in registration order, with their cost metrics and
    the verifier's failures and timeouts of their rollouts (`verify_failures`, `verify_timeouts`)."""
    fields: dict = {}
    metrics: dict = {"verify_failures": 0, "verify_timeouts": 0}
    for name, provider in _PROVIDERS.items():
        if name in names:
            value, cost = provider(ctx)
            fields.update(value if isinstance(value, dict) else {name: value})
            metrics.update(cost)
    metrics.update(verify_failures=ctx.scorer.failures, verify_timeouts=ctx.scorer.timeouts)
    return fields, metrics


def rollout_inputs(names: tuple[str, ...], rollouts: Rollouts) -> dict:
    """The per-token inputs among `names` that the rollouts carry."""
    return {name: getattr(rollouts, attribute) for name, attribute in ROLLOUT_INPUTS.items() if name in names}
