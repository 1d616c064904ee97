"""CANON: hand-computed values, the closed form, the official code's conventions and the mu schedules."""

import math

import pytest
import torch

import canonrl
from canonrl.methods._schedules import cosine_annealing_with_restarts
from conftest import full_mask, per_response
from official_canon import official_canon

# One group of 4. Sorted by metric: rows 0, 2 (low half, rewards 1, 1), rows 3, 1 (high half, rewards 1, 0).
REWARDS = torch.tensor([1.0, 0.0, 1.0, 1.0])
METRIC = torch.tensor([0.1, 0.4, 0.2, 0.3])
GROUP = torch.zeros(4, dtype=torch.long)


def canon(rewards=REWARDS, group=GROUP, metric=METRIC, **kw):
    mask = full_mask(len(rewards))
    return per_response(canonrl.advantages("canon", rewards=rewards, group=group, mask=mask, metric=metric, **kw))


def test_inter_intra_and_mixture_hand_computed():
    # m_L = 1, m_H = 0.5
    inter = torch.tensor([1 - 0.5, 0 - 1, 1 - 0.5, 1 - 1])
    intra = torch.tensor([1 - 1, 0 - 0.5, 1 - 1, 1 - 0.5])
    assert torch.allclose(canon(mu=1.0), inter)
    assert torch.allclose(canon(mu=0.0), intra)
    assert torch.allclose(canon(mu=0.3), 0.3 * inter + 0.7 * intra)


def test_mu_half_equals_dr_grpo_exactly_for_even_groups():
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 2, (64,), generator=generator).float()
    group = torch.arange(8).repeat(8)
    metric = torch.rand(64, generator=generator)
    dr = per_response(canonrl.advantages("dr_grpo", rewards=rewards, group=group, mask=full_mask(64)))
    assert torch.allclose(canon(rewards=rewards, group=group, metric=metric, mu=0.5), dr, atol=1e-7)


@pytest.mark.parametrize("mu", [0.0, 0.25, 0.5, 0.8, 1.0])
def test_closed_form_for_even_groups(mu):
    generator = torch.Generator().manual_seed(1)
    rows, groups = 96, 12
    rewards = torch.rand(rows, generator=generator)
    group = torch.arange(groups).repeat(rows // groups)
    metric = torch.rand(rows, generator=generator)
    got = canon(rewards=rewards, group=group, metric=metric, mu=mu)
    expected = torch.empty(rows)
    for g in range(groups):
        rows_g = (group == g).nonzero().flatten()
        order = rows_g[metric[rows_g].argsort()]
        low, high = order[: len(order) // 2], order[len(order) // 2 :]
        gap = rewards[high].mean() - rewards[low].mean()
        sign = torch.zeros(rows)
        sign[high], sign[low] = 1.0, -1.0
        expected[rows_g] = rewards[rows_g] - rewards[rows_g].mean() + (2 * mu - 1) * sign[rows_g] * gap / 2
    assert torch.allclose(got, expected, atol=1e-6)


def test_odd_group_puts_the_extra_response_in_the_high_half():
    rewards, metric = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([3.0, 1.0, 2.0])
    # low = {row 1}, high = {row 2, row 0}: m_L = 0, m_H = 0.5
    got = canon(rewards=rewards, group=torch.zeros(3, dtype=torch.long), metric=metric, mu=1.0)
    assert torch.allclose(got, torch.tensor([1.0, -0.5, 0.0]))
    half = canon(rewards=rewards, group=torch.zeros(3, dtype=torch.long), metric=metric, mu=0.5)
    assert torch.allclose(half, torch.tensor([0.75, -0.25, -0.25]))  # not Dr.GRPO's (2/3, -1/3, -1/3)


def test_ties_keep_batch_order():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0])
    # all metrics equal: rows 0, 1 (batch order) form the low half
    got = canon(rewards=rewards, metric=torch.zeros(4), mu=1.0)
    assert torch.allclose(got, torch.tensor([1.0, 1.0, -1.0, -1.0]))


def test_alpha_on_the_high_half_follows_paper_eq9():
    # m_L = 1, m_H = 0.5, alpha 0.8, mu 1: high rows alpha*R - m_L, low rows R - alpha*m_H
    got = canon(mu=1.0, alpha=0.8)
    assert torch.allclose(got, torch.tensor([1 - 0.4, 0 - 1, 1 - 0.4, 0.8 - 1]))


