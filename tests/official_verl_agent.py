"""Transcription of verl-agent's batch building and ``adjust_batch``: a test oracle for the row-per-step layout.

Source: repository ``langfengQ/verl-agent`` (history read through the fork ``zzj1111/alfworldauto``), commit
``20bd331bdbc9026a5668e11362178e10ab7400c8`` (Apache-2.0, (c) NTU and the verl-agent team):

* ``agent_system/multi_turn_rollout/utils.py``: ``adjust_batch`` -- transcribed as is (verl 0.9's ``DataProto``
  has the same ``select_idxs`` / ``concat`` / ``non_tensor_batch`` as verl-agent's fork of verl 0.3); the
  ``np.random`` calls take an explicit ``rng`` (``np.random.Generator``) instead of the global state.
* ``agent_system/multi_turn_rollout/rollout_loop.py``: ``TrajectoryCollector.vanilla_multi_turn_loop`` and
  ``gather_rollout_data`` -- only their bookkeeping of the ids, rewards and masks, with the model and the
  environments replaced by a scripted episode per environment (``episodes``): ``uid`` shared by ``env.rollout.n``
  consecutive environments, one ``traj_uid`` per environment, per-step ``rewards`` and ``active_masks``, the loop
  over ``env.max_steps`` steps that stops when every environment is done, and the gather that keeps the active
  steps, environment after environment, with the episode reward and length on each of them. ``collate_fn`` is
  replaced by building the ``DataProto`` directly (tensor fields stacked, the others as object arrays).
* ``agent_system/reward_manager/episode.py``: ``EpisodeRewardManager.__call__`` -- the episode reward (optionally /
  length) on the last valid response token of every step row; decoding and printing removed.
* ``verl/trainer/ppo/ray_trainer.py``: the order of the GiGPO path in ``RayPPOTrainer.fit`` (step returns on the
  rollout batch, then ``adjust_batch``, then ``_balance_batch``, then ``compute_advantage``) as
  ``official_gigpo_pipeline``; ``_balance_batch`` (a reorder by a sequence-length partition) is represented by
  its effect, a permutation of the rows. The GiGPO and HGPO functions themselves are the oracles of
  ``canonrl.reference.official_gigpo`` / ``official_hgpo``.
"""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import numpy as np
import torch
from verl import DataProto

from canonrl.reference import official_gigpo


def adjust_batch(config, data: DataProto, mode="copy", rng=None) -> DataProto:
    rng = np.random.default_rng() if rng is None else rng
    world_size = config.trainer.n_gpus_per_node * config.trainer.nnodes
    size_divisor_rollout = config.actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu * world_size
    if config.algorithm.use_kl_in_reward or config.actor_rollout_ref.actor.use_kl_loss:
        size_divisor_ref = config.actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu * world_size
    else:
        size_divisor_ref = size_divisor_rollout
    if "multi_modal_inputs" in data.non_tensor_batch:
        size_divisor_actor = config.actor_rollout_ref.actor.ppo_mini_batch_size
    else:
        size_divisor_actor = config.actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu * world_size
    size_divisor = np.lcm.reduce(np.array([size_divisor_ref, size_divisor_rollout, size_divisor_actor])).item()

    # check if the batch size is divisible by the dp size, if not, delete the last few samples to make it divisible
    bs = len(data)
    remainder = bs % size_divisor
    if remainder == 0:
        return data

    if mode == "delete":
        # Generate indices to remove, rather than indices to keep
        remove_indices = rng.choice(bs, remainder, replace=False)
        # Sort remove_indices to maintain stability when deleting
        remove_indices = np.sort(remove_indices)

        # Create a boolean mask for elements to keep
        keep_mask = np.ones(bs, dtype=bool)
        keep_mask[remove_indices] = False

        keep_mask_tensor = torch.tensor(keep_mask, dtype=torch.bool, device=data.batch["input_ids"].device)
        # Apply the mask to keep elements in their original order
        tensor_data = data.batch[keep_mask_tensor]
        non_tensor_data = {key: val[keep_mask] for key, val in data.non_tensor_batch.items()}
        adjusted_batch = DataProto(batch=tensor_data, non_tensor_batch=non_tensor_data, meta_info=data.meta_info)
        del data
    elif mode == "copy":
        to_add = size_divisor - remainder
        dup_indices = rng.choice(bs, to_add, replace=False)
        dup_proto = data.select_idxs(dup_indices)

        adjusted_batch = DataProto.concat([data, dup_proto])
    else:
        raise ValueError(f"Unsupported mode: {mode}")

    return adjusted_batch


def trainer_config(divisor: int):
    """The config fields ``adjust_batch`` reads, for a size divisor of ``divisor`` (one GPU, micro batches of it)."""
    return SimpleNamespace(
        trainer=SimpleNamespace(n_gpus_per_node=1, nnodes=1),
        algorithm=SimpleNamespace(use_kl_in_reward=False),
        actor_rollout_ref=SimpleNamespace(
            rollout=SimpleNamespace(log_prob_micro_batch_size_per_gpu=divisor),
            actor=SimpleNamespace(use_kl_loss=False, ppo_micro_batch_size_per_gpu=divisor, ppo_mini_batch_size=divisor),
            ref=SimpleNamespace(log_prob_micro_batch_size_per_gpu=divisor),
        ),
    )


