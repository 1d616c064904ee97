"""KL-Cov / Clip-Cov (arXiv 2505.22617) against verl's built-ins, hand cases, units; NGRPO's asymmetric clip."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from canonrl.training.losses import (
    NGRPO_CLIP_HIGH,
    NGRPO_CLIP_LOW,
    aggregate_loss,
    clip_cov_loss,
    cov_ratio_from_percent,
    kl_cov_loss,
    ppo_clip_loss,
)
from canonrl.training.policy_losses import ClipRange, get_loss, loss_names

# aggregate_loss's own parity with verl's agg_loss over every mode is in test_losses.py
PARITY_MODES = ("token-mean", "seq-mean-token-sum-norm")


class _Config:
    """The fields of verl's ActorConfig that compute_policy_loss_clip_cov / _kl_cov read."""

    def __init__(self, clip_low=0.2, clip_high=0.2, **policy_loss):
        self.clip_ratio = 0.2
        self.clip_ratio_low = clip_low
        self.clip_ratio_high = clip_high
        self.clip_ratio_c = 3.0
        self.global_batch_info: dict = {}
        defaults = dict(clip_cov_ratio=2e-4, clip_cov_lb=1.0, clip_cov_ub=5.0, kl_cov_ratio=2e-4, ppo_kl_coef=1.0)
        self.policy_loss = SimpleNamespace(**{**defaults, **policy_loss})

    def get(self, key, default=None):
        return getattr(self, key, default)


@pytest.fixture(scope="module")
def core_algos():
    return pytest.importorskip("verl.trainer.ppo.core_algos")


def _batch(seed: int, rows: int = 12, tokens: int = 40, adv_scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, tokens + 1, (rows,), generator=g)
    mask = (torch.arange(tokens)[None, :] < lengths[:, None]).to(torch.float32)
    mask[0] = 0.0  # one fully masked row
    old = -torch.rand(rows, tokens, generator=g) * 4
    logprobs = old + torch.randn(rows, tokens, generator=g) * 0.3
    advantages = (torch.randn(rows, 1, generator=g) * adv_scale).expand(rows, tokens).clone()
    return logprobs, old, advantages, mask


# ---------------------------------------------------------------- KL-Cov


@pytest.mark.verl
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ratio", [2e-4, 2e-3, 0.05, 0.3])
@pytest.mark.parametrize("mode", PARITY_MODES)
def test_kl_cov_matches_verl(core_algos, seed, ratio, mode):
    logprobs, old, advantages, mask = _batch(seed)
    config = _Config(kl_cov_ratio=ratio, ppo_kl_coef=0.7)
    theirs, metrics = core_algos.compute_policy_loss_kl_cov(
        old.clone(), logprobs.clone(), advantages.clone(), mask, loss_agg_mode=mode, config=config
    )
    token_loss, indicators = kl_cov_loss(logprobs, old, advantages, mask, kl_cov_ratio=ratio, ppo_kl_coef=0.7)
    ours = aggregate_loss(token_loss, mask, mode)
    torch.testing.assert_close(ours, theirs.to(ours.dtype), atol=1e-5, rtol=1e-5)
    n_valid = int(mask.sum())
    assert int((indicators["kl_cov_selected"] * mask).sum()) == max(1, int(n_valid * ratio))
    assert int(indicators["kl_cov_selected"].sum()) == max(1, int(n_valid * ratio))  # never a masked token
    ppo_kl = ((logprobs - old).abs() * mask).sum() / mask.sum()
    assert ppo_kl.item() == pytest.approx(metrics["actor/ppo_kl"], abs=1e-5)


def test_kl_cov_hand_case():
    # 1 row of 4 tokens; A = [2, 2, -2, -2] (two rows' worth flattened) -> mean 0; log pi = [-1, -3, -1, -3] -> mean -2
    advantages = torch.tensor([[2.0, 2.0, -2.0, -2.0]])
    logprobs = torch.tensor([[-1.0, -3.0, -1.0, -3.0]])
    old = logprobs - torch.tensor([[0.1, -0.2, 0.3, -0.4]])
    mask = torch.ones(1, 4)
    # Cov = A * (lp + 2) = [2, -2, -2, 2]: the top-2 (ratio 0.5) are tokens 0 and 3
    loss, ind = kl_cov_loss(logprobs, old, advantages, mask, kl_cov_ratio=0.5, ppo_kl_coef=2.0)
    assert ind["kl_cov_selected"].tolist() == [[1.0, 0.0, 0.0, 1.0]]
    ratio = torch.exp(logprobs - old)
    expected = -advantages * ratio + 2.0 * (logprobs - old).abs() * torch.tensor([[1.0, 0, 0, 1.0]])
    torch.testing.assert_close(loss, expected)
    # the smallest ratio still selects one token (max(1, floor(0.0001 * 4)) = 1): token 0 (tie with 3 -> topk)
    _, ind = kl_cov_loss(logprobs, old, advantages, mask, kl_cov_ratio=1e-4)
    assert ind["kl_cov_selected"].sum() == 1


