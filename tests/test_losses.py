"""`canonrl.training.losses`: loss aggregation, PPO-clip and the KL penalty, by hand and against verl's own functions."""

from __future__ import annotations

import math

import pytest
import torch

from canonrl.training.losses import KL_ESTIMATORS, LOSS_AGG_MODES, aggregate_loss, kl_penalty, ppo_clip_loss

# ----------------------------------------------------------------------------------------------------------------
# aggregate_loss by hand
# ----------------------------------------------------------------------------------------------------------------

LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
# token-mean: (1 + 2 + 4 + 5 + 6) / 5; seq-mean-token-mean: (1.5 + 5) / 2; seq-mean-token-sum: (3 + 15) / 2;
# seq-mean-token-sum-norm: the same / T (= 3)
EXPECTED = {
    "token-mean": 18.0 / 5,
    "seq-mean-token-mean": 3.25,
    "seq-mean-token-sum": 9.0,
    "seq-mean-token-sum-norm": 3.0,
}


def test_modes_constant_lists_all_four():
    assert set(LOSS_AGG_MODES) == set(EXPECTED)


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_aggregate_loss_by_hand(mode):
    assert aggregate_loss(LOSS, MASK, mode).item() == pytest.approx(EXPECTED[mode])


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_fully_masked_row_is_left_out_of_the_response_count(mode):
    loss = torch.cat([LOSS, torch.tensor([[7.0, 8.0, 9.0]])])
    mask = torch.cat([MASK, torch.zeros(1, 3)])
    # the third response has no tokens: every mode gives what it gives without it (not e.g. (3 + 15) / 3)
    assert aggregate_loss(loss, mask, mode).item() == pytest.approx(EXPECTED[mode])


def test_masked_positions_do_not_leak():
    loss = LOSS.clone()
    loss[0, 2] = 1e6  # under the mask: must not matter
    for mode in EXPECTED:
        assert aggregate_loss(loss, MASK, mode).item() == pytest.approx(EXPECTED[mode])


def test_scale_factor_replaces_the_horizon_in_sum_norm_only():
    assert aggregate_loss(LOSS, MASK, "seq-mean-token-sum-norm", scale_factor=4.5).item() == pytest.approx(2.0)
    assert aggregate_loss(LOSS, MASK, "seq-mean-token-sum-norm", scale_factor=None).item() == pytest.approx(3.0)
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        assert aggregate_loss(LOSS, MASK, mode, scale_factor=4.5).item() == pytest.approx(EXPECTED[mode])


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_all_masked_batch_gives_zero_not_nan(mode):
    assert aggregate_loss(LOSS, torch.zeros_like(MASK), mode).item() == 0.0


def test_aggregate_loss_accepts_bool_and_long_masks_and_keeps_gradients():
    loss = LOSS.clone().requires_grad_(True)
    for mask in (MASK.bool(), MASK.long()):
        value = aggregate_loss(loss, mask, "token-mean")
        assert value.item() == pytest.approx(EXPECTED["token-mean"])
    value.backward()
    torch.testing.assert_close(loss.grad, MASK / 5)


def test_aggregate_loss_unknown_mode_raises():
    with pytest.raises(ValueError, match="loss_agg must be one of"):
        aggregate_loss(LOSS, MASK, "token-sum")


# ----------------------------------------------------------------------------------------------------------------
# ppo_clip_loss by hand
# ----------------------------------------------------------------------------------------------------------------


def _one(ratio: float, advantage: float, **kwargs):
    logprobs = torch.tensor([[math.log(ratio)]], dtype=torch.float64)
    old = torch.zeros(1, 1, dtype=torch.float64)
    loss, indicators = ppo_clip_loss(logprobs, old, torch.tensor([[advantage]], dtype=torch.float64), **kwargs)
    return loss.item(), {k: v.item() for k, v in indicators.items()}


def test_positive_advantage_ratio_above_one_plus_clip_high_is_clipped():
    loss, ind = _one(1.5, 2.0, clip_low=0.1, clip_high=0.3)
    assert loss == pytest.approx(-2.0 * 1.3)  # max(-2 * 1.5, -2 * 1.3)
    assert ind == {"clipped": 1.0, "dual_clipped": 0.0}


def test_positive_advantage_ratio_below_one_is_not_clipped():
    loss, ind = _one(0.5, 2.0, clip_low=0.1, clip_high=0.3)
    assert loss == pytest.approx(-2.0 * 0.5)  # the pessimistic (larger) term is the unclipped one
    assert ind["clipped"] == 0.0


