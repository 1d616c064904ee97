"""`canonrl lab bench-multi-turn`: the multi-turn rollout against a plain `model.generate`-per-turn loop, and a
lab-grid training step split into its stages, in one process.

Both rollouts play the same mazes with the same policy (lab-grid-tiny) at temperature 1:

- **canonrl**: `canonrl.lab.multi_turn.run_episodes`, all episodes in lock step through one KV-cache decoder;
- **generate per turn**: what an agent loop without a shared cache does — each turn, Hugging Face
  `model.generate` over every live episode's whole context so far (prompt, actions, observations) for one action
  token, then the environments step and their observations are appended as text-derived tokens.

A trainer step (`canonrl train task=grid estimator=gigpo`, 8 mazes × 8 episodes) is split into the rollout
(sampling with the environment inside), the environment's own share of it, the advantages and the update; a second
one with a critic (`estimator=gae critic=head`) adds the critic's share (its values are in the advantages' time,
its update in its own row).
Times are medians of `repeats` runs after one warm-up; compare ratios, not absolute times.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from canonrl.lab.multi_turn import run_episodes


@dataclass
class MultiTurnBench:
    rows: list[tuple[str, float, str]]  # (what, seconds, note)

    def markdown(self) -> str:
        lines = ["| measured | time (s) | note |", "|---|---:|---|"]
        lines += [f"| {what} | {seconds:.3f} | {note} |" for what, seconds, note in self.rows]
        return "\n".join(lines)


def generate_per_turn(policy, env, problems: list, repeats: int, seed: int) -> list[float]:
    """The outcomes of `repeats` episodes per problem played with one `model.generate` call per turn."""
    model, tokenizer = policy.model, policy.tokenizer
    states = [env.reset(p) for p in problems for _ in range(repeats)]
    contexts = [tokenizer(p.prompt).input_ids for p in problems for _ in range(repeats)]
    live = list(range(len(states)))
    torch.manual_seed(seed)  # generate draws from the global generator
    for turn in range(env.max_turns):
        if not live:
            break
        width = max(len(contexts[i]) for i in live)
        ids = torch.full((len(live), width), policy.pad_id, dtype=torch.long)
        attention = torch.zeros(len(live), width, dtype=torch.long)
        for k, i in enumerate(live):  # left padding
            ids[k, width - len(contexts[i]):] = torch.tensor(contexts[i])
            attention[k, width - len(contexts[i]):] = 1
        out = model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=env.max_action_tokens,
                             do_sample=True, temperature=1.0, top_k=0, pad_token_id=policy.pad_id)  # fmt: skip
        still = []
        for k, i in enumerate(live):
            action_ids = out[k, width:].tolist()
            transition = env.step(states[i], tokenizer.decode(action_ids, skip_special_tokens=True))
            states[i] = transition.state
            contexts[i] = contexts[i] + action_ids
            if not transition.done and turn < env.max_turns - 1:
                contexts[i] = contexts[i] + tokenizer(env.render(states[i]), add_special_tokens=False).input_ids
                still.append(i)
        live = still
    return [env.outcome(state) for state in states]


def _median_seconds(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def run_multi_turn_benchmark(prompts: int = 8, group_size: int = 8, repeats: int = 3, seed: int = 0) -> MultiTurnBench:
    import tempfile

    from canonrl.lab.config import load_config
    from canonrl.lab.policy import load_policy
    from canonrl.lab.tasks import get_task
    from canonrl.lab.trainer import Trainer

    env = get_task("grid")
    policy = load_policy("lab-grid-tiny")
    policy.model.eval()
    problems = env.problems("train", prompts, seed=seed)

    def ours():
        return run_episodes(policy, env, problems, repeats=group_size, generator=torch.Generator().manual_seed(seed))

    with torch.no_grad():
        canonrl_seconds = _median_seconds(ours, repeats)
        loop_seconds = _median_seconds(lambda: generate_per_turn(policy, env, problems, group_size, seed), repeats)
    episodes = prompts * group_size
    rows = [
        (f"rollout: canonrl multi-turn ({episodes} episodes)", canonrl_seconds, "one KV-cache decoder, lock step"),
        (f"rollout: model.generate per turn ({episodes} episodes)", loop_seconds,
         f"{loop_seconds / canonrl_seconds:.1f}× canonrl's time"),
    ]  # fmt: skip
    stages = (("step_seconds", "train step (total)"), ("rollout_seconds", "  rollout (sampling + environment)"),
              ("env_seconds", "    of which the environment"), ("advantage_seconds", "  advantages (critic values included)"),
              ("update_seconds", "  update (forward + backward + optimizer)"),
              ("critic_seconds", "  critic update"))  # fmt: skip
    for label, overrides in (("gigpo", ["estimator=gigpo"]), ("gae, critic=head", ["estimator=gae", "critic=head"])):
        config = load_config(None, ["task=grid", *overrides, f"prompts_per_step={prompts}", f"group_size={group_size}",
                                    "tensorboard=false"])  # fmt: skip
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = Trainer(config, run_dir)
            splits = [trainer.train_step(step).metrics for step in range(1, repeats + 2)][1:]
        for key, what in stages:
            if key in splits[0]:
                rows.append((what, statistics.median(m[key] for m in splits), f"{prompts} mazes × {group_size} episodes, {label}"))
    return MultiTurnBench(rows)
