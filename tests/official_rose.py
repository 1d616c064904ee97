# ruff: noqa: UP006, UP035, F841, W291, W293  (kept verbatim: typing aliases, an unused local, whitespace)
"""Transcription of the official ROSE advantage code, used only as a test oracle.

Source: repository ``ZiqiZhao1/ROSE-rl``, commit ``2142dc79ceabea43e195dc64b54e150c7b228a4b`` (Apache-2.0,
(c) Bytedance Ltd. and the ROSE authors), ``verl/trainer/ppo/core_algos.py`` lines 1245-1640:
``compute_grpo_iterative_branching_outcome_advantage`` (registered as ``grpo_iterative_branching``). It calls no
helper: the reading of ``tree_metadata`` is inline. See ../../shared/specs/finegrained-estimators.md §18 and
steps.md §5.5.

The control flow, the Python loops, sets and dicts and the arithmetic are kept as they are (Python floats for the
branch values, the advantage written into a tensor of ``token_level_rewards``' dtype, the penalty applied to that
tensor). Nothing is vectorized or fixed. Changes made, and only these:

* the ``@register_adv_est`` decorator is dropped;
* the debug code is stripped: the ``dbg``/``dbg_limit`` flags read from ``config`` and every ``if dbg:`` block
  (and the ``else:`` branches left empty by that), and the unconditional ``print``/``sys.stdout.flush()`` lines of
  the length penalty. None of them changes a value;
* the docstring of the module (this one). The function's own docstring is verbatim.

What ``tree_metadata`` holds (built by ``verl/workers/rollout/vllm_rollout/vllm_rollout_spmd.py``, lines
~1150-1185, and passed by ``verl/trainer/ppo/ray_trainer.py::compute_advantage`` as
``{"per_sample": list of B dicts, "n_per_prompt": n}``): ``per_sample[b]`` is

* ``prompt_index``: the prompt of row b (rows are grouped by it when every prompt has exactly n rows; otherwise the
  code falls back to the flat r-major layout ``b = r * bs + p``);
* ``parent_traj``: the index r (0..n-1, in batch order among the prompt's rows) of the response this one was
  branched from, -1 for a response sampled from the prompt (the first iteration, or the epsilon "head" restarts);
* ``branch_pos``: the token position in the parent's response where the branch starts: the child's response is
  ``parent_response[:branch_pos] + new continuation`` (the prefix is part of the child's response tokens); -1 for a
  first-iteration response, 0 for a head restart;
* ``prefix_len``: ``len(prefix)`` = ``branch_pos`` (unused here).

So the metadata gives one (parent, position) edge per response, never a branch point list; the function rebuilds
each response's set of branch positions from it (own and ancestors' positions, an upward pass, a downward pass) and
keys the values by ``(prompt, position)``.

Input conventions (not changed here): ``config`` must have ``.get`` (``config=None`` fails at
``config.get("length_penalty", 0.0)``); a response's length L is ``response_mask.sum()`` (and, when ``responses``
is given, at most its count of non-zero token ids); its final reward is the masked sum of ``token_level_rewards``.
"""

from typing import Dict, List, Tuple

import numpy as np
import torch


