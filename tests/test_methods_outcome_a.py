"""Hand-computed values for gdpo, qae, ngrpo, rlev, mapo and agrae (expected numbers from the papers' formulas in
plain Python, or from the spec's tables), their edge cases and hyperparameter checks."""

import math
import random
import statistics

import pytest
import torch

import canonrl
from canonrl.methods.ngrpo import NGRPO_CLIP_HIGH, NGRPO_CLIP_LOW
from canonrl.methods.rlev import value_weighted_rewards
from canonrl.registry import estimator_class
from conftest import full_mask, per_response


def adv(name, rewards, group, mask=None, **kw):
    mask = full_mask(len(rewards)) if mask is None else mask
    return canonrl.advantages(name, rewards=torch.as_tensor(rewards, dtype=torch.float32), group=group, mask=mask, **kw)


def seq(name, rewards, group, mask=None, **kw):
    return per_response(adv(name, rewards, group, mask, **kw)).tolist()


def approx(values, rel=1e-5, abs=1e-6):
    return pytest.approx(values, rel=rel, abs=abs)


def zscores(values, eps, ddof=1):
    mean = sum(values) / len(values)
    std = statistics.stdev(values) if ddof else statistics.pstdev(values)
    return [(v - mean) / (std + eps) for v in values]


def whiten(values, eps):
    mean = sum(values) / len(values)
    std = statistics.stdev(values)
    return [(v - mean) / (std + eps) for v in values]


# ---------------------------------------------------------------------------------------------------------------
# GDPO
# ---------------------------------------------------------------------------------------------------------------

# Two components (correctness, format) for two groups of 3 with non-contiguous, interleaved ids.
GDPO_R = [[1.0, 0.2], [0.0, 0.5], [1.0, 1.0], [0.0, 0.1], [1.0, 0.3], [1.0, 0.3]]
GDPO_G = [7, 7, 7, 2, 2, 2]


def gdpo_reference(rewards, groups, weights=None, eps=1e-4, batch_eps=1e-4):
    k = len(rewards[0])
    weights = weights or [1.0] * k
    summed = [0.0] * len(rewards)
    for g in set(groups):
        rows = [i for i, x in enumerate(groups) if x == g]
        for c in range(k):
            values = [rewards[i][c] for i in rows]
            z = [0.0] * len(rows) if len(set(values)) == 1 else zscores(values, eps)
            for i, zi in zip(rows, z):
                summed[i] += weights[c] * zi
    return whiten(summed, batch_eps)


def test_gdpo_two_rewards_by_hand():
    # row 0, group 7: correctness [1, 0, 1] (mean 2/3, std sqrt(1/3)), format [0.2, 0.5, 1.0] (mean 17/30)
    s_first = (1 - 2 / 3) / (math.sqrt(1 / 3) + 1e-4) + (0.2 - 17 / 30) / (statistics.stdev([0.2, 0.5, 1.0]) + 1e-4)
    summed = [
        sum(z)
        for rows in (GDPO_R[:3], GDPO_R[3:])
        for z in zip(*(zscores([r[c] for r in rows], 1e-4) for c in (0, 1)))
    ]
    assert summed[0] == pytest.approx(s_first)
    got = seq("gdpo", GDPO_R, GDPO_G)
    assert got == approx(whiten(summed, 1e-4))
    assert got == approx(gdpo_reference(GDPO_R, GDPO_G))


def test_gdpo_weights_and_one_dimensional_rewards():
    weights = (2.0, 0.5)
    assert seq("gdpo", GDPO_R, GDPO_G, weights=weights) == approx(gdpo_reference(GDPO_R, GDPO_G, list(weights)))
    # K = 1 from 1-D rewards: the batch-whitened GRPO z-score
    rewards = [r[0] for r in GDPO_R]
    assert seq("gdpo", rewards, GDPO_G) == approx(gdpo_reference([[r] for r in rewards], GDPO_G))
    # weight 0 on the format reward: the batch step removes the scale of the other weight
    only_correct = seq("gdpo", GDPO_R, GDPO_G, weights=(3.0, 0.0))
    assert only_correct == approx(seq("gdpo", rewards, GDPO_G), rel=1e-4)


