"""Transcription of the official MARS (MARSHAL) advantage code, used only as a test oracle.

Source: repository ``thu-nics/MARS`` (a fork of alibaba/ROLL), commit ``5979f75c8fa5354356a461805ed0a984cf3b2dfd``:

* ``roll/utils/functionals.py``: ``masked_mean``, ``masked_var``, ``masked_whiten``, ``compute_reinforce_return``,
  ``normalize_unique_values``, ``normalize_unique_values_by_player``, ``score_normalize``,
  ``reward_normalize_by_player``, ``reward_postprocess_agentic``, ``compute_advantage``;
* ``roll/pipeline/agentic/agentic_pipeline.py`` (the ``adv`` block of ``run``, about lines 225-285): group the batch
  by ``reward_normalization.grouping``, per group ``token_level_rewards = scores`` and
  ``reward_postprocess_agentic``, concat, restore the batch order, then ``compute_advantage`` on the whole batch;
* ``roll/distributed/scheduler/protocol.py``: ``DataProto.group_by`` (groups keyed by ``str(value)``, in order of
  first appearance, rows in batch order);
* ``roll/agentic/rollout/env_manager.py::get_masks_and_scores`` (documented below, not transcribed);
* defaults from ``examples/tictactoe/agentic_val_tictactoe_selfplay.yaml`` (Apache-2.0, (c) Alibaba / the MARS
  authors).

The control flow, the Python loops and dicts, the float32 arithmetic, ``masked_mean``'s ``+ 1e-8``,
``masked_var``'s Bessel factor and its raises, ``torch.rsqrt(var + 1e-8)``, ``torch.unique`` and the
``.item()`` value mapping are kept as they are, so the official numbers, float32 rounding quirks included
(steps.md §5.2), are reproduced bit for bit. Nothing is vectorized or fixed. See
../../shared/specs/finegrained-estimators.md §4 and steps.md §5.2, §8.

Changes made, and only these:

* New entry point ``mars_advantage`` = the pipeline's ``adv`` block with plain arguments instead of a DataProto and
  ``pipeline_config``: ``scores`` (``batch["scores"]``), ``turn_end_positions``, ``response_mask`` (full length),
  ``group_ids``, ``tags``; config fields become keyword arguments with the self-play config's values as defaults.
  ``DataProto.group_by`` + ``DataProto.concat`` + ``reorder(argsort(prompt_id))`` are replaced by an equivalent
  loop: rows of each group (same ``str(tag)``, groups in order of first appearance) are gathered with an index
  tensor in batch order, post-processed, and written back to their original rows. ``tags=None`` means
  ``grouping: batch`` (one group, the whole batch). Grouping by a tensor field is not supported.
* ``reward_postprocess_agentic`` -> ``reward_postprocess_agentic`` on plain tensors, ``use_turn_scores=True`` branch
  only (the self-play configs; the ``False`` branch needs ``expand_to_token_level``, i.e. attention mask and
  position ids). Removed: the metrics dict and ``compute_clip_fraction`` (metrics only), the
  ``add_token_level_kl`` branch (default False) and its ``kl_ctrl``.
* ``score_normalize`` / ``reward_normalize_by_player``: ``rn_cfg`` -> ``method``; ``data`` -> ``group_ids``
  (``None`` behaves like the missing key, ``len([]) == 0``). The ``running`` method (stateful ``RunningMoments``
  across training steps) is not supported: it raises ``NotImplementedError``; ``running_ctrl`` removed.
* ``normalize_unique_values_by_player``: ``data`` -> ``group_ids`` (same ``None`` convention).
* ``compute_advantage``: ``data`` -> plain ``token_level_rewards`` and ``response_mask`` (required; the official
  default is ``data.batch["response_mask"][:, 1:]``, which ``mars_advantage`` passes) and ``group_ids``; returns
  ``(advantages, returns)`` instead of writing them into the batch; ``data.batch["token_level_rewards"]`` /
  ``["raw_advantages"]`` / ``["values"]`` writes and the advantage-clip metric removed; the ``gae`` estimator (needs
  a critic's values) raises ``NotImplementedError``.
* Imports: only torch/numpy/stdlib (no DataProto, config classes, logger, TensorDict).

Input conventions the official code assumes (not changed here):

* **Layout: one row per (game, player)**: the player's whole multi-turn chat (Qwen template, right-padded to
  ``sequence_length``) is one row of length L; all these tensors cover the *full* sequence (prompt included) and
  the code uses columns ``1:`` (``token_level_rewards = rewards[:, 1:]``, ``response_mask[:, 1:]``), so the
  outputs are [B, L-1]. Column 0 is the first prompt token; to feed response-aligned [B, T] tensors, prepend a
  zero / False column.
* ``get_masks_and_scores`` (``use_turn_scores=True``) writes turn k's score on the ``<|im_end|>`` of assistant turn
  k and sets ``turn_end_positions`` there (on the row's last unpadded token when that turn has no ``<|im_end|>``);
  with ``enable_response_mask: True`` the ``response_mask`` is 1 on assistant tokens after the
  ``<|im_start|>assistant\\n`` header, ``<|im_end|>`` included, and 0 on system/user/env tokens and padding.
* Players come from the ``group_ids`` suffix ``_p0`` / ``_p1`` (``group_id.split("_p")[-1]``); a non-str id or one
  without ``_p`` counts as player 0; any other suffix (``_p2``) belongs to no player: its rewards are *not*
  normalised (kept raw at every position) and its advantages skip the distinct-value step.
* Reward centring (``method: mean``) per (str(tag), player) over the ``turn_end_positions`` entries:
  ``masked_mean`` = sum / (count + 1e-8), then ``x_norm * mask`` (0 off the turn ends). ``masked_var`` (unbiased)
  is computed even for ``mean`` and **raises ValueError when a (tag, player) has exactly one turn end** (or none).
* Returns: ``compute_reinforce_return`` = reverse cumulative sum over **all** L-1 columns, gamma 1, of
  ``token_level_rewards * response_mask``; every token (prompt/env tokens included) gets the return of the next
  reward at or after it; tokens after a row's last turn end get 0.
* ``whiten_rewards`` (True in the shipped config) whitens the token rewards over the response mask *before* that
  mask is applied: every response token, not only turn ends, gets ``-mean * rsqrt(var + 1e-8)``, so returns drift
  within a turn and the set of distinct values becomes float-fragile (steps.md §5.2).
* ``advantage_norm: mean``: per player over the **whole batch** (all tags), the distinct values
  (``torch.unique``) of that player's advantage tensor -- **all** L-1 columns, prompt/env tokens and trailing zeros
  included -- are centred by their unweighted mean (``mean_std`` also divides by unbiased std + 1e-6); one distinct
  value, or std == 0, gives all zeros.
* ``whiten_advantages``: ``masked_whiten`` over the response mask of the whole batch, unbiased variance,
  ``rsqrt(var + 1e-8)``; raises if the batch has a single response token. Then ``* response_mask``; returned
  ``returns`` are the raw reinforce returns, **not** masked.
"""

