"""lab-calc: the lab chains with a calculator tool — step semantics, deterministic tool noise, the lab task's
splits, the expert, observations in lab-tiny's vocabulary, and episodes played by the shipped lab-tiny."""

from __future__ import annotations

import pytest
import torch

from canonrl.lab.tasks import get_task
from canonrl.lab.tasks.base import Problem
from canonrl.lab.tasks.calc import CalcState, CalcTask
from canonrl.lab.tasks.environment import Environment
from canonrl.lab.tasks.lab import LabTask, build_tokenizer, chain_value

CHAIN = Problem("7+5-3+8?", "17", {"operands": [7, 5, 3, 8], "ops": ["+", "-", "+"]})


def _play(task: CalcTask, problem: Problem, actions):
    state = task.reset(problem)
    out = []
    for action in actions:
        step = task.step(state, action)
        out.append(step)
        state = step.state
    return state, out


def test_protocol_and_registry():
    task = CalcTask()
    assert isinstance(task, Environment)
    assert isinstance(get_task("calc"), CalcTask)
    assert (task.name, task.multi_turn, task.players, task.components) == ("calc", True, 1, ("success",))
    assert (task.max_action_tokens, task.max_turns, task.policy, task.cheap) == (8, 12, "lab-tiny", True)
    assert get_task("calc", tool_noise=0.0).tool_noise == 0.0


@pytest.mark.parametrize(
    "options",
    [{"tool_noise": -0.1}, {"tool_noise": 1.5}, {"max_turns": 1}, {"match_reward": -1.0}, {"invalid_penalty": -1.0},
     {"min_operands": 1}, {"heldout_buckets": 1}],
)  # fmt: skip
def test_options_validated(options):
    with pytest.raises(ValueError):
        CalcTask(**options)


def test_step_semantics_by_hand():
    task = CalcTask(tool_noise=0.0)
    state = task.reset(CHAIN)
    assert (state.step, state.total, state.turns, task.render(state)) == (0, 7, 0, "")
    assert task.anchor(state) == (0, 7)
    assert task.expert_action(state) == "7+5="
    final, steps = _play(task, CHAIN, ["7+5=", "12-3=", "9+8=", "ans=17"])
    assert [task.render(s.state) for s in steps] == ["12;", "9;", "17;", ""]
    assert [s.reward for s in steps] == [0.1] * 4
    assert [s.done for s in steps] == [False, False, False, True]
    assert all(s.valid for s in steps)
    assert [task.anchor(s.state) for s in steps[:3]] == [(1, 12), (2, 9), (3, 17)]
    assert task.outcome(final) == 1.0 and final.answer == 17 and final.done
    # a done episode stays done
    assert task.step(final, "7+5=").state == final

    wrong, steps = _play(task, CHAIN, ["7+5=", "12-3=", "9+8=", "ans=16"])
    assert task.outcome(wrong) == 0.0 and steps[-1].reward == 0.0 and steps[-1].done
    early, steps = _play(task, CHAIN, ["ans=17"])  # the right value without working: outcome 1, no match reward
    assert task.outcome(early) == 1.0 and steps[0].reward == 0.0


def test_calculator_computes_what_it_is_asked():
    task = CalcTask(tool_noise=0.0)
    # a wrong left number: the tool computes it; the chain advances (operator and operand match), no match reward
    state, steps = _play(task, CHAIN, ["7+5=", "13-3="])
    assert task.render(state) == "10;" and (state.step, state.total) == (2, 10)
    assert [s.reward for s in steps] == [0.1, 0.0]
    # an off-chain operation: computed, shown, the chain position and total unchanged
    state, steps = _play(task, CHAIN, ["7+6="])
    assert task.render(state) == "13;" and (state.step, state.total) == (0, 7) and steps[0].valid
    assert steps[0].reward == 0.0


def test_invalid_moves_and_wait():
    task = CalcTask(tool_noise=0.0)
    for text in ("7+", "hello", "7*5=", "ans=", "12;", "", "ans=-3", "wait"):
        step = task.step(task.reset(CHAIN), text)
        assert not step.valid and step.reward == pytest.approx(-0.1) and not step.done
        assert task.render(step.state) == ";" and (step.state.step, step.state.turns) == (0, 1)
    state, steps = _play(task, CHAIN, ["7+5=", "12-3=", "wait;", "7+5="])
    assert steps[2].valid and steps[2].reward == 0.0 and task.render(steps[2].state) == ""
    assert task.anchor(steps[2].state) == (0, 7)
    assert (state.step, state.total, steps[3].reward) == (1, 12, 0.1)
    assert task.step(task.reset(CHAIN), "  7+5=  ").valid  # surrounding whitespace ignored


