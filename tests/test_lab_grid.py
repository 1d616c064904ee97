"""lab-grid: BFS distances, solvable deterministic mazes on disjoint splits, step semantics, the expert, anchors,
warm-start traces and the grid tokenizer."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from canonrl.lab.tasks import get_task
from canonrl.lab.tasks.base import Problem
from canonrl.lab.tasks.environment import Environment, Transition
from canonrl.lab.tasks.grid import (
    ACTIONS,
    VOCAB,
    GridState,
    GridTask,
    build_tokenizer,
    distances,
    episode_text,
    prompt_text,
    trace,
)

# K . # G
# . . D .      the door (1,2) is the only way to the goal: the key (0,0) is needed
# @ # # #      start (2,0)
MAP = ("K.#G", "..D.", ".###")
START = (2, 0)


def _problem(grid=MAP, start=START, max_turns=12) -> Problem:
    meta = {"grid": grid, "start": start, "goal": (0, 3), "distance": 7, "max_turns": max_turns}
    return Problem(prompt_text(grid, start), "", meta)


@pytest.fixture(scope="module")
def task() -> GridTask:
    return GridTask()


@pytest.fixture(scope="module")
def splits(task) -> dict[str, list[Problem]]:
    return {split: task.problems(split, 500, seed=0) for split in ("train", "heldout")}


def _play(task: GridTask, problem: Problem, actions) -> tuple[GridState, list[Transition]]:
    state = task.reset(problem)
    out = []
    for action in actions:
        step = task.step(state, action)
        out.append(step)
        state = step.state
    return state, out


# ----------------------------------------------------------------------------------------------------------------
# BFS and generation
# ----------------------------------------------------------------------------------------------------------------


def test_bfs_distances_by_hand():
    d = distances(MAP)
    with_key = {(1, 3): 1, (1, 2): 2, (1, 1): 3, (0, 1): 4, (1, 0): 4, (0, 0): 5, (2, 0): 5}
    assert {cell: d[(*cell, True)] for cell in with_key} == with_key
    # without the key: walk to it first
    assert d[(2, 0, False)] == 7 and d[(1, 0, False)] == 6 and d[(0, 1, False)] == 6 and d[(1, 1, False)] == 7
    assert d[(0, 3, False)] == d[(0, 3, True)] == 0
    assert (1, 2, False) not in d  # standing in the door without the key cannot happen
    assert GridTask().distance(GridTask().reset(_problem())) == 7


def test_task_is_an_environment(task):
    assert isinstance(task, Environment)
    assert (task.name, task.multi_turn, task.cheap, task.components) == ("grid", True, True, ("success",))
    assert (task.players, task.max_action_tokens, task.max_turns) == (1, 1, 12)


def test_every_maze_is_solvable_in_range(task, splits):
    problems = splits["train"] + splits["heldout"]
    assert any("D" in p.prompt for p in problems) and any("D" not in p.prompt for p in problems)
    for p in problems:
        grid = p.meta["grid"]
        assert 4 <= len(grid) <= 5 and 4 <= len(grid[0]) <= 5 and all(len(row) == len(grid[0]) for row in grid)
        assert "".join(grid).count("G") == 1 and "".join(grid).count("K") == "".join(grid).count("D") <= 1
        assert set("".join(grid)) <= set("#.GKD")
        d = task.distance(task.reset(p))
        assert 2 <= d <= task.max_turns - 3 and d == p.meta["distance"] == len(p.answer)
        if "D" in p.prompt:  # the door is needed: with it walled off the goal is out of reach
            walled = tuple(row.replace("D", "#") for row in grid)
            assert (*p.meta["start"], True) not in distances(walled)


def test_problems_are_deterministic(task, splits):
    again = GridTask().problems("heldout", 100, seed=0)
    assert [(p.prompt, p.answer, p.meta) for p in again] == [
        (p.prompt, p.answer, p.meta) for p in splits["heldout"][:100]
    ]
    assert [p.prompt for p in task.problems("heldout", 100, seed=1)] != [p.prompt for p in again]


def test_splits_never_overlap(task, splits):
    train = {p.prompt for p in splits["train"]}
    heldout = {p.prompt for p in splits["heldout"]}
    assert len(train) > 400 and len(heldout) > 400 and not train & heldout
    assert all(task.in_split(p, "heldout") for p in heldout) and not any(task.in_split(p, "heldout") for p in train)
    with pytest.raises(ValueError, match="split"):
        task.problems("test", 1, seed=0)


# ----------------------------------------------------------------------------------------------------------------
# steps
# ----------------------------------------------------------------------------------------------------------------


def test_prompt_and_observations():
    task = GridTask()
    problem = _problem()
    assert problem.prompt == "K.#G|..D.|.###@2,0,0;"
    state = task.reset(problem)
    assert state == GridState(MAP, (2, 0), False, 0, False) and task.render(state) == "2,0,0;"
    assert not task.action_ended("") and task.action_ended("u")


def test_moves_bumps_key_door_and_goal():
    task = GridTask()
    problem = _problem()
    state = task.reset(problem)
    # off the map, into a wall: valid, no movement, half the penalty
    for action in ("d", "l", "r"):
        step = task.step(state, action)
        assert step.valid and not step.done and step.reward == pytest.approx(-0.05)
        assert step.state.pos == (2, 0) and step.state.turns == 1
    # a move toward the goal, then the key pickup
    state, (up, key) = _play(task, problem, "uu")
    assert (up.reward, key.reward) == pytest.approx((0.1, 0.1))
    assert state.pos == (0, 0) and state.has_key and task.render(state) == "0,0,1;"
    # the door without the key is a bump; with it, it opens
    no_key, _ = _play(task, problem, "ur")
    bump = task.step(no_key, "r")
    assert no_key.pos == (1, 1) and not no_key.has_key and bump.valid and bump.state.pos == (1, 1)
    assert bump.reward == pytest.approx(-0.05)
    state, steps = _play(task, problem, "uudrrr")
    assert state.pos == (1, 3) and state.has_key and steps[-2].state.pos == (1, 2)
    # a step away from the goal costs progress
    assert task.step(state, "l").reward == pytest.approx(-0.1)
    final = task.step(state, "u")
    assert final.done and final.valid and final.reward == pytest.approx(0.1)
    assert task.outcome(final.state) == 1.0 and task.outcome(state) == 0.0
    assert task.step(final.state, "d").state == final.state  # a finished episode stays put


@pytest.mark.parametrize("text", ["x", "ud", "", "U", "up", "<unk>"])
def test_invalid_text_is_an_invalid_move(text):
    task = GridTask()
    state = task.reset(_problem())
    step = task.step(state, text)
    assert not step.valid and not step.done and step.reward == pytest.approx(-0.1)
    assert step.state == GridState(MAP, (2, 0), False, 1, False)


def test_max_turns_ends_the_episode_with_outcome_zero():
    task = GridTask(max_turns=5)
    state, steps = _play(task, _problem(max_turns=5), ["d", "x", "d", "d", "u"])
    assert [s.done for s in steps] == [False] * 4 + [True]
    assert state.turns == 5 and state.pos == (1, 0) and task.outcome(state) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# expert, anchors, traces
# ----------------------------------------------------------------------------------------------------------------


def test_expert_reaches_the_goal_on_a_shortest_path(task, splits):
    assert task.expert_action(task.reset(_problem())) == "u"
    for p in [_problem()] + splits["heldout"][:200]:
        state = task.reset(p)
        shortest = task.distance(state)
        for _ in range(shortest):
            step = task.step(state, task.expert_action(state))
            assert step.valid and step.reward == pytest.approx(task.progress_reward)
            state = step.state
        assert state.done and task.outcome(state) == 1.0 and state.turns == shortest


def test_anchors_repeat_across_replays(task, splits):
    problem = splits["train"][0]
    actions = [random.Random(3).choice(ACTIONS) for _ in range(12)]
    a, _ = _play(task, problem, actions)
    b, _ = _play(task, problem, actions)
    assert task.anchor(a) == task.anchor(b) and a == b
    assert task.anchor(task.reset(_problem())) == (2, 0, False)
    states = [task.reset(_problem())] + [s.state for s in _play(task, _problem(), "uddu")[1]]
    assert task.anchor(states[0]) == task.anchor(states[2]) == task.anchor(states[3])  # back at the start


def test_noiseless_trace_is_optimal_and_noisy_ones_replay(task, splits):
    for p in splits["heldout"][:100]:
        actions = trace(p, random.Random(0), noise=0.0)
        assert "".join(actions) == p.answer and len(actions) == p.meta["distance"]
    rng = random.Random(1)
    for p in splits["train"][:100]:
        actions = trace(p, rng, noise=0.5)
        assert 1 <= len(actions) <= task.max_turns and set(actions) <= set(ACTIONS)
        texts, observations = episode_text(p, actions)
        state, steps = _play(task, p, actions)
        assert texts == actions and observations == [task.render(s.state) for s in steps]
        assert state.done and task.outcome(state) == float(state.pos == p.meta["goal"])
        assert task.outcome(state) == 1.0 or len(actions) == task.max_turns
    # a replay stops where the episode ends
    texts, observations = episode_text(_problem(), list("uudrrruu"))
    assert texts == list("uudrrru")
    assert observations == ["1,0,0;", "0,0,1;", "1,0,1;", "1,1,1;", "1,2,1;", "1,3,1;", "0,3,1;"]


# ----------------------------------------------------------------------------------------------------------------
# tokenizer and options
# ----------------------------------------------------------------------------------------------------------------


def test_prompts_and_observations_tokenize_and_decode(task, splits):
    tokenizer = build_tokenizer()
    assert tokenizer.convert_ids_to_tokens(list(range(4))) == ["<pad>", "<s>", "</s>", "<unk>"]
    assert len(tokenizer) == len(VOCAB) and tokenizer.padding_side == "left"
    unk = tokenizer.unk_token_id
    texts = [p.prompt for p in splits["heldout"][:200]]
    for p in splits["heldout"][:50]:
        texts += episode_text(p, trace(p, random.Random(0), noise=0.5))[1]
    texts += list(ACTIONS)
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and unk not in ids and len(ids) == len(text) + 1
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(tokenizer("3,1,0;", add_special_tokens=False)["input_ids"]) == 6


def test_get_task_and_bad_options():
    task = get_task("grid", max_size=6)
    assert isinstance(task, GridTask) and task.max_size == 6
    assert max(len(p.meta["grid"]) for p in task.problems("train", 100, seed=0)) == 6
    for options in (
        {"max_size": 7},
        {"min_size": 5, "max_size": 4},
        {"min_size": 2},
        {"wall_fraction": 0.9},
        {"key_door": 1.5},
        {"max_turns": 4},
        {"heldout_buckets": 1},
        {"progress_reward": -1.0},
        {"invalid_penalty": -0.1},
    ):
        with pytest.raises(ValueError) as error:
            get_task("grid", **options)
        assert "\n" not in str(error.value)


def test_the_solver_gives_state_values_and_step_labels():
    """V* is 1 while the goal is reachable in the turns left; a turn is labelled +1 when it shortens the distance."""
    task = GridTask(max_turns=5)
    problem = task.problems("train", 1, seed=3)[0]
    state = task.reset(problem)
    assert task.state_value(state) == float(task.distance(state) <= 5)
    right = task.step(state, task.expert_action(state)).state
    assert task.step_label(state, right) == 1.0
    wrong_action = next(a for a in "udlr" if task.distance(task.step(state, a).state) >= task.distance(state))
    assert task.step_label(state, task.step(state, wrong_action).state) == -1.0
    late = replace(state, turns=5 - task.distance(state) + 1)  # one turn too few left
    assert task.state_value(late) == 0.0
