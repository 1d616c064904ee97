"""SAE (segmental GAE), FSPO (factuality sign flip) and SPAE (step potential differences) on hand-computed batches,
with the edge cases of steps.md: steps without mask tokens, constant groups, unequal and non-contiguous groups and
trajectories, padding rows, duplicated step rows, and the same numbers from both layouts.

The step batch used by FSPO and SPAE (row-per-trajectory; ``|`` separates the steps, ``.`` is a mask-0 hole)::

    row  group  reward  tokens (turn ids)          labels      potentials
    0    "p"    1       0 0 . 1 1 . 2 2            +1 -1  0    0.2 0.95 0.95
    1    "q"    0       0 0 . 1 1 . . .            +1 -1       0.1 -0.3
    2    "p"    0       0 0 . 1 1 . 2 2            -1  0 +1    0.4 0.4  0.6
    3    "q"    0       0 0 . . . . . .            -1          0.0

Group "p" = rows 0, 2 (non-contiguous), group "q" = rows 1, 3 (all rewards equal). With base ``rloo`` the base
advantage is +1 (row 0), -1 (row 2), 0 (rows 1, 3).
"""

from __future__ import annotations

import pytest
import torch

import canonrl
from conftest import row_values

ATOL = 1e-5
TURNS = torch.tensor([
    [0, 0, -1, 1, 1, -1, 2, 2],
    [0, 0, -1, 1, 1, -1, -1, -1],
    [0, 0, -1, 1, 1, -1, 2, 2],
    [0, 0, -1, -1, -1, -1, -1, -1],
])  # fmt: skip
LABELS = [[1, -1, 0], [1, -1], [-1, 0, 1], [-1]]
POTENTIALS = [[0.2, 0.95, 0.95], [0.1, -0.3], [0.4, 0.4, 0.6], [0.0]]
DIALOGUES = dict(rewards=torch.tensor([1.0, 0.0, 0.0, 0.0]), group=["p", "q", "p", "q"], mask=(TURNS >= 0).float(),
                 turn_ids=TURNS, step_labels=LABELS, step_values=POTENTIALS)


def step_values(out: torch.Tensor, turns: torch.Tensor = TURNS) -> list[list[float]]:
    """Each step's value (its first token's) per row."""
    return [[out[r, (turns[r] == s).nonzero()[0, 0]].item() for s in range(int(turns[r].max()) + 1)]
            for r in range(out.shape[0])]


def row_per_step(dialogues: dict, order: list[int] | None = None, pad: bool = True) -> dict:
    """The same steps as one row each (traj = the dialogue's row, unordered rows), a duplicated row and a padding
    row whose values would change every statistic if it counted."""
    rows = [(r, s) for r, labels in enumerate(dialogues["step_labels"]) for s in range(len(labels))]
    rows = [rows[i] for i in (order or range(len(rows)))]
    rows.append(rows[0])  # a duplicated step row
    rewards = [dialogues["rewards"][r].item() for r, _ in rows]
    group = [dialogues["group"][r] for r, _ in rows]
    traj = [r for r, _ in rows]
    index = [s for _, s in rows]
    labels = [dialogues["step_labels"][r][s] for r, s in rows]
    values = [dialogues["step_values"][r][s] for r, s in rows]
    if pad:
        rewards, group, traj, index, labels, values = (rewards + [9.0], group + ["p"], traj + [0], index + [-1],
                                                       labels + [1], values + [5.0])
    return dict(rewards=torch.tensor(rewards), group=group, traj=traj, step_index=torch.tensor(index),
                mask=torch.ones(len(rewards), 2), step_labels=torch.tensor(labels), step_values=torch.tensor(values))


def flat(per_row: list[list[float]]) -> list[float]:
    return [x for row in per_row for x in row]


