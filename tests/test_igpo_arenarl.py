"""IGPO (step estimator) and ArenaRL (rank -> reward map) on hand-computed batches, in both layouts for IGPO, with
the spec's ArenaRL test vectors (token-level.md B6), transcriptions of the official formulas as oracles on random
batches, and the edge cases: singleton and constant groups, zero information gains, one-turn trajectories,
unequal and interleaved groups, bad hyperparameters."""

from __future__ import annotations

import math

import pytest
import torch

import canonrl
from conftest import row_values

ATOL = 1e-5
EPS = 1e-6



def z(x: float, values: list[float]) -> float:
    """IGPO's z-score: population std with 1e-8 inside the root, std 1 for a single value, eps 1e-6."""
    mu = sum(values) / len(values)
    sigma = math.sqrt(sum((v - mu) ** 2 for v in values) / len(values) + 1e-8) if len(values) > 1 else 1.0
    return (x - mu) / (sigma + EPS)


# --------------------------------------------------------------------------------------------------------- IGPO
def dialogues(turns: list[list[int]]):
    """Row-per-trajectory layout: each turn 2 tokens then one observation token (mask 0, in no step); ``turns``
    gives, per row, the mask tokens of each turn (2 or fewer)."""
    width = max(len(t) for t in turns) * 3
    mask, turn_ids = torch.zeros(len(turns), width), torch.full((len(turns), width), -1)
    for row, counts in enumerate(turns):
        for t, count in enumerate(counts):
            turn_ids[row, 3 * t : 3 * t + 2] = t
            mask[row, 3 * t : 3 * t + count] = 1
    return mask, turn_ids


def turn_values(out: torch.Tensor, turn_ids: torch.Tensor) -> list[list[float]]:
    """The advantage of each turn of each row (its first token's; 0 for a turn without mask tokens)."""
    rows = []
    for row in range(out.shape[0]):
        n = int(turn_ids[row].max()) + 1
        rows.append([float(out[row, 3 * t]) for t in range(n)])
    return rows


# Group of two: A has 3 turns with gains [1, 3, (ignored 9)] and outcome 1; B has 2 turns with gains [2, (ignored)]
# and outcome 0.
GAINS = [[1.0, 3.0, 9.0], [2.0, 7.0]]
OUTCOMES = torch.tensor([1.0, 0.0])


def two_dialogues(**kw):
    mask, turn_ids = dialogues([[2, 2, 2], [2, 2]])
    return canonrl.advantages("igpo", rewards=OUTCOMES, group=[0, 0], mask=mask, turn_ids=turn_ids, **kw), turn_ids


def test_igpo_separate_hand_computed():
    out, turn_ids = two_dialogues(step_rewards=GAINS)
    # gains {1, 3, 2}: mu 2, population var 2/3, sigma = sqrt(2/3 + 1e-8) = 0.816497 -> n = -1.224743, 1.224743, 0
    # outcomes {1, 0}: mu 0.5, sigma = sqrt(0.25 + 1e-8) = 0.5 -> n = +-0.5 / 0.500001 = +-0.999998
    n1, n3, n2 = (z(g, [1, 3, 2]) for g in (1, 3, 2))
    o = z(1.0, [1.0, 0.0])
    assert n2 == 0.0 and abs(o - 0.999998) < 1e-6 and abs(n3 - 1.224743) < 1e-6
    # A: A_3 = o; A_2 = n3 + A_3 = 2.224741; A_1 = n1 + A_2 = 0.999998.  B: B_2 = -o; B_1 = n2 + B_2 = -0.999998
    expected = [[n1 + n3 + o, n3 + o, o], [n2 - o, -o]]
    for got, want in zip(turn_values(out, turn_ids), expected):
        assert got == pytest.approx(want, abs=ATOL)
    assert (out[:, 2::3] == 0).all()  # observation tokens