def test_gdpo_conditioned_variant():
    # the format reward (component 1) counts only where correctness (component 0) >= 1
    conditioned = [[c, f if c >= 1 else 0.0] for c, f in GDPO_R]
    got = seq("gdpo", GDPO_R, GDPO_G, condition=((1, 0, 1.0),))
    assert got == approx(gdpo_reference(conditioned, GDPO_G))
    assert got != approx(seq("gdpo", GDPO_R, GDPO_G))


def test_gdpo_all_equal_groups():
    rewards = [[1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0], [0.1, 0.1], [0.1, 0.1], [0.1, 0.1]]
    groups = [0, 0, 1, 1, 4, 4, 4]
    got = seq("gdpo", rewards, groups)
    # per-response batch statistics: every group's z-scores sum to 0, so mean_B = 0 and all-equal groups stay 0
    assert got[:2] == [0.0, 0.0] and got[4:] == [0.0] * 3
    assert got == approx(gdpo_reference(rewards, groups))
    # token weighting (verl's masked_whiten): mean_B != 0, the all-equal groups get -mean_B / std_B
    mask = torch.ones(7, 3)
    mask[2, 1:] = 0  # row 2 (S > 0) has 1 token, row 3 (S < 0) has 3
    token = seq("gdpo", rewards, groups, mask=mask, batch_norm="token")
    assert token[0] > 0 and token[0] == token[1] == token[4]
    # a batch whose S are all equal has no spread: 0
    assert seq("gdpo", [[1.0, 0.0]] * 4, [0, 0, 1, 1]) == [0.0] * 4


def test_gdpo_singletons_fully_masked_rows_and_batch_norm_options():
    rewards = [[1.0, 0.5], [0.0, 0.2], [1.0, 0.9], [0.3, 0.3], [5.0, 5.0]]
    groups = ["a", "a", "a", "solo", "a"]
    mask = full_mask(5)
    mask[4] = 0  # fully masked: 0, left out of every statistic
    got = seq("gdpo", rewards, groups, mask=mask)
    expected = gdpo_reference(rewards[:3], [0, 0, 0])
    assert got == approx(expected + [0.0, 0.0])
    # singleton="raw": verl's rule per component (r / (1 + eps)) and the row joins the batch step
    raw = seq("gdpo", rewards, groups, mask=mask, singleton="raw")
    summed = [sum(z) for z in zip(*(zscores([r[c] for r in rewards[:3]], 1e-4) for c in (0, 1)))]
    summed.append((0.3 + 0.3) / (1 + 1e-4))
    assert raw == approx(whiten(summed, 1e-4) + [0.0])
    # batch_norm="none": the weighted sum of z-scores (group-local)
    none = seq("gdpo", rewards, groups, mask=mask, batch_norm="none")
    assert none == approx(summed[:3] + [0.0, 0.0])
    # batch_norm="token": verl's masked_whiten, each response weighted by its token count
    lengths = [3, 1, 2]
    mask = torch.zeros(3, 3)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    token = seq("gdpo", rewards[:3], [0, 0, 0], mask=mask, batch_norm="token")
    values = [v for v, n in zip(summed[:3], lengths) for _ in range(n)]
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    assert token == approx([(v - mean) / math.sqrt(variance + 1e-8) for v in summed[:3]])


