"""ST-PPO's turn-level ratio and clipping, EPO's entropy regulariser (with a gradient, unlike the official one) and
PivotRL's pivot selection, on hand-computed tensors."""

from __future__ import annotations

import math

import pytest
import torch

from canonrl.training.selection import pivot_keep
from canonrl.training.turn_losses import epo_entropy_regularizer, epo_phase_weight, turn_log_ratio, turn_ppo_clip_loss


def test_turn_ratio_is_the_geometric_mean_of_the_turn_token_ratios():
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0]])
    turn_ids = torch.tensor([[0, 0, -1, 1, -1]])
    logprobs = torch.tensor([[-0.8, -1.8, -5.0, -0.5, -9.0]])
    old = torch.tensor([[-1.2, -1.6, -1.0, -0.5, -1.0]])
    # turn 0: token log-ratios 0.4 and -0.2 -> mean 0.1 on both tokens; turn 1: 0; holes: 0
    assert torch.allclose(turn_log_ratio(logprobs, old, mask, turn_ids), torch.tensor([[0.1, 0.1, 0.0, 0.0, 0.0]]))
    advantages = torch.tensor([[1.0, 1.0, 0.0, -2.0, 0.0]])
    loss, clipped = turn_ppo_clip_loss(logprobs, old, advantages, mask, turn_ids, clip_low=0.05, clip_high=0.05)
    # rho = e^0.1 = 1.105 > 1.05: for A > 0 the clipped term -1.05 is the larger, on both tokens of the turn
    assert loss[0, :2].tolist() == pytest.approx([-1.05, -1.05]) and clipped["clipped"][0].tolist() == [1, 1, 0, 0, 0]
    assert loss[0, 3].item() == pytest.approx(2.0) and loss[0, 2] == 0 and loss[0, 4] == 0
    # per-token ratios would clip only the first token (e^0.4) and leave the second (e^-0.2) alone
    token_loss, _ = turn_ppo_clip_loss(logprobs, old, advantages, mask, torch.arange(5)[None, :])
    assert token_loss[0, 1].item() == pytest.approx(-math.exp(-0.2))


def test_turn_ratio_gradient_reaches_every_token_of_the_turn():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    loss, _ = turn_ppo_clip_loss(logprobs, logprobs.detach(), torch.ones(1, 3), torch.ones(1, 3),
                                 torch.tensor([[0, 0, 0]]))
    loss.sum().backward()
    # d/dlogp_j of -A exp(mean log-ratio) at ratio 1: -A / 3 per token, summed over the 3 tokens of the turn
    assert torch.allclose(logprobs.grad, torch.full((1, 3), -1.0))


def test_epo_regularizer_by_hand_and_its_gradient():
    entropy = torch.tensor([[1.0, 2.0, 0.5, 9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    reference = torch.tensor([1.0])  # band (0.8, 1.2)
    # mean entropy 3.5 / 3; hinge penalty: token 2.0 is 0.8 above, token 0.5 is 0.3 below -> 0.1 * 1.1 / 3
    term = epo_entropy_regularizer(entropy, mask, reference, entropy_coeff=1.0)
    assert term.item() == pytest.approx(3.5 / 3 - 0.1 * 1.1 / 3)
    term.backward()
    # d/dH: 1/3 per token, minus 0.1/3 above the band, plus 0.1/3 below it; nothing off the mask
    assert torch.allclose(entropy.grad, torch.tensor([[1 / 3, 0.9 / 3, 1.1 / 3, 0.0]]))
    official = epo_entropy_regularizer(entropy, mask, reference, entropy_coeff=1.0, penalty="official")
    assert official.item() == pytest.approx(3.5 / 3 - 0.1 * 2 / 3)
    grad = torch.autograd.grad(official, entropy)[0]
    assert torch.allclose(grad, torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0.0]]))  # the official penalty adds no gradient
    with pytest.raises(ValueError, match=r"reference_entropy must be a positive finite entropy, not at rows \[0\]"):
        epo_entropy_regularizer(entropy, mask, torch.tensor([0.0]))


def test_epo_phase_weight_endpoints():
    assert epo_phase_weight(0) == pytest.approx(1.0)
    assert epo_phase_weight(74) == pytest.approx(1 - 0.2 * (1 - math.exp(-2 * 74 / 75)))
    assert epo_phase_weight(75) == pytest.approx(0.8)
    assert epo_phase_weight(150) == pytest.approx(0.8 * math.exp(-3))


def test_pivots_are_groups_with_varied_outcomes_below_the_success_threshold():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    group = ["a", "a", "b", "b", "c", "c", "d", "d", "d", "e", "f"]
    # a: mixed (mean 0.5); b: all right; c: all wrong; d: mixed (mean 2/3... no: 1, 1, 1 -> constant)
    assert pivot_keep(rewards, group).tolist() == [True, True] + [False] * 9
    rewards[8] = 0.0  # d becomes mixed with mean 2/3
    assert pivot_keep(rewards, group).tolist()[6:9] == [True] * 3
    assert pivot_keep(rewards, group, max_success=0.6).tolist()[6:9] == [False] * 3
    with pytest.raises(ValueError, match=r"rewards has NaN or Inf at rows \[1\]"):
        pivot_keep(torch.tensor([0.0, float("nan")]), [0, 0])
