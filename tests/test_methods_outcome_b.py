"""Hand-computed checks of hadw, unlikely, psr_nsr, opo, gpg, remax and aapo (expected values by plain arithmetic)."""

from __future__ import annotations

import math

import pytest
import torch

import canonrl
from canonrl.registry import get_estimator


def first(adv: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """Each row's value at its first mask position (0 for fully masked rows)."""
    index = (mask != 0).float().argmax(-1)
    values = adv[torch.arange(adv.shape[0]), index]
    return torch.where((mask != 0).any(-1), values, 0.0).tolist()


def approx(values, expected, tol=1e-5):
    assert len(values) == len(expected)
    for v, e in zip(values, expected):
        assert v == pytest.approx(e, abs=tol), (values, expected)


def ones(rows, tokens=3):
    return torch.ones(rows, tokens)


def z_scores(rewards, eps=1e-6):
    """Plain-Python GRPO z-scores of one group (unbiased std)."""
    n = len(rewards)
    mean = sum(rewards) / n
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (n - 1))
    return [(r - mean) / (std + eps) for r in rewards]


# ----------------------------------------------------------------------------------------------------------------
# remax
# ----------------------------------------------------------------------------------------------------------------


def test_remax_subtracts_the_greedy_reward():
    mask = ones(5)
    mask[3] = 0
    out = canonrl.advantages(
        "remax",
        rewards=torch.tensor([1.0, 0.0, 1.0, 7.0, 0.5]),
        greedy_rewards=torch.tensor([1.0, 1.0, 0.0, 0.0, 0.5]),
        group=[5, 5, 9, 9, 2],
        mask=mask,
    )
    approx(first(out, mask), [0.0, -1.0, 1.0, 0.0, 0.0])
    assert (out[3] == 0).all() and out.dtype == torch.float32


def test_remax_works_with_groups_of_one_and_needs_greedy_rewards():
    out = canonrl.advantages("remax", rewards=torch.tensor([2.0]), greedy_rewards=torch.tensor([0.5]), group=[0], mask=ones(1))
    approx(first(out, ones(1)), [1.5])
    with pytest.raises(ValueError, match="needs 'greedy_rewards'"):
        canonrl.advantages("remax", rewards=torch.tensor([2.0]), group=[0], mask=ones(1))


# ----------------------------------------------------------------------------------------------------------------
# opo
# ----------------------------------------------------------------------------------------------------------------


def test_opo_length_weighted_baseline():
    # group 40: lengths 1, 2, 3, rewards 1, 0, 1 -> b = (1 + 0 + 3) / 6; a fully masked row (reward 5) is ignored.
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.float32)
    rewards = torch.tensor([1.0, 0.0, 5.0, 1.0, 3.0])
    group = torch.tensor([40, 40, 40, 40, -3])
    out = canonrl.advantages("opo", rewards=rewards, group=group, mask=mask)
    b = (1 * 1 + 2 * 0 + 3 * 1) / 6
    approx(first(out, mask), [1 - b, 0 - b, 0.0, 1 - b, 0.0])
    assert (out[2] == 0).all()
    raw = canonrl.advantages("opo", rewards=rewards, group=group, mask=mask, singleton="raw")
    assert first(raw, mask)[4] == pytest.approx(3.0)


def test_opo_all_equal_group_exactly_zero():
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=torch.float32)
    out = canonrl.advantages("opo", rewards=torch.full((3,), 0.1), group=[1, 1, 1], mask=mask)
    assert (out == 0).all()


# ----------------------------------------------------------------------------------------------------------------
# gpg
# ----------------------------------------------------------------------------------------------------------------

GPG_REWARDS = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
GPG_GROUPS = [7, 3, 7, 9, 3, 9, 7, 9, 7, 9]  # group 7: 1,0,0,0 (informative); 3: 0,1; 9: 0,1,0,0


