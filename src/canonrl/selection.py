"""Which groups carry a learning signal: DAPO's dynamic-sampling filter.

Paper: "DAPO: An Open-Source LLM Reinforcement Learning System at Scale" (arXiv 2503.14476), Sec. 3.2.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from canonrl.batch import encode_groups
from canonrl.groups import Grouping


def dynamic_sampling_keep(metric: Tensor, group: Any, *, keep_singletons: bool = True) -> Tensor:
    """[B] bool: True for rows of groups whose ``metric`` (e.g. accuracy) is not the same for every response.

    DAPO over-samples prompts and trains only on groups whose metric varies: an all-correct or all-wrong group
    gives GRPO zero advantage and only dilutes the batch. verl's DAPO trainer filters on ``acc`` and keeps
    single-response groups (``keep_singletons=True``).
    """
    if metric.dim() != 1:
        raise ValueError(f"metric must have shape [B], got {list(metric.shape)}")
    index, num_groups = encode_groups(group, metric.shape[0], metric.device)
    grouping = Grouping(index, index >= 0, num_groups)
    constant = grouping.gather(grouping.is_constant(metric.float()))
    if keep_singletons:
        constant = constant & ~grouping.singleton
    return ~constant