# ------------------------------------------------------------------------------------------------------------- FSPO
def test_fspo_by_hand():
    out = canonrl.advantages("fspo", base="rloo", **DIALOGUES)
    # row 0: A = +1 -> labels +1, -1, 0 give +1, -1, +1; row 2: A = -1 -> labels -1, 0, +1 give -1, -1, +1
    # group "q" is constant: A = 0 exactly, whatever the labels
    assert step_values(out) == [[1.0, -1.0, 1.0], [0.0, 0.0], [-1.0, -1.0, 1.0], [0.0]]
    assert (out[DIALOGUES["mask"] == 0] == 0).all()
    # the default base: GRPO over the group's trajectories (unbiased std of [1, 0]: A = +-0.7071)
    grpo = canonrl.advantages("fspo", **DIALOGUES)
    a = 0.5 / 0.5**0.5
    assert flat(step_values(grpo)) == pytest.approx(flat([[a, -a, a], [0, 0], [-a, -a, a], [0]]), abs=ATOL)


def test_fspo_labels_zero_keep_the_base_advantage():
    zero = [[0] * len(row) for row in LABELS]
    out = canonrl.advantages("fspo", **{**DIALOGUES, "step_labels": zero})
    grpo = canonrl.advantages("grpo", **{k: DIALOGUES[k] for k in ("rewards", "group", "mask")})
    assert torch.allclose(out, grpo * (TURNS >= 0), atol=ATOL)


def test_fspo_both_layouts_give_the_same_numbers_and_padding_and_duplicates_do_not_count():
    by_trajectory = flat(step_values(canonrl.advantages("fspo", **DIALOGUES)))
    order = [6, 2, 8, 0, 5, 1, 7, 3, 4]
    fields = row_per_step(DIALOGUES, order)
    out = row_values(canonrl.advantages("fspo", **fields))
    rows = [(r, s) for r, labels in enumerate(LABELS) for s in range(len(labels))]
    expected = [by_trajectory[rows.index(rows[i])] for i in order]
    assert out[:-2].tolist() == pytest.approx(expected, abs=ATOL)
    assert out[-2].item() == pytest.approx(expected[0], abs=ATOL)  # the duplicate gets its step's advantage
    assert out[-1].item() == 0.0  # the padding row


def test_fspo_step_without_mask_tokens_gets_zero():
    mask = DIALOGUES["mask"].clone()
    mask[0, 3:5] = 0  # row 0's second step keeps its turn ids but loses its mask tokens
    out = canonrl.advantages("fspo", base="rloo", **{**DIALOGUES, "mask": mask})
    assert step_values(out)[0] == [1.0, 0.0, 1.0]


def test_fspo_rejects_bad_labels_and_bases_needing_other_inputs():
    with pytest.raises(ValueError, match="step_labels must be -1, 0 or \\+1.*rows \\[2\\]"):
        canonrl.advantages("fspo", **{**DIALOGUES, "step_labels": [[1, -1, 0], [1, -1], [-1, 0.5, 1], [-1]]})
    with pytest.raises(ValueError, match="needs 'step_labels'"):
        canonrl.advantages("fspo", **{k: v for k, v in DIALOGUES.items() if k != "step_labels"})
    with pytest.raises(ValueError, match="greedy_rewards"):
        canonrl.get_estimator("fspo", base="remax")
    with pytest.raises(ValueError):
        canonrl.get_estimator("fspo", base="gigpo")  # not a sequence-level estimator


# ------------------------------------------------------------------------------------------------------------- SPAE
def test_spae_by_hand():
    out = canonrl.advantages("spae", base="rloo", **DIALOGUES)
    # row 0 (A = +1): dPhi = 0, 0.75, 0; Phi passes 0.9 at step 1, so step 2 (after it) gets 0.5 * A
    # row 1 (A = 0): dPhi = 0, -0.4;  row 2 (A = -1, never saturated): dPhi = 0, 0, 0.2;  row 3: 0
    assert flat(step_values(out)) == pytest.approx(flat([[1.0, 1.75, 0.5], [0.0, -0.4], [-1.0, -1.0, -0.8], [0.0]]),
                                                   abs=ATOL)
    off = canonrl.advantages("spae", base="rloo", xi=0.0, saturation_scale=1.0, **DIALOGUES)
    assert step_values(off) == [[1.0, 1.0, 1.0], [0.0, 0.0], [-1.0, -1.0, -1.0], [0.0]]