def test_gdpo_bad_hyperparameters_and_inputs():
    with pytest.raises(ValueError, match="weights has 3 entries"):
        adv("gdpo", GDPO_R, GDPO_G, weights=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="weights"):
        canonrl.get_estimator("gdpo", weights=(1.0, -1.0))
    with pytest.raises(ValueError, match="weights"):
        canonrl.get_estimator("gdpo", weights=(1.0, float("nan")))
    with pytest.raises(ValueError, match="batch_norm"):
        canonrl.get_estimator("gdpo", batch_norm="tokens")
    with pytest.raises(ValueError, match="condition"):
        canonrl.get_estimator("gdpo", condition=((1, 1, 0.5),))
    with pytest.raises(ValueError, match="condition"):
        canonrl.get_estimator("gdpo", condition=(1, 0, 0.5))
    with pytest.raises(ValueError, match="condition"):
        adv("gdpo", GDPO_R, GDPO_G, condition=((2, 0, 1.0),))
    with pytest.raises(ValueError, match="eps"):
        canonrl.get_estimator("gdpo", eps=-1.0)
    with pytest.raises(ValueError, match="gdpo"):  # others take one reward per response
        adv("grpo", GDPO_R, GDPO_G)


# ---------------------------------------------------------------------------------------------------------------
# QAE
# ---------------------------------------------------------------------------------------------------------------


def test_qae_paper_quantile_vs_the_official_linear_one_at_g8():
    # G = 8, K = 0.4, 3 failures: the paper's b = x_(ceil(3.2)) = x_(4) = 1, torch.quantile's b = 0.8
    rewards = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    std = statistics.stdev(rewards)
    paper = seq("qae", rewards, [0] * 8)
    assert paper == approx([(r - 1.0) / (std + 1e-6) for r in rewards])
    linear = seq("qae", rewards, [0] * 8, quantile="linear")
    assert linear == approx([(r - 0.8) / (std + 1e-6) for r in rewards])
    # G = 16, K = 0.4: ceil(6.4) = 7 and 0.4 * 15 = 6 (0-based) name the same order statistic
    rewards16 = [float(i % 3) for i in range(16)]
    assert seq("qae", rewards16, [0] * 16) == approx(seq("qae", rewards16, [0] * 16, quantile="linear"))


def test_qae_two_regime_gate_on_binary_rewards():
    k = 0.4
    for successes in range(1, 8):
        rewards = [1.0] * successes + [0.0] * (8 - successes)
        got = seq("qae", rewards, [0] * 8, k=k)
        p = successes / 8
        if p <= 1 - k:  # hard prompt: failures get 0, successes are positive
            assert all(a == 0.0 for a in got[successes:]) and all(a > 0 for a in got[:successes])
        else:  # easy prompt: successes get 0, failures are negative
            assert all(a == 0.0 for a in got[:successes]) and all(a < 0 for a in got[successes:])


def test_qae_matches_order_statistics_and_torch_quantile_on_random_groups():
    rng = random.Random(0)
    rewards, groups = [], []
    sizes = [1, 2, 3, 5, 7, 10, 16]
    for gid, n in zip([40, 3, 17, 8, 99, 5, 61], sizes):
        rewards += [rng.choice([0.0, 0.25, 1.0, rng.uniform(-2, 2)]) for _ in range(n)]
        groups += [gid] * n
    order = list(range(len(rewards)))
    rng.shuffle(order)  # interleaved, non-contiguous groups
    rewards, groups = [rewards[i] for i in order], [groups[i] for i in order]
    for k in (0.1, 0.3, 0.4, 0.5, 0.6, 1.0):
        paper = seq("qae", rewards, groups, k=k, eps=0.0)
        linear = seq("qae", rewards, groups, k=k, eps=0.0, quantile="linear")
        for gid in set(groups):
            rows = [i for i, g in enumerate(groups) if g == gid]
            values = [rewards[i] for i in rows]
            if len(rows) == 1 or len(set(values)) == 1:
                assert all(paper[i] == 0.0 and linear[i] == 0.0 for i in rows)
                continue
            ordered = sorted(values)
            # smallest j with j / n >= k, in exact rational arithmetic
            j = next(j for j in range(1, len(values) + 1) if j * 10 >= round(k * 10) * len(values))
            std = statistics.stdev(values)
            assert [paper[i] for i in rows] == approx([(v - ordered[j - 1]) / std for v in values], rel=1e-4)
            b = torch.quantile(torch.tensor(values, dtype=torch.float32), k).item()  # the official code's baseline
            assert [linear[i] for i in rows] == approx([(v - b) / std for v in values], rel=1e-4)