def test_alpha_on_the_low_half_follows_the_official_entropy_code():
    got = canon(mu=1.0, alpha=0.8, discounted_half="low")
    assert torch.allclose(got, torch.tensor([0.8 - 0.5, 0 - 0.8, 0.8 - 0.5, 1 - 0.8]))


def test_alpha_shapes_all_correct_groups_but_alpha_one_gives_zero():
    rewards = torch.ones(4)
    assert torch.equal(canon(rewards=rewards, mu=1.0), torch.zeros(4))
    got = canon(rewards=rewards, mu=0.5, alpha=0.9)  # CANON-Eff: shorter (low) half credited, longer penalised
    assert torch.allclose(got, torch.tensor([0.05, -0.05, 0.05, -0.05]))


@pytest.mark.parametrize("variant, half", [("length", "high"), ("entropy", "low")])
@pytest.mark.parametrize("mu, alpha", [(1.0, 1.0), (0.0, 1.0), (0.5, 0.88), (0.7, 0.96)])
def test_matches_the_official_loop_on_random_batches(variant, half, mu, alpha):
    generator = torch.Generator().manual_seed(7)
    sizes = [16, 16, 5, 2, 9, 1, 16, 3]
    uids = [f"uid-{g}" for g, n in enumerate(sizes) for _ in range(n)]
    order = torch.randperm(len(uids), generator=generator).tolist()
    uids = [uids[i] for i in order]
    rewards = torch.randint(0, 2, (len(uids),), generator=generator).float()
    metric = torch.rand(len(uids), generator=generator)
    expected = official_canon(rewards, uids, metric.tolist(), mu=mu, alpha=alpha, variant=variant, z=8.0)
    got = canon(rewards=rewards, group=uids, metric=metric, mu=mu, alpha=alpha, discounted_half=half,
                normalizer=8.0, singleton="raw")
    singleton = torch.tensor([uids.count(u) == 1 for u in uids])
    assert torch.allclose(got[~singleton], expected[~singleton], atol=1e-6)
    # the official code zeroes both half means for a singleton, giving mu*(alpha?)R + (1-mu)R; 'raw' keeps R
    assert torch.allclose(got[singleton], rewards[singleton] / 8.0)


def test_entropy_metric_is_the_masked_mean_token_entropy():
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])
    entropy = torch.tensor([[0.1, 0.1, 99.0], [0.5, 0.5, 0.5], [0.2, float("nan"), 9.0], [1.0, 1.0, 0.1]])
    # masked means 0.1, 0.5, 0.2, 0.7 (padding values, even NaN, are ignored) -> same split as METRIC above
    got = canonrl.advantages("canon", rewards=REWARDS, group=GROUP, mask=mask, entropy=entropy, mu=1.0)
    assert torch.allclose(per_response(got), torch.tensor([0.5, -1.0, 0.5, 0.0]))
    assert torch.equal(got[mask == 0], torch.zeros(int((mask == 0).sum())))


def test_length_metric_counts_response_tokens():
    mask = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    got = canonrl.advantages("canon", rewards=REWARDS, group=GROUP, mask=mask, split_by="length", mu=1.0)
    assert torch.allclose(per_response(got), torch.tensor([0.5, -1.0, 0.5, 0.0]))


def test_random_regrouping_is_seeded_balanced_and_changes_with_the_step():
    rewards = torch.tensor([1.0, 0, 1, 0, 1, 0, 1, 0] * 4)
    group = torch.arange(4).repeat_interleave(8)
    estimator = canonrl.get_estimator("canon", split_by="random", mu=1.0, seed=3)
    first = estimator(rewards=rewards, group=group, mask=full_mask(32), step=1)
    again = canonrl.get_estimator("canon", split_by="random", mu=1.0, seed=3)(
        rewards=rewards, group=group, mask=full_mask(32), step=1
    )
    later = estimator(rewards=rewards, group=group, mask=full_mask(32), step=2)
    assert torch.equal(first, again)
    assert not torch.equal(first, later)
    # equal halves: zero-sum per group for any mu
    assert torch.allclose(per_response(first).view(4, 8).sum(1), torch.zeros(4), atol=1e-6)


