"""KTAE: the spec's test vectors (official float32 numerics), exact numerics against scipy, properties, edges."""

import itertools

import pytest
import torch

import canonrl
from canonrl.batch import make_batch
from canonrl.methods._fisher import fisher_two_sided, fisher_two_sided_upstream
from canonrl.methods.ktae import key_token_scores

PAD = 151643  # Qwen2.5's <|endoftext|>, hard-coded upstream


def build_group(correct_rows, incorrect_rows, placements, tokens_per_row=600):
    """Rows of ``tokens_per_row`` tokens: ``placements`` maps token id -> (per-row counts of correct rows, of
    incorrect rows); the rest of each row is a filler id unique to the row."""
    rows = []
    for side, row_count in ((0, correct_rows), (1, incorrect_rows)):
        for r in range(row_count):
            row = []
            for token, counts in placements.items():
                row += [token] * counts[side][r]
            row += [1000 + len(rows)] * (tokens_per_row - len(row))
            rows.append(row)
    rewards = torch.tensor([1.0] * correct_rows + [0.0] * incorrect_rows)
    return torch.tensor(rows), rewards


def spread(present, total, each=1):
    return [each] * present + [0] * (total - present)


# (token, correct per-row counts, incorrect per-row counts, expected p, K) from ktae.md section 7, G = 16, 8/8
EIGHT_EIGHT = {
    1: (spread(8, 8, 5), spread(8, 8, 5), 1.0, 0.0),  # in all 16; 40, 40
    2: (spread(8, 8, 10), spread(8, 8, 5), 1.0, 0.0),  # in all 16; 80, 40
    3: (spread(8, 8), spread(0, 8), 1.55e-4, 1.000),  # 8/8 vs 0/8
    4: (spread(6, 8), spread(2, 8), 0.1319, 0.636),  # 6/8 vs 2/8
    5: (spread(5, 8), spread(3, 8), 0.6193, 0.109),  # 5/8 vs 3/8
    6: (spread(1, 8), spread(0, 8), None, 0.920),  # rare, one-sided; p ~ 1 but not exactly upstream
    7: ([3, 3, 3, 3, 0, 0, 0, 0], spread(4, 8), None, 0.089),  # 4/8 vs 4/8; 12, 4
}
TWO_FOURTEEN = {
    8: (spread(2, 2), spread(0, 14), 0.00833, 1.000),
    9: (spread(2, 2), spread(7, 14), 0.475, 0.547),
}


def vectors_batch():
    ids_a, r_a = build_group(8, 8, {t: (c, i) for t, (c, i, _, _) in EIGHT_EIGHT.items()})
    ids_b, r_b = build_group(2, 14, {t: (c, i) for t, (c, i, _, _) in TWO_FOURTEEN.items()})
    ids = torch.cat([ids_a, ids_b])
    return make_batch(
        rewards=torch.cat([r_a, r_b]), group=[0] * 16 + [1] * 16, mask=torch.ones(ids.shape), token_ids=ids
    )


def test_spec_test_vectors_with_upstream_numerics():
    keys = key_token_scores(vectors_batch(), numerics="upstream")
    for group, table in ((0, EIGHT_EIGHT), (1, TWO_FOURTEEN)):
        scores = keys.for_group(group)
        rows = {t: i for i, t in enumerate(keys.token_id.tolist()) if keys.group[i] == group}
        for token, (_, _, p_value, key) in table.items():
            assert scores[token] == pytest.approx(key, abs=1.5e-3), token
            if p_value is not None:
                assert keys.p_value[rows[token]].item() == pytest.approx(p_value, rel=5e-3), token


def test_exact_numerics_differ_where_upstream_float32_misses_p_equal_1():
    exact = key_token_scores(vectors_batch()).for_group(0)
    upstream = key_token_scores(vectors_batch(), numerics="upstream").for_group(0)
    assert exact[7] == 0.0 and upstream[7] == pytest.approx(0.089, abs=1.5e-3)  # 4/8 vs 4/8: p = 1 exactly
    assert exact[6] < upstream[6] - 0.3  # the rare token: F = 0 exactly, only IG remains
    for token in (3, 4, 5):  # no ties: both numerics agree
        assert exact[token] == pytest.approx(upstream[token], abs=1e-4)


