"""MatchTIR and MARS on hand-computed batches, their edge cases (constant groups, singletons, a row without mask
tokens, a (tag, player) with a single turn end), and parity with the official code transcribed as oracles
(tests/official_matchtir.py, tests/official_mars.py) on random batches built in the official layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import canonrl
import official_mars
import official_matchtir

ATOL = 1e-5
SEEDS = range(6)
EPS = 1e-6


# ======================================================================================================== MatchTIR
# Two prompt groups. Mask runs are the turns; each turn's reward sits on its last token.
#   row 0 (q): mask 1 1 0 1 0 0, rewards 1 at col 1, 0.5 at col 3 -> turns (1, 0.5), score 1.5
#   row 1 (q): mask 1 0 1 1 0 0, rewards 0 at col 0, 1 at col 3   -> turns (0, 1),   score 1
#   row 2 (q): mask 1 1 1 0 0 0, reward 0.5 at col 2              -> turn (0.5),     score 0.5
#   row 3 (z): mask 0 1 1 0 1 0, rewards 1 at col 2, 1 at col 4   -> turns (1, 1),   score 2
MT_MASK = torch.tensor([[1, 1, 0, 1, 0, 0], [1, 0, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [0, 1, 1, 0, 1, 0]]).float()
MT_REWARDS = torch.zeros(4, 6)
MT_REWARDS[0, 1], MT_REWARDS[0, 3], MT_REWARDS[1, 3], MT_REWARDS[2, 2], MT_REWARDS[3, 2], MT_REWARDS[3, 4] = (
    1.0, 0.5, 1.0, 0.5, 1.0, 1.0)
MT_GROUP = ["q", "q", "q", "z"]


def matchtir_by_hand() -> torch.Tensor:
    # trajectory part, group q: scores 1.5, 1, 0.5: mean 1, unbiased std 0.5 -> 1, 0, -1; z alone: 2 / (1 + eps)
    traj = [0.5 / (0.5 + EPS), 0.0, -0.5 / (0.5 + EPS), 2 / (1 + EPS)]
    # gamma 0.5 returns: row 0 (1 + 0.5 * 0.5, 0.5) = (1.25, 0.5); row 1 (0 + 0.5 * 1, 1) = (0.5, 1); row 2 (0.5);
    # row 3 (1.5, 1). Position 0 in q: 1.25, 0.5, 0.5: mean 0.75, std sqrt(0.1875) -> 2/sqrt3, -1/sqrt3, -1/sqrt3
    # position 1 in q: 0.5, 1: mean 0.75, std sqrt(0.125) -> -1/sqrt2, 1/sqrt2; z: alone -> G / (1 + eps)
    s0, s1 = 0.1875**0.5 + EPS, 0.125**0.5 + EPS
    t00, t01 = 0.5 / s0, -0.25 / s1
    t10, t11 = -0.25 / s0, 0.25 / s1
    t20 = -0.25 / s0
    t30, t31 = 1.5 / (1 + EPS), 1.0 / (1 + EPS)
    a = [[(traj[0] + t00) / 2, (traj[0] + t01) / 2], [(traj[1] + t10) / 2, (traj[1] + t11) / 2],
         [(traj[2] + t20) / 2], [(traj[3] + t30) / 2, (traj[3] + t31) / 2]]
    return torch.tensor([
        [a[0][0], a[0][0], 0, a[0][1], 0, 0],
        [a[1][0], 0, a[1][1], a[1][1], 0, 0],
        [a[2][0]] * 3 + [0, 0, 0],
        [0, a[3][0], a[3][0], 0, a[3][1], 0],
    ])


def test_matchtir_by_hand():
    expected = matchtir_by_hand()
    # values: (1 + 2/sqrt3) / 2 = 1.0774, (1 - 1/sqrt2) / 2 = 0.1464, -1/(2 sqrt3) = -0.2887, ...
    assert torch.allclose(expected[0, 0], torch.tensor(1.07735), atol=1e-4)
    out = canonrl.advantages("matchtir", gamma=0.5, token_rewards=MT_REWARDS, mask=MT_MASK, group=MT_GROUP)
    assert out.dtype == torch.float32 and torch.allclose(out, expected, atol=ATOL)
    assert (out[MT_MASK == 0] == 0).all()
    upstream = canonrl.advantages("matchtir", gamma=0.5, numerics="upstream", token_rewards=MT_REWARDS, mask=MT_MASK,
                                  group=MT_GROUP)
    assert torch.allclose(upstream, expected, atol=ATOL)


def test_matchtir_step_rewards_and_explicit_turn_ids_give_the_same():
    turn_ids = torch.tensor(
        [[0, 0, -1, 1, -1, -1], [0, -1, 1, 1, -1, -1], [0, 0, 0, -1, -1, -1], [-1, 0, 0, -1, 1, -1]]
    )
    out = canonrl.advantages(
        "matchtir", gamma=0.5, rewards=torch.tensor([1.5, 1.0, 0.5, 2.0]), mask=MT_MASK, group=MT_GROUP,
        turn_ids=turn_ids, step_rewards=[[1.0, 0.5], [0.0, 1.0], [0.5], [1.0, 1.0]],
    )
    assert torch.allclose(out, matchtir_by_hand(), atol=ATOL)


def test_matchtir_needs_turn_rewards_and_a_positive_eps():
    with pytest.raises(ValueError, match="token_rewards .* or step_rewards"):
        canonrl.advantages("matchtir", rewards=torch.ones(4), mask=MT_MASK, group=MT_GROUP)
    with pytest.raises(ValueError, match="eps must lie in"):
        canonrl.get_estimator("matchtir", eps=0.0)


def test_matchtir_constant_groups_are_exactly_zero():
    # seven trajectories with the same turns and turn rewards (0.3, 0, 1): every statistic is over equal values;
    # the official float32 code gives |A| ~ 0.08 here (0.9-discounted returns, a torch.mean off by one ulp)
    n, mask, rewards = 7, torch.tensor([[1.0, 0, 1, 0, 1, 0]]).repeat(7, 1), torch.zeros(7, 6)
    rewards[:, 0], rewards[:, 4] = 0.3, 1.0
    group = np.zeros(n, dtype=object)
    expected, _ = official_matchtir.matchtir_advantage(rewards.clone(), mask, group)
    assert expected.abs().max() > 0.05
    assert (canonrl.advantages("matchtir", token_rewards=rewards, mask=mask, group=list(group)) == 0).all()
    upstream = canonrl.advantages("matchtir", numerics="upstream", token_rewards=rewards, mask=mask, group=list(group))
    assert torch.equal(upstream, expected)


def test_matchtir_singleton_and_a_row_without_mask_tokens():
    # a group of one row: (s + G_t) / (2 (1 + eps)); gamma 0.9: turns (1, 2) -> G = (1 + 1.8, 2), s = 3
    mask, rewards = torch.tensor([[1.0, 0, 1, 0]]), torch.tensor([[1.0, 0, 2, 0]])
    out = canonrl.advantages("matchtir", token_rewards=rewards, mask=mask, group=[0])
    assert torch.allclose(out, torch.tensor([[5.8, 0, 5.0, 0]]) / (2 * (1 + EPS)), atol=ATOL)
    # a row without mask tokens (the official code crashes on it) gets 0 and changes nothing else
    full_mask = torch.cat([MT_MASK, torch.zeros(1, 6)])
    full_rewards = torch.cat([MT_REWARDS, torch.tensor([[0, 0, 7.0, 0, 0, 0]])])
    out = canonrl.advantages("matchtir", gamma=0.5, token_rewards=full_rewards, mask=full_mask, group=MT_GROUP + ["q"])
    assert torch.allclose(out[:4], matchtir_by_hand(), atol=ATOL) and (out[4] == 0).all()
    # a batch without any mask token
    empty = canonrl.advantages("matchtir", token_rewards=full_rewards, mask=torch.zeros(5, 6), group=MT_GROUP + ["q"])
    assert empty.shape == (5, 6) and (empty == 0).all()


def test_matchtir_row_per_step_batch_gives_the_same_turn_advantages():
    # each turn its own row (traj, step_index): the rows are the turns, the trajectory score is on every row
    out = canonrl.advantages(
        "matchtir", gamma=0.5, rewards=torch.tensor([1.5, 1.5, 1.0, 1.0, 0.5, 2.0, 2.0]), mask=torch.ones(7, 2),
        group=["q", "q", "q", "q", "q", "z", "z"], traj=[0, 0, 1, 1, 2, 3, 3],
        step_index=torch.tensor([0, 1, 0, 1, 0, 0, 1]),
        step_rewards=torch.tensor([1.0, 0.5, 0.0, 1.0, 0.5, 1.0, 1.0]),
    )
    by_hand = matchtir_by_hand()
    expected = by_hand[[0, 0, 1, 1, 2, 3, 3], [0, 3, 0, 2, 0, 1, 4]]
    assert torch.allclose(out[:, 0], expected, atol=ATOL) and torch.allclose(out[:, 1], expected, atol=ATOL)


def matchtir_batch(seed: int, *, discrete: bool, rows: int = 14, width: int = 30):
    """The official layout: one row per dialogue, turns = runs of mask 1, each turn's reward on its last token."""
    rng = np.random.default_rng(seed)
    mask, rewards = torch.zeros(rows, width), torch.zeros(rows, width)
    uid = np.array([f"u{min(i // 4, 3)}" for i in range(rows)], dtype=object)  # groups of 4, 4, 4 and 2
    for i in range(rows):
        t = int(rng.integers(0, 3))
        for _ in range(int(rng.integers(1, 5))):
            length = int(rng.integers(1, 4))
            if t + length > width:
                break
            mask[i, t : t + length] = 1
            rewards[i, t + length - 1] = float(rng.choice([0.0, 0.5, 1.0])) if discrete else float(rng.normal())
            t += length + int(rng.integers(1, 3))
    return rewards, mask, uid


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("discrete", [False, True])
@pytest.mark.parametrize("gamma", [0.9, 0.6])
def test_matchtir_matches_the_official_code(seed, discrete, gamma):
    rewards, mask, uid = matchtir_batch(seed, discrete=discrete)
    expected, _ = official_matchtir.matchtir_advantage(rewards.clone(), mask, uid, lam=gamma)
    for numerics in ("exact", "upstream"):
        out = canonrl.advantages("matchtir", gamma=gamma, numerics=numerics, token_rewards=rewards, mask=mask,
                                 group=list(uid))
        assert torch.allclose(out, expected, atol=ATOL), numerics


