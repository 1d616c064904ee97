"""Transcription of the official GiGPO advantage code: a test oracle, and the official contender of
``canonrl bench-steps``.

Source: repository ``langfengQ/verl-agent`` (history read through the fork ``zzj1111/alfworldauto``), commit
``20bd331bdbc9026a5668e11362178e10ab7400c8``, file ``gigpo/core_gigpo.py``: functions ``to_hashable``,
``compute_step_discounted_returns``, ``compute_gigpo_outcome_advantage``, ``episode_norm_reward``,
``build_step_group`` and ``step_norm_reward`` (Apache-2.0, (c) NTU and the verl-agent team). The control flow,
the Python loops and dicts, the float32 arithmetic, ``torch.mean`` / ``torch.std`` (unbiased) and the epsilons
are kept as they are, so that the official numbers, float32 rounding quirks included, are reproduced bit for bit.
Nothing is vectorized or fixed. See ../../shared/specs/finegrained-estimators.md §2 and steps.md §5.

Changes made, and only these:

* ``compute_step_discounted_returns`` -> ``step_discounted_returns``: the verl ``DataProto`` accesses
  (``batch.non_tensor_batch['rewards' | 'traj_uid' | 'active_masks']``) are replaced by the plain arguments
  ``step_rewards``, ``traj_uid``, ``active_masks`` (wrapped in ``np.asarray``, a no-op for arrays); the output
  tensor is created on the CPU instead of on ``batch.batch['input_ids'].device``. Added keyword
  ``legacy_float64_running_return`` (default False = the literal code). The official running return
  ``traj_rewards[t] + gamma * running_return`` (``np.float32`` scalar + Python float) is float32 arithmetic under
  NumPy >= 2 (NEP 50) but float64 arithmetic, rounded to float32 only when stored, under NumPy 1.x, and
  verl-agent does not pin NumPy. True reproduces the NumPy 1.x result on any NumPy; False reproduces whatever
  the installed NumPy does (float32 under NumPy 2).
* ``compute_gigpo_outcome_advantage`` -> ``gigpo_advantage``: arguments ``enable_similarity`` and
  ``similarity_thresh`` removed, with the similarity (``difflib``) clustering branch of ``build_step_group`` and
  ``are_similar``; added argument ``compute_mean_std_cross_steps`` forwarded to ``episode_norm_reward`` (the
  official entry point never passes it, so the official behaviour is its default True); argument order puts
  ``step_advantage_w``/``mode`` before ``epsilon`` (call by keyword).
* ``build_step_group``: removed the ``summarize`` argument, the ``group_size`` bookkeeping and
  ``summarize_group_size``, and the ``print("Avg size of step-level group")`` -- all output only. The cluster
  ids are still ``uuid4`` strings; only their identity matters (dict order follows first appearance).
* ``step_norm_reward``: removed the two debugging ``print`` calls before its (unreachable) ``ValueError``.
* Docstrings shortened; removed the ``verl`` and ``difflib`` imports and unused typing imports.

Order assumptions of the official code (not changed here):

* ``step_discounted_returns`` takes the rows of one trajectory, **in batch order**, as its steps in time order
  (first to last): the return of a row is the discounted sum over the rows of its ``traj_uid`` that come after it
  in the batch. verl-agent calls it on the rollout batch (``gather_rollout_data`` appends each environment's
  active steps in time order), before ``adjust_batch`` duplicates rows and before ``_balance_batch`` reorders
  them. Duplicated rows would be treated as extra steps. ``np.unique`` needs mutually comparable uids, and every
  row of a trajectory must be active (asserted).
* ``gigpo_advantage`` depends on batch order only through float summation order inside ``torch.mean``/
  ``torch.std`` (group members are listed in batch order). In the standard trainer it runs *after*
  ``adjust_batch`` (mode "copy") and ``_balance_batch``, so duplicated rows enter both the episode and the anchor
  statistics twice.
"""

import uuid
from collections import defaultdict

import numpy as np
import torch


