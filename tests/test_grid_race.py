"""lab-grid race: simultaneous moves, the opponent token, outcomes (tie, sole winner, timeout), rewards identical to
the single-player grid's, argument checks, the grid vocabulary, replays and the expert."""

from __future__ import annotations

import random

import pytest

from canonrl.lab.tasks.base import Problem
from canonrl.lab.tasks.grid import ACTIONS, VOCAB, GridState, GridTask, build_tokenizer, prompt_text
from canonrl.lab.tasks.grid_race import GridRace, JointTransition, RaceState

# . . G
# . # .      two shortest paths of 4 moves from the start (2,0): up then right, or right then up
# @ . .
OPEN = ("..G", ".#.", "...")
# K . # G
# . . D .    the door (1,2) needs the key (0,0) (the map of test_lab_grid)
# @ # # #
KEYED = ("K.#G", "..D.", ".###")
START = (2, 0)


def _problem(grid=OPEN, start=START, max_turns=12) -> Problem:
    meta = {"grid": grid, "start": start, "goal": (0, 2), "distance": 4, "max_turns": max_turns}
    return Problem(prompt_text(grid, start), "", meta)


def _play(race: GridRace, state: RaceState, turns) -> tuple[RaceState, list[JointTransition]]:
    out = []
    for actions in turns:
        step = race.step_joint(state, actions)
        out.append(step)
        state = step.state
    return state, out


@pytest.fixture(scope="module")
def race() -> GridRace:
    return GridRace()


def test_attributes_are_the_grid_tasks():
    race = GridRace(max_turns=7, max_size=4)
    single = GridTask(max_turns=7, max_size=4)
    assert (race.name, race.players) == ("grid-race", 2)
    assert (race.max_turns, race.max_action_tokens, race.components, race.policy) == (
        7, single.max_action_tokens, single.components, single.policy,
    )  # fmt: skip
    assert race.problems("train", 20, seed=3) == single.problems("train", 20, seed=3)
    assert race.problems("heldout", 5, seed=0) == single.problems("heldout", 5, seed=0)
    assert race.action_ended("u") and not race.action_ended("")
    with pytest.raises(ValueError):
        GridRace(max_turns=2)
    with pytest.raises(TypeError):
        GridRace(bogus=1)


def test_reset_starts_both_players_on_the_start(race):
    state = race.reset(_problem())
    start = GridState(OPEN, START)
    assert state == RaceState((start, start), (".", "."), 0)
    assert race.render(state, 0) == race.render(state, 1) == "2,0,0;."
    assert race.anchor(state, 0) == race.anchor(state, 1) == (2, 0, False)
    assert race.outcome(state, 0) == race.outcome(state, 1) == 0.0 and not race.done(state)


def test_moves_are_simultaneous_and_observations_carry_the_opponents_action(race):
    step = race.step_joint(race.reset(_problem()), ["u", "r"])
    assert [p.pos for p in step.state.players] == [(1, 0), (2, 1)]
    assert step.state.last_actions == ("u", "r") and step.state.turn == 1
    assert step.rewards == pytest.approx((0.1, 0.1)) and step.valid == (True, True) and not step.done
    assert race.render(step.state, 0) == "1,0,0;r"
    assert race.render(step.state, 1) == "2,1,0;u"
    assert race.anchor(step.state, 0) == (1, 0, False) and race.anchor(step.state, 1) == (2, 1, False)


def test_invalid_text_shows_a_dot_and_a_bump_shows_its_letter(race):
    step = race.step_joint(race.reset(_problem()), ("x", " l\n"))
    assert step.valid == (False, True)
    assert step.rewards == pytest.approx((-0.1, -0.05))  # invalid text, then a bump off the map
    assert [p.pos for p in step.state.players] == [START, START]
    assert step.state.last_actions == (".", "l")
    assert race.render(step.state, 0) == "2,0,0;l"
    assert race.render(step.state, 1) == "2,0,0;."
    step = race.step_joint(step.state, ("ud", "<unk>"))
    assert step.valid == (False, False) and step.state.last_actions == (".", ".")
    assert race.render(step.state, 0) == race.render(step.state, 1) == "2,0,0;."


def test_both_arriving_on_the_same_turn_share_the_win(race):
    state, steps = _play(race, race.reset(_problem()), [("u", "r"), ("u", "r"), ("r", "u"), ("r", "u")])
    assert [s.done for s in steps] == [False, False, False, True]
    assert [p.pos for p in state.players] == [(0, 2), (0, 2)] and state.turn == 4
    assert race.outcome(state, 0) == race.outcome(state, 1) == 0.5
    assert race.render(state, 0) == "0,2,0;u" and race.render(state, 1) == "0,2,0;r"


def test_a_sole_winner_takes_it_all(race):
    # player 1 walks right, up, then back down on the last turn
    state, steps = _play(race, race.reset(_problem()), [("u", "r"), ("u", "r"), ("r", "u"), ("r", "d")])
    assert steps[-1].done and state.turn == 4
    assert [p.pos for p in state.players] == [(0, 2), (2, 2)]
    assert steps[-1].rewards == pytest.approx((0.1, -0.1))
    assert (race.outcome(state, 0), race.outcome(state, 1)) == (1.0, 0.0)
    # the other player wins while player 0 writes invalid texts
    state, _ = _play(race, race.reset(_problem()), [("x", "u"), ("x", "u"), ("x", "r"), ("x", "r")])
    assert (race.outcome(state, 0), race.outcome(state, 1)) == (0.0, 1.0)


