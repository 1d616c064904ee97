"""The step table and the step/critic estimators on hand-computed batches, in both layouts, with the edge cases of
steps.md: constant groups, singletons, padding rows, duplicated steps, holes in the mask, unordered rows."""

from __future__ import annotations

import pytest
import torch

import canonrl
from canonrl.batch import make_batch
from conftest import row_values

ATOL = 1e-5



# ------------------------------------------------------------------------------------------------------ step table
def test_mask_runs_make_one_step_per_run_and_holes_belong_to_none():
    mask = torch.tensor([[1, 1, 0, 0, 1, 0, 1], [0, 1, 1, 1, 0, 0, 0]])
    steps = make_batch(rewards=torch.zeros(2), group=[0, 0], mask=mask, turn_ids="mask_runs").steps
    assert steps.token_occ.tolist() == [[0, 0, -1, -1, 1, -1, 2], [-1, 3, 3, 3, -1, -1, -1]]
    assert steps.occ_row.tolist() == [0, 0, 0, 1] and steps.occ_local.tolist() == [0, 1, 2, 0]
    assert steps.pos.tolist() == [0, 1, 2, 0] and steps.mass.tolist() == [2.0, 1.0, 1.0, 3.0]
    assert steps.prev.tolist() == [-1, 0, 1, -1]


def test_a_batch_with_no_token_in_any_turn_has_no_steps():
    for turn_ids in ("mask_runs", torch.full((2, 3), -1)):
        steps = make_batch(rewards=torch.zeros(2), group=[0, 1], mask=torch.zeros(2, 3), turn_ids=turn_ids).steps
        assert steps.num_steps == 0 and (steps.token_occ == -1).all()
    out = canonrl.advantages("gigpo", rewards=torch.zeros(2), group=[0, 1], mask=torch.zeros(2, 3),
                             turn_ids="mask_runs", step_rewards=[[], []], anchor=[[], []])
    assert (out == 0).all()


def test_row_layout_orders_steps_by_step_index_not_batch_order():
    # trajectory "a" given backwards and interleaved with "b"; one padding row
    batch = make_batch(
        rewards=torch.zeros(5), group=[0] * 5, mask=torch.ones(5, 2),
        traj=["a", "b", "a", "pad", "b"], step_index=torch.tensor([1, 0, 0, -1, 1]),
    )
    steps = batch.steps
    assert steps.num_steps == 4 and steps.occ_row.tolist() == [0, 1, 2, 4]
    order = steps.first_occ.tolist()  # steps in (trajectory, time) order -> their rows
    assert [steps.occ_row[o].item() for o in order] == [2, 0, 1, 4]
    assert steps.pos.tolist() == [0, 1, 0, 1]
    returns = steps.returns(steps.per_step("step_rewards", torch.tensor([1.0, 2.0, 4.0, 0.0, 8.0])), 0.5)
    # per step (a0 = row 2, a1 = row 0, b0 = row 1, b1 = row 4): a0 = 4 + 0.5 * 1
    assert returns.tolist() == [4.5, 1.0, 6.0, 8.0]


def test_returns_over_long_trajectories_match_the_recursion():
    lengths = [1, 7, 33, 100]
    traj = [i for i, n in enumerate(lengths) for _ in range(n)]
    index = torch.tensor([t for n in lengths for t in range(n)])
    rewards = torch.randn(len(traj), generator=torch.Generator().manual_seed(0))
    batch = make_batch(rewards=torch.zeros(len(traj)), group=traj, mask=torch.ones(len(traj), 1), traj=traj,
                       step_index=index)
    for gamma in (0.0, 0.9, 1.0):
        got = batch.steps.returns(batch.steps.per_step("step_rewards", rewards), gamma)
        expected, start = [], 0
        for n in lengths:
            running, out = 0.0, []
            for r in reversed(rewards[start : start + n].tolist()):
                running = r + gamma * running
                out.append(running)
            expected += out[::-1]
            start += n
        assert torch.allclose(got, torch.tensor(expected), atol=1e-4), gamma


