"""The estimator registry and the one entry point, :func:`advantages`.

An estimator is a class with a name, a one-line description, its paper, the batch inputs it needs beyond
``rewards``/``group``/``mask``, and a ``Params`` dataclass holding its hyperparameters with defaults. Instances are
callable on a :class:`~canonrl.batch.RolloutBatch` and may keep state across calls (a step counter for schedules),
which :meth:`Estimator.state_dict` / :meth:`Estimator.load_state_dict` save and restore.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from canonrl.batch import BATCH_FIELDS, RolloutBatch, make_batch


@dataclass(frozen=True)
class Paper:
    title: str
    arxiv: str

    def __str__(self) -> str:
        return f"{self.title} (arXiv {self.arxiv})"

    @property
    def short_title(self) -> str:
        """The title up to its first colon (``"DAPO"`` for ``"DAPO: An Open-Source LLM ..."``)."""
        return self.title.split(":")[0].strip()


@dataclass(frozen=True)
class Hyperparameter:
    name: str
    default: Any
    help: str


@dataclass(frozen=True)
class EstimatorInfo:
    """What the registry knows about one estimator."""

    name: str
    description: str
    paper: Paper | None
    level: str
    requires: tuple[str, ...]
    hyperparameters: tuple[Hyperparameter, ...]
    verified: bool
    multi_reward: bool = False
    stateful: bool = False
    critic: bool = False
    layouts: tuple[str, ...] = ("row-per-response",)
    #: At the default hyperparameters: a response's advantage depends only on its own prompt group's rows.
    group_local: bool = True
    #: At the default hyperparameters: the rewards it accepts on valid rows (others raise ValueError).
    reward_range: tuple[float, float] = (-math.inf, math.inf)
    #: It runs a ``base`` estimator (hyperparameters ``base``/``base_params``) and reshapes its advantages.
    wraps_base: bool = False
    #: The scale alignment ``canonrl simulate`` compares it with the truth after: "centred", "z" or "fit".
    simulator_alignment: str = "fit"
    #: Where it runs: library, lab, verl, TRL, with their conditions (the README's "works in" column).
    works_in: str = "library"
    #: What it reads beyond rewards, group and mask, where ``requires`` does not say it all (alternatives, optional
    #: inputs); None: ``requires``.
    inputs_note: str | None = None
    #: What produces an input that no rollout gives (a model pass or a second model); None: the rollout gives all.
    producer: str | None = None

    @property
    def inputs(self) -> tuple[str, ...]:
        return ("rewards", "group", "mask", *self.requires)

    @property
    def outcome_level(self) -> bool:
        """One outcome reward per response and no critic: what the simulator, and verl's and TRL's outcome paths
        (which give no steps, trajectories or values), can feed."""
        return self.level != "step" and not self.critic


#: How ``canonrl simulate`` aligns an estimator's scale with the truth r - p (see :mod:`canonrl.simulate.measures`).
SIMULATOR_ALIGNMENTS = ("centred", "z", "fit")
#: Where an outcome-level estimator runs unless it says otherwise (``Estimator.works_in``).
OUTCOME_WORKS_IN = "library, lab, verl, TRL"
#: Where a step or critic estimator runs unless it says otherwise: the lab's multi-turn tasks, verl's agent-loop
#: layout (a trajectory per row: the canonrl_* v1 trainers or the patch), TRL's tool-using completions (turns from
#: the tool mask, per-turn inputs from a subclass hook).
STEP_WORKS_IN = "library, lab (multi-turn tasks), verl (agent-loop layout), TRL (tool turns; per-turn inputs by hook)"
#: Where a critic estimator runs: where a critic gives its ``values`` (TRL's GRPOTrainer has none).
CRITIC_WORKS_IN = "library, lab (critic=head|separate), verl (agent-loop layout, verl's critic); TRL: no"
#: Where a tree estimator runs: the lab's branched episodes; no trainer records rollout trees.
TREE_WORKS_IN = "library, lab (branching); verl, TRL: no"
#: Where an estimator reading a solver's step values or labels runs: the lab's lab-grid (its BFS solver).
SOLVER_WORKS_IN = "library, lab (task=grid's solver), TRL (values or labels by hook); verl: no"
#: The default ``Estimator.reward_range``: every finite reward.
ANY_REWARD = (-math.inf, math.inf)


def param(default: Any, help: str) -> Any:
    """A hyperparameter field with a default and a one-line help text."""
    return dataclasses.field(default=default, metadata={"help": help})


class Estimator(ABC):
    """Base class of every estimator. Subclasses set the class attributes and implement :meth:`compute`."""

    name: ClassVar[str]
    description: ClassVar[str]
    paper: ClassVar[Paper | None] = None
    #: "sequence" (one scalar per response, broadcast over its tokens), "token", or "step" (one scalar per step:
    #: turn, environment step or segment, see :mod:`canonrl.steps`).
    level: ClassVar[str] = "sequence"
    #: Batch inputs needed beyond rewards, group and mask; may depend on hyperparameters (see ``required_inputs``).
    requires: ClassVar[tuple[str, ...]] = ()
    #: False for a "best reading" of a method whose paper or code could not be fully checked.
    verified: ClassVar[bool] = True
    #: True if it reads the K reward components of ``rewards`` given as [B, K] (GDPO); others reject [B, K].
    multi_reward: ClassVar[bool] = False
    #: True if its output depends on the batches of earlier calls (a history), not only on this batch and the step.
    stateful: ClassVar[bool] = False
    #: True if it reads a critic's ``values`` and returns real value targets from :meth:`compute_with_returns`.
    critic: ClassVar[bool] = False
    #: The batch layouts it is defined on: "row-per-response", "row-per-trajectory" (turns are token spans of one
    #: row), "row-per-step" (each row one step of a trajectory).
    layouts: ClassVar[tuple[str, ...]] = ("row-per-response",)
    #: True if it runs a ``base`` estimator (hyperparameters ``base`` and ``base_params``, a sequence-level
    #: estimator's name and its hyperparameters) and reshapes its advantages; such an estimator keeps the configured
    #: base in ``self.base``.
    wraps_base: ClassVar[bool] = False
    #: The scale alignment ``canonrl simulate`` measures it after (:mod:`canonrl.simulate.measures`): "centred"
    #: (a baseline is subtracted and the reward's scale kept), "z" (divided by the group's reward std) or "fit" (a
    #: batch statistic or a design choice sets the scale: the best constant rescaling is fitted).
    simulator_alignment: ClassVar[str] = "fit"
    #: Where it runs, for the README's table: None means "library, lab, verl, TRL" for an outcome-level estimator
    #: (the lab supplies, verl's entry point registers and TRL's trainer feeds what it asks for) and "library" for
    #: the others; say otherwise where an integration needs a patch, renames it or cannot feed an input.
    works_in: ClassVar[str | None] = None
    #: The README's text for its inputs beyond rewards, group and mask where ``requires`` does not say it all
    #: (alternatives, optional inputs, layout ids); None lists ``requires``.
    inputs_note: ClassVar[str | None] = None
    #: What produces an input that no rollout gives, e.g. "answer entropy per prefix: one forward pass per prefix";
    #: None when the rollout (rewards, log-probs, entropies, ids) gives everything it reads.
    producer: ClassVar[str | None] = None
    #: For a tree estimator (``node``/``parent`` in ``requires``): what its steps are — "segments" (the pieces of a
    #: row between branch points, with ``node``/``parent`` per segment) or "completions" (one step per row: ``node``
    #: is the prefix the row's last piece starts from, ``parent`` that prefix's parent), as a lab rollout gives them.
    tree_steps: ClassVar[str] = "segments"
    #: Old spellings still accepted, with a DeprecationWarning: hyperparameter old name -> new name, and batch
    #: input new name -> the old field it was passed as.
    renamed_params: ClassVar[dict[str, str]] = {}
    renamed_inputs: ClassVar[dict[str, str]] = {}

    @dataclass
    class Params:
        pass

    def __init__(self, **hyperparameters: Any) -> None:
        for old, new in self.renamed_params.items():
            if old in hyperparameters:
                warnings.warn(
                    f"estimator {self.name!r}: the hyperparameter {old!r} is now {new!r}", DeprecationWarning, stacklevel=3
                )
                hyperparameters.setdefault(new, hyperparameters.pop(old))
        known = {f.name for f in dataclasses.fields(self.Params)}
        unknown = sorted(set(hyperparameters) - known)
        if unknown:
            raise TypeError(
                f"unknown hyperparameter {unknown[0]!r} for estimator {self.name!r}; valid: {sorted(known) or 'none'}"
            )
        self.params = self.Params(**hyperparameters)
        self.step = 0

    def required_inputs(self) -> tuple[str, ...]:
        """The optional batch inputs this configured instance reads."""
        return self.requires

    # --- state across calls (checkpoints) ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What it carries from call to call, as plain Python values and tensors (``torch.load(...,
        weights_only=True)`` reads it back): its name and the call counter ``step``; estimators with a history (and
        wrappers, whose base may have one) add theirs. The hyperparameters are not part of it."""
        return {"estimator": self.name, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` of an estimator of the same name (ValueError for another's, or one
        with missing or unexpected keys)."""
        self._check_state(state)
        self.step = state["step"]

    def _check_state(self, state: Any) -> None:
        """Raise ValueError unless ``state`` is a state dict of this estimator with exactly its keys."""
        if not isinstance(state, dict):
            raise ValueError(f"estimator {self.name!r} state must be a dict, got {type(state).__name__}")
        if state.get("estimator") != self.name:
            raise ValueError(
                f"cannot load a state of estimator {state.get('estimator')!r} into estimator {self.name!r}"
            )
        expected = set(self.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected, key=str)
        if missing or unexpected:
            parts = ([f"missing keys {missing}"] if missing else []) + (
                [f"unexpected keys {unexpected}"] if unexpected else []
            )
            raise ValueError(f"estimator {self.name!r} state: {', '.join(parts)}")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"estimator {self.name!r} state: step must be an int, got {step!r}")

    # --- facts about this configured instance (read by the property tests, the simulator and the README) --------
    @property
    def batch_level_reason(self) -> str | None:
        """Why a row's advantage depends on rows outside its prompt group with these hyperparameters (a batch
        statistic, a batch-wide random grouping), or None when it does not; estimators override it."""
        return None

    @property
    def group_local(self) -> bool:
        """True when a row's advantage depends only on the rows of its own prompt group (so groups can be split
        across calls); False where :attr:`batch_level_reason` gives a reason."""
        return self.batch_level_reason is None

    @property
    def reward_range(self) -> tuple[float, float]:
        """The closed interval of rewards it accepts on valid rows with these hyperparameters (a reward outside it
        raises ValueError): (-inf, inf) unless it reads rewards as accuracies or divides by their mean."""
        return ANY_REWARD

    @property
    def z_score_bound(self) -> float | None:
        """For an estimator that divides reward deviations by their group's std plus ``eps`` (a hyperparameter): a
        bound on the factor it multiplies those z-scores by (1 for a plain z-score); None for the others. The
        property tests size their float32 tolerance by it (the rewards' rounding over the smallest group std)."""
        return None

    def __call__(self, batch: RolloutBatch | None = None, /, *, step: int | None = None, **fields: Any) -> Tensor:
        """Token-level advantages [B, T] (float32, 0 outside the mask) for a batch or raw batch fields.

        ``step`` is the trainer step (1-based, as verl's ``global_steps``); when omitted the estimator counts its
        own calls.
        """
        return self.compute_with_returns(batch, step=step, **fields)[0]

    def compute_with_returns(
        self, batch: RolloutBatch | None = None, /, *, step: int | None = None, **fields: Any
    ) -> tuple[Tensor, Tensor]:
        """(advantages, returns), both [B, T] float32, 0 outside the mask.

        Critic estimators (GAE and relatives) return the value targets a critic trains on; the others return the
        advantages twice, as verl's critic-free estimators do.
        """
        batch = self._checked_batch(batch, step, fields)
        if batch.batch_size == 0:
            empty = torch.zeros(batch.mask.shape, dtype=torch.float32, device=batch.device)
            return empty, empty
        return self.compute_returns(batch)

    def compute_returns(self, batch: RolloutBatch) -> tuple[Tensor, Tensor]:
        """(advantages, returns) for a non-empty validated batch; critic estimators override it."""
        advantages = self.compute(batch)
        return advantages, advantages

    def _checked_batch(self, batch: RolloutBatch | None, step: int | None, fields: dict[str, Any]) -> RolloutBatch:
        if batch is None:
            batch = make_batch(**fields)
        elif fields:
            raise TypeError("pass either a RolloutBatch or batch fields, not both")
        for new, old in self.renamed_inputs.items():
            if getattr(batch, new) is None and getattr(batch, old) is not None:
                warnings.warn(
                    f"estimator {self.name!r} reads {new!r} now; passing it as {old!r} is deprecated",
                    DeprecationWarning, stacklevel=4,
                )  # fmt: skip
                batch = dataclasses.replace(batch, **{new: getattr(batch, old), old: None})
        for name in self.required_inputs():
            if getattr(batch, name) is None:
                raise ValueError(f"estimator {self.name!r} needs {name!r}, which was not given")
        if batch.reward_components is not None and not self.multi_reward:
            raise ValueError(
                f"rewards has shape {list(batch.reward_components.shape)} (K reward components per response), but "
                f"estimator {self.name!r} takes one reward per response: combine them first, or use a multi-reward "
                f"estimator (gdpo)"
            )
        self.step = self.step + 1 if step is None else int(step)
        return batch

    @abstractmethod
    def compute(self, batch: RolloutBatch) -> Tensor:
        """Token-level advantages [B, T] for a non-empty validated batch."""

    @classmethod
    def info(cls) -> EstimatorInfo:
        defaults = cls()
        outcome_level = cls.level != "step" and not cls.critic
        return EstimatorInfo(
            name=cls.name,
            description=cls.description,
            paper=cls.paper,
            level=cls.level,
            requires=cls.requires,
            hyperparameters=tuple(
                Hyperparameter(f.name, f.default, f.metadata.get("help", "")) for f in dataclasses.fields(cls.Params)
            ),
            verified=cls.verified,
            multi_reward=cls.multi_reward,
            stateful=cls.stateful,
            critic=cls.critic,
            layouts=cls.layouts,
            group_local=defaults.group_local,
            reward_range=defaults.reward_range,
            wraps_base=cls.wraps_base,
            simulator_alignment=cls.simulator_alignment,
            works_in=cls.works_in or (OUTCOME_WORKS_IN if outcome_level else STEP_WORKS_IN),
            inputs_note=cls.inputs_note,
            producer=cls.producer,
        )


class SequenceEstimator(Estimator):
    """An estimator that gives one scalar per response, broadcast to the response's tokens."""

    def compute(self, batch: RolloutBatch) -> Tensor:
        scores = self.sequence_advantages(batch)
        return batch.broadcast(scores)

    @abstractmethod
    def sequence_advantages(self, batch: RolloutBatch) -> Tensor:
        """[B] float32 advantage per response; 0 for rows that are not valid."""


class StepEstimator(Estimator):
    """An estimator that gives one scalar per step of the batch's step table, broadcast to the step's tokens.

    Every copy of a repeated ``(traj, step_index)`` receives its step's advantage; tokens in no step get 0.
    """

    level = "step"
    layouts = ("row-per-step", "row-per-trajectory")
    #: The turns of a batch that names none (no ``turn_ids``, ``traj`` or ``step_index``): "row" (each row is one
    #: step) or "mask_runs" (for row-per-trajectory methods whose official code cuts turns at the mask's runs).
    default_turns: ClassVar[str] = "row"

    def compute(self, batch: RolloutBatch) -> Tensor:
        return self.compute_returns(batch)[0]

    def compute_returns(self, batch: RolloutBatch) -> tuple[Tensor, Tensor]:
        if self.default_turns != "row" and batch.turn_ids is None and batch.traj is None and batch.step_index is None:
            batch = dataclasses.replace(batch, turn_ids=self.default_turns)
        steps = batch.steps
        per_step, returns = self.step_advantages_and_returns(batch)
        advantages = steps.broadcast(per_step)
        if returns is per_step:
            return advantages, advantages
        return advantages, steps.broadcast(torch.where(steps.member, returns, 0.0))

    @abstractmethod
    def step_advantages(self, batch: RolloutBatch) -> Tensor:
        """[S] float32 advantage per step of ``batch.steps``; 0 for steps without mask mass."""

    def step_advantages_and_returns(self, batch: RolloutBatch) -> tuple[Tensor, Tensor]:
        """([S] advantages, [S] returns); estimators whose official code returns turn returns override it."""
        advantages = self.step_advantages(batch)
        return advantages, advantages


class CriticEstimator(Estimator):
    """A token-level estimator that reads a critic's ``values`` and returns real value targets."""

    level = "token"
    works_in = CRITIC_WORKS_IN
    requires = ("values",)
    critic = True

    def compute(self, batch: RolloutBatch) -> Tensor:
        return self.compute_returns(batch)[0]

    @abstractmethod
    def compute_returns(self, batch: RolloutBatch) -> tuple[Tensor, Tensor]:
        """(advantages, value targets), both [B, T] float32, 0 off the mask."""


_REGISTRY: dict[str, type[Estimator]] = {}


def register(cls: type[Estimator]) -> type[Estimator]:
    """Class decorator adding an estimator to the registry under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"an estimator named {cls.name!r} is already registered")
    if cls.simulator_alignment not in SIMULATOR_ALIGNMENTS:
        raise ValueError(
            f"estimator {cls.name!r}: simulator_alignment must be one of {', '.join(SIMULATOR_ALIGNMENTS)}, "
            f"got {cls.simulator_alignment!r}"
        )
    _REGISTRY[cls.name] = cls
    return cls


def estimator_class(name: str) -> type[Estimator]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown estimator {name!r}; choose from: {', '.join(sorted(_REGISTRY))}") from None


def get_estimator(name: str, **hyperparameters: Any) -> Estimator:
    """An estimator instance by registry name, e.g. ``get_estimator("canon", mu="cosine-first-inter-later-intra")``."""
    return estimator_class(name)(**hyperparameters)


def estimators() -> list[EstimatorInfo]:
    """Every registered estimator with its description, paper, inputs and hyperparameters, sorted by name."""
    return [_REGISTRY[name].info() for name in sorted(_REGISTRY)]


def advantages(name: str, *, step: int | None = None, **kwargs: Any) -> Tensor:
    """Token-level advantages [B, T] from the estimator ``name``.

    Keyword arguments named like batch fields (``rewards``, ``group``, ``mask``, ``token_rewards``, ``entropy``,
    ``logprobs``, ``token_ids``, ``metric`` as a tensor) are the batch; the rest are the estimator's
    hyperparameters. A per-response ``metric`` tensor also selects ``split_by="given"`` for estimators that regroup
    by a metric (CANON), unless ``split_by`` is given.
    """
    fields = {k: v for k, v in kwargs.items() if k in BATCH_FIELDS}
    hyperparameters = {k: v for k, v in kwargs.items() if k not in BATCH_FIELDS}
    cls = estimator_class(name)
    if isinstance(fields.get("metric"), str):  # the old spelling of a hyperparameter (CANON's split_by)
        hyperparameters["metric"] = fields.pop("metric")
    elif "metric" in fields and "split_by" in {f.name for f in dataclasses.fields(cls.Params)}:
        hyperparameters.setdefault("split_by", "given")
    return cls(**hyperparameters)(step=step, **fields)