def test_qae_edge_cases_and_hyperparameters():
    rewards = [0.1, 0.1, 0.1, 0.7, 1.0, 0.0, 9.0]
    groups = [4, 4, 4, 8, 6, 6, 4]
    mask = full_mask(7)
    mask[6] = 0
    got = seq("qae", rewards, groups, mask=mask)
    assert got[:4] == [0.0] * 4 and got[6] == 0.0  # all-equal (awkward float), singleton, fully masked
    # K = 0.4 of [0, 1] (n = 2): ceil(0.8) = 1, b = 0
    assert got[4:6] == approx([1.0 / (math.sqrt(0.5) + 1e-6), 0.0])
    raw = seq("qae", rewards, groups, mask=mask, singleton="raw")
    assert raw[3] == approx(0.7 / (1 + 1e-6))
    assert estimator_class("qae").verified is False
    assert "best reading" in estimator_class("qae").description.lower()
    for bad in ({"k": 0.0}, {"k": 1.5}, {"quantile": "higher"}, {"eps": -1e-3}, {"std": "sample"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            canonrl.get_estimator("qae", **bad)


# ---------------------------------------------------------------------------------------------------------------
# NGRPO
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "successes, correct, incorrect",
    [(0, None, -0.333), (1, 1.764, -0.504), (4, 0.843, -1.054), (7, 0.333, -2.667), (8, 0.0, None)],
)
def test_ngrpo_spec_table_g8(successes, correct, incorrect):
    rewards = [1.0] * successes + [0.0] * (8 - successes)
    got = seq("ngrpo", rewards, ["q"] * 8)
    if correct is not None:
        assert got[0] == pytest.approx(correct, abs=5e-4)
    if incorrect is not None:
        assert got[-1] == pytest.approx(incorrect, abs=5e-4)
    if successes == 8:
        assert got == [0.0] * 8


def test_ngrpo_by_hand_with_two_virtual_samples():
    rewards = [0.5, 2.0, 0.0]
    extended = rewards + [2.0, 2.0]  # k = 2 virtual samples at r_max = 2
    mean = sum(extended) / 5
    std = statistics.stdev(extended)
    got = seq("ngrpo", rewards, [1, 1, 1], max_reward=2.0, num_max=2)
    assert got == approx([(r - mean) / (std + 1e-6) for r in rewards])
    population = seq("ngrpo", rewards, [1, 1, 1], max_reward=2.0, num_max=2, std="population")
    assert population == approx([(r - mean) / (statistics.pstdev(extended) + 1e-6) for r in rewards])
    # a constant group below r_max still gets a (negative) advantage; k = 0 is GRPO
    assert seq("ngrpo", [0.3, 0.3], [0, 0])[0] < 0
    rewards = [0.3, 0.3, 1.0, 0.0, 0.2, 0.2]
    groups = [5, 5, 9, 9, 9, 2]
    assert seq("ngrpo", rewards, groups, num_max=0) == approx(seq("grpo", rewards, groups))


def test_ngrpo_edge_cases_and_hyperparameters():
    mask = full_mask(4)
    mask[1] = 0
    got = seq("ngrpo", [0.0, 1.0, 0.0, 0.4], [3, 3, 3, 8], mask=mask)
    # group 3 has two valid zeros (+ one virtual 1): mean 1/3, std sqrt(1/3); the masked 1.0 does not count
    assert got == approx([-(1 / 3) / (math.sqrt(1 / 3) + 1e-6), 0.0, -(1 / 3) / (math.sqrt(1 / 3) + 1e-6), 0.0])
    raw = seq("ngrpo", [0.0, 1.0, 0.0, 0.4], [3, 3, 3, 8], mask=mask, singleton="raw")
    assert raw[3] == approx(0.4 / (1 + 1e-6))
    assert (NGRPO_CLIP_LOW, NGRPO_CLIP_HIGH) == (0.16, 0.24)
    for bad in ({"num_max": -1}, {"num_max": 1.5}, {"max_reward": float("inf")}, {"eps": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            canonrl.get_estimator("ngrpo", **bad)


# ---------------------------------------------------------------------------------------------------------------
# RLEV
# ---------------------------------------------------------------------------------------------------------------

RLEV_R = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
RLEV_G = [5, 5, 5, 9, 9, 9]
RLEV_V = torch.tensor([0.05, 0.05, 0.05, 0.2, 0.2, 0.2])


def test_rlev_value_weighted_rewards_under_rloo_by_hand():
    # s = 1 + min(10 * 0.05, 1) = 1.5 and 1 + min(10 * 0.2, 1) = 2
    got = seq("rlev", RLEV_R, RLEV_G, human_values=RLEV_V)
    assert got == approx([1.5, -0.75, -0.75, 1.0, 1.0, -2.0])
    uncapped = seq("rlev", RLEV_R, RLEV_G, human_values=RLEV_V, cap=None)  # s = 1.5 and 3
    assert uncapped == approx([1.5, -0.75, -0.75, 1.5, 1.5, -3.0])
    alpha1 = seq("rlev", RLEV_R, RLEV_G, human_values=RLEV_V, alpha=1.0, base="dr_grpo")  # s = 1.05 and 1.2
    assert alpha1 == approx([1.05 * 2 / 3, -1.05 / 3, -1.05 / 3, 1.2 / 3, 1.2 / 3, -2.4 / 3])
    assert value_weighted_rewards(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0.01, 0.5, 0.5])).tolist() == approx(
        [1.1, 2.0, 0.0]
    )


def test_rlev_per_prompt_scale_cancels_under_grpo_but_not_under_batch_scale():
    grpo = seq("rlev", RLEV_R, RLEV_G, human_values=RLEV_V, base="grpo")
    assert grpo == approx(seq("grpo", RLEV_R, RLEV_G), rel=1e-5)  # z-scores are scale-invariant (eps aside)
    batch = seq("rlev", RLEV_R, RLEV_G, human_values=RLEV_V, base="grpo", base_params={"scale": "batch"})
    scaled = [1.5, 0, 0, 2, 2, 0]
    std = statistics.stdev(scaled)
    assert batch == approx([(1.5 - 0.5) / (std + 1e-6), -0.5 / (std + 1e-6), -0.5 / (std + 1e-6),
                            (2 - 4 / 3) / (std + 1e-6), (2 - 4 / 3) / (std + 1e-6), -(4 / 3) / (std + 1e-6)])


def test_rlev_inputs_and_hyperparameters():
    with pytest.raises(ValueError, match="human_values"):
        adv("rlev", RLEV_R, RLEV_G)
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        adv("rlev", RLEV_R, RLEV_G, human_values=torch.tensor([0.1, -0.1, 0.1, 0.2, 0.2, 0.2]))
    mask = full_mask(6)
    mask[1] = 0  # a fully masked row's value is not checked
    assert seq("rlev", RLEV_R, RLEV_G, mask=mask, human_values=torch.tensor([0.1, -0.1, 0.1, 0.2, 0.2, 0.2]))[1] == 0.0
    # the value and CANON's metric are two inputs now: a base that splits by a given metric reads its own
    assert canonrl.get_estimator("rlev", base="canon", base_params={"split_by": "given"}).required_inputs() == (
        "human_values",
        "metric",
    )
    with pytest.warns(DeprecationWarning, match="reads 'human_values' now; passing it as 'metric' is deprecated"):
        old = seq("rlev", RLEV_R, RLEV_G, metric=RLEV_V)
    assert old == seq("rlev", RLEV_R, RLEV_G, human_values=RLEV_V)
    with pytest.raises(ValueError, match="sequence-level"):
        canonrl.get_estimator("rlev", base="reinforce_pp")
    for bad in ({"alpha": -1.0}, {"cap": -0.5}, {"base": "rlev"}, {"base": "nope"}):
        with pytest.raises(ValueError, match=next(iter(bad)) if "base" not in bad else "rlev|nope"):
            canonrl.get_estimator("rlev", **bad)
    assert canonrl.get_estimator("rlev", base="canon", base_params={"split_by": "entropy"}).required_inputs() == (
        "human_values",
        "entropy",
    )


# ---------------------------------------------------------------------------------------------------------------
# MAPO
# ---------------------------------------------------------------------------------------------------------------


def mapo_reference(rewards, ddof, eps=1e-6):
    n = len(rewards)
    mean = sum(rewards) / n
    std = statistics.stdev(rewards) if ddof else statistics.pstdev(rewards)
    p = sum(1 for r in rewards if r == 1.0) / n
    lam = 1 - 4 * p * (1 - p)
    return [(1 - lam) * (r - mean) / (std + eps) + lam * (r - mean) / (mean + eps) for r in rewards]


@pytest.mark.parametrize("successes, correct, incorrect", [(1, 5.02, -0.717), (4, 0.935, -0.935), (7, 0.235, -1.645)])
def test_mapo_spec_table_g8_unbiased(successes, correct, incorrect):
    rewards = [1.0] * successes + [0.0] * (8 - successes)
    got = seq("mapo", rewards, [0] * 8, std="unbiased")
    assert got[0] == pytest.approx(correct, abs=5e-3)
    assert got[-1] == pytest.approx(incorrect, abs=5e-3)


def test_mapo_population_std_by_default_and_continuous_rewards():
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 0.5]
    groups = [3, 3, 3, 11, 11, 11]
    got = seq("mapo", rewards, groups)
    assert got == approx(mapo_reference(rewards[:3], 0) + mapo_reference(rewards[3:], 0))
    # no exact success: p = 0, lambda = 1, pure percent deviation (r - mu) / (mu + eps)
    cont = [0.2, 0.6, 0.4]
    assert seq("mapo", cont, [0, 0, 0]) == approx([(r - 0.4) / (0.4 + 1e-6) for r in cont])
    # success_reward: here 0.6 counts as the success, p = 1/3, lambda = 1 - 8/9
    lam = 1 / 9
    std = statistics.pstdev(cont)
    expected = [(1 - lam) * (r - 0.4) / (std + 1e-6) + lam * (r - 0.4) / (0.4 + 1e-6) for r in cont]
    assert seq("mapo", cont, [0, 0, 0], success_reward=0.6) == approx(expected)
    assert sum(got[:3]) == pytest.approx(0.0, abs=1e-6)  # zero sum within groups