def rollout(episodes, rollout_n: int, max_steps: int, *, prompt_length: int = 3, response_length: int = 4,
            normalize_by_length: bool = False) -> DataProto:  # fmt: skip
    """The batch ``TrajectoryCollector.multi_turn_loop`` returns, for scripted episodes.

    ``episodes[i]`` is environment i's episode: a list of ``(anchor_obs, reward, response_len)`` per step (the
    environment is done after its last step). Environments ``i // rollout_n`` share a ``uid``. Also applies the
    reward manager (``token_level_scores`` = ``token_level_rewards``, no KL in reward)."""
    batch_size = len(episodes)
    # vanilla_multi_turn_loop
    uid_batch = []
    for i in range(batch_size):
        if i % rollout_n == 0:
            uid = str(uuid.uuid4())
        uid_batch.append(uid)
    uid_batch = np.array(uid_batch, dtype=object)
    is_done = np.zeros(batch_size, dtype=bool)
    traj_uid = np.array([str(uuid.uuid4()) for _ in range(batch_size)], dtype=object)
    total_batch_list = [[] for _ in range(batch_size)]
    episode_lengths = np.zeros(batch_size, dtype=np.float32)
    episode_rewards = np.zeros(batch_size, dtype=np.float32)
    for _step in range(max_steps):
        active_masks = np.logical_not(is_done)
        rewards = np.zeros(batch_size, dtype=np.float32)
        dones = np.zeros(batch_size, dtype=bool)
        for i, episode in enumerate(episodes):  # the scripted envs.step(text_actions)
            anchor, reward, length = episode[min(_step, len(episode) - 1)]
            rewards[i] = reward if active_masks[i] else 0.0
            dones[i] = _step >= len(episode) - 1
            response_mask = torch.zeros(response_length)
            response_mask[:length] = 1
            total_batch_list[i].append({
                "uid": uid_batch[i], "traj_uid": traj_uid[i], "anchor_obs": anchor,
                "response_mask": response_mask,
            })  # fmt: skip
        episode_rewards[active_masks] += rewards[active_masks]
        episode_lengths[active_masks] += 1
        for i in range(batch_size):
            total_batch_list[i][-1]["rewards"] = rewards[i].item()
            total_batch_list[i][-1]["active_masks"] = bool(active_masks[i])
        is_done = np.logical_or(is_done, dones)
        if is_done.all():
            break
    # gather_rollout_data
    effective_batch = []
    for bs in range(batch_size):
        for data in total_batch_list[bs]:
            assert traj_uid[bs] == data["traj_uid"], "data is not from the same trajectory"
            if data["active_masks"]:
                data["episode_rewards"] = episode_rewards[bs]
                data["episode_lengths"] = episode_lengths[bs]
                effective_batch.append(data)
    # collate_fn, and the fields the trainer adds (prompts/responses/attention_mask stand-ins)
    n = len(effective_batch)
    response_mask = torch.stack([d["response_mask"] for d in effective_batch])
    attention_mask = torch.cat([torch.ones(n, prompt_length), response_mask], dim=1).long()
    # EpisodeRewardManager.__call__
    reward_tensor = torch.zeros(n, response_length)
    for i, d in enumerate(effective_batch):
        valid_response_length = int(attention_mask[i, prompt_length:].sum())
        score = d["episode_rewards"] / d["episode_lengths"] if normalize_by_length else d["episode_rewards"]
        reward_tensor[i, valid_response_length - 1] = torch.tensor(score, dtype=torch.float32)
    tensors = {
        "input_ids": torch.zeros(n, prompt_length + response_length, dtype=torch.long),
        "responses": torch.zeros(n, response_length, dtype=torch.long),
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "token_level_scores": reward_tensor,
        "token_level_rewards": reward_tensor.clone(),
    }
    keys = ("uid", "traj_uid", "anchor_obs", "rewards", "active_masks", "episode_rewards", "episode_lengths")
    non_tensors = {}
    for key in keys:
        column = np.empty(n, dtype=object)
        column[:] = [d[key] for d in effective_batch]
        non_tensors[key] = column
    return DataProto.from_dict(tensors=tensors, non_tensors=non_tensors)


def official_gigpo_pipeline(data: DataProto, config, gamma: float, *, step_advantage_w: float = 1.0,
                            mode: str = "mean_norm", rng=None, permutation=None):  # fmt: skip
    """The standard trainer's GiGPO path: ``compute_step_discounted_returns`` on the rollout batch (into
    ``batch["step_rewards"]``), ``adjust_batch``, ``_balance_batch`` (``permutation``: a reorder), then the GiGPO
    dispatch of ``compute_advantage``. Returns the final batch with ``advantages``."""
    n = len(data)
    data.batch["step_rewards"] = official_gigpo.step_discounted_returns(
        data.non_tensor_batch["rewards"],
        data.non_tensor_batch["traj_uid"],
        data.non_tensor_batch["active_masks"],
        gamma,
    )[:n]
    data = adjust_batch(config, data, rng=rng)
    if permutation is not None:
        data.reorder(torch.as_tensor(permutation))
    advantages, returns = official_gigpo.gigpo_advantage(
        data.batch["token_level_rewards"], data.batch["step_rewards"], data.batch["response_mask"],
        data.non_tensor_batch["anchor_obs"], data.non_tensor_batch["uid"], data.non_tensor_batch["traj_uid"],
        step_advantage_w=step_advantage_w, mode=mode,
    )  # fmt: skip
    data.batch["advantages"] = advantages
    data.batch["returns"] = returns
    return data