def test_igpo_joint_and_gamma_hand_computed():
    out, turn_ids = two_dialogues(step_rewards=GAINS, norm="joint", gamma=0.5)
    # one statistic over {1, 3, 2} and {1, 0}: mu = 7/5 = 1.4, population var = 5.2/5 = 1.04, sigma = 1.019804
    items = [1.0, 3.0, 2.0, 1.0, 0.0]
    n1, n3, n2, oa, ob = (z(v, items) for v in items)
    assert abs(oa - (-0.4 / (math.sqrt(1.04 + 1e-8) + EPS))) < 1e-9
    # A_3 = oa; A_2 = n3 + 0.5 oa; A_1 = n1 + 0.5 A_2.  B_2 = ob; B_1 = n2 + 0.5 ob
    a2 = n3 + 0.5 * oa
    expected = [[n1 + 0.5 * a2, a2, oa], [n2 + 0.5 * ob, ob]]
    for got, want in zip(turn_values(out, turn_ids), expected):
        assert got == pytest.approx(want, abs=ATOL)


def test_igpo_without_std_centres_only():
    out, turn_ids = two_dialogues(step_rewards=GAINS, scale_by_std=False)
    # gains - 2 = [-1, 1, 0]; outcomes - 0.5 = [0.5, -0.5]
    expected = [[-1 + 1 + 0.5, 1 + 0.5, 0.5], [0 - 0.5, -0.5]]
    for got, want in zip(turn_values(out, turn_ids), expected):
        assert got == pytest.approx(want, abs=ATOL)


def test_igpo_log_prob_and_prob_gains_match_given_gains():
    given, _ = two_dialogues(step_rewards=GAINS)
    # log_prob: l_0 = -4, l = [-3, 0, (-1 unused)] -> gains [1, 3]; l_0 = -2, l = [0, (-5 unused)] -> gain [2]
    log_prob, _ = two_dialogues(
        info_gain="log_prob", step_values=[[-3.0, 0.0, -1.0], [0.0, -5.0]], prompt_values=torch.tensor([-4.0, -2.0])
    )
    assert torch.allclose(log_prob, given, atol=ATOL)
    # prob: p_0 = 0.1, p = [0.2, 0.5] -> gains [0.1, 0.3]; p_0 = 0.3, p = [0.5] -> gain [0.2]
    ln = math.log
    prob, _ = two_dialogues(
        info_gain="prob", step_values=[[ln(0.2), ln(0.5), 0.0], [ln(0.5), 0.0]],
        prompt_values=torch.tensor([ln(0.1), ln(0.3)]),
    )
    expected, _ = two_dialogues(step_rewards=[[0.1, 0.3, 0.0], [0.2, 0.0]])
    assert torch.allclose(prob, expected, atol=ATOL)


def row_per_step_of_two_dialogues(**kw):
    # the same two trajectories, one row per turn, rows shuffled: (traj, step_index) per row
    rows = [("B", 1), ("A", 2), ("A", 0), ("B", 0), ("A", 1)]
    gain = {"A": GAINS[0], "B": GAINS[1]}
    outcome = {"A": 1.0, "B": 0.0}
    out = canonrl.advantages(
        "igpo", rewards=torch.tensor([outcome[t] for t, _ in rows]), group=[0] * 5, mask=torch.ones(5, 2),
        traj=[t for t, _ in rows], step_index=torch.tensor([s for _, s in rows]),
        step_rewards=torch.tensor([gain[t][s] for t, s in rows]), **kw,
    )
    return row_values(out), rows


@pytest.mark.parametrize("params", [{}, {"norm": "joint", "gamma": 0.7}, {"scale_by_std": False}])
def test_igpo_both_layouts_agree(params):
    dialogue, turn_ids = two_dialogues(step_rewards=GAINS, **params)
    by_turn = turn_values(dialogue, turn_ids)
    steps, rows = row_per_step_of_two_dialogues(**params)
    for value, (t, s) in zip(steps.tolist(), rows):
        assert value == pytest.approx(by_turn["AB".index(t)][s], abs=ATOL)


