"""The step table: the tokens of a batch cut into steps (turns, environment steps, segments), in time order.

A *step* is a set of tokens of one row that receives one scalar advantage. Two layouts map onto the same table
(``../shared/specs/steps.md`` §1–3):

- **row-per-trajectory**: a whole episode is one row; ``turn_ids`` [B, T] (or ``"mask_runs"``) cuts it into steps;
- **row-per-step**: each row is one step (``turn_ids="row"``, the default); rows of one episode share ``traj`` and
  are ordered by ``step_index`` (−1 marks a padding row that takes no part).

An *occurrence* is a (row, local step) pair. Occurrences of one step can repeat: a row-per-step batch may carry the
same ``(traj, step_index)`` twice (verl-agent duplicates rows before the advantage); such a step is one step of the
table — counted once in every statistic — and every copy receives its advantage. Per-step inputs are given in
occurrence order ((row, local) order); a repeated step takes the values of its first copy.

Steps are numbered in (trajectory, time) order, so a trajectory's steps are contiguous and in time order: returns
are a segmented scan, the predecessor of a step is the step before it. Everything is vectorized (unique, cumsum,
scatter); the only loops run over log2 of a trajectory's length or over a history depth.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from canonrl.batch import dense_codes, describe_row_indices, describe_rows, encode_groups
from canonrl.groups import Grouping

TURN_ID_MODES = ("row", "mask_runs")


@dataclass
class StepTable:
    """Steps of a batch. O occurrences in (row, local) order; S steps in (trajectory, time) order.

    Attributes:
        batch_size, mask: the batch's B and [B, T] mask.
        occ_row: [O] long, the row of each occurrence.
        occ_local: [O] long, the occurrence's index among its row's steps.
        occ_step: [O] long, the step each occurrence is a copy of.
        token_column: [B, T] long column of each token in its row's step table (turn id + 1; 0 outside every step),
            or None when every occurrence is a whole row (``turn_ids="row"``); ``occ_column`` [O] is the column of
            each occurrence. Row-local columns let every token pass run along rows (scatter and gather on dim 1).
        traj: [S] long trajectory of each step (0..num_traj−1).
        group: [S] long prompt group of each step.
        pos: [S] long 0-based position of the step in its trajectory.
        first_occ: [S] long, the first occurrence of each step.
    """

    batch_size: int
    mask: Tensor
    occ_row: Tensor
    occ_local: Tensor
    occ_step: Tensor
    token_column: Tensor | None
    occ_column: Tensor | None
    traj: Tensor
    group: Tensor
    pos: Tensor
    first_occ: Tensor
    num_traj: int
    num_groups: int

    @property
    def num_steps(self) -> int:
        return int(self.traj.shape[0])

    @property
    def num_occurrences(self) -> int:
        return int(self.occ_row.shape[0])

    @property
    def device(self) -> torch.device:
        return self.traj.device

    @cached_property
    def mass(self) -> Tensor:
        """[S] float32 mask mass of each step (of its first copy)."""
        return self.token_sum(None)

    @cached_property
    def member(self) -> Tensor:
        """[S] bool: steps with mask mass; a step without any takes part in no statistic (and gets 0)."""
        return self.mass > 0

    @cached_property
    def width(self) -> int:
        """Columns of the row-local step tables (column 0: tokens in no step)."""
        return int(self.token_column.max().item()) + 1 if self.token_column is not None and self.mask.numel() else 1

    @cached_property
    def token_occ(self) -> Tensor | None:
        """[B, T] long occurrence of each token (−1 outside every step); None for ``turn_ids="row"``."""
        if self.token_column is None:
            return None
        return self.per_row_table(torch.arange(self.num_occurrences, device=self.device), fill=-1).gather(
            1, self.token_column
        )

    def per_row_table(self, per_occurrence: Tensor, fill: float = 0) -> Tensor:
        """[B, width]: each occurrence's value at (its row, its column); ``fill`` elsewhere and in column 0."""
        table = torch.full((self.batch_size, self.width), fill, dtype=per_occurrence.dtype, device=self.device)
        table[self.occ_row, self.occ_column] = per_occurrence
        return table

    @cached_property
    def one_per_row(self) -> bool:
        """Every row holds at most one occurrence (a [B] per-step input is then one value per row)."""
        if self.token_column is None:
            return True
        return bool((self.occ_local == 0).all())

    # ----------------------------------------------------------------------------------------- time structure
    @cached_property
    def is_first(self) -> Tensor:
        """[S] bool: the step opens its trajectory."""
        return self.pos == 0

    @cached_property
    def is_last(self) -> Tensor:
        """[S] bool: the step closes its trajectory."""
        following = torch.cat([self.traj[1:], self.traj.new_full((1,), -1)])
        return following != self.traj

    @cached_property
    def prev(self) -> Tensor:
        """[S] long: the step before each step in its trajectory, −1 for the first."""
        index = torch.arange(self.num_steps, device=self.device)
        return torch.where(self.is_first, -1, index - 1)

    @cached_property
    def max_length(self) -> int:
        """The number of steps of the longest trajectory."""
        return int(self.pos.max().item()) + 1 if self.num_steps else 0

    def returns(self, rewards: Tensor, gamma: float) -> Tensor:
        """[S] float32 discounted return-to-go G_t = sum_{k >= t} gamma^(k - t) r_k within each trajectory.

        A segmented reverse scan by doubling in float64 (log2 of the longest trajectory rounds, no overflow for
        any gamma in [0, 1]); steps without mask mass still carry their reward into earlier steps' returns.
        """
        value = rewards.double().clone()
        carry = torch.where(self.is_last, 0.0, float(gamma)).double()
        offset = 1
        while offset < self.max_length:
            value = value + carry * _shift_up(value, offset)
            carry = carry * _shift_up(carry, offset)
            offset *= 2
        return value.float()

    def history(self, codes: Tensor, depth: int) -> Tensor:
        """[S, depth] long: the last ``depth`` codes of each step's trajectory, ending at the step.

        Column 0 is the step's own code, column j the code j steps back; −1 where the trajectory holds fewer steps
        (column j is complete where ``pos >= j``).
        """
        columns, index = [codes], torch.arange(self.num_steps, device=self.device)
        for _ in range(depth - 1):
            index = torch.where(index >= 0, self.prev[index.clamp_min(0)], -1)
            columns.append(torch.where(index >= 0, codes[index.clamp_min(0)], -1))
        return torch.stack(columns, 1)

    # --------------------------------------------------------------------------------------------- statistics
    def by(self, *keys: Tensor, member: Tensor | None = None) -> Grouping:
        """A :class:`Grouping` of the steps by equal values of all ``keys`` ([S] or [S, k] long tensors each).

        ``member`` (default: steps with mask mass) says which steps count in the statistics.
        """
        columns = [column for key in keys for column in (key[:, None] if key.dim() == 1 else key).unbind(1)]
        index, count = lexicographic_codes(columns, self.num_steps, self.device, dense=False)
        member = self.member if member is None else member & self.member
        return Grouping(index, member, count)

    # ---------------------------------------------------------------------------------------------- broadcast
    def broadcast(self, per_step: Tensor) -> Tensor:
        """[B, T] float32: each step's value on its tokens, times the mask; exactly 0 outside every step."""
        per_occurrence = per_step.float()[self.occ_step]
        if self.token_column is None:
            per_row = torch.zeros(self.batch_size, dtype=torch.float32, device=self.device)
            per_row[self.occ_row] = per_occurrence
            out = per_row[:, None] * self.mask
        else:
            out = self.per_row_table(per_occurrence).gather(1, self.token_column) * self.mask
        return out if out.dtype == torch.float32 else out.float()

    def token_sum(self, values: Tensor | None) -> Tensor:
        """[S] float32 sum of a [B, T] tensor over each step's mask tokens (the first copy's); ``None`` sums the
        mask itself (each step's mask mass)."""
        weighted = (self.mask if values is None else values * self.mask).float()
        if self.token_column is None:
            per_occurrence = weighted.sum(-1)[self.occ_row]
        else:  # row-wise sums into the row's columns (tokens in no step land in column 0)
            sums = torch.zeros(self.batch_size, self.width, dtype=torch.float32, device=self.device)
            per_occurrence = sums.scatter_add_(1, self.token_column, weighted)[self.occ_row, self.occ_column]
        return per_occurrence[self.first_occ]

    # ----------------------------------------------------------------------------------------- per-step inputs
    def per_step(self, name: str, value: Any, *, per_row: bool = False) -> Tensor:
        """[S] float32 per-step input from any accepted form (see :func:`per_occurrence`), checked finite."""
        occurrences = per_occurrence(self, name, value, per_row=per_row).float()
        bad = ~torch.isfinite(occurrences)
        if bad.any():
            rows = describe_row_indices(self.occ_row[bad], self.batch_size)
            raise ValueError(f"{name} is NaN or Inf at steps of rows {rows}")
        return occurrences[self.first_occ]

    def per_step_ids(self, name: str, value: Any, *, per_row: bool = False) -> Tensor:
        """[S] long codes of per-step ids (an int tensor or hashables: str, int, tuples); equal ids, equal codes."""
        return per_occurrence(self, name, value, per_row=per_row, ids=True)[self.first_occ]