def test_gpg_alpha_official_uncapped_and_capped():
    # B = 10; informative groups 7 (4 rows), 3 (2 rows), 9 (4 rows) -> B_valid = 10, alpha = 1
    out = canonrl.advantages("gpg", rewards=GPG_REWARDS, group=GPG_GROUPS, mask=ones(10))
    approx(first(out, ones(10))[:3], [0.75, -0.5, -0.25])
    # make groups 3 and 9 constant: B_valid = 4 of 10 -> 0.4, capped at min_inverse_alpha 0.5 -> alpha 2
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    out = canonrl.advantages("gpg", rewards=rewards, group=GPG_GROUPS, mask=ones(10))
    approx(first(out, ones(10)), [2 * 0.75, 0, 2 * -0.25, 0, 0, 0, 2 * -0.25, 0, 2 * -0.25, 0])
    out = canonrl.advantages("gpg", rewards=rewards, group=GPG_GROUPS, mask=ones(10), min_inverse_alpha=0.0)
    approx(first(out, ones(10))[:3], [2.5 * 0.75, 0.0, 2.5 * -0.25])
    # verl: alpha = B / #non-zero rewards = 10 / 3
    out = canonrl.advantages("gpg", rewards=rewards, group=GPG_GROUPS, mask=ones(10), alpha="verl")
    approx(first(out, ones(10))[:3], [10 / 3 * 0.75, 0.0, 10 / 3 * -0.25])
    out = canonrl.advantages("gpg", rewards=rewards, group=GPG_GROUPS, mask=ones(10), alpha="none")
    approx(first(out, ones(10))[:3], [0.75, 0.0, -0.25])


def test_gpg_std_scaling_masked_rows_and_singletons():
    mask = ones(6)
    mask[4] = 0  # a fully masked row counts neither in B nor in B_valid
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 9.0, 3.0])
    group = [1, 1, 1, 1, 1, 2]  # group 2 is a singleton: B = 5, B_valid = 4 -> alpha = 5/4
    out = canonrl.advantages("gpg", rewards=rewards, group=group, mask=mask, scale_std=True)
    std = 0.5  # unbiased std of 1, 0, 0, 0
    approx(first(out, mask), [1.25 * 0.75 / (std + 1e-4), 1.25 * -0.25 / (std + 1e-4), 1.25 * -0.25 / (std + 1e-4), 1.25 * -0.25 / (std + 1e-4), 0.0, 0.0])
    raw = canonrl.advantages("gpg", rewards=rewards, group=group, mask=mask, singleton="raw")
    assert first(raw, mask)[5] == pytest.approx(1.25 * 3.0)


def test_gpg_bad_hyperparameters():
    with pytest.raises(ValueError, match="alpha must be one of"):
        get_estimator("gpg", alpha="count")
    with pytest.raises(ValueError, match="min_inverse_alpha"):
        get_estimator("gpg", min_inverse_alpha=1.5)


# ----------------------------------------------------------------------------------------------------------------
# aapo
# ----------------------------------------------------------------------------------------------------------------


def test_aapo_z_score_plus_clipped_momentum():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    reference = torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0, -0.1])
    group = ["q", "q", "q", "p", "p", "s"]
    out = canonrl.advantages("aapo", rewards=rewards, reference_rewards=reference, group=group, mask=ones(6))
    z = z_scores([1.0, 0.0, 0.0], eps=1e-4)
    # all-equal group p keeps its momentum; singleton s: z part 0, momentum clip(0.1) = 0.1
    approx(first(out, ones(6)), [z[0] + 0.28, z[1] + 0.0, z[2] - 0.2, 0.28, 0.0, 0.1])
    out = canonrl.advantages(
        "aapo", rewards=rewards, reference_rewards=reference, group=group, mask=ones(6), clip_low=-1.0, clip_high=1.0
    )
    approx(first(out, ones(6))[:3], [z[0] + 1.0, z[1], z[2] - 1.0])


def test_aapo_needs_reference_rewards_and_valid_clip():
    with pytest.raises(ValueError, match="needs 'reference_rewards'"):
        canonrl.advantages("aapo", rewards=torch.ones(2), group=[0, 0], mask=ones(2))
    with pytest.raises(ValueError, match="clip_low"):
        get_estimator("aapo", clip_low=0.1)


# ----------------------------------------------------------------------------------------------------------------
# psr_nsr
# ----------------------------------------------------------------------------------------------------------------