def test_mapo_edge_cases_and_negative_rewards():
    rewards = [0.0, 0.0, 1.0, 1.0, 0.3, 0.7, 0.0]
    groups = [1, 1, 2, 2, 3, 4, 4]
    mask = full_mask(7)
    mask[6] = 0
    got = seq("mapo", rewards, groups, mask=mask)
    assert got == [0.0] * 7  # all-zero, all-one, singleton, masked (group 4 is a singleton once row 6 is masked)
    assert seq("mapo", rewards, groups, mask=mask, singleton="raw")[4:6] == approx([0.3, 0.7])
    with pytest.raises(ValueError, match=r"rows \[1, 3\]"):
        adv("mapo", [1.0, -1.0, 1.0, -1.0], [0, 0, 1, 1])
    mask = full_mask(3)
    mask[1] = 0  # a negative reward on a fully masked row is ignored
    assert seq("mapo", [1.0, -1.0, 0.0], [0, 0, 0], mask=mask)[1] == 0.0
    for bad in ({"std": "sample"}, {"eps": -1.0}, {"success_reward": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            canonrl.get_estimator("mapo", **bad)


# ---------------------------------------------------------------------------------------------------------------
# A-GRAE
# ---------------------------------------------------------------------------------------------------------------


def agrae_reference(rewards, groups, alpha=1.0, eps=1e-6):
    omega = sum(rewards) / len(rewards)
    out = [0.0] * len(rewards)
    for g in set(groups):
        rows = [i for i, x in enumerate(groups) if x == g]
        values = [rewards[i] for i in rows]
        if len(rows) < 2 or len(set(values)) == 1:
            continue
        p = sum(values) / len(values)
        z = zscores(values, eps)
        scale = omega / 2 / math.sqrt(p) + (1 - omega) / 2 / math.sqrt(1 - p)
        for i, zi in zip(rows, z):
            a = zi * scale
            out[i] = a * min(1.0, omega / alpha) if a > 0 else a
    return out


def test_agrae_paper_equations_by_hand():
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    groups = [8, 8, 8, 8, 2, 2, 2, 2, 6, 6]  # the last group is all wrong
    # omega = 0.5; group 8: p = 1/2, z = +-0.866; scale = 0.25 / sqrt(0.5) * 2 = 0.7071
    got = seq("agrae", rewards, groups)
    assert got[0] == approx(0.5 / (math.sqrt(1 / 3) + 1e-6) * (0.5 / math.sqrt(0.5)) * 0.5)
    assert got == approx(agrae_reference(rewards, groups))
    assert got[8:] == [0.0, 0.0]
    half = seq("agrae", rewards, groups, alpha=0.5)  # omega / alpha = 1: no suppression
    assert half == approx(agrae_reference(rewards, groups, alpha=0.5))
    assert half[0] == approx(got[0] * 2)
    assert half[1] == approx(got[1])  # negatives are never suppressed


def test_agrae_continuous_rewards_singletons_and_masked_rows():
    rewards = [0.2, 0.9, 0.4, 0.6, 1.0, 0.0]
    groups = [1, 1, 1, 7, 7, 3]
    mask = full_mask(6)
    mask[4] = 0  # group 7 becomes a singleton; row 4 leaves omega too
    got = seq("agrae", rewards, groups, mask=mask)
    kept = [0.2, 0.9, 0.4, 0.6, 0.0]
    omega = sum(kept) / 5  # the singletons' rewards count in the batch accuracy
    z = zscores([0.2, 0.9, 0.4], 1e-6)
    p = 0.5
    scale = omega / 2 / math.sqrt(p) + (1 - omega) / 2 / math.sqrt(1 - p)
    expected = [a * min(1.0, omega) if a > 0 else a for a in (zi * scale for zi in z)]
    assert got == approx(expected + [0.0, 0.0, 0.0])


def test_agrae_rejects_rewards_outside_the_unit_interval_and_bad_alpha():
    with pytest.raises(ValueError, match=r"rows \[0, 2\]"):
        adv("agrae", [-1.0, 1.0, 2.0, 0.0], [0, 0, 1, 1])
    for bad in ({"alpha": 0.0}, {"alpha": 1.5}, {"eps": -1.0}, {"std": "x"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            canonrl.get_estimator("agrae", **bad)


# ---------------------------------------------------------------------------------------------------------------
# Shared
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gdpo", "qae", "ngrpo", "rlev", "mapo", "agrae"])
def test_registered_float32_and_zero_outside_the_mask(name):
    rewards = [1.0, 0.0, 1.0, 0.5, 0.0, 1.0]
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 1, 1], [1, 1, 1], [0, 0, 0], [1, 0, 1]], dtype=torch.bool)
    kw = {"human_values": torch.full((6,), 0.05)} if name == "rlev" else {}
    out = adv(name, rewards, ["a", "b", "a", "b", "a", "b"], mask=mask, **kw)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out[~mask] == 0).all()
    info = {i.name: i for i in canonrl.estimators()}[name]
    assert info.paper is not None and info.description