from collections import defaultdict

import numpy as np
import torch


# ---------------------------------------------------------------------------------------------------------------
# roll/utils/functionals.py helpers (verbatim)
# ---------------------------------------------------------------------------------------------------------------

def masked_mean(tensor: torch.Tensor, mask: torch.Tensor, dim: int = None) -> torch.Tensor:
    if dim is not None:
        mask_sum = mask.sum(axis=dim)
        return torch.where(mask_sum > 0, (tensor * mask).sum(axis=dim) / (mask_sum + 1e-8), torch.zeros_like(mask_sum))
    else:
        return (
            (tensor * mask).sum() / (mask.sum() + 1e-8) if mask.sum() > 0 else torch.tensor(0.0, device=tensor.device)
        )


def masked_var(values, mask, unbiased=True):
    """Compute variance of tensor with masked values."""
    mean = masked_mean(values, mask)
    centered_values = values - mean
    variance = masked_mean(centered_values**2, mask)
    if unbiased:
        mask_sum = mask.sum()
        if mask_sum == 0:
            raise ValueError("At least one element in the mask has to be 1.")
        # note that if mask_sum == 1, then there is a division by zero issue
        # to avoid it you just need to use a larger minibatch_size
        if mask_sum == 1:
            raise ValueError("The sum of the mask is one, which can cause a division by zero.")
        bessel_correction = mask_sum / (mask_sum - 1)
        variance = variance * bessel_correction
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True):
    """Whiten values with masked values."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def compute_reinforce_return(token_level_rewards: torch.Tensor, gamma: torch.Tensor, lambd: torch.Tensor):
    with torch.no_grad():
        advantages_reversed = []
        gen_len = token_level_rewards.shape[-1]
        cumulative_reward = 0
        for t in reversed(range(gen_len)):
            local_reward = token_level_rewards[:, t] if t < gen_len else 0.0
            cumulative_reward = local_reward + gamma * cumulative_reward
            advantages_reversed.append(cumulative_reward)
        advantages = torch.stack(advantages_reversed[::-1], dim=1)
        returns = advantages
    return advantages, returns


def normalize_unique_values(tensor: torch.Tensor, mode="mean") -> torch.Tensor:
    """Centre (mode "mean") or z-score (mode "mean_std") the set of distinct values of ``tensor`` and map every
    entry to its distinct value's normalised value. E.g. [1, 1, 1, 2, 2, 3, 3, 3, 3] -> [-1, -1, -1, 0, 0, 1, 1, 1, 1]."""
    with torch.no_grad():
        # all distinct values
        unique_values = torch.unique(tensor)

        # a single distinct value: zeros
        if len(unique_values) == 1:
            return torch.zeros_like(tensor)

        # normalise the distinct values: subtract the mean, divide by the std
        unique_mean = unique_values.mean()
        unique_std = unique_values.std()

        if unique_std == 0:
            # std 0: all values equal, zeros
            return torch.zeros_like(tensor)

        if mode == "mean_std":
            normalized_unique = (unique_values - unique_mean) / (unique_std + 1e-6)
        elif mode == "mean":
            normalized_unique = unique_values - unique_mean
        else:
            raise ValueError(f"Invalid normalization mode: {mode}")

        # mapping: original value -> normalised value
        value_mapping = {}
        for i, original_val in enumerate(unique_values):
            value_mapping[original_val.item()] = normalized_unique[i].item()

        # result tensor
        result = torch.zeros_like(tensor)

        # replace every distinct value
        for original_val, normalized_val in value_mapping.items():
            mask = (tensor == original_val)
            result[mask] = normalized_val

        return result