def test_igpo_zero_gain_counts_unless_dropped():
    mask, turn_ids = dialogues([[2, 2, 2, 2], [2, 2]])
    gains = [[1.0, 0.0, 3.0, 0.0], [2.0, 0.0]]
    kw = dict(rewards=OUTCOMES, group=[0, 0], mask=mask, turn_ids=turn_ids, step_rewards=gains)
    got = turn_values(canonrl.advantages("igpo", zero_info_gain="drop", **kw), turn_ids)
    # drop: gains {1, 3, 2} as before, the zero-gain turn gets n = 0: A_2 = 0 + A_3
    n1, n3 = z(1, [1, 3, 2]), z(3, [1, 3, 2])
    o = z(1.0, [1.0, 0.0])
    assert got[0] == pytest.approx([n1 + n3 + o, n3 + o, n3 + o, o], abs=ATOL)
    # keep (the default; the official 0 -> 1e-10): gains {1, 0, 3, 2}: mu 1.5, population var 1.25
    kept = turn_values(canonrl.advantages("igpo", **kw), turn_ids)
    k = [z(v, [1, 0, 3, 2]) for v in (1, 0, 3, 2)]
    assert kept[0] == pytest.approx([k[0] + k[1] + k[2] + o, k[1] + k[2] + o, k[2] + o, o], abs=ATOL)
    assert kept[1] == pytest.approx([k[3] - o, -o], abs=ATOL)


def test_igpo_constant_groups_are_exactly_zero():
    mask, turn_ids = dialogues([[2, 2, 2], [2, 1, 2], [2, 2]])
    # outcomes all 0.7 and gains all 0.1 (inexact in float32): every statistic is constant
    out = canonrl.advantages(
        "igpo", rewards=torch.full((3,), 0.7), group=[5, 5, 5], mask=mask, turn_ids=turn_ids,
        step_rewards=[[0.1, 0.1, 4.0], [0.1, 0.1, -2.0], [0.1, 0.0]],
    )
    assert (out == 0).all()
    for norm in ("joint", "separate"):
        out = canonrl.advantages(
            "igpo", rewards=torch.full((2,), 0.1), group=[1, 1], mask=mask[:2], turn_ids=turn_ids[:2], norm=norm,
            step_rewards=[[0.1, 0.1, 0.0], [0.1, 0.1, 0.0]],
        )
        assert (out == 0).all(), norm


def test_igpo_singleton_group_and_one_turn_trajectory():
    # group 3 holds one trajectory (gains [1, 3, -]): its outcome is alone -> 0; its gains are z-scored (+-1/(1+eps))
    # group 4 holds a one-turn trajectory (outcome 1) and a two-turn one (gain 0.5, outcome 0): the gain is alone -> 0
    mask, turn_ids = dialogues([[2, 2, 2], [2], [2, 2]])
    out = canonrl.advantages(
        "igpo", rewards=torch.tensor([5.0, 1.0, 0.0]), group=[3, 4, 4], mask=mask, turn_ids=turn_ids,
        step_rewards=[[1.0, 3.0, 0.0], [8.0], [0.5, 0.0]],
    )
    got = turn_values(out, turn_ids)
    n = 1 / (math.sqrt(1 + 1e-8) + EPS)  # (3 - 2) / (sigma + eps), sigma = sqrt(1 + 1e-8)
    assert got[0] == pytest.approx([0.0, n, 0.0], abs=ATOL) and got[0][0] == 0.0  # -n + n + 0 exactly
    o = z(1.0, [1.0, 0.0])
    assert got[1] == pytest.approx([o], abs=ATOL)
    assert got[2] == pytest.approx([-o, -o], abs=ATOL)


def test_igpo_unequal_interleaved_groups_are_independent():
    mask, turn_ids = dialogues([[2, 2], [2, 2, 2], [2], [2, 2, 2], [2, 2]])
    group = ["x", "y", "x", "y", "x"]
    rewards = torch.tensor([0.5, 1.0, 0.0, 0.25, 1.0])
    gains = [[0.2, 0.0], [0.3, -0.1, 0.0], [0.0], [0.4, 0.4, 0.0], [-0.3, 0.0]]
    full = canonrl.advantages("igpo", rewards=rewards, group=group, mask=mask, turn_ids=turn_ids, step_rewards=gains)
    for g in ("x", "y"):
        rows = [i for i, h in enumerate(group) if h == g]
        alone = canonrl.advantages(
            "igpo", rewards=rewards[rows], group=[g] * len(rows), mask=mask[rows], turn_ids=turn_ids[rows],
            step_rewards=[gains[i] for i in rows],
        )
        assert torch.allclose(full[rows], alone, atol=ATOL)


