"""Paired statistics over seeds for `canonrl compare` and `canonrl claims`: metrics of a run, paired differences
with a bootstrap CI and a permutation p-value, and the verdict of a pre-stated test.

Metrics of a run (`metric_value`), read from its evaluation records (``metrics.jsonl`` / ``summary.json``):

- ``<path>``: a dotted path into the final eval record: ``accuracy``, ``pass_at_k.16``, ``tokens_per_correct``,
  ``length_incorrect``, ``budget_accuracy.64``, ``by_difficulty.8.accuracy``. A segment ``{6,7,8}`` averages the
  path over those keys (unweighted, over the keys present): ``by_difficulty.{6,7,8}.accuracy``.
- ``initial:<path>``: the same in the evaluation before training (step 0).
- ``gain:<path>``: final minus initial.
- ``auc:<path>``: the area under the eval curve (trapezoid over training steps) divided by the step span: the
  curve's mean level, in the metric's own unit (one eval only: its value).
- ``early:<path>`` / ``late:<path>``: the same mean level over the first / second half of the step span (the curve
  is interpolated linearly at the midpoint).
- ``train:<key>`` / ``train:<key>@<a>:<b>``: the mean of a training metric (``entropy``, ``response_length``,
  ``reward``) over all logged steps, or over steps a..b inclusive (either end may be left out).

A value that is missing, null or not a finite number is an error (`MetricError`, one line naming the run and the
metric), so a test never silently compares fewer seeds than it says.

A comparison (`paired_comparison`) pairs two configurations by seed: it keeps the seeds both have, takes the
per-seed differences d = candidate − baseline, and reports their mean, a bootstrap CI of the mean (percentile
method, ``scipy.stats.bootstrap`` with a fixed seed, so a report is reproducible) and a two-sided paired
permutation p-value (``scipy.stats.permutation_test`` with ``permutation_type="samples"`` on the differences: the
null flips each difference's sign; exact, over all 2^n sign patterns, while 2^n ≤ `N_RESAMPLES`). Five seeds that
all favour one side give p = 2/32 = 0.0625 at best: five seeds cannot reach p < 0.05, which is why verdicts rest on
the CI and on effect sizes, and why a test needs at least `MIN_SEEDS_FOR_CI` seeds.

Verdicts (`verdict`) of a pre-stated test ``{metric, direction, threshold | margin}`` on the CI [lo, hi] of d:

=============  ====================================  ================================  ==================================
direction      claim                                 reproduced                        contradicted
=============  ====================================  ================================  ==================================
``greater``    d > threshold (default 0)             lo > threshold                    hi < threshold
``less``       d < threshold (default 0)             hi < threshold                    lo > threshold
``not_worse``  d ≥ −margin (higher is better)        lo > −margin                      hi < −margin
``not_worse``  d ≤ +margin (``better: lower``)       hi < +margin                      lo > +margin
``equivalent`` |d| < margin                          −margin < lo and hi < margin      hi < −margin or lo > margin
=============  ====================================  ================================  ==================================

Everything else is ``inconclusive`` — in particular a CI that straddles the threshold, fewer than
`MIN_SEEDS_FOR_CI` paired seeds (no CI), or fewer paired seeds than the test asks for (``seeds``). The p-value is
reported beside the verdict but does not decide it. A claim with several tests is ``reproduced`` when every test is,
``contradicted`` when any test is, else ``inconclusive`` (`overall_verdict`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from canonrl.lab.report import Run

#: confidence level of the bootstrap intervals
CONFIDENCE = 0.95
#: bootstrap resamples and permutation resamples (the permutation test is exact while 2^n <= this)
N_RESAMPLES = 9999
#: seed of the bootstrap's generator: the same CI every time a report is written
RANDOM_STATE = 0
#: paired seeds a CI needs (one difference has no spread)
MIN_SEEDS_FOR_CI = 2

VERDICTS = ("reproduced", "contradicted", "inconclusive")
DIRECTIONS = ("greater", "less", "not_worse", "equivalent")
PREFIXES = ("initial", "gain", "auc", "early", "late", "train")


class MetricError(ValueError):
    """A metric a run does not have; the message is one line naming the run and the metric."""


# ---------------------------------------------------------------------------------------------------- metrics


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _lookup(record: Mapping[str, Any] | None, path: str) -> float | None:
    """The number at a dotted path of a record (``{a,b}`` segments average over keys), or None."""
    if record is None:
        return None
    parts = path.split(".")

    def walk(node: Any, index: int) -> float | None:
        if index == len(parts):
            return float(node) if _is_number(node) else None
        if not isinstance(node, Mapping):
            return None
        part = parts[index]
        if part.startswith("{") and part.endswith("}"):
            values = [walk(node.get(key.strip()), index + 1) for key in part[1:-1].split(",") if key.strip()]
            values = [v for v in values if v is not None]
            return sum(values) / len(values) if values else None
        return walk(node.get(part), index + 1)

    return walk(record, 0)


def _curve(run: Run, path: str) -> list[tuple[float, float]]:
    points = []
    for record in run.evals:
        value = _lookup(record, path)
        if value is not None and _is_number(record.get("step")):
            points.append((float(record["step"]), value))
    final = run.final
    if run.summary is not None and final is not None and _is_number(final.get("step")):
        value = _lookup(final, path)  # the summary's final eval, when the eval lines lack it
        if value is not None and all(step != final["step"] for step, _ in points):
            points.append((float(final["step"]), value))
    return sorted(points)


def _interpolate(points: Sequence[tuple[float, float]], x: float) -> float:
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[0][1] if x < points[0][0] else points[-1][1]


def _mean_level(points: Sequence[tuple[float, float]], start: float, end: float) -> float:
    """Trapezoid area of the piecewise-linear curve over [start, end], divided by end − start."""
    if end <= start:
        return _interpolate(points, start)
    xs = [start] + [x for x, _ in points if start < x < end] + [end]
    ys = [_interpolate(points, x) for x in xs]
    area = sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]))
    return area / (end - start)


_TRAIN_WINDOW = re.compile(r"^(?P<key>[^@]+?)(?:@(?P<a>-?\d*):(?P<b>-?\d*))?$")


def metric_value(run: Run, metric: str) -> float:
    """A run's value of `metric` (syntax: the module docstring). Raises `MetricError` (one line) when missing."""
    prefix, _, path = metric.partition(":") if ":" in metric else ("", "", metric)
    if prefix and prefix not in PREFIXES:
        raise MetricError(f"{metric!r}: unknown prefix {prefix!r} (known: {', '.join(PREFIXES)})")
    if not path:
        raise MetricError(f"{metric!r}: empty metric path")

    def missing(where: str) -> MetricError:
        return MetricError(f"run {run.path} has no {where} for metric {metric!r}")

    if prefix == "":
        value = _lookup(run.final, path)
        if value is None:
            raise missing(f"finite {path!r} in its final evaluation")
        return value
    if prefix in ("initial", "gain"):
        initial = _lookup(run.initial, path)
        if initial is None:
            raise missing(f"finite {path!r} in its initial evaluation")
        if prefix == "initial":
            return initial
        final = _lookup(run.final, path)
        if final is None:
            raise missing(f"finite {path!r} in its final evaluation")
        return final - initial
    if prefix in ("auc", "early", "late"):
        points = _curve(run, path)
        if not points:
            raise missing(f"eval records with a finite {path!r}")
        first, last = points[0][0], points[-1][0]
        middle = (first + last) / 2
        start, end = {"auc": (first, last), "early": (first, middle), "late": (middle, last)}[prefix]
        return _mean_level(points, start, end)
    match = _TRAIN_WINDOW.match(path)  # train:<key>[@a:b]
    if match is None:
        raise MetricError(f"{metric!r}: expected train:<key> or train:<key>@<first>:<last>")
    key, a, b = match.group("key"), match.group("a"), match.group("b")
    low = float(a) if a else -math.inf
    high = float(b) if b else math.inf
    values = [float(r[key]) for r in run.train
              if _is_number(r.get(key)) and _is_number(r.get("step")) and low <= r["step"] <= high]
    if not values:
        raise missing(f"training records with a finite {key!r}" + (f" in steps {a or '…'}..{b or '…'}" if match.group("a") is not None else ""))
    return sum(values) / len(values)


