"""Hand-computed values for the baseline estimators, the DAPO pieces and the registry."""

import math

import pytest
import torch

import canonrl
from canonrl import dynamic_sampling_keep, overlong_penalty
from conftest import full_mask, per_response

REWARDS = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 0])
GROUPS = torch.tensor([7, 7, 7, 7, 3, 3, 3, 3])  # non-contiguous ids


def adv(name, rewards=REWARDS, group=GROUPS, mask=None, **kw):
    mask = full_mask(len(rewards)) if mask is None else mask
    return canonrl.advantages(name, rewards=rewards, group=group, mask=mask, **kw)


def test_grpo_unbiased_std_by_default():
    # group 7: mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    got = per_response(adv("grpo", eps=0.0))
    assert torch.allclose(got[:4], torch.tensor([1.5, -0.5, -0.5, -0.5]))
    assert torch.allclose(got[4:], torch.tensor([0.5, 0.5, 0.5, -1.5]))


def test_grpo_eps_and_population_std():
    got = per_response(adv("grpo"))
    assert got[0].item() == pytest.approx(0.75 / (0.5 + 1e-6), rel=1e-6)
    population = per_response(adv("grpo", std="population", eps=0.0))
    assert population[0].item() == pytest.approx(0.75 / math.sqrt(0.75 / 4), rel=1e-6)


def test_grpo_batch_and_no_scale():
    batch_std = math.sqrt(8 * 0.25 / 7)  # unbiased std of all 8 rewards (mean 0.5)
    got = per_response(adv("grpo", scale="batch", eps=0.0))
    assert got[4].item() == pytest.approx(0.25 / batch_std, rel=1e-6)
    assert torch.equal(per_response(adv("grpo", scale="none")), per_response(adv("dr_grpo")))


def test_dr_grpo_and_rloo():
    assert torch.allclose(per_response(adv("dr_grpo"))[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]))
    # leave-one-out: 1 - 0 and 0 - 1/3
    assert torch.allclose(per_response(adv("rloo"))[:4], torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))


def test_all_equal_group_is_exactly_zero_for_awkward_floats():
    rewards = torch.full((3,), 0.1)  # 0.1 + 0.1 + 0.1 != 0.3 in float32: the mean is not exactly 0.1
    for name in ("grpo", "dr_grpo", "rloo", "dapo"):
        got = adv(name, rewards=rewards, group=torch.zeros(3, dtype=torch.long))
        assert torch.equal(got, torch.zeros_like(got)), name


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_singletons_zero_by_default_raw_on_request(name):
    rewards = torch.tensor([0.7, 1.0, 0.0])
    group = ["a", "b", "b"]
    assert per_response(adv(name, rewards=rewards, group=group))[0].item() == 0.0
    raw = per_response(adv(name, rewards=rewards, group=group, singleton="raw"))[0].item()
    expected = 0.7 / (1 + 1e-6) if name == "grpo" else 0.7
    assert raw == pytest.approx(expected, rel=1e-6)


def test_fully_masked_row_is_zero_and_does_not_shift_its_group():
    mask = full_mask(5)
    mask[4] = 0
    rewards = torch.tensor([1.0, 0, 0, 0, 1.0])
    got = canonrl.advantages("grpo", rewards=rewards, group=torch.zeros(5, dtype=torch.long), mask=mask, eps=0.0)
    assert torch.equal(got[4], torch.zeros(3))
    assert torch.allclose(per_response(got)[:4], torch.tensor([1.5, -0.5, -0.5, -0.5]))