def test_psr_nsr_w_reinforce_modes():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    mask = ones(5)
    mask[4] = 0
    args = dict(rewards=rewards, group=[0, 0, 1, 1, 1], mask=mask)
    approx(first(canonrl.advantages("psr_nsr", **args), mask), [0.1, -1.0, 0.1, -1.0, 0.0])
    approx(first(canonrl.advantages("psr_nsr", mode="psr", **args), mask), [1.0, 0.0, 1.0, 0.0, 0.0])
    approx(first(canonrl.advantages("psr_nsr", mode="nsr", **args), mask), [0.0, -1.0, 0.0, -1.0, 0.0])
    approx(first(canonrl.advantages("psr_nsr", positive_weight=0.5, **args), mask), [0.5, -1.0, 0.5, -1.0, 0.0])


def test_psr_nsr_paper_and_code_forms_on_plus_minus_one_rewards():
    args = dict(rewards=torch.tensor([1.0, -1.0, 0.75, 0.5]), group=[0, 1, 2, 3], mask=ones(4))
    # paper form: correct when r > 0.5
    approx(first(canonrl.advantages("psr_nsr", **args), ones(4)), [0.1, -1.0, 0.1, -1.0])
    # official arithmetic: lambda * r on r == 1, r - 1 on r in {0, -1}, r otherwise
    approx(first(canonrl.advantages("psr_nsr", form="code", **args), ones(4)), [0.1, -2.0, 0.75, 0.5])
    approx(first(canonrl.advantages("psr_nsr", form="code", mode="nsr", **args), ones(4)), [0.0, -2.0, 0.0, 0.0])
    approx(first(canonrl.advantages("psr_nsr", correct_threshold=0.0, **args), ones(4)), [0.1, -1.0, 0.1, 0.1])


def test_grpo_n_keeps_the_negative_part_of_the_z_score():
    out = canonrl.advantages("psr_nsr", mode="grpo_n", rewards=torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0]), group=[3, 3, 3, 8, 8], mask=ones(5))
    z = z_scores([1.0, 0.0, 0.0])
    approx(first(out, ones(5)), [0.0, z[1], z[2], 0.0, 0.0])


def test_psr_nsr_bad_hyperparameters():
    with pytest.raises(ValueError, match="mode must be one of"):
        get_estimator("psr_nsr", mode="both")
    with pytest.raises(ValueError, match="positive_weight"):
        get_estimator("psr_nsr", positive_weight=-0.1)
    with pytest.raises(ValueError, match="form must be one of"):
        get_estimator("psr_nsr", form="verl")


# ----------------------------------------------------------------------------------------------------------------
# unlikely
# ----------------------------------------------------------------------------------------------------------------


def test_unlikely_ranks_by_mean_logprob_and_reshapes_rewards():
    # group 11 (rows 0, 2, 4, 6): all correct, mean log-probs -1, -3, -2, -4 -> ranks 3, 1, 2, 0 (0 = least likely)
    # group 5 (rows 1, 3, 5): all wrong -> exactly 0; padding holds NaN, which is ignored
    logprobs = torch.tensor(
        [[-1.0, -1.0], [-0.1, -0.1], [-2.0, -4.0], [-0.5, -0.7], [-2.0, float("nan")], [-0.2, -0.2], [-4.0, -4.0]]
    )
    mask = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 1], [1, 0], [1, 1], [1, 1]], dtype=torch.float32)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    out = canonrl.advantages("unlikely", rewards=rewards, group=[11, 5, 11, 5, 11, 5, 11], mask=mask, logprobs=logprobs)
    reshaped = [1 - 0.25 * 3 / 4, 1 - 0.25 * 1 / 4, 1 - 0.25 * 2 / 4, 1.0]
    z = z_scores(reshaped)
    approx(first(out, mask), [z[0], 0.0, z[1], 0.0, z[2], 0.0, z[3]])
    assert first(out, mask)[6] > 0 > first(out, mask)[0]  # the least likely correct answer gains most


