"""Q-RM ("qrm"): token-level RM scores Z_t / batch std(Z), the row's last masked token re-scored to the row mean."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import canonrl

#: Two rows, two prompts. Masked scores {1, 2, 3, -1, 0.5}: mean 1.1, population variance 9.2 / 5 = 1.84.
Z = torch.tensor([[1.0, 2.0, 3.0, 7.0], [-1.0, 0.5, 9.0, 9.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
S = math.sqrt(1.84)


def qrm(token_rewards=Z, mask=MASK, group=(0, 1), **params):
    return canonrl.advantages("qrm", token_rewards=token_rewards, mask=mask, group=list(group), **params)


def official(scores: np.ndarray, masks: np.ndarray, *, sub_mean: bool = False, eos: bool = True) -> np.ndarray:
    """The official pipeline, transcribed: ``RolloutBuffer._set`` (reward_normalize=True) then
    ``re_scoring_eos_rewards`` (homzer/Q-RM 74fd338, src/ppo/buffer.py, policy_train_policy_gradient.py)."""
    rewards, masks = scores.copy(), masks.astype(bool)
    if sub_mean:
        rewards = (rewards - np.mean(rewards[masks])) / np.std(rewards[masks])
    else:
        rewards = rewards / np.std(rewards[masks])
    rewards[~masks] = 0.0
    if eos:
        for i, action_mask in enumerate(masks):
            nonzero_indices = np.nonzero(action_mask)[0]
            if len(nonzero_indices) > 0:
                rewards[i][nonzero_indices[-1]] = np.mean(rewards[i][action_mask])
    return rewards


def test_default_by_hand():
    """r~ = Z / S; row 0's last token gets mean(1, 2, 3)/S = 2/S, row 1's gets mean(-1, 0.5)/S = -0.25/S."""
    expected = torch.tensor([[1.0, 2.0, 2.0, 0.0], [-1.0, -0.25, 0.0, 0.0]]) / S
    assert qrm() == pytest.approx(expected, abs=1e-6)
    assert qrm(eos="keep") == pytest.approx(torch.tensor([[1.0, 2.0, 3.0, 0.0], [-1.0, 0.5, 0.0, 0.0]]) / S, abs=1e-6)
    assert qrm(normalize="none") == pytest.approx(S * expected, abs=1e-6)


def test_rewards_are_not_read():
    """Only the token scores count: the outcome rewards (filled with the row sums when omitted) change nothing."""
    other = canonrl.advantages("qrm", token_rewards=Z, rewards=torch.tensor([5.0, -3.0]), mask=MASK, group=[0, 1])
    assert torch.equal(other, qrm())


def test_batch_centring_is_the_official_reward_sub_mean():
    """(Z - 1.1)/S: row 0 [-0.1, 0.9, 1.9] -> its last token gets 0.9; row 1 [-2.1, -0.6] -> -1.35."""
    expected = torch.tensor([[-0.1, 0.9, 0.9, 0.0], [-2.1, -1.35, 0.0, 0.0]]) / S
    assert qrm(center="batch") == pytest.approx(expected, abs=1e-6)


def test_matches_the_official_pipeline_on_random_batches():
    rng = np.random.default_rng(0)
    for _ in range(5):
        scores = rng.normal(0.3, 2.0, (7, 9)).astype(np.float32)
        masks = rng.random((7, 9)) < 0.6
        masks[3] = False  # an empty row: skipped upstream, 0 here
        mask = torch.from_numpy(masks).float()
        for sub_mean, eos in ((False, True), (True, True), (False, False)):
            out = canonrl.advantages(
                "qrm", token_rewards=torch.from_numpy(scores), mask=mask, group=list(range(7)),
                center="batch" if sub_mean else "none", eos="row_mean" if eos else "keep",
            )  # fmt: skip
            expected = official(scores.astype(np.float64), masks, sub_mean=sub_mean, eos=eos)
            np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_group_centring_pools_the_groups_tokens():
    """Adaptation. Group 0 = rows 0, 1 with masked scores {4} and {0, 0, 2}: pooled mean 6/4 = 1.5 (not the mean of
    row means, 7/3); group 1 = row 2 with {1, 3}: mean 2. s = the batch std of the raw scores {4, 0, 0, 2, 1, 3}:
    mean 5/3, variance (49 + 25 + 25 + 1 + 4 + 16)/9/6 = 20/9.

        row 0: [2.5]            -> last token = row mean 2.5
        row 1: [-1.5, -1.5, 0.5] -> last token = -2.5/3
        row 2: [-1, 1]           -> last token = 0
    """
    scores = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 2.0], [1.0, 3.0, 0.0]])
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    s = math.sqrt(20 / 9)
    expected = torch.tensor([[2.5, 0.0, 0.0], [-1.5, -1.5, -2.5 / 3], [-1.0, 0.0, 0.0]]) / s
    assert qrm(scores, mask, (0, 0, 1), center="group") == pytest.approx(expected, abs=1e-6)
    assert qrm(scores, mask, (0, 0, 1), center="group", normalize="none") == pytest.approx(s * expected, abs=1e-6)


def test_reward_is_q_subtracts_the_normalised_values():
    """PPO form, eos="keep" (the official PPO run): masked V = {2, 2, 4, 0, 2}: population std sqrt(1.6);
    A = Z/S - 0.01 V/sqrt(1.6), value targets Z/S."""
    values = torch.tensor([[2.0, 2.0, 4.0, float("nan")], [0.0, 2.0, 5.0, 5.0]])  # NaN off the mask is ignored
    estimator = canonrl.get_estimator("qrm", reward_is_q=True, eos="keep")
    assert estimator.required_inputs() == ("token_rewards", "values")
    advantages, returns = estimator.compute_with_returns(token_rewards=Z, values=values, mask=MASK, group=[0, 1])
    scores = torch.tensor([[1.0, 2.0, 3.0, 0.0], [-1.0, 0.5, 0.0, 0.0]]) / S
    v = torch.tensor([[2.0, 2.0, 4.0, 0.0], [0.0, 2.0, 0.0, 0.0]]) / math.sqrt(1.6)
    assert returns == pytest.approx(scores, abs=1e-6)
    assert advantages == pytest.approx(scores - 0.01 * v, abs=1e-6)
    half = canonrl.get_estimator("qrm", reward_is_q=True, eos="keep", value_coef=0.5)
    assert half(token_rewards=Z, values=values, mask=MASK, group=[0, 1]) == pytest.approx(scores - 0.5 * v, abs=1e-6)
    # the REINFORCE form returns its advantages twice
    advantages, returns = canonrl.get_estimator("qrm").compute_with_returns(token_rewards=Z, mask=MASK, group=[0, 1])
    assert torch.equal(advantages, returns)


def test_zero_std_divides_by_one():
    """All masked scores equal (3): std 0, the scores pass through unscaled (no NaN); centred variants give exactly 0.
    One masked token in the whole batch: std 0 as well."""
    scores = torch.full((2, 4), 3.0)
    assert torch.equal(qrm(scores), 3.0 * MASK)
    assert torch.equal(qrm(scores, center="batch"), torch.zeros(2, 4))
    assert torch.equal(qrm(scores, center="group"), torch.zeros(2, 4))
    one = torch.zeros(2, 4)
    one[1, 2] = 1.0
    assert torch.equal(qrm(Z, one), Z * one)


def test_constant_group_is_exactly_zero_under_group_centring():
    scores = torch.tensor([[0.95**3] * 4, [0.95**3] * 4, [1.0, 2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    out = qrm(scores, mask, (0, 0, 1), center="group")
    assert (out[:2] == 0).all() and (out[2] != 0).any()


def test_empty_rows_get_zero_and_change_nothing():
    scores = torch.cat([Z[:1], torch.full((1, 4), 1e6), Z[1:]])
    mask = torch.cat([MASK[:1], torch.zeros(1, 4), MASK[1:]])
    out = qrm(scores, mask, (0, 5, 1))
    assert (out[1] == 0).all()
    assert torch.equal(out[[0, 2]], qrm())
    assert torch.equal(qrm(Z, torch.zeros(2, 4)), torch.zeros(2, 4))


def test_fractional_mask_weights_the_statistics():
    """One row, scores [2, 4], mask [1, 0.5]: weighted mean 8/3, variance (4/9 + 0.5 * 16/9)/1.5 = 8/9; the last token
    gets the weighted row mean (8/3)/s, and the output is multiplied by the mask."""
    s = math.sqrt(8 / 9)
    out = qrm(torch.tensor([[2.0, 4.0]]), torch.tensor([[1.0, 0.5]]), (0,))
    assert out == pytest.approx(torch.tensor([[2.0 / s, 0.5 * (8 / 3) / s]]), abs=1e-6)


def test_the_batch_std_couples_prompts():
    """Default: changing row 1's scores moves row 0 (batch-level); with no std and no batch centring it does not."""
    changed = Z.clone()
    changed[1, :2] = torch.tensor([10.0, -4.0])
    assert not torch.equal(qrm(changed)[0], qrm()[0])
    for params in ({"normalize": "none"}, {"normalize": "none", "center": "group"}):
        assert torch.equal(qrm(changed, **params)[0], qrm(**params)[0])
        assert canonrl.get_estimator("qrm", **params).group_local
    for params in ({}, {"normalize": "none", "center": "batch"}, {"center": "group"}):
        estimator = canonrl.get_estimator("qrm", **params)
        assert not estimator.group_local and estimator.batch_level_reason


