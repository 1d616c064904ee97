"""Step and critic estimators through verl's real ``compute_advantage`` on batches in verl's agent-loop layout (one
row per trajectory, tool/observation tokens as response-mask holes, per-turn scores in ``non_tensor_batch``), with
canonrl's patch: they equal the library's advantages on the same fields; returns are the critic's targets; counts
that do not match the turns, and a dispatcher without the patch, are one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
ray_trainer = pytest.importorskip("verl.trainer.ppo.ray_trainer")
from omegaconf import OmegaConf  # noqa: E402
from verl import DataProto  # noqa: E402

import canonrl  # noqa: E402
from canonrl.integrations import verl as cv  # noqa: E402
from canonrl.integrations.verl import adapter  # noqa: E402
from canonrl.integrations.verl.checkpoints import make_loading as load_with_checkpoint  # noqa: E402
from canonrl.integrations.verl.checkpoints import make_saving as save_with_checkpoint  # noqa: E402

pytestmark = pytest.mark.verl
ATOL = 1e-5

#: per row: the response mask (1 = policy token, 0 = tool/observation hole, trailing 0 = padding)
MASKS = [
    [1, 1, 0, 0, 1, 1, 0, 1, 0, 0],
    [1, 0, 0, 1, 1, 1, 0, 0, 0, 0],
    [1, 1, 1, 0, 1, 0, 0, 0, 0, 0],
    [1, 1, 0, 1, 0, 1, 1, 1, 0, 0],
    [1, 0, 1, 1, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 0, 0, 1, 0, 0, 0],
]
UIDS = ["a", "b", "a", "b", "a", "b"]
OUTCOMES = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]


@pytest.fixture(scope="module", autouse=True)
def registered():
    cv.register_all()
    yield
    cv.unpatch_compute_advantage()


def agent_loop_batch(seed: int = 0, *, values: bool = False, turn_scores: list | None = None) -> DataProto:
    """A batch as verl's agent loop leaves it: the outcome on each row's last policy token, per-turn scores and the
    anchor of each turn in non_tensor_batch (object arrays of per-row lists)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor(MASKS, dtype=torch.float32)
    runs = canonrl.steps.mask_run_ids(mask)
    turns = (runs.amax(1) + 1).tolist()
    last = torch.where(mask > 0, torch.arange(mask.shape[1]), -1).amax(1)
    rewards = torch.zeros_like(mask)
    rewards[torch.arange(len(MASKS)), last] = torch.tensor(OUTCOMES)
    scores = turn_scores or [torch.rand(n, generator=g).round(decimals=1).tolist() for n in turns]
    anchors = [[f"s{int(x)}" for x in torch.randint(0, 3, (n,), generator=g)] for n in turns]
    tensors = {"token_level_rewards": rewards, "response_mask": mask}
    if values:
        tensors["values"] = torch.rand(mask.shape, generator=g)
    non_tensors = {"uid": np.array(UIDS, dtype=object)}
    non_tensors["turn_scores"] = np.empty(len(MASKS), dtype=object)
    non_tensors["anchor_obs"] = np.empty(len(MASKS), dtype=object)
    for row in range(len(MASKS)):
        non_tensors["turn_scores"][row] = scores[row]
        non_tensors["anchor_obs"][row] = anchors[row]
    return DataProto.from_dict(tensors=tensors, non_tensors=non_tensors)


def direct(name: str, data: DataProto, **params) -> torch.Tensor:
    fields = {"rewards": torch.tensor(OUTCOMES), "group": UIDS, "mask": data.batch["response_mask"],
              "token_rewards": data.batch["token_level_rewards"], "turn_ids": "mask_runs",
              "step_rewards": [list(x) for x in data.non_tensor_batch["turn_scores"]],
              "anchor": [list(x) for x in data.non_tensor_batch["anchor_obs"]]}  # fmt: skip
    return canonrl.get_estimator(name, **params).compute_with_returns(**fields)


