"""Transcription of the official HGPO advantage code: a test oracle, and the official contender of
``canonrl bench-steps``.

Source: repository ``langfengQ/verl-agent`` (history read through the fork ``zzj1111/alfworldauto``), commit
``20bd331bdbc9026a5668e11362178e10ab7400c8``, file ``recipe/hgpo/core_hgpo.py``: functions ``to_hashable``,
``compute_step_discounted_returns``, ``compute_hgpo_outcome_advantage``, ``trajectory_advantages`` and
``hgpo_advantage_estimate`` (Apache-2.0, the verl-agent team). The control flow, the Python loops and dicts,
the float32 arithmetic, ``mean`` / ``std(unbiased=False)``, the epsilons and the order of operations are kept as
they are, so that the official numbers, float32 rounding quirks included, are reproduced bit for bit. Nothing is
vectorized or fixed. See ../../shared/specs/finegrained-estimators.md §3 and steps.md §5.

Changes made, and only these:

* ``compute_step_discounted_returns`` -> ``step_discounted_returns``: the verl ``DataProto`` accesses are replaced
  by the plain arguments ``step_rewards``, ``traj_uid``, ``active_masks`` (wrapped in ``np.asarray``, a no-op for
  arrays); the tensor is made on the CPU instead of ``batch.batch['input_ids'].device``; the
  ``print("compute_step_discounted_returns")`` is removed; keyword ``legacy_float64_running_return`` added (default
  False = the literal code), as in official_gigpo.py: the official line ``traj_rewards[t] + gamma *
  running_return`` runs in float32 under NumPy >= 2 (NEP 50) and in float64 (rounded to float32 on store) under
  NumPy 1.x; verl-agent does not pin NumPy. The function is otherwise identical to GiGPO's.
* ``compute_hgpo_outcome_advantage`` + ``hgpo_advantage_estimate`` -> ``hgpo_advantage`` (same arguments, same
  defaults, returns ``(advantages, advantages)`` like the official entry point); the body of
  ``hgpo_advantage_estimate`` is unchanged. ``trajectory_advantages`` is unchanged.
* Docstrings shortened; removed the ``verl`` and ``functools.reduce`` imports and the unused ``Counter``.

Order assumptions of the official code (not changed here):

* Steps of a trajectory are its rows **in batch order**: within each ``index`` group, trajectories are the
  distinct ``traj_index`` values (``np.unique`` order, i.e. sorted), and a row's position ``si`` -- which decides
  its history keys ``(k, last k anchors)`` -- is its rank among its trajectory's rows in batch order. The HGPO
  trainer (``recipe/hgpo/hgpo_ray_trainer.py``) computes the advantage on the rollout batch, where each
  environment's active steps are in time order, and only afterwards calls ``adjust_batch`` / ``_balance_batch``.
  ``step_discounted_returns`` makes the same assumption (see official_gigpo.py).
* Items of a step are aggregated in the insertion order of the cluster dict (k ascending for each step), which
  fixes the float summation order of ``(w * advs_v).sum()``.
"""

from collections import defaultdict

import numpy as np
import torch

# verl-agent's core_hgpo.py carries its own copies of these three functions; they are identical to core_gigpo.py's.
from canonrl.reference.official_gigpo import episode_norm_reward as trajectory_advantages  # noqa: F401
from canonrl.reference.official_gigpo import step_discounted_returns, to_hashable  # noqa: F401


def hgpo_advantage(
    token_level_rewards: torch.Tensor,
    step_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    anchor_obs: np.ndarray,
    index: np.ndarray,
    traj_index: np.ndarray,
    history_length: int,
    epsilon: float = 1e-6,
    mode: str = "mean_std_norm",
    length_weight_alpha: float = 1.0,
    base_group: bool = False,
):
    """Official ``compute_hgpo_outcome_advantage`` (-> ``hgpo_advantage_estimate``).

    token_level_rewards [N, T] (episode reward per step row; used only when base_group), step_rewards [N]
    (discounted step returns), response_mask [N, T], anchor_obs / index / traj_index: arrays [N]; history_length
    = K (max k = K + 1). Returns (advantages, advantages), both [N, T]."""
    step_advantages = hgpo_advantage_estimate(
        token_level_rewards,
        step_rewards,
        response_mask,
        anchor_obs,
        index,
        traj_index,
        history_length,
        epsilon=epsilon,
        mode=mode,
        length_weight_alpha=length_weight_alpha,
        base_group=base_group,
    )
    return step_advantages, step_advantages


