"""Property-based tests (hypothesis) of every registered step-level estimator, read from the registry: row
permutation, relabelling of groups, trajectories and anchors, group independence, no NaN/Inf on fuzzed batches,
duplicated steps counted once, and the same numbers from the row-per-step and the row-per-trajectory layouts."""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import canonrl
from conftest import row_values

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
EXAMPLES_FACTOR = float(os.environ.get("CANONRL_PROPERTY_EXAMPLES", "1"))

#: Tree estimators (they read `node`/`parent`) need tree-shaped batches, which this file's trajectory generator does
#: not draw; tests/test_tree_properties.py fuzzes them all (read from the registry as here) on rollout trees.
TREE_ESTIMATORS = [info.name for info in canonrl.estimators() if info.level == "step" and "node" in info.requires]
STEP_ESTIMATORS = [info.name for info in canonrl.estimators() if info.level == "step" and info.name not in TREE_ESTIMATORS]
#: The configurations each property runs, where the defaults alone are not enough (hyperparameters that change which
#: statistics are taken); an estimator not listed runs at its defaults. Group independence is checked where the
#: configured estimator declares itself group-local (``Estimator.batch_level_reason`` None).
VARIANTS = {
    "gigpo": [{}, {"mode": "mean_std_norm", "episode_stats": "trajectories", "gamma": 1.0}],
    "hgpo": [{}, {"history_length": 1, "mode": "mean_norm", "base_group": True}],
    "trloo": [{}, {"gamma": 0.8}],
    # random step groups: one group per task / trajectory here (step_group_size 0), the random chunks have own tests
    "srgpo": [{"scope": "task", "step_group_size": 0}, {"scope": "trajectory", "step_group_size": 0}],
    "advevo_marl": [{}, {"scale": "std", "gamma": 0.9}],
    "mapo_dialogue": [{}, {"beta": 1.0, "gamma": 0.9}],
    "igpo": [{}, {"norm": "joint", "gamma": 0.8}, {"scale_by_std": False, "zero_info_gain": "drop", "gamma": 0.5}],
    "matchtir": [{}, {"gamma": 0.5, "eps": 1e-3}],
    "mars": [{}, {"advantage_norm": "mean_std", "whiten_advantages": False},
             {"advantage_norm": "none", "whiten_rewards": True}],
    "fspo": [{}, {"base": "rloo"}],
    "spae": [{}, {"base": "rloo", "xi": 0.5, "threshold": 0.4, "saturation_scale": 0.0}],
    "spo_chain": [{}, {"prob_mask": False, "first_segment": "from_zero"}],
}
#: Batch-level configurations (besides those in VARIANTS) whose declaration the witness test checks.
BATCH_LEVEL_VARIANTS = {
    "srgpo": [{"scope": "batch", "step_group_size": 0}],
    "mapo_dialogue": [{"beta": 0.5}],
}
#: Variants whose numbers legitimately differ between the layouts: MARS centres on the distinct values of a player's
#: returns plus a 0 for a row with columns after its last turn, which the row-per-trajectory batches here have.
LAYOUT_DEPENDENT = {"mars": lambda params: params.get("advantage_norm", "mean") != "none"}
WIDTH = 3
HIGH_PROBABILITY_COLUMN = WIDTH - 1  # a step's token sampled with probability 0.95 (the others 0.5): SPO's mask


def logprobs_like(mask, period):
    """log 0.95 at each step's HIGH_PROBABILITY_COLUMN (columns counted modulo ``period``), log 0.5 elsewhere."""
    columns = torch.arange(mask.shape[1]) % period
    return torch.where(columns == HIGH_PROBABILITY_COLUMN, math.log(0.95), math.log(0.5)).expand_as(mask).clone()


def prompt_value(steps):
    """A trajectory's prompt value, from its own steps (NaN = absent when its first step reward is 0)."""
    return math.nan if steps[0][0] == 0.0 else steps[0][2] - 0.25


def examples(n: int) -> int:
    return max(1, round(n * EXAMPLES_FACTOR))


def variants(name: str) -> list[dict]:
    return VARIANTS.get(name, [{}])


def test_variants_name_registered_step_estimators():
    assert STEP_ESTIMATORS and set(VARIANTS) <= set(STEP_ESTIMATORS)


