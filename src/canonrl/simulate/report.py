"""The report folder of ``canonrl simulate``: summary.md, results.json and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

from canonrl.simulate import SimulationResult
from canonrl.simulate.measures import P_BINS
from canonrl.simulate.model import DIFFICULTY_BUCKETS

PLOTS = {
    "bias_vs_p": "bias-vs-p.png",
    "informative_bias_vs_p": "informative-bias-vs-p.png",
    "rmse_vs_group_size": "rmse-vs-group-size.png",
    "zero_fraction_vs_group_size": "zero-fraction-vs-group-size.png",
    "difficulty_weight": "difficulty-weight.png",
    "amplification": "canon-amplification.png",
}


def _by_run(measures: list) -> dict:
    """(estimator, group size) -> its measures."""
    return {(m.estimator, m.group_size): m for m in measures}


def _cell(value: float, digits: int = 3) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def summary_markdown(result: SimulationResult, command: str, focus_group_size: int) -> str:
    config = result.config
    model, conditions = config.model, config.conditions
    lines = [
        "# Estimators against the truth (canonrl simulate)",
        "",
        f"Command: `{command}` (seed {config.seed}); {result.seconds:.1f} s.",
        "",
        f"Rollout model: difficulty `{model.difficulty}`, reward `{model.reward}`, within-prompt correlation of "
        f"length with reward {model.length_corr}, of entropy with reward {model.entropy_corr}; "
        f"{config.responses} simulated responses per estimator and group size.",
        "",
        "Alignment: `centred` compares A with r − p, `z` with (r − p)/σ(p), `fit` compares c·A with r − p for the "
        "least-squares scale c (see `canonrl.simulate.measures`). `scale` is that fitted c for every estimator "
        "(near 1 at large G when the alignment is the right one). Bias on hard / easy prompts is over the "
        "informative groups (rewards not all equal) with true p < 1/3 / > 2/3.",
        "",
        f"## All estimators at G = {focus_group_size}",
        "",
        "| estimator | alignment | scale | bias | variance | RMSE | bias hard (informative) | bias easy (informative) "
        "| sign errors | exact zeros | weight hard / medium / easy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    focus = [m for m in result.measures if m.group_size == focus_group_size]
    for m in focus:
        hard, easy = _bucket_bias(m.informative_bias_by_p, 0), _bucket_bias(m.informative_bias_by_p, 2)
        weights = " / ".join(f"{m.weight_by_difficulty[label]:.2f}" for label, *_ in DIFFICULTY_BUCKETS)
        lines.append(
            f"| `{m.estimator}` | {m.alignment} | {m.fitted_scale:.3f} | {m.bias:+.3f} | {m.variance:.3f} | "
            f"{m.rmse:.3f} | {_cell(hard, 3)} | {_cell(easy, 3)} | {m.sign_error:.3f} | {m.zero_fraction:.3f} | "
            f"{weights} |"
        )
    if focus:
        truth = " / ".join(f"{focus[0].true_weight_by_difficulty[label]:.2f}" for label, *_ in DIFFICULTY_BUCKETS)
        lines += ["", f"The truth's weight (share of Σ|r − p|) hard / medium / easy: {truth}."]
    sizes = sorted({m.group_size for m in result.measures})
    lines += ["", "## RMSE and exact zeros by group size", "", "| estimator | " + " | ".join(f"G={g}" for g in sizes) + " |"]
    lines.append("|---|" + "---|" * len(sizes))
    runs = _by_run(result.measures)
    for name in dict.fromkeys(m.estimator for m in result.measures):
        cells = []
        for g in sizes:
            m = runs[name, g]
            cells.append(f"{m.rmse:.3f} ({m.zero_fraction:.0%} zero)")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    study = result.amplification
    half = study.group_size // 2
    lines += [
        "",
        f"## CANON amplification (G = {study.group_size})",
        "",
        f"Conditions: c1 share {conditions.share}, reward gap {conditions.gap}; c2 share {conditions.share2}, "
        f"gap {conditions.gap2} unless swept; metric noise {conditions.noise} in the c2 sweep. Amplification = (E[A_inter | c] − E[A_inter | not c]) / "
        "(E[A_DR | c] − E[A_DR | not c]); see `canonrl.simulate.amplification`.",
        "",
        "| metric noise | metric–reward correlation | " + " | ".join(f"k={k}" for k in study.splits) + " |",
        "|---|---|" + "---|" * len(study.splits),
    ]
    for noise, corr, row in zip(study.noises, study.correlations, study.ratio):
        lines.append(f"| {noise} | {corr:.3f} | " + " | ".join(f"{r:.2f}" for r in row) + " |")
    lines += [
        "",
        f"An independent second condition c2 at k = {half} (Theorem 2: its amplification does not depend on its gap or "
        f"share; G/(G−1) = {study.group_size / (study.group_size - 1):.3f}):",
        "",
        "| c2 gap | c2 share | amplification of c2 | amplification of c1 |",
        "|---|---|---|---|",
    ]
    lines += [f"| {e['gap2']} | {e['share2']} | {e['ratio']:.3f} | {e['c1_ratio']:.3f} |" for e in study.independent]
    lines += ["", "Plots: " + ", ".join(f"`{name}`" for name in PLOTS.values()), ""]
    return "\n".join(lines)


def _bucket_bias(binned: list[float], bucket: int) -> float:
    """Mean of the p-bins inside difficulty bucket `bucket` (0 hard, 1 medium, 2 easy), ignoring empty bins."""
    _, low, high = DIFFICULTY_BUCKETS[bucket]
    values = [v for i, v in enumerate(binned) if low <= (i + 0.5) / P_BINS < high and not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def write_report(result: SimulationResult, out: Path, command: str, focus_group_size: int | None = None) -> Path:
    """Write summary.md, results.json and the PNG plots to `out` (created); returns the summary's path."""
    out.mkdir(parents=True, exist_ok=True)
    sizes = sorted({m.group_size for m in result.measures})
    focus = focus_group_size if focus_group_size in sizes else (8 if 8 in sizes else sizes[len(sizes) // 2])
    summary = out / "summary.md"
    summary.write_text(summary_markdown(result, command, focus))
    payload = {
        "command": command,
        "seed": result.config.seed,
        "seconds": result.seconds,
        "model": result.config.model.__dict__,
        "conditions": result.config.conditions.__dict__,
        "measures": [m.as_dict() for m in result.measures],
        "amplification": result.amplification.as_dict(),
    }
    (out / "results.json").write_text(json.dumps(payload, indent=1, allow_nan=True))
    _plots(result, out, focus)
    return summary


def _plots(result: SimulationResult, out: Path, focus: int) -> None:
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("the report's plots need matplotlib: pip install 'canonrl[lab]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = result.measures
    runs = _by_run(measures)
    names = list(dict.fromkeys(m.estimator for m in measures))
    centres = [(i + 0.5) / P_BINS for i in range(P_BINS)]
    colours = plt.get_cmap("tab20" if len(names) > 10 else "tab10")

    def style(i: int) -> dict:
        return {"color": colours(i % colours.N), "linestyle": ("-", "--", ":")[i // colours.N % 3], "marker": "o", "ms": 3}

    for key, field, title in (
        ("bias_vs_p", "bias_by_p", f"bias against true p, all groups (G = {focus})"),
        ("informative_bias_vs_p", "informative_bias_by_p", f"bias against true p, informative groups (G = {focus})"),
    ):
        fig, ax = plt.subplots(figsize=(9, 5.5))
        for i, name in enumerate(names):
            m = runs[name, focus]
            ax.plot(centres, getattr(m, field), label=name, **style(i))
        ax.axhline(0, color="black", lw=0.8)
        ax.set(xlabel="true success probability p", ylabel="mean(aligned A − target)", title=title)
        ax.legend(fontsize=7, ncol=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
        fig.tight_layout()
        fig.savefig(out / PLOTS[key], dpi=110)
        plt.close(fig)
    sizes = sorted({m.group_size for m in measures})
    for key, field, ylabel in (
        ("rmse_vs_group_size", "rmse", "RMSE against the aligned true advantage"),
        ("zero_fraction_vs_group_size", "zero_fraction", "fraction of exactly-zero advantages"),
    ):
        fig, ax = plt.subplots(figsize=(9, 5.5))
        for i, name in enumerate(names):
            values = [runs[name, g] for g in sizes]
            ax.plot(sizes, [getattr(m, field) for m in values], label=name, **style(i))
        ax.set_xscale("log", base=2)
        ax.set(xlabel="group size G", ylabel=ylabel)
        ax.legend(fontsize=7, ncol=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
        fig.tight_layout()
        fig.savefig(out / PLOTS[key], dpi=110)
        plt.close(fig)
    focus_measures = [runs[name, focus] for name in names]
    labels = [label for label, *_ in DIFFICULTY_BUCKETS]
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(names) + 2), 5))
    rows = [("truth", focus_measures[0].true_weight_by_difficulty)] + [
        (m.estimator, m.weight_by_difficulty) for m in focus_measures
    ]
    bottom = [0.0] * len(rows)
    for j, label in enumerate(labels):
        heights = [weights[label] for _, weights in rows]
        ax.bar([name for name, _ in rows], heights, bottom=bottom, label=label, color=("tab:red", "tab:gray", "tab:green")[j])
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set(ylabel="share of Σ|A|", title=f"weight given to prompts by difficulty (G = {focus})")
    ax.tick_params(axis="x", rotation=70, labelsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / PLOTS["difficulty_weight"], dpi=110)
    plt.close(fig)
    study = result.amplification
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    half = study.group_size // 2
    for k in sorted({1, max(1, half // 2), half, study.group_size - 1}):
        left.plot(study.correlations, [row[k - 1] for row in study.ratio], marker="o", label=f"k = {k} of {study.group_size}")
    left.axhline(1, color="black", lw=0.8)
    left.set(xlabel="metric–reward correlation", ylabel="amplification of the grouping condition", title="against correlation")
    left.legend()
    for corr, row in zip(study.correlations, study.ratio):
        right.plot([k / study.group_size for k in study.splits], row, marker="o", ms=3, label=f"correlation {corr:.2f}")
    right.axhline(study.group_size / (study.group_size - 1), color="gray", ls="--", lw=0.8, label="G/(G−1)")
    right.set(xlabel="split balance k / G", ylabel="amplification", title="against the split's balance")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / PLOTS["amplification"], dpi=110)
    plt.close(fig)