def test_max_turns_ends_with_outcome_zero():
    task = CalcTask(tool_noise=0.0, max_turns=3)
    state, steps = _play(task, CHAIN, ["7+5=", "wait;", "7+5="])
    assert [s.done for s in steps] == [False, False, True]
    assert state.done and task.outcome(state) == 0.0
    state, steps = _play(task, CHAIN, ["x", "x", "x"])
    assert steps[-1].done and task.outcome(state) == 0.0


def test_action_ended():
    task = CalcTask()
    assert task.action_ended("7+5=") and task.action_ended("wait;") and task.action_ended("12;")
    assert not task.action_ended("7+5") and not task.action_ended("ans=") and not task.action_ended("ans=1")
    assert not task.action_ended("wait") and not task.action_ended("")


def test_tool_noise_deterministic_and_at_rate():
    problems = LabTask().problems("train", 1500, seed=0)
    noisy, exact = CalcTask(tool_noise=0.2), CalcTask(tool_noise=0.0)
    crossing = slips = 0
    for problem in problems:
        for turn, (op, x) in enumerate(zip(problem.meta["ops"], problem.meta["operands"][1:])):
            a = chain_value(problem.meta["operands"][: turn + 1], problem.meta["ops"][:turn])
            result = noisy.calculate(problem.prompt, turn, a, op, x)
            assert result == noisy.calculate(problem.prompt, turn, a, op, x)  # deterministic
            truth = exact.calculate(problem.prompt, turn, a, op, x)
            if truth // 10 == a // 10:
                assert result == truth  # no ten crossed: never a slip
                continue
            crossing += 1
            if result != truth:
                slips += 1
                assert result == truth + (-10 if op == "+" else 10)
    assert crossing > 1000
    assert slips / crossing == pytest.approx(0.2, abs=0.03)
    # replays are exact: the same actions give the same observations
    actions = ["7+5=", "12-3=", "9+8=", "wait;", "7+5=", "12-3=", "9+8="]
    first = [noisy.render(s.state) for s in _play(noisy, CHAIN, actions)[1]]
    assert first == [noisy.render(s.state) for s in _play(noisy, CHAIN, actions)[1]]
    assert all(CalcTask(tool_noise=1.0).calculate("p", t, 7, "+", 5) == 2 for t in range(5))


def test_splits_are_the_lab_tasks():
    task, lab = CalcTask(), LabTask()
    for split in ("train", "heldout"):
        assert task.problems(split, 200, seed=3) == lab.problems(split, 200, seed=3)
    assert task.in_split("7+5-3+8?", "heldout") == lab.in_split("7+5-3+8?", "heldout")


def test_expert_episodes_succeed_and_observations_tokenize():
    task = CalcTask(tool_noise=0.2)
    tokenizer = build_tokenizer()
    unk = tokenizer.unk_token_id
    observations = {";", ""}
    for problem in task.problems("heldout", 200, seed=0):
        actions = task.solve(problem)
        state, steps = _play(task, problem, actions)
        assert actions[-1] == f"ans={problem.answer}" and len(actions) == len(problem.meta["ops"]) + 1
        assert task.outcome(state) == 1.0 and all(s.reward == pytest.approx(0.1) for s in steps)
        observations |= {task.render(s.state) for s in steps}
        for text in (problem.prompt, *actions):
            assert unk not in tokenizer(text, add_special_tokens=False).input_ids
    observations.add(task.render(_play(task, CHAIN, ["3-5="])[0]))  # a negative result: "-2;"
    assert "-2;" in observations
    for text in observations:
        assert unk not in tokenizer(text, add_special_tokens=False).input_ids


def test_state_is_frozen():
    state = CalcTask().reset(CHAIN)
    assert isinstance(state, CalcState)
    with pytest.raises(AttributeError):
        state.step = 1


def test_lab_tiny_plays_it():
    from canonrl.lab.multi_turn import run_episodes
    from canonrl.lab.policy import load_policy

    task = CalcTask(tool_noise=0.2)
    problems = task.problems("heldout", 16, seed=0)
    rollouts, verdict = run_episodes(
        load_policy("lab-tiny"), task, problems, repeats=4, generator=torch.Generator().manual_seed(0)
    )
    success = sum(verdict.scores) / len(verdict.scores)
    assert len(verdict.scores) == 64 and verdict.failures == 0
    assert 0.5 < success < 1.0  # the format is lab-tiny's own; tool slips leave some episodes wrong
    assert float(rollouts.turns.invalid.float().mean()) < 0.5
    assert all(len(r) >= 2 for r in rollouts.turns.step_rewards)