def values_by_seed(runs: Sequence[Run], metric: str) -> dict[int, float]:
    """{seed: value} over runs of one configuration; a repeated seed or a run without a seed is an error."""
    out: dict[int, float] = {}
    for run in runs:
        if run.seed is None:
            raise MetricError(f"run {run.path} has no seed: it cannot be paired")
        if run.seed in out:
            raise MetricError(f"seed {run.seed} appears twice in configuration {run.label!r} ({run.path})")
        out[run.seed] = metric_value(run, metric)
    return out


# ------------------------------------------------------------------------------------------------ comparisons


@dataclass
class Comparison:
    """Candidate minus baseline on one metric, paired by seed."""

    metric: str
    baseline: str
    candidate: str
    seeds: list[int]
    baseline_values: list[float]
    candidate_values: list[float]
    differences: list[float]
    mean: float
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    confidence: float = CONFIDENCE
    unpaired: dict[str, list[int]] = field(default_factory=dict)  # label -> seeds only that side has

    @property
    def n(self) -> int:
        return len(self.seeds)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "n": self.n}


def _generator(seed: int) -> dict[str, Any]:
    """scipy's generator keyword: ``rng`` from scipy 1.15, ``random_state`` before (the lab extra allows 1.11)."""
    import inspect

    import numpy as np
    from scipy.stats import bootstrap

    name = "rng" if "rng" in inspect.signature(bootstrap).parameters else "random_state"
    return {name: np.random.default_rng(seed)}