def normalize_unique_values_by_player(tensor: torch.Tensor, group_ids, mode="mean") -> torch.Tensor:
    """``normalize_unique_values`` separately for the rows of player 0 and of player 1 (from ``group_ids``)."""
    # player information from group_ids  (official: data.non_tensor_batch.get("group_ids", []))
    if group_ids is None:
        group_ids = []
    if len(group_ids) == 0:
        # no group_ids: fall back to plain normalisation
        return normalize_unique_values(tensor, mode=mode)

    # player indices
    player_0_indices = []
    player_1_indices = []

    for i, group_id in enumerate(group_ids):
        if isinstance(group_id, str) and "_p" in group_id:
            player_id = group_id.split("_p")[-1]
            if player_id == "0":
                player_0_indices.append(i)
            elif player_id == "1":
                player_1_indices.append(i)
        else:
            # no player info: player 0 by default
            player_0_indices.append(i)

    # no clear player separation: fall back to plain normalisation
    if len(player_0_indices) == 0 and len(player_1_indices) == 0:
        return normalize_unique_values(tensor, mode=mode)

    # result tensor
    normalized_tensor = tensor.clone()

    # player 0 (if any)
    if len(player_0_indices) > 0:
        player_0_indices_tensor = torch.tensor(player_0_indices, dtype=torch.long)
        player_0_tensor = tensor[player_0_indices_tensor]

        player_0_normalized = normalize_unique_values(player_0_tensor, mode=mode)
        normalized_tensor[player_0_indices_tensor] = player_0_normalized

    # player 1 (if any)
    if len(player_1_indices) > 0:
        player_1_indices_tensor = torch.tensor(player_1_indices, dtype=torch.long)
        player_1_tensor = tensor[player_1_indices_tensor]

        player_1_normalized = normalize_unique_values(player_1_tensor, mode=mode)
        normalized_tensor[player_1_indices_tensor] = player_1_normalized

    return normalized_tensor


def score_normalize(x, method, mask=None) -> torch.Tensor:
    """Official ``score_normalize`` with ``rn_cfg.method`` -> ``method`` (``running`` not supported)."""
    if method == "identity" or method == "none":
        return x
    else:
        if mask is None:
            mean = x.mean()
            std = x.std()
        else:
            mean = masked_mean(x, mask)
            var = masked_var(x, mask)
            std = torch.sqrt(var)

    if method == "mean":
        x_norm = (x - mean)
    elif method == "mean_std":
        x_norm = (
            (x - mean) / (std + 1e-6)
            if std.abs().max() > 1e-6
            else torch.zeros_like(x)
        )  # stable to bf16 than x.std()
    elif method == "asym_clip":
        x_norm = (
            (x - mean) / (std + 1e-6)
            if std.abs().max() > 1e-6
            else torch.zeros_like(x)
        ).clamp(min=-1, max=3)
    elif method == "running":
        raise NotImplementedError("reward_normalization.method='running' (stateful RunningMoments) is not transcribed")
    else:
        raise ValueError(f"Invalid normalization method: {method}")
    if mask is not None:
        x_norm = x_norm * mask
    return x_norm


