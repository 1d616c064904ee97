"""verl-agent's row-per-step layout (canonrl.integrations.verl_agent): batches built as verl-agent builds them
(tests/official_verl_agent.py), GiGPO and HGPO equal to the official code before ``adjust_batch``, the same advantage
for every row after its duplication and a shuffle, why the step-index hook matters, and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("verl")

from verl import DataProto  # noqa: E402

import canonrl  # noqa: E402
import official_verl_agent as official  # noqa: E402
from canonrl.integrations import verl_agent  # noqa: E402
from canonrl.integrations.verl_agent import STEP_INDEX_KEY, compute_advantage, record_step_index  # noqa: E402
from canonrl.reference import official_gigpo, official_hgpo  # noqa: E402

GAMMA = 0.95


def episodes(seed: int, *, envs: int = 12, max_steps: int = 5, states: int = 3) -> list:
    """Scripted episodes of unequal lengths whose anchor states repeat across trajectories (and within one)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(envs):
        length = int(rng.integers(1, max_steps + 1))
        out.append([(f"room {int(rng.integers(0, states))}", float(rng.choice([0.0, 0.0, 1.0, -0.5, 0.3])),
                     int(rng.integers(1, 5))) for _ in range(length)])  # fmt: skip
    return out


def rollout(seed: int, **kwargs) -> DataProto:
    data = official.rollout(episodes(seed, **kwargs), rollout_n=4, max_steps=5)
    data.non_tensor_batch["row_id"] = np.arange(len(data))  # which rollout row each row is (copies keep it)
    return data


def algorithm(name: str = "gigpo", **params) -> dict:
    """verl-agent's algorithm config (its yaml keys included) with canonrl's extras."""
    sections = {
        "gigpo": {"step_advantage_w": 1.0, "mode": "mean_norm", "enable_similarity": False, "similarity_thresh": 0.95},
        "hgpo": {"mode": "mean_std_norm", "weight_type": "length", "length_weight_alpha": 1.0, "base_group": False},
    }
    return {"gamma": GAMMA, "adv_estimator": name, name: {**sections.get(name, {}), **params}}


def duplicated_and_shuffled(data: DataProto, seed: int, divisor: int = 16) -> DataProto:
    """adjust_batch (mode "copy") to a multiple of ``divisor``, then a reorder as _balance_batch does."""
    rng = np.random.default_rng(seed)
    out = official.adjust_batch(official.trainer_config(divisor), data, rng=rng)
    assert len(out) > len(data)
    out.reorder(torch.as_tensor(rng.permutation(len(out))))
    return out


def official_returns(data: DataProto) -> torch.Tensor:
    nt = data.non_tensor_batch
    return official_gigpo.step_discounted_returns(nt["rewards"], nt["traj_uid"], nt["active_masks"], GAMMA)


