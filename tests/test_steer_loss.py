"""STEER's token weights and policy loss: hand-computed weights, degenerate cases, equivalences, oracle, errors.

Hand-computed row: log pi = log pi_old = log 0.5 (ratio 1), so p = q = 0.5, p (1 - p) = 0.25 and A / q = 2 A;
with H = ln 2 + h, ln p + H = h and m = |2 A * 0.25 * h| = |A h| / 2:

  t  A    h    m     linear (0.8, 1.2): 1.2 - 0.2 m     exponential (0.8): 0.8 ** (m / 2)
  1  1    1    0.5   1.1                                0.8 ** 0.25
  2  -2   1    1.0   1.0                                0.8 ** 0.5
  3  1    -1   0.5   1.1                                0.8 ** 0.25
  4  4    1    2.0   0.8                                0.8
  5  0    3    0.0   1.2                                1

  m_min = 0, m_max = 2; a padding token (NaN everywhere) follows.
  linear token-mean loss at ratio 1 = -(1.1 - 2.0 + 1.1 + 3.2 + 0) / 5 = -0.68; d loss / d log pi_t = -A_t w_t / 5.
"""

import math

import pytest
import torch

from canonrl.training.losses import aggregate_loss, ppo_clip_loss
from canonrl.training.steer_loss import STEER_RUN_EXP, STEER_RUN_LINEAR, steer_policy_loss, steer_token_weights

NAN = float("nan")
LN2 = math.log(2.0)
ADV = [1.0, -2.0, 1.0, 4.0, 0.0, NAN]
H = [1.0, 1.0, -1.0, 1.0, 3.0, NAN]
MASK = [1.0] * 5 + [0.0]


def hand_inputs():
    logprobs = torch.tensor([[math.log(0.5)] * 5 + [NAN]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[math.log(0.5)] * 5 + [NAN]], dtype=torch.float64)
    entropy = torch.tensor([[LN2 + h for h in H]], dtype=torch.float64)
    return logprobs, old, torch.tensor([ADV], dtype=torch.float64), entropy, torch.tensor([MASK])


# --- a transcription of the official code (zz-haooo/STEER b31df71, verl/trainer/ppo/core_algos.py) -----------------


def official_compute_token_weights(
    advantages, entropys, old_log_prob, log_prob, response_mask, token_weight_min=0.8, token_weight_max=1.2, linear=True
):
    """``compute_token_weights``, lines 580-676 (print removed)."""
    with torch.no_grad():
        x = torch.exp(log_prob)
        x = torch.clamp(x, min=1e-8, max=1.0 - 1e-8)
        x_one_minus_x_squared = x * (1 - x)
        ln_x_plus_h = torch.log(x) + entropys
        f_x = x_one_minus_x_squared * ln_x_plus_h
        old_prob = torch.exp(old_log_prob)
        old_prob = torch.clamp(old_prob, min=1e-8, max=1.0)
        advantage_over_old_prob = advantages / old_prob
        metric = advantage_over_old_prob * f_x
        if not torch.isfinite(metric).all():
            metric = torch.where(torch.isfinite(metric), metric, torch.zeros_like(metric))
        metric = torch.abs(metric)
        valid_metric = metric[response_mask.bool()]
        if valid_metric.numel() == 0:
            return torch.zeros_like(response_mask, dtype=torch.float)
        metric_min = valid_metric.min()
        metric_max = valid_metric.max()
        token_weights = torch.zeros_like(metric, dtype=torch.float)
        valid_mask = response_mask.bool()
        if valid_mask.any():
            valid_metric = metric[valid_mask]
            if linear:
                if metric_max > metric_min:
                    scale_factor = (token_weight_max - token_weight_min) / (metric_max - metric_min)
                    valid_weights = token_weight_max - (valid_metric - metric_min) * scale_factor
                else:
                    valid_weights = torch.full_like(valid_metric, (token_weight_min + token_weight_max) / 2)
                valid_weights = torch.clamp(valid_weights, min=token_weight_min, max=token_weight_max)
            else:
                k = -torch.log(
                    torch.tensor(token_weight_min, dtype=metric.dtype, device=metric.device)
                ) / torch.maximum(metric_max, torch.tensor(0.02, dtype=metric.dtype, device=metric.device))
                valid_weights = torch.exp(-k * valid_metric)
                valid_weights = torch.clamp(valid_weights, min=token_weight_min, max=1.0)
            token_weights[valid_mask] = valid_weights
        token_weights = token_weights * response_mask.float()
        return token_weights


