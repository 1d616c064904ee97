"""Read lab run directories and turn them into plots and a markdown comparison across estimators and seeds.

A run directory, as `canonrl train` writes it, holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one
JSON object a line: ``"kind": "train"`` every step, ``"kind": "eval"`` periodically, the first at step 0) and, once
the run finished, ``summary.json``. A killed run has no summary: it is still read, its last eval line stands in for
the final evaluation, and reports flag it as incomplete rather than silently mixing it with finished runs.

Plotting uses `matplotlib.figure.Figure` with an explicit Agg canvas, never pyplot, so that calling this from an
interactive session neither switches the user's backend nor leaves figures registered in pyplot's global state.
matplotlib and scipy are imported inside the functions that need them: reading runs needs neither.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: headline held-out accuracy, as the trainer logs it on eval lines (mean@k sampled at the training temperature)
ACCURACY = "accuracy"
#: confidence level of the intervals in the comparison table
CONFIDENCE = 0.95

#: columns of the comparison table in summary.md, in order
COLUMNS: tuple[str, ...] = (
    "label",
    "seeds (n)",
    "initial acc (%)",
    "final acc (%) ± 95% CI",
    "Δ acc (points)",
    "final greedy pass@1 (%)",
    "tokens / correct",
    "final response length (tokens)",
    "wall time (s)",
    "incomplete",
)


class RunError(ValueError):
    """A directory that is not a (readable) run directory; the message is one line naming the directory."""


@dataclass
class Run:
    """One run directory, read. `summary` is None for a run that did not finish (killed before writing it)."""

    path: Path
    config: dict[str, Any]
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    summary: dict[str, Any] | None = None

    @property
    def incomplete(self) -> bool:
        """True when the run has no summary.json: its numbers are those of its last logged evaluation."""
        return self.summary is None

    @property
    def estimator(self) -> str:
        return str(self.config.get("estimator", (self.summary or {}).get("estimator", "?")))

    @property
    def label(self) -> str:
        """What groups runs in a comparison: the config's `label` when set (two configs of one estimator), else its
        estimator."""
        label = self.config.get("label")
        return str(label) if label not in (None, "") else self.estimator

    @property
    def seed(self) -> int | None:
        seed = self.config.get("seed", (self.summary or {}).get("seed"))
        return None if seed is None else int(seed)

    @property
    def task(self) -> str | None:
        task = self.config.get("task", (self.summary or {}).get("task"))
        return None if task is None else str(task)

    @property
    def initial(self) -> dict[str, Any] | None:
        """The evaluation before training: the summary's, else the step-0 eval line (else the first one logged)."""
        if self.summary is not None and self.summary.get("initial") is not None:
            return self.summary["initial"]
        if not self.evals:
            return None
        at_zero = [record for record in self.evals if record.get("step") == 0]
        return at_zero[0] if at_zero else self.evals[0]

    @property
    def final(self) -> dict[str, Any] | None:
        """The last evaluation: the summary's, else the last eval line (None when the run never evaluated)."""
        if self.summary is not None and self.summary.get("final") is not None:
            return self.summary["final"]
        return self.evals[-1] if self.evals else None

    @property
    def wall_time(self) -> float | None:
        """Seconds the run took: the summary's, else the time of its last logged record (how far a killed run got)."""
        if self.summary is not None and self.summary.get("wall_time") is not None:
            return float(self.summary["wall_time"])
        times = [record["time"] for record in self.train + self.evals if _is_number(record.get("time"))]
        return float(max(times)) if times else None

    @property
    def last_step(self) -> int | None:
        steps = [int(record["step"]) for record in self.train + self.evals if _is_number(record.get("step"))]
        return max(steps) if steps else None

    @property
    def title(self) -> str:
        seed = "?" if self.seed is None else self.seed
        label = self.label if self.label == self.estimator else f"{self.label} ({self.estimator})"
        return f"{label}, seed {seed}" + (" [incomplete]" if self.incomplete else "")


