"""The multi-turn benchmark runs end to end on a tiny batch (timings are reported, never asserted): both rollouts
play the same mazes, and the train step is split into its stages."""

from __future__ import annotations

import torch

from canonrl.lab.bench_multi_turn import generate_per_turn, run_multi_turn_benchmark
from canonrl.lab.policy import load_policy
from canonrl.lab.tasks import get_task


def test_the_benchmark_table_has_both_rollouts_and_the_step_split():
    result = run_multi_turn_benchmark(prompts=1, group_size=2, repeats=1)
    labels = [what for what, _, _ in result.rows]
    assert labels[0].startswith("rollout: canonrl") and labels[1].startswith("rollout: model.generate")
    assert {"train step (total)", "  advantages (critic values included)", "  critic update"} <= set(labels)
    assert sum(note.endswith("critic=head") for _, _, note in result.rows) == 6  # the gigpo rows and the critic's
    assert all(seconds > 0 for _, seconds, _ in result.rows)
    assert result.markdown().startswith("| measured | time (s) | note |")


def test_the_generate_loop_plays_real_episodes():
    env, policy = get_task("grid"), load_policy("lab-grid-tiny")
    problems = env.problems("train", 2, seed=0)
    with torch.no_grad():
        outcomes = generate_per_turn(policy, env, problems, repeats=3, seed=0)
    assert len(outcomes) == 6 and set(outcomes) <= {0.0, 1.0}
