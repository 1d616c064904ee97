"""SPO-chain (segment MC-value differences + probability mask) and T-SPMO (prefix-matching token advantages) on
hand-computed batches.

SPO-chain batch (row per response; ``|`` separates segments, ``.`` a token in no segment, ``*`` a token sampled with
probability 0.95, the others 0.5)::

    row  segments (turn ids)     values (V at segment ends)   prompt value
    0    0 0* | 1 1 1* | .       0.5 1.0                      0.25
    1    0 0 0 | 1 . .           0.25 0.0                     NaN (absent)
    2    0 0 | 1 1 | 2 2         0.5 0.5 0.5                  0.5   (all equal)

Row 0: A = 0.5 - 0.25, 1.0 - 0.5; row 1: the first segment has no base (0), then 0 - 0.25; row 2: exactly 0.

T-SPMO group (token ids of the mask tokens; rewards)::

    row  tokens   reward
    0    5 1 2    1
    1    5 1 3    0
    2    5 4      0
    3    5 1 2    0
    4    7 7 7    1   (a group of its own)

Group mean 1/4; after "5": all rows (A = 0); after "5 1": rows 0, 1, 3 (1/3 - 1/4), after "5 4": row 2 (0 - 1/4);
after "5 1 2": rows 0, 3 (1/2 - 1/3), after "5 1 3": row 1 (0 - 1/3); row 4 alone: 0.
"""

from __future__ import annotations

import math

import pytest
import torch

import canonrl

ATOL = 1e-6
TURNS = torch.tensor([
    [0, 0, 1, 1, 1, -1],
    [0, 0, 0, 1, -1, -1],
    [0, 0, 1, 1, 2, 2],
])  # fmt: skip
HIGH = torch.tensor([
    [0, 1, 0, 0, 1, 0],
    [0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0],
], dtype=torch.bool)  # fmt: skip
VALUES = [[0.5, 1.0], [0.25, 0.0], [0.5, 0.5, 0.5]]
SPO = dict(rewards=torch.tensor([1.0, 0.0, 0.5]), group=[0, 0, 1], mask=(TURNS >= 0).float(), turn_ids=TURNS,
           step_values=VALUES, prompt_values=torch.tensor([0.25, math.nan, 0.5]),
           logprobs=torch.where(HIGH, math.log(0.95), math.log(0.5)))