# ============================================================================================================ MARS
# One tag "t", two games; rows are (game, player). turn_ids mark the turns; columns after a row's last turn end are
# its padding.
#   row 0 (p0): turns at cols [0, 1] and [3], scores 1, 0.5; cols 4-5 after its last turn end
#   row 1 (p1): turns at cols [1] and [3, 4, 5], scores 2, 0; its last turn ends at the last column
#   row 2 (p0): one turn at cols [0, 1, 2], score 3; cols 3-5 after it
#   row 3 (p1): one turn at cols [2, 3, 4, 5], score 1; ends at the last column
MARS_TURNS = torch.tensor([[0, 0, -1, 1, -1, -1], [-1, 0, -1, 1, 1, 1], [0, 0, 0, -1, -1, -1], [-1, -1, 0, 0, 0, 0]])
MARS_FIELDS = dict(
    rewards=torch.zeros(4), group=["t"] * 4, mask=(MARS_TURNS >= 0).float(), turn_ids=MARS_TURNS,
    step_rewards=[[1.0, 0.5], [2.0, 0.0], [3.0], [1.0]], agent=["p0", "p1", "p0", "p1"],
)
# centring per (t, player): p0 mean 1.5 -> (-0.5, -1), (1.5); p1 mean 1 -> (1, -1), (0)
# returns (gamma 1): row 0 (-1.5, -1), row 1 (0, -1), row 2 (1.5), row 3 (0)
MARS_RETURNS = [[-1.5, -1.0], [0.0, -1.0], [1.5], [0.0]]
# distinct values: p0 {-1.5, -1, 1.5} + 0 (rows 0 and 2 end before the last column) -> mean -0.25;
# p1 {0, -1} (0 twice, no padding) -> mean -0.5
MARS_CENTRED = [[-1.25, -0.75], [0.5, -0.5], [1.75], [0.5]]
MARS_TOKENS = [[2, 1], [1, 3], [3], [4]]


