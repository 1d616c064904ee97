"""D^3S (arXiv 2509.22115): max-variance response subsets, top-K% |A|·H tokens, the linear schedule."""

from __future__ import annotations

import itertools

import pytest
import torch

from canonrl.training.selection import d3s_keep, d3s_sample_keep, d3s_schedule, d3s_token_keep


def _rows(keep: torch.Tensor) -> list[int]:
    return keep.nonzero().flatten().tolist()


# ---------------------------------------------------------------- sample level


def test_hand_case_max_variance_subset():
    # group 0: [3, -1, 0.5, -2, 1]. N = 3: {3, -2, -1} (var 14/3) beats {3, 1, -2} (var 38/9) and {3, 1, 0.5}.
    # group 1: all equal -> dropped; group 2: singleton -> kept.
    a = torch.tensor([3.0, -1.0, 0.5, -2.0, 1.0, 1.0, 1.0, 1.0, 5.0])
    g = [0, 0, 0, 0, 0, 1, 1, 1, 2]
    assert _rows(d3s_sample_keep(a, g, 3)) == [0, 1, 3, 8]
    # N = 2: the two extremes 3 and -2
    assert _rows(d3s_sample_keep(a, g, 2)) == [0, 3, 8]
    # N = 1: every subset has variance 0; the tie-break keeps the largest |A|
    assert _rows(d3s_sample_keep(a, g, 1)) == [0, 8]
    # N >= group size keeps the whole group
    assert _rows(d3s_sample_keep(a, g, 5)) == [0, 1, 2, 3, 4, 8]
    # all-equal groups and singletons are configurable
    assert _rows(d3s_sample_keep(a, g, 2, drop_constant=False)) == [0, 3, 5, 6, 8]
    assert _rows(d3s_sample_keep(a, g, 2, keep_singletons=False)) == [0, 3]


def test_asymmetric_binary_group():
    # GRPO advantages of 7 correct / 1 wrong (G = 8): the wrong one is always in the max-variance subset
    r = torch.tensor([1.0] * 7 + [0.0])
    a = (r - r.mean()) / r.std()
    keep = d3s_sample_keep(a, [0] * 8, 4)
    assert keep.sum() == 4 and keep[7]


def _brute_force_variance(values: list[float], n: int) -> float:
    if len(values) <= n:
        return torch.tensor(values, dtype=torch.float64).var(unbiased=False).item()
    subsets = itertools.combinations(values, n)
    return max(torch.tensor(c, dtype=torch.float64).var(unbiased=False).item() for c in subsets)


@pytest.mark.parametrize("seed", range(20))
def test_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(2, 8, (4,), generator=g).tolist()
    group = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    group = group[torch.randperm(len(group), generator=g)]  # groups interleaved in the batch
    # some ties: rounded values
    a = (torch.randn(len(group), generator=g) * 2).round(decimals=1)
    n = int(torch.randint(1, 7, (1,), generator=g))
    keep = d3s_sample_keep(a, group, n, drop_constant=False)
    for i, size in enumerate(sizes):
        rows = group == i
        kept = a[rows & keep].double()
        assert kept.numel() == min(n, size)
        best = _brute_force_variance(a[rows].tolist(), n)
        assert kept.var(unbiased=False).item() == pytest.approx(best, abs=1e-9)


def test_cross_group_variant():
    a = torch.tensor([0.1, -0.1, 2.0, -3.0, 0.0, 1.5])
    g = [0, 0, 1, 1, 2, 2]
    # over the whole batch: N = 3 total
    keep = d3s_sample_keep(a, g, 3, cross_group=True)
    assert _rows(keep) == [2, 3, 5] or _rows(keep) == [1, 2, 3]
    values = a[keep].double()
    best = _brute_force_variance(a.tolist(), 3)
    assert values.var(unbiased=False).item() == pytest.approx(best)