def test_spae_negative_advantages_are_not_scaled_after_saturation():
    potentials = [[0.95, 0.95, 0.95], [0.1, -0.3], [0.95, 0.95, 0.95], [0.0]]
    out = canonrl.advantages("spae", base="rloo", **{**DIALOGUES, "step_values": potentials})
    assert step_values(out)[0] == [1.0, 0.5, 0.5] and step_values(out)[2] == [-1.0, -1.0, -1.0]


def test_spae_equal_potentials_and_rewards_give_exactly_zero():
    fields = {**DIALOGUES, "rewards": torch.ones(4), "step_values": [[0.3] * len(row) for row in LABELS]}
    assert (canonrl.advantages("spae", **fields) == 0).all()


def test_spae_a_step_without_mask_tokens_keeps_its_potential_for_the_next_step():
    mask = DIALOGUES["mask"].clone()
    mask[2, 3:5] = 0  # row 2's middle step (Phi 0.4) has no mask token
    fields = {**DIALOGUES, "mask": mask, "step_values": [[0.2, 0.95, 0.95], [0.1, -0.3], [0.4, 0.7, 1.0], [0.0]]}
    out = canonrl.advantages("spae", base="rloo", **fields)
    # step 1 gets 0 but keeps Phi = 0.7: step 2's dPhi is 1.0 - 0.7 = 0.3 (A = -1 is never scaled)
    assert step_values(out)[2] == pytest.approx([-1.0, 0.0, -0.7], abs=ATOL)


def test_spae_both_layouts_give_the_same_numbers_and_padding_and_duplicates_do_not_count():
    by_trajectory = flat(step_values(canonrl.advantages("spae", **DIALOGUES)))
    order = [3, 8, 0, 6, 1, 5, 2, 7, 4]
    out = row_values(canonrl.advantages("spae", **row_per_step(DIALOGUES, order)))
    expected = [by_trajectory[i] for i in order]
    assert out[:-2].tolist() == pytest.approx(expected, abs=ATOL)
    assert out[-2].item() == pytest.approx(expected[0], abs=ATOL)
    assert out[-1].item() == 0.0


def test_spae_is_flagged_a_best_reading():
    info = {i.name: i for i in canonrl.estimators()}
    assert not info["spae"].verified and not info["sae"].verified and info["fspo"].verified
    assert info["sae"].critic and info["fspo"].wraps_base and info["spae"].wraps_base


# -------------------------------------------------------------------------------------------------------------- SAE
def test_sae_by_hand():
    """One row, tokens 0 1 . 3 (column 2 a hole), V = 1 2 (9) 4, reward 1 at the end, token 1 improbable::

        packed   delta                 lam_t   A (lam = 0.5)              critic target (lam_critic = 1)
        p0       0 + 2 - 1 = 1          -      1 + 0.5 * (-1) = 0.5        1 + (-1) + 1 = 1
        p1       0 + 4 - 2 = 2          0.5    2 + 1 * (-3) = -1           -1 + 2 = 1
        p2       1 + 0 - 4 = -3         1      -3                          -3 + 4 = 1
    """
    fields = dict(rewards=torch.tensor([1.0]), group=[0], mask=torch.tensor([[1.0, 1, 0, 1]]),
                  values=torch.tensor([[1.0, 2, 9, 4]]), logprobs=torch.tensor([[0.9, 0.1, 0.9, 0.9]]).log())
    advantages, returns = canonrl.get_estimator("sae", lam=0.5, whiten=False).compute_with_returns(**fields)
    assert advantages[0].tolist() == pytest.approx([0.5, -1.0, 0.0, -3.0], abs=ATOL)
    assert returns[0].tolist() == pytest.approx([1.0, 1.0, 0.0, 1.0], abs=ATOL)