def spread(per_turn: list[list[float]]) -> torch.Tensor:
    out = torch.zeros(MARS_TURNS.shape)
    for row, values in enumerate(per_turn):
        for turn, value in enumerate(values):
            out[row][MARS_TURNS[row] == turn] = value
    return out


def whitened(per_turn: list[list[float]]) -> list[list[float]]:
    # token-weighted mean, unbiased token variance, rsqrt(var + 1e-8)
    flat = [(v, n) for values, counts in zip(per_turn, MARS_TOKENS) for v, n in zip(values, counts)]
    total = sum(n for _, n in flat)
    mean = sum(v * n for v, n in flat) / total
    var = sum(n * (v - mean) ** 2 for v, n in flat) / (total - 1)
    return [[(v - mean) / (var + 1e-8) ** 0.5 for v in values] for values in per_turn]


def test_mars_by_hand():
    estimator = canonrl.get_estimator("mars", whiten_advantages=False)
    adv, ret = estimator.compute_with_returns(**MARS_FIELDS)
    assert torch.allclose(adv, spread(MARS_CENTRED), atol=ATOL) and torch.allclose(ret, spread(MARS_RETURNS))
    # whitened (the default): 14 tokens, mean 3/14
    out = canonrl.advantages("mars", **MARS_FIELDS)
    assert out.dtype == torch.float32 and torch.allclose(out, spread(whitened(MARS_CENTRED)), atol=ATOL)
    # no distinct-value step: the returns whitened
    plain = canonrl.advantages("mars", advantage_norm="none", **MARS_FIELDS)
    assert torch.allclose(plain, spread(whitened(MARS_RETURNS)), atol=ATOL)
    # mean_std: p0's distinct values {-1.5, -1, 0, 1.5} have std sqrt(1.75); p1's {0, -1} std sqrt(0.5)
    std = canonrl.get_estimator("mars", advantage_norm="mean_std", whiten_advantages=False)(**MARS_FIELDS)
    s0, s1 = 1.75**0.5 + EPS, 0.5**0.5 + EPS
    expected = [[-1.25 / s0, -0.75 / s0], [0.5 / s1, -0.5 / s1], [1.75 / s0], [0.5 / s1]]
    assert torch.allclose(std, spread(expected), atol=ATOL)