def compute_grpo_iterative_branching_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index=None,
    *,
    tree_metadata: dict = None,
    responses: torch.Tensor = None,
    epsilon: float = 1e-6,
    config=None,
    **kwargs,
):
    """
    Tensor-oriented version aligned with project signature.
    - token_level_rewards: (B, T) tensor
    - response_mask: (B, T) tensor of 0/1
    - tree_metadata: { per_sample: List[dict], n_per_prompt: int }
    - responses: optional (B, T) tensor (unused for JSON recompute)

    Returns: (advantages, returns) tensors of shape (B, T)
    """
    if tree_metadata is None or "per_sample" not in tree_metadata:
        raise ValueError("tree_metadata with per_sample is required")

    if not isinstance(token_level_rewards, torch.Tensor) or not isinstance(response_mask, torch.Tensor):
        raise TypeError("token_level_rewards and response_mask must be torch.Tensor")

    device = token_level_rewards.device
    dtype = token_level_rewards.dtype

    B, T = token_level_rewards.shape
    if B == 0:
        return torch.zeros_like(token_level_rewards), torch.zeros_like(token_level_rewards)

    per_sample = tree_metadata.get("per_sample", [])
    if not isinstance(per_sample, list) or len(per_sample) != B:
        raise ValueError(f"per_sample must be a list of len B; got {type(per_sample)} len={len(per_sample) if hasattr(per_sample,'__len__') else 'NA'} B={B}")

    n_val = tree_metadata.get("n_per_prompt", 1)
    try:
        if isinstance(n_val, np.ndarray):
            if n_val.shape == ():
                n = int(n_val.item())
            else:
                n = int(np.asarray(n_val).reshape(-1)[0])
        else:
            n = int(n_val)
    except Exception:
        # Fallback for unexpected types
        n = int(np.asarray(n_val).reshape(-1)[0])
    if n <= 0 or (B % n != 0):
        raise ValueError(f"Invalid n_per_prompt: n={n}, B={B}")
    bs = B // n

    # If provided in p-major order (grouped by prompt), reindex to r-major (grouped by response index)
    # Build grouping by prompt_index if available, and define accessor b_index(p, r)
    has_prompt_index = (
        isinstance(per_sample, list)
        and len(per_sample) > 0
        and isinstance(per_sample[0], dict)
        and ("prompt_index" in per_sample[0])
    )
    use_groups = False
    group_b_indices: List[List[int]] = []
    p_to_slot: Dict[int, int] = {}
    if has_prompt_index:
        try:
            prompt_vals = [int(x.get("prompt_index", 0)) for x in per_sample]
        except Exception:
            prompt_vals = [0] * B
        uniq_prompts = sorted(set(prompt_vals))
        p_to_slot = {pval: i for i, pval in enumerate(uniq_prompts)}
        bs_from_prompts = len(uniq_prompts)
        if bs_from_prompts * n == B:
            bs = bs_from_prompts
            group_b_indices = [[] for _ in range(bs)]
            for b_idx, meta in enumerate(per_sample):
                try:
                    p_raw = int(meta.get("prompt_index", 0))
                except Exception:
                    p_raw = 0
                p_slot = p_to_slot.get(p_raw, 0)
                group_b_indices[p_slot].append(b_idx)
            ok = all(len(lst) == n for lst in group_b_indices)
            if ok:
                use_groups = True
    def b_index(p: int, r: int) -> int:
        if use_groups:
            return group_b_indices[p][r]
        # flat r-major assumption
        return r * bs + p
 
    # Compute final reward per sample using mask
    mask_bool = response_mask.to(torch.bool)
    # Leaf reward should be the sum of masked token rewards
    final_rewards = (token_level_rewards * response_mask).sum(dim=1)
    # Build traj_info[p][r] with parent and branch_pos
    traj_info: List[List[Dict[str, int]]] = [[{"parent_r": -1, "branch_pos": -1} for _ in range(n)] for _ in range(bs)]
    for p in range(bs):
        for r in range(n):
            b = b_index(p, r)
            meta = per_sample[b]
            pr = -1
            bp = -1
            try:
                pr = int(meta.get("parent_traj", -1))
            except Exception:
                pr = -1
            try:
                bp = int(meta.get("branch_pos", -1))
            except Exception:
                bp = -1
            traj_info[p][r] = {"parent_r": pr, "branch_pos": bp}
    # Validate parent_traj indices per prompt
    for p in range(bs):
        for r in range(n):
            pr = traj_info[p][r]["parent_r"]
            if pr >= n:
                traj_info[p][r]["parent_r"] = -1
    # Per-response branch positions (include root 0, own branch_pos, and all ancestors)
    branch_positions_for_response: List[List[int]] = [[] for _ in range(B)]
    for p in range(bs):
        for r in range(n):
            b = b_index(p, r)
            positions_set = set([0])
            cur_r = r
            steps = 0
            visited = set()
            while cur_r >= 0 and (cur_r not in visited) and steps <= (n + bs + 10):
                visited.add(cur_r)
                info = traj_info[p][cur_r]
                k = info.get("branch_pos", -1)
                try:
                    k = int(k)
                except Exception:
                    k = -1
                if k is not None and k >= 0:
                    positions_set.add(int(k))
                cur_r = int(info.get("parent_r", -1))
                steps += 1
            branch_positions_for_response[b] = sorted(list(positions_set))

    # Upward propagation with path constraint
    positions_sets = [set(pos_list) for pos_list in branch_positions_for_response]
    for p in range(bs):
        for r in range(n):
            b = b_index(p, r)
            info = traj_info[p][r]
            pr = int(info.get("parent_r", -1))
            k = int(info.get("branch_pos", -1))
            if pr < 0 or k < 0:
                continue
            cur = pr
            steps = 0
            visited = set()
            while True:
                if cur < 0 or (cur in visited) or steps > (n + bs + 10):
                    break
                visited.add(cur)
                b_cur = b_index(p, cur)
                if 0 <= b_cur < B:
                    positions_sets[b_cur].add(k)
                parent_of_cur = int(traj_info[p][cur].get("parent_r", -1))
                cur_bp = int(traj_info[p][cur].get("branch_pos", -1))
                # Only propagate upward if k lies on parent's path: k <= branch_pos(cur,parent)
                if parent_of_cur < 0 or not (k <= cur_bp):
                    break
                cur = parent_of_cur
                steps += 1

    # Downward inheritance: child inherits parent's positions strictly less than its own k
    for p in range(bs):
        for r in range(n):
            b = b_index(p, r)
            info = traj_info[p][r]
            pr = int(info.get("parent_r", -1))
            k_child = int(info.get("branch_pos", -1))
            if pr < 0 or k_child < 0:
                continue
            parent_b = b_index(p, pr)
            if 0 <= parent_b < B:
                for pos in positions_sets[parent_b]:
                    if pos < k_child:
                        positions_sets[b].add(pos)

    branch_positions_for_response = [sorted(list(s)) for s in positions_sets]
    # Recompute branch values using per-response positions
    # p_idx for each b
    p_idx_for_b: List[int] = [0] * B
    if use_groups:
        for p in range(bs):
            for r in range(n):
                b = b_index(p, r)
                p_idx_for_b[b] = p
    else:
        for r in range(n):
            for p in range(bs):
                b = r * bs + p
                p_idx_for_b[b] = p

    prompt_to_kset: Dict[int, set] = {}
    for b in range(B):
        p_idx = p_idx_for_b[b]
        s = prompt_to_kset.setdefault(p_idx, set())
        for k in branch_positions_for_response[b]:
            s.add(k)

    branch_value: Dict[Tuple[int, int], float] = {}
    fr_list = final_rewards.detach().cpu().tolist()
    for p_idx, kset in prompt_to_kset.items():
        for k in sorted(kset):
            vals: List[float] = []
            for b in range(B):
                if p_idx_for_b[b] != p_idx:
                    continue
                if k in branch_positions_for_response[b]:
                    vals.append(float(fr_list[b]))
            if len(vals) > 0:
                branch_value[(p_idx, k)] = float(sum(vals) / len(vals))
    # Effective lengths
    eff_len = response_mask.sum(dim=1).to(torch.int64)
    if responses is not None:
        resp_len = (responses != 0).sum(dim=1).to(torch.int64)
        eff_len = torch.minimum(eff_len, resp_len)

    # Assign advantages per sample
    advantages = torch.zeros_like(token_level_rewards)
    for p in range(bs):
        for r in range(n):
            b = b_index(p, r)
            p_idx = p if not use_groups else p
            L = int(eff_len[b].item())
            if L <= 0:
                continue
            points = [k for k in branch_positions_for_response[b] if k <= L]
            if len(points) == 0 or points[0] != 0:
                points = [0] + points
            if points[-1] != L:
                points.append(L)
            if len(points) < 2:
                continue
            for i in range(len(points) - 1):
                k0 = points[i]
                k1 = points[i + 1]
                if k0 >= L or k1 <= k0:
                    continue
                v0 = branch_value.get((p_idx, k0), None)
                if v0 is None:
                    continue
                if k1 == L:
                    v1 = float(final_rewards[b].item())
                else:
                    v1 = branch_value.get((p_idx, k1), None)
                    if v1 is None:
                        continue
                adv_val = float(v1 - v0)
                start_t = k0
                end_t = min(k1, L) - 1
                if end_t >= start_t:
                    advantages[b, start_t : end_t + 1] = torch.tensor(adv_val, dtype=dtype, device=device)

    length_penalty = config.get("length_penalty", 0.0)
    if length_penalty > 0.0:
        # Penalize longer correct rollouts relative to the shortest correct rollout per prompt.
        for p in range(bs):
            correct_bs = []
            shortest_b = -1
            shortest_L = None
            for r in range(n):
                b = b_index(p, r)
                fr = float(final_rewards[b].item())
                if abs(fr) > 1e-6:
                    Lb = int(eff_len[b].item())
                    correct_bs.append(b)
                    if shortest_L is None or Lb < shortest_L:
                        shortest_L = Lb
                        shortest_b = b
            if len(correct_bs) <= 1 or shortest_b < 0 or shortest_L is None or shortest_L <= 0:
                continue
            set_short = set(branch_positions_for_response[shortest_b])
            L_short = int(shortest_L)
            for b in correct_bs:
                if b == shortest_b:
                    continue
                L_b = int(eff_len[b].item())
                if L_b <= 0:
                    continue
                common_positions = set_short.intersection(set(branch_positions_for_response[b]))
                if not common_positions:
                    k_common = 0
                else:
                    lim = min(L_b, L_short)
                    valid_common = [k for k in common_positions if k <= lim]
                    k_common = max(valid_common) if len(valid_common) > 0 else 0
                remain_short = max(L_short - k_common, 0)
                remain_other = max(L_b - k_common, 0)
                if remain_other <= 0:
                    continue
                penalty_factor = 1 - (float(remain_short) / float(remain_other))**length_penalty
                if penalty_factor <= 0:
                    continue
                start_t = int(k_common)
                end_t = int(L_b)
                if end_t > start_t:
                    advantages[b, start_t:end_t] -= advantages[b, start_t:end_t].abs() * penalty_factor
    advantages = advantages * response_mask
    returns = advantages.clone()

    # Expose branch values for optional debugging/inspection
    compute_grpo_iterative_branching_outcome_advantage.branch_value = branch_value  # type: ignore[attr-defined]
    return advantages, returns 