def test_kl_cov_empty_mask_and_gradients():
    logprobs, old, advantages, mask = _batch(5)
    loss, ind = kl_cov_loss(logprobs, old, advantages, torch.zeros_like(mask), kl_cov_ratio=0.1)
    assert ind["kl_cov_selected"].sum() == 0
    torch.testing.assert_close(loss, -advantages * torch.exp(logprobs - old))
    lp = logprobs.clone().requires_grad_(True)
    loss, _ = kl_cov_loss(lp, old, advantages, mask, kl_cov_ratio=0.1)
    aggregate_loss(loss, mask, "token-mean").backward()
    assert torch.isfinite(lp.grad).all() and (lp.grad * (1 - mask)).abs().sum() == 0


# ---------------------------------------------------------------- Clip-Cov


@pytest.mark.verl
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("clips", [(0.2, 0.2), (0.2, 0.28), (1.0, 1.0)])
@pytest.mark.parametrize("ratio", [2e-4, 0.01, 0.2, 1.0])
@pytest.mark.parametrize("mode", PARITY_MODES)
def test_clip_cov_matches_verl_same_draw(core_algos, seed, clips, ratio, mode):
    """Our draw is verl's draw (randperm over the row-major candidates): identical after the same seed."""
    logprobs, old, advantages, mask = _batch(seed)
    lb, ub = 0.2, 5.0  # a band that holds many tokens of this batch
    config = _Config(*clips, clip_cov_ratio=ratio, clip_cov_lb=lb, clip_cov_ub=ub)
    torch.manual_seed(100 + seed)
    theirs, metrics = core_algos.compute_policy_loss_clip_cov(
        old, logprobs, advantages, mask, loss_agg_mode=mode, config=config
    )
    generator = torch.Generator().manual_seed(100 + seed)
    token_loss, ind = clip_cov_loss(
        logprobs, old, advantages, mask, ratio, lb, ub, clip_low=clips[0], clip_high=clips[1], generator=generator
    )
    ours = aggregate_loss(token_loss, mask, mode)
    torch.testing.assert_close(ours, theirs.to(ours.dtype), atol=1e-5, rtol=1e-5)
    frac = (ind["cov_clipped"] * mask).sum() / mask.sum()
    assert frac.item() == pytest.approx(metrics["actor/pg_clipfrac"], abs=1e-6)
    assert frac.item() > 0
    # the same draw from the global RNG
    torch.manual_seed(100 + seed)
    again, _ = clip_cov_loss(logprobs, old, advantages, mask, ratio, lb, ub, clip_low=clips[0], clip_high=clips[1])
    torch.testing.assert_close(again, token_loss)


@pytest.mark.verl
@pytest.mark.parametrize("seed", [0, 1])
def test_clip_cov_all_candidates_is_deterministic(core_algos, seed):
    """With a budget larger than the candidate set every candidate is detached: no randomness at all."""
    logprobs, old, advantages, mask = _batch(seed)
    config = _Config(clip_cov_ratio=1.0, clip_cov_lb=0.5, clip_cov_ub=3.0)
    theirs, _ = core_algos.compute_policy_loss_clip_cov(old, logprobs, advantages, mask, config=config)
    token_loss, ind = clip_cov_loss(logprobs, old, advantages, mask, 1.0, 0.5, 3.0)
    torch.testing.assert_close(aggregate_loss(token_loss, mask, "token-mean"), theirs, atol=1e-5, rtol=1e-5)
    cov = (advantages - (advantages * mask).sum() / mask.sum()) * (logprobs - (logprobs * mask).sum() / mask.sum())
    expected = (mask > 0) & (cov > 0.5) & (cov < 3.0) & (ind["clipped"] == 0)
    assert torch.equal(ind["cov_clipped"].bool(), expected)