def test_end_to_end_example_from_the_spec():
    responses = torch.tensor(
        [[10, 11, 12, 13, PAD, PAD], [10, 12, 12, PAD, PAD, PAD], [10, 11, 14, 14, 14, PAD], [10, 14, 13, PAD, PAD, PAD]]
    )
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]).float()
    expected = torch.tensor(
        [
            [0.8660, 0.8762, 1.8660, 0.8762, 0.8660, 0],
            [0.8660, 1.8660, 1.8660, 0.8660, 0, 0],
            [-0.8660, -0.8558, -1.8660, -1.8660, -1.8660, -0.8660],
            [-0.8660, -1.8660, -0.8558, -0.8660, 0, 0],
        ]
    )
    kw = dict(rewards=torch.tensor([1.0, 1, 0, 0]), group=[0] * 4, mask=mask, token_ids=responses)
    got = canonrl.advantages("ktae", numerics="upstream", ignore_token_ids=(PAD,), **kw)
    assert torch.allclose(got, expected, atol=1e-4)
    exact = canonrl.advantages("ktae", ignore_token_ids=(PAD,), **kw)
    assert exact[0, 1].item() == pytest.approx(0.8660, abs=1e-4)  # tokens 11, 13: p = 1 -> no key
    # PAD is in all four rollouts: a degenerate table, p = 1 in both numerics, so it has no key anyway
    assert canonrl.advantages("ktae", **kw)[0, 4].item() == exact[0, 0].item()
    ignored = canonrl.advantages("ktae", numerics="upstream", ignore_token_ids=(12,), **kw)
    assert ignored[1, 1].item() == pytest.approx(0.8660, abs=1e-4) and got[1, 1].item() == pytest.approx(1.8660, abs=1e-4)


def all_tables(max_group=16):
    for n in range(2, max_group + 1):
        for n_correct in range(1, n):
            for a, b in itertools.product(range(n_correct + 1), range(n - n_correct + 1)):
                yield a, b, n_correct - a, n - n_correct - b


def test_exact_fisher_matches_scipy_on_every_table_up_to_16():
    scipy_stats = pytest.importorskip("scipy.stats")
    tables = torch.tensor(list(all_tables()))
    ours = fisher_two_sided(*tables.unbind(1))
    reference = torch.tensor([scipy_stats.fisher_exact([[a, b], [c, d]]).pvalue for a, b, c, d in tables.tolist()])
    assert torch.allclose(ours, reference.double(), rtol=1e-9, atol=1e-12)
    assert torch.equal(ours == 1, reference == 1)


def test_upstream_fisher_reproduces_the_official_float32_quirk():
    width = torch.tensor([15])
    p = fisher_two_sided_upstream(torch.tensor([5]), torch.tensor([0]), torch.tensor([9]), torch.tensor([2]), width)
    assert p.item() == pytest.approx(0.5417, abs=1e-4)  # scipy: 1.0 (tied tables left out in float32)
    assert fisher_two_sided(torch.tensor([5]), torch.tensor([0]), torch.tensor([9]), torch.tensor([2])).item() == 1.0