def _masked_mean(values, mask):
    return (values * mask).sum() / (mask.sum() + 1e-8)


def official_policy_loss(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    entropys,
    cliprange_low,
    cliprange_high,
    clip_ratio_c=3.0,
    token_weight_min=0.8,
    token_weight_max=1.2,
    linear=True,
):
    """``compute_policy_loss_with_entropy``, lines 680-809, token-mean, returning (pg_loss, weights)."""
    token_weights = official_compute_token_weights(
        advantages, entropys, old_log_prob, log_prob, response_mask, token_weight_min, token_weight_max, linear
    )
    assert clip_ratio_c > 1.0
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - cliprange_low, 1 + cliprange_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    weighted_pg_losses = pg_losses * token_weights
    return _masked_mean(weighted_pg_losses, response_mask), token_weights


def random_inputs(seed, batch=6, length=12, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(batch, length, generator=g, dtype=dtype) * 4
    old = logprobs + 0.6 * torch.randn(batch, length, generator=g, dtype=dtype)
    old = old.clamp(max=0.0)
    adv = torch.randn(batch, 1, generator=g, dtype=dtype).expand(batch, length).clone()
    adv[0] = -adv[0].abs() * 2  # a strongly negative row so the dual clip binds somewhere
    old[0, :3] = logprobs[0, :3] - 2.0  # ratio e^2 > c = 3 with A < 0
    entropy = torch.rand(batch, length, generator=g, dtype=dtype) * 3
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(dtype)
    return logprobs, old, adv, entropy, mask


# --- hand-computed ------------------------------------------------------------------------------------------------


def test_hand_computed_linear_weights_loss_and_grad():
    logprobs, old, adv, entropy, mask = hand_inputs()
    weights = steer_token_weights(logprobs, old, adv, entropy, mask)
    assert weights[0].tolist() == pytest.approx([1.1, 1.0, 1.1, 0.8, 1.2, 0.0], abs=1e-12)
    loss, stats = steer_policy_loss(logprobs, old, adv, entropy, mask)
    assert stats["metric"][0].tolist() == pytest.approx([0.5, 1.0, 0.5, 2.0, 0.0, 0.0], abs=1e-12)
    assert stats["weights"][0].tolist() == pytest.approx(weights[0].tolist(), abs=1e-15)
    assert loss.item() == pytest.approx(-0.68, abs=1e-12)
    assert stats["token_loss"][0].tolist() == pytest.approx([-1.1, 2.0, -1.1, -3.2, 0.0, 0.0], abs=1e-12)
    assert stats["weight_mean"].item() == pytest.approx(5.2 / 5)
    assert stats["weight_min"].item() == pytest.approx(0.8)
    assert stats["weight_max"].item() == pytest.approx(1.2)
    assert stats["clipfrac"].item() == 0.0 and stats["ppo_kl"].item() == 0.0
    loss.backward()
    assert (logprobs.grad[0] * 5).tolist() == pytest.approx([-1.1, 2.0, -1.1, -3.2, 0.0, 0.0], abs=1e-12)


def test_hand_computed_exponential_weights():
    logprobs, old, adv, entropy, mask = hand_inputs()
    weights = steer_token_weights(logprobs, old, adv, entropy, mask, w_min=0.8, w_max=1.0, linear=False)
    expected = [0.8**0.25, 0.8**0.5, 0.8**0.25, 0.8, 1.0, 0.0]
    assert weights[0].tolist() == pytest.approx(expected, abs=1e-12)
    # w_max plays no part in the exponential mapping
    other = steer_token_weights(logprobs, old, adv, entropy, mask, w_min=0.8, w_max=5.0, linear=False)
    assert torch.equal(weights, other)


def test_exponential_floor_of_m_max():
    # m_max = 0.01 < 0.02: k = -ln(0.8) / 0.02, so m = 0.01 gets 0.8 ** 0.5 rather than 0.8
    logprobs, old, _, entropy, mask = hand_inputs()
    adv = torch.tensor([[0.02, 0.01, 0.0, 0.02, 0.0, NAN]], dtype=torch.float64)
    entropy = torch.full_like(entropy, LN2 + 1.0)
    weights = steer_token_weights(logprobs, old, adv, entropy, mask, w_min=0.8, linear=False)
    assert weights[0].tolist() == pytest.approx([0.8**0.5, 0.8**0.25, 1.0, 0.8**0.5, 1.0, 0.0], abs=1e-12)


def test_p_is_the_current_policy_and_q_the_old_one():
    # current p = 0.25, old q = 0.5: m = |A / 0.5 * 0.25 * 0.75 * (ln 0.25 + H)|
    mask = torch.ones(1, 2)
    logprobs = torch.full((1, 2), math.log(0.25), dtype=torch.float64)
    old = torch.full((1, 2), math.log(0.5), dtype=torch.float64)
    adv = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    entropy = torch.full((1, 2), math.log(4.0) + 1.0, dtype=torch.float64)
    _, stats = steer_policy_loss(logprobs, old, adv, entropy, mask)
    assert stats["metric"][0].tolist() == pytest.approx([0.375, 0.75], abs=1e-12)
    # old probability 1 (log 0) is not clamped below 1 (upstream clamps q to [1e-8, 1])
    _, stats = steer_policy_loss(logprobs, torch.zeros_like(old), adv, entropy, mask)
    assert stats["metric"][0].tolist() == pytest.approx([0.1875, 0.375], abs=1e-12)


# --- degenerate and edge cases ------------------------------------------------------------------------------------


def test_degenerate_equal_metric():
    logprobs, old, _, _, mask = hand_inputs()
    adv = torch.tensor([[1.0, -1.0, 1.0, 1.0, -1.0, NAN]], dtype=torch.float64)
    entropy = torch.full((1, 6), LN2 + 1.0, dtype=torch.float64)  # every m = 0.5
    lin = steer_token_weights(logprobs, old, adv, entropy, mask)
    assert lin[0].tolist() == pytest.approx([1.0] * 5 + [0.0], abs=1e-12)
    lin = steer_token_weights(logprobs, old, adv, entropy, mask, w_min=0.8, w_max=1.0)
    assert lin[0].tolist() == pytest.approx([0.9] * 5 + [0.0], abs=1e-12)
    expo = steer_token_weights(logprobs, old, adv, entropy, mask, linear=False)
    assert expo[0].tolist() == pytest.approx([0.8] * 5 + [0.0], abs=1e-12)
    zero_adv = torch.zeros_like(adv)  # every m = 0
    assert steer_token_weights(logprobs, old, zero_adv, entropy, mask, linear=False)[0, :5].tolist() == [1.0] * 5
    assert steer_token_weights(logprobs, old, zero_adv, entropy, mask)[0, :5].tolist() == pytest.approx([1.0] * 5)


def test_one_valid_token_gets_the_midpoint():
    logprobs, old, adv, entropy, _ = hand_inputs()
    mask = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0, 0.0]])
    weights = steer_token_weights(logprobs, old, adv, entropy, mask, w_min=0.7, w_max=1.1)
    assert weights[0].tolist() == pytest.approx([0, 0, 0, 0.9, 0, 0], abs=1e-12)