@st.composite
def trajectories(draw):
    """A list of trajectories (group, steps), each step (reward, anchor, episode reward, mask tokens, agent role,
    verifier label, potential)."""
    out = []
    for g in range(draw(st.integers(1, 3))):
        for _ in range(draw(st.integers(1, 4))):
            outcome = draw(st.sampled_from([0.0, 1.0, 0.5]))
            role = draw(st.sampled_from(["attacker", "defender"]))
            steps = [
                (draw(st.sampled_from([0.0, 1.0, -1.0, 0.25])), draw(st.integers(0, 2)), outcome,
                 draw(st.sampled_from([WIDTH, WIDTH, 1, 0])), role, draw(st.sampled_from([-1, 0, 1])),
                 draw(st.sampled_from([0.0, 0.5, 0.95, -0.25])))
                for _ in range(draw(st.integers(1, 4)))
            ]
            out.append((g, steps))
    return out


def row_per_step(trajs, order=None, relabel=lambda kind, x: x):
    rows = [(g, t, s, *step) for t, (g, steps) in enumerate(trajs) for s, step in enumerate(steps)]
    order = range(len(rows)) if order is None else order
    rows = [rows[i] for i in order]
    mask = torch.zeros(len(rows), WIDTH)
    for i, row in enumerate(rows):
        mask[i, : row[6]] = 1
    return dict(
        rewards=torch.tensor([r[5] for r in rows]),
        group=[relabel("group", r[0]) for r in rows],
        traj=[relabel("traj", r[1]) for r in rows],
        step_index=torch.tensor([r[2] for r in rows]),
        step_rewards=torch.tensor([r[3] for r in rows]),
        anchor=[relabel("anchor", r[4]) for r in rows],
        agent=[relabel("agent", r[7]) for r in rows],
        step_labels=torch.tensor([r[8] for r in rows]),
        step_values=torch.tensor([r[9] for r in rows]),
        prompt_values=torch.tensor([prompt_value(trajs[r[1]][1]) for r in rows]),
        logprobs=logprobs_like(mask, WIDTH),
        mask=mask,
    )


def row_per_trajectory(trajs):
    """One row per trajectory: each step's tokens, then an observation token (mask 0, in no step)."""
    length = max(len(steps) for _, steps in trajs) * (WIDTH + 1)
    turn_ids, mask = torch.full((len(trajs), length), -1), torch.zeros(len(trajs), length)
    for row, (_, steps) in enumerate(trajs):
        for s, step in enumerate(steps):
            start = s * (WIDTH + 1)
            turn_ids[row, start : start + WIDTH] = s
            mask[row, start : start + step[3]] = 1
    return dict(
        rewards=torch.tensor([steps[0][2] for _, steps in trajs]),
        group=[g for g, _ in trajs],
        mask=mask,
        turn_ids=turn_ids,
        step_rewards=[[step[0] for step in steps] for _, steps in trajs],
        anchor=[[step[1] for step in steps] for _, steps in trajs],
        agent=[steps[0][4] for _, steps in trajs],
        step_labels=[[step[5] for step in steps] for _, steps in trajs],
        step_values=[[step[6] for step in steps] for _, steps in trajs],
        prompt_values=torch.tensor([prompt_value(steps) for _, steps in trajs]),
        logprobs=logprobs_like(mask, WIDTH + 1),
    )


def run(name, params, fields):
    return canonrl.advantages(name, **params, **fields)



parametrize = pytest.mark.parametrize("name", STEP_ESTIMATORS)


@parametrize
@settings(max_examples=examples(25), **SETTINGS)
@given(trajs=trajectories(), data=st.data())
def test_row_permutation_and_relabelling(name, trajs, data):
    base = row_per_step(trajs)
    n = len(base["rewards"])
    order = data.draw(st.permutations(range(n)))
    renamed = row_per_step(trajs, order, relabel=lambda kind, x: (kind, str(x)[::-1], "renamed"))
    for params in variants(name):
        expected = run(name, params, base)
        assert torch.isfinite(expected).all()
        assert (expected[base["mask"] == 0] == 0).all()
        assert torch.allclose(run(name, params, renamed), expected[list(order)], atol=1e-5), params


@parametrize
@settings(max_examples=examples(20), **SETTINGS)
@given(trajs=trajectories())
def test_groups_are_independent(name, trajs):
    full = row_per_step(trajs)
    groups = torch.tensor(full["group"])
    for params in variants(name):
        if not canonrl.get_estimator(name, **params).group_local:
            continue
        expected = run(name, params, full)
        for g in groups.unique().tolist():
            alone = row_per_step([t for t in trajs if t[0] == g])
            assert torch.allclose(run(name, params, alone), expected[groups == g], atol=1e-5), (g, params)