def lexicographic_codes(
    columns: list[Tensor], length: int, device: torch.device, *, dense: bool = True
) -> tuple[Tensor, int]:
    """([length] long codes, number of codes) of the rows of integer ``columns``: equal rows get equal codes, and
    codes follow the rows' lexicographic order. Exact (no hashing): a mixed-radix number of the columns, each
    shifted by its minimum, made dense by one 1-D ``unique`` (far faster on CPU than ``unique(dim=0)``) — at the end
    when ``dense``, and on the way only if the radix product would overflow. Without ``dense`` the codes may leave
    gaps (the count is then the radix product, at most 4 x ``length`` + 1024; otherwise they are made dense)."""
    if length == 0:
        return torch.zeros(0, dtype=torch.long, device=device), 0
    code, size = torch.zeros(length, dtype=torch.long, device=device), 1
    for column in columns:
        low, high = torch.aminmax(column)
        span = int(high.item() - low.item()) + 1
        if size * span >= 2**62:
            code, size = dense_codes(code)
        code, size = code * span + (column - low), size * span
    if dense or size > 4 * length + 1024:
        return dense_codes(code)
    return code, size




def _shift_up(values: Tensor, offset: int) -> Tensor:
    """values[i + offset], 0 past the end."""
    return torch.cat([values[offset:], values.new_zeros(min(offset, values.shape[0]))])


