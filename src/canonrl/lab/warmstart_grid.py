"""`canonrl lab warmstart --policy lab-grid-tiny`: build the lab-grid policy by supervised training on noisy expert
episodes of lab-grid (`canonrl.lab.tasks.grid`).

Each training row is one episode as the multi-turn rollout lays it out: the prompt (the map and the start), then per
turn the action token and the environment's observation (the last action has none). Only the actions are learnt;
observations and the prompt are context. The episodes come from the noisy expert (`GridTask.trace`): a uniformly
random action with probability `noise`, else the BFS expert's, so the policy samples a mix of good and wasted moves
at temperature 1 and its held-out success leaves RL room (the recorded `warmstart.json` says where it starts).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from canonrl.lab.warmstart import WarmstartConfig, build_model, fit, padded_batch, save_warmstarted


@dataclass
class GridWarmstartConfig(WarmstartConfig):
    steps: int = 500
    batch_size: int = 32
    noise: float = 0.6
    eval_problems: int = 128


def grid_training_batch(task, tokenizer, rng: random.Random, size: int, noise: float):
    """Right-padded episodes: ids, attention and labels (the action tokens only)."""
    problems = task.problems("train", size, seed=rng.getrandbits(62))
    rows = []
    for problem in problems:
        ids = tokenizer(problem.prompt).input_ids
        labels = [-100] * len(ids)
        actions, observations = task.episode_text(problem, task.trace(problem, rng, noise))
        for turn, (action, observation) in enumerate(zip(actions, observations)):
            action_ids = tokenizer(action, add_special_tokens=False).input_ids
            ids, labels = ids + action_ids, labels + action_ids
            if turn < len(actions) - 1:  # the rollout appends no observation after the episode's last action
                seen = tokenizer(observation, add_special_tokens=False).input_ids
                ids, labels = ids + seen, labels + [-100] * len(seen)
        rows.append((ids, labels))
    return padded_batch(rows, tokenizer.pad_token_id)


def warmstart_grid(out_dir: Path, config: GridWarmstartConfig | None = None, progress=None) -> dict:
    """Train the lab-grid-tiny policy (recipe `config`) and write it to `out_dir` atomically; returns the summary."""
    from canonrl.lab.multi_turn import evaluate_environment
    from canonrl.lab.policy import Policy
    from canonrl.lab.tasks.grid import GridTask, build_tokenizer

    config = config or GridWarmstartConfig()
    torch.manual_seed(config.seed)
    rng = random.Random(f"warmstart-grid/{config.seed}")
    task = GridTask()
    tokenizer = build_tokenizer()
    model = build_model(config, tokenizer)
    losses, seconds = fit(
        model, lambda: grid_training_batch(task, tokenizer, rng, config.batch_size, config.noise), config, progress
    )
    policy = Policy(model=model, tokenizer=tokenizer, source="lab-grid-tiny")
    heldout = evaluate_environment(policy, task, problems=config.eval_problems, seed=config.seed, samples=4)
    rebuild = "canonrl lab warmstart --policy lab-grid-tiny"
    return save_warmstarted(model, tokenizer, out_dir, config, losses, seconds, heldout, rebuild)