def test_mars_token_rewards_and_mask_runs_give_the_same():
    fields = {k: v for k, v in MARS_FIELDS.items() if k not in ("step_rewards", "turn_ids", "rewards")}
    token_rewards = torch.zeros(4, 6)
    for row, col, score in [(0, 1, 1.0), (0, 3, 0.5), (1, 1, 2.0), (1, 5, 0.0), (2, 2, 3.0), (3, 5, 1.0)]:
        token_rewards[row, col] = score  # each turn's score on its last token; the mask runs are the turns
    out = canonrl.get_estimator("mars", whiten_advantages=False)(token_rewards=token_rewards, **fields)
    assert torch.allclose(out, spread(MARS_CENTRED), atol=ATOL)


def test_mars_distinct_values_are_per_player_across_tags():
    # a second tag "u" where p0 plays once, one turn: its (tag, player) has a single turn end (the official code
    # raises): centred to 0, return 0 -- a value p0's set already has, so tag t's rows do not move
    fields = {k: (v + [v[0]] if isinstance(v, list) else torch.cat([v, v[:1]])) for k, v in MARS_FIELDS.items()}
    fields["group"][-1], fields["agent"][-1], fields["step_rewards"][-1] = "u", "p0", [5.0]
    fields["turn_ids"][-1] = torch.tensor([0, 0, -1, -1, -1, -1])
    fields["mask"][-1] = torch.tensor([1.0, 1, 0, 0, 0, 0])
    out = canonrl.get_estimator("mars", whiten_advantages=False)(**fields)
    assert torch.allclose(out[:4], spread(MARS_CENTRED), atol=ATOL)
    assert torch.allclose(out[4, :2], torch.tensor([0.25, 0.25]), atol=ATOL)  # 0 - (-0.25)
    # p1 in tag u with two turns (2, 0): centred (1, -1), returns (0, -1), a padding 0: p1's set stays {0, -1}
    fields["agent"][-1], fields["step_rewards"][-1] = "p1", [2.0, 0.0]
    fields["turn_ids"][-1] = torch.tensor([0, 0, -1, 1, -1, -1])
    fields["mask"][-1] = torch.tensor([1.0, 1, 0, 1, 0, 0])
    out = canonrl.get_estimator("mars", whiten_advantages=False)(**fields)
    assert torch.allclose(out[:4], spread(MARS_CENTRED), atol=ATOL)
    assert torch.allclose(out[4, [0, 1, 3]], torch.tensor([0.5, 0.5, -0.5]), atol=ATOL)
    # scores (4, 0): centred (2, -2), returns (0, -2): p1's set {0, -1, -2}, mean -1 -- tag t's p1 rows move
    fields["step_rewards"][-1] = [4.0, 0.0]
    out = canonrl.get_estimator("mars", whiten_advantages=False)(**fields)
    assert torch.allclose(out[1], spread([[], [1.0, 0.0], [], []])[1], atol=ATOL)
    assert torch.allclose(out[3], spread([[], [], [], [1.0]])[3], atol=ATOL)


