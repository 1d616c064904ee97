"""HAPO, IAPO and OAR (token-level credit, issue 15): hand-computed values, the spec's test vectors, edge cases.

Expected numbers are worked out by hand in the comments (or with plain Python arithmetic in a reference loop).

HAPO batch (one group, rewards [1, 0], both rows of 2 tokens, entropy = exp(log H) with log H = [[0, 1], [2, -1]]):
  token-level group average: mean 0.5, population std 0.5 -> A = [+1, -1] (eps 1e-6 negligible);
  log-entropies sorted [-1, 0, 1, 2], pivot 0.8 -> index round(0.8 * 3) = 2 -> quantile 1;
  h = [[-1, 0], [1, -2]], RMS sqrt(6 / 4) -> h / RMS = [[-0.8165, 0], [0.8165, -1.633]];
  h^ = h / max(h > 0) for h > 0 and h / |min(h < 0)| otherwise = [[-0.5, 0], [1, -1]];
  at ratio 1: high-entropy tokens (h^ > 0) keep A, the others get A (1 + beta h^):
  beta = 1 -> [[0.5, 1], [-1, 0]];  beta = 0.5 -> [[0.75, 1], [-1, -0.5]];
  h_hat="upstream" (negative h divided by min(h < 0) < 0, so h^ >= 0): every token keeps A -> [[1, 1], [-1, -1]].
"""

import math

import pytest
import torch

import canonrl
from canonrl.methods.iapo import IAPO
from canonrl.methods.oar import reshaping_weights


def close(actual, expected, tol=1e-4):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert torch.allclose(actual.double(), expected, atol=tol, rtol=tol), (actual.tolist(), expected.tolist())


def right_mask(lengths, tokens):
    return (torch.arange(tokens)[None, :] < torch.tensor(lengths)[:, None]).float()


# ---------------------------------------------------------------------------------------------------------------
# HAPO
# ---------------------------------------------------------------------------------------------------------------

HAPO_ENTROPY = torch.tensor([[0.0, 1.0], [2.0, -1.0]]).exp()


@pytest.mark.parametrize(
    "params, expected",
    [
        ({}, [[0.5, 1.0], [-1.0, 0.0]]),
        ({"beta": 0.5}, [[0.75, 1.0], [-1.0, -0.5]]),
        ({"h_hat": "upstream"}, [[1.0, 1.0], [-1.0, -1.0]]),
        ({"redistribute": False}, [[1.0, 1.0], [-1.0, -1.0]]),
    ],
)
def test_hapo_redistribution_by_hand(params, expected):
    out = canonrl.advantages(
        "hapo", rewards=torch.tensor([1.0, 0.0]), group=[0, 0], mask=torch.ones(2, 2), entropy=HAPO_ENTROPY, **params
    )
    close(out, expected)


def test_hapo_token_level_average_weights_by_length():
    # Rewards [1, 0] with lengths [3, 1]: the 4 tokens hold [1, 1, 1, 0]: mean 0.75, population std sqrt(3) / 4,
    # so A = 0.25 / 0.433 = 1 / sqrt(3) and -0.75 / 0.433 = -sqrt(3) (GRPO would give +-0.7071).
    mask = right_mask([3, 1], 3)
    out = canonrl.advantages("hapo", rewards=torch.tensor([1.0, 0.0]), group=[4, 4], mask=mask, redistribute=False)
    close(out, torch.tensor([[1 / math.sqrt(3)] * 3, [-math.sqrt(3), 0, 0]]))
    out = canonrl.advantages("hapo", rewards=[1.0, 0.0], group=[4, 4], mask=mask, redistribute=False, scale=False)
    close(out, torch.tensor([[0.25] * 3, [-0.75, 0, 0]]))


@pytest.mark.parametrize("wrong_length, fallback", [(24, False), (29, True)])
def test_hapo_falls_back_to_grpo_when_some_token_advantage_reaches_5(wrong_length, fallback):
    # One correct token against n wrong ones: p = 1/(n+1), A_correct = (1 - p) / sqrt(p (1 - p)) = sqrt(n):
    # n = 24 -> 4.899 < 5 (kept); n = 29 -> 5.385 >= 5 -> the group takes GRPO's +-1/sqrt(2).
    # A second group (rewards [1, 0], equal lengths) is unaffected: +-1.
    mask = right_mask([1, wrong_length, 2, 2], 30)
    out = canonrl.advantages(
        "hapo", rewards=torch.tensor([1.0, 0.0, 1.0, 0.0]), group=[0, 0, 9, 9], mask=mask, redistribute=False
    )
    n = wrong_length
    expected = [1 / math.sqrt(2), -1 / math.sqrt(2)] if fallback else [math.sqrt(n), -1 / math.sqrt(n)]
    close(out[:2, 0], expected)
    close(out[2:, 0], [1.0, -1.0])
    assert (out[mask == 0] == 0).all()