def test_unlikely_ties_and_singletons():
    logprobs = torch.tensor([[-1.0], [-1.0], [-2.0], [-3.0]])
    args = dict(rewards=torch.tensor([1.0, 1.0, 1.0, 1.0]), group=[0, 0, 0, 1], mask=ones(4, 1), logprobs=logprobs)
    # average: the tied rows share rank (1 + 2) / 2 = 1.5
    z = z_scores([1 - 0.25 * 1.5 / 3, 1 - 0.25 * 1.5 / 3, 1.0])
    approx(first(canonrl.advantages("unlikely", **args), ones(4, 1)), [z[0], z[1], z[2], 0.0])
    z = z_scores([1 - 0.25 * 1 / 3, 1 - 0.25 * 2 / 3, 1.0])
    approx(first(canonrl.advantages("unlikely", ties="batch_order", **args), ones(4, 1)), [z[0], z[1], z[2], 0.0])
    raw = canonrl.advantages("unlikely", singleton="raw", **args)
    assert first(raw, ones(4, 1))[3] == pytest.approx(1 / (1 + 1e-6))


def test_unlikely_needs_logprobs_and_checks_hyperparameters():
    with pytest.raises(ValueError, match="needs 'logprobs'"):
        canonrl.advantages("unlikely", rewards=torch.ones(2), group=[0, 0], mask=ones(2))
    with pytest.raises(ValueError, match="logprobs is NaN or Inf inside the mask at rows \\[1\\]"):
        canonrl.advantages("unlikely", rewards=torch.ones(2), group=[0, 0], mask=ones(2, 1), logprobs=torch.tensor([[0.0], [float("nan")]]))
    with pytest.raises(ValueError, match="beta"):
        get_estimator("unlikely", beta=-1.0)
    with pytest.raises(ValueError, match="ties must be one of"):
        get_estimator("unlikely", ties="random")


# ----------------------------------------------------------------------------------------------------------------
# hadw
# ----------------------------------------------------------------------------------------------------------------

B1 = dict(rewards=torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 0.0]), group=[0, 0, 1, 1, 1, 1], mask=ones(6))  # y = 2/3
B2 = dict(rewards=torch.tensor([1.0, 0.0, 0.0, 0.0]), group=[4, 4, 4, 4], mask=ones(4))  # y = 1/4
B2b = dict(rewards=torch.tensor([1.0, 1.0, 0.0, 0.0]), group=[4, 4, 4, 4], mask=ones(4))  # y = 1/2


def weighted(z, diff, lam=1.3):
    """lambda exp(-sgn(z) sgn(diff) |diff|) z."""
    sign = lambda x: (x > 0) - (x < 0)  # noqa: E731
    return [lam * math.exp(-sign(a) * sign(diff) * abs(diff)) * a for a in z]


def test_hadw_kalman_anchor_over_steps():
    est = get_estimator("hadw")
    assert est.stateful and est.anchor is None
    out = est(**B1, step=1)
    # first step: prior = batch accuracy 2/3; sigma over [2/3] = 0 -> eta 0 -> anchor stays 2/3
    y1 = 4 / 6
    expected = weighted(z_scores([1.0, 0.0]), 0.5 - y1) + weighted(z_scores([1.0, 1.0, 1.0, 0.0]), 0.75 - y1)
    approx(first(out, ones(6)), expected)
    assert est.anchor == pytest.approx(y1) and est.eta_t == 0.0

    out = est(**B2, step=2)
    sigma = abs(y1 - 0.25) / 2  # population std of [2/3, 1/4]
    posterior = (1 - sigma) * y1 + sigma * 0.25
    approx(first(out, ones(4)), weighted(z_scores([1.0, 0.0, 0.0, 0.0]), 0.25 - y1))  # weighted with the prior 2/3
    assert est.used_anchor == pytest.approx(y1)
    assert est.anchor == pytest.approx(posterior)

    again = est(**B2, step=2)  # the same step twice: idempotent
    assert torch.equal(again, out) and est.anchor == pytest.approx(posterior)
    est(**B2b, step=2)  # a different batch at the same step replaces the step's observation
    assert est.anchor == pytest.approx((1 - 1 / 12) * y1 + (1 / 12) * 0.5)
    assert est.accuracies == pytest.approx([y1, 0.5])

    anchor_2 = est.anchor
    out = est(**B2, step=3)
    approx(first(out, ones(4)), weighted(z_scores([1.0, 0.0, 0.0, 0.0]), 0.25 - anchor_2))
    est.reset()
    assert est.anchor is None and est.accuracies == []