def test_mars_edge_cases_give_exact_zeros():
    # every (tag, player) holds equal scores: all centred rewards, returns and advantages are exactly 0
    fields = dict(MARS_FIELDS, step_rewards=[[0.3, 0.3], [0.7, 0.7], [0.3], [0.7]])
    for params in ({}, {"advantage_norm": "mean_std"}, {"whiten_rewards": True}, {"advantage_norm": "none"}):
        out = canonrl.advantages("mars", **params, **fields)
        assert (out == 0).all(), params
    # a single row with a single turn: no baseline, nothing to whiten
    single = dict(rewards=torch.zeros(1), group=["t"], mask=torch.tensor([[1.0, 1, 0]]), agent=["p0"],
                  step_rewards=[[2.0]], turn_ids=torch.tensor([[0, 0, -1]]))
    assert (canonrl.advantages("mars", **single) == 0).all()
    # a row without mask tokens takes no part
    fields = {k: (v + [v[0]] if isinstance(v, list) else torch.cat([v, v[:1]])) for k, v in MARS_FIELDS.items()}
    fields["mask"][-1] = 0
    fields["turn_ids"][-1] = -1
    fields["step_rewards"] = fields["step_rewards"][:4] + [[]]
    out = canonrl.advantages("mars", **fields)
    assert torch.allclose(out[:4], canonrl.advantages("mars", **MARS_FIELDS), atol=ATOL) and (out[4] == 0).all()
    # a batch without any mask token
    empty = canonrl.advantages("mars", token_rewards=torch.ones(2, 3), mask=torch.zeros(2, 3), group=["t", "t"],
                               agent=["p0", "p1"])
    assert empty.shape == (2, 3) and (empty == 0).all()
    # batch-level statistics: groups cannot be split across calls
    assert not canonrl.get_estimator("mars").group_local and canonrl.get_estimator("matchtir").group_local


def test_mars_needs_agent_and_turn_rewards():
    with pytest.raises(ValueError, match="needs 'agent'"):
        canonrl.advantages("mars", **{k: v for k, v in MARS_FIELDS.items() if k != "agent"})
    with pytest.raises(ValueError, match="token_rewards .* or step_rewards"):
        canonrl.advantages("mars", **{k: v for k, v in MARS_FIELDS.items() if k != "step_rewards"})
    with pytest.raises(ValueError, match="advantage_norm"):
        canonrl.get_estimator("mars", advantage_norm="std")