def test_igpo_empty_last_turn_keeps_the_outcome_for_earlier_turns():
    # A's last turn has no mask token: it gets 0, its outcome reaches turn 1 through the return (gamma 0.5)
    mask, turn_ids = dialogues([[2, 2, 0], [2, 2]])
    out = canonrl.advantages(
        "igpo", rewards=OUTCOMES, group=[0, 0], mask=mask, turn_ids=turn_ids, gamma=0.5, step_rewards=GAINS,
    )
    got = turn_values(out, turn_ids)
    n1, n3, n2 = (z(g, [1, 3, 2]) for g in (1, 3, 2))
    o = z(1.0, [1.0, 0.0])
    assert got[0] == pytest.approx([n1 + 0.5 * (n3 + 0.5 * o), n3 + 0.5 * o, 0.0], abs=ATOL)
    assert got[1] == pytest.approx([n2 - 0.5 * o, -o], abs=ATOL)


def official_igpo(token_rewards: torch.Tensor, mask: torch.Tensor, index: list, mode: str, gamma: float = 1.0):
    """Transcription of debajoycs98/IGPO@745078b ``compute_grpo_outcome_advantage`` (core_algos.py L182–324, with
    ``_compute_turn_level_advantage`` L28–95), curriculum off, ``norm_adv_by_std_in_grpo=True``."""
    bsz, seq_len = token_rewards.shape
    last = torch.clamp(mask.sum(1).long() - 1, min=0)
    f1_mask = (torch.arange(seq_len)[None] == last[:, None]) & (mask == 1)
    ig_mask = (mask == 1) & ~f1_mask & (token_rewards != 0)
    ids = {g: i for i, g in enumerate(dict.fromkeys(index))}
    group = torch.tensor([ids[g] for g in index])[:, None].expand(-1, seq_len)

    def stats(m):
        r, gr = token_rewards[m], group[m]
        count = torch.zeros(len(ids)).scatter_add_(0, gr, torch.ones_like(r))
        mean = torch.zeros(len(ids)).scatter_add_(0, gr, r) / count.clamp(min=1)
        var = torch.zeros(len(ids)).scatter_add_(0, gr, (r - mean[gr]) ** 2) / count.clamp(min=1)
        return mean, torch.where(count <= 1, torch.ones_like(var), torch.sqrt(var + 1e-8))

    normalised = torch.zeros_like(token_rewards)
    for m in ([f1_mask, ig_mask] if mode == "separate" else [f1_mask | ig_mask]):
        mean, std = stats(m)
        normalised = torch.where(m, (token_rewards - mean[group]) / (std[group] + 1e-6), normalised)
    out = torch.zeros_like(token_rewards)
    for i in range(bsz):
        positions = (normalised[i] != 0).nonzero().flatten().tolist()
        advantage, turns = 0.0, []
        for pos in reversed(positions):
            advantage = normalised[i, pos].item() + gamma * advantage
            turns.append((pos, advantage))
        start = 0
        for pos, advantage in reversed(turns):
            for t in range(start, pos + 1):
                if mask[i, t] == 1:
                    out[i, t] = advantage
            start = pos + 1
    return out


@pytest.mark.parametrize("mode", ["separate", "joint"])
def test_igpo_matches_the_official_code_on_random_batches(mode):
    generator = torch.Generator().manual_seed(7)
    for _ in range(20):
        turns = torch.randint(1, 5, (12,), generator=generator).tolist()
        width = max(turns) * 3
        mask, turn_ids = torch.zeros(12, width), torch.full((12, width), -1)
        token_rewards = torch.zeros(12, width)
        gains, outcomes = [], torch.rand(12, generator=generator)
        for row, n in enumerate(turns):
            mask[row, : 3 * n] = 1  # contiguous turns of 3 tokens (the official f1 position needs no holes)
            turn_ids[row, : 3 * n] = torch.arange(n).repeat_interleave(3)
            row_gains = (torch.rand(n, generator=generator) - 0.5).tolist()
            row_gains[-1] = 0.0
            gains.append(row_gains)
            for t in range(n - 1):
                token_rewards[row, 3 * t + 2] = row_gains[t]
            token_rewards[row, 3 * n - 1] = outcomes[row]
        group = torch.randint(0, 3, (12,), generator=generator).tolist()
        expected = official_igpo(token_rewards, mask, group, mode)
        got = canonrl.advantages(
            "igpo", rewards=outcomes, group=group, mask=mask, turn_ids=turn_ids, step_rewards=gains, norm=mode
        )
        assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