def test_per_step_inputs_in_every_accepted_form():
    mask = torch.tensor([[1, 0, 1, 1], [1, 1, 0, 0]])
    batch = make_batch(rewards=torch.zeros(2), group=[0, 1], mask=mask, turn_ids="mask_runs")
    steps = batch.steps  # row 0: two steps; row 1: one
    flat = torch.tensor([1.0, 2.0, 3.0])
    for form in (flat, [1.0, 2.0, 3.0], [[1.0, 2.0], [3.0]], torch.tensor([[1.0, 2.0], [3.0, 99.0]])):
        assert steps.per_step("step_rewards", form).tolist() == [1.0, 2.0, 3.0]
    assert steps.per_step_ids("agent", ["p0", "p1"], per_row=True).tolist() == [0, 0, 1]
    assert steps.per_step_ids("anchor", [("x", 1), ("y", 2), ("x", 1)]).tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match=r"step_rewards must give one value per step \(3 steps"):
        steps.per_step("step_rewards", torch.ones(2))
    with pytest.raises(ValueError, match=r"step_rewards lists .* at rows \[1\]"):
        steps.per_step("step_rewards", [[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(ValueError, match=r"step_rewards is NaN or Inf at steps of rows \[0\]"):
        steps.per_step("step_rewards", torch.tensor([1.0, float("nan"), 3.0]))


def test_bad_step_inputs_name_the_field_and_rows():
    base = dict(rewards=torch.zeros(3), mask=torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"traj: the rows of one trajectory must share one group, not at rows \[0, 2\]"):
        make_batch(group=[0, 1, 1], traj=["a", "b", "a"], **base).steps
    with pytest.raises(ValueError, match=r"step_index must be >= -1 .* rows \[1\]"):
        make_batch(group=[0, 0, 0], step_index=torch.tensor([0, -2, 1]), **base)
    with pytest.raises(ValueError, match=r"turn_ids must be >= -1 .* rows \[2\]"):
        make_batch(group=[0, 0, 0], turn_ids=torch.tensor([[0, 0], [0, 1], [0, -3]]), **base).steps
    with pytest.raises(ValueError, match="turn_ids must be a"):
        make_batch(group=[0, 0, 0], turn_ids="turns", **base).steps
    with pytest.raises(ValueError, match=r"values is NaN or Inf inside the mask at rows \[1\]"):
        values = torch.tensor([[0.0, 0.0], [0.0, float("inf")], [float("nan"), 0.0]])
        canonrl.advantages("gae", group=[0, 0, 0], values=values, mask=torch.tensor([[1, 1], [1, 1], [0, 1]]),
                           rewards=torch.zeros(3))
    with pytest.raises(ValueError, match="estimator 'gigpo' needs 'anchor'"):
        canonrl.advantages("gigpo", group=[0, 0, 0], step_rewards=torch.zeros(3), **base)


# ------------------------------------------------------------------------------------------------------------ GAE
def test_gae_skips_holes_by_hand():
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 9.0, 0.4]])
    gae = canonrl.get_estimator("gae", whiten=False)
    adv, ret = gae.compute_with_returns(token_rewards=rewards, values=values, mask=mask, group=[0])
    assert torch.allclose(adv, torch.tensor([[0.5, 0.8, 0.0, 0.6]]), atol=ATOL)
    assert torch.allclose(ret, torch.tensor([[1.0, 1.0, 0.0, 1.0]]), atol=ATOL)
    adv = canonrl.advantages("gae", whiten=False, gamma=0.5, lam=0.5, token_rewards=rewards, values=values, mask=mask,
                             group=[0])
    assert torch.allclose(adv, torch.tensor([[-0.3625, 0.15, 0.0, 0.6]]), atol=ATOL)