def to_hashable(x):
    """Convert an object into a hashable type (used for clustering/grouping)."""
    if isinstance(x, (int, float, str, bool)):
        return x
    elif isinstance(x, (np.integer, np.floating)):
        return x.item()
    elif isinstance(x, np.ndarray):
        return tuple(x.flatten())
    elif isinstance(x, (list, tuple)):
        return tuple(to_hashable(e) for e in x)
    elif isinstance(x, dict):
        return tuple(sorted((k, to_hashable(v)) for k, v in x.items()))
    else:
        raise TypeError(f"Unsupported type: {type(x)}")


def step_discounted_returns(step_rewards, traj_uid, active_masks, gamma: float, *,
                            legacy_float64_running_return: bool = False) -> torch.Tensor:
    """Official ``compute_step_discounted_returns`` (Eq. 5): per trajectory, backward discounted sum in batch
    order. Returns a float32 tensor [N] in the input row order."""
    rewards = np.asarray(step_rewards).astype(np.float32)
    traj_uids = np.asarray(traj_uid)
    active_masks = np.asarray(active_masks).astype(np.float32)
    returns_by_traj = {}
    unique_traj_uids = np.unique(traj_uids)
    for uid in unique_traj_uids:
        # Get indices for this trajectory
        traj_indices = np.where(traj_uids == uid)[0]

        # Extract rewards and masks for this trajectory
        traj_rewards = rewards[traj_indices]
        traj_active_masks = active_masks[traj_indices]
        assert traj_active_masks.all(), "active_masks should be all 1s for the same trajectory"

        # Calculate returns
        traj_returns = np.zeros_like(traj_rewards)
        running_return = 0

        # Calculate returns from the end to the start
        for t in reversed(range(len(traj_rewards))):
            if legacy_float64_running_return:
                # NumPy 1.x promotion of the official line (np.float32 scalar + Python float -> float64).
                running_return = np.float64(traj_rewards[t]) + gamma * running_return
            else:
                running_return = traj_rewards[t] + gamma * running_return
            traj_returns[t] = running_return

        # Store the results
        returns_by_traj[uid] = traj_returns

    # Recombine the returns into the original batch order
    all_returns = np.zeros_like(rewards)
    for i, uid in enumerate(traj_uids):
        traj_indices = np.where(traj_uids == uid)[0]
        idx_in_traj = np.where(traj_indices == i)[0][0]  # Find position of i in its trajectory
        all_returns[i] = returns_by_traj[uid][idx_in_traj]

    all_returns = torch.tensor(all_returns, dtype=torch.float32)
    return all_returns


def gigpo_advantage(token_level_rewards: torch.Tensor,
                    step_rewards: torch.Tensor,
                    response_mask: torch.Tensor,
                    anchor_obs: np.ndarray,
                    index: np.ndarray,
                    traj_index: np.ndarray,
                    step_advantage_w: float = 1.0,
                    mode: str = "mean_norm",
                    epsilon: float = 1e-6,
                    compute_mean_std_cross_steps: bool = True,
                    ):
    """Official ``compute_gigpo_outcome_advantage`` without the similarity option.

    token_level_rewards [N, T] (episode reward on each step row), step_rewards [N] (discounted step returns),
    response_mask [N, T], anchor_obs / index / traj_index: object arrays [N]. Returns (advantages, advantages),
    both [N, T]."""
    if mode == "mean_std_norm":
        remove_std = False
    elif mode == "mean_norm":
        remove_std = True
    else:
        raise ValueError(f"Unknown mode: {mode}")

    # Compute episode relative advantages (Eq. 3 in the paper).
    episode_advantages = episode_norm_reward(token_level_rewards, response_mask, index, traj_index, epsilon, remove_std,
                                             compute_mean_std_cross_steps)

    # Anchor state grouping (Eq. 6 in the paper).
    step_group_uids = build_step_group(anchor_obs, index)

    # Compute step relative advantages (Eq. 7 in the paper).
    step_advantages = step_norm_reward(step_rewards, response_mask, step_group_uids, epsilon, remove_std)

    # Compute joint advantages (Eq. 8 in the paper).
    scores = episode_advantages + step_advantage_w * step_advantages
    return scores, scores


