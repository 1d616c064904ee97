"""Transcription of the official TRLOO (Dr. Kernel) advantage code, used only as a test oracle.

Source: repository ``hkust-nlp/KernelGYM``, commit ``3a84417f8c0efaadb215ef638b37d12e71ed20f3``:

* ``drkernel/verl_patch/trainer/code/ppo/core_algos.py``: ``compute_multi_turn_returns`` and
  ``compute_multi_turn_rloo_outcome_advantage`` (the TRLOO advantage itself);
* ``drkernel/kernel/kernel_trainer.py``: ``compute_multi_turn_advantage`` (branch ``adv_estimator == "trloo"``,
  which calls the function above with ``gamma=algorithm.gamma`` and the default ``epsilon``), and the two helpers
  the fit loop applies before it, ``apply_loss_mask_to_masks`` and ``apply_loss_mask_to_rewards``
  (Apache-2.0, (c) ByteDance / the KernelGYM authors).

The control flow, the Python loops and dicts, the float32 arithmetic (``returns * n / (n - 1) - mean * n / (n - 1)``
in that order, ``torch.mean(torch.tensor(list))``) are kept as they are, so the official numbers, float32
rounding included, are reproduced bit for bit. Nothing is vectorized or fixed. See
../../shared/specs/finegrained-estimators.md §7 and steps.md §4, §8.

Changes made, and only these:

* ``compute_multi_turn_rloo_outcome_advantage`` -> ``trloo_advantage``: same arguments, same order, same defaults
  (``gamma=1.0``, ``epsilon=1e-6``; ``epsilon`` is unused by the official code too). The DataProto fields the
  trainer passes (``token_level_rewards``, ``response_mask`` as ``eos_mask``, ``loss_mask``, ``turn_indices``,
  ``non_tensor_batch["uid"]`` as ``index``) are plain arguments here, as they already were in the official
  function. Docstring rewritten.
* ``compute_multi_turn_returns``: verbatim.
* ``apply_loss_mask_to_masks`` / ``apply_loss_mask_to_rewards`` (which mutate a DataProto in place) ->
  ``apply_loss_mask_like_trainer``, a pure function on plain tensors that returns the masked
  ``(token_level_rewards, response_mask)``; same arithmetic (``response_mask * loss_mask[:, None]``,
  ``rewards * loss_mask[:, None].to(rewards.dtype)``), the 1-D check kept. The trainer's order is:
  ``apply_loss_mask_to_masks`` right after ``compute_response_mask``, later ``apply_loss_mask_to_rewards``
  (twice, idempotent), then ``compute_multi_turn_advantage``. It is not called by ``trloo_advantage``; call it
  first to reproduce the trainer path.
* Not transcribed (off in the TRLOO scripts): ``reward_shaping`` (raises for trloo), ``use_multi_prompt_mvu``,
  ``batch_std`` (``apply_batch_standardization``, default ``BATCH_STD=False`` in
  ``drkernel/kernel/scripts/rl/train_rl_common.sh``), the ``adv_by_last_turn=True`` path (which does not use
  TRLOO), ``pad_dataproto_to_divisor`` and the metric-only ``compute_rloo_advantages_for_metric_computation``.

Input conventions the official code assumes (not changed here):

* **Layout: one row per (trajectory, turn)**, laid out as a dense grid
  ``[traj0 turn0, traj0 turn1, ..., traj0 turn(max_turns-1), traj1 turn0, ...]``; ``scores.reshape(-1, max_turns)``
  must be valid (B divisible by ``max_turns``). The return recursion runs over the **grid columns**, not over
  ``turn_indices``: row ``k*max_turns + t`` is treated as turn ``t`` of trajectory ``k``, whatever its
  ``turn_indices``. Trajectories shorter than ``max_turns`` fill the rest of their block with padding rows.
* A row's turn reward is ``token_level_rewards[i].sum()`` (over all columns, not masked by ``eos_mask``).
* **Padding rows**: ``turn_indices[i] == -1`` or ``loss_mask[i] == 0`` -> left out of every group, advantage 0.
  They still feed the returns of earlier grid cells through their reward (the official trainer zeroes the
  rewards of ``loss_mask == 0`` rows beforehand, see ``apply_loss_mask_like_trainer``).
* **Group key** ``(index[i], turn_indices[i].item())`` -- prompt uid and the *recorded* turn index.
* Group of n >= 2: ``A = G * n / (n - 1) - mean(G_group) * n / (n - 1)`` with ``mean`` of float32 values; a
  singleton keeps ``A = G`` (no baseline, no std). No std anywhere.
* Output: advantages and returns broadcast to every column and multiplied by ``eos_mask``.
"""

