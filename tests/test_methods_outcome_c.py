"""ADORA, CAPO, ProGRPO (ARM) and ACE: hand-computed values against the documented equations, edge cases, options
and hyperparameter errors. Expected numbers are worked out by hand (comments) or with plain Python arithmetic."""

import math

import numpy as np
import pytest
import torch

import canonrl
from canonrl.batch import make_batch
from canonrl.methods.progrpo import lowest_fraction_confidence

# GRPO z-scores (unbiased std, eps 1e-6 negligible at this tolerance) of the groups used below:
Z2 = 1 / math.sqrt(2)  # rewards [1, 0]: mean 0.5, std sqrt(0.5)
Z3_HI, Z3_LO = 2 / math.sqrt(3), -1 / math.sqrt(3)  # rewards [1, 0, 0]: mean 1/3, std sqrt(1/3)
Z4 = math.sqrt(3) / 2  # rewards [1, 0, 1, 0]: mean 0.5, std sqrt(1/3)


def mask_of(lengths, tokens=8, left=False):
    positions = torch.arange(tokens)
    lengths = torch.tensor(lengths)
    if left:
        return (positions[None, :] >= tokens - lengths[:, None]).float()
    return (positions[None, :] < lengths[:, None]).float()


def first(adv, mask):
    """Each row's value at its first mask position (0 for fully masked rows)."""
    index = (mask != 0).float().argmax(-1)
    values = adv.gather(1, index[:, None])[:, 0]
    return torch.where((mask != 0).any(-1), values, 0.0)


def close(actual, expected, tol=1e-5):
    expected = torch.tensor(expected, dtype=torch.float64)
    assert torch.allclose(actual.double(), expected, atol=tol, rtol=tol), (actual.tolist(), expected.tolist())


# ---------------------------------------------------------------------------------------------------------------
# ADORA
# ---------------------------------------------------------------------------------------------------------------


def test_adora_length_criterion_by_hand():
    # Group 7 (rows 0, 2, 4, 6): rewards [1, 0, 1, 0], lengths [5, 3, 2, 4]: longest correct 5 > mean incorrect
    # 3.5 -> weight 1. Group 2 (rows 1, 3, 5): rewards [1, 0, 0], lengths [2, 3, 5]: 2 > 4 is false -> lam = 0.1.
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    group = torch.tensor([7, 2, 7, 2, 7, 2, 7])
    mask = mask_of([5, 2, 3, 3, 2, 5, 4])
    out = canonrl.advantages("adora", rewards=rewards, group=group, mask=mask)
    close(first(out, mask), [Z4, 0.1 * Z3_HI, -Z4, 0.1 * Z3_LO, Z4, 0.1 * Z3_LO, -Z4])
    assert (out[mask == 0] == 0).all()
    assert ((out == first(out, mask)[:, None]) | (mask == 0)).all()  # sequence-level
    out = canonrl.advantages("adora", rewards=rewards, group=group, mask=mask, lam=0.5)
    close(first(out, mask)[[1, 3]], [0.5 * Z3_HI, 0.5 * Z3_LO])


def test_adora_equal_lengths_are_not_advantageous():
    # The criterion is strict (max_pos > mean_neg), as the code: equal lengths get lam.
    mask = mask_of([4, 4])
    out = canonrl.advantages("adora", rewards=torch.tensor([1.0, 0.0]), group=[0, 0], mask=mask)
    close(first(out, mask), [0.1 * Z2, -0.1 * Z2])


def test_adora_truncated_incorrect_responses_leave_the_mean():
    # rewards [1, 0, 0], lengths [3, 2, 6]. Without truncation: 3 > (2 + 6) / 2 = 4 false -> lam. With
    # truncation_length 6 the 6-token response is truncated: 3 > 2 -> weight 1.
    rewards, mask = torch.tensor([1.0, 0.0, 0.0]), mask_of([3, 2, 6])
    plain = canonrl.advantages("adora", rewards=rewards, group=[1, 1, 1], mask=mask)
    close(first(plain, mask), [0.1 * Z3_HI, 0.1 * Z3_LO, 0.1 * Z3_LO])
    cut = canonrl.advantages("adora", rewards=rewards, group=[1, 1, 1], mask=mask, truncation_length=6)
    close(first(cut, mask), [Z3_HI, Z3_LO, Z3_LO])
    # Every incorrect response truncated: no incorrect mean (-inf upstream) -> advantageous.
    mask = mask_of([1, 8, 8])
    out = canonrl.advantages("adora", rewards=rewards, group=[1, 1, 1], mask=mask, truncation_length=8)
    close(first(out, mask), [Z3_HI, Z3_LO, Z3_LO])