def test_positive_advantage_inside_the_trust_region_is_plain():
    loss, ind = _one(1.1, 2.0, clip_low=0.2, clip_high=0.2)
    assert loss == pytest.approx(-2.2)
    assert ind["clipped"] == 0.0


def test_negative_advantage_ratio_below_one_minus_clip_low_is_clipped():
    loss, ind = _one(0.5, -2.0, clip_low=0.1, clip_high=0.3)
    assert loss == pytest.approx(2.0 * 0.9)  # max(2 * 0.5, 2 * 0.9)
    assert ind == {"clipped": 1.0, "dual_clipped": 0.0}


def test_negative_advantage_ratio_above_one_is_not_clipped_below_dual_bound():
    loss, ind = _one(1.5, -2.0, clip_low=0.1, clip_high=0.3)
    assert loss == pytest.approx(3.0)  # 2 * 1.5 < 2 * 3 (dual clip)
    assert ind == {"clipped": 0.0, "dual_clipped": 0.0}


def test_dual_clip_caps_negative_advantage_with_huge_ratio_at_minus_a_times_c():
    loss, ind = _one(math.exp(5.0), -2.0, dual_clip=3.0)
    assert loss == pytest.approx(6.0)  # -A * c, not 2 * e^5
    assert ind == {"clipped": 0.0, "dual_clipped": 1.0}
    loss, ind = _one(math.exp(5.0), -2.0, dual_clip=10.0)
    assert loss == pytest.approx(20.0)


def test_dual_clip_none_turns_it_off():
    loss, ind = _one(math.exp(5.0), -2.0, dual_clip=None)
    assert loss == pytest.approx(2.0 * math.exp(5.0))
    assert set(ind) == {"clipped"}


def test_dual_clip_never_touches_positive_advantages():
    loss, ind = _one(math.exp(5.0), 2.0, clip_high=0.2)
    assert loss == pytest.approx(-2.4)
    assert ind["dual_clipped"] == 0.0


def test_log_ratio_is_clamped_so_the_ratio_cannot_overflow():
    logprobs = torch.tensor([[200.0]])
    loss, _ = ppo_clip_loss(logprobs, torch.zeros(1, 1), torch.tensor([[-1.0]]), dual_clip=None)
    assert torch.isfinite(loss).all()
    assert loss.item() == pytest.approx(math.exp(20.0), rel=1e-5)


def test_ppo_clip_loss_gradient_is_zero_where_clipped():
    logprobs = torch.tensor([[math.log(1.5), math.log(1.1)]], requires_grad=True)
    loss, _ = ppo_clip_loss(logprobs, torch.zeros(1, 2), torch.tensor([[1.0, 1.0]]), clip_high=0.2)
    loss.sum().backward()
    assert logprobs.grad[0, 0].item() == 0.0  # clipped: no gradient
    assert logprobs.grad[0, 1].item() == pytest.approx(-1.1)  # d(-A r)/d logprob = -A r


def test_indicators_on_a_mixed_batch():
    ratios = torch.tensor([[1.5, 0.5, 1.0, math.exp(4.0)]])
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, ind = ppo_clip_loss(ratios.log(), torch.zeros(1, 4), advantages, 0.2, 0.2, 3.0)
    assert ind["clipped"].tolist() == [[1.0, 1.0, 0.0, 0.0]]
    assert ind["dual_clipped"].tolist() == [[0.0, 0.0, 0.0, 1.0]]
    torch.testing.assert_close(loss, torch.tensor([[-1.2, 0.8, -1.0, 3.0]]))


@pytest.mark.parametrize(
    "kwargs",
    [{"clip_low": -0.1}, {"clip_high": -0.1}, {"dual_clip": 1.0}, {"dual_clip": 0.5}],
)
def test_ppo_clip_loss_bad_args_raise(kwargs):
    with pytest.raises(ValueError):
        ppo_clip_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# kl_penalty by hand
# ----------------------------------------------------------------------------------------------------------------