from collections import defaultdict

import numpy as np
import torch


def compute_multi_turn_returns(scores, gamma, max_turns):

    with torch.no_grad():
        shaped_scores = scores.reshape(-1, max_turns)

        returns = torch.zeros_like(shaped_scores)

        for i in reversed(range(max_turns)):
            if i == max_turns - 1:
                returns[:, i] = shaped_scores[:, i]
            else:
                returns[:, i] = shaped_scores[:, i] + gamma * returns[:, i + 1]

        returns = returns.reshape(-1)
    return returns


def apply_loss_mask_like_trainer(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                                 loss_mask: torch.Tensor):
    """What ``kernel_trainer.py`` does to the batch before the advantage (``apply_loss_mask_to_masks`` then
    ``apply_loss_mask_to_rewards``), on plain tensors.

    Args:
        token_level_rewards: [B, T] float.
        response_mask: [B, T] (the official ``response_mask`` = last T columns of ``attention_mask``).
        loss_mask: [B] row-level mask (0 for padding turns).

    Returns:
        (token_level_rewards * loss_mask[:, None], response_mask * loss_mask[:, None]).
    """
    if loss_mask.dim() != 1:
        raise ValueError(
            f"Expected `loss_mask` to be 1-D, got shape {tuple(loss_mask.shape)}"
        )
    # apply_loss_mask_to_masks
    response_mask = response_mask * loss_mask.unsqueeze(1)
    # apply_loss_mask_to_rewards
    mask = loss_mask.unsqueeze(1)
    token_level_rewards = token_level_rewards * mask.to(token_level_rewards.dtype)
    return token_level_rewards, response_mask


def trloo_advantage(
    token_level_rewards: torch.Tensor,
    eos_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    turn_indices: torch.Tensor,
    index: np.ndarray,
    max_turns: int,
    gamma: float = 1.0,
    epsilon: float = 1e-6,
):
    """Official ``compute_multi_turn_rloo_outcome_advantage`` (TRLOO): turn-aware REINFORCE leave-one-out over
    rows with the same prompt uid, the same turn index and ``loss_mask == 1``.

    Args:
        token_level_rewards: [B, T] float32; the turn reward of row i is ``token_level_rewards[i].sum()``.
            B = (number of trajectories) * max_turns, rows ordered trajectory-major, turn-minor.
        eos_mask: [B, T] response mask (the trainer passes ``response_mask``, already multiplied by loss_mask).
        loss_mask: [B] row-level mask (tensor; ``not loss_mask[i]`` is tested).
        turn_indices: [B] int tensor, turn index of each row, -1 for padding rows.
        index: [B] np.ndarray (dtype object) of prompt group ids (``uid``), hashable.
        max_turns: grid width (``MAX_TURN``, 3 in the Dr. Kernel scripts).
        gamma: turn-level discount (``algorithm.gamma``; 1.0 in the scripts).
        epsilon: unused (as in the official code).

    Returns:
        advantages: [B, T] float32, the row's scalar advantage times ``eos_mask``.
        returns: [B, T] float32, the row's return-to-go over the grid times ``eos_mask``.
    """
    response_length = token_level_rewards.shape[-1]
    scores = token_level_rewards.sum(dim=-1)

    returns = compute_multi_turn_returns(scores, gamma, max_turns)

    id2return = defaultdict(list)
    id2mean = {}

    with torch.no_grad():
        bsz = returns.shape[0]

        advantages = torch.zeros_like(returns)

        for i in range(bsz):
            if turn_indices[i].item() == -1 or not loss_mask[i]:
                continue
            idx = (index[i], turn_indices[i].item())
            id2return[idx].append(returns[i])

        for idx in id2return:
            if len(id2return[idx]) == 1:
                id2mean[idx] = torch.tensor(0.0)
            elif len(id2return[idx]) > 1:
                id2mean[idx] = torch.mean(torch.tensor(id2return[idx]))
            else:
                raise ValueError(f"no score in prompt index: {idx}")

        for i in range(bsz):
            if turn_indices[i].item() == -1 or not loss_mask[i]:
                continue
            idx = (index[i], turn_indices[i].item())
            response_num = len(id2return[idx])
            if response_num > 1:
                advantages[i] = returns[i] * response_num / (response_num - 1) - id2mean[idx] * response_num / (
                    response_num - 1
                )
            else:
                advantages[i] = returns[i]

        advantages = advantages.unsqueeze(-1).tile([1, response_length]) * eos_mask
        returns = returns.unsqueeze(-1).tile([1, response_length]) * eos_mask
        return advantages, returns
