"""HAPO's policy loss (adaptive clipping + differential redistribution): hand-computed tokens, equivalences, errors.

Hand-computed row (alpha = beta = 1, eps_low = eps_high = 0.2, c = 3; eps' from (c), zone = (1 - eps_low'/2,
1 + eps_high'/2), A_ent = A (1 + h^)):

  t  h^    A   ratio  eps_low' eps_high'  zone          in?  A'    loss
  1  0.5   1   1      0.2      0.3        (0.9, 1.15)   yes  1     -1                   (high, inside: A)
  2  0.5   1   1.2    0.2      0.3        (0.9, 1.15)   no   1.5   -1.8                 (high, outside: A_ent)
  3  -0.5  1   1      0.3      0.2        (0.85, 1.1)   yes  0.5   -0.5                 (low, inside: A_ent)
  4  -0.5  1   1.25   0.3      0.2        (0.85, 1.1)   no   1     max(-1.25, -1.2) = -1.2   (clipped at 1.2)
  5  -0.5  -1  4      0.3      0.2        (0.85, 1.1)   no   -1    min(max(4, 1.2), 3) = 3   (dual clip)
  6  1     -1  0.5    0.2      0.4        (0.9, 1.2)    no   -2    max(1, 2 * 0.8) = 1.6     (clipped at 0.8)
  7  -1    -2  0.9    0.4      0.2        (0.8, 1.1)    yes  0     0                    (low, inside: A (1 - 1))

  token-mean = (-1 - 1.8 - 0.5 - 1.2 + 3 + 1.6 + 0) / 7 = 0.1 / 7; a padding token (NaN everywhere) follows.
  d loss / d log pi_t = -A'_t r_t / 7 where unclipped, 0 where clipped: [-1, -1.8, -0.5, 0, 0, 0, 0] / 7.
"""

import math

import pytest
import torch

import canonrl
from canonrl.training.hapo_loss import hapo_entropy_hat, hapo_policy_loss
from canonrl.training.losses import aggregate_loss, ppo_clip_loss

NAN = float("nan")
H_HAT = [0.5, 0.5, -0.5, -0.5, -0.5, 1.0, -1.0, NAN]
ADV = [1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -2.0, NAN]
RATIO = [1.0, 1.2, 1.0, 1.25, 4.0, 0.5, 0.9, 1.0]
MASK = [1.0] * 7 + [0.0]