def algo(**extra):
    return OmegaConf.create({"adv_estimator": "x", "norm_adv_by_std_in_grpo": True, **extra})


@pytest.mark.parametrize("name", ["gigpo", "trloo", "matchtir", "srgpo", "mapo_dialogue"])
def test_a_step_estimator_in_the_agent_loop_layout_equals_the_library(name, patched):
    data = agent_loop_batch(seed=1)
    expected, _ = direct(name, data)
    out = ray_trainer.compute_advantage(data, adv_estimator=name, config=algo())
    torch.testing.assert_close(out.batch["advantages"], expected, atol=ATOL, rtol=ATOL)
    assert (out.batch["advantages"][data.batch["response_mask"] == 0] == 0).all()


def test_hyperparameters_reach_a_step_estimator(patched):
    data = agent_loop_batch(seed=2)
    expected, _ = direct("gigpo", data, gamma=0.95, mode="mean_std_norm")
    out = ray_trainer.compute_advantage(data, adv_estimator="gigpo", config=algo(gigpo={"gamma": 0.95, "mode": "mean_std_norm"}))
    torch.testing.assert_close(out.batch["advantages"], expected, atol=ATOL, rtol=ATOL)


def test_gae_with_verl_critic_values_returns_real_targets(patched):
    data = agent_loop_batch(seed=3, values=True)
    out = ray_trainer.compute_advantage(data, adv_estimator="canonrl_gae", config=algo(gae={"gamma": 1.0, "lam": 0.95}))
    expected, returns = canonrl.get_estimator("gae", lam=0.95).compute_with_returns(
        rewards=torch.tensor(OUTCOMES), group=UIDS, mask=data.batch["response_mask"],
        token_rewards=data.batch["token_level_rewards"], values=data.batch["values"],
    )  # fmt: skip
    torch.testing.assert_close(out.batch["advantages"], expected, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(out.batch["returns"], returns, atol=ATOL, rtol=ATOL)
    assert not torch.allclose(out.batch["returns"], out.batch["advantages"])  # the critic's targets, not A again


def test_turn_scores_that_do_not_match_the_turns_name_the_rows(patched):
    scores = [[0.1, 0.2, 0.3], [0.1], [0.2, 0.3], [0.1, 0.2, 0.3], [0.5, 0.5], [0.1, 0.2]]  # row 1 has 2 turns
    data = agent_loop_batch(turn_scores=scores)
    with pytest.raises(ValueError, match=r"step_rewards.*\b1\b") as caught:
        ray_trainer.compute_advantage(data, adv_estimator="trloo", config=algo())
    assert "\n" not in str(caught.value)


def test_without_the_patch_a_step_estimator_says_how_to_get_its_turns():
    assert not cv.is_patched()
    with pytest.raises(ValueError, match="patch_compute_advantage") as caught:
        ray_trainer.compute_advantage(agent_loop_batch(), adv_estimator="gigpo", config=algo())
    assert "\n" not in str(caught.value)


def test_a_trainer_that_imported_the_dispatcher_by_name_before_the_patch_gets_it_too():
    """verl's separation trainer (base of the fully-async and one-step-off-policy trainers) binds
    ``compute_advantage`` at import; a patch applied after that import must still reach its advantage step."""
    from verl.experimental.separation import ray_trainer as separation

    assert not cv.is_patched() and not getattr(separation.compute_advantage, "canonrl_patched", False)
    cv.patch_compute_advantage()
    try:
        assert separation.compute_advantage is ray_trainer.compute_advantage  # the patched one
        t = object.__new__(separation.SeparateRayPPOTrainer)
        data = agent_loop_batch(seed=5)
        t.metrics, t.timing_raw, t.reward_extra_infos_dict = {}, {}, {}
        t.reward_tensor = data.batch["token_level_rewards"]
        t.config = OmegaConf.create({"algorithm": {"adv_estimator": "trloo", "use_kl_in_reward": False, "gamma": 1.0,
                                                   "lam": 1.0}, "actor_rollout_ref": {"rollout": {"n": 3}}})  # fmt: skip
        out = t._fit_compute_advantage(data)
        torch.testing.assert_close(out.batch["advantages"], direct("trloo", data)[0], atol=ATOL, rtol=ATOL)
    finally:
        cv.unpatch_compute_advantage()
    assert not getattr(separation.compute_advantage, "canonrl_patched", False)  # undone everywhere


def multi_session_batch(seed: int = 4) -> tuple[DataProto, list[str]]:
    """A v1 multi-turn batch: 2 prompts x 3 sessions, each session 1-3 outputs (turn rows), keys uid_session_index;
    the rows of one session end with the same reward, which only its final output's statistics should count."""
    g = torch.Generator().manual_seed(seed)
    keys, rewards = [], []
    for uid in ("p0", "p1"):
        for session in range(3):
            outcome = float(torch.randint(0, 2, (1,), generator=g))
            for index in range(int(torch.randint(1, 4, (1,), generator=g))):
                keys.append(f"{uid}_{session}_{index}")
                rewards.append(outcome)
    order = torch.randperm(len(keys), generator=g).tolist()  # rows interleaved, as TransferQueue may return them
    keys, rewards = [keys[i] for i in order], [rewards[i] for i in order]
    T = 5
    mask = torch.ones(len(keys), T)
    token_rewards = torch.zeros(len(keys), T)
    token_rewards[:, -1] = torch.tensor(rewards)
    uids = np.array([key.split("_")[0] for key in keys], dtype=object)
    return DataProto.from_dict(tensors={"token_level_rewards": token_rewards, "response_mask": mask},
                               non_tensors={"uid": uids}), keys  # fmt: skip


def test_multi_turn_v1_batches_group_sessions_not_turn_rows(patched):
    from verl.trainer.ppo.v1 import trainer_base, utils

    assert trainer_base.compute_advantage_for_multi_trajectories is utils.compute_advantage_for_multi_trajectories
    data, keys = multi_session_batch()
    final, slot = cv.final_session_rows(keys)
    rewards = data.batch["token_level_rewards"].sum(-1)
    uids = list(data.non_tensor_batch["uid"])
    per_session = canonrl.advantages("rloo", rewards=rewards[final], group=[uids[r] for r in final],
                                     mask=torch.ones(len(final), 1))[:, 0]  # fmt: skip
    out = utils.compute_advantage_for_multi_trajectories(data, keys, "canonrl_rloo", config=algo())
    torch.testing.assert_close(out.batch["advantages"], per_session[torch.tensor(slot)][:, None].expand(-1, 5))
    # every turn row in the statistics, as verl does for estimators other than its GRPO, when asked
    data, keys = multi_session_batch()
    out = utils.compute_advantage_for_multi_trajectories(data, keys, "canonrl_rloo",
                                                         config=algo(canonrl_multi_turn_rows="all"))  # fmt: skip
    all_rows = canonrl.advantages("rloo", rewards=rewards, group=uids, mask=data.batch["response_mask"])
    torch.testing.assert_close(out.batch["advantages"], all_rows)


def test_final_session_rows_by_hand():
    final, slot = cv.final_session_rows(["a_0_1", "a_0_0", "b_0_0", "a_1_0", "a_0_2"])
    assert final == [4, 2, 3] and slot == [0, 0, 1, 2, 0]
    with pytest.raises(ValueError, match="not verl's"):
        cv.final_session_rows(["a0"])


def hadw_batch(seed: int) -> DataProto:
    g = torch.Generator().manual_seed(seed)
    rewards = torch.zeros(8, 4)
    rewards[:, -1] = torch.randint(0, 2, (8,), generator=g).float()
    uids = np.array([f"q{seed}_{i // 4}" for i in range(8)], dtype=object)
    return DataProto.from_dict(tensors={"token_level_rewards": rewards, "response_mask": torch.ones(8, 4)},
                               non_tensors={"uid": uids})  # fmt: skip


def test_a_stateful_estimator_resumes_with_the_verl_checkpoint(patched, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    for cls in (ray_trainer.RayPPOTrainer, PPOTrainer):  # both trainers save and load the states
        assert cls._save_checkpoint.canonrl_patched and cls._load_checkpoint.canonrl_patched
    monkeypatch.setattr(adapter, "_ESTIMATORS", {})
    monkeypatch.setattr(adapter, "_HYPERPARAMETERS", {})
    config = OmegaConf.create({"trainer": {"default_local_dir": str(tmp_path), "resume_mode": "auto"}})
    trainer = SimpleNamespace(config=config, global_steps=2)

    def advantages(seed: int) -> torch.Tensor:
        return ray_trainer.compute_advantage(hadw_batch(seed), adv_estimator="hadw", config=algo()).batch["advantages"]

    advantages(1), advantages(2)  # HA-DW's anchor moves with every batch
    save_with_checkpoint(lambda self: None)(trainer)
    assert (tmp_path / "global_step_2" / cv.ESTIMATOR_STATE_FILE).is_file()
    expected = advantages(3)
    # a new process: no estimator yet; verl's load sets global_steps, the wrapper restores the states
    monkeypatch.setattr(adapter, "_ESTIMATORS", {})
    monkeypatch.setattr(adapter, "_HYPERPARAMETERS", {})
    fresh = advantages(3)
    monkeypatch.setattr(adapter, "_ESTIMATORS", {})
    monkeypatch.setattr(adapter, "_HYPERPARAMETERS", {})
    load_with_checkpoint(lambda self: setattr(self, "global_steps", 2))(SimpleNamespace(config=config, global_steps=0))
    torch.testing.assert_close(advantages(3), expected)
    assert not torch.allclose(fresh, expected)  # the restored anchor is what makes them equal


def test_canonrls_v1_trainers_save_and_restore_the_states_without_the_patch(tmp_path, monkeypatch):
    """CanonrlAdvantageStep (the base of canonrl_sync, ...) wraps its verl trainer's own checkpoint methods."""
    from canonrl.integrations.verl.v1 import CanonrlAdvantageStep

    class VerlTrainer:  # stands in for verl's trainer: its checkpoint methods, as verl runs them
        def _save_checkpoint(self):
            self.saved = True

        def _load_checkpoint(self):
            self.global_steps = 2  # verl found global_step_2 and resumed from it

    trainer_cls = type("Trainer", (CanonrlAdvantageStep, VerlTrainer), {})
    assert not cv.is_patched()
    monkeypatch.setattr(adapter, "_ESTIMATORS", {})
    monkeypatch.setattr(adapter, "_HYPERPARAMETERS", {})
    config = OmegaConf.create({"trainer": {"default_local_dir": str(tmp_path), "resume_mode": "auto"}})
    saving = object.__new__(trainer_cls)
    saving.config, saving.global_steps = config, 2

    def advantages(seed: int) -> torch.Tensor:
        return cv.canonrl_compute_advantage(hadw_batch(seed), "hadw", config=algo()).batch["advantages"]

    advantages(1), advantages(2)
    saving._save_checkpoint()
    assert saving.saved and (tmp_path / "global_step_2" / cv.ESTIMATOR_STATE_FILE).is_file()
    expected = advantages(3)
    monkeypatch.setattr(adapter, "_ESTIMATORS", {})
    monkeypatch.setattr(adapter, "_HYPERPARAMETERS", {})
    resuming = object.__new__(trainer_cls)
    resuming.config, resuming.global_steps = config, 0
    resuming._load_checkpoint()
    torch.testing.assert_close(advantages(3), expected)