def test_min_max_only_over_the_mask():
    logprobs, old, adv, entropy, mask = hand_inputs()
    adv2 = adv.clone()
    adv2[0, 5] = 1e6  # a huge metric outside the mask changes nothing
    logprobs2 = logprobs.detach().clone()
    logprobs2[0, 5] = math.log(0.5)
    entropy2 = entropy.clone()
    entropy2[0, 5] = 5.0
    a = steer_token_weights(logprobs, old, adv, entropy, mask)
    b = steer_token_weights(logprobs2, old, adv2, entropy2, mask)
    assert torch.equal(a, b)


def test_empty_mask():
    logprobs, old, adv, entropy, _ = hand_inputs()
    mask = torch.zeros(1, 6)
    loss, stats = steer_policy_loss(logprobs, old, adv, entropy, mask)
    assert loss.item() == 0.0
    assert stats["weights"].abs().sum().item() == 0.0
    for key in ("clipfrac", "clipfrac_lower", "ppo_kl", "weight_mean", "weight_min", "weight_max"):
        assert stats[key].item() == 0.0
    loss.backward()
    assert logprobs.grad.abs().sum().item() == 0.0


# --- equivalences -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("mapping", [{"w_min": 1.0, "w_max": 1.0, "linear": True}, {"w_min": 1.0, "linear": False}])
def test_unit_weights_equal_plain_ppo_clip(agg, mapping):
    logprobs, old, adv, entropy, mask = random_inputs(3)
    logprobs.requires_grad_(True)
    loss, stats = steer_policy_loss(
        logprobs, old, adv, entropy, mask, clip_low=0.2, clip_high=0.28, clip_ratio_c=3.0, agg=agg, **mapping
    )
    assert torch.equal(stats["weights"], mask.to(torch.float64))
    lp = logprobs.detach().clone().requires_grad_(True)
    ref_tokens, ind = ppo_clip_loss(lp, old, adv, 0.2, 0.28, 3.0)
    assert ind["dual_clipped"][mask > 0].sum() > 0 and ind["clipped"][mask > 0].sum() > 0
    ref = aggregate_loss(ref_tokens, mask, agg)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    assert stats["clipfrac"].item() == pytest.approx(((ind["clipped"] * mask).sum() / mask.sum()).item())
    assert stats["clipfrac_lower"].item() == pytest.approx(((ind["dual_clipped"] * mask).sum() / mask.sum()).item())
    loss.backward()
    ref.backward()
    torch.testing.assert_close(logprobs.grad, lp.grad, rtol=1e-12, atol=1e-12)


