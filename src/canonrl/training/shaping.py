"""Reward shaping applied before an estimator: DAPO's soft overlong punishment.

Paper: "DAPO: An Open-Source LLM Reinforcement Learning System at Scale" (arXiv 2503.14476), Eq. 13.
"""

from __future__ import annotations

from torch import Tensor

#: DAPO's published settings: expected maximum 16,384 tokens plus a 4,096-token punishment buffer.
DAPO_MAX_LENGTH = 20480
DAPO_BUFFER_LENGTH = 4096


def overlong_penalty(
    lengths: Tensor,
    *,
    max_length: int = DAPO_MAX_LENGTH,
    buffer_length: int = DAPO_BUFFER_LENGTH,
    penalty_factor: float = 1.0,
) -> Tensor:
    """Soft overlong punishment R_len(L), to be added to the correctness reward.

    0 for L <= max_length - buffer_length; ((max_length - buffer_length) - L) / buffer_length inside the buffer
    (falling linearly to -1 at L = max_length); -1 beyond max_length. Scaled by ``penalty_factor`` (verl's
    ``overlong_buffer.penalty_factor``).
    """
    if max_length <= 0 or buffer_length <= 0 or buffer_length > max_length:
        raise ValueError(
            f"overlong_penalty needs 0 < buffer_length <= max_length, got max_length={max_length}, "
            f"buffer_length={buffer_length}"
        )
    expected = max_length - buffer_length
    penalty = ((expected - lengths.float()) / buffer_length).clamp(-1.0, 0.0)
    return penalty * penalty_factor