def test_gae_decoupled_lambda_bootstrap_and_outcome_on_a_hole():
    mask, values = torch.ones(1, 2), torch.tensor([[0.5, 0.2]])
    gae = canonrl.get_estimator("gae", whiten=False, lam=0.0, lam_critic=1.0)
    adv, ret = gae.compute_with_returns(rewards=torch.zeros(1), values=values, mask=mask, group=[0],
                                        bootstrap_values=torch.tensor([0.7]))
    assert torch.allclose(adv, torch.tensor([[-0.3, 0.5]]), atol=ATOL)  # one-step TD errors
    assert torch.allclose(ret, torch.tensor([[0.7, 0.7]]), atol=ATOL)  # lam 1: A + V = bootstrapped return
    # the episode ends on an observation token: verl drops the reward, canonrl moves it to the last policy token
    ends_on_hole = dict(token_rewards=torch.tensor([[0.0, 0.0, 1.0]]), values=torch.zeros(1, 3),
                        mask=torch.tensor([[1.0, 1.0, 0.0]]), group=[0], whiten=False)
    assert canonrl.advantages("gae", **ends_on_hole).tolist() == [[1.0, 1.0, 0.0]]
    assert canonrl.advantages("gae", masked_rewards="drop", **ends_on_hole).tolist() == [[0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match=r"before the row's last policy token at rows \[0\]"):
        canonrl.advantages("gae", token_rewards=torch.tensor([[0.0, 1.0, 0.0]]), values=torch.zeros(1, 3),
                           mask=torch.tensor([[1.0, 0.0, 1.0]]), group=[0])


def test_gae_whitens_over_the_mask_and_is_zero_off_it():
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(5, 9, generator=g) > 0.3).float()
    adv = canonrl.advantages("gae", token_rewards=torch.randn(5, 9, generator=g) * mask, values=torch.randn(5, 9, generator=g),
                             mask=mask, group=list(range(5)), gamma=0.9, lam=0.95)
    inside = adv[mask > 0]
    assert inside.mean().abs() < 1e-5 and (inside.std() - 1).abs() < 1e-4
    assert (adv[mask == 0] == 0).all()


# ---------------------------------------------------------------------------------------------------------- GiGPO
#: Group "q": trajectory A visits anchors s0, s1 (step rewards 0, 1; episode reward 1); B visits s0, s2, s1 (all 0).
GIGPO_ROWS = dict(
    rewards=torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0]),
    group=["q"] * 5,
    mask=torch.ones(5, 3),
    traj=["A", "A", "B", "B", "B"],
    step_index=torch.tensor([0, 1, 0, 1, 2]),
    step_rewards=torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]),
    anchor=["s0", "s1", "s0", "s2", "s1"],
)
# returns with gamma 0.5: A = (0.5, 1), B = 0; episode mean over steps 0.4; anchors s0: +-0.25, s1: +-0.5, s2: alone
GIGPO_STEPS = [0.85, 1.1, -0.65, -0.4, -0.9]
GIGPO_TRAJECTORIES = [0.75, 1.0, -0.75, -0.5, -1.0]


def test_gigpo_by_hand_in_the_row_per_step_layout():
    out = canonrl.advantages("gigpo", gamma=0.5, **GIGPO_ROWS)
    assert torch.allclose(row_values(out), torch.tensor(GIGPO_STEPS), atol=ATOL)
    out = canonrl.advantages("gigpo", gamma=0.5, episode_stats="trajectories", **GIGPO_ROWS)
    assert torch.allclose(row_values(out), torch.tensor(GIGPO_TRAJECTORIES), atol=ATOL)


def test_gigpo_row_per_trajectory_layout_gives_the_same_numbers():
    turn_ids = torch.tensor([[0, 0, -1, 1, 1, -1], [0, -1, 1, 1, 2, -1]])  # -1: observation tokens
    mask = (turn_ids >= 0).float()
    out = canonrl.advantages(
        "gigpo", gamma=0.5, rewards=torch.tensor([1.0, 0.0]), group=["q", "q"], mask=mask, turn_ids=turn_ids,
        step_rewards=[[0.0, 1.0], [0.0, 0.0, 0.0]], anchor=[["s0", "s1"], ["s0", "s2", "s1"]],
    )
    a0, a1, b0, b1, b2 = GIGPO_STEPS
    assert torch.allclose(out, torch.tensor([[a0, a0, 0, a1, a1, 0], [b0, 0, b1, b1, b2, 0]]), atol=ATOL)


def test_gigpo_duplicated_padding_and_shuffled_rows():
    rows = {k: (list(v) if isinstance(v, list) else v.clone()) for k, v in GIGPO_ROWS.items()}
    # a copy of row 3 (traj B, step 1) and a padding row of another group, then shuffle everything
    extra = {"rewards": [0.0, 5.0], "group": ["q", "z"], "traj": ["B", "Z"], "step_index": [1, -1],
             "step_rewards": [0.0, 3.0], "anchor": ["s2", "s9"]}
    for key, values in extra.items():
        rows[key] = rows[key] + values if isinstance(rows[key], list) else torch.cat([rows[key], torch.tensor(values)])
    rows["mask"] = torch.ones(7, 3)
    order = [6, 3, 0, 5, 2, 4, 1]
    shuffled = {k: ([v[i] for i in order] if isinstance(v, list) else v[order]) for k, v in rows.items()}
    out = row_values(canonrl.advantages("gigpo", gamma=0.5, **shuffled))
    expected = torch.tensor(GIGPO_STEPS + [GIGPO_STEPS[3], 0.0])[order]
    assert torch.allclose(out, expected, atol=ATOL)  # the copy counted once and given its step's advantage