def test_hapo_constant_groups_singletons_and_fully_masked_rows_are_exactly_zero():
    # Groups: 5 -> rows 0, 2 (rewards 0.1 and 0.1: constant), 8 -> rows 1, 4 (1, 0), 3 -> row 3 (a singleton);
    # row 5 is fully masked (group 8).
    rewards = torch.tensor([0.1, 1.0, 0.1, 0.7, 0.0, 1.0])
    group = [5, 8, 5, 3, 8, 8]
    mask = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1], [1, 1, 0], [0, 0, 0]]).float()
    entropy = torch.rand(6, 3, generator=torch.Generator().manual_seed(0)) + 0.1
    entropy[mask == 0] = float("nan")  # NaN outside the mask is ignored
    out = canonrl.advantages("hapo", rewards=rewards, group=group, mask=mask, entropy=entropy)
    assert (out[[0, 2, 3, 5]] == 0).all()
    assert (out[mask == 0] == 0).all()
    # A (1 + beta h): h in [-1, 1], so the sign of A holds (the batch's least-entropy token may reach 0)
    positive, negative = out[1][mask[1] != 0], out[4][mask[4] != 0]
    assert (positive >= 0).all() and (positive > 0).any() and (negative <= 0).all() and (negative < 0).any()


def test_hapo_nan_entropy_inside_the_mask_names_the_rows():
    entropy = torch.ones(3, 2)
    entropy[2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"entropy is NaN or Inf inside the mask at rows \[2\]"):
        canonrl.advantages("hapo", rewards=[1.0, 0.0, 1.0], group=[0, 0, 0], mask=torch.ones(3, 2), entropy=entropy)


def test_hapo_declarations():
    assert canonrl.get_estimator("hapo").required_inputs() == ("entropy",)
    assert canonrl.get_estimator("hapo", redistribute=False).required_inputs() == ()
    assert canonrl.get_estimator("hapo", h_hat="upstream").required_inputs() == ()
    assert not canonrl.get_estimator("hapo").group_local
    assert canonrl.get_estimator("hapo", redistribute=False).group_local
    with pytest.raises(ValueError, match="h_hat"):
        canonrl.get_estimator("hapo", h_hat="paper")


# ---------------------------------------------------------------------------------------------------------------
# IAPO
# ---------------------------------------------------------------------------------------------------------------


def test_iapo_spec_test_vector_with_the_upstream_normalisation():
    # Spec (token-level.md, IAPO): next_token mode, w_s = w_c = 1, one group of 2, no masking.
    entropy = torch.tensor([[1.0, 0.5, 2.0, 0.2], [0.8, 0.8, 0.1, 0.1]])
    kwargs = dict(rewards=torch.tensor([1.5, -1.5]), group=[0, 0], mask=torch.ones(2, 4), entropy=entropy)
    out = canonrl.advantages("iapo", normalisation="upstream", **kwargs)
    close(out, [[0.7196, 0.4115, 0.5793, 1.8439], [-1.7991, -0.5929, -1.4433, -1.7174]])
    # The surprise S_t = (E_t + E_{t-1}) / 2 - E_{t+1} of the spec: [[0, -1.25, 1.05, 1.1], [-0.4, 0.7, 0.35, 0.1]]
    out = canonrl.advantages("iapo", w_c=0.0, horizon=2, decay=0.0, **kwargs)  # raw S, unit-normalised
    surprise = torch.tensor([[0.0, -1.25, 1.05, 1.1], [-0.4, 0.7, 0.35, 0.1]])
    close(out, torch.tensor([[0.7071], [-0.7071]]) + surprise / surprise.norm(dim=-1, keepdim=True))