def test_mask_and_token_level_advantages():
    a = torch.tensor([2.0, -2.0, 1.0, -1.0])
    mask = torch.ones(4, 3)
    mask[0] = 0  # fully masked: never kept, not counted in its group
    keep = d3s_sample_keep(a, [0, 0, 0, 0], 2, mask=mask)
    assert _rows(keep) == [1, 2]
    # [B, T] advantages (broadcast sequence advantages) with a mask give the same rows
    a_tok = a[:, None].expand(4, 3).clone()
    a_tok[~mask.bool()] = 123.0  # values under the mask are ignored
    assert torch.equal(d3s_sample_keep(a_tok, [0, 0, 0, 0], 2, mask=mask), keep)
    # a group left with one valid row counts as a singleton
    keep = d3s_sample_keep(a[:2], [0, 0], 2, mask=mask[:2])
    assert _rows(keep) == [1]


def test_ties_keep_batch_order_and_exact_count():
    a = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
    keep = d3s_sample_keep(a, [0] * 6, 4)
    assert keep.sum() == 4
    assert keep[:3].sum() == 2 and keep[3:].sum() == 2
    # smallest taken earliest-first, largest latest-first
    assert _rows(keep) == [1, 2, 3, 4]


def test_empty_and_string_ids():
    assert d3s_sample_keep(torch.zeros(0), [], 2).shape == (0,)
    keep = d3s_sample_keep(torch.tensor([1.0, -1.0, 0.0]), ["u1", "u1", "u1"], 2)
    assert _rows(keep) == [0, 1]


def test_sample_errors():
    a = torch.tensor([1.0, float("nan"), 0.0, 2.0])
    with pytest.raises(ValueError, match=r"advantages has NaN/Inf at rows \[1\]"):
        d3s_sample_keep(a, [0, 0, 1, 1], 2)
    # a NaN under a fully masked row is ignored
    mask = torch.ones(4, 2)
    mask[1] = 0
    assert _rows(d3s_sample_keep(a, [0, 0, 1, 1], 2, mask=mask)) == [0, 2, 3]
    with pytest.raises(ValueError, match="num_keep"):
        d3s_sample_keep(torch.ones(4), [0, 0, 1, 1], 0)
    with pytest.raises(ValueError, match="num_keep"):
        d3s_sample_keep(torch.ones(4), [0, 0, 1, 1], 2.5)
    with pytest.raises(ValueError, match="group"):
        d3s_sample_keep(torch.ones(4), [0, 0, 1], 2)
    with pytest.raises(ValueError, match="mask"):
        d3s_sample_keep(torch.ones(4), [0, 0, 1, 1], 2, mask=torch.ones(3, 2))
    with pytest.raises(ValueError, match="mask"):
        d3s_sample_keep(torch.ones(4, 2), [0, 0, 1, 1], 2)
    with pytest.raises(TypeError, match="advantages"):
        d3s_sample_keep(torch.ones(4, dtype=torch.long), [0, 0, 1, 1], 2)


# ---------------------------------------------------------------- token level


