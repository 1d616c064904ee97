"""The batch of rollouts an estimator reads, validated once at the API boundary.

Every estimator receives a :class:`RolloutBatch`. Building one checks shapes, dtypes, devices and values and raises
``ValueError``/``TypeError`` naming the argument and the offending rows, so that no estimator ever has to produce a
silent NaN. Per-token inputs that only some estimators read (entropies, log-probs, token ids) are checked where
they are reduced, so an estimator that does not read them pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import Tensor

from canonrl.fields import FIELDS, PER_RESPONSE, PER_TOKEN

#: Every batch input, from the one table of :mod:`canonrl.fields` (everything else passed to ``advantages`` is a
#: hyperparameter); the step-, turn- and critic-level ones (``../shared/specs/steps.md`` §2).
BATCH_FIELDS = tuple(f.name for f in FIELDS)
STEP_FIELDS = tuple(f.name for f in FIELDS if f.family == "step")
#: Optional inputs with one value per response token ([B, T]), and finite numbers with one value per response ([B]).
PER_TOKEN_FIELDS = tuple(f.name for f in FIELDS if f.shape == PER_TOKEN and f.family != "base" and f.name != "turn_ids")
PER_RESPONSE_FIELDS = tuple(
    f.name for f in FIELDS
    if f.shape == PER_RESPONSE and f.family != "base" and f.dtype.startswith("float") and "NaN" not in f.dtype
)  # fmt: skip

_MAX_ROWS_IN_MESSAGE = 10


def describe_rows(bad_rows: Tensor) -> str:
    """Format the indices of the True entries of a [B] flag tensor as ``[3, 17]`` (truncated after 10)."""
    rows = bad_rows.nonzero().flatten().tolist()
    shown = ", ".join(str(r) for r in rows[:_MAX_ROWS_IN_MESSAGE])
    more = f", ... ({len(rows)} rows)" if len(rows) > _MAX_ROWS_IN_MESSAGE else ""
    return f"[{shown}{more}]"


def describe_row_indices(rows: Tensor, batch_size: int) -> str:
    """:func:`describe_rows` of a [K] tensor of row indices (repeats allowed) of a batch of ``batch_size`` rows."""
    flags = torch.zeros(batch_size, dtype=torch.bool, device=rows.device)
    flags[rows] = True
    return describe_rows(flags)


def _require_tensor(name: str, value: Any) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _require_finite_rows(name: str, values: Tensor) -> None:
    """Raise if a [B] or [B, K] float tensor has NaN/Inf, naming the rows."""
    if torch.isfinite(values.sum()):  # a finite sum has no NaN or Inf term (an overflow only takes the slow path)
        return
    finite = torch.isfinite(values)
    if finite.all():
        return
    if values.dim() > 1:
        finite = finite.flatten(1).all(1)
    nan_rows = torch.isnan(values) if values.dim() == 1 else torch.isnan(values).flatten(1).any(1)
    kind = "NaN" if nan_rows.any() else "Inf"
    raise ValueError(f"{name} has {kind} at rows {describe_rows(~finite)}")


def dense_codes(values: Tensor) -> tuple[Tensor, int]:
    """([N] long codes 0..K-1, K) of a non-empty 1-D integer tensor: equal values, equal codes, in sorted order —
    ``torch.unique(values, return_inverse=True)``'s inverse. Without a sort where the values span at most
    4 N + 1024 integers (a presence table and its cumsum, linear in N; 3-4x faster on CPU), by ``unique`` otherwise."""
    low, high = torch.aminmax(values)
    span = int(high.item()) - int(low.item()) + 1
    if span > 4 * values.shape[0] + 1024:
        uniques, codes = torch.unique(values, return_inverse=True)
        return codes.long(), int(uniques.numel())
    shifted = (values - low).long()
    present = torch.zeros(span, dtype=torch.bool, device=values.device)
    present[shifted] = True
    rank = present.cumsum(0) - 1
    return rank[shifted], int(rank[-1].item()) + 1


def encode_groups(group: Any, batch_size: int, device: torch.device) -> tuple[Tensor, int]:
    """Map group ids (an int tensor or a sequence of hashable ids, e.g. verl's uid strings) to 0..G-1.

    Returns the per-row group index as a long tensor on ``device`` and the number of groups. Ids need not be
    contiguous, sorted or of equal multiplicity.
    """
    if isinstance(group, Tensor):
        if group.dtype.is_floating_point or group.dtype == torch.bool or group.is_complex():
            raise TypeError(f"group must hold integer ids (or be a list of hashable ids), got dtype {group.dtype}")
        if group.dim() != 1 or group.shape[0] != batch_size:
            raise ValueError(f"group must have shape [{batch_size}] (one id per row), got {list(group.shape)}")
        if batch_size == 0:
            return torch.zeros(0, dtype=torch.long, device=device), 0
        return dense_codes(group.to(device))
    if isinstance(group, (str, bytes)) or not isinstance(group, (Sequence, np.ndarray)):
        raise TypeError(f"group must be an int tensor or a sequence of hashable ids, got {type(group).__name__}")
    if len(group) != batch_size:
        raise ValueError(f"group must have one id per row: got {len(group)} ids for {batch_size} rows")
    if batch_size == 0:
        return torch.zeros(0, dtype=torch.long, device=device), 0
    try:
        ids = np.asarray(group)
    except ValueError:  # ragged ids, e.g. tuples of different lengths
        ids = None
    if ids is None or ids.ndim != 1:
        # e.g. a list of tuples, which numpy would make 2-D: keep each id whole as one object.
        ids = np.fromiter(group, dtype=object, count=len(group))
    try:
        _, inverse = np.unique(ids, return_inverse=True)
    except TypeError:  # mixed, unorderable ids
        codes: dict[Any, int] = {}
        inverse = np.fromiter((codes.setdefault(g, len(codes)) for g in ids), dtype=np.int64, count=len(ids))
    index = torch.from_numpy(np.ascontiguousarray(inverse.reshape(-1), dtype=np.int64)).to(device)
    return index, int(index.max().item()) + 1


def _check_per_token(name: str, value: Tensor, mask: Tensor) -> Tensor:
    value = _require_tensor(name, value)
    if value.shape != mask.shape:
        raise ValueError(f"{name} must have the mask's shape {list(mask.shape)}, got {list(value.shape)}")
    if value.device != mask.device:
        raise ValueError(f"{name} is on {value.device} but mask is on {mask.device}; put all inputs on one device")
    return value


def _check_per_response(
    name: str, value: Tensor, batch_size: int, device: torch.device, meaning: str, *, valid: Tensor | None = None
) -> Tensor:
    """A [B] per-response input (or, with ``valid``, a [B, K] one): shape, device and finiteness checked, returned as
    float32. With ``valid`` ([B] bool), only the valid rows must be finite; the others are set to 0."""
    columns = valid is not None
    if value.dim() != 1 + columns or value.shape[0] != batch_size or (columns and value.shape[1] == 0):
        expected = f"[{batch_size}, K], K >= 1" if columns else f"[{batch_size}]"
        raise ValueError(f"{name} must have shape {expected} ({meaning}), got {list(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but mask is on {device}; put all inputs on one device")
    value = value.to(torch.float32)
    if columns:
        value = torch.where(valid[:, None], value, 0.0)
    _require_finite_rows(name, value)
    return value


def _check_float_per_token(name: str, value: Tensor | None, mask: Tensor) -> Tensor | None:
    if value is None:
        return None
    value = _check_per_token(name, value, mask)
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a float tensor, got {value.dtype}")
    return value


@dataclass
class RolloutBatch:
    """A validated batch of B responses of up to T tokens, grouped by prompt.

    Attributes:
        rewards: [B] float32 outcome reward per response (the row sum of ``token_rewards`` when only those are given;
            the plain sum of the components when ``rewards`` was given as [B, K]).
        reward_components: optional [B, K] float32, the K rewards of each response when ``rewards`` was given as
            [B, K]; only multi-reward estimators (GDPO) accept them.
        group_index: [B] long, the prompt group of each row mapped to 0..num_groups-1.
        num_groups: number of distinct groups.
        mask: [B, T] response mask as given (bool, int or float). Values lie in [0, 1]: 1 on response tokens, 0 on
            padding; a value in between weights its token as verl's masked means do.
        token_rewards: optional [B, T] per-token rewards (verl's ``token_level_rewards``).
        entropy, logprobs: optional [B, T] per-token float inputs, read only at mask positions.
        token_ids: optional [B, T] integer response token ids.
        metric: optional [B] per-response metric given directly by the caller.
        greedy_rewards: optional [B] reward of a greedy (``do_sample=False``) response to each row's prompt (ReMax's
            baseline; verl's ``reward_baselines``).
        reference_rewards: optional [B] reward of a response the frozen reference policy sampled for each row's
            prompt (AAPO).
        ref_logprobs: optional [B, T] per-token log-probs of the response under the frozen reference policy (ACE).
        prompt_confidence: optional [B] the policy's confidence in each row's prompt, exp(mean prompt-token log-prob)
            in (0, 1] (ProGRPO).
        human_values: optional [B] the human value v of each row's prompt, >= 0 (RLEV).
        token_scores: optional [B, T] a per-token statistic computed by a producer outside the estimator (OAR's
            importance, IAPO's answer entropy, Q-RM's scores), read only at mask positions.
        indicators: optional [B, K] float32, K per-response indicators computed by a producer outside the
            estimator (VERL's effective rank ERA, ERV, ER); finite on valid rows, 0 on fully masked rows.

    Step inputs (``../shared/specs/steps.md`` §2; per-step ones are checked when the step table reads them):
        turn_ids: [B, T] row-local step index of each token (−1 in no step), ``"mask_runs"`` (one step per run of
            mask > 0) or ``"row"`` (one step per row; the default).
        traj: [B] trajectory id of each row (row-per-step layouts); default: each row its own trajectory.
        step_index: [B] long time position of each row in its trajectory; −1 marks a padding row.
        step_rewards, step_values, step_labels: per-step numbers (turn/environment reward, value at the step's end,
            a verifier's verdict in {−1, 0, 1}).
        anchor, agent, node, parent: per-step ids (environment state, player, tree node and its parent).
        prompt_values: [B] value of the initial state (NaN = absent).
        values: [B, T] critic values; bootstrap_values: [B] value after the last token of a truncated row.
    """

    rewards: Tensor
    group_index: Tensor
    num_groups: int
    mask: Tensor
    token_rewards: Tensor | None = None
    entropy: Tensor | None = None
    logprobs: Tensor | None = None
    token_ids: Tensor | None = None
    metric: Tensor | None = None
    reward_components: Tensor | None = None
    greedy_rewards: Tensor | None = None
    reference_rewards: Tensor | None = None
    ref_logprobs: Tensor | None = None
    prompt_confidence: Tensor | None = None
    human_values: Tensor | None = None
    token_scores: Tensor | None = None
    indicators: Tensor | None = None
    turn_ids: Tensor | str | None = None
    traj: Any = None
    step_index: Tensor | None = None
    step_rewards: Any = None
    anchor: Any = None
    agent: Any = None
    step_values: Any = None
    step_labels: Any = None
    node: Any = None
    parent: Any = None
    prompt_values: Tensor | None = None
    values: Tensor | None = None
    bootstrap_values: Tensor | None = None
    #: [B] largest mask value per row, when validation already computed it (saves a pass over the mask)
    row_max: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @property
    def device(self) -> torch.device:
        return self.mask.device

    @cached_property
    def lengths(self) -> Tensor:
        """[B] float32 number of response tokens (mask positions) per row."""
        return self.mask.sum(-1, dtype=torch.float32)

    @cached_property
    def valid(self) -> Tensor:
        """[B] bool: rows with at least one response token. Fully masked rows take no part in any statistic."""
        if self.row_max is not None:
            return self.row_max > 0
        return self.lengths > 0

    @cached_property
    def grouping(self):
        from canonrl.groups import Grouping

        return Grouping(self.group_index, self.valid, self.num_groups)

    @cached_property
    def steps(self):
        """The :class:`~canonrl.steps.StepTable` of this batch, built on first use."""
        from canonrl.steps import build_step_table

        return build_step_table(
            self.mask,
            self.group_index,
            self.num_groups,
            turn_ids=self.turn_ids,
            traj=self.traj,
            step_index=self.step_index,
        )

    @cached_property
    def nodes(self):
        """The :class:`~canonrl.nodes.NodeTable` of the per-step ``node`` and ``parent`` ids, built on first use."""
        from canonrl.nodes import build_node_table

        if self.node is None or self.parent is None:
            raise ValueError("a tree needs node and parent: one id per step each (a root's parent is None or -1)")
        return build_node_table(self.steps, self.node, self.parent)

    def broadcast(self, scores: Tensor) -> Tensor:
        """[B, T] float32: per-response ``scores`` [B] on every mask position, exactly 0 elsewhere."""
        out = scores[:, None] * self.mask
        return out if out.dtype == torch.float32 else out.float()

    def masked_row_mean(self, name: str) -> Tensor:
        """[B] float32 mean of a per-token input over each row's mask (0 for fully masked rows).

        Raises if the input is NaN/Inf at a mask position; values outside the mask are ignored, whatever they are.
        """
        return torch.where(self.valid, self.masked_row_sum(name) / self.lengths.clamp_min(1), 0.0)

    def masked_row_sum(self, name: str) -> Tensor:
        """[B] float32 sum of a per-token input over each row's mask, checked as :meth:`masked_row_mean`."""
        values = getattr(self, name)
        if values is None:
            raise ValueError(f"{name} is required here but was not given")
        row_sum = (values * self.mask).sum(-1, dtype=torch.float32)
        bad = ~torch.isfinite(row_sum)
        if bad.any():
            # Slow path only for the offending rows: NaN outside the mask is legal (padding), inside it is not.
            rows = bad.nonzero().flatten()
            inside = self.mask[rows] != 0
            finite_inside = torch.isfinite(values[rows]) | ~inside
            broken = torch.zeros_like(bad)
            broken[rows] = ~finite_inside.all(-1)
            if broken.any():
                raise ValueError(f"{name} is NaN or Inf inside the mask at rows {describe_rows(broken)}")
            row_sum[rows] = torch.where(inside, values[rows] * self.mask[rows], 0).sum(-1, dtype=torch.float32)
        return row_sum


def _row_max(mask: Tensor) -> Tensor:
    """[B] largest mask value per row, reading only the ends of left- or right-padded rows.

    A row whose first or last position is in the mask has a token; only rows where both ends are 0 (fully masked
    rows, or holes at both ends) are scanned in full.
    """
    ends = torch.maximum(mask[:, 0], mask[:, -1])
    unsure = (ends == 0).nonzero().flatten()
    if unsure.numel():
        ends = ends.clone()
        ends[unsure] = mask[unsure].amax(-1)
    return ends


def make_batch(
    *,
    rewards: Tensor | Sequence[float] | None = None,
    group: Any = None,
    mask: Tensor | None = None,
    token_rewards: Tensor | None = None,
    entropy: Tensor | None = None,
    logprobs: Tensor | None = None,
    token_ids: Tensor | None = None,
    metric: Tensor | None = None,
    greedy_rewards: Tensor | None = None,
    reference_rewards: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    prompt_confidence: Tensor | None = None,
    human_values: Tensor | None = None,
    token_scores: Tensor | None = None,
    indicators: Tensor | None = None,
    **step_inputs: Any,
) -> RolloutBatch:
    """Validate raw inputs and build a :class:`RolloutBatch` (see its attributes for shapes)."""
    if mask is None:
        raise ValueError("mask is required: a [B, T] response mask (1 on response tokens, 0 on padding)")
    mask = _require_tensor("mask", mask)
    if mask.dim() != 2:
        raise ValueError(f"mask must have shape [B, T], got {list(mask.shape)}")
    if mask.is_complex():
        raise TypeError(f"mask must be bool, integer or float, got {mask.dtype}")
    batch_size, device = mask.shape[0], mask.device

    if token_rewards is not None:
        token_rewards = _check_per_token("token_rewards", token_rewards, mask)
        if not token_rewards.dtype.is_floating_point and token_rewards.dtype != torch.bool:
            token_rewards = token_rewards.float()
        _require_finite_rows("token_rewards", token_rewards.float())
        if rewards is None:
            rewards = (token_rewards * mask).sum(-1, dtype=torch.float32)
    if rewards is None:
        raise ValueError("rewards is required: one outcome reward per response, shape [B]")
    if not isinstance(rewards, Tensor):
        rewards = torch.as_tensor(rewards, device=device)
    if rewards.is_complex():
        raise TypeError(f"rewards must be real numbers or bool, got {rewards.dtype}")
    reward_components = None
    if rewards.dim() == 2 and rewards.shape[0] == batch_size:
        if rewards.shape[1] == 0:
            raise ValueError(f"rewards of shape [B, K] needs K >= 1 reward components, got {list(rewards.shape)}")
        if rewards.device != device:
            raise ValueError(f"rewards is on {rewards.device} but mask is on {device}; put all inputs on one device")
        reward_components = rewards.to(torch.float32)
        _require_finite_rows("rewards", reward_components)
        rewards = reward_components.sum(-1)
    rewards = _check_per_response("rewards", rewards, batch_size, device, "one per mask row, or [B, K] components")

    row_max = None
    if batch_size and mask.numel():
        if mask.dtype != torch.bool:
            low, high = torch.aminmax(mask)  # one vectorized pass; a per-row aminmax is not vectorized
            if low < 0 or high > 1:
                bad = ((mask < 0) | (mask > 1)).any(-1)
                raise ValueError(f"mask must hold values in [0, 1] (1 = response token), not at rows {describe_rows(bad)}")
        row_max = _row_max(mask)
    if group is None:
        raise ValueError("group is required: one prompt/group id per row (int tensor or list of ids, e.g. uids)")
    group_index, num_groups = encode_groups(group, batch_size, device)

    entropy = _check_float_per_token("entropy", entropy, mask)
    logprobs = _check_float_per_token("logprobs", logprobs, mask)
    if token_ids is not None:
        token_ids = _check_per_token("token_ids", token_ids, mask)
        if token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool:
            raise TypeError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
    ref_logprobs = _check_float_per_token("ref_logprobs", ref_logprobs, mask)
    token_scores = _check_float_per_token("token_scores", token_scores, mask)
    per_response = {
        "metric": (metric, "one value per response"),
        "greedy_rewards": (greedy_rewards, "the greedy response's reward for each row's prompt"),
        "reference_rewards": (reference_rewards, "the reference policy's response reward for each row's prompt"),
        "prompt_confidence": (prompt_confidence, "one prompt confidence per row"),
        "human_values": (human_values, "the human value v of each row's prompt"),
    }
    checked = {
        name: _check_per_response(name, _require_tensor(name, value), batch_size, device, meaning)
        for name, (value, meaning) in per_response.items()
        if value is not None
    }
    if indicators is not None:
        valid = row_max > 0 if row_max is not None else torch.zeros(batch_size, dtype=torch.bool, device=device)
        meaning = "K indicators per response from a producer"
        checked["indicators"] = _check_per_response(
            "indicators", _require_tensor("indicators", indicators), batch_size, device, meaning, valid=valid
        )
    confidence = checked.get("prompt_confidence")
    bad = None if confidence is None else (confidence <= 0) | (confidence > 1)
    if bad is not None and bad.any():
        raise ValueError(
            f"prompt_confidence must lie in (0, 1] (exp of a mean log-prob), not at rows {describe_rows(bad)}"
        )

    step_fields = _check_step_inputs(step_inputs, mask, batch_size, device)
    return RolloutBatch(
        rewards=rewards,
        group_index=group_index,
        num_groups=num_groups,
        mask=mask,
        token_rewards=token_rewards,
        entropy=entropy,
        logprobs=logprobs,
        token_ids=token_ids,
        reward_components=reward_components,
        ref_logprobs=ref_logprobs,
        token_scores=token_scores,
        row_max=row_max,
        **checked,
        **step_fields,
    )


def _check_step_inputs(inputs: dict[str, Any], mask: Tensor, batch_size: int, device: torch.device) -> dict[str, Any]:
    """The step inputs whose shape is known before the step table exists, checked; the per-step ones as given."""
    unknown = sorted(set(inputs) - set(STEP_FIELDS))
    if unknown:
        raise TypeError(f"make_batch got an unknown input {unknown[0]!r}")
    out = {name: value for name, value in inputs.items() if value is not None}
    turn_ids = out.get("turn_ids")
    if isinstance(turn_ids, Tensor):
        _check_per_token("turn_ids", turn_ids, mask)
    elif turn_ids is not None and not isinstance(turn_ids, str):
        raise TypeError(f"turn_ids must be a [B, T] int tensor, 'mask_runs' or 'row', got {type(turn_ids).__name__}")
    if "values" in out:
        out["values"] = _check_float_per_token("values", out["values"], mask)
    if "bootstrap_values" in out:
        value = _require_tensor("bootstrap_values", out["bootstrap_values"])
        out["bootstrap_values"] = _check_per_response("bootstrap_values", value, batch_size, device, "one per row")
    if "prompt_values" in out:  # NaN means "absent" here (SPO), so only the shape is checked
        value = _require_tensor("prompt_values", out["prompt_values"])
        if value.shape != (batch_size,) or value.device != device:
            raise ValueError(f"prompt_values must have shape [{batch_size}] on {device}, got {list(value.shape)}")
        out["prompt_values"] = value.float()
    if "step_index" in out:
        index = _require_tensor("step_index", out["step_index"])
        if index.dtype.is_floating_point or index.dtype == torch.bool or index.shape != (batch_size,):
            raise ValueError(f"step_index must be a [{batch_size}] integer tensor (−1 = padding row)")
        bad = index < -1
        if bad.any():
            raise ValueError(f"step_index must be >= -1 (−1 = padding row), not at rows {describe_rows(bad)}")
        out["step_index"] = index.to(device).long()
    return out