def reference_iapo(rewards, group, mask, answer, entropy, w_s=1.0, w_c=1.0):
    """Plain-Python IAPO (z-score normalisation, masked statistics, horizon 1) for rows of lists."""

    def mean(xs):
        return sum(xs) / len(xs)

    def std(xs):
        return math.sqrt(sum((x - mean(xs)) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0

    def unit_z(xs):
        z = [(x - mean(xs)) / (std(xs) + 1e-8) for x in xs]
        norm = math.sqrt(sum(v * v for v in z))
        return [v / (norm + 1e-8) for v in z]

    out = [[0.0] * len(mask[0]) for _ in mask]
    for i, row in enumerate(mask):
        positions = [t for t, m in enumerate(row) if m]
        if not positions:
            continue
        peers = [rewards[j] for j in range(len(rewards)) if group[j] == group[i] and any(mask[j])]
        base = (rewards[i] - mean(peers)) / (std(peers) + 1e-4) if len(peers) > 1 and std(peers) > 0 else 0.0
        e = [answer[i][t] for t in positions]
        padded = [0.0, *e, 0.0]
        surprise = [(padded[k + 1] + padded[k]) / 2 - padded[k + 2] for k in range(len(e))]
        s, c = unit_z(surprise), unit_z([entropy[i][t] for t in positions])
        sign = (rewards[i] > 0) - (rewards[i] < 0)
        for k, t in enumerate(positions):
            out[i][t] = base + w_s * s[k] - sign * w_c * c[k]
    return out


def test_iapo_last_token_mode_against_a_plain_python_reference():
    # Unequal, non-contiguous groups (7: rows 0, 2, 3; 2: rows 1, 4; 11: row 5, a singleton), holes in the mask,
    # a fully masked row (6), rewards with a 0 (no confidence term), answer entropy in token_scores.
    generator = torch.Generator().manual_seed(3)
    rewards = [1.0, -1.0, 0.0, 1.0, 1.0, -0.5, 1.0]
    group = [7, 2, 7, 7, 2, 11, 2]
    mask = torch.tensor(
        [[1, 1, 1, 1, 0], [1, 0, 1, 0, 1], [0, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0], [0] * 5]
    ).float()
    answer = torch.rand(7, 5, generator=generator) * 3
    entropy = torch.rand(7, 5, generator=generator) * 2
    answer[mask == 0] = float("nan")  # NaN outside the mask is ignored
    entropy[mask == 0] = float("inf")
    out = canonrl.advantages(
        "iapo", rewards=torch.tensor(rewards), group=group, mask=mask, entropy=entropy, token_scores=answer,
        mode="last_token", w_s=0.7, w_c=0.3,
    )  # fmt: skip
    expected = reference_iapo(rewards, group, mask.tolist(), answer.tolist(), entropy.tolist(), w_s=0.7, w_c=0.3)
    close(out, expected)
    assert (out[mask == 0] == 0).all() and (out[6] == 0).all()


def test_iapo_constant_groups_keep_only_the_token_terms():
    # A^ = 0 on a constant group (and a singleton), but the bonus stays, as upstream.
    entropy = torch.tensor([[1.0, 0.5, 2.0], [0.3, 0.9, 0.1], [0.4, 0.2, 0.8]])
    mask = torch.ones(3, 3)
    batch = canonrl.make_batch(rewards=torch.tensor([1.0, 1.0, -1.0]), group=[0, 0, 1], mask=mask, entropy=entropy)
    estimator = IAPO()
    out = estimator(batch)
    close(out, estimator.token_terms(batch))
    assert (out.abs() > 0).any()


def test_iapo_nan_token_scores_inside_the_mask_names_the_rows():
    scores = torch.ones(3, 2)
    scores[1, 1] = float("nan")
    kwargs = dict(rewards=[1.0, 0.0, 1.0], group=[0, 0, 0], mask=torch.ones(3, 2), entropy=torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"token_scores is NaN or Inf inside the mask at rows \[1\]"):
        canonrl.advantages("iapo", token_scores=scores, mode="last_token", **kwargs)
    with pytest.raises(ValueError, match="needs 'token_scores'"):
        canonrl.advantages("iapo", mode="last_token", **kwargs)
    canonrl.advantages("iapo", token_scores=scores, **kwargs)  # next_token mode does not read it


# ---------------------------------------------------------------------------------------------------------------
# OAR
# ---------------------------------------------------------------------------------------------------------------


def test_oar_spec_test_vector():
    # I = [0, 0.5, 2, 0.1, 1]: s = log(1 + I), n = [0, .3691, 1, .0868, .6309], tau = median = .3691;
    # w = [max(0, .1), 1, 1 + .6309/.6309, max(.0868/.3691, .1), 1 + .2618/.6309] = [.1, 1, 2, .2352, 1.4150]
    # (sum 4.750), times 5 / 4.750 with sum_to_length.
    importance = torch.tensor([[0.0, 0.5, 2.0, 0.1, 1.0]])
    inside = torch.ones(1, 5, dtype=torch.bool)
    close(
        reshaping_weights(importance, inside, q=0.5, beta=1.0, floor=0.1, sum_to_length=True),
        [[0.1053, 1.0526, 2.1052, 0.2474, 1.4895]],
    )
    close(
        reshaping_weights(importance, inside, q=0.5, beta=1.0, floor=0.1, sum_to_length=False),
        [[0.1, 1.0, 2.0, 0.23516, 1.41497]],
    )


def test_oar_reshapes_the_base_advantage_by_hand():
    # Group 3 (rows 0, 2): rewards [1, 0] -> GRPO +-1/sqrt(2). Row 0 holds the spec's importance on a mask with a
    # hole (positions 0, 1, 3, 4, 5); row 2 has constant importance -> weight 1. Group 8 (rows 1, 3) is constant
    # -> 0; row 4 (group 3) is fully masked -> 0 and left out of GRPO.
    importance = torch.tensor(
        [
            [0.0, 0.5, 9.9, 2.0, 0.1, 1.0],
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            [0.7, 0.7, 0.7, 0.7, 0.0, 0.0],
            [0.0, 5.0, 0.0, 1.0, 0.0, 0.0],
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        ]
    )
    mask = torch.tensor([[1, 1, 0, 1, 1, 1], [1] * 6, [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [0] * 6]).float()
    importance[2, 4:] = float("nan")  # NaN outside the mask is ignored
    out = canonrl.advantages(
        "oar", rewards=torch.tensor([1.0, 0.5, 0.0, 0.5, 1.0]), group=[3, 8, 3, 8, 3], mask=mask,
        token_scores=importance,
    )  # fmt: skip
    z = 1 / math.sqrt(2)
    close(out[0], [z * w for w in (0.1053, 1.0526, 0.0, 2.1052, 0.2474, 1.4895)])
    close(out[2], [-z] * 4 + [0.0, 0.0])
    assert (out[[1, 3, 4]] == 0).all()
    # With another base: Dr.GRPO gives +-0.5.
    out = canonrl.advantages(
        "oar", rewards=torch.tensor([1.0, 0.5, 0.0, 0.5, 1.0]), group=[3, 8, 3, 8, 3], mask=mask,
        token_scores=importance, base="dr_grpo",
    )  # fmt: skip
    close(out[2], [-0.5] * 4 + [0.0, 0.0])


def test_oar_single_token_rows_and_negative_importance():
    # R = 1: n = 0, tau = 0 -> w = 1. A negative importance is clamped at 0 by default, or raises.
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]]).float()
    importance = torch.tensor([[5.0, 0.0, 0.0], [-2.0, 0.0, 0.0]])
    kwargs = dict(rewards=torch.tensor([1.0, 0.0]), group=[0, 0], mask=mask, token_scores=importance)
    out = canonrl.advantages("oar", **kwargs)
    close(out, [[1 / math.sqrt(2), 0, 0], [-1 / math.sqrt(2)] * 3])  # row 1: constant 0 after the clamp
    with pytest.raises(ValueError, match=r"negative at rows \[1\]"):
        canonrl.advantages("oar", negative="error", **kwargs)


def test_oar_nan_token_scores_inside_the_mask_names_the_rows():
    scores = torch.ones(4, 3)
    scores[0, 2] = float("nan")
    scores[3, 0] = float("inf")
    with pytest.raises(ValueError, match=r"token_scores is NaN or Inf inside the mask at rows \[0, 3\]"):
        canonrl.advantages("oar", rewards=[1.0, 0.0, 1.0, 0.0], group=[0, 0, 1, 1], mask=torch.ones(4, 3),
                           token_scores=scores)  # fmt: skip
    with pytest.raises(ValueError, match="needs 'token_scores'"):
        canonrl.advantages("oar", rewards=[1.0, 0.0], group=[0, 0], mask=torch.ones(2, 3))


def test_oar_declarations():
    oar = canonrl.get_estimator("oar", base="canon", base_params={"mu": 1.0})
    assert set(oar.required_inputs()) == {"token_scores", "entropy"}
    assert oar.group_local
    assert not canonrl.get_estimator("oar", base_params={"scale": "batch"}).group_local
    with pytest.raises(ValueError, match="sequence-level"):
        canonrl.get_estimator("oar", base="ktae")
