"""Measuring estimators against the truth: a rollout simulator with known advantages (``canonrl simulate``).

- :mod:`canonrl.simulate.model`: prompts with known success probabilities, rewards, lengths, entropies and the other
  estimator inputs (:class:`RolloutModel`, :func:`simulate_batch`).
- :mod:`canonrl.simulate.measures`: bias and variance against the true advantage r - p (after each estimator's
  scale alignment), sign errors, exact zeros, weight by difficulty (:func:`measure`).
- :mod:`canonrl.simulate.amplification`: CANON's inter-group amplification against the metric-reward correlation and
  the split's balance, and its invariance to an independent condition (:func:`amplification_study`).
- :func:`run_simulation` sweeps estimators x group sizes; :mod:`canonrl.simulate.report` writes the report folder.

Depends on the estimator core only (matplotlib for the report's plots).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from canonrl.simulate.amplification import AmplificationStudy, ConditionModel, amplification_study
from canonrl.simulate.measures import Measures, alignment_of, estimator_advantages, measure
from canonrl.simulate.model import RolloutModel, SimulatedBatch, simulate_batch

__all__ = [
    "RolloutModel",
    "ConditionModel",
    "SimulationConfig",
    "SimulationResult",
    "Measures",
    "SimulatedBatch",
    "simulate_batch",
    "measure",
    "run_simulation",
    "amplification_study",
]

DEFAULT_GROUP_SIZES = (2, 4, 8, 16, 32, 64)


@dataclass
class SimulationConfig:
    estimators: tuple[str, ...] = ()  # empty: every registered estimator
    group_sizes: tuple[int, ...] = DEFAULT_GROUP_SIZES
    responses: int = 32768  # simulated responses per (estimator, group size): responses // G groups
    seed: int = 0
    model: RolloutModel = field(default_factory=RolloutModel)
    conditions: ConditionModel = field(default_factory=ConditionModel)
    amplification_group_size: int = 16
    params: dict[str, dict] = field(default_factory=dict)  # estimator -> hyperparameters
    align: dict[str, str] = field(default_factory=dict)  # estimator -> alignment override

    def validate(self) -> SimulationConfig:
        from canonrl.registry import estimator_class

        for name in self.estimators:
            estimator_class(name)  # raises a one-line error naming the known estimators
        bad = [g for g in self.group_sizes if int(g) != g or g < 1]
        if bad or not self.group_sizes:
            raise ValueError(f"group sizes must be integers >= 1, got {list(self.group_sizes)}")
        if self.responses < max(self.group_sizes):
            raise ValueError(f"responses ({self.responses}) must be at least the largest group size")
        if self.amplification_group_size < 2:
            raise ValueError(f"amplification_group_size must be >= 2, got {self.amplification_group_size}")
        unknown = sorted(set(self.params) - set(self.names()))
        if unknown:
            raise ValueError(f"params given for estimators not in the sweep: {', '.join(unknown)}")
        from canonrl.registry import get_estimator

        for name in self.names():
            alignment_of(name, self.align)
            try:
                get_estimator(name, **self.params.get(name, {}))
            except TypeError as error:  # an unknown hyperparameter or a bad value
                raise ValueError(str(error).splitlines()[0]) from None
        self.model.validate()
        self.conditions.validate()
        return self

    def names(self) -> list[str]:
        from canonrl.registry import estimators

        return list(self.estimators) or [info.name for info in estimators() if info.outcome_level]


@dataclass
class SimulationResult:
    config: SimulationConfig
    measures: list[Measures]
    amplification: AmplificationStudy
    seconds: float


def run_simulation(config: SimulationConfig, progress: Callable[[str], None] | None = None) -> SimulationResult:
    """Every estimator x group size on its own simulated batch (the same batch for every estimator at one group size:
    each (group size) batch is drawn from a generator seeded by (seed, G)), then the CANON amplification study."""
    import time

    from canonrl.registry import get_estimator

    config.validate()
    started = time.perf_counter()
    names = config.names()
    results: list[Measures] = []
    for group_size in config.group_sizes:
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + group_size)
        batch = simulate_batch(config.model, config.responses // group_size, group_size, generator)
        for name in names:
            if progress:
                progress(f"{name}, G = {group_size}")
            estimator = get_estimator(name, **config.params.get(name, {}))
            advantages = estimator_advantages(estimator, batch)
            results.append(measure(name, advantages, batch, alignment_of(name, config.align)))
    if progress:
        progress("CANON amplification")
    study = amplification_study(
        config.model,
        config.conditions,
        group_size=config.amplification_group_size,
        generator=torch.Generator().manual_seed(config.seed * 1_000_003 + 999_983),
    )
    return SimulationResult(config, results, study, time.perf_counter() - started)