def test_adora_group_without_a_correct_response():
    # Graded rewards [0.2, 0, 0.4], none > 0.5: z = [0, -1, 1] (mean 0.2, std 0.2).
    rewards, mask = torch.tensor([0.2, 0.0, 0.4]), mask_of([3, 5, 2])
    llm = canonrl.advantages("adora", rewards=rewards, group=[4, 4, 4], mask=mask)
    close(first(llm, mask), [0.0, -0.1, 0.1])
    vl = canonrl.advantages("adora", rewards=rewards, group=[4, 4, 4], mask=mask, no_correct="one")
    close(first(vl, mask), [0.0, -1.0, 1.0])


def test_adora_correct_threshold_logic_rl():
    # Logic-RL rewards: 3 is correct, -0.5 and 1 are not (threshold 1.01). Lengths [2, 6, 4]: 2 > 5 false -> lam.
    rewards, mask = torch.tensor([3.0, -0.5, 1.0]), mask_of([2, 6, 4])
    mean = (3.0 - 0.5 + 1.0) / 3
    std = math.sqrt(sum((r - mean) ** 2 for r in (3.0, -0.5, 1.0)) / 2)
    expected = [0.1 * (r - mean) / std for r in (3.0, -0.5, 1.0)]
    out = canonrl.advantages("adora", rewards=rewards, group=[0, 0, 0], mask=mask, correct_threshold=1.01)
    close(first(out, mask), expected)
    # With the default threshold 0.5 the reward-1 response (length 4) is correct: max 4 > 6 false -> still lam;
    # with lengths [2, 3, 7] it is 7 > 3 -> 1.
    mask = mask_of([2, 3, 7])
    out = canonrl.advantages("adora", rewards=rewards, group=[0, 0, 0], mask=mask)
    close(first(out, mask), [(r - mean) / std for r in (3.0, -0.5, 1.0)])


def test_adora_fully_masked_rows_take_no_part():
    # rewards [1, 0, 0(fully masked)], lengths [3, 4, 0]: the empty row must not enter the incorrect mean (which
    # would be 2 and make the group advantageous). Garbage and NaN in its padding are ignored.
    rewards = torch.tensor([1.0, 0.0, 0.0])
    mask = mask_of([3, 4, 0])
    out = canonrl.advantages("adora", rewards=rewards, group=["a", "a", "a"], mask=mask)
    close(first(out, mask), [0.1 * Z2, -0.1 * Z2, 0.0])
    assert (out[2] == 0).all()


def test_adora_singletons_and_all_equal_groups():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])
    mask = mask_of([3, 4, 2, 5, 1])
    out = canonrl.advantages("adora", rewards=rewards, group=[9, 9, 3, 5, 5], mask=mask)
    assert (out == 0).all()
    raw = canonrl.advantages(
        "adora", rewards=rewards, group=[9, 9, 3, 5, 5], mask=mask, base_params={"singleton": "raw"}
    )
    close(first(raw, mask)[2], 1.0 / (1 + 1e-6))  # a correct singleton: max 2 > mean of none -> weight 1


def test_adora_base_estimator():
    # dr_grpo base: r - mean; group [1, 0, 1, 0] lengths [5, 3, 2, 4] is advantageous -> +-0.5.
    rewards, mask = torch.tensor([1.0, 0.0, 1.0, 0.0]), mask_of([5, 3, 2, 4])
    out = canonrl.advantages("adora", rewards=rewards, group=[0] * 4, mask=mask, base="dr_grpo")
    close(first(out, mask), [0.5, -0.5, 0.5, -0.5])


# ---------------------------------------------------------------------------------------------------------------
# CAPO
# ---------------------------------------------------------------------------------------------------------------


def test_capo_positive_only_before_the_switch_then_all():
    rewards, mask = torch.tensor([1.0, 0.0, 0.0, 0.5, 0.5]), mask_of([2, 3, 4, 1, 6])
    group = [8, 8, 8, 1, 1]  # group 1 is all-equal: 0 (kept, A >= 0)
    estimator = canonrl.get_estimator("capo", switch_step=3)
    for step in (1, 3):
        close(first(estimator(rewards=rewards, group=group, mask=mask, step=step), mask), [Z3_HI, 0, 0, 0, 0])
    for step in (4, 100):
        close(first(estimator(rewards=rewards, group=group, mask=mask, step=step), mask), [Z3_HI, Z3_LO, Z3_LO, 0, 0])