def per_occurrence(table: StepTable, name: str, value: Any, *, per_row: bool = False, ids: bool = False) -> Tensor:
    """[O] values of a per-step input in occurrence order. Accepted forms:

    - a flat [O] tensor (or sequence) in (row, local) order;
    - a [B] tensor (or sequence) when every row holds one step — or, with ``per_row=True`` (a per-row input such
      as ``agent``), for any layout: the row's value is copied to each of its steps;
    - a [B, K] tensor padded past each row's last step;
    - a list of B Python lists, one value per step of the row.

    With ``ids=True`` values are ids (an int tensor, or hashables such as str, int or tuples) and the result is
    their [O] long codes; otherwise numbers.
    """
    B, O = table.batch_size, table.num_occurrences
    if isinstance(value, Tensor) and value.dim() == 2:
        widest = int(table.occ_local.max().item()) + 1 if O else 0
        if value.shape[0] != B or value.shape[1] < widest:
            raise ValueError(f"{name} as [B, K] needs B = {B} rows and K >= {widest} columns, got {list(value.shape)}")
        value = value.to(table.device)[table.occ_row, table.occ_local]
    elif isinstance(value, list) and value and all(isinstance(row, list) for row in value):
        value = _from_row_lists(table, name, value)
    convert = _codes if ids else _numbers
    length = value.shape[0] if isinstance(value, Tensor) else len(value)
    if length == B and (table.one_per_row or per_row):
        return convert(name, value, B, table.device)[table.occ_row]
    if length == O:
        return convert(name, value, O, table.device)
    layout = "one per row" if table.one_per_row else f"{O} steps in (row, step) order"
    raise ValueError(
        f"{name} must give one value per step ({layout}; or [B, K] padded; or B per-row lists), got {length}"
    )


def _from_row_lists(table: StepTable, name: str, rows: list) -> list:
    if len(rows) != table.batch_size:
        raise ValueError(f"{name} as per-row lists needs {table.batch_size} lists, got {len(rows)}")
    counts = torch.bincount(table.occ_row, minlength=table.batch_size).tolist()
    wrong = torch.tensor([len(row) != count for row, count in zip(rows, counts)])
    if wrong.any():
        raise ValueError(f"{name} lists must hold one value per step of their row, not at rows {describe_rows(wrong)}")
    return [v for row in rows for v in row]