def episode_norm_reward(token_level_rewards: torch.Tensor,
                        response_mask: torch.Tensor,
                        index: np.array,
                        traj_index: np.array,
                        epsilon: float = 1e-6,
                        remove_std: bool = True,
                        compute_mean_std_cross_steps: bool = True,
                        ):
    """Official ``episode_norm_reward``, unchanged."""
    response_length = token_level_rewards.shape[-1]
    scores = token_level_rewards.sum(dim=-1)

    id2score = defaultdict(list)
    id2mean = {}
    id2std = {}
    seen_pairs = set()
    with torch.no_grad():
        bsz = scores.shape[0]
        for i in range(bsz):
            if (index[i], traj_index[i]) in seen_pairs:
                continue
            id2score[index[i]].append(scores[i])
            if not compute_mean_std_cross_steps:
                seen_pairs.add((index[i], traj_index[i]))

        for idx in id2score:
            if len(id2score[idx]) == 1:
                id2mean[idx] = torch.tensor(0.0)
                id2std[idx] = torch.tensor(1.0)
            elif len(id2score[idx]) > 1:
                id2mean[idx] = torch.mean(torch.tensor(id2score[idx]))
                id2std[idx] = torch.std(torch.tensor([id2score[idx]]))
            else:
                raise ValueError(f"no score in prompt index: {idx}")
        for i in range(bsz):
            if remove_std:
                scores[i] = scores[i] - id2mean[index[i]]
            else:
                scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + epsilon)
        episode_advantages = scores.unsqueeze(-1).tile([1, response_length]) * response_mask

    return episode_advantages


def build_step_group(anchor_obs: np.array, index: np.array):
    """Official ``build_step_group`` with ``enable_similarity=False``: within each ``index`` group, cluster rows
    with identical ``to_hashable(anchor_obs)``; one uuid string per cluster."""
    # Initialize the result array with placeholder values
    step_group_uids = np.empty(len(anchor_obs), dtype=object)

    # Get unique indices
    unique_indices = np.unique(index)

    # Process each unique index
    for idx in unique_indices:
        # Get all observations for this index using np.where
        indices = np.where(index == idx)[0]
        obs_group = anchor_obs[indices]

        # Create clusters for identical observations
        clusters = defaultdict(list)
        for i, obs in enumerate(obs_group):
            clusters[to_hashable(obs)].append(indices[i])  # Store the original index position

        # Assign unique step_group_uid to each cluster
        for obs, original_indices in clusters.items():
            # Generate a UUID for this cluster
            uid = str(uuid.uuid4())

            # Assign the same step_group_uid to all elements in this cluster
            for original_idx in original_indices:
                step_group_uids[original_idx] = uid

    # Validate that all elements have been assigned a uid
    if None in step_group_uids or np.any(step_group_uids == None):  # noqa: E711
        missing_indices = np.where(step_group_uids == None)[0]  # noqa: E711
        raise ValueError(f"Failed to assign UIDs to all observations. Missing at indices: {missing_indices}")

    return step_group_uids


def step_norm_reward(step_rewards: torch.Tensor,
                     response_mask: torch.Tensor,
                     index: np.array,
                     epsilon: float = 1e-6,
                     remove_std: bool = True,
                     ):
    """Official ``step_norm_reward``, unchanged (``index`` = the anchor-group uids)."""
    response_length = response_mask.shape[-1]
    scores = step_rewards.clone()

    id2score = defaultdict(list)
    id2mean = {}
    id2std = {}

    with torch.no_grad():
        bsz = scores.shape[0]
        for i in range(bsz):
            id2score[index[i]].append(scores[i])

        for idx in id2score:
            if len(id2score[idx]) == 1:
                id2mean[idx] = torch.mean(torch.tensor(id2score[idx]))
                id2std[idx] = torch.tensor(1.0)
            elif len(id2score[idx]) > 1:
                id2mean[idx] = torch.mean(torch.tensor(id2score[idx]))
                id2std[idx] = torch.std(torch.tensor([id2score[idx]]))
            else:
                raise ValueError(f"no score in prompt index: {idx}")
        for i in range(bsz):
            if remove_std:
                scores[i] = scores[i] - id2mean[index[i]]
            else:
                scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + epsilon)
        step_advantages = scores.unsqueeze(-1).tile([1, response_length]) * response_mask

    return step_advantages