def test_capo_switch_from_fraction_and_own_step_count():
    estimator = canonrl.get_estimator("capo")  # 0.2 * 150 = 30
    assert estimator.switch_at == 30 and estimator.positive_only(30) and not estimator.positive_only(31)
    assert canonrl.get_estimator("capo", switch_fraction=0.29, total_steps=100).switch_at == 29  # 28.999... in float
    assert canonrl.get_estimator("capo", switch_fraction=0.0).switch_at == 0
    assert canonrl.get_estimator("capo", switch_step=7, switch_fraction=0.5).switch_at == 7  # switch_step wins
    estimator = canonrl.get_estimator("capo", switch_step=2)
    rewards, mask = torch.tensor([1.0, 0.0]), mask_of([2, 2])
    calls = [first(estimator(rewards=rewards, group=[0, 0], mask=mask), mask) for _ in range(3)]  # steps 1, 2, 3
    close(calls[0], [Z2, 0.0])
    close(calls[1], [Z2, 0.0])
    close(calls[2], [Z2, -Z2])


def test_capo_switch_step_zero_is_the_base():
    rewards = torch.tensor([0.3, -1.0, 2.0, 1.0, 0.0, 7.0])
    group, mask = [5, 5, 5, 2, 2, 9], mask_of([1, 4, 4, 2, 0, 3])
    base = canonrl.advantages("grpo", rewards=rewards, group=group, mask=mask)
    assert torch.equal(canonrl.advantages("capo", rewards=rewards, group=group, mask=mask, switch_step=0, step=1), base)
    early = canonrl.advantages("capo", rewards=rewards, group=group, mask=mask, step=1)
    assert torch.equal(early, base.clamp_min(0))
    rloo = canonrl.advantages("capo", rewards=rewards, group=group, mask=mask, base="rloo", switch_step=0, step=1)
    # rloo on [0.3, -1, 2]: r_i - mean of the others
    close(first(rloo, mask)[:3], [0.3 - 0.5, -1.0 - 1.15, 2.0 - (-0.35)])
    rloo = canonrl.advantages("capo", rewards=rewards, group=group, mask=mask, base="rloo", step=1)
    close(first(rloo, mask)[:3], [0.0, 0.0, 2.35])


# ---------------------------------------------------------------------------------------------------------------
# ProGRPO (ARM)
# ---------------------------------------------------------------------------------------------------------------