def mars_batch(seed: int, *, scores: str = "normal", games: int = 6, length: int = 40, fill: float = 0.3):
    """The official layout: full-sequence [B, L] tensors (column 0 a prompt token), one row per (game, player),
    players in the ``_p0``/``_p1`` suffix of ``group_ids``, the game type in ``tags``; each assistant turn's score on
    its last token (the turn end). With probability ``fill`` a row's last turn runs to the last column.

    Returns the official arguments and the canonrl fields (response-aligned: column 0 dropped)."""
    rng = np.random.default_rng(seed)
    tag_names = ("tictactoe", "kuhn_poker")
    rows = [(f"{tag_names[g % 2]}_{g}_p{p}", tag_names[g % 2]) for g in range(games) for p in (0, 1)]
    B = len(rows)
    score, end = torch.zeros(B, length), torch.zeros(B, length, dtype=torch.bool)
    mask, turn_ids = torch.zeros(B, length, dtype=torch.bool), torch.full((B, length), -1)
    for i in range(B):
        t, turns = int(rng.integers(1, 4)), []
        for _ in range(int(rng.integers(1, 5))):
            n = int(rng.integers(1, 5))
            if t + n > length:
                break
            turns.append([t, t + n])
            t += n + int(rng.integers(0, 4))  # observation tokens between turns (sometimes none)
        if rng.random() < fill:
            turns[-1][1] = length
        for k, (start, stop) in enumerate(turns):
            mask[i, start:stop], turn_ids[i, start:stop], end[i, stop - 1] = True, k, True
            score[i, stop - 1] = float(rng.normal()) if scores == "normal" else float(rng.choice([-1.0, 0.0, 0.5, 1.0]))
    group_ids = np.array([r[0] for r in rows], dtype=object)
    tags = np.array([r[1] for r in rows], dtype=object)
    fields = dict(
        token_rewards=score[:, 1:], mask=mask[:, 1:].float(), turn_ids=turn_ids[:, 1:], group=list(tags),
        agent=[g.split("_p")[-1] for g in group_ids],
    )
    return (score, end, mask, group_ids, tags), fields


NORMS = [("mean", True), ("mean", False), ("mean_std", True), ("mean_std", False), ("none", True), ("none", False)]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("scores", ["normal", "discrete"])
@pytest.mark.parametrize("fill", [0.0, 0.4, 1.0])
def test_mars_matches_the_official_code(seed, scores, fill):
    """Normal scores: both numerics. Game scores (-1, 0, 0.5, 1; cell means such as 1/3): the official float32 code
    splits equal returns that round differently into several distinct values; numerics='upstream' follows it."""
    official, fields = mars_batch(seed, scores=scores, fill=fill)
    inside = fields["mask"] > 0
    turn_ids = fields["turn_ids"]
    changes = torch.cat([turn_ids[:, 1:] != turn_ids[:, :-1], torch.ones(len(turn_ids), 1, dtype=torch.bool)], 1)
    last_token = (turn_ids >= 0) & changes  # each turn's last token
    step_rewards = [fields["token_rewards"][i][last_token[i]].tolist() for i in range(len(turn_ids))]
    by_steps = dict(fields, token_rewards=None, rewards=torch.zeros(len(turn_ids)), step_rewards=step_rewards)
    for norm, whiten in NORMS:
        expected, expected_returns = official_mars.mars_advantage(
            *official, whiten_rewards=False, advantage_norm=None if norm == "none" else norm, whiten_advantages=whiten,
        )
        for numerics in ("exact", "upstream") if scores == "normal" else ("upstream",):
            estimator = canonrl.get_estimator("mars", advantage_norm=norm, whiten_advantages=whiten, numerics=numerics)
            adv, ret = estimator.compute_with_returns(**fields)
            assert torch.allclose(adv, expected, atol=ATOL), (norm, whiten, numerics)
            assert torch.allclose(ret[inside], expected_returns[inside], atol=ATOL)
            assert torch.allclose(estimator(**by_steps), expected, atol=ATOL)


def test_mars_exact_numerics_merge_the_returns_the_official_float32_code_splits():
    """Seed 3's game scores: the official distinct values of player 0 hold -1.0000001 and -1.0 (one return of exact
    arithmetic, summed in two orders); numerics='exact' counts it once, and so gets another baseline."""
    official, fields = mars_batch(3, scores="discrete", fill=0.0)
    expected, _ = official_mars.mars_advantage(*official, whiten_rewards=False)
    assert torch.allclose(canonrl.advantages("mars", numerics="upstream", **fields), expected, atol=ATOL)
    assert not torch.allclose(canonrl.advantages("mars", **fields), expected, atol=1e-3)