def hgpo_advantage_estimate(
    token_level_rewards: torch.Tensor,
    step_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    anchor_obs: np.ndarray,
    index: np.ndarray,
    traj_index: np.ndarray,
    history_length: int,            # max history steps to look at (excluding current), so max k = history_length + 1
    epsilon: float = 1e-6,
    mode: str = "mean_std_norm",    # "mean_std_norm" / "mean_norm"
    length_weight_alpha: float = 1.0,
    base_group: bool = False,
):
    """Official ``hgpo_advantage_estimate``, unchanged."""
    device = response_mask.device
    response_length = response_mask.shape[-1]

    rewards_all = step_rewards.detach().to(device=device, dtype=torch.float32)
    N = anchor_obs.shape[0]
    all_step_adv = torch.zeros(N, device=device, dtype=torch.float32)

    # ----- optional base (trajectory-level) -----
    base_adv_scalars = None
    if base_group:
        base_adv = trajectory_advantages(
            token_level_rewards,
            response_mask,
            index,
            traj_index,
            epsilon=epsilon,
            remove_std=(mode == "mean_norm"),
            compute_mean_std_cross_steps=True,
        ).to(device=device, dtype=torch.float32)

        mask_sum = response_mask.sum(dim=1).clamp(min=1e-8)
        base_adv_scalars = (base_adv * response_mask).sum(dim=1) / mask_sum  # [N]

    # ----- aggregator: items are (k, adv), L=k+1 used for weight -----
    def aggregate_items(items):
        if not items:
            return torch.zeros((), device=device, dtype=torch.float32)

        ks = []
        advs = []
        for (k, a) in items:
            ks.append(k)
            advs.append(a.to(torch.float32))

        advs = torch.stack(advs, dim=0)
        ks_t = torch.tensor(ks, device=device, dtype=torch.float32)

        valid_mask = (advs != 0)
        if valid_mask.any():
            advs_v = advs[valid_mask]
            ks_v = ks_t[valid_mask]
            L = ks_v + 1
            w_raw = L ** length_weight_alpha
            w = w_raw / (w_raw.sum() + epsilon)
            items_val = (w * advs_v).sum()
        else:
            items_val = torch.zeros((), device=device, dtype=torch.float32)

        return items_val

    # ===================== main =====================
    for gid in np.unique(index):
        group_indices = np.flatnonzero(index == gid)
        if group_indices.size == 0:
            continue

        group_obs = anchor_obs[group_indices]
        group_traj_ids = traj_index[group_indices]

        group_idx_t = torch.as_tensor(group_indices, device=device, dtype=torch.long)
        group_rewards = rewards_all.index_select(0, group_idx_t)  # [G]

        uniq_traj, inv = np.unique(group_traj_ids, return_inverse=True)
        n_traj = len(uniq_traj)

        traj_positions = [[] for _ in range(n_traj)]
        for pos, t in enumerate(inv):
            traj_positions[t].append(pos)
        traj_positions = [np.asarray(p, dtype=np.int64) for p in traj_positions]

        traj_obs = [group_obs[p] for p in traj_positions]
        traj_rewards = [
            group_rewards.index_select(0, torch.as_tensor(p, device=device, dtype=torch.long))
            for p in traj_positions
        ]
        traj_gidx = [group_indices[p] for p in traj_positions]

        clusters = defaultdict(list)
        traj_h = []
        for ti in range(n_traj):
            traj_h.append([to_hashable(s) for s in traj_obs[ti]])

        max_k = history_length + 1

        for ti in range(n_traj):
            T = len(traj_h[ti])
            for si in range(T):
                k_upper = min(max_k, si + 1)
                for k in range(1, k_upper + 1):
                    seq = traj_h[ti][si - k + 1 : si + 1]
                    clusters[(k, tuple(seq))].append((ti, si))

        per_step_items = defaultdict(list)

        for (k, _key), members in clusters.items():
            nL = len(members)
            if nL <= 1:
                continue

            r = torch.stack([traj_rewards[ti][si] for (ti, si) in members], dim=0)
            mean = r.mean()
            std = r.std(unbiased=False)

            if mode == "mean_std_norm":
                a = (r - mean) / (std + epsilon)
            elif mode == "mean_norm":
                a = (r - mean)
            else:
                raise ValueError(f"Invalid mode: {mode}")

            for j, (ti, si) in enumerate(members):
                per_step_items[(ti, si)].append((k, a[j]))

        for ti in range(n_traj):
            T = len(traj_obs[ti])
            for si in range(T):
                global_idx = int(traj_gidx[ti][si])
                items = per_step_items.get((ti, si), [])

                if base_group and base_adv_scalars is not None:
                    base_item = (0, base_adv_scalars[global_idx])
                    items = [base_item] + items

                all_step_adv[global_idx] = aggregate_items(items)

    scores = all_step_adv.unsqueeze(-1).expand(-1, response_length) * response_mask
    return scores