def test_kl_penalty_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -2.0]], dtype=torch.float64)
    torch.testing.assert_close(kl_penalty(logprobs, ref, "k1"), torch.tensor([[0.5, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(kl_penalty(logprobs, ref, "k2"), torch.tensor([[0.125, 0.0]], dtype=torch.float64))
    k3 = math.exp(-0.5) + 0.5 - 1
    torch.testing.assert_close(kl_penalty(logprobs, ref, "low_var_kl"), torch.tensor([[k3, 0.0]], dtype=torch.float64))
    # the default estimator is low_var_kl, which is never negative
    assert (kl_penalty(logprobs, ref) >= 0).all()


def test_low_var_kl_is_clamped_to_ten():
    value = kl_penalty(torch.tensor([[-30.0]]), torch.tensor([[0.0]]), "low_var_kl")
    assert value.item() == 10.0


def test_kl_penalty_unknown_estimator_raises():
    with pytest.raises(ValueError, match="kl estimator must be one of"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k3")
    assert KL_ESTIMATORS == ("low_var_kl", "k1", "k2")


# ----------------------------------------------------------------------------------------------------------------
# parity with verl
# ----------------------------------------------------------------------------------------------------------------


def _random_batch(seed: int, rows: int = 12, tokens: int = 9, with_empty_row: bool = True):
    g = torch.Generator().manual_seed(seed)
    loss = torch.randn(rows, tokens, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, tokens + 1, (rows,), generator=g)
    if with_empty_row:
        lengths[rows // 2] = 0
    mask = (torch.arange(tokens)[None, :] < lengths[:, None]).to(torch.float64)
    return loss, mask, g


@pytest.fixture(scope="module")
def core_algos():
    pytest.importorskip("verl")
    from verl.trainer.ppo import core_algos

    return core_algos


@pytest.mark.verl
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("scale_factor", [None, 7.0])
def test_aggregate_loss_matches_verl(core_algos, mode, seed, scale_factor):
    loss, mask, _ = _random_batch(seed)
    ours = aggregate_loss(loss, mask, mode, scale_factor)
    theirs = core_algos.agg_loss(loss, mask, mode, dp_size=1, loss_scale_factor=scale_factor)
    torch.testing.assert_close(ours, theirs.to(ours.dtype), atol=1e-7, rtol=1e-7)


class _ActorConfig:
    """The few fields of verl's ActorConfig that compute_policy_loss_vanilla reads."""

    def __init__(self, clip_low: float, clip_high: float, clip_ratio_c: float):
        self.clip_ratio = 0.2
        self.clip_ratio_low = clip_low
        self.clip_ratio_high = clip_high
        self.clip_ratio_c = clip_ratio_c
        self.global_batch_info: dict = {}

    def get(self, key, default=None):
        return getattr(self, key, default)


@pytest.mark.verl
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("clips", [(0.2, 0.2, 3.0), (0.2, 0.28, 3.0), (0.1, 0.4, 1.5)])
def test_ppo_clip_loss_matches_verl_vanilla(core_algos, seed, mode, clips):
    clip_low, clip_high, c = clips
    _, mask, g = _random_batch(seed)
    old = -torch.rand(mask.shape, generator=g, dtype=torch.float64) * 3
    # log-ratios spread wide enough to hit both clips and the dual clip
    logprobs = old + torch.randn(mask.shape, generator=g, dtype=torch.float64) * 1.5
    advantages = torch.randn(mask.shape, generator=g, dtype=torch.float64) * 2
    token_loss, indicators = ppo_clip_loss(logprobs, old, advantages, clip_low, clip_high, c)
    ours = aggregate_loss(token_loss, mask, mode)
    theirs, metrics = core_algos.compute_policy_loss_vanilla(
        old, logprobs, advantages, mask, loss_agg_mode=mode, config=_ActorConfig(clip_low, clip_high, c)
    )
    # verl divides seq-mean-token-mean by (count + 1e-8): agreement to ~1e-8, not bitwise
    torch.testing.assert_close(ours, theirs.to(ours.dtype), atol=1e-7, rtol=1e-7)
    tokens = mask.sum()
    clipfrac = (indicators["clipped"].double() * mask).sum() / tokens
    lower = (indicators["dual_clipped"].double() * mask).sum() / tokens
    assert clipfrac.item() == pytest.approx(metrics["actor/pg_clipfrac"], abs=1e-9)
    assert lower.item() == pytest.approx(metrics["actor/pg_clipfrac_lower"], abs=1e-9)
    # the random batch exercises every branch
    assert 0 < clipfrac.item() < 1 and lower.item() > 0


@pytest.mark.verl
@pytest.mark.parametrize("ours,theirs", [("low_var_kl", "low_var_kl"), ("low_var_kl", "k3"), ("k1", "k1"), ("k1", "kl"), ("k2", "k2"), ("k2", "mse")])
def test_kl_penalty_matches_verl(core_algos, ours, theirs):
    g = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(6, 11, generator=g, dtype=torch.float64) * 4
    ref = -torch.rand(6, 11, generator=g, dtype=torch.float64) * 4
    # extreme log-ratios exercise low_var_kl's clamps
    logprobs[0, 0], ref[0, 0] = -40.0, 0.0
    logprobs[0, 1], ref[0, 1] = 0.0, -40.0
    torch.testing.assert_close(kl_penalty(logprobs, ref, ours), core_algos.kl_penalty(logprobs, ref, theirs))