# --- the official code as an oracle -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("settings", [STEER_RUN_EXP, STEER_RUN_LINEAR, {}], ids=["run_exp", "run_linear", "defaults"])
def test_matches_official_code(seed, settings):
    # upstream stores the weights in a float32 tensor and raises on float64 log-probs, so it runs on float32 copies
    inputs64 = random_inputs(seed)
    logprobs, old, adv, entropy, mask = (t.float() for t in inputs64)
    kwargs = {"w_min": 0.8, "w_max": 1.2, "linear": True, "clip_low": 0.2, "clip_high": 0.2, "clip_ratio_c": 3.0}
    kwargs.update(settings)
    ref_loss, ref_weights = official_policy_loss(
        old,
        logprobs,
        adv,
        mask,
        entropy,
        kwargs["clip_low"],
        kwargs["clip_high"],
        kwargs["clip_ratio_c"],
        kwargs["w_min"],
        kwargs["w_max"],
        kwargs["linear"],
    )
    loss, stats = steer_policy_loss(logprobs, old, adv, entropy, mask, **kwargs)
    assert stats["weights"].dtype == torch.float32
    torch.testing.assert_close(stats["weights"], ref_weights)
    torch.testing.assert_close(loss, ref_loss)
    weight_kwargs = {k: kwargs[k] for k in ("w_min", "w_max", "linear")}
    assert torch.equal(steer_token_weights(logprobs, old, adv, entropy, mask, **weight_kwargs), stats["weights"])
    # float64 inputs agree with the float32 reference to float32 precision
    loss64, stats64 = steer_policy_loss(*inputs64, **kwargs)
    torch.testing.assert_close(stats64["weights"], ref_weights.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss64, ref_loss.double(), rtol=1e-5, atol=1e-5)


# --- gradient -----------------------------------------------------------------------------------------------------