def noise_free_mars_batch(seed: int, *, length: int = 24):
    """Dyadic scores, centred per (tag, player) to +-{1, 2, 4} exactly, at most two turns per row: every float32
    operation of the official code is exact or correctly rounded from equal exact values, so its distinct-value set
    is the one of exact arithmetic -- also with whiten_rewards=True, whose mean is then exactly 0."""
    rng = np.random.default_rng(seed)
    tag_names = ("tictactoe", "kuhn_poker")
    games, rows, cells = 4, [], {}
    for g in range(games):
        for p in (0, 1):
            rows.append((f"{tag_names[g % 2]}_{g}_p{p}", tag_names[g % 2], p))
    for tag in tag_names:
        for p in (0, 1):  # two rows of two turns per (tag, player): scores offset + (x, -x, y, -y)
            offset = float(rng.choice([0.0, 0.5, -1.0]))
            x, y = rng.choice([1.0, 2.0, 4.0], size=2)
            values = [offset + v for v in (x, -x, y, -y)]
            cells[(tag, p)] = list(rng.permutation(values))
    B = len(rows)
    score, end = torch.zeros(B, length), torch.zeros(B, length, dtype=torch.bool)
    mask, turn_ids = torch.zeros(B, length, dtype=torch.bool), torch.full((B, length), -1)
    for i, (_, tag, p) in enumerate(rows):
        t = int(rng.integers(1, 3))
        for k in range(2):
            n = int(rng.integers(1, 4))
            stop = length if (k == 1 and rng.random() < 0.3) else t + n
            mask[i, t:stop], turn_ids[i, t:stop], end[i, stop - 1] = True, k, True
            score[i, stop - 1] = cells[(tag, p)].pop()
            t = stop + int(rng.integers(1, 3))
    group_ids = np.array([r[0] for r in rows], dtype=object)
    tags = np.array([r[1] for r in rows], dtype=object)
    fields = dict(token_rewards=score[:, 1:], mask=mask[:, 1:].float(), turn_ids=turn_ids[:, 1:], group=list(tags),
                  agent=[g.split("_p")[-1] for g in group_ids])
    return (score, end, mask, group_ids, tags), fields


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("whiten_rewards", [False, True])
def test_mars_matches_the_official_code_without_float_noise(seed, whiten_rewards):
    """Equal returns in several rows (sums of +-1, 2, 4): the distinct values merge them as the official code does;
    with whiten_rewards=True the official mean is exactly 0 here, so canonrl's reading (a rescale) is exact."""
    official, fields = noise_free_mars_batch(seed)
    for norm, whiten in NORMS:
        expected, _ = official_mars.mars_advantage(
            *official, whiten_rewards=whiten_rewards, advantage_norm=None if norm == "none" else norm,
            whiten_advantages=whiten,
        )
        params = dict(advantage_norm=norm, whiten_advantages=whiten, whiten_rewards=whiten_rewards)
        assert torch.allclose(canonrl.advantages("mars", **params, **fields), expected, atol=ATOL), params


def test_mars_whiten_rewards_official_result_is_float_fragile():
    """On random scores the official float32 reward mean is noise (~1e-9, not 0); subtracted from every response
    token it makes each token's return a distinct value and moves the baseline (steps.md §5.2). canonrl reads the
    exact mean, 0: with whiten_rewards=True it equals whiten_rewards=False up to the whitening's 1e-8."""
    moved = 0.0
    for seed in SEEDS:
        official, fields = mars_batch(seed)
        fragile, _ = official_mars.mars_advantage(*official, whiten_rewards=True)
        clean, _ = official_mars.mars_advantage(*official, whiten_rewards=False)
        moved = max(moved, (fragile - clean).abs().max().item())
        ours = canonrl.advantages("mars", whiten_rewards=True, **fields)
        assert torch.allclose(ours, canonrl.advantages("mars", **fields), atol=1e-4)
        assert torch.allclose(ours, clean, atol=1e-4)
    assert moved > 1e-3