@torch.no_grad()
def reward_normalize_by_player(group_ids, rewards: torch.Tensor, method, mask=None):
    """Official ``reward_normalize_by_player``: ``score_normalize`` separately for player 0's and player 1's rows."""
    # player information from group_ids  (official: data.non_tensor_batch.get("group_ids", []))
    if group_ids is None:
        group_ids = []
    if len(group_ids) == 0:
        # Fall back to regular normalization if no group_ids available
        return score_normalize(rewards, method=method, mask=mask)

    # Identify player indices
    player_0_indices = []
    player_1_indices = []

    for i, group_id in enumerate(group_ids):
        if isinstance(group_id, str) and "_p" in group_id:
            player_id = group_id.split("_p")[-1]
            if player_id == "0":
                player_0_indices.append(i)
            elif player_id == "1":
                player_1_indices.append(i)
        else:
            # If no player info, assign to player 0 by default
            player_0_indices.append(i)

    # If we don't find any clear player separation, fall back to regular normalization
    if len(player_0_indices) == 0 and len(player_1_indices) == 0:
        return score_normalize(rewards, method=method, mask=mask)

    # (official: running_ctrl per player; only used by the "running" method, not transcribed)

    # Create a copy of rewards to modify
    normalized_rewards = rewards.clone()

    # Normalize player 0's rewards if any exist
    if len(player_0_indices) > 0:
        player_0_indices_tensor = torch.tensor(player_0_indices, dtype=torch.long)
        player_0_rewards = rewards[player_0_indices_tensor]
        player_0_mask = mask[player_0_indices_tensor] if mask is not None else None

        player_0_normalized = score_normalize(
            player_0_rewards,
            method=method,
            mask=player_0_mask
        )
        normalized_rewards[player_0_indices_tensor] = player_0_normalized

    # Normalize player 1's rewards if any exist
    if len(player_1_indices) > 0:
        player_1_indices_tensor = torch.tensor(player_1_indices, dtype=torch.long)
        player_1_rewards = rewards[player_1_indices_tensor]
        player_1_mask = mask[player_1_indices_tensor] if mask is not None else None

        player_1_normalized = score_normalize(
            player_1_rewards,
            method=method,
            mask=player_1_mask
        )
        normalized_rewards[player_1_indices_tensor] = player_1_normalized

    return normalized_rewards


@torch.no_grad()
def reward_postprocess_agentic(token_level_rewards, turn_end_positions, group_ids, *, method="mean",
                               separate_norm_for_selfplay=True, reward_clip=None):
    """Official ``reward_postprocess_agentic``, ``use_turn_scores=True`` branch, no token-level KL.

    Returns the new ``token_level_rewards`` ([n, L-1]: the normalised, clipped rewards without column 0)."""
    # 0. get rewards (process token_level_rewards directly if use_turn_scores is True)
    rewards = token_level_rewards.clone().detach()
    mask = turn_end_positions

    # 1. normalize (identity/mean/mean_std/asym_clip)
    if separate_norm_for_selfplay:
        rewards = reward_normalize_by_player(
            group_ids=group_ids,
            rewards=rewards,
            method=method,
            mask=mask
        )
    else:
        rewards = score_normalize(
            rewards,
            method=method,
            mask=mask,
        )

    # 2. clip
    if reward_clip:
        rewards = torch.clamp(
            rewards,
            min=-reward_clip,
            max=reward_clip,
        )

    return rewards[:, 1:]


@torch.no_grad()
def compute_advantage(
    token_level_rewards,
    response_mask,
    group_ids,
    gamma,
    lambd,
    adv_estimator,
    advantage_clip=None,
    whiten_advantages=False,
    whiten_rewards=False,
    advantage_norm=None,
):
    """Official ``compute_advantage`` on plain tensors. Returns ``(advantages, returns)``."""
    token_level_rewards = token_level_rewards.float()
    if whiten_rewards:
        token_level_rewards = masked_whiten(values=token_level_rewards, mask=response_mask)
    token_level_rewards = token_level_rewards * response_mask
    if adv_estimator == "gae":
        raise NotImplementedError("adv_estimator='gae' needs a critic's values; not transcribed")
    elif adv_estimator == "reinforce":
        advantages, returns = compute_reinforce_return(
            token_level_rewards=token_level_rewards, gamma=gamma, lambd=lambd
        )
    elif adv_estimator == "grpo":
        # NOTE: For grpo, remember to manually setting AgenticConfig.reward_normalization to mean_std
        advantages, returns = compute_reinforce_return(
            token_level_rewards=token_level_rewards, gamma=gamma, lambd=lambd
        )
    else:
        raise NotImplementedError

    # normalise all distinct values of the advantages
    if advantage_norm:
        advantages = normalize_unique_values_by_player(advantages, group_ids, mode=advantage_norm)
    if whiten_advantages:
        advantages = masked_whiten(values=advantages, mask=response_mask)
    advantages = advantages * response_mask

    if advantage_clip is not None:
        advantages = torch.clamp(advantages, min=-advantage_clip, max=advantage_clip)

    return advantages, returns