def test_index_metric_splits_by_batch_order():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0])
    got = canon(rewards=rewards, split_by="index", mu=1.0)
    assert torch.allclose(got, torch.tensor([1.0, 1.0, -1.0, -1.0]))


def test_cosine_schedules_match_the_official_constants():
    mu = lambda schedule, step: canonrl.get_estimator("canon", mu=schedule, split_by="length").mu_at(step)  # noqa: E731
    inter_first = "cosine-first-inter-later-intra"
    assert mu(inter_first, 1) == pytest.approx(2 / 30)
    assert mu(inter_first, 29) == pytest.approx(1.0)
    assert mu(inter_first, 50) == pytest.approx(0.7)
    assert mu(inter_first, 69) == pytest.approx(0.4 + 0.3 * (1 + math.cos(math.pi * 39 / 40)))
    assert mu(inter_first, 70) == pytest.approx(1.0)
    assert mu(inter_first, 230) == pytest.approx(1.0)  # keeps cycling past the nominal 150 steps
    intra_first = "cosine-first-intra-later-inter"
    assert mu(intra_first, 1) == pytest.approx(0.96)
    assert mu(intra_first, 29) == pytest.approx(0.4)
    assert mu(intra_first, 50) == pytest.approx(0.7)
    assert mu(intra_first, 70) == pytest.approx(0.4)
    assert cosine_annealing_with_restarts(
        10, total_steps=20, max_value=1, min_value=0, warmup_steps=2, cycles=2
    ) == pytest.approx(0.5 * (1 + math.cos(math.pi * 8 / 9)))


def test_scheduled_mu_is_used_at_the_given_step():
    at_50 = canon(mu="cosine-first-inter-later-intra", step=50)  # mu = 0.7
    assert torch.allclose(at_50, 0.7 * canon(mu=1.0) + 0.3 * canon(mu=0.0))


def test_accuracy_schedules_use_the_batch_accuracy():
    # batch accuracy 0.75: first-inter-later-intra -> mu = 0.25, first-intra-later-inter -> mu = 0.75
    assert torch.allclose(canon(mu="first-inter-later-intra"), canon(mu=0.25))
    assert torch.allclose(canon(mu="first-intra-later-inter"), canon(mu=0.75))
    with pytest.raises(ValueError, match=r"rewards .* rows \[1\]"):
        canon(rewards=torch.tensor([1.0, 2.0, 0.0, 1.0]), mu="first-inter-later-intra")


def test_singletons_and_masked_rows():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.7])
    group = ["a", "a", "a", "b"]
    mask = full_mask(4)
    mask[2] = 0  # leaves group a with rows 0, 1
    got = canonrl.advantages("canon", rewards=rewards, group=group, mask=mask, metric=torch.tensor([2.0, 1, 0, 5]))
    assert torch.allclose(per_response(got)[:2], torch.tensor([1.0, -1.0]))  # row 0 high, row 1 low
    assert torch.equal(got[2:], torch.zeros(2, 3))
    raw = canonrl.advantages(
        "canon", rewards=rewards, group=group, mask=mask, metric=torch.tensor([2.0, 1, 0, 5]), singleton="raw"
    )
    assert raw[3, 0].item() == pytest.approx(0.7)


def test_bad_hyperparameters_are_one_line_errors():
    with pytest.raises(ValueError, match="mu must lie in"):
        canonrl.get_estimator("canon", mu=1.5)
    with pytest.raises(ValueError, match="mu must be one of"):
        canonrl.get_estimator("canon", mu="cosine")
    with pytest.raises(ValueError, match="split_by must be one of"):
        canonrl.get_estimator("canon", split_by="perplexity")


def test_the_old_spelling_of_split_by_still_works():
    with pytest.warns(DeprecationWarning, match="'metric' is now 'split_by'"):
        old = canonrl.get_estimator("canon", metric="length")
    assert old.params.split_by == "length"
    with pytest.warns(DeprecationWarning):
        via_api = canonrl.advantages("canon", rewards=REWARDS, group=GROUP, mask=full_mask(4), metric="length")
    assert torch.equal(via_api, canonrl.advantages("canon", rewards=REWARDS, group=GROUP, mask=full_mask(4),
                                                   split_by="length"))
    with pytest.raises(ValueError, match="needs 'entropy'"):
        canonrl.advantages("canon", rewards=REWARDS, group=GROUP, mask=full_mask(4))
