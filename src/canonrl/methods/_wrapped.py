"""What the estimators that reshape a base estimator's advantages share (rlev, hadw, capo, adora, progrpo, ace)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from canonrl.batch import RolloutBatch
from canonrl.registry import Estimator, SequenceEstimator, estimator_class

BASE_HELP = "sequence-level estimator giving A_i (grpo, dr_grpo, rloo, dapo, canon, ...)"
BASE_PARAMS_HELP = "hyperparameters of the base estimator, e.g. {'std': 'population'}"


def base_batch_level_reason(base: Estimator) -> str | None:
    """A wrapper's reason to be batch-level inherited from its base (None when the base is group-local)."""
    reason = base.batch_level_reason
    return None if reason is None else f"its base {base.name!r} is batch-level ({reason})"


def check_base(name: str, wrapper: str | None = None) -> None:
    """Raise unless ``name`` is a registered sequence-level estimator (other than ``wrapper`` itself)."""
    if name == wrapper:
        raise ValueError(f"base must be another estimator than {wrapper!r}")
    base = estimator_class(name)
    if not issubclass(base, SequenceEstimator):
        raise ValueError(f"base must be a sequence-level estimator, {name!r} is {base.level}-level")


class HasBase:
    """Mixin of the estimators that run a ``base`` estimator (``Params.base`` / ``base_params``) and reshape its
    advantages: the base is built once, its inputs are read too, its state is checkpointed with this one's, and this
    estimator is as group-local as its base and accepts the rewards its base accepts (a subclass with a batch
    statistic or a reward domain of its own extends :attr:`batch_level_reason` / :attr:`reward_range`)."""

    wraps_base = True

    def __init__(self, **hyperparameters: Any) -> None:
        super().__init__(**hyperparameters)
        self.base: Estimator = estimator_class(self.params.base)(**(self.params.base_params or {}))

    def required_inputs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.requires + self.base.required_inputs()))

    def state_dict(self) -> dict[str, Any]:
        """The step and the base estimator's state (a base may keep a history: hadw)."""
        return {**super().state_dict(), "base": self.base.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state)
        self.base.load_state_dict(state["base"])
        super().load_state_dict(state)

    @property
    def batch_level_reason(self) -> str | None:
        return base_batch_level_reason(self.base)

    @property
    def reward_range(self) -> tuple[float, float]:
        return self.base.reward_range


class WrapsBase(HasBase, SequenceEstimator):
    """A sequence-level estimator that modifies the sequence-level advantages of a ``base`` estimator."""

    def base_advantages(self, batch: RolloutBatch) -> Tensor:
        """[B] float32 advantages of the base estimator at this estimator's step."""
        for name in self.base.required_inputs():
            if getattr(batch, name) is None:
                raise ValueError(
                    f"estimator {self.name!r} (base {self.base.name!r}) needs {name!r}, which was not given"
                )
        self.base.step = self.step
        return self.base.sequence_advantages(batch).float()
