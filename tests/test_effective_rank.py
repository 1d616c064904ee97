"""VERL effective-rank shaping (canonrl.methods.effective_rank) and its producer, checked by hand."""

import math

import pytest
import torch

import canonrl.methods.effective_rank as er_module
from canonrl.methods.effective_rank import EffectiveRank, aux_reward, bonus
from canonrl.producers.effective_rank import effective_rank, effective_rank_indicators


def _hidden_with_singular_values(values, tokens=8, dim=6):
    """[tokens, dim] centred matrix with the given singular values (orthonormal, zero-mean columns of U)."""
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(tokens, len(values), generator=g, dtype=torch.float64)
    raw = raw - raw.mean(0)
    u, _ = torch.linalg.qr(raw)
    v, _ = torch.linalg.qr(torch.randn(dim, len(values), generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ v.T


def _er_by_hand(values):
    total = sum(values) + 1e-8
    return math.exp(-sum(v / total * math.log(v / total + 1e-8) for v in values))


def test_effective_rank_known_singular_values():
    h = _hidden_with_singular_values([3.0, 1.0, 0.5])
    got = effective_rank(h[None], torch.ones(1, 8, dtype=torch.bool))
    assert got.item() == pytest.approx(_er_by_hand([3.0, 1.0, 0.5]), rel=1e-6)
    # equal singular values: ER = their number; padding rows do not change it; < 2 tokens gives 0
    h2 = _hidden_with_singular_values([2.0, 2.0])
    padded = torch.cat([h2, torch.full((3, 6), 7.0, dtype=torch.float64)])[None]
    mask = torch.tensor([[True] * 8 + [False] * 3])
    assert effective_rank(padded, mask).item() == pytest.approx(2.0, rel=1e-6)
    assert effective_rank(padded, torch.tensor([[True] + [False] * 10])).item() == 0.0


def test_indicators_differences_over_prefixes():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(1, 10, 5, generator=g, dtype=torch.float64)
    mask = torch.ones(1, 10)
    out = effective_rank_indicators(h, mask, diff_stride=2, max_tokens=None, dtype=torch.float64)
    ones = torch.ones(1, 10, dtype=torch.bool)
    m = [effective_rank(h[:, : t + 1], ones[:, : t + 1]).item() for t in (2, 4, 6, 8)]
    d = [m[j] - sum(m[:j]) / j for j in range(1, 4)]
    a = [d[1] - d[0], d[2] - d[1]]
    assert out[0, 2].item() == pytest.approx(effective_rank(h, ones).item(), rel=1e-5)
    assert out[0, 1].item() == pytest.approx(sum(d) / 3, abs=1e-5)
    assert out[0, 0].item() == pytest.approx(sum(a) / 2, abs=1e-5)
    # a short row (L <= 2s) has no differences; max_tokens keeps the last tokens of the differences only
    short = effective_rank_indicators(h, torch.tensor([[1.0] * 4 + [0.0] * 6]), diff_stride=2)
    assert short[0, :2].tolist() == [0.0, 0.0]
    tail = effective_rank_indicators(h, mask, diff_stride=2, max_tokens=5, dtype=torch.float64)
    last = effective_rank_indicators(h[:, 5:], torch.ones(1, 5), diff_stride=2, max_tokens=None, dtype=torch.float64)
    assert tail[0, :2].tolist() == pytest.approx(last[0, :2].tolist(), abs=1e-6)


def test_indicators_rows_are_independent_and_errors():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 12, 4, generator=g)
    mask = torch.tensor([[1] * 12, [1] * 7 + [0] * 5])
    both = effective_rank_indicators(h, mask, diff_stride=2)
    alone = effective_rank_indicators(h[1:, :7], torch.ones(1, 7), diff_stride=2)
    assert both[1].tolist() == pytest.approx(alone[0].tolist(), abs=1e-5)
    with pytest.raises(ValueError, match="diff_stride"):
        effective_rank_indicators(h, mask, diff_stride=0)
    with pytest.raises(ValueError, match="hidden must be"):
        effective_rank_indicators(h[0], mask)


def test_aux_and_bonus_by_hand():
    ind = torch.tensor([[1.0, 2.0, 30.0]], dtype=torch.float64)
    mids = torch.tensor([0.5, 4.0, 20.0], dtype=torch.float64)
    dev = [min((1 - 0.5) / 0.5, 5), (2 - 4) / 4, (30 - 20) / 20]
    t = 1 / (1 + math.exp(-2.0 * dev[0]))
    w = [t * e + (1 - t) * x for e, x in zip((0, 0, 1), (0, 1, 0))]
    expected = sum(math.tanh(dv) * wk for dv, wk in zip(dev, w))
    got = aux_reward(ind, mids, torch.tensor([0.0, 0, 1]).double(), torch.tensor([0.0, 1, 0]).double(), gain=2.0, scale=1.0)
    assert got.item() == pytest.approx(expected)
    # clamp at +-5 against a zero baseline
    z = aux_reward(ind, torch.zeros(3).double(), torch.ones(3).double(), torch.ones(3).double(), gain=2.0, scale=1.0)
    assert z.item() == pytest.approx(3 * math.tanh(5.0))
    base = torch.tensor([1.0, -1.0, 1.0, 0.0])
    aux = torch.tensor([0.2, 0.9, -0.3, 0.4])
    assert bonus(base, aux, 2.0).tolist() == pytest.approx([0.2, 0.5, 0.0, 0.0])


def _batch():
    return dict(rewards=torch.tensor([1.0, 0.0, 1.0, 0.0]), group=torch.tensor([0, 0, 1, 1]),
                mask=torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]))