def test_bad_input_names_the_rows():
    bad = Z.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"token_rewards has NaN at rows \[1\]"):
        qrm(bad)
    values = torch.zeros(2, 4)
    values[0, 1] = float("inf")
    with pytest.raises(ValueError, match=r"values is NaN or Inf inside the mask at rows \[0\]"):
        qrm(values=values, reward_is_q=True)
    with pytest.raises(ValueError, match="estimator 'qrm' needs 'token_rewards'"):
        canonrl.advantages("qrm", rewards=torch.ones(2), group=[0, 1], mask=MASK)
    with pytest.raises(ValueError, match="estimator 'qrm' needs 'values'"):
        qrm(reward_is_q=True)
    for params, message in (
        ({"normalize": "z"}, "normalize must be one of"),
        ({"eos": "last"}, "eos must be one of"),
        ({"center": "prompt"}, "center must be one of"),
        ({"value_coef": -0.1}, "value_coef must lie in"),
    ):
        with pytest.raises(ValueError, match=message):
            canonrl.get_estimator("qrm", **params)


def test_registry_facts():
    info = next(i for i in canonrl.estimators() if i.name == "qrm")
    assert info.level == "token" and info.requires == ("token_rewards",) and info.verified
    assert not info.group_local and not info.critic and info.producer and "Q-RM" in info.producer
    assert info.paper is not None and info.paper.arxiv == "2505.23363"