def test_igpo_errors():
    mask, turn_ids = dialogues([[2, 2], [2]])
    kw = dict(rewards=torch.tensor([1.0, 0.0]), group=[0, 0], mask=mask, turn_ids=turn_ids)
    for bad, match in [
        ({"info_gain": "log"}, r"info_gain must be one of \['given', 'log_prob', 'prob'\]"),
        ({"norm": "both"}, r"norm must be one of \['separate', 'joint'\]"),
        ({"scale_by_std": "yes"}, r"scale_by_std must be True or False"),
        ({"eps": -1.0}, r"eps must lie in"),
        ({"gamma": 1.5}, r"gamma must lie in \[0.0, 1.0\]"),
        ({"zero_info_gain": "skip"}, r"zero_info_gain must be one of \['drop', 'keep'\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            canonrl.get_estimator("igpo", **bad)
    with pytest.raises(ValueError, match=r"needs 'step_rewards'"):
        canonrl.advantages("igpo", **kw)
    with pytest.raises(ValueError, match=r"needs 'prompt_values'"):
        canonrl.advantages("igpo", info_gain="log_prob", step_values=[[-1.0, -1.0], [-1.0]], **kw)
    with pytest.raises(ValueError, match=r"step_values must be mean log-probs \(<= 0\), not at rows \[1\]"):
        canonrl.advantages("igpo", info_gain="prob", step_values=[[-1.0, -1.0], [0.5]],
                           prompt_values=torch.tensor([-2.0, -2.0]), **kw)
    with pytest.raises(ValueError, match=r"prompt_values is NaN or Inf at rows \[0\]"):
        canonrl.advantages("igpo", info_gain="prob", step_values=[[-1.0, -1.0], [-1.0]],
                           prompt_values=torch.tensor([float("nan"), -2.0]), **kw)
    with pytest.raises(ValueError, match=r"step_rewards must give one value per step"):
        canonrl.advantages("igpo", step_rewards=torch.ones(2), **kw)


# ------------------------------------------------------------------------------------------------------- ArenaRL
def arena(metric, group=None, **kw):
    metric = torch.as_tensor(metric, dtype=torch.float32)
    n = metric.shape[0]
    mask = kw.pop("mask", torch.ones(n, 2))
    group = [0] * n if group is None else group
    out = canonrl.advantages("arenarl", rewards=torch.zeros(n), group=group, mask=mask, metric=metric, **kw)
    return row_values(out)


def test_arenarl_spec_vectors():
    # ranks 0..3 -> g = [1, 2/3, 1/3, 0]: mean 1/2, unbiased std sqrt((1/4 + 1/36 + 1/36 + 1/4) / 3) = 0.430331
    # -> (g - 1/2) / 0.430332 = [1.1619, 0.3873, -0.3873, -1.1619]
    got = arena([0, 1, 2, 3], topology="ranks", grpo_after=False)
    assert got.tolist() == pytest.approx([1.1619, 0.3873, -0.3873, -1.1619], abs=1e-4)
    # anchor scores [12, 15, 12, 8]: min ranks [2, 1, 2, 4], M = 4 -> g = [2/3, 1, 2/3, 0]: mean 7/12,
    # unbiased std sqrt((1/144 + 25/144 + 1/144 + 49/144) / 3) = 0.419435 -> [0.1987, 0.9934, 0.1987, -1.3908]
    got = arena([12, 15, 12, 8], grpo_after=False)
    assert got.tolist() == pytest.approx([0.1987, 0.9934, 0.1987, -1.3908], abs=1e-4)
    assert got[0] == got[2]


def test_arenarl_second_z_score_is_the_downstream_grpo():
    for metric, kw in (([12, 15, 12, 8], {}), ([3, 0, 2, 1, 4], {"topology": "ranks"})):
        first = arena(metric, grpo_after=False, **kw).double()
        # slime's GRPO: (r - mean) / (std_unbiased + 1e-6); r has mean 0
        expected = (first - first.mean()) / (first.std() + EPS)
        got = arena(metric, **kw)  # grpo_after=True is the default
        assert torch.allclose(got.double(), expected, atol=1e-6)
        assert torch.allclose(got, first.float(), atol=1e-5)  # nearly idempotent
        assert not torch.equal(got, first.float())


def official_anchor(scores: list[float]) -> list[float]:
    """Transcription of qqr ``anchor.py`` L43–54 (pandas min rank, descending), then slime's GRPO."""
    ranks = [1 + sum(t > s for t in scores) for s in scores]
    top = max(ranks)
    g = torch.tensor([0.0] * len(scores) if top == 1 else [(top - r) / (top - 1) for r in ranks])
    r = (g - g.mean()) / (g.std() + 1e-6)
    return ((r - r.mean()) / (r.std() + 1e-6)).tolist()


def official_ranks(ranks: list[int]) -> list[float]:
    """Transcription of qqr ``single_elimination.py`` L173–186, then slime's GRPO."""
    g = torch.tensor([1.0 - rank / (len(ranks) - 1) for rank in ranks])
    r = (g - g.mean()) / (g.std() + 1e-6)
    return ((r - r.mean()) / (r.std() + 1e-6)).tolist()


def test_arenarl_unequal_unsorted_groups_match_the_official_map():
    generator = torch.Generator().manual_seed(3)
    sizes = {"p": 5, "q": 2, "r": 7, "s": 3}
    group = [g for g, n in sizes.items() for _ in range(n)]
    order = torch.randperm(len(group), generator=generator).tolist()
    group = [group[i] for i in order]
    scores = torch.randint(0, 6, (len(group),), generator=generator).float()  # ties
    ranks = torch.zeros(len(group))
    for g in sizes:
        rows = [i for i, h in enumerate(group) if h == g]
        ranks[rows] = torch.randperm(len(rows), generator=generator).float()
    got_anchor = arena(scores, group)
    got_ranks = arena(ranks, group, topology="ranks")
    for g in sizes:
        rows = [i for i, h in enumerate(group) if h == g]
        assert got_anchor[rows].tolist() == pytest.approx(official_anchor(scores[rows].tolist()), abs=1e-5)
        assert got_ranks[rows].tolist() == pytest.approx(official_ranks(ranks[rows].int().tolist()), abs=1e-5)


def test_arenarl_singletons_ties_and_masked_rows():
    # group 1 a singleton, group 2 all tied: exactly 0; a fully masked row (row 5) takes no part and gets 0
    mask = torch.ones(6, 2)
    mask[5] = 0
    got = arena([4.0, 7.0, 7.0, 7.0, 1.0, 99.0], group=[1, 2, 2, 2, 3, 3], mask=mask)
    assert got[:4].tolist() == [0.0, 0.0, 0.0, 0.0] and got[5] == 0.0
    assert got[4] == 0.0  # row 4 is alone among the valid rows of group 3
    assert arena([0.0], topology="ranks").tolist() == [0.0]
    # the masked row is not counted in N: ranks 0, 1 of two valid rows -> +-1/sqrt(2) ... z-scored: +-0.707107
    mask = torch.ones(3, 2)
    mask[1] = 0
    got = arena([1.0, 5.0, 0.0], mask=mask, topology="ranks", grpo_after=False)
    assert got.tolist() == pytest.approx([-1 / math.sqrt(2), 0.0, 1 / math.sqrt(2)], abs=1e-5)


def test_arenarl_mean_ranks_of_ties_average_the_rewards():
    # Swiss-style ties: two players sharing ranks 1 and 2 get rank 1.5 -> g = [1, 1/2, 1/2, 0], the mean of 2/3, 1/3
    got = arena([0.0, 1.5, 1.5, 3.0], topology="ranks", grpo_after=False)
    g = torch.tensor([1.0, 0.5, 0.5, 0.0], dtype=torch.float64)
    assert torch.allclose(got.double(), (g - g.mean()) / (g.std() + EPS), atol=1e-6)


def test_arenarl_errors():
    for bad, match in [
        ({"topology": "swiss"}, r"topology must be one of \['anchor', 'ranks'\]"),
        ({"grpo_after": 1}, r"grpo_after must be True or False"),
        ({"eps": -0.1}, r"eps must lie in"),
    ]:
        with pytest.raises(ValueError, match=match):
            canonrl.get_estimator("arenarl", **bad)
    with pytest.raises(ValueError, match=r"needs 'metric'"):
        canonrl.advantages("arenarl", rewards=torch.zeros(2), group=[0, 0], mask=torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"0-based ranks in \[0, N - 1\] .* not at rows \[1, 2\]"):
        arena([0.0, 3.0, -1.0], topology="ranks")