def random_critic_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, T = 4, 150  # longer than one doubling round, with holes and one row without a policy token
    mask = (torch.rand(B, T, generator=g) > 0.2).float()
    mask[3] = 0
    return dict(rewards=torch.randn(B, generator=g), group=[0, 1, 0, 2], mask=mask,
                values=torch.randn(B, T, generator=g), logprobs=-3 * torch.rand(B, T, generator=g) - 1e-3,
                bootstrap_values=torch.tensor([0.0, 0.5, -1.0, 0.0]))


@pytest.mark.parametrize("whiten", [True, False])
def test_sae_reduces_to_gae_with_no_boundary_and_with_every_token_a_boundary(whiten):
    fields = random_critic_batch()
    options = dict(gamma=0.97, whiten=whiten)
    none = canonrl.get_estimator("sae", lam=0.8, prob_threshold=0.0, **options).compute_with_returns(**fields)
    gae1 = canonrl.get_estimator("gae", lam=1.0, **options).compute_with_returns(**fields)
    every = canonrl.get_estimator("sae", lam=0.8, prob_threshold=1.0, **options).compute_with_returns(**fields)
    gae08 = canonrl.get_estimator("gae", lam=0.8, lam_critic=1.0, **options).compute_with_returns(**fields)
    for got, expected in ((none, gae1), (every, gae08)):
        assert torch.allclose(got[0], expected[0], atol=1e-5) and torch.allclose(got[1], expected[1], atol=1e-5)
    assert (none[0][3] == 0).all() and (none[1][3] == 0).all()  # the row without a policy token


def test_sae_segments_from_turns_equal_segments_from_logprobs():
    fields = random_critic_batch(1)
    starts = (fields["logprobs"].exp() < 0.2) & (fields["mask"] > 0)
    starts[:, 0] = True
    turn_ids = torch.where(fields["mask"] > 0, starts.long().cumsum(1), -1)  # a new turn at every start
    by_logprobs = canonrl.get_estimator("sae", lam=0.7).compute_with_returns(**fields)
    by_turns = canonrl.get_estimator("sae", lam=0.7, segments="turns").compute_with_returns(
        **{k: v for k, v in fields.items() if k != "logprobs"}, turn_ids=turn_ids)
    assert torch.allclose(by_logprobs[0], by_turns[0], atol=1e-5)
    assert torch.allclose(by_logprobs[1], by_turns[1], atol=1e-5)


def test_sae_constant_zero_td_errors_give_exactly_zero():
    # V equal to the return-to-go everywhere: every TD error is 0
    fields = dict(rewards=torch.tensor([2.0, 2.0]), group=[0, 0], mask=torch.tensor([[1.0, 1, 0], [1, 1, 1]]),
                  values=torch.full((2, 3), 2.0), logprobs=torch.full((2, 3), -5.0))
    advantages, returns = canonrl.get_estimator("sae").compute_with_returns(**fields)
    assert (advantages == 0).all() and torch.equal(returns, 2.0 * fields["mask"])


def test_sae_logprobs_off_the_mask_are_ignored_and_inside_it_checked():
    fields = random_critic_batch(2)
    expected = canonrl.advantages("sae", **fields)
    holes = fields["mask"] == 0
    nan = fields["logprobs"].masked_fill(holes, float("nan"))
    assert torch.allclose(canonrl.advantages("sae", **{**fields, "logprobs": nan}), expected, atol=0)
    nan[0, (~holes[0]).nonzero()[0, 0]] = float("nan")
    with pytest.raises(ValueError, match="logprobs is NaN or Inf inside the mask at rows \\[0\\]"):
        canonrl.advantages("sae", **{**fields, "logprobs": nan})
    with pytest.raises(ValueError, match="needs 'logprobs'"):
        canonrl.advantages("sae", **{k: v for k, v in fields.items() if k != "logprobs"})