def test_ema_timing_over_calls_and_state_round_trip():
    est = EffectiveRank()
    ind1 = torch.tensor([[1.0, 1.0, 10.0], [3.0, 3.0, 20.0], [1.0, 1.0, 10.0], [3.0, 3.0, 20.0]])
    first = est(indicators=ind1, **_batch())
    grpo = EffectiveRank(kappa=1e9).base(**_batch())
    assert torch.allclose(first, grpo)  # first call: no bonus
    assert est.mids == [0.0, 0.0, 0.0] and est.previous_means == pytest.approx([2.0, 2.0, 15.0])
    ind2 = ind1.flip(0)
    second = est(indicators=ind2, **_batch())
    # against mid = 0 every dev is +5: aux = tanh(5) (weights sum to 1); bonus = min(aux, |A|/2) at the last token
    a = grpo.amax(-1).where(grpo.amax(-1) > 0, grpo.amin(-1))
    extra = torch.minimum(torch.full((4,), math.tanh(5.0)), a.abs() / 2)
    expected = grpo.clone()
    for row, last in enumerate([2, 1, 3, 0]):
        expected[row, last] += extra[row]
    assert torch.allclose(second, expected, atol=1e-6)
    assert est.mids == pytest.approx([0.6, 0.6, 4.5])  # 0.3 * the first batch's means
    saved = est.state_dict()
    clone = EffectiveRank()
    clone.load_state_dict(saved)
    assert clone.state_dict() == saved
    assert torch.equal(clone(indicators=ind1, step=3, **_batch()), est(indicators=ind1, step=3, **_batch()))
    with pytest.raises(ValueError, match="mids"):
        clone.load_state_dict({**saved, "mids": [1.0]})


def test_bonus_on_all_tokens_and_errors():
    est = EffectiveRank(bonus_at="all")
    ind = torch.ones(4, 3)
    est(indicators=ind, **_batch())
    out = est(indicators=ind * 2, **_batch())
    base = est.base(**_batch())
    mask = _batch()["mask"].bool()
    assert (out[mask] >= base[mask] - 1e-6).all() and (out[~mask] == 0).all()
    with pytest.raises(ValueError, match="shape"):
        est(indicators=torch.ones(4, 2), **_batch())
    with pytest.raises(ValueError, match=r"indicators has NaN at rows \[0, 1, 2, 3\]"):
        est(indicators=torch.full((4, 3), float("nan")), **_batch())
    with pytest.raises(ValueError, match="w_explore"):
        EffectiveRank(w_explore=(1.0, 0.0))
    with pytest.raises(ValueError, match="kappa"):
        EffectiveRank(kappa=0.0)
    with pytest.raises(ValueError, match="needs 'indicators'"):
        est(**_batch())
    assert er_module.EffectiveRank.producer


def test_registered_and_fed_by_the_producer():
    import canonrl

    est = canonrl.get_estimator("effective_rank")
    assert isinstance(est, EffectiveRank) and est.stateful and est.required_inputs() == ("indicators",)
    hidden = torch.randn(4, 4, 8, generator=torch.Generator().manual_seed(0))
    indicators = effective_rank_indicators(hidden, _batch()["mask"], diff_stride=1)
    out = canonrl.advantages("effective_rank", indicators=indicators, **_batch())
    assert out.shape == (4, 4) and out.dtype == torch.float32