def hand_inputs():
    logprobs = torch.tensor([[math.log(r) for r in RATIO[:-1]] + [NAN]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 8, dtype=torch.float64)
    return logprobs, old, torch.tensor([ADV], dtype=torch.float64), torch.tensor([H_HAT]), torch.tensor([MASK])


def test_hand_computed_branches():
    logprobs, old, adv, h_hat, mask = hand_inputs()
    loss, stats = hapo_policy_loss(logprobs, old, adv, h_hat, mask)
    assert loss.item() == pytest.approx(0.1 / 7, abs=1e-12)
    expected_tokens = [-1.0, -1.8, -0.5, -1.2, 3.0, 1.6, 0.0, 0.0]
    assert stats["token_loss"][0].tolist() == pytest.approx(expected_tokens, abs=1e-12)
    assert stats["advantages"][0, :7].tolist() == pytest.approx([1, 1.5, 0.5, 1, -1, -2, 0], abs=1e-12)
    assert stats["in_zone"][0].tolist() == [True, False, True, False, False, False, True, False]
    assert stats["eps_low"][0, :7].tolist() == pytest.approx([0.2, 0.2, 0.3, 0.3, 0.3, 0.2, 0.4])
    assert stats["eps_high"][0, :7].tolist() == pytest.approx([0.3, 0.3, 0.2, 0.2, 0.2, 0.4, 0.2])
    assert stats["clipfrac"].item() == pytest.approx(2 / 7)
    assert stats["clipfrac_lower"].item() == pytest.approx(1 / 7)
    assert stats["neutral_frac"].item() == pytest.approx(3 / 7)
    assert stats["high_entropy_frac"].item() == pytest.approx(3 / 7)
    assert stats["redistributed_frac"].item() == pytest.approx(4 / 7)  # tokens 2, 3, 6, 7 take A_ent
    assert stats["eps_low_mean"].item() == pytest.approx(1.9 / 7)
    assert stats["eps_high_mean"].item() == pytest.approx(1.8 / 7)
    loss.backward()
    expected_grad = [-1.0, -1.8, -0.5, 0, 0, 0, 0, 0]
    assert (logprobs.grad[0] * 7).tolist() == pytest.approx(expected_grad, abs=1e-12)


def test_switches_off():
    logprobs, old, adv, h_hat, mask = hand_inputs()
    _, stats = hapo_policy_loss(logprobs, old, adv, h_hat, mask, adaptive_advantage=False)
    assert stats["advantages"][0, :7].tolist() == ADV[:7]
    _, stats = hapo_policy_loss(logprobs, old, adv, h_hat, mask, adaptive_clip=False)
    assert stats["eps_low"][0].tolist() == pytest.approx([0.2] * 8)
    assert stats["eps_high"][0].tolist() == pytest.approx([0.2] * 8)


def random_inputs(seed=0, rows=6, tokens=9):
    g = torch.Generator().manual_seed(seed)
    logprobs = (-torch.rand(rows, tokens, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = logprobs.detach() + torch.randn(rows, tokens, generator=g, dtype=torch.float64) * 0.8
    adv = torch.randn(rows, tokens, generator=g, dtype=torch.float64)
    h_hat = torch.rand(rows, tokens, generator=g, dtype=torch.float64) * 2 - 1
    lengths = torch.randint(1, tokens + 1, (rows,), generator=g)
    mask = (torch.arange(tokens)[None, :] < lengths[:, None]).float()
    return logprobs, old, adv, h_hat, mask


def plain_ppo(logprobs, old, adv, mask, agg="token-mean", **clip):
    per_token, indicators = ppo_clip_loss(logprobs, old, adv, **clip)
    return aggregate_loss(per_token, mask, agg), indicators


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("zero_h, alpha, beta", [(False, 0.0, 0.0), (True, 1.0, 1.0)])
def test_equals_plain_ppo_clip_without_entropy_effects(agg, zero_h, alpha, beta):
    logprobs, old, adv, h_hat, mask = random_inputs()
    if zero_h:
        h_hat = torch.zeros_like(h_hat)
    loss, stats = hapo_policy_loss(
        logprobs, old, adv, h_hat, mask, alpha=alpha, beta=beta, clip_low=0.2, clip_high=0.28, agg=agg
    )
    (grad,) = torch.autograd.grad(loss, logprobs)
    reference, indicators = plain_ppo(logprobs, old, adv, mask, agg, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    (reference_grad,) = torch.autograd.grad(reference, logprobs)
    assert torch.allclose(loss, reference, atol=1e-12)
    assert torch.allclose(grad, reference_grad, atol=1e-12)
    inside = mask.bool()
    assert stats["clipfrac"].item() == pytest.approx(indicators["clipped"][inside].mean().item())
    assert stats["clipfrac_lower"].item() == pytest.approx(indicators["dual_clipped"][inside].mean().item())
    assert 0 < stats["clipfrac"].item() < 1 and stats["clipfrac_lower"].item() > 0  # the batch exercises both


def test_ratio_one_equals_the_estimators_redistributed_advantages():
    g = torch.Generator().manual_seed(3)
    rows, tokens = 8, 6
    rewards = torch.randint(0, 2, (rows,), generator=g).float()
    group = [0] * 4 + [1] * 4
    lengths = torch.randint(1, tokens + 1, (rows,), generator=g)
    mask = (torch.arange(tokens)[None, :] < lengths[:, None]).float()
    entropy = torch.rand(rows, tokens, generator=g) * 2
    group_average = canonrl.advantages("hapo", rewards=rewards, group=group, mask=mask, redistribute=False)
    redistributed = canonrl.advantages("hapo", rewards=rewards, group=group, mask=mask, entropy=entropy)
    assert not torch.allclose(group_average, redistributed)
    h_hat = hapo_entropy_hat(entropy, mask)  # pivot 0.8, as the estimator's default
    logprobs = (-torch.rand(rows, tokens, generator=g)).requires_grad_()
    old = logprobs.detach().clone()
    loss, stats = hapo_policy_loss(logprobs, old, group_average, h_hat, mask)
    (grad,) = torch.autograd.grad(loss, logprobs)
    reference, _ = plain_ppo(logprobs, old, redistributed, mask)
    (reference_grad,) = torch.autograd.grad(reference, logprobs)
    assert torch.allclose(loss, reference, atol=1e-6)
    assert torch.allclose(grad, reference_grad, atol=1e-6)
    assert stats["neutral_frac"].item() == 1.0


def test_entropy_hat_helper_matches_the_hand_values_and_the_upstream_variant():
    entropy = torch.tensor([[0.0, 1.0], [2.0, -1.0]]).exp()  # see tests/test_hapo_iapo_oar.py
    h_hat = hapo_entropy_hat(entropy, torch.ones(2, 2))
    assert torch.allclose(h_hat, torch.tensor([[-0.5, 0.0], [1.0, -1.0]], dtype=torch.float64))
    assert (hapo_entropy_hat(entropy, torch.ones(2, 2), h_hat="upstream") >= 0).all()


def official_reference(old_log_prob, log_prob, advantages, h_hat, clip_low, clip_high, c, alpha, beta):
    """The official ``ada_clip`` / ``ada_advantage`` / ``compute_policy_loss`` (commit 7671dde), mask all ones."""
    ratio = torch.exp(log_prob - old_log_prob)
    with torch.no_grad():
        low, high = torch.full_like(h_hat, clip_low), torch.full_like(h_hat, clip_high)
        low_ent, high_ent = low * (1 - h_hat * alpha), high * (1 + h_hat * alpha)
        low[h_hat <= 0] = low_ent[h_hat <= 0]
        high[h_hat > 0] = high_ent[h_hat > 0]
        adv_ent = advantages * (1 + beta * h_hat)
        zone = (ratio > 1.0 - low / 2) & (ratio < 1.0 + high / 2)
        advantages = torch.where(
            h_hat > 0, torch.where(zone, advantages, adv_ent), torch.where(zone, adv_ent, advantages)
        )
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - low, 1.0 + high)
    clip1 = torch.maximum(pg1, pg2)
    clip2 = torch.min(-advantages * c, clip1)
    losses = torch.where(advantages < 0, clip2, clip1)
    return losses.sum() / (losses.numel() + 1e-8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_a_transcription_of_the_official_code(seed):
    logprobs, old, adv, h_hat, _ = random_inputs(seed, rows=16, tokens=16)
    mask = torch.ones_like(adv)
    loss, _ = hapo_policy_loss(logprobs, old, adv, h_hat, mask, clip_low=0.2, clip_high=0.28, clip_ratio_c=10.0)
    reference = official_reference(old, logprobs, adv, h_hat, 0.2, 0.28, 10.0, 1.0, 1.0)
    assert torch.allclose(loss, reference, rtol=1e-7)
    assert torch.allclose(torch.autograd.grad(loss, logprobs)[0], torch.autograd.grad(reference, logprobs)[0])


def test_no_gradient_through_the_switch_or_the_entropy():
    logprobs, old, adv, h_hat, mask = random_inputs()
    adv.requires_grad_()
    h_hat.requires_grad_()
    loss, _ = hapo_policy_loss(logprobs, old, adv, h_hat, mask)
    loss.backward()
    assert logprobs.grad is not None and torch.isfinite(logprobs.grad).all()
    assert h_hat.grad is None and adv.grad is None  # eps', the zone and A' are computed under no_grad
    assert (logprobs.grad[mask == 0] == 0).all()


def test_fully_masked_batch_gives_zero():
    logprobs, old, adv, h_hat, mask = random_inputs()
    loss, stats = hapo_policy_loss(logprobs, old, adv, h_hat, torch.zeros_like(mask))
    assert loss.item() == 0.0 and stats["clipfrac"].item() == 0.0


def test_errors():
    logprobs, old, adv, h_hat, mask = random_inputs()
    with pytest.raises(ValueError, match="advantages must have the shape"):
        hapo_policy_loss(logprobs, old, adv[:, :-1], h_hat, mask)
    with pytest.raises(ValueError, match=r"mask must be a \[B, T\]"):
        hapo_policy_loss(logprobs, old, adv, h_hat, mask[0])
    bad = h_hat.clone()
    bad[2, 0] = NAN
    bad[4, 0] = float("inf")
    with pytest.raises(ValueError, match=r"entropy_hat is NaN or Inf inside the mask at rows \[2, 4\]"):
        hapo_policy_loss(logprobs, old, adv, bad, mask)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        hapo_policy_loss(logprobs, old, adv, h_hat, mask, clip_ratio_c=1.0)
    with pytest.raises(ValueError, match="alpha and beta"):
        hapo_policy_loss(logprobs, old, adv, h_hat, mask, beta=-0.1)
    with pytest.raises(ValueError, match="clip_low"):
        hapo_policy_loss(logprobs, old, adv, h_hat, mask, clip_low=-0.1)
    with pytest.raises(ValueError, match="loss_agg"):
        hapo_policy_loss(logprobs, old, adv, h_hat, mask, agg="sum")
    with pytest.raises(ValueError, match="h_hat"):
        hapo_entropy_hat(torch.ones(2, 2), torch.ones(2, 2), h_hat="paper")
    entropy = torch.ones(2, 2)
    entropy[1, 1] = NAN
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        hapo_entropy_hat(entropy, torch.ones(2, 2))