def bootstrap_ci(differences: Sequence[float], confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
                 random_state: int = RANDOM_STATE) -> tuple[float, float] | None:
    """Percentile bootstrap CI of the mean; None for fewer than `MIN_SEEDS_FOR_CI` values; [d, d] when all equal."""
    import numpy as np
    from scipy.stats import bootstrap

    data = np.asarray(differences, dtype=float)
    if data.size < MIN_SEEDS_FOR_CI:
        return None
    if np.all(data == data[0]):
        return float(data[0]), float(data[0])
    result = bootstrap((data,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method="percentile",
                       vectorized=True, **_generator(random_state))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def permutation_p(differences: Sequence[float], n_resamples: int = N_RESAMPLES,
                  random_state: int = RANDOM_STATE) -> float | None:
    """Two-sided paired permutation (sign-flip) p-value of the mean difference; None for no values."""
    import numpy as np
    from scipy.stats import permutation_test

    data = np.asarray(differences, dtype=float)
    if data.size == 0:
        return None
    if np.all(data == 0):
        return 1.0
    result = permutation_test((data,), lambda x, axis: np.mean(x, axis=axis), permutation_type="samples",
                              alternative="two-sided", n_resamples=n_resamples, vectorized=True,
                              **_generator(random_state))
    return float(min(1.0, result.pvalue))


def paired_comparison(baseline: Mapping[int, float], candidate: Mapping[int, float], *, metric: str = "",
                      baseline_label: str = "baseline", candidate_label: str = "candidate",
                      confidence: float = CONFIDENCE) -> Comparison:
    """Pair two configurations' {seed: value} on the seeds both have; see the module docstring."""
    seeds = sorted(set(baseline) & set(candidate))
    if not seeds:
        raise ValueError(f"{candidate_label!r} and {baseline_label!r} share no seed on {metric or 'the metric'}: "
                         f"{sorted(candidate)} vs {sorted(baseline)}")
    base = [float(baseline[s]) for s in seeds]
    cand = [float(candidate[s]) for s in seeds]
    diffs = [c - b for c, b in zip(cand, base)]
    ci = bootstrap_ci(diffs, confidence)
    unpaired = {label: sorted(set(values) - set(seeds))
                for label, values in ((baseline_label, baseline), (candidate_label, candidate))}
    return Comparison(
        metric=metric, baseline=baseline_label, candidate=candidate_label, seeds=seeds, baseline_values=base,
        candidate_values=cand, differences=diffs, mean=sum(diffs) / len(diffs), ci_low=None if ci is None else ci[0],
        ci_high=None if ci is None else ci[1], p_value=permutation_p(diffs), confidence=confidence,
        unpaired={label: s for label, s in unpaired.items() if s},
    )


def compare_runs(baseline: Sequence[Run], candidate: Sequence[Run], metric: str, *, baseline_label: str | None = None,
                 candidate_label: str | None = None) -> Comparison:
    """`paired_comparison` of two configurations' runs on `metric`."""
    return paired_comparison(
        values_by_seed(baseline, metric), values_by_seed(candidate, metric), metric=metric,
        baseline_label=baseline_label or (baseline[0].label if baseline else "baseline"),
        candidate_label=candidate_label or (candidate[0].label if candidate else "candidate"),
    )


# --------------------------------------------------------------------------------------------------- verdicts


def check_test(test: Mapping[str, Any]) -> None:
    """Raise ValueError (one line) unless `test` is a well-formed pre-stated test."""
    direction = test.get("direction")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    if direction in ("not_worse", "equivalent"):
        margin = test.get("margin")
        if not _is_number(margin) or margin < 0:
            raise ValueError(f"direction {direction} needs a margin >= 0, got {margin!r}")
    threshold = test.get("threshold", 0.0)
    if not _is_number(threshold):
        raise ValueError(f"threshold must be a number, got {threshold!r}")
    if test.get("better", "higher") not in ("higher", "lower"):
        raise ValueError(f"better must be 'higher' or 'lower', got {test.get('better')!r}")


def verdict(test: Mapping[str, Any], comparison: Comparison) -> tuple[str, str]:
    """(verdict, one-line reason) of a pre-stated test on a comparison; the rules are in the module docstring."""
    check_test(test)
    needed = max(MIN_SEEDS_FOR_CI, int(test.get("seeds", MIN_SEEDS_FOR_CI) or MIN_SEEDS_FOR_CI))
    if comparison.n < needed or comparison.ci_low is None or comparison.ci_high is None:
        return "inconclusive", f"{comparison.n} paired seed(s); the test needs {needed}"
    lo, hi = comparison.ci_low, comparison.ci_high
    direction = test["direction"]
    threshold = float(test.get("threshold", 0.0))
    margin = float(test.get("margin", 0.0) or 0.0)
    ci = f"{comparison.confidence:.0%} CI [{lo:.4g}, {hi:.4g}]"
    if direction == "greater":
        bound, yes, no = threshold, lo > threshold, hi < threshold
        claim = f"> {bound:g}"
    elif direction == "less":
        bound, yes, no = threshold, hi < threshold, lo > threshold
        claim = f"< {bound:g}"
    elif direction == "not_worse" and test.get("better", "higher") == "higher":
        yes, no = lo > -margin, hi < -margin
        claim = f">= -{margin:g}"
    elif direction == "not_worse":
        yes, no = hi < margin, lo > margin
        claim = f"<= {margin:g}"
    else:  # equivalent
        yes, no = (-margin < lo and hi < margin), (hi < -margin or lo > margin)
        claim = f"within ±{margin:g}"
    if yes:
        return "reproduced", f"{ci} lies inside the claimed region (difference {claim})"
    if no:
        return "contradicted", f"{ci} lies wholly outside the claimed region (difference {claim})"
    return "inconclusive", f"{ci} straddles the claimed region's edge (difference {claim})"


def overall_verdict(verdicts: Sequence[str]) -> str:
    """A claim's verdict from its tests': all reproduced -> reproduced; any contradicted -> contradicted."""
    if not verdicts:
        return "inconclusive"
    if any(v == "contradicted" for v in verdicts):
        return "contradicted"
    if all(v == "reproduced" for v in verdicts):
        return "reproduced"
    return "inconclusive"