def test_spo_chain_by_hand():
    out = canonrl.advantages("spo_chain", **SPO)
    expected = torch.tensor([
        [0.25, 0.0, 0.5, 0.5, 0.0, 0.0],
        [0.0, 0.0, 0.0, -0.25, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    ])  # fmt: skip
    assert torch.allclose(out, expected, atol=ATOL)
    assert (out[2] == 0).all()  # all-equal values: exactly 0
    unmasked = canonrl.advantages("spo_chain", prob_mask=False, **SPO)
    assert unmasked[0].tolist() == pytest.approx([0.25, 0.25, 0.5, 0.5, 0.5, 0.0], abs=ATOL)
    from_zero = canonrl.advantages("spo_chain", prob_mask=False, first_segment="from_zero", **SPO)
    assert from_zero[1].tolist() == pytest.approx([0.25, 0.25, 0.25, -0.25, 0.0, 0.0], abs=ATOL)


def test_spo_chain_threshold_is_strict_and_off_mask_logprobs_are_ignored():
    logprobs = SPO["logprobs"].clone()
    logprobs[0, 5] = math.nan  # off the mask
    logprobs[0, 1] = 0.0  # p = 1 exactly
    out = canonrl.advantages("spo_chain", **{**SPO, "logprobs": logprobs}, prob_threshold=1.0)
    assert out[0, 1].item() == pytest.approx(0.25)  # p = 1 is not strictly above 1
    assert out[0, 4].item() == pytest.approx(0.5)  # p = 0.95 is below 1
    assert torch.isfinite(out).all()
    assert canonrl.advantages("spo_chain", **{**SPO, "logprobs": logprobs})[0, 1].item() == 0.0  # above 0.9
    with pytest.raises(ValueError, match="logprobs"):
        canonrl.advantages("spo_chain", **{k: v for k, v in SPO.items() if k != "logprobs"})


def test_spo_chain_segment_without_mask_token_still_serves_as_base():
    mask = SPO["mask"].clone()
    mask[0, 2:5] = 0  # segment 1 of row 0 has no mask token
    mask[1, 0:3] = 0  # segment 0 of row 1 likewise
    out = canonrl.advantages("spo_chain", prob_mask=False, **{**SPO, "mask": mask})
    assert (out[0, 2:5] == 0).all() and out[0, 0].item() == pytest.approx(0.25)
    assert out[1, 3].item() == pytest.approx(-0.25)  # 0.0 - 0.25 (the masked segment's value)


def test_spo_chain_row_per_segment_gives_the_same_numbers():
    """One row per segment (shuffled), a duplicated row and a padding row (step_index -1)."""
    segments = [(r, s) for r, values in enumerate(VALUES) for s in range(len(values))]
    order = [4, 0, 6, 2, 1, 5, 3]
    rows = [segments[i] for i in order] + [segments[order[0]]]
    mask, logprobs = torch.zeros(len(rows) + 1, 3), torch.full((len(rows) + 1, 3), math.log(0.5))
    for i, (r, s) in enumerate(rows):
        columns = (TURNS[r] == s).nonzero().flatten()
        mask[i, : len(columns)] = SPO["mask"][r, columns]
        logprobs[i, : len(columns)] = SPO["logprobs"][r, columns]
    mask[-1] = 1
    batch = dict(
        rewards=torch.tensor([SPO["rewards"][r].item() for r, _ in rows] + [9.0]),
        group=[SPO["group"][r] for r, _ in rows] + [0],
        traj=[r for r, _ in rows] + [0], step_index=torch.tensor([s for _, s in rows] + [-1]),
        mask=mask, logprobs=logprobs, step_values=torch.tensor([VALUES[r][s] for r, s in rows] + [5.0]),
        prompt_values=torch.tensor([SPO["prompt_values"][r].item() for r, _ in rows] + [7.0]),
    )
    expected = canonrl.advantages("spo_chain", **SPO)
    out = canonrl.advantages("spo_chain", **batch)
    for i, (r, s) in enumerate(rows):
        columns = (TURNS[r] == s).nonzero().flatten()
        assert torch.allclose(out[i, : len(columns)], expected[r, columns], atol=ATOL), (r, s)
    assert (out[-1] == 0).all()


def test_spo_chain_rejects_infinite_prompt_values():
    with pytest.raises(ValueError, match="prompt_values"):
        canonrl.advantages("spo_chain", **{**SPO, "prompt_values": torch.tensor([math.inf, 0.0, 0.0])})


# ----------------------------------------------------------------------------------------------------------- T-SPMO
IDS = torch.tensor([[5, 1, 2, 0], [5, 1, 3, 0], [5, 4, 0, 0], [5, 1, 2, 0], [7, 7, 7, 0]])
TMASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0]]).float()
TSPMO = dict(rewards=torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0]), group=[0, 0, 0, 0, 1], mask=TMASK, token_ids=IDS)
T_EXPECTED = torch.tensor([
    [0, 1 / 12, 1 / 6, 0],
    [0, 1 / 12, -1 / 3, 0],
    [0, -1 / 4, 0, 0],
    [0, 1 / 12, 1 / 6, 0],
    [0, 0, 0, 0],
])  # fmt: skip


def test_t_spmo_by_hand():
    out = canonrl.advantages("t_spmo", **TSPMO)
    assert torch.allclose(out, T_EXPECTED.float(), atol=ATOL)
    # scale="std": divided by the group's unbiased reward std (0.5 for 1, 0, 0, 0)
    scaled = canonrl.advantages("t_spmo", scale="std", eps=0.0, **TSPMO)
    assert torch.allclose(scaled, 2 * T_EXPECTED.float(), atol=ATOL)