def _numbers(name: str, values: Any, count: int, device: torch.device) -> Tensor:
    try:
        out = torch.as_tensor(values, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must hold numbers, one per step") from None
    if out.dim() != 1 or out.shape[0] != count or out.is_complex():
        raise ValueError(f"{name} must hold {count} real numbers, got shape {list(out.shape)}")
    return out


def _codes(name: str, ids: Any, count: int, device: torch.device) -> Tensor:
    return _encode(name, ids, count, device)[0]


def _encode(name: str, ids: Any, count: int, device: torch.device) -> tuple[Tensor, int]:
    """:func:`~canonrl.batch.encode_groups` of ``ids`` (codes, number of distinct ids), errors naming ``name``."""
    if isinstance(ids, Tensor) and ids.dtype.is_floating_point:
        raise TypeError(f"{name} must hold integer or hashable ids, got dtype {ids.dtype}")
    try:
        return encode_groups(ids, count, device)
    except (TypeError, ValueError) as error:
        raise type(error)(str(error).replace("group", name, 1)) from None


# -------------------------------------------------------------------------------------------------------- building
def build_step_table(
    mask: Tensor,
    group_index: Tensor,
    num_groups: int,
    *,
    turn_ids: Tensor | str | None = None,
    traj: Any = None,
    step_index: Tensor | None = None,
) -> StepTable:
    """The step table of a batch (see the module docstring); errors name the field and the rows."""
    B, device = mask.shape[0], mask.device
    active = torch.ones(B, dtype=torch.bool, device=device) if step_index is None else step_index >= 0
    mode = "row" if turn_ids is None else turn_ids
    if isinstance(mode, str):
        if mode not in TURN_ID_MODES:
            raise ValueError(f"turn_ids must be a [B, T] int tensor or one of {list(TURN_ID_MODES)}, got {mode!r}")
        if mode == "mask_runs":
            mode = mask_run_ids(mask)
    if isinstance(mode, str):
        occ_row = active.nonzero().flatten()
        occ_local = torch.zeros_like(occ_row)
        token_column = occ_column = None
    else:
        occ_row, occ_local, token_column, occ_column = _occurrences(mode.to(device), mask, active)
    traj_index, num_traj = (
        (torch.arange(B, device=device), B) if traj is None else _encode("traj", traj, B, device)
    )
    time = occ_row if step_index is None else step_index.to(device).long()[occ_row]
    occurrences = occ_row.shape[0]
    occ_traj = traj_index[occ_row]
    occ_step, num_steps = lexicographic_codes([occ_traj, time, occ_local], occurrences, device)
    first_occ = torch.full((num_steps,), occurrences, dtype=torch.long, device=device)
    first_occ = first_occ.scatter_reduce(0, occ_step, torch.arange(occurrences, device=device), reduce="amin")
    step_traj = occ_traj[first_occ]
    step_group = group_index[occ_row[first_occ]]
    _check_one_group_per_traj(Grouping(step_traj, torch.ones_like(step_traj, dtype=torch.bool), num_traj),
                              step_group, occ_row, occ_step, B)
    traj_start = torch.ones_like(step_traj, dtype=torch.bool)
    traj_start[1:] = step_traj[1:] != step_traj[:-1]
    start_index = torch.cummax(torch.where(traj_start, torch.arange(num_steps, device=device), 0), 0).values
    pos = torch.arange(num_steps, device=device) - start_index
    return StepTable(
        batch_size=B,
        mask=mask,
        occ_row=occ_row,
        occ_local=occ_local,
        occ_step=occ_step,
        token_column=token_column,
        occ_column=occ_column,
        traj=step_traj,
        group=step_group,
        pos=pos,
        first_occ=first_occ,
        num_traj=num_traj,
        num_groups=num_groups,
    )


def mask_run_ids(mask: Tensor) -> Tensor:
    """[B, T] long: one turn per maximal run of mask > 0, numbered 0, 1, ... within the row; −1 off the mask."""
    inside = mask > 0
    before = torch.zeros_like(inside)
    before[:, 1:] = inside[:, :-1]
    starts = inside & ~before
    return torch.where(inside, starts.long().cumsum(-1) - 1, -1)


def _occurrences(turn_ids: Tensor, mask: Tensor, active: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(occ_row, occ_local, token_column, occ_column) of explicit [B, T] turn ids, without sorting the tokens."""
    if turn_ids.shape != mask.shape:
        raise ValueError(f"turn_ids must have the mask's shape {list(mask.shape)}, got {list(turn_ids.shape)}")
    if turn_ids.dtype.is_floating_point or turn_ids.dtype == torch.bool:
        raise TypeError(f"turn_ids must be an integer tensor (−1 for tokens in no step), got {turn_ids.dtype}")
    if turn_ids.numel() and turn_ids.min() < -1:
        raise ValueError(f"turn_ids must be >= -1 (−1 = in no step), not at rows {describe_rows((turn_ids < -1).any(-1))}")
    column = turn_ids.long() + 1  # column 0 collects the tokens in no step
    if not active.all():
        column = torch.where(active[:, None], column, 0)
    width = max(int(column.max().item()) + 1 if column.numel() else 0, 2)  # at least one id column
    present = torch.zeros(column.shape[0], width, dtype=torch.bool, device=column.device)
    present.scatter_(1, column, True)
    present[:, 0] = False  # column k + 1: turn id k occurs in the row
    occ_row, occ_column = present.nonzero(as_tuple=True)
    local = present.long().cumsum(1) - 1
    return occ_row, local[occ_row, occ_column], column, occ_column


def _check_one_group_per_traj(
    trajectories: Grouping, group: Tensor, occ_row: Tensor, occ_step: Tensor, batch_size: int
) -> None:
    """Raise, naming the rows, where the steps of one trajectory (a group of ``trajectories``) span two groups."""
    split = ~trajectories.gather(trajectories.is_constant(group.double()))
    if split.any():
        rows = describe_row_indices(occ_row[split[occ_step]], batch_size)
        raise ValueError(f"traj: the rows of one trajectory must share one group, not at rows {rows}")