def test_progrpo_lowest_fraction_confidence_by_hand():
    logprobs = torch.tensor(
        [
            [-0.1, -2.0, -0.5, -3.0, -0.2, 0.0, 0.0, 0.0, 0.0, 0.0],  # 5 tokens
            [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0, -9.0, -10.0],  # 10 tokens
            [float("nan"), float("inf"), -1.0, -0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # left part padding, 2 tokens
        ]
    )
    mask = torch.zeros(3, 10)
    mask[0, :5] = 1
    mask[1, :] = 1
    mask[2, 2:4] = 1
    batch = make_batch(rewards=torch.zeros(3), group=[0, 1, 2], mask=mask, logprobs=logprobs)
    # 0.2: ceil(1.0) = 1 -> lowest -3; ceil(2.0) = 2 -> mean(-10, -9); ceil(0.4) = 1 -> -1
    close(lowest_fraction_confidence(batch, 0.2), [math.exp(-3.0), math.exp(-9.5), math.exp(-1.0)])
    # 0.3: ceil(1.5) = 2; 0.3 * 10 = 3.0000000000000004 must give 3, not 4; ceil(0.6) = 1
    close(lowest_fraction_confidence(batch, 0.3), [math.exp(-2.5), math.exp(-9.0), math.exp(-1.0)])
    # 1.0: the geometric mean probability of all tokens
    close(lowest_fraction_confidence(batch, 1.0), [math.exp(-5.8 / 5), math.exp(-5.5), math.exp(-0.75)])


def test_progrpo_lowest_fraction_matches_a_loop_reference():
    rng = np.random.default_rng(0)
    B, T = 64, 17
    mask = rng.random((B, T)) < rng.uniform(0.1, 0.9, (B, 1))
    logprobs = -rng.exponential(2.0, (B, T)).astype(np.float32)
    logprobs[~mask] = np.nan
    batch = make_batch(rewards=torch.zeros(B), group=list(range(B)), mask=torch.from_numpy(mask),
                       logprobs=torch.from_numpy(logprobs))
    for fraction in (0.2, 0.35, 1.0):
        expected = []
        for row, keep in zip(logprobs.tolist(), mask.tolist()):
            values = sorted(v for v, k in zip(row, keep) if k)
            if not values:
                expected.append(1.0)
                continue
            k = max(1, min(len(values), math.ceil(round(fraction * len(values), 9))))
            expected.append(math.exp(sum(values[:k]) / k))
        close(lowest_fraction_confidence(batch, fraction), expected)


def progrpo_batch():
    # Group 3 (rows 0, 2): rewards [1, 0] -> z = +-Z2, reweighted. Group 6 (rows 1, 4): [0, 0] -> no correct: 0.
    # Group 1 (rows 3, 5): [1, 1] all correct -> z = 0 + the confidence term. Row 6: a singleton.
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    group = torch.tensor([3, 6, 3, 1, 6, 1, 0])
    mask = mask_of([2, 1, 3, 1, 2, 1, 1], tokens=4)
    logprobs = torch.full((7, 4), float("nan"))  # padding holds NaN
    logprobs[0, :2] = torch.tensor([-0.2, -1.0])  # 2 tokens: ceil(0.4) = 1 -> c = e^-1
    logprobs[1, :1] = -0.7
    logprobs[2, :3] = torch.tensor([-2.0, -0.1, -0.3])  # ceil(0.6) = 1 -> c = e^-2
    logprobs[3, :1] = -0.5  # c = e^-0.5
    logprobs[4, :2] = torch.tensor([-0.4, -0.6])
    logprobs[5, :1] = -1.5  # c = e^-1.5
    logprobs[6, :1] = -0.9
    confidence = torch.tensor([0.5, 0.3, 0.5, 0.8, 0.3, 0.8, 0.6])
    return dict(rewards=rewards, group=group, mask=mask, logprobs=logprobs, prompt_confidence=confidence)


def test_progrpo_by_hand():
    fields = progrpo_batch()
    out = first(canonrl.advantages("progrpo", **fields), fields["mask"])
    close(out, [Z2 + (0.5 - math.exp(-1)), 0.0, -Z2 + (0.5 - math.exp(-2)), 0.8 - math.exp(-0.5), 0.0,
                0.8 - math.exp(-1.5), 0.0])
    out = first(canonrl.advantages("progrpo", alpha=0.25, **fields), fields["mask"])
    close(out, [Z2 + 0.25 * (0.5 - math.exp(-1)), 0.0, -Z2 + 0.25 * (0.5 - math.exp(-2)),
                0.25 * (0.8 - math.exp(-0.5)), 0.0, 0.25 * (0.8 - math.exp(-1.5)), 0.0])


def test_progrpo_options():
    fields = progrpo_batch()
    out = first(canonrl.advantages("progrpo", skip_all_correct=True, **fields), fields["mask"])
    close(out, [Z2 + (0.5 - math.exp(-1)), 0.0, -Z2 + (0.5 - math.exp(-2)), 0.0, 0.0, 0.0, 0.0])
    out = first(canonrl.advantages("progrpo", only_correct=True, **fields), fields["mask"])
    close(out, [Z2 + (0.5 - math.exp(-1)), 0.0, -Z2, 0.8 - math.exp(-0.5), 0.0, 0.8 - math.exp(-1.5), 0.0])
    out = first(canonrl.advantages("progrpo", low_fraction=1.0, **fields), fields["mask"])
    close(out[[0, 2]], [Z2 + 0.5 - math.exp(-0.6), -Z2 + 0.5 - math.exp(-2.4 / 3)])
    out = first(canonrl.advantages("progrpo", alpha=0.0, **fields), fields["mask"])
    close(out, [Z2, 0.0, -Z2, 0.0, 0.0, 0.0, 0.0])


def test_progrpo_padding_left_and_holes_and_fully_masked_rows():
    # The same responses stored left-padded, or with holes, give the same values; a fully masked row gives 0.
    fields = progrpo_batch()
    right = first(canonrl.advantages("progrpo", **fields), fields["mask"])
    flipped = {**fields, "mask": fields["mask"].flip(-1), "logprobs": fields["logprobs"].flip(-1)}
    close(first(canonrl.advantages("progrpo", **flipped), flipped["mask"]), right.tolist())
    extra = {k: torch.cat([v, v[:1]]) if isinstance(v, torch.Tensor) else v for k, v in fields.items()}
    extra["mask"][-1] = 0
    extra["logprobs"][-1] = float("inf")
    out = canonrl.advantages("progrpo", **extra)
    assert (out[-1] == 0).all()
    close(first(out, extra["mask"])[:-1], right.tolist())


def test_progrpo_bad_inputs():
    fields = progrpo_batch()
    bad = {**fields, "logprobs": fields["logprobs"].clone()}
    bad["logprobs"][2, 1] = float("nan")  # inside the mask
    with pytest.raises(ValueError, match=r"logprobs is NaN or Inf inside the mask at rows \[2\]"):
        canonrl.advantages("progrpo", **bad)
    with pytest.raises(ValueError, match="prompt_confidence"):
        canonrl.advantages("progrpo", **{k: v for k, v in fields.items() if k != "prompt_confidence"})
    with pytest.raises(ValueError, match="logprobs"):
        canonrl.advantages("progrpo", **{k: v for k, v in fields.items() if k != "logprobs"})
    with pytest.raises(ValueError, match=r"prompt_confidence must lie in \(0, 1\]"):
        canonrl.advantages("progrpo", **{**fields, "prompt_confidence": fields["prompt_confidence"] + 0.5})


# ---------------------------------------------------------------------------------------------------------------
# ACE
# ---------------------------------------------------------------------------------------------------------------


def softplus(x):
    return math.log1p(math.exp(x))


def ace_batch():
    # Group 4 (rows 0, 1, 2): rewards [1, 0, 0] -> z = [Z3_HI, Z3_LO, Z3_LO]; c = [0.9, 0.5, -1.0].
    # Group 2 (rows 3, 4): rewards [0, 0] -> 0 whatever c.
    mask = mask_of([3, 2, 4, 1, 2], tokens=5)
    logprobs = torch.full((5, 5), float("nan"))
    ref = torch.full((5, 5), -7.0)
    logprobs[0, :3] = torch.tensor([-0.1, -0.2, -0.3])
    ref[0, :3] = torch.tensor([-0.4, -0.5, -0.6])  # c = 0.9
    logprobs[1, :2] = torch.tensor([-1.0, -0.5])
    ref[1, :2] = torch.tensor([-1.5, -0.5])  # c = 0.5
    logprobs[2, :4] = torch.tensor([-2.0, -1.0, -1.0, -1.0])
    ref[2, :4] = torch.tensor([-1.0, -1.0, -1.0, -1.0])  # -1
    logprobs[3, :1] = -0.1
    ref[3, :1] = -3.0
    logprobs[4, :2] = -0.1
    ref[4, :2] = -3.0
    return dict(rewards=torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0]), group=[4, 4, 4, 2, 2], mask=mask,
                logprobs=logprobs, ref_logprobs=ref)