def test_gradient_flows_through_the_ratio_only():
    logprobs, old, adv, entropy, mask = random_inputs(5)
    logprobs.requires_grad_(True)
    entropy.requires_grad_(True)
    adv.requires_grad_(True)
    loss, stats = steer_policy_loss(logprobs, old, adv, entropy, mask, **STEER_RUN_LINEAR)
    assert not stats["weights"].requires_grad and not stats["metric"].requires_grad
    loss.backward()
    assert entropy.grad is None
    # the same loss with the weights as constants gives the same gradient w.r.t. log pi
    lp = logprobs.detach().clone().requires_grad_(True)
    tokens, _ = ppo_clip_loss(lp, old, adv.detach(), 0.2, 0.28, 10.0)
    aggregate_loss(tokens * stats["weights"], mask, "token-mean").backward()
    torch.testing.assert_close(logprobs.grad, lp.grad, rtol=1e-12, atol=1e-12)
    assert (logprobs.grad * (1 - mask)).abs().sum().item() == 0.0


# --- errors -------------------------------------------------------------------------------------------------------


def test_nan_inside_mask_names_rows():
    logprobs, old, adv, entropy, mask = random_inputs(1)
    entropy[2, 0] = NAN
    entropy[4, 0] = float("inf")
    with pytest.raises(ValueError, match=r"entropy is NaN or Inf inside the mask at rows \[2, 4\]"):
        steer_policy_loss(logprobs, old, adv, entropy, mask)
    with pytest.raises(ValueError, match=r"entropy .* rows \[2, 4\]"):
        steer_token_weights(logprobs, old, adv, entropy, mask)
    logprobs, old, adv, entropy, mask = random_inputs(1)
    adv[1, 0] = NAN
    with pytest.raises(ValueError, match=r"advantages .* rows \[1\]"):
        steer_policy_loss(logprobs, old, adv, entropy, mask)


def test_nan_outside_mask_is_ignored():
    logprobs, old, adv, entropy, mask = hand_inputs()
    loss, stats = steer_policy_loss(logprobs, old, adv, entropy, mask)
    assert math.isfinite(loss.item())
    assert torch.isfinite(stats["token_loss"]).all() and torch.isfinite(stats["metric"]).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"w_min": 1.3, "w_max": 1.2}, "0 <= w_min <= w_max"),
        ({"w_min": -0.1}, "0 <= w_min <= w_max"),
        ({"w_min": 0.0, "linear": False}, "0 < w_min <= 1"),
        ({"w_min": 1.1, "linear": False}, "0 < w_min <= 1"),
        ({"clip_ratio_c": 1.0}, "clip_ratio_c must be > 1"),
        ({"clip_low": -0.1}, "clip_low and clip_high must be >= 0"),
        ({"agg": "sum"}, "loss_agg must be one of"),
    ],
)
def test_bad_parameters(kwargs, message):
    logprobs, old, adv, entropy, mask = random_inputs(0)
    with pytest.raises(ValueError, match=message):
        steer_policy_loss(logprobs, old, adv, entropy, mask, **kwargs)


def test_bad_shapes_and_types():
    logprobs, old, adv, entropy, mask = random_inputs(0)
    with pytest.raises(ValueError, match=r"entropy must have the shape of mask"):
        steer_policy_loss(logprobs, old, adv, entropy[:, :-1], mask)
    with pytest.raises(ValueError, match=r"mask must be a \[B, T\] tensor"):
        steer_policy_loss(logprobs, old, adv, entropy, mask[0])
    with pytest.raises(TypeError, match="advantages must be a torch.Tensor"):
        steer_token_weights(logprobs, old, adv.tolist(), entropy, mask)


def test_dual_clip_off():
    logprobs, old, adv, entropy, mask = random_inputs(2)
    loss, stats = steer_policy_loss(logprobs, old, adv, entropy, mask, clip_ratio_c=None)
    tokens, _ = ppo_clip_loss(logprobs, old, adv, 0.2, 0.2, None)
    ref = aggregate_loss(tokens * stats["weights"], mask, "token-mean")
    torch.testing.assert_close(loss, ref)
    assert stats["clipfrac_lower"].item() == 0.0