def test_clip_cov_hand_case_and_count():
    advantages = torch.tensor([[2.0, 2.0, -2.0, -2.0]])
    logprobs = torch.tensor([[-1.0, -3.0, -1.0, -3.0]])
    old = logprobs.clone()  # ratio 1: nothing PPO-clipped
    mask = torch.ones(1, 4)
    # Cov = [2, -2, -2, 2]; band (1, 5) holds tokens 0 and 3; budget max(1, floor(0.25*4)) = 1
    counts = torch.zeros(4)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        loss, ind = clip_cov_loss(logprobs, old, advantages, mask, 0.25, generator=generator)
        assert ind["cov_clipped"].sum() == 1
        counts += ind["cov_clipped"][0]
        kept = ind["cov_clipped"][0] == 0
        torch.testing.assert_close(loss[0][kept], (-advantages)[0][kept])
        assert (loss[0][~kept] == 0).all()
    assert counts[1] == 0 and counts[2] == 0 and 60 < counts[0] < 140  # uniform over the two candidates
    # budget 0.5*4 = 2 takes both candidates
    _, ind = clip_cov_loss(logprobs, old, advantages, mask, 0.5)
    assert ind["cov_clipped"].tolist() == [[1.0, 0.0, 0.0, 1.0]]
    # PPO-clipped tokens are never candidates: push token 0's ratio above 1 + 0.2 with A > 0
    old2 = old.clone()
    old2[0, 0] -= 1.0
    _, ind = clip_cov_loss(logprobs, old2, advantages, mask, 0.5)
    assert ind["clipped"][0, 0] == 1 and ind["cov_clipped"][0, 0] == 0


def test_clip_cov_gradient_zero_on_detached_tokens():
    logprobs, old, advantages, mask = _batch(3)
    lp = logprobs.clone().requires_grad_(True)
    loss, ind = clip_cov_loss(lp, old, advantages, mask, 0.2, 0.2, 5.0, generator=torch.Generator().manual_seed(1))
    aggregate_loss(loss, mask, "token-mean").backward()
    assert ind["cov_clipped"].sum() > 0
    assert (lp.grad[ind["cov_clipped"].bool()] == 0).all()


def test_clip_cov_no_candidates():
    logprobs, old, advantages, mask = _batch(1)
    loss, ind = clip_cov_loss(logprobs, old, advantages, mask, 0.5, 1e6, 1e7)
    assert ind["cov_clipped"].sum() == 0
    torch.testing.assert_close(loss, ppo_clip_loss(logprobs, old, advantages, dual_clip=None)[0])


# ---------------------------------------------------------------- units, dispatch, errors


def test_percent_conversion():
    assert cov_ratio_from_percent(0.2) == pytest.approx(0.002)  # Qwen2.5-7B
    assert cov_ratio_from_percent(0.02) == pytest.approx(0.0002)  # Qwen2.5-32B
    logprobs, old, advantages, mask = _batch(0, rows=20, tokens=100)
    n_valid = int(mask.sum())
    _, ind = kl_cov_loss(logprobs, old, advantages, mask, cov_ratio_from_percent(20.0))
    assert int(ind["kl_cov_selected"].sum()) == int(n_valid * 0.2)
    with pytest.raises(ValueError, match="k_percent"):
        cov_ratio_from_percent(0)


@pytest.mark.parametrize("fn,arg", [(kl_cov_loss, "kl_cov_ratio"), (clip_cov_loss, "clip_cov_ratio")])
def test_ratio_errors(fn, arg):
    logprobs, old, advantages, mask = _batch(0)
    with pytest.raises(ValueError, match=f"{arg}.*cov_ratio_from_percent"):
        fn(logprobs, old, advantages, mask, 2.0)  # a percent passed as a fraction
    with pytest.raises(ValueError, match=arg):
        fn(logprobs, old, advantages, mask, 0.0)
    with pytest.raises(ValueError, match="mask"):
        fn(logprobs, old, advantages, mask[:, :-1], 0.1)


def test_other_errors():
    logprobs, old, advantages, mask = _batch(0)
    with pytest.raises(ValueError, match="clip_cov_lb"):
        clip_cov_loss(logprobs, old, advantages, mask, 0.1, 5.0, 1.0)
    with pytest.raises(ValueError, match="ppo_kl_coef"):
        kl_cov_loss(logprobs, old, advantages, mask, 0.1, -1.0)
    with pytest.raises(ValueError, match="unknown policy loss 'cispo'; choose from ppo_clip, clip_cov, kl_cov"):
        get_loss("cispo")
    with pytest.raises(TypeError, match="policy_loss 'kl_cov' has no parameter 'clip_cov_ratio'"):
        get_loss("kl_cov", clip_cov_ratio=0.1)
    with pytest.raises(ValueError, match=r"clip_cov_ratio must be in \(0, 1\]"):
        get_loss("clip_cov", clip_cov_ratio=2.0)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        ClipRange(dual=0.5)