def test_ace_by_hand():
    fields = ace_batch()
    out = first(canonrl.advantages("ace", **fields), fields["mask"])
    close(out, [Z3_HI, Z3_LO * (1 + softplus(0.5)), Z3_LO * (1 + softplus(-1.0)), 0.0, 0.0])
    out = first(canonrl.advantages("ace", alpha=0.5, **fields), fields["mask"])
    close(out, [Z3_HI, Z3_LO * (1 + 0.5 * softplus(0.5)), Z3_LO * (1 + 0.5 * softplus(-1.0)), 0.0, 0.0])


def test_ace_options():
    fields = ace_batch()
    relu = first(canonrl.advantages("ace", activation="relu", **fields), fields["mask"])
    close(relu, [Z3_HI, Z3_LO * 1.5, Z3_LO, 0.0, 0.0])
    normalised = first(canonrl.advantages("ace", length_normalize=True, **fields), fields["mask"])
    close(normalised, [Z3_HI, Z3_LO * (1 + softplus(0.25)), Z3_LO * (1 + softplus(-0.25)), 0.0, 0.0])
    plain = first(canonrl.advantages("ace", alpha=0.0, **fields), fields["mask"])
    close(plain, [Z3_HI, Z3_LO, Z3_LO, 0.0, 0.0])
    dr = first(canonrl.advantages("ace", base="dr_grpo", **fields), fields["mask"])
    close(dr, [2 / 3, -1 / 3 * (1 + softplus(0.5)), -1 / 3 * (1 + softplus(-1.0)), 0.0, 0.0])
    shift = canonrl.get_estimator("ace").confidence_shift(make_batch(**fields))
    close(shift, [0.9, 0.5, -1.0, 2.9, 5.8])


