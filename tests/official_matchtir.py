"""Transcription of the official MatchTIR advantage code, used only as a test oracle.

Source: repository ``quchangle1/MatchTIR``, commit ``f614ce1135dcb38819ebae5967318084b3cb016b``, file
``Code/verl/trainer/ppo/core_algos.py``: function ``compute_grpo_outcome_advantage`` (modified in place by
MatchTIR into the dual-level trajectory + turn advantage; selected with ``algorithm.adv_estimator=grpo``). Call site:
``Code/verl/trainer/ppo/ray_trainer.py::compute_advantage``, which in multi-turn mode passes
``response_mask = batch["loss_mask"][:, -response_length:]`` (tool-observation tokens 0) and
``index = non_tensor_batch["uid"]`` (Apache-2.0, (c) Bytedance / the MatchTIR authors).

The control flow, the Python loops and dicts, the float32 arithmetic, ``torch.mean``/``torch.std`` (unbiased; the
``torch.std(torch.tensor([list]))`` with its extra brackets), the string group keys ``f"{index[i]}-{j}"`` and the
epsilon are kept as they are, so the official numbers, float32 rounding quirks included (steps.md §5.1), are
reproduced bit for bit. Nothing is vectorized or fixed. See ../../shared/specs/finegrained-estimators.md §6.

Changes made, and only these:

* ``compute_grpo_outcome_advantage`` -> ``matchtir_advantage``; same arguments, order and defaults
  (``epsilon=1e-6``, ``norm_adv_by_std_in_grpo=True``), plus one added keyword-only argument ``lam=0.9``: the
  turn-level discount, a hard-coded local ``lam = 0.9`` in the official function (the config ``gamma`` is not
  passed to it). The default reproduces the official code.
* Docstring rewritten; ``verl.utils.torch_functional`` import removed (unused by this function).

Input conventions the official code assumes (not changed here):

* **Layout: one row per trajectory** (the whole multi-turn dialogue in one response).
* **Turns are the maximal runs of** ``response_mask[i, t] == 1``; turn j's reward is ``token_level_rewards[i, e_j]``
  at the run's last token e_j (MatchTIR's reward function writes each turn's reward on its ``<|im_end|>``).
* **Trajectory score** = ``token_level_rewards[i].sum()`` over all columns (mask-0 tokens included).
* Trajectory level: GRPO over ``index``; n >= 2: ``(s - mean) / (std + eps)``, unbiased std; singleton: mean 0,
  std 1, i.e. ``s / (1 + 1e-6)``. ``norm_adv_by_std_in_grpo=False`` drops the division (trajectory part only).
* Turn level: ``G_j = r_j + lam * G_{j+1}`` over the row's runs; z-score over the key ``f"{index[i]}-{j}"`` (j = run
  position); n >= 2: ``(G - mean) / (std + eps)``, unbiased std; singleton: mean 0, std 1. Rows with fewer turns
  simply do not appear in the later keys (no padding turns). The key is a *string*, so uids whose ``str`` coincide
  (e.g. ``1`` and ``"1"``) share statistics.
* Fused ``(A_traj + A_turn_j) / 2`` written on the run's tokens; the result is multiplied by ``response_mask``;
  the function returns ``(advantages, advantages)``.
* **Crash**: a row with no mask-1 token makes ``torch.stack([])`` raise ``RuntimeError``.
* A constant group of size >= 2 can get a non-zero advantage: float32 ``mean`` of identical values is not always
  exact and the error is divided by ``std + 1e-6`` (steps.md §5.1).
"""

from collections import defaultdict

import numpy as np
import torch


def matchtir_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: str = True,
    *,
    lam: float = 0.9,
):
    """Official MatchTIR ``compute_grpo_outcome_advantage``: (trajectory GRPO + turn-position z-score of the
    discounted turn return) / 2, broadcast over each turn's tokens.

    Args:
        token_level_rewards: [B, T] float32; each turn's reward on its last mask-1 token (others normally 0).
        response_mask: [B, T] 0/1 (the trainer passes the multi-turn ``loss_mask``: observations 0). Every row
            needs at least one 1.
        index: [B] np.ndarray (dtype object) of prompt group ids (``uid``).
        epsilon: 1e-6, added to both stds.
        norm_adv_by_std_in_grpo: divide the trajectory-level part by its std (default True).
        lam: turn-level discount, 0.9 (hard-coded in the official code).

    Returns:
        (advantages, advantages): both the same [B, T] float32 tensor, on the CPU.
    """
    scores = token_level_rewards.sum(dim=-1)

    id2score = defaultdict(list)
    id2mean = {}
    id2std = {}

    with torch.no_grad():
        bsz = scores.shape[0]
        for i in range(bsz):
            id2score[index[i]].append(scores[i])
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
            if norm_adv_by_std_in_grpo:
                scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + epsilon)
            else:
                scores[i] = scores[i] - id2mean[index[i]]
        scores = scores.unsqueeze(-1)

    group_adv = scores
    seq_len = token_level_rewards.size(1)

    # lam = 0.9  (official: hard-coded here; exposed as the keyword argument ``lam`` with this default)
    turns_list = []
    turn_rewards_list = []
    for i in range(bsz):
        mask = response_mask[i]
        rewards = token_level_rewards[i]

        turns = []
        start = None
        for t in range(seq_len):
            if mask[t] == 1 and start is None:
                start = t
            if mask[t] == 0 and start is not None:
                turns.append((start, t - 1))
                start = None
        if start is not None:
            turns.append((start, seq_len - 1))

        turns_list.append(turns)

        turn_rewards = torch.stack([rewards[e] for (_, e) in turns])
        turn_rewards_list.append(turn_rewards)

    discounted_rewards_list = []
    for turn_rewards in turn_rewards_list:
        N = len(turn_rewards)
        discounted = torch.zeros_like(turn_rewards)
        acc = 0.0
        for t in reversed(range(N)):
            acc = turn_rewards[t] + lam * acc
            discounted[t] = acc
        discounted_rewards_list.append(discounted)

    step_key2score = defaultdict(list)

    for i in range(bsz):
        disc = discounted_rewards_list[i]
        T = len(disc)
        for j in range(T):
            key = f"{index[i]}-{j}"
            step_key2score[key].append(disc[j])

    step_mean = {}
    step_std = {}

    for key, vals in step_key2score.items():
        vals = torch.stack(vals)
        if len(vals) == 1:
            step_mean[key] = torch.tensor(0.0)
            step_std[key] = torch.tensor(1.0)
        else:
            step_mean[key] = vals.mean()
            step_std[key] = vals.std()

    discounted_adv_list = []
    for i in range(bsz):
        disc = discounted_rewards_list[i]
        T = len(disc)

        adv_turn = torch.zeros_like(disc)
        for j in range(T):
            key = f"{index[i]}-{j}"
            adv_turn[j] = (disc[j] - step_mean[key]) / (step_std[key] + epsilon)
        discounted_adv_list.append(adv_turn)

    final_scores = torch.zeros(bsz, seq_len)

    for i in range(bsz):
        turns = turns_list[i]
        step_adv = discounted_adv_list[i]
        fused_adv = (group_adv[i] + step_adv) / 2

        for j, (s, e) in enumerate(turns):
            final_scores[i, s:e+1] = fused_adv[j]

    final_scores = final_scores * response_mask

    return final_scores, final_scores