def read_run(run_dir: str | os.PathLike[str]) -> Run:
    """Read a run directory. Raises `RunError` (one line) when it is not one: missing directory, config.yaml or
    metrics.jsonl, or files that do not parse. A truncated last line of metrics.jsonl (a run killed mid-write) is
    dropped; a malformed line elsewhere is an error, since it means the file is not what the trainer wrote."""
    import yaml

    path = Path(run_dir)
    if not path.is_dir():
        raise RunError(f"not a run directory: {path} (no such directory)")
    config_path, metrics_path, summary_path = path / "config.yaml", path / "metrics.jsonl", path / "summary.json"
    missing = [p.name for p in (config_path, metrics_path) if not p.is_file()]
    if missing:
        raise RunError(f"not a run directory: {path} (no {' or '.join(missing)})")
    try:
        config = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError as error:
        raise RunError(f"unreadable run config {config_path}: {_one_line(error)}") from None
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise RunError(f"unreadable run config {config_path}: expected a mapping, got {type(config).__name__}")

    train: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    lines = metrics_path.read_text().splitlines()
    numbered = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    for position, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if position == len(numbered) - 1:
                break  # the run was killed while writing its last line
            raise RunError(f"malformed {metrics_path} line {number}: {_one_line(error)}") from None
        if not isinstance(record, dict):
            raise RunError(f"malformed {metrics_path} line {number}: expected a JSON object")
        if record.get("kind") == "train":
            train.append(record)
        elif record.get("kind") == "eval":
            evals.append(record)

    summary = None
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError as error:
            raise RunError(f"malformed {summary_path}: {_one_line(error)}") from None
        if not isinstance(summary, dict):
            raise RunError(f"malformed {summary_path}: expected a JSON object")
    return Run(path=path, config=config, train=_by_step(train), evals=_by_step(evals), summary=summary)


# --------------------------------------------------------------------------------------------------- statistics


def mean_ci(values: Iterable[float], confidence: float = CONFIDENCE) -> tuple[float, float | None]:
    """Mean and the half-width of its two-sided Student-t confidence interval over `values` (seeds).

    The half-width is ``t_{(1+confidence)/2, n-1} * s / sqrt(n)`` with ``s`` the sample (n-1) standard deviation;
    None when n = 1, where no interval exists. NaN mean for no values."""
    from scipy.stats import t as student_t

    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return math.nan, None
    mean = sum(values) / n
    if n == 1:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, float(student_t.ppf((1 + confidence) / 2, n - 1)) * math.sqrt(variance / n)


@dataclass
class StepAverage:
    """A per-step average over runs whose logged steps need not coincide (e.g. different eval intervals).

    `steps` is the sorted union of the runs' steps; at each, `mean`, `low`, `high` (min and max) and `count` are over
    only the runs that logged that step, so a run missing a step neither drags the mean towards zero nor drops it."""

    steps: list[float] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    low: list[float] = field(default_factory=list)
    high: list[float] = field(default_factory=list)
    count: list[int] = field(default_factory=list)


def average_over_runs(series: Sequence[Sequence[tuple[float, float | None]]]) -> StepAverage:
    """Average several runs' ``(step, value)`` series on the union of their steps (see `StepAverage`).

    Missing values (None, NaN) count as not logged; a step no run has a value at is left out. Within one series a
    repeated step keeps its last value."""
    by_step: dict[float, list[float]] = {}
    for run in series:
        values = {step: value for step, value in run if _is_number(value) and not math.isnan(value)}
        for step, value in values.items():
            by_step.setdefault(step, []).append(float(value))
    average = StepAverage()
    for step in sorted(by_step):
        values = by_step[step]
        average.steps.append(step)
        average.mean.append(sum(values) / len(values))
        average.low.append(min(values))
        average.high.append(max(values))
        average.count.append(len(values))
    return average


# -------------------------------------------------------------------------------------------------------- plots