def test_ace_fractional_mask_weights_tokens_and_fully_masked_rows():
    fields = ace_batch()
    fields["mask"] = fields["mask"].clone()
    fields["mask"][1, 0] = 0.5  # c = 0.5 * 0.5 + 0 = 0.25
    out = canonrl.advantages("ace", **fields)
    assert math.isclose(out[1, 1].item(), Z3_LO * (1 + softplus(0.25)), rel_tol=1e-5)
    assert math.isclose(out[1, 0].item(), 0.5 * out[1, 1].item(), rel_tol=1e-6)  # broadcast times the mask value
    fields["mask"][2] = 0  # row 2 leaves the group: [1, 0] -> +-Z2
    out = canonrl.advantages("ace", **fields)
    assert (out[2] == 0).all()
    close(out[:2, 1], [Z2, -Z2 * (1 + softplus(0.25))])


def test_ace_bad_inputs():
    fields = ace_batch()
    bad = {**fields, "ref_logprobs": fields["ref_logprobs"].clone()}
    bad["ref_logprobs"][3, 0] = float("-inf")
    with pytest.raises(ValueError, match=r"ref_logprobs is NaN or Inf inside the mask at rows \[3\]"):
        canonrl.advantages("ace", **bad)
    with pytest.raises(ValueError, match="ref_logprobs"):
        canonrl.advantages("ace", **{k: v for k, v in fields.items() if k != "ref_logprobs"})
    huge = {**fields, "logprobs": fields["logprobs"].clone()}
    huge["logprobs"][1, :2] = 3e38  # finite, but the shift overflows float32
    with pytest.raises(ValueError, match=r"overflows float32 at rows \[1\]"):
        canonrl.advantages("ace", **huge)


# ---------------------------------------------------------------------------------------------------------------
# Registry, inputs and hyperparameter errors
# ---------------------------------------------------------------------------------------------------------------


def test_registry_entries():
    info = {i.name: i for i in canonrl.estimators()}
    assert info["adora"].verified and info["adora"].paper.arxiv == "2602.10019"
    for name in ("capo", "progrpo", "ace"):
        assert not info[name].verified and "best reading" in info[name].description.lower()
    assert info["progrpo"].requires == ("logprobs", "prompt_confidence")
    assert info["ace"].requires == ("logprobs", "ref_logprobs")
    assert info["capo"].paper.arxiv == "2512.02580" and info["ace"].paper.arxiv == "2602.21420"
    assert info["progrpo"].paper.arxiv == "2602.05281"
    # required inputs include the base's
    assert canonrl.get_estimator("capo", base="canon").required_inputs() == ("entropy",)
    assert set(canonrl.get_estimator("ace", base="canon").required_inputs()) == {"logprobs", "ref_logprobs", "entropy"}


@pytest.mark.parametrize(
    "name, hyperparameters, match",
    [
        ("adora", {"lam": -0.1}, "lam"),
        ("adora", {"no_correct": "zero"}, "no_correct"),
        ("adora", {"truncation_length": 0}, "truncation_length"),
        ("adora", {"truncation_length": 2.5}, "truncation_length"),
        ("adora", {"correct_threshold": float("nan")}, "correct_threshold"),
        ("adora", {"base": "ktae"}, "base must be a sequence-level estimator"),
        ("capo", {"switch_fraction": 1.5}, "switch_fraction"),
        ("capo", {"total_steps": 0}, "total_steps"),
        ("capo", {"switch_step": -1}, "switch_step"),
        ("capo", {"switch_step": 2.5}, "switch_step"),
        ("capo", {"base": "nope"}, "unknown estimator 'nope'"),
        ("progrpo", {"alpha": -1.0}, "alpha"),
        ("progrpo", {"low_fraction": 0.0}, "low_fraction"),
        ("progrpo", {"low_fraction": 1.5}, "low_fraction"),
        ("progrpo", {"skip_all_correct": "yes"}, "skip_all_correct"),
        ("ace", {"alpha": -0.5}, "alpha"),
        ("ace", {"activation": "tanh"}, "activation"),
        ("ace", {"length_normalize": 1}, "length_normalize"),
    ],
)
def test_bad_hyperparameters(name, hyperparameters, match):
    with pytest.raises(ValueError, match=match):
        canonrl.get_estimator(name, **hyperparameters)


def test_bad_base_params_name_the_hyperparameter():
    with pytest.raises(TypeError, match="unknown hyperparameter 'bogus'"):
        canonrl.get_estimator("ace", base_params={"bogus": 1})