def test_timeout_ends_the_race_with_zero_for_both():
    race = GridRace(max_turns=5)
    state, steps = _play(race, race.reset(_problem(max_turns=5)), [("l", "x")] * 5)
    assert [s.done for s in steps] == [False] * 4 + [True]
    assert state.turn == 5 and race.done(state)
    assert (race.outcome(state, 0), race.outcome(state, 1)) == (0.0, 0.0)
    # a finished race no longer moves
    after = race.step_joint(state, ("u", "r"))
    assert after == JointTransition(state, (0.0, 0.0), (True, True), True)


def test_a_finished_race_no_longer_moves(race):
    state, _ = _play(race, race.reset(_problem()), [("u", "r"), ("u", "r"), ("r", "u"), ("r", "d")])
    assert race.step_joint(state, ("d", "u")) == JointTransition(state, (0.0, 0.0), (True, True), True)


def test_the_key_is_not_consumed():
    race = GridRace()
    state, steps = _play(race, race.reset(_problem(KEYED)), [("u", "u"), ("u", "u")])
    assert [p.has_key for p in state.players] == [True, True]
    assert race.anchor(state, 0) == race.anchor(state, 1) == (0, 0, True)
    assert race.render(state, 0) == "0,0,1;u"
    # through the door, both holding the key: the same single-player rewards
    state, steps = _play(race, state, [("d", "d"), ("r", "r"), ("r", "r")])
    assert [p.pos for p in state.players] == [(1, 2), (1, 2)] and all(s.rewards[0] == s.rewards[1] for s in steps)


@pytest.mark.parametrize("actions", [[], ["u"], ["u", "d", "l"], "ud", "u"])
def test_wrong_number_of_actions_raises(race, actions):
    with pytest.raises(ValueError):
        race.step_joint(race.reset(_problem()), actions)


@pytest.mark.parametrize("player", [-1, 2])
def test_bad_player_raises(race, player):
    state = race.reset(_problem())
    for method in (race.render, race.anchor, race.outcome, race.expert_action):
        with pytest.raises(ValueError):
            method(state, player)


def _random_text(rng: random.Random) -> str:
    return rng.choice([*ACTIONS, *ACTIONS, "x", "", "ud", " r "])


def test_rewards_and_states_are_the_single_player_grids(race):
    single = GridTask()
    rng = random.Random(0)
    for problem in race.problems("train", 40, seed=1):
        state = race.reset(problem)
        alone = [single.reset(problem), single.reset(problem)]
        while not race.done(state):
            actions = (_random_text(rng), _random_text(rng))
            step = race.step_joint(state, actions)
            singles = [single.step(alone[p], actions[p]) for p in range(2)]
            assert step.rewards == tuple(s.reward for s in singles)
            assert step.valid == tuple(s.valid for s in singles)
            assert step.state.players == tuple(s.state for s in singles)
            assert step.done == (any(single.outcome(s.state) for s in singles) or step.state.turn >= race.max_turns)
            for p in range(2):
                assert race.anchor(step.state, p) == single.anchor(singles[p].state)
                assert race.render(step.state, p).startswith(single.render(singles[p].state))
            alone = [s.state for s in singles]
            state = step.state
        assert sum(race.outcome(state, p) for p in range(2)) in (0.0, 1.0)


def test_rendered_texts_use_only_the_grid_vocabulary(race):
    tokenizer = build_tokenizer()
    unk = tokenizer.unk_token_id
    symbols = {token for token in VOCAB if len(token) == 1}
    rng = random.Random(1)
    texts = set()
    for problem in race.problems("heldout", 30, seed=2):
        texts.add(problem.prompt)
        state = race.reset(problem)
        texts.update(race.render(state, p) for p in range(2))
        while not race.done(state):
            state = race.step_joint(state, (_random_text(rng), _random_text(rng))).state
            texts.update(race.render(state, p) for p in range(2))
    assert any(text.endswith(".") for text in texts) and any(text.endswith("u") for text in texts)
    for text in texts:
        assert set(text) <= symbols
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert unk not in ids and len(ids) == len(text)
        assert tokenizer.decode(ids) == text


def test_replays_give_equal_hashable_states(race):
    rng = random.Random(2)
    problem = race.problems("train", 1, seed=5)[0]
    turns = [(_random_text(rng), _random_text(rng)) for _ in range(race.max_turns)]
    first, first_steps = _play(race, race.reset(problem), turns)
    second, second_steps = _play(race, race.reset(problem), turns)
    assert first == second and hash(first) == hash(second) and first_steps == second_steps
    # from a prefix: the same continuation as from the start
    middle = first_steps[2].state
    third, _ = _play(race, middle, turns[3:])
    assert third == first
    assert len({s.state for s in first_steps} | {s.state for s in second_steps}) == len({s.state for s in first_steps})


def test_experts_tie_and_an_expert_beats_a_dawdler(race):
    for problem in race.problems("heldout", 20, seed=4):
        state = race.reset(problem)
        while not race.done(state):
            state = race.step_joint(state, [race.expert_action(state, p) for p in range(2)]).state
        assert state.turn == problem.meta["distance"]
        assert race.outcome(state, 0) == race.outcome(state, 1) == 0.5
        state = race.reset(problem)
        while not race.done(state):
            state = race.step_joint(state, (race.expert_action(state, 0), "x")).state
        assert (race.outcome(state, 0), race.outcome(state, 1)) == (1.0, 0.0)