def test_token_hand_case():
    a = torch.tensor([1.0, -2.0])
    entropy = torch.tensor([[0.5, 0.1, 0.9, 0.0], [0.2, 0.4, 0.05, 0.3]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    # scores |A|·H: row 0 [0.5, 0.1, 0.9, -], row 1 [0.4, 0.8, 0.1, 0.6]; 7 candidates
    keep = d3s_token_keep(a, entropy, mask, 0.5)  # ceil(3.5) = 4: 0.9, 0.8, 0.6, 0.5
    assert keep.tolist() == [[True, False, True, False], [False, True, False, True]]
    keep = d3s_token_keep(a, entropy, mask, 3 / 7)  # exactly 3 (float error must not make it 4)
    assert keep.sum() == 3
    keep = d3s_token_keep(a, entropy, mask, 0.01)  # at least one token
    assert keep.tolist() == [[False, False, True, False], [False, False, False, False]]
    # per response: ceil(0.5·3) = 2 of row 0, ceil(0.5·4) = 2 of row 1
    keep = d3s_token_keep(a, entropy, mask, 0.5, per_row=True)
    assert keep.tolist() == [[True, False, True, False], [False, True, False, True]]
    keep = d3s_token_keep(a, entropy, mask, 0.34, per_row=True)  # ceil(1.02)=2, ceil(1.36)=2
    assert keep.sum(1).tolist() == [2, 2]
    # [B, T] advantages give the same
    broadcast = d3s_token_keep(a[:, None].expand(2, 4), entropy, mask, 0.5)
    assert torch.equal(broadcast, d3s_token_keep(a, entropy, mask, 0.5))
    # K = 1 keeps every valid token
    assert torch.equal(d3s_token_keep(a, entropy, mask, 1.0), mask.bool())


def test_token_row_keep_and_masked_rows():
    a = torch.tensor([1.0, -2.0, 3.0])
    entropy = torch.ones(3, 4)
    mask = torch.ones(3, 4)
    mask[2] = 0
    rows = torch.tensor([True, False, True])
    keep = d3s_token_keep(a, entropy, mask, 1.0, row_keep=rows)
    assert keep.tolist() == [[True] * 4, [False] * 4, [False] * 4]
    # nothing to keep at all
    assert not d3s_token_keep(a, entropy, torch.zeros(3, 4), 0.5).any()
    assert not d3s_token_keep(a, entropy, torch.zeros(3, 4), 0.5, per_row=True).any()
    # ties: earlier tokens first
    keep = d3s_token_keep(torch.ones(2), torch.ones(2, 3), torch.ones(2, 3), 0.5)
    assert keep.tolist() == [[True, True, True], [False, False, False]]


def test_token_errors():
    a, entropy, mask = torch.ones(2), torch.ones(2, 3), torch.ones(2, 3)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="top_fraction"):
            d3s_token_keep(a, entropy, mask, bad)
    with pytest.raises(ValueError, match="entropy"):
        d3s_token_keep(a, entropy[:, :2], mask, 0.5)
    with pytest.raises(ValueError, match="advantages"):
        d3s_token_keep(torch.ones(3), entropy, mask, 0.5)
    neg = entropy.clone()
    neg[1, 2] = -0.1
    with pytest.raises(ValueError, match=r"negative at rows \[1\]"):
        d3s_token_keep(a, neg, mask, 0.5)
    nan = entropy.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/Inf at rows \[0\]"):
        d3s_token_keep(a, nan, mask, 0.5)
    masked = mask.clone()
    masked[0, 0] = 0
    assert d3s_token_keep(a, nan, masked, 0.5).sum() == 3  # a NaN under the mask is ignored
    with pytest.raises(ValueError, match="row_keep"):
        d3s_token_keep(a, entropy, mask, 0.5, row_keep=torch.ones(2))


# ---------------------------------------------------------------- both levels and schedule


def test_d3s_keep_combines_levels():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, generator=g)
    entropy = torch.rand(16, 10, generator=g)
    mask = (torch.arange(10)[None, :] < torch.randint(1, 11, (16,), generator=g)[:, None]).float()
    group = torch.arange(16) // 4
    rows, tokens = d3s_keep(a, entropy, mask, group, num_keep=2, top_fraction=0.2)
    assert torch.equal(rows, d3s_sample_keep(a, group, 2, mask=mask))
    assert rows.sum() == 8
    assert not (tokens & ~rows[:, None]).any() and not (tokens & ~mask.bool()).any()
    candidates = (mask.bool() & rows[:, None]).sum()
    assert tokens.sum() == int(torch.ceil(candidates * 0.2 - 1e-6))
    # the kept tokens have the largest scores among candidates
    score = a.abs()[:, None] * entropy
    cand = mask.bool() & rows[:, None]
    assert score[tokens].min() >= score[cand & ~tokens].max()


def test_schedule():
    ends = dict(n_init=2, n_final=8, k_init=0.1, k_final=0.5)
    assert d3s_schedule(0.0, **ends) == (2, 0.1)
    assert d3s_schedule(1.0, **ends) == (8, 0.5)
    n, k = d3s_schedule(0.5, **ends)
    assert n == 5 and k == pytest.approx(0.3)
    assert d3s_schedule(0.25, **ends)[0] == 4  # 3.5 rounds half up
    assert d3s_schedule(0.2, n_init=4, n_final=2, k_init=0.5, k_final=0.5) == (4, 0.5)  # 3.6 -> 4
    for bad in (-0.1, 1.1):
        with pytest.raises(ValueError, match="progress"):
            d3s_schedule(bad, **ends)
    with pytest.raises(ValueError, match="n_init"):
        d3s_schedule(0.5, **{**ends, "n_init": 0})
    with pytest.raises(ValueError, match="k_final"):
        d3s_schedule(0.5, **{**ends, "k_final": 0.0})