def test_registered_losses_are_the_loss_functions():
    logprobs, old, advantages, mask = _batch(0)
    torch.testing.assert_close(
        get_loss("kl_cov", kl_cov_ratio=0.1)(logprobs, old, advantages, mask, clip=ClipRange())[0],
        kl_cov_loss(logprobs, old, advantages, mask, 0.1)[0],
    )
    torch.testing.assert_close(
        get_loss("ppo_clip")(logprobs, old, advantages, mask, clip=ClipRange(high=0.28))[0],
        ppo_clip_loss(logprobs, old, advantages, clip_high=0.28)[0],
    )
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    clip_cov = get_loss("clip_cov", clip_cov_ratio=0.1, clip_cov_lb=0.2)
    torch.testing.assert_close(
        clip_cov(logprobs, old, advantages, mask, clip=ClipRange(dual=None), generator=g1)[0],
        clip_cov_loss(logprobs, old, advantages, mask, 0.1, 0.2, generator=g2)[0],
    )


def test_each_loss_declares_what_a_trainer_needs():
    assert loss_names() == ["ppo_clip", "clip_cov", "kl_cov"]
    logprobs, old, advantages, mask = _batch(0)
    for name in loss_names():
        loss = get_loss(name)
        _, indicators = loss(logprobs, old, advantages, mask, clip=ClipRange(), generator=torch.Generator())
        assert set(loss.metrics) <= set(indicators), name  # every declared metric is an indicator it returns
    # a row with advantage 0 everywhere moves the gradient exactly when the loss says it needs every row
    zero = torch.zeros_like(advantages)
    for name in loss_names():
        loss = get_loss(name, **({"kl_cov_ratio": 1.0} if name == "kl_cov" else {}))
        current = (old + 0.3 * torch.randn(old.shape, generator=torch.Generator().manual_seed(1))).requires_grad_()
        per_token, _ = loss(current, old, zero, mask, clip=ClipRange(), generator=torch.Generator())
        (per_token * mask).sum().backward()
        moves = bool(current.grad.abs().sum() > 0)
        assert moves == (name == "kl_cov"), name
        assert not moves or loss.needs_every_row


# ---------------------------------------------------------------- NGRPO's asymmetric clip


def test_ngrpo_asymmetric_clip_hand_values():
    """A > 0 is clipped only above 1.24, A < 0 only below 0.84 (NGRPO's 0.16 / 0.24, no dual clip)."""
    ratios = torch.tensor([0.5, 0.8, 0.9, 1.1, 1.2, 1.3, 2.0])
    logprobs = ratios.log()[None, :].expand(2, -1)
    old = torch.zeros(2, 7)
    advantages = torch.tensor([[1.0], [-1.0]]).expand(2, 7)
    loss, ind = ppo_clip_loss(logprobs, old, advantages, NGRPO_CLIP_LOW, NGRPO_CLIP_HIGH, dual_clip=None)
    # A = +1: loss = -min(r, 1.24)
    torch.testing.assert_close(loss[0], -torch.tensor([0.5, 0.8, 0.9, 1.1, 1.2, 1.24, 1.24]))
    # A = -1: loss = max(r, 0.84)
    torch.testing.assert_close(loss[1], torch.tensor([0.84, 0.84, 0.9, 1.1, 1.2, 1.3, 2.0]))
    assert ind["clipped"].tolist() == [[0, 0, 0, 0, 0, 1, 1], [1, 1, 0, 0, 0, 0, 0]]
    assert "dual_clipped" not in ind


def test_ngrpo_clip_matches_official_form():
    """NGRPO's compute_policy_loss (official code): masked_mean(max(-A r, -A clamp(r, 1-low, 1+high)))."""
    logprobs, old, advantages, mask = _batch(7)
    ratio = torch.exp(logprobs - old)
    official = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - 0.16, 1 + 0.24))
    official = (official * mask).sum() / (mask.sum() + 1e-8)
    loss, _ = ppo_clip_loss(logprobs, old, advantages, NGRPO_CLIP_LOW, NGRPO_CLIP_HIGH, dual_clip=None)
    torch.testing.assert_close(aggregate_loss(loss, mask, "token-mean"), official)
