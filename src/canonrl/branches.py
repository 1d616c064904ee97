"""Row-per-leaf rollouts to tree inputs: ``turn_ids``, ``node`` and ``parent`` from each row's parent row and branch
position (how ROSE and ARPO record their branched rollouts).

A branched rollout stores every leaf as a full row: row ``c`` continues row ``parent_row[c]`` from token position
``branch_pos[c]`` on, so its tokens ``[0, branch_pos[c])`` are a copy of the parent row's (a root response has
``parent_row = -1``). :func:`tree_from_branches` cuts every row at each branch point on its path — every position
where some row branched from the very prefix this row carries — and names each segment by the prefix it reaches,
so a shared prefix gets the same ``node`` id in every row that contains it (node identity by prefix, steps.md §5.5).
The result feeds the tree estimators (``rose``, ``arpo``, ``attnrl``, ``spo_tree``) directly::

    tree = tree_from_branches(parent_row, branch_pos, mask)
    adv = canonrl.advantages("rose", rewards=r, group=g, mask=mask, **tree)

A prefix ``[0, k)`` is named by the row that sampled its last token and ``k``: the only loop runs over the depth
of the branching (a row branched from a branch of a branch ...), everything else is gathers and a cumulative sum.
"""

from __future__ import annotations

import torch
from torch import Tensor

from canonrl.batch import describe_rows


def tree_from_branches(parent_row: Tensor, branch_pos: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """``turn_ids`` [B, T] (−1 past a row's end), ``node`` and ``parent`` [B, K] (per segment; −1 = the prompt's root
    for a first segment, and padding past a row's last segment).

    ``parent_row`` [B] long: the row each row branched from, −1 for a root response. ``branch_pos`` [B] long: the
    number of tokens copied from the parent row (ignored for roots); it must leave the parent at least one token
    of its own and the row at least one token past the branch: ``1 <= branch_pos < length(parent)`` and
    ``branch_pos < length(row)``. ``mask`` [B, T]: a row ends after its last nonzero mask token (tokens inside a
    row with mask 0, such as tool output, belong to the segment they sit in).
    """
    parent_row, branch_pos = parent_row.long().to(mask.device), branch_pos.long().to(mask.device)
    B, T = mask.shape
    lengths = _row_lengths(mask)
    _check_branches(parent_row, branch_pos, lengths, B)
    owner = _prefix_owners(parent_row, branch_pos, T)
    position = torch.arange(T, device=mask.device)
    prefix_id = owner * (T + 1) + position + 1  # the prefix [0, t + 1) of each row, named by its last token's row
    branched = parent_row >= 0
    branch_ids = owner[parent_row[branched], branch_pos[branched] - 1] * (T + 1) + branch_pos[branched]
    inside = position < lengths[:, None]
    branched_from = torch.zeros(B * (T + 1), dtype=torch.bool, device=mask.device)
    branched_from[branch_ids] = True  # a table over prefix ids: linear, unlike torch.isin's sort
    cut = inside & (branched_from[prefix_id] | (position == (lengths - 1)[:, None]))
    before = cut.long().cumsum(1) - cut.long()
    turn_ids = torch.where(inside, before, -1)
    width = max(int(cut.sum(1).max().item()), 1) if B else 1
    node = torch.full((B, width), -1, dtype=torch.long, device=mask.device)
    node[cut.nonzero(as_tuple=True)[0], before[cut]] = prefix_id[cut]
    parent = torch.cat([node.new_full((B, 1), -1), node[:, :-1]], dim=1)
    parent = torch.where(node >= 0, parent, -1)
    return {"turn_ids": turn_ids, "node": node, "parent": parent}


def _row_lengths(mask: Tensor) -> Tensor:
    """[B] position after each row's last nonzero mask token; raises for a row without one."""
    on = mask != 0
    empty = ~on.any(1)
    if empty.any():
        raise ValueError(f"mask: a branched rollout row needs a response token at rows {describe_rows(empty)}")
    last = torch.where(on, torch.arange(mask.shape[1], device=mask.device), -1).amax(1)
    return last + 1


def _check_branches(parent_row: Tensor, branch_pos: Tensor, lengths: Tensor, B: int) -> None:
    if parent_row.shape != (B,) or branch_pos.shape != (B,):
        raise ValueError(f"parent_row and branch_pos must be [B] = [{B}], got {list(parent_row.shape)} and "
                         f"{list(branch_pos.shape)}")
    bad = (parent_row < -1) | (parent_row >= B) | (parent_row == torch.arange(B, device=parent_row.device))
    if bad.any():
        raise ValueError(f"parent_row: not -1 or another row's index at rows {describe_rows(bad)}")
    branched = parent_row >= 0
    parent_length = lengths[parent_row.clamp_min(0)]
    bad = branched & ((branch_pos < 1) | (branch_pos >= parent_length) | (branch_pos >= lengths))
    if bad.any():
        raise ValueError(
            "branch_pos: must satisfy 1 <= branch_pos < length of the parent row and < the row's own length at rows "
            f"{describe_rows(bad)}"
        )


def _prefix_owners(parent_row: Tensor, branch_pos: Tensor, T: int) -> Tensor:
    """[B, T] the row that sampled token t of each row: the first row on the row's lineage (itself, its parent row,
    ...) that sampled its own tokens from before t on. The lineages are walked per row (a loop over the branching
    depth); the tokens take their owner in one pass per depth."""
    B, device = parent_row.shape[0], parent_row.device
    lineage, row = [], torch.arange(B, device=device)
    while (row >= 0).any():
        if len(lineage) > B:
            raise ValueError("parent_row: the branches form a cycle (a row is its own ancestor)")
        own_from = torch.where(parent_row[row.clamp_min(0)] >= 0, branch_pos[row.clamp_min(0)], 0)
        lineage.append((row, torch.where(row >= 0, own_from, T + 1)))  # T + 1: past the root, never
        row = torch.where(row >= 0, parent_row[row.clamp_min(0)], -1)
    position = torch.arange(T, device=device)
    owner = torch.empty(B, T, dtype=torch.long, device=device)
    for row, own_from in reversed(lineage):  # the nearest row on the lineage is written last and wins
        owner = torch.where(position >= own_from[:, None], row[:, None], owner)
    return owner