def per_row(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The one advantage of each step row (on its first response token)."""
    return advantages[torch.arange(len(mask)), mask.argmax(-1)]


# -------------------------------------------------------------------------------------------------------- the hook
def test_the_step_index_is_each_rows_rollout_position():
    data = rollout(0)
    record_step_index(data)
    traj, index = data.non_tensor_batch["traj_uid"], data.non_tensor_batch[STEP_INDEX_KEY]
    expected, seen = [], {}
    for t in traj:
        expected.append(seen.get(t, 0))
        seen[t] = expected[-1] + 1
    assert index.dtype == np.int64 and index.tolist() == expected
    assert max(expected) >= 3 and len(set(seen.values())) >= 3  # trajectories of unequal lengths
    record_step_index(data)  # again on the unchanged batch: a no-op
    assert data.non_tensor_batch[STEP_INDEX_KEY].tolist() == expected


def test_the_step_index_of_interleaved_rows():
    data = DataProto.from_dict(tensors={"x": torch.zeros(6, 1)},
                               non_tensors={"traj_uid": np.array(["b", "a", "b", "c", "a", "b"], dtype=object)})  # fmt: skip
    assert record_step_index(data).non_tensor_batch[STEP_INDEX_KEY].tolist() == [0, 0, 1, 0, 1, 2]


# ------------------------------------------------------------------------------------------- (a) official parity
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("mode", ["mean_norm", "mean_std_norm"])
def test_gigpo_equals_the_official_code_on_the_rollout_batch(seed, mode):
    data = rollout(seed)
    mask = data.batch["response_mask"]
    expected, _ = official_gigpo.gigpo_advantage(
        data.batch["token_level_rewards"], official_returns(data), mask, data.non_tensor_batch["anchor_obs"],
        data.non_tensor_batch["uid"], data.non_tensor_batch["traj_uid"], step_advantage_w=0.7, mode=mode,
    )  # fmt: skip
    record_step_index(data)
    upstream = compute_advantage(data, "gigpo", algorithm(mode=mode, step_advantage_w=0.7, numerics="upstream"))
    assert torch.allclose(upstream.batch["advantages"], expected, atol=1e-6, rtol=0)
    assert torch.equal(data.batch["returns"], data.batch["advantages"])
    assert (per_row(expected, mask).abs() > 0.05).sum() > len(data) // 2  # real values, not zeros
    if mode == "mean_norm":  # no std division: canonrl's exact zeros differ from the float noise by ~1e-7 only
        canonical = compute_advantage(data, "gigpo", algorithm(mode=mode, step_advantage_w=0.7)).batch["advantages"]
        assert torch.allclose(canonical, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("history_length", [1, 2])
def test_hgpo_equals_the_official_code_on_the_rollout_batch(seed, history_length):
    data = rollout(seed)
    nt = data.non_tensor_batch
    expected, _ = official_hgpo.hgpo_advantage(
        data.batch["token_level_rewards"], official_returns(data), data.batch["response_mask"], nt["anchor_obs"],
        nt["uid"], nt["traj_uid"], history_length, mode="mean_std_norm",
    )  # fmt: skip
    record_step_index(data)
    out = compute_advantage(data, "hgpo", algorithm("hgpo", numerics="upstream"), history_length=history_length)
    assert torch.allclose(out.batch["advantages"], expected, atol=1e-5, rtol=0)
    assert (expected != 0).any(-1).sum() > len(data) // 3


# --------------------------------------------------------------------------- (b) duplication and shuffling
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name, config", [("gigpo", algorithm(mode="mean_std_norm")),
                                          ("hgpo", algorithm("hgpo")),
                                          ("gigpo", algorithm(mode="mean_norm", episode_stats="trajectories"))])  # fmt: skip
def test_copies_get_their_originals_advantage_and_do_not_change_statistics(seed, name, config):
    data = rollout(seed)
    record_step_index(data)
    before = compute_advantage(data, name, config, history_length=2).batch["advantages"].clone()
    after = compute_advantage(duplicated_and_shuffled(data, seed), name, config, history_length=2)
    original = torch.as_tensor(after.non_tensor_batch["row_id"].astype(np.int64))
    assert torch.equal(after.batch["advantages"], before[original])
    assert len(set(original.tolist())) < len(original)  # there were copies


def test_the_official_trainer_counts_the_copies_twice():
    """The standard trainer's order (returns, adjust_batch, _balance_batch, advantage) changes the copies' and the
    other rows' advantages; canonrl with the hook gives every row its rollout-batch value."""
    data = rollout(1)
    record_step_index(data)
    config = algorithm(mode="mean_std_norm", numerics="upstream")
    before = compute_advantage(data, "gigpo", config).batch["advantages"].clone()
    rng = np.random.default_rng(1)
    official_out = official.official_gigpo_pipeline(data, official.trainer_config(16), GAMMA, mode="mean_std_norm",
                                                    rng=rng, permutation=None)  # fmt: skip
    original = torch.as_tensor(official_out.non_tensor_batch["row_id"].astype(np.int64))
    shift = (official_out.batch["advantages"] - before[original]).abs().amax(-1)
    assert shift.max() > 0.05 and (shift > 1e-4).sum() > 3
    ours = compute_advantage(official_out, "gigpo", config).batch["advantages"]
    assert torch.equal(ours, before[original])


def test_by_hand_one_copied_step():
    """Group of two: trajectory A = (s0, r 0), (s1, r 1), episode reward 1; trajectory B = (s0, r 0), reward 0.
    gamma 0.5, mean_norm, w = 1: returns A 0.5, 1 and B 0; episode part over the three steps: mean 2/3; anchor s0:
    {0.5, 0} -> ±0.25, s1 alone -> 0. So A = 7/12, 1/3 and B = -11/12; a copy of A's second step changes nothing."""
    data = official.rollout([[("s0", 0.0, 2), ("s1", 1.0, 2)], [("s0", 0.0, 2)]], rollout_n=2, max_steps=5)
    record_step_index(data)
    config = {"gamma": 0.5, "gigpo": {"mode": "mean_norm"}}
    correct = torch.tensor([7 / 12, 1 / 3, -11 / 12])
    assert torch.allclose(per_row(compute_advantage(data, "gigpo", config).batch["advantages"],
                                  data.batch["response_mask"]), correct, atol=1e-6)  # fmt: skip
    data.batch["step_rewards"] = official_gigpo.step_discounted_returns(
        data.non_tensor_batch["rewards"], data.non_tensor_batch["traj_uid"], data.non_tensor_batch["active_masks"], 0.5
    )
    copied = DataProto.concat([data, data.select_idxs([1])])
    mask = copied.batch["response_mask"]
    ours = per_row(compute_advantage(copied, "gigpo", config).batch["advantages"], mask)
    assert torch.allclose(ours, correct[[0, 1, 2, 1]], atol=1e-6)
    # (c) the official advantage on the copied batch: episode mean 3/4, the s1 group {1, 1} -> 0
    nt = copied.non_tensor_batch
    official_adv, _ = official_gigpo.gigpo_advantage(copied.batch["token_level_rewards"], copied.batch["step_rewards"],
                                                     mask, nt["anchor_obs"], nt["uid"], nt["traj_uid"])  # fmt: skip
    assert torch.allclose(per_row(official_adv, mask), torch.tensor([0.5, 0.25, -1.0, 0.25]), atol=1e-6)
    # (c) the hook called too late (after the copy): the copy is a third step of A, with return 1; A's returns
    # become 0.75, 1.5, 1: episode part ±(1/4, -3/4), s0 {0.75, 0} -> ±0.375, s1 {1.5, 1} -> ±0.25
    late = DataProto.concat([data, data.select_idxs([1])])
    late.non_tensor_batch.pop(STEP_INDEX_KEY)
    record_step_index(late)
    wrong = per_row(compute_advantage(late, "gigpo", config).batch["advantages"], mask)
    assert torch.allclose(wrong, torch.tensor([0.625, 0.5, -1.125, 0.0]), atol=1e-6)
    # (c) and canonrl's core without a step index takes batch order, which is the same wrong answer here
    no_index = canonrl.advantages("gigpo", gamma=0.5, rewards=torch.tensor([1.0, 1.0, 0.0, 1.0]),
                                  group=list(nt["uid"]), traj=list(nt["traj_uid"]), mask=mask,
                                  step_rewards=torch.tensor([0.0, 1.0, 0.0, 1.0]), anchor=list(nt["anchor_obs"]))  # fmt: skip
    assert torch.allclose(per_row(no_index, mask), wrong, atol=1e-6)


def test_without_the_hook_the_advantage_is_refused():
    data = duplicated_and_shuffled(rollout(0), 0)
    with pytest.raises(ValueError, match=r"no 'canonrl_step_index': call .*record_step_index\(batch\) right after"):
        compute_advantage(data, "gigpo", algorithm())


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_row_order_does_not_matter(seed):
    data = _HYPOTHESIS_BATCH
    before = _HYPOTHESIS_ADVANTAGES
    permutation = np.random.default_rng(seed).permutation(len(data))
    shuffled = data.select_idxs(permutation)
    out = compute_advantage(shuffled, "gigpo", algorithm(mode="mean_std_norm"))
    assert torch.equal(out.batch["advantages"], before[torch.as_tensor(permutation)])


_HYPOTHESIS_BATCH = record_step_index(rollout(5))
_HYPOTHESIS_ADVANTAGES = (
    compute_advantage(_HYPOTHESIS_BATCH, "gigpo", algorithm(mode="mean_std_norm")).batch["advantages"].clone()
)


# ------------------------------------------------------------------------------------------- config and names
def test_config_keys():
    from omegaconf import OmegaConf

    config = OmegaConf.create(algorithm(mode="mean_std_norm"))
    assert verl_agent.hyperparameters("gigpo", config) == {"step_advantage_w": 1.0, "mode": "mean_std_norm",
                                                           "gamma": GAMMA}  # fmt: skip
    config = algorithm(gamma=0.5, eps=1e-8)
    assert verl_agent.hyperparameters("gigpo", config)["gamma"] == 0.5  # algorithm.gigpo.gamma wins
    params = verl_agent.hyperparameters("hgpo", algorithm("hgpo"), history_length=4)
    assert params == {"mode": "mean_std_norm", "length_weight_alpha": 1.0, "base_group": False, "gamma": GAMMA,
                      "history_length": 4}  # fmt: skip
    assert verl_agent.ESTIMATORS == verl_agent.estimator_names()
    data = record_step_index(rollout(2))
    by_alias = compute_advantage(data, "canonrl_gigpo", algorithm()).batch["advantages"].clone()
    assert torch.equal(by_alias, compute_advantage(data, "gigpo", algorithm()).batch["advantages"])


# ------------------------------------------------------------------------------------------------ (d) errors
def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_errors_are_one_line_and_name_the_rows():
    data = rollout(0)
    assert "record_step_index(data): non_tensor_batch has no 'traj_uid'" in _error(
        record_step_index,
        DataProto.from_dict(tensors={"x": torch.zeros(2, 1)}, non_tensors={"uid": np.array(["a", "b"])}),
    )
    broken = rollout(0)
    broken.non_tensor_batch["traj_uid"][[2, 5]] = None
    assert "'traj_uid'] is None at rows [2, 5]" in _error(record_step_index, broken)
    inactive = rollout(0)
    inactive.non_tensor_batch["active_masks"][3] = False
    assert "'active_masks'] is False at rows [3]" in _error(record_step_index, inactive)

    record_step_index(data)
    moved = data.select_idxs([1, 0, *range(2, len(data))])
    message = _error(record_step_index, moved)
    assert "already recorded" in message and "rows [0, 1]" in message and "right after the rollout" in message
    copied = DataProto.concat([data, data.select_idxs([0])])
    assert f"rows [{len(data)}]" in _error(record_step_index, copied)

    assert "does not run on verl-agent's row-per-step layout; choose from gigpo" in _error(
        compute_advantage, data, "grpo", algorithm()
    )
    assert "enable_similarity=True is not supported" in _error(
        compute_advantage, data, "gigpo", algorithm(enable_similarity=True)
    )
    assert "unknown hyperparameter 'step_w'" in _error(compute_advantage, data, "gigpo", algorithm(step_w=1.0))
    no_anchor = data.select_idxs(np.arange(len(data)))
    no_anchor.non_tensor_batch["anchor_obs"][4] = None
    assert "'anchor_obs'] is None at rows [4]" in _error(compute_advantage, no_anchor, "gigpo", algorithm())
    split = data.select_idxs(np.arange(len(data)))
    split.non_tensor_batch["uid"][0] = "another group"
    assert "rows [0" in _error(compute_advantage, split, "gigpo", algorithm())


@pytest.mark.parametrize("name", ["gigpo", "hgpo"])
def test_verls_patched_dispatcher_routes_the_row_per_step_layout(name):
    """verl's own compute_advantage, patched, on a verl-agent batch (duplicated and reordered after the hook) gives
    what this module's compute_advantage gives: both layouts go through verl's real dispatcher."""
    from omegaconf import OmegaConf
    from verl.trainer.ppo import ray_trainer

    from canonrl.integrations import verl as cv

    data = rollout(7)
    record_step_index(data)
    data = duplicated_and_shuffled(data, 7)
    config = algorithm(name, **({"history_length": 2} if name == "hgpo" else {}))
    want = compute_advantage(data, name, config).batch["advantages"].clone()
    cv.patch_compute_advantage()
    try:
        got = ray_trainer.compute_advantage(data, adv_estimator=name, config=OmegaConf.create(config))
    finally:
        cv.unpatch_compute_advantage()
    assert want.abs().sum() > 0
    torch.testing.assert_close(got.batch["advantages"], want, atol=0, rtol=0)