# ---------------------------------------------------------------------------------------------------------------
# agentic_pipeline.py, the "adv" block
# ---------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def mars_advantage(
    scores: torch.Tensor,
    turn_end_positions: torch.Tensor,
    response_mask: torch.Tensor,
    group_ids: np.ndarray,
    tags=None,
    *,
    gamma: float = 1.0,
    lambd: float = 0.95,
    adv_estimator: str = "reinforce",
    reward_norm_method: str = "mean",
    separate_norm_for_selfplay: bool = True,
    reward_clip=None,
    whiten_rewards: bool = True,
    advantage_norm="mean",
    whiten_advantages: bool = True,
    advantage_clip=None,
):
    """MARS advantage as the official agentic pipeline computes it (self-play config defaults).

    Args:
        scores: [B, L] float32, full-sequence token scores (``batch["scores"]``): turn k's raw score on the end
            token of the player's assistant turn k, 0 elsewhere.
        turn_end_positions: [B, L] bool, True on those turn-end tokens.
        response_mask: [B, L] bool (or 0/1), full-sequence policy-token mask (``batch["response_mask"]``); the code
            uses ``response_mask[:, 1:]``.
        group_ids: [B] np.ndarray (dtype object) of str ending in ``_p0`` / ``_p1`` (the player).
        tags: [B] np.ndarray (dtype object) of env tags (``reward_normalization.grouping: tags``), grouped by
            ``str(tag)``; None = ``grouping: batch``.
        gamma: 1.0 (config default; the self-play configs do not set it). lambd: 0.95, unused by reinforce.
        adv_estimator: "reinforce" (self-play configs) or "grpo" (same computation).
        reward_norm_method: "mean" (self-play) / "identity" / "none" / "mean_std" / "asym_clip".
        separate_norm_for_selfplay: True (self-play).
        reward_clip: None (commented out in the configs); a float clamps the normalised rewards.
        whiten_rewards: True in the shipped self-play config (schema default False).
        advantage_norm: "mean" (self-play), "mean_std" or None.
        whiten_advantages: True (self-play).
        advantage_clip: None (commented out in the configs).

    Returns:
        advantages: [B, L-1] float32 (0 where ``response_mask[:, 1:]`` is 0).
        returns: [B, L-1] float32, the raw reinforce returns (not masked, not normalised).
    """
    B = scores.shape[0]
    # DataProto.group_by(keys=grouping): str(value), groups in order of first appearance, rows in batch order.
    if tags is None:
        groups = {"default": list(range(B))}
    else:
        groups = defaultdict(list)
        for idx in range(B):
            groups[str(tags[idx])].append(idx)

    token_level_rewards = None
    for group_name, indices in groups.items():
        idx_t = torch.tensor(indices, dtype=torch.long)
        # 0. get rewards
        group_scores = scores[idx_t].clone()
        group_token_level_rewards = group_scores
        # (response_level_rewards = scores.sum(-1) + penalty: unused with use_turn_scores=True)
        # 1. postprocess rewards in group
        group_out = reward_postprocess_agentic(
            group_token_level_rewards,
            turn_end_positions[idx_t],
            None if group_ids is None else group_ids[np.asarray(indices)],
            method=reward_norm_method,
            separate_norm_for_selfplay=separate_norm_for_selfplay,
            reward_clip=reward_clip,
        )
        # DataProto.concat + reorder(argsort(prompt_id)): back to the original rows
        if token_level_rewards is None:
            token_level_rewards = torch.zeros((B,) + tuple(group_out.shape[1:]), dtype=group_out.dtype)
        token_level_rewards[idx_t] = group_out

    # 3. compute adv in the whole batch (official default response_mask = data.batch["response_mask"][:, 1:])
    return compute_advantage(
        token_level_rewards=token_level_rewards,
        response_mask=response_mask[:, 1:],
        group_ids=group_ids,
        gamma=gamma,
        lambd=lambd,
        adv_estimator=adv_estimator,
        advantage_clip=advantage_clip,
        whiten_advantages=whiten_advantages,
        whiten_rewards=whiten_rewards,
        advantage_norm=advantage_norm,
    )