def test_t_spmo_skips_holes_and_padding_rows_and_is_row_order_free():
    """The same responses with a mask-0 hole inside (its token differs), shuffled, plus an all-masked row."""
    ids = torch.cat([IDS[:, :1], torch.full((5, 1), 99), IDS[:, 1:]], 1)
    mask = torch.cat([TMASK[:, :1], torch.zeros(5, 1), TMASK[:, 1:]], 1)
    ids[2, 1] = 42
    order = [3, 1, 4, 0, 2]
    batch = dict(rewards=torch.cat([TSPMO["rewards"][order], torch.tensor([5.0])]),
                 group=[TSPMO["group"][i] for i in order] + [0],
                 mask=torch.cat([mask[order], torch.zeros(1, 5)]), token_ids=torch.cat([ids[order], ids[:1]]))
    out = canonrl.advantages("t_spmo", **batch)
    expected = torch.cat([T_EXPECTED[:, :1], torch.zeros(5, 1), T_EXPECTED[:, 1:]], 1)[order].float()
    assert torch.allclose(out[:-1], expected, atol=ATOL)
    assert (out[-1] == 0).all()


def test_t_spmo_exact_zeros_for_equal_rewards_identical_responses_and_strict_prefixes():
    rewards = torch.full((5,), 0.1)
    assert (canonrl.advantages("t_spmo", **{**TSPMO, "rewards": rewards}) == 0).all()
    same = dict(rewards=torch.tensor([0.3, 0.7, 0.1]), group=[0, 0, 0], mask=torch.ones(3, 3),
                token_ids=torch.tensor([[1, 2, 3]] * 3))
    assert (canonrl.advantages("t_spmo", **same) == 0).all()
    # "1 2" is a strict prefix of "1 2 3": it counts in S(1 2) but not after its end
    prefix = dict(rewards=torch.tensor([1.0, 0.0]), group=[0, 0], mask=torch.tensor([[1.0, 1, 1], [1, 1, 0]]),
                  token_ids=torch.tensor([[1, 2, 3], [1, 2, 3]]))
    out = canonrl.advantages("t_spmo", **prefix)
    assert out.flatten().tolist() == pytest.approx([0.0, 0.0, 0.5, 0.0, 0.0, 0.0], abs=ATOL)


def brute_force_t_spmo(rewards, group, mask, ids):
    """The formula written out with Python lists: S(P) and S(P v) over the group's responses (mask tokens)."""
    B, T = mask.shape
    responses = [[ids[j, c].item() for c in range(T) if mask[j, c] > 0] for j in range(B)]
    out = torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        members = [j for j in range(B) if group[j] == group[i] and responses[j]]
        columns = [c for c in range(T) if mask[i, c] > 0]
        for t, c in enumerate(columns):
            before = [j for j in members if responses[j][:t] == responses[i][:t] and len(responses[j]) >= t]
            after = [j for j in before if responses[j][: t + 1] == responses[i][: t + 1]]
            out[i, c] = sum(rewards[j].item() for j in after) / len(after) - sum(
                rewards[j].item() for j in before
            ) / len(before)
    return out


def test_t_spmo_matches_the_brute_force_formula_and_row_order():
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        B, T = (int(x) for x in torch.randint(1, 8, (2,), generator=generator))
        ids = torch.randint(0, 3, (B, T), generator=generator)
        mask = (torch.rand(B, T, generator=generator) < 0.8).float()
        rewards = torch.randint(0, 3, (B,), generator=generator).float() / 2
        group = torch.randint(0, 3, (B,), generator=generator)
        out = canonrl.advantages("t_spmo", rewards=rewards, group=group, mask=mask, token_ids=ids)
        assert torch.allclose(out.double(), brute_force_t_spmo(rewards, group, mask, ids), atol=ATOL)
        order = torch.randperm(B, generator=generator)
        shuffled = canonrl.advantages("t_spmo", rewards=rewards[order], group=group[order] + 7, mask=mask[order],
                                      token_ids=ids[order])  # fmt: skip
        assert torch.allclose(shuffled, out[order], atol=ATOL)