def test_declared_locality_matches_a_witness():
    """A step estimator declared batch-level must let other groups move a group's advantages (each declaration with
    a reason is needed); one declared group-local is checked on random batches below."""
    trajs = [(0, [(1.0, 0, 1.0, WIDTH, "attacker", 1, 0.5), (0.0, 1, 1.0, WIDTH, "defender", -1, 0.95)]),
             (0, [(0.0, 0, 0.0, WIDTH, "defender", 0, 0.0), (1.0, 2, 0.0, WIDTH, "attacker", 1, -0.25)]),
             (1, [(0.25, 0, 1.0, WIDTH, "attacker", -1, 0.5), (1.0, 1, 1.0, WIDTH, "defender", 1, 0.0)]),
             (1, [(0.0, 0, 0.0, WIDTH, "defender", 0, 0.95), (-1.0, 1, 0.0, WIDTH, "attacker", 1, 0.5)])]  # fmt: skip
    scaled = [(g, [(5.0 * r + 1.0, *rest) for r, *rest in steps]) if g else (g, steps) for g, steps in trajs]
    first = torch.tensor(row_per_step(trajs)["group"]) == 0
    alone = row_per_step(trajs[:2])  # group 0 without group 1
    declared = 0
    for name in STEP_ESTIMATORS:
        for params in [*variants(name), *BATCH_LEVEL_VARIANTS.get(name, [])]:
            estimator = canonrl.get_estimator(name, **params)
            reason = estimator.batch_level_reason
            assert estimator.group_local == (reason is None) and (reason is None or reason), (name, params)
            if reason is None:
                continue
            declared += 1
            full = run(name, params, row_per_step(trajs))[first]
            witnesses = (run(name, params, alone), run(name, params, row_per_step(scaled))[first])
            moved = any(not torch.allclose(full, other, atol=1e-5) for other in witnesses)
            assert moved, f"{name} {params} is declared batch-level ({reason}), but no other group moves group 0"
    assert declared >= len(BATCH_LEVEL_VARIANTS)


@parametrize
@settings(max_examples=examples(20), **SETTINGS)
@given(trajs=trajectories(), data=st.data())
def test_duplicated_steps_count_once_and_padding_rows_take_no_part(name, trajs, data):
    base = row_per_step(trajs)
    n = len(base["rewards"])
    copies = data.draw(st.lists(st.integers(0, n - 1), max_size=4))
    extended = {k: (v + [v[i] for i in copies] if isinstance(v, list) else torch.cat([v, v[copies]])) for k, v in base.items()}
    # a padding row whose ids and rewards would change every statistic if it counted
    for key, value in dict(rewards=9.0, group=0, traj=0, step_index=-1, step_rewards=5.0, anchor=0, agent="attacker",
                       step_labels=1, step_values=5.0, prompt_values=7.0).items():
        extended[key] = extended[key] + [value] if isinstance(extended[key], list) else torch.cat(
            [extended[key], torch.tensor([value], dtype=extended[key].dtype)]
        )
    extended["mask"] = torch.cat([extended["mask"], torch.ones(1, WIDTH)])
    extended["logprobs"] = torch.cat([extended["logprobs"], logprobs_like(torch.ones(1, WIDTH), WIDTH)])
    for params in variants(name):
        expected = run(name, params, base)
        out = run(name, params, extended)
        assert torch.allclose(out[:n], expected, atol=1e-5), params
        assert torch.allclose(out[n:-1], expected[copies], atol=1e-5)
        assert (out[-1] == 0).all()


@parametrize
@settings(max_examples=examples(20), **SETTINGS)
@given(trajs=trajectories())
def test_both_layouts_give_the_same_step_advantages(name, trajs):
    by_step, by_trajectory = row_per_step(trajs), row_per_trajectory(trajs)
    for params in variants(name):
        if LAYOUT_DEPENDENT.get(name, lambda _: False)(params):
            continue
        steps = row_values(run(name, params, by_step))
        dialogue = run(name, params, by_trajectory)
        starts = torch.arange(0, by_trajectory["mask"].shape[1], WIDTH + 1)
        first_tokens = dialogue[:, starts]  # each step's first token (0 where the step has no mask token)
        flat = torch.cat([first_tokens[t, : len(s)] for t, (_, s) in enumerate(trajs)])
        assert torch.allclose(flat, steps, atol=1e-5), params