def plot_run(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Write one run's plots to ``<run>/plots/`` and return their paths: held-out accuracy (and greedy pass@1),
    train reward, response length and entropy, each against the training step, one figure per file."""
    run = read_run(run_dir)
    out = run.path / "plots"
    out.mkdir(exist_ok=True)
    written = []

    figure, axes = _figure()
    _line(axes, _series(run.evals, ACCURACY), "held-out accuracy (mean@k)", marker="o")
    _line(axes, _series(run.evals, "greedy_pass1"), "held-out greedy pass@1", marker="s", linestyle="--")
    axes.set_ylim(-0.02, 1.02)
    written.append(_finish(figure, axes, out / "accuracy.png", f"Held-out accuracy — {run.title}", "accuracy"))

    figure, axes = _figure()
    reward = _series(run.train, "reward")
    _line(axes, reward, "train reward", alpha=0.35 if len(reward) > 20 else 1.0)
    if len(reward) > 20:
        window = max(2, len(reward) // 20)
        _line(axes, _rolling(reward, window), f"rolling mean ({window} steps)")
    written.append(_finish(figure, axes, out / "reward.png", f"Train reward — {run.title}", "mean reward"))

    for key, name, unit in (("response_length", "Response length", "mean tokens"),
                            ("entropy", "Entropy", "mean token entropy (nats)")):
        figure, axes = _figure()
        _line(axes, _series(run.train, key), "train rollouts")
        _line(axes, _series(run.evals, key), "held-out", marker="o", linestyle="--")
        written.append(_finish(figure, axes, out / f"{key}.png", f"{name} — {run.title}", unit))
    return written


# --------------------------------------------------------------------------------------------------- comparison


def write_comparison(run_dirs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
                     command: str | None = None, baseline: str | None = None) -> Path:
    """Compare runs grouped by label (config `label`, else `estimator`) across seeds; returns ``out_dir/summary.md``.

    summary.md holds one table row per label (columns: `COLUMNS`), a per-run table, and links to the PNGs written
    beside it: accuracy_vs_step, length_vs_step, entropy_vs_step (mean over seeds, band = min..max) and
    accuracy_vs_token_budget (final-eval accuracy when only answers finished within a token budget count: the
    performance–cost view). `command`, when given, is recorded as the invocation that produced the report.

    With two or more labels and two or more seeds shared with the baseline (`baseline`, default the label of the
    first run directory: the first configuration of `canonrl compare`), summary.md also gets a "Paired differences"
    table — each label minus the baseline, paired by seed, on `PAIRED_METRICS` (mean difference, bootstrap 95% CI,
    permutation p, n seeds; see `canonrl.lab.stats`) — and two plots: differences.png and pareto.png."""
    if not run_dirs:
        raise ValueError("write_comparison needs at least one run directory")
    runs = [read_run(run_dir) for run_dir in run_dirs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[Run]] = {}
    for run in sorted(runs, key=lambda r: (r.label, r.seed if r.seed is not None else -1, str(r.path))):
        groups.setdefault(run.label, []).append(run)

    plots = {
        "accuracy_vs_step.png": _plot_groups(
            groups, out / "accuracy_vs_step.png", lambda run: _series(run.evals, ACCURACY),
            "Held-out accuracy (mean@k) vs step", "training step", "accuracy", unit_interval=True),
        "length_vs_step.png": _plot_groups(
            groups, out / "length_vs_step.png", lambda run: _series(run.train, "response_length"),
            "Train response length vs step", "training step", "mean response tokens"),
        "entropy_vs_step.png": _plot_groups(
            groups, out / "entropy_vs_step.png", lambda run: _series(run.train, "entropy"),
            "Train token entropy vs step", "training step", "mean token entropy (nats)"),
        "accuracy_vs_token_budget.png": _plot_groups(
            groups, out / "accuracy_vs_token_budget.png", _budget_series,
            "Final held-out accuracy within a token budget", "token budget (response tokens)", "accuracy",
            unit_interval=True, log2_x=True),
    }

    lines = ["# Lab comparison", ""]
    lines += [f"{len(runs)} run(s), {len(groups)} label(s). Accuracy is the held-out mean@k sampled at the training "
              "temperature, in percent; the final value is the run's last evaluation. Final accuracy is the mean over "
              f"seeds ± the half-width of its {CONFIDENCE:.0%} Student-t interval (n=1: no interval). Δ is final minus "
              "initial, in percentage points. Tokens / correct is response tokens generated per correct held-out "
              "answer (∞ when none was correct). Wall time of an incomplete run is the time of its last record.", ""]
    lines += _table(COLUMNS, [_group_row(label, members) for label, members in groups.items()])
    lines += _warnings(runs, groups)
    baseline = baseline if baseline is not None else runs[0].label
    if baseline not in groups:
        raise ValueError(f"baseline {baseline!r} is not a label of these runs ({', '.join(groups)})")
    paired = paired_section(groups, baseline, out)
    if paired:
        lines += ["", *paired]
        plots.update({name: out / name for name in ("differences.png", "pareto.png") if (out / name).exists()})
    lines += ["", "## Runs", ""]
    lines += _table(("label", "seed", "task", "last step", "initial acc (%)", "final acc (%)",
                     "final greedy pass@1 (%)", "status", "run"),
                    [_run_row(run, out) for members in groups.values() for run in members])
    lines += ["", "## Plots", "", "Lines are means over seeds, bands span min..max over seeds; where runs logged "
              "different steps, each step averages only the runs that logged it.", ""]
    for name in plots:
        lines += [f"![{name[:-4].replace('_', ' ')}]({name})", ""]
    lines += ["## Inputs", ""]
    relative = [_relative(run.path, out) for run in runs]
    lines += ["Command: `" + (command or "python -c \"from canonrl.lab.report import write_comparison; "
                              f"write_comparison({relative!r}, '.')\"  # from this directory") + "`", ""]
    lines += ["Run directories (relative to this file):", ""] + [f"- `{path}`" for path in relative] + [""]
    summary = out / "summary.md"
    summary.write_text("\n".join(lines))
    return summary


# ---------------------------------------------------------------------------------------------- paired statistics

#: metrics of the paired-difference table: (metric, heading, scale of the printed numbers); pass@k's k is the largest
#: present in every run's final evaluation
PAIRED_METRICS: tuple[tuple[str, str, float], ...] = (
    ("accuracy", "final accuracy (points)", 100.0),
    ("auc:accuracy", "AUC of accuracy (points)", 100.0),
    ("tokens_per_correct", "tokens / correct", 1.0),
    ("pass_at_k.{k}", "pass@{k} (points)", 100.0),
    ("entropy", "entropy (nats/token)", 1.0),
)
PAIRED_COLUMNS: tuple[str, ...] = ("label − baseline", "metric", "mean diff", "95% CI", "p (permutation)", "n seeds")


def largest_pass_k(runs: Iterable[Run]) -> str | None:
    """The largest k (as text) of `pass_at_k` present in every run's final evaluation, or None."""
    common: set[str] | None = None
    for run in runs:
        table = (run.final or {}).get("pass_at_k")
        keys = {k for k, v in table.items() if _is_number(v)} if isinstance(table, dict) else set()
        common = keys if common is None else common & keys
    numeric = [k for k in (common or ()) if k.isdigit()]
    return max(numeric, key=int) if numeric else None


def paired_metrics(groups: dict[str, list[Run]]) -> list[tuple[str, str, float]]:
    """`PAIRED_METRICS` with pass@k's k filled in (dropped when no k is common to all runs)."""
    k = largest_pass_k(run for members in groups.values() for run in members)
    out = []
    for metric, heading, scale in PAIRED_METRICS:
        if "{k}" in metric:
            if k is None:
                continue
            metric, heading = metric.format(k=k), heading.format(k=k)
        out.append((metric, heading, scale))
    return out


def paired_section(groups: dict[str, list[Run]], baseline: str, out: Path) -> list[str]:
    """The "Paired differences" section of summary.md (and differences.png, pareto.png in `out`); [] when there is
    no second label or fewer than two seeds are shared with the baseline."""
    from canonrl.lab.stats import MIN_SEEDS_FOR_CI, MetricError, compare_runs

    base_seeds = {run.seed for run in groups[baseline]}
    others = [label for label in groups if label != baseline
              and len(base_seeds & {run.seed for run in groups[label]} - {None}) >= MIN_SEEDS_FOR_CI]
    if not others:
        return []
    rows, comparisons, notes = [], [], []
    for label in others:
        for metric, heading, scale in paired_metrics(groups):
            try:
                comparison = compare_runs(groups[baseline], groups[label], metric)
            except (MetricError, ValueError) as error:
                notes.append(f"{label} vs {baseline} on {metric}: {_one_line(error)}")
                rows.append([f"{label} − {baseline}", heading, "—", "—", "—", "—"])
                continue
            comparisons.append((comparison, heading, scale))
            rows.append([f"{label} − {baseline}", heading, *format_comparison(comparison, scale)])
    lines = ["## Paired differences", "",
             f"Each label minus the baseline `{baseline}` (the first configuration), paired by seed: the mean of the "
             "per-seed differences, its 95% bootstrap CI (percentile, fixed seed) and a two-sided paired permutation "
             "p-value (sign flips; exact for up to 13 seeds). Five seeds all on one side give p = 0.0625 at best. "
             "AUC is the mean level of the held-out accuracy curve over training. Points are percentage points.", ""]
    lines += _table(PAIRED_COLUMNS, rows)
    lines += [""] + [f"> **Note:** {note}" for note in notes] if notes else []
    if comparisons:
        plot_differences(comparisons, out / "differences.png")
        plot_pareto(groups, out / "pareto.png")
    return lines


def format_comparison(comparison, scale: float = 1.0) -> list[str]:
    """[mean diff, CI, p, n] cells of a `canonrl.lab.stats.Comparison`, numbers multiplied by `scale`."""
    digits = 1 if scale == 100.0 else 3

    def number(value: float | None) -> str:
        return "—" if value is None else f"{scale * value:+.{digits}f}"

    ci = "—" if comparison.ci_low is None else f"[{number(comparison.ci_low)}, {number(comparison.ci_high)}]"
    p = "—" if comparison.p_value is None else f"{comparison.p_value:.3g}"
    return [number(comparison.mean), ci, p, str(comparison.n)]


def plot_differences(comparisons: Sequence[tuple[Any, str, float]], path: Path, title: str | None = None) -> Path:
    """One panel per metric: each comparison's mean difference with its CI (bar) and per-seed differences (dots)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    by_metric: dict[str, list[tuple[Any, float]]] = {}
    for comparison, heading, scale in comparisons:
        by_metric.setdefault(heading, []).append((comparison, scale))
    panels = max(1, len(by_metric))
    figure = Figure(figsize=(4.0 * min(panels, 3), 0.6 + 3.2 * math.ceil(panels / 3)), dpi=100)
    FigureCanvasAgg(figure)
    for index, (heading, items) in enumerate(by_metric.items()):
        axes = figure.add_subplot(math.ceil(panels / 3), min(panels, 3), index + 1)
        for row, (comparison, scale) in enumerate(items):
            mean = scale * comparison.mean
            if comparison.ci_low is not None:
                low, high = scale * comparison.ci_low, scale * comparison.ci_high
                axes.errorbar([mean], [row], xerr=[[mean - low], [high - mean]], fmt="o", color=f"C{row % 10}", capsize=4)
            else:
                axes.plot([mean], [row], "o", color=f"C{row % 10}")
            axes.plot([scale * d for d in comparison.differences], [row] * comparison.n, "x", color="0.4", markersize=4)
        axes.axvline(0.0, color="0.3", linewidth=0.8)
        axes.set_yticks(range(len(items)), [f"{c.candidate} − {c.baseline}" for c, _ in items], fontsize="small")
        axes.set_ylim(-0.7, len(items) - 0.3)
        axes.set_title(heading, fontsize="small")
        axes.grid(alpha=0.3, axis="x")
    figure.suptitle(title or "Paired differences: mean and 95% bootstrap CI; x: per-seed differences", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def plot_pareto(groups: dict[str, list[Run]], path: Path) -> Path:
    """Accuracy against tokens per correct answer: one point per label (mean over seeds, Student-t 95% CI bars on
    both axes); runs with no correct answer (infinite tokens per correct) are left out of the x mean."""
    figure, axes = _figure()
    for index, (label, runs) in enumerate(groups.items()):
        accuracy = [v for v in (_final_value(run, ACCURACY) for run in runs) if v is not None]
        tokens = [v for v in (_final_value(run, "tokens_per_correct") for run in runs) if v is not None and math.isfinite(v)]
        if not accuracy or not tokens:
            continue
        (y, y_half), (x, x_half) = mean_ci(accuracy), mean_ci(tokens)
        axes.errorbar([x], [y], xerr=None if x_half is None else [x_half], yerr=None if y_half is None else [y_half],
                      fmt="o", capsize=4, color=f"C{index % 10}", label=f"{label} (n={len(runs)})")
    _finish(figure, axes, path, "Accuracy vs tokens per correct answer (mean, 95% CI over seeds)", "final accuracy",
            xlabel="tokens per correct answer")
    return path


# ------------------------------------------------------------------------------------------------------ helpers


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _by_step(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sorted by step (stable, so a repeated step keeps its logging order)."""
    return sorted(records, key=lambda record: record.get("step", 0) if _is_number(record.get("step")) else 0)


def _series(records: Sequence[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [(record["step"], float(record[key])) for record in records
            if _is_number(record.get("step")) and _is_number(record.get(key))]


def _budget_series(run: Run) -> list[tuple[float, float]]:
    budgets = (run.final or {}).get("budget_accuracy") or {}
    points = []
    for budget, value in budgets.items():
        try:
            points.append((int(budget), float(value)))
        except (TypeError, ValueError):
            continue
    return sorted(points)


def _rolling(points: Sequence[tuple[float, float]], window: int) -> list[tuple[float, float]]:
    """Trailing mean over `window` points (fewer at the start)."""
    out = []
    for i, (step, _) in enumerate(points):
        values = [value for _, value in points[max(0, i - window + 1): i + 1]]
        out.append((step, sum(values) / len(values)))
    return out


def _final_value(run: Run, key: str) -> float | None:
    value = (run.final or {}).get(key)
    return float(value) if _is_number(value) else None


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _percent(value: float | None, digits: int = 1) -> str:
    return "—" if value is None or math.isnan(value) else f"{100 * value:.{digits}f}"


def _group_row(label: str, runs: list[Run]) -> list[str]:
    initial = [v for v in ((run.initial or {}).get(ACCURACY) for run in runs) if _is_number(v)]
    final = [v for v in (_final_value(run, ACCURACY) for run in runs) if v is not None]
    deltas = [f - i for f, i in ((_final_value(run, ACCURACY), (run.initial or {}).get(ACCURACY)) for run in runs)
              if f is not None and _is_number(i)]
    if final:
        mean, half = mean_ci(final)
        final_cell = f"{_percent(mean)} ± {_percent(half)}" if half is not None else f"{_percent(mean)} (n=1)"
    else:
        final_cell = "—"
    delta = _mean(deltas)
    greedy = [v for v in (_final_value(run, "greedy_pass1") for run in runs) if v is not None]

    # tokens_per_correct is Infinity (or null) when a run got nothing right: average the finite ones, count the rest
    finite, infinite = [], 0
    for run in runs:
        if run.final is None:
            continue
        value = run.final.get("tokens_per_correct")
        if _is_number(value) and math.isfinite(value):
            finite.append(float(value))
        elif "tokens_per_correct" in run.final:
            infinite += 1
    tokens = "—" if not finite and not infinite else "∞" if not finite else f"{_mean(finite):.1f}"
    if finite and infinite:
        tokens += f" (+{infinite} run(s) ∞)"

    length = _mean([v for v in (_final_value(run, "response_length") for run in runs) if v is not None])
    wall = _mean([v for v in (run.wall_time for run in runs) if v is not None])
    return [
        label,
        str(len(runs)),
        _percent(_mean(initial)),
        final_cell,
        "—" if delta is None else f"{100 * delta:+.1f}",
        _percent(_mean(greedy)),
        tokens,
        "—" if length is None else f"{length:.1f}",
        "—" if wall is None else f"{wall:.0f}",
        str(sum(run.incomplete for run in runs)),
    ]


def _run_row(run: Run, out: Path) -> list[str]:
    initial = (run.initial or {}).get(ACCURACY)
    status = "complete" if not run.incomplete else "incomplete (no summary.json)"
    return [run.label, "?" if run.seed is None else str(run.seed), run.task or "?",
            "—" if run.last_step is None else str(run.last_step),
            _percent(float(initial)) if _is_number(initial) else "—", _percent(_final_value(run, ACCURACY)),
            _percent(_final_value(run, "greedy_pass1")), status, f"`{_relative(run.path, out)}`"]


def _warnings(runs: list[Run], groups: dict[str, list[Run]]) -> list[str]:
    """Notes on what makes the table less comparable than it looks."""
    notes = []
    tasks = sorted({run.task or "?" for run in runs})
    if len(tasks) > 1:
        notes.append(f"Runs span several tasks ({', '.join(tasks)}): rows mix tasks.")
    for label, members in groups.items():
        seeds = [run.seed for run in members]
        if len(set(seeds)) < len(seeds):
            notes.append(f"`{label}` has repeated seeds ({seeds}): its runs are not independent seeds.")
        if any(run.final is None for run in members):
            notes.append(f"`{label}` has run(s) with no evaluation logged: left out of its accuracy columns.")
        finals = {run.final.get("step") for run in members if run.final is not None}
        if len(finals) > 1:
            notes.append(f"`{label}`'s final evaluations are at different steps ({sorted(finals, key=str)}).")
    return ([""] + [f"> **Note:** {note}" for note in notes]) if notes else []


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    def escape(cell: str) -> str:
        return cell.replace("|", "\\|")

    lines = ["| " + " | ".join(escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(escape(c) for c in row) + " |" for row in rows]


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def _figure():
    """A pyplot-free figure on an Agg canvas (see the module docstring)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _line(axes, points: Sequence[tuple[float, float]], label: str, **style) -> None:
    if points:
        axes.plot([p[0] for p in points], [p[1] for p in points], label=label, **style)


def _finish(figure, axes, path: Path, title: str, ylabel: str, xlabel: str = "training step",
            legend_title: str | None = None) -> Path:
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    if xlabel == "training step":
        from matplotlib.ticker import MaxNLocator

        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if axes.get_legend_handles_labels()[0]:
        axes.legend(title=legend_title, fontsize="small", title_fontsize="small")
    else:
        axes.text(0.5, 0.5, "no data logged", ha="center", va="center", transform=axes.transAxes)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def _plot_groups(groups: dict[str, list[Run]], path: Path, series, title: str, xlabel: str, ylabel: str,
                 unit_interval: bool = False, log2_x: bool = False) -> Path:
    """One line per label: the mean over its runs on the union of their x values, shaded min..max."""
    figure, axes = _figure()
    banded = False
    for index, (label, runs) in enumerate(groups.items()):
        average = average_over_runs([series(run) for run in runs])
        if not average.steps:
            continue
        color = f"C{index % 10}"
        axes.plot(average.steps, average.mean, color=color, marker="o" if len(average.steps) <= 30 else None,
                  markersize=3, label=f"{label} (n={len(runs)})")
        if max(average.count) > 1:
            axes.fill_between(average.steps, average.low, average.high, color=color, alpha=0.2, linewidth=0)
            banded = True
    xs = sorted({float(x) for line in axes.get_lines() for x in line.get_xdata()})
    if log2_x and xs and xs[0] > 0:
        from matplotlib.ticker import NullFormatter, NullLocator

        axes.set_xscale("log", base=2)
        axes.set_xticks(xs, [f"{x:g}" for x in xs])  # the budgets themselves, not powers of two in 2^k notation
        axes.xaxis.set_minor_locator(NullLocator())
        axes.xaxis.set_minor_formatter(NullFormatter())
    if unit_interval:
        axes.set_ylim(-0.02, 1.02)
    return _finish(figure, axes, path, title, ylabel, xlabel,
                   legend_title="mean over seeds; band: min..max" if banded else None)