def test_gigpo_constant_groups_are_exactly_zero_and_singletons_follow_the_official_rules():
    # three trajectories that reach the goal in three steps through the same states: every group is constant
    rows = dict(rewards=torch.ones(9), group=[0] * 9, mask=torch.ones(9, 2), traj=[t for t in range(3) for _ in range(3)],
                step_index=torch.arange(3).repeat(3), step_rewards=torch.tensor([0.0, 0.0, 1.0] * 3),
                anchor=[0, 1, 2] * 3)
    for mode in ("mean_norm", "mean_std_norm"):
        assert (canonrl.advantages("gigpo", mode=mode, **rows) == 0).all()
    # a group of one step keeps its episode reward (mean 0, std 1); an anchor of one step adds nothing
    single = dict(rewards=torch.tensor([0.7]), group=[0], mask=torch.ones(1, 2), step_rewards=torch.ones(1), anchor=[0])
    assert torch.allclose(canonrl.advantages("gigpo", **single), torch.full((1, 2), 0.7))
    std = canonrl.advantages("gigpo", mode="mean_std_norm", **single)
    assert torch.allclose(std, torch.full((1, 2), 0.7 / (1 + 1e-6)))


def test_a_step_without_mask_tokens_feeds_returns_but_no_statistic():
    rows = dict(rewards=torch.zeros(4), group=[0] * 4, traj=["a", "a", "b", "b"], step_index=torch.tensor([0, 1, 0, 1]),
                step_rewards=torch.tensor([0.0, 1.0, 0.0, 0.0]), anchor=[0, 1, 0, 1])
    mask = torch.ones(4, 2)
    mask[1] = 0  # a's last step is masked out of the loss
    out = canonrl.advantages("gigpo", gamma=1.0, mask=mask, **rows)
    # anchor 0: returns 1 (a, fed by the masked step) and 0 (b); anchor 1 keeps only b's step: a singleton
    assert torch.allclose(row_values(out), torch.tensor([0.5, 0.0, -0.5, 0.0]), atol=ATOL)
    assert (out[1] == 0).all()


# ----------------------------------------------------------------------------------------------------------- HGPO
def test_hgpo_by_hand():
    rows = dict(rewards=torch.zeros(6), group=["q"] * 6, mask=torch.ones(6, 2), traj=["A", "A", "B", "B", "C", "C"],
                step_index=torch.tensor([0, 1] * 3), step_rewards=torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0, 0.0]),
                anchor=["a", "b", "a", "b", "c", "b"])
    out = canonrl.advantages("hgpo", history_length=1, mode="mean_norm", gamma=1.0, **rows)
    # depth 1: a: A0 +0.5, B0 -0.5; b: A1 2/3, B1 -1/3, C1 -1/3. depth 2 (weight 3): (b after a): A1 +0.5, B1 -0.5
    expected = [0.5, (2 * 2 / 3 + 3 * 0.5) / 5, -0.5, (-2 / 3 - 1.5) / 5, 0.0, -1 / 3]
    assert torch.allclose(row_values(out), torch.tensor(expected), atol=ATOL)
    uniform = canonrl.advantages("hgpo", history_length=1, mode="mean_norm", gamma=1.0, length_weight_alpha=0.0, **rows)
    assert torch.allclose(row_values(uniform)[1], torch.tensor((2 / 3 + 0.5) / 2), atol=ATOL)


def test_hgpo_constant_groups_are_dropped_not_averaged_in():
    rows = dict(rewards=torch.ones(6), group=[0] * 6, mask=torch.ones(6, 1), traj=[0, 0, 0, 1, 1, 1],
                step_index=torch.arange(3).repeat(2), step_rewards=torch.tensor([0.0, 0.0, 1.0] * 2),
                anchor=[0, 1, 2] * 2)
    assert (canonrl.advantages("hgpo", **rows) == 0).all()