def random_batch(seed, groups=6, group_size=8, tokens=20, vocabulary=50):
    generator = torch.Generator().manual_seed(seed)
    rows = groups * group_size
    lengths = torch.randint(1, tokens + 1, (rows,), generator=generator)
    mask = (torch.arange(tokens)[None] < lengths[:, None]).float()
    return dict(
        rewards=torch.randint(0, 2, (rows,), generator=generator).float(),
        group=torch.arange(groups).repeat_interleave(group_size),
        mask=mask,
        token_ids=torch.randint(0, vocabulary, (rows, tokens), generator=generator),
    )


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("numerics", ["exact", "upstream"])
def test_permuting_rollouts_permutes_the_output(seed, numerics):
    batch = random_batch(seed)
    permutation = torch.randperm(len(batch["rewards"]), generator=torch.Generator().manual_seed(seed + 100))
    permuted = {k: v[permutation] for k, v in batch.items()}
    got = canonrl.advantages("ktae", numerics=numerics, **batch)
    assert torch.allclose(canonrl.advantages("ktae", numerics=numerics, **permuted), got[permutation], atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_relabelling_token_ids_changes_nothing(seed):
    batch = random_batch(seed)
    relabel = torch.randperm(262_144, generator=torch.Generator().manual_seed(seed))  # a bijection onto big ids
    relabelled = dict(batch, token_ids=relabel[batch["token_ids"]])
    assert torch.allclose(
        canonrl.advantages("ktae", **relabelled), canonrl.advantages("ktae", **batch), atol=1e-6
    )


def test_groups_are_independent():
    batch = random_batch(0)
    changed = dict(batch, token_ids=batch["token_ids"].clone(), rewards=batch["rewards"].clone())
    changed["token_ids"][:8] = (changed["token_ids"][:8] + 7) % 50  # group 0 only
    changed["rewards"][:8] = 1 - changed["rewards"][:8]
    before, after = canonrl.advantages("ktae", **batch), canonrl.advantages("ktae", **changed)
    assert torch.equal(before[8:], after[8:])
    assert not torch.equal(before[:8], after[:8])


def test_edge_cases():
    batch = random_batch(1, groups=3)
    batch["rewards"][:8] = 1.0  # group 0 all correct
    batch["mask"][9] = 0  # a fully masked row in group 1
    singleton = dict(
        rewards=torch.tensor([1.0]), group=[0], mask=torch.ones(1, 4), token_ids=torch.tensor([[1, 2, 3, 4]])
    )
    got = canonrl.advantages("ktae", **batch)
    assert torch.equal(got[:8], torch.zeros(8, 20))  # all-correct: no key and zero base advantage
    assert torch.equal(got[9], torch.zeros(20))
    assert torch.equal(got[batch["mask"] == 0], torch.zeros(int((batch["mask"] == 0).sum())))
    assert torch.equal(canonrl.advantages("ktae", **singleton), torch.zeros(1, 4))
    keys = key_token_scores(make_batch(**batch))
    assert torch.all(keys.score[keys.group == 0] == 0)
    # a token present in every rollout of a mixed group gets exactly 0
    everywhere = dict(batch, token_ids=batch["token_ids"].clone(), mask=torch.ones(24, 20))
    everywhere["token_ids"][8:16, 0] = 49_999
    assert key_token_scores(make_batch(**everywhere)).for_group(1)[49_999] == 0.0


def test_min_count_zeroes_rare_tokens_and_ignore_ids():
    batch = make_batch(**random_batch(2))
    keys = key_token_scores(batch, min_count=3)
    rare = (keys.a + keys.b) < 3
    assert torch.all(keys.score[rare] == 0) and torch.any(key_token_scores(batch).score[rare] != 0)
    ignored = key_token_scores(batch, ignore_token_ids=(0, 1))
    assert torch.all(ignored.score[ignored.token_id <= 1] == 0)


def test_composes_with_any_sequence_estimator():
    batch = random_batch(3)
    entropy = torch.rand(batch["mask"].shape, generator=torch.Generator().manual_seed(0))
    keys = key_token_scores(make_batch(**batch)).positions
    canon = canonrl.advantages("canon", entropy=entropy, mu=1.0, **batch)
    ktae_canon = canonrl.advantages("ktae", base="canon", base_params={"mu": 1.0}, entropy=entropy, **batch)
    assert torch.allclose(ktae_canon, canon + keys, atol=1e-6)
    with pytest.raises(ValueError, match="needs 'entropy'"):
        canonrl.advantages("ktae", base="canon", **batch)
    with pytest.raises(ValueError, match="base must be a sequence-level estimator"):
        canonrl.get_estimator("ktae", base="reinforce_pp")
    with pytest.raises(ValueError, match="needs 'token_ids'"):
        canonrl.advantages("ktae", **{k: v for k, v in batch.items() if k != "token_ids"})


def test_paper_form_is_bounded_by_half():
    keys = key_token_scores(make_batch(**random_batch(0)), form="paper")
    assert keys.score.abs().max() <= 0.5 and keys.score.abs().max() > 0.1


def test_matches_a_per_group_loop_of_the_spec():
    from canonrl.reference.ktae_loop import ktae_loop

    batch = random_batch(5, groups=4, group_size=16, tokens=40, vocabulary=30)
    for numerics in ("exact", "upstream"):
        expected = ktae_loop(**batch, numerics=numerics)
        assert torch.allclose(canonrl.advantages("ktae", numerics=numerics, **batch), expected, atol=1e-5)