def test_hadw_hard_and_official_anchors():
    hard = get_estimator("hadw", anchor="hard", h=2)
    hard(**B1, step=1)
    assert hard.anchor == pytest.approx(2 / 3)
    hard(**B2, step=2)
    assert hard.used_anchor == pytest.approx(2 / 3) and hard.anchor == pytest.approx((2 / 3 + 1 / 4) / 2)
    hard(**B2b, step=3)
    assert hard.used_anchor == pytest.approx(11 / 24) and hard.anchor == pytest.approx((1 / 4 + 1 / 2) / 2)

    official = get_estimator("hadw", anchor="official", window=2, lambda_scale=1.5)
    official(**B1, step=1)
    out = official(**B2, step=2)  # the window includes the current batch: anchor (2/3 + 1/4) / 2
    approx(first(out, ones(4)), weighted(z_scores([1.0, 0.0, 0.0, 0.0]), 0.25 - 11 / 24, lam=1.5))
    current_only = get_estimator("hadw", anchor="official", window=0)
    current_only(**B1, step=1)
    current_only(**B2, step=2)
    assert current_only.used_anchor == pytest.approx(0.25)


def test_hadw_init_anchor_cap_base_and_edge_cases():
    est = get_estimator("hadw", init_anchor=0.5, base="dr_grpo")
    out = est(**B1, step=1)
    approx(first(out, ones(6))[:2], weighted([0.5, -0.5], 0.0))  # diff 0: every advantage times lambda
    # the cap on |diff|: rewards 100 / 0 against an anchor of 0 -> M = min(50, 2)
    est = get_estimator("hadw", init_anchor=0.0, base="dr_grpo")
    out = est(rewards=torch.tensor([100.0, 0.0]), group=[0, 0], mask=ones(2), step=1)
    approx(first(out, ones(2)), [1.3 * math.exp(-2.0) * 50, 1.3 * math.exp(2.0) * -50], tol=1e-3)
    # all-equal groups and singletons 0; a fully masked batch changes nothing
    est = get_estimator("hadw")
    mask = ones(4)
    mask[3] = 0
    out = est(rewards=torch.tensor([1.0, 1.0, 0.0, 5.0]), group=[0, 0, 1, 1], mask=mask, step=1)
    assert (out == 0).all()
    before = est.state()
    out = est(rewards=torch.tensor([1.0, 0.0]), group=[0, 0], mask=torch.zeros(2, 3), step=2)
    assert (out == 0).all() and est.state()["anchor"] == before["anchor"]


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(anchor="ema"), "anchor must be one of"),
        (dict(lambda_scale=0.0), "lambda_scale"),
        (dict(eta=-1.0), "eta"),
        (dict(m=0), "m must be an integer >= 1"),
        (dict(h=1.5), "h must be an integer"),
        (dict(window=-1), "window must be an integer >= 0"),
        (dict(init_anchor=float("nan")), "init_anchor"),
        (dict(max_magnitude=100.0), "max_magnitude"),
        (dict(base="hadw"), "base must be another estimator"),
        (dict(base="ktae"), "base must be a sequence-level estimator"),
    ],
)
def test_hadw_bad_hyperparameters(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        get_estimator("hadw", **kwargs)


def test_registry_flags():
    infos = {i.name: i for i in canonrl.estimators()}
    assert infos["hadw"].stateful and not infos["hadw"].verified
    assert not infos["unlikely"].verified and not infos["aapo"].verified
    assert infos["remax"].requires == ("greedy_rewards",) and infos["aapo"].requires == ("reference_rewards",)
    assert infos["unlikely"].requires == ("logprobs",)
    assert {h.name: h.default for h in infos["psr_nsr"].hyperparameters}["positive_weight"] == 0.1