# ---------------------------------------------------------------------------------------------------------- TRLOO
def test_trloo_by_hand_with_padding_turns_and_a_masked_turn():
    # four trajectories of up to three turns on the official grid; padding rows have step_index -1
    rewards = [[1, 1, 0], [0, 1, 0], [0, 0, 0], [0, 0, 2]]
    lengths = [2, 2, 2, 3]
    step_index = torch.tensor([t if t < n else -1 for n in lengths for t in range(3)])
    step_rewards = torch.tensor([float(r) for row in rewards for r in row])
    mask = torch.ones(12, 2)
    adv, ret = canonrl.get_estimator("trloo").compute_with_returns(
        rewards=torch.zeros(12), group=[0] * 12, mask=mask, traj=[i // 3 for i in range(12)], step_index=step_index,
        step_rewards=step_rewards,
    )
    # returns: [2, 1], [1, 1], [0, 0], [2, 2, 2]; turn 0: mean 1.25, n 4; turn 1: mean 1, n 4; turn 2: alone
    expected = [4 / 3 * (2 - 1.25), 0, 0, 4 / 3 * (1 - 1.25), 0, 0, 4 / 3 * (0 - 1.25), 4 / 3 * (0 - 1), 0,
                4 / 3 * (2 - 1.25), 4 / 3 * (2 - 1), 2.0]
    assert torch.allclose(row_values(adv), torch.tensor(expected), atol=ATOL)
    assert row_values(ret).tolist() == [2, 1, 0, 1, 1, 0, 0, 0, 0, 2, 2, 2]


@pytest.mark.parametrize("name", ["gigpo", "hgpo", "trloo"])
def test_constant_groups_give_exact_zeros_where_the_official_float32_code_does_not(name):
    # every trajectory reaches the goal in three steps: all groups hold copies of 0.95^k
    rows = dict(rewards=torch.ones(12), group=[0] * 12, mask=torch.ones(12, 2), traj=[t for t in range(4) for _ in range(3)],
                step_index=torch.arange(3).repeat(4), step_rewards=torch.tensor([0.0, 0.0, 1.0] * 4),
                anchor=[0, 1, 2] * 4)
    params = {"gamma": 0.95} | ({"mode": "mean_std_norm"} if name == "gigpo" else {})
    assert (canonrl.advantages(name, **params, **rows) == 0).all()
    assert canonrl.advantages(name, **params, numerics="upstream", **rows).isfinite().all()


def test_egae_places_each_turn_return_on_its_last_token_then_runs_gae():
    rows = dict(rewards=torch.zeros(3), group=[0] * 3, mask=torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]),
                values=torch.zeros(3, 2), traj=["a", "a", "pad"], step_index=torch.tensor([0, 1, -1]),
                step_rewards=torch.tensor([0.0, 1.0, 7.0]))
    # gamma 0.5: turn returns 0.5 and 1 on the last tokens; GAE (lam 1, V 0) within each row: (0.25, 0.5), (0.5, 1)
    adv, ret = canonrl.get_estimator("egae", gamma=0.5, whiten=False).compute_with_returns(**rows)
    assert torch.allclose(adv, torch.tensor([[0.25, 0.5], [0.5, 1.0], [0.0, 0.0]]), atol=ATOL)
    assert torch.allclose(ret, adv, atol=ATOL)  # V = 0
    with pytest.raises(ValueError, match="egae takes one turn per row"):
        canonrl.advantages("egae", turn_ids="mask_runs", **{k: v for k, v in rows.items() if k not in ("traj",)})


@pytest.mark.parametrize("width", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("factor", [0.0, 0.5, 0.95, 1.0])
def test_blocked_reverse_discounted_cumsum_matches_the_loop(width, factor):
    from canonrl.ops import reverse_discounted_cumsum

    x = torch.randn(3, width, generator=torch.Generator().manual_seed(width))
    expected, running = torch.zeros_like(x), torch.zeros(3)
    for t in range(width - 1, -1, -1):
        running = x[:, t] + factor * running
        expected[:, t] = running
    assert torch.allclose(reverse_discounted_cumsum(x, factor), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("span", [1, 7, 50, 5000])
def test_dense_codes_equal_unique_inverse_with_and_without_sorting(span):
    from canonrl.batch import dense_codes

    generator = torch.Generator().manual_seed(span)
    values = torch.randint(-span, span, (300,), generator=generator) * 3 + 11  # gaps, negatives
    uniques, inverse = torch.unique(values, return_inverse=True)
    codes, count = dense_codes(values)
    assert torch.equal(codes, inverse) and count == uniques.numel()
    assert codes.dtype == torch.long
