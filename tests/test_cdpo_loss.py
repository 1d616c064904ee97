"""`canonrl.training.losses.cdpo_loss`: cDPO's token-weighted DPO loss (arXiv 2411.19943), by hand and against
plain DPO."""

from __future__ import annotations

import math

import pytest
import torch

from canonrl.training.losses import cdpo_loss, cdpo_rejected_weights

# One pair. Chosen: log pi - log pi_ref = [1, 0, (masked)] -> D_w = 1. Rejected: log pi - log pi_ref = [1, -2],
# contrastive probabilities s = [0.75, 0.3] -> weights [1 - 0.75, 1 (last token)] -> D_l = 0.25 - 2 = -1.75.
# beta 0.5: margin = 0.5 (1 + 1.75) = 1.375, loss = -log sigmoid(1.375) = log(1 + exp(-1.375)).
POLICY_W = torch.tensor([[-1.0, -2.0, -9.0]])
REF_W = torch.tensor([[-2.0, -2.0, 0.0]])
MASK_W = torch.tensor([[1.0, 1.0, 0.0]])
POLICY_L = torch.tensor([[-1.0, -3.0]])
REF_L = torch.tensor([[-2.0, -1.0]])
MASK_L = torch.tensor([[1.0, 1.0]])
SCORES_L = torch.tensor([[0.75, 0.3]])


def test_rejected_weights_by_hand():
    scores = torch.tensor([[0.75, 0.3, 0.9, 0.5], [0.2, 0.6, 0.5, 0.1]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 0]])
    expected = torch.tensor([[0.25, 0.7, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    assert torch.allclose(cdpo_rejected_weights(scores, mask), expected)


def test_loss_by_hand():
    weights = cdpo_rejected_weights(SCORES_L, MASK_L)
    assert torch.allclose(weights, torch.tensor([[0.25, 1.0]]))
    loss, stats = cdpo_loss(POLICY_W, POLICY_L, REF_W, REF_L, MASK_W, MASK_L, weights, beta=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.375)), rel=1e-6)
    assert stats["chosen_rewards"].tolist() == pytest.approx([0.5])
    assert stats["rejected_rewards"].tolist() == pytest.approx([-0.875])
    assert stats["margins"].tolist() == pytest.approx([1.375])
    assert stats["accuracy"].tolist() == [1.0]
    assert stats["loss"].tolist() == pytest.approx([loss.item()])


def test_chosen_weights_and_mean_over_pairs():
    # Second pair: identical policy and reference -> margin 0 -> loss log 2. Chosen weights [2, 5] on pair 1
    # scale D_w to 2 * 1 + 5 * 0 = 2 -> margin 0.5 (2 + 1.75) = 1.875.
    policy_w = torch.cat([POLICY_W, REF_W])
    policy_l = torch.cat([POLICY_L, REF_L])
    chosen_weights = torch.tensor([[2.0, 5.0, 7.0], [1.0, 1.0, 1.0]])
    rejected_weights = torch.tensor([[0.25, 1.0], [1.0, 1.0]])
    loss, stats = cdpo_loss(
        policy_w, policy_l, torch.cat([REF_W, REF_W]), torch.cat([REF_L, REF_L]), torch.cat([MASK_W, MASK_W]),
        torch.cat([MASK_L, MASK_L]), rejected_weights, chosen_weights=chosen_weights, beta=0.5,
    )  # fmt: skip
    per_pair = [math.log1p(math.exp(-1.875)), math.log(2.0)]
    assert stats["loss"].tolist() == pytest.approx(per_pair, rel=1e-6)
    assert loss.item() == pytest.approx(sum(per_pair) / 2, rel=1e-6)
    assert stats["accuracy"].tolist() == [1.0, 0.0]


def plain_dpo(policy_w, policy_l, ref_w, ref_l, mask_w, mask_l, beta):
    """-log sigmoid(beta [(sum log pi_w - sum log ref_w) - (sum log pi_l - sum log ref_l)]), mean over pairs."""
    chosen = ((policy_w - ref_w) * mask_w).sum(-1)
    rejected = ((policy_l - ref_l) * mask_l).sum(-1)
    return -torch.log(torch.sigmoid(beta * (chosen - rejected))).mean()


def test_unit_weights_are_plain_dpo():
    g = torch.Generator().manual_seed(0)
    B, Tw, Tl = 5, 7, 4
    policy_w, ref_w = -torch.rand(B, Tw, generator=g) * 3, -torch.rand(B, Tw, generator=g) * 3
    policy_l, ref_l = -torch.rand(B, Tl, generator=g) * 3, -torch.rand(B, Tl, generator=g) * 3
    mask_w = (torch.rand(B, Tw, generator=g) < 0.7).float()
    mask_l = (torch.rand(B, Tl, generator=g) < 0.7).float()
    for chosen_weights in (None, torch.ones(B, Tw)):
        loss, _ = cdpo_loss(
            policy_w, policy_l, ref_w, ref_l, mask_w, mask_l, torch.ones(B, Tl), chosen_weights=chosen_weights,
            beta=0.3,
        )  # fmt: skip
        expected = plain_dpo(policy_w, policy_l, ref_w, ref_l, mask_w, mask_l, 0.3)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_gradient_reaches_the_policy_only():
    policy_w, policy_l = POLICY_W.clone().requires_grad_(), POLICY_L.clone().requires_grad_()
    ref_w, ref_l = REF_W.clone().requires_grad_(), REF_L.clone().requires_grad_()
    weights = cdpo_rejected_weights(SCORES_L, MASK_L).requires_grad_()
    chosen_weights = torch.ones_like(POLICY_W).requires_grad_()
    loss, stats = cdpo_loss(
        policy_w, policy_l, ref_w, ref_l, MASK_W, MASK_L, weights, chosen_weights=chosen_weights, beta=0.5
    )
    loss.backward()
    assert ref_w.grad is None and ref_l.grad is None and weights.grad is None and chosen_weights.grad is None
    assert all(not value.requires_grad for value in stats.values())
    # dL/dlog pi_t = -sigmoid(-margin) * beta * (+-) mask_t * weight_t
    g = -torch.sigmoid(torch.tensor(-1.375)).item() * 0.5
    assert policy_w.grad[0].tolist() == pytest.approx([g, g, 0.0])
    assert policy_l.grad[0].tolist() == pytest.approx([-0.25 * g, -g])


def test_bad_inputs_raise():
    weights = torch.ones_like(POLICY_L)
    with pytest.raises(ValueError, match="beta"):
        cdpo_loss(POLICY_W, POLICY_L, REF_W, REF_L, MASK_W, MASK_L, weights, beta=0.0)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        cdpo_loss(POLICY_W, POLICY_L, REF_W[:, :2], REF_L, MASK_W, MASK_L, weights)
    with pytest.raises(ValueError, match="rejected_weights"):
        cdpo_loss(POLICY_W, POLICY_L, REF_W, REF_L, MASK_W, MASK_L, torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        cdpo_loss(POLICY_W[0], POLICY_L, REF_W[0], REF_L, MASK_W[0], MASK_L, weights)
    with pytest.raises(ValueError, match="pairs"):
        cdpo_loss(POLICY_W, POLICY_L.expand(2, -1), REF_W, REF_L.expand(2, -1), MASK_W, MASK_L.expand(2, -1),
                  weights.expand(2, -1))  # fmt: skip
    with pytest.raises(ValueError, match="same shape"):
        cdpo_rejected_weights(SCORES_L, MASK_W)