def test_reinforce_pp_hand_computed():
    rewards = torch.tensor([1.0, 0.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    # gamma 1: token returns 1, 1, 0 -> mean 2/3, unbiased std sqrt(1/3)
    got = canonrl.advantages("reinforce_pp", rewards=rewards, group=[0, 1], mask=mask)
    s = math.sqrt(1 / 3)
    assert torch.allclose(got, torch.tensor([[(1 / 3) / s, (1 / 3) / s], [-(2 / 3) / s, 0.0]]), atol=1e-5)
    # gamma 0.5: returns 0.5, 1 | 0 -> mean 0.5, std 0.5
    got = canonrl.advantages("reinforce_pp", rewards=rewards, group=[0, 1], mask=mask, gamma=0.5)
    assert torch.allclose(got, torch.tensor([[0.0, 1.0], [-1.0, 0.0]]), atol=1e-5)


def test_reinforce_pp_token_rewards_long_discount_is_finite_and_exact():
    # 3000 tokens with gamma 0.9 needs the chunked scan (0.9^-3000 overflows float64)
    tokens = 3000
    token_rewards = torch.zeros(1, tokens)
    token_rewards[0, -1] = 1.0
    token_rewards[0, 10] = 0.5
    mask = torch.ones(1, tokens)
    from canonrl.ops import discounted_returns

    returns = discounted_returns(token_rewards, mask, 0.9)
    positions = torch.arange(tokens, dtype=torch.float64)
    expected = 0.9 ** (tokens - 1 - positions) + torch.where(positions <= 10, 0.5 * 0.9 ** (10 - positions), 0.0)
    assert torch.allclose(returns[0].double(), expected, rtol=1e-5, atol=1e-30)


def test_reinforce_pp_baseline_hand_computed():
    rewards = torch.tensor([1.0, 0.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    # s = +0.5, -0.5 on tokens (.5, .5, -.5): mean 1/6, unbiased var 1/3
    got = canonrl.advantages("reinforce_pp_baseline", rewards=rewards, group=[0, 0], mask=mask)
    s = math.sqrt(1 / 3)
    assert torch.allclose(got, torch.tensor([[(1 / 3) / s, (1 / 3) / s], [-(2 / 3) / s, 0.0]]), atol=1e-5)


def test_overlong_penalty_matches_dapo_equation():
    lengths = torch.tensor([4, 6, 8, 10, 12])
    got = overlong_penalty(lengths, max_length=10, buffer_length=4)
    assert torch.allclose(got, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))
    assert overlong_penalty(torch.tensor([16384 + 2048])).item() == pytest.approx(-0.5)  # published defaults
    with pytest.raises(ValueError, match="buffer_length"):
        overlong_penalty(lengths, max_length=4, buffer_length=10)


def test_dapo_estimator_filters_constant_accuracy_groups():
    mask = torch.zeros(2, 10)
    mask[0, :4] = 1
    mask[1, :8] = 1  # length 8 -> penalty -0.5 with L_max 10, L_cache 4
    kw = dict(rewards=torch.tensor([1.0, 1.0]), group=[0, 0], mask=mask, max_length=10, buffer_length=4)
    assert torch.equal(canonrl.advantages("dapo", **kw), torch.zeros(2, 10))
    got = per_response(canonrl.advantages("dapo", filter_groups=False, eps=0.0, **kw))
    assert torch.allclose(got, torch.tensor([1 / math.sqrt(2), -1 / math.sqrt(2)]), atol=1e-6)


def test_dynamic_sampling_keep():
    rewards = torch.tensor([1.0, 1, 0, 1, 0])
    keep = dynamic_sampling_keep(rewards, ["a", "a", "b", "b", "c"])
    assert keep.tolist() == [False, False, True, True, True]
    keep = dynamic_sampling_keep(rewards, ["a", "a", "b", "b", "c"], keep_singletons=False)
    assert keep.tolist() == [False, False, True, True, False]


def test_registry_lists_every_estimator_with_its_paper_and_inputs():
    infos = {info.name: info for info in canonrl.estimators()}
    assert {"grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "dapo", "canon"} <= set(infos)
    for info in infos.values():
        assert info.paper is not None and info.paper.arxiv and info.description
        assert info.inputs[:3] == ("rewards", "group", "mask")
        assert all(h.help for h in info.hyperparameters), info.name
    assert infos["canon"].paper.arxiv == "2509.23962"
    assert {h.name: h.default for h in infos["grpo"].hyperparameters}["eps"] == 1e-6


def test_estimator_objects_count_steps():
    estimator = canonrl.get_estimator("grpo")
    estimator(rewards=REWARDS, group=GROUPS, mask=full_mask(8))
    estimator(rewards=REWARDS, group=GROUPS, mask=full_mask(8))
    assert estimator.step == 2
    estimator(rewards=REWARDS, group=GROUPS, mask=full_mask(8), step=10)
    assert estimator.step == 10


def test_chunked_discounted_returns_with_holes_match_a_naive_scan():
    # gamma 0.5 makes chunks of 865 tokens, so 2000 tokens cross two chunk boundaries
    from canonrl.ops import discounted_returns

    generator = torch.Generator().manual_seed(0)
    rows, tokens, gamma = 3, 2000, 0.5
    mask = (torch.rand(rows, tokens, generator=generator) < 0.7).float()
    token_rewards = torch.randn(rows, tokens, generator=generator)
    expected = torch.zeros(rows, tokens, dtype=torch.float64)
    running = torch.zeros(rows, dtype=torch.float64)
    for t in reversed(range(tokens)):  # per mask token: skip masked positions, as verl 0.9 does
        new = token_rewards[:, t].double() + gamma * running
        expected[:, t] = new * mask[:, t]
        running = torch.where(mask[:, t] > 0, new, running)
    assert torch.allclose(discounted_returns(token_rewards, mask, gamma).double(), expected, atol=1e-5)
