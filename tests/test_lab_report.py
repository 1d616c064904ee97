"""canonrl.lab.report on hand-written run directories whose numbers are known, so the table can be checked by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from canonrl.lab.report import (
    COLUMNS,
    RunError,
    average_over_runs,
    mean_ci,
    plot_run,
    read_run,
    write_comparison,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def eval_record(step: int, accuracy: float, *, greedy: float | None = None, length: float = 100.0,
                tokens_per_correct: float | None = 200.0, time: float | None = None) -> dict:
    return {
        "kind": "eval", "step": step, "time": float(step if time is None else time), "accuracy": accuracy,
        "greedy_pass1": accuracy if greedy is None else greedy, "k": 4, "response_length": length,
        "entropy": 0.5, "tokens_per_correct": tokens_per_correct,
        "budget_accuracy": {"16": accuracy / 4, "32": accuracy / 2, "64": accuracy},
    }


def make_run(root: Path, name: str, *, estimator: str = "grpo", seed: int = 0, initial: float = 0.2,
             final: float = 0.6, steps: int = 4, eval_every: int = 2, complete: bool = True,
             label: str | None = None, wall_time: float = 100.0, final_tokens_per_correct: float | None = 200.0,
             final_length: float = 80.0) -> Path:
    """A run of `steps` train steps with evals at 0, eval_every, ... and `steps`; accuracy moves linearly from
    `initial` to `final`. An incomplete run stops after the first half (no summary.json)."""
    run = root / name
    run.mkdir(parents=True)
    config = f"estimator: {estimator}\nseed: {seed}\ntask: arith\nsteps: {steps}\n"
    if label is not None:
        config += f"label: {label}\n"
    (run / "config.yaml").write_text(config)
    eval_steps = sorted(set(range(0, steps + 1, eval_every)) | {steps})
    last = steps if complete else steps // 2
    lines, evals = [], []
    for step in range(0, last + 1):
        if step:
            lines.append({"kind": "train", "step": step, "time": step - 0.5, "reward": 0.1 * step, "accuracy": 0.1,
                          "response_length": 100.0 - step, "entropy": 1.0 / step, "loss": 0.0, "tokens": 64 * step})
        if step in eval_steps:
            accuracy = initial + (final - initial) * step / steps
            is_final = step == steps
            record = eval_record(step, accuracy, length=final_length if is_final else 100.0,
                                 tokens_per_correct=final_tokens_per_correct if is_final else 300.0)
            lines.append(record)
            evals.append(record)
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if complete:
        summary = {"estimator": estimator, "seed": seed, "task": "arith", "steps": steps, "wall_time": wall_time,
                   "initial": evals[0], "final": evals[-1]}
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def table_rows(summary_md: Path) -> dict[str, dict[str, str]]:
    """The comparison table of summary.md (the first table), as {label: {column: cell}}."""
    lines = summary_md.read_text().splitlines()
    start = lines.index("| " + " | ".join(COLUMNS) + " |")
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        rows[cells[0]] = dict(zip(COLUMNS, cells))
    return rows


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5_000, (path, len(data))


# -------------------------------------------------------------------------------------------------- statistics


def test_mean_ci_matches_hand_computation():
    mean, half = mean_ci([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6)
    # t_{0.975, 2} = 4.302653, s = 0.1
    assert half == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-6)
    assert half == pytest.approx(0.2484, abs=1e-4)


def test_mean_ci_single_value_has_no_interval():
    assert mean_ci([0.42]) == (pytest.approx(0.42), None)


def test_average_over_runs_on_misaligned_steps():
    a = [(0, 0.0), (2, 0.2), (4, 0.4)]
    b = [(0, 1.0), (3, 0.3), (4, 0.8), (5, None)]
    average = average_over_runs([a, b])
    assert average.steps == [0, 2, 3, 4]  # step 5 has no value in any run
    assert average.mean == pytest.approx([0.5, 0.2, 0.3, 0.6])
    assert average.count == [2, 1, 1, 2]
    assert average.low == pytest.approx([0.0, 0.2, 0.3, 0.4])
    assert average.high == pytest.approx([1.0, 0.2, 0.3, 0.8])


# ------------------------------------------------------------------------------------------------------- reading


def test_read_run_complete_and_incomplete(tmp_path):
    done = read_run(make_run(tmp_path, "done", seed=3, final=0.6))
    assert not done.incomplete and done.seed == 3 and done.label == "grpo"
    assert [r["step"] for r in done.evals] == [0, 2, 4]
    assert len(done.train) == 4
    assert done.final["accuracy"] == pytest.approx(0.6) and done.wall_time == 100.0

    killed = make_run(tmp_path, "killed", steps=8, complete=False)
    with (killed / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "step": 5, "ti')  # killed mid-write
    run = read_run(killed)
    assert run.incomplete and run.summary is None
    assert run.final["step"] == 4 and run.initial["step"] == 0
    assert run.wall_time == 4.0 and run.last_step == 4


def test_tokens_per_correct_infinity_and_null_parse(tmp_path):
    run = make_run(tmp_path, "r", final_tokens_per_correct=math.inf)
    assert math.isinf(read_run(run).final["tokens_per_correct"])
    run = make_run(tmp_path, "s", final_tokens_per_correct=None)
    assert read_run(run).final["tokens_per_correct"] is None


def test_not_a_run_directory_errors(tmp_path):
    with pytest.raises(RunError, match="no such directory"):
        read_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match=r"not a run directory: .*empty \(no config.yaml or metrics.jsonl\)") as error:
        read_run(tmp_path / "empty")
    assert "\n" not in str(error.value)
    bad = make_run(tmp_path, "bad")
    (bad / "metrics.jsonl").write_text('{"kind": "eval"\n{"kind": "train", "step": 1}\n')
    with pytest.raises(RunError, match="line 1"):
        read_run(bad)
    with pytest.raises(RunError, match="no such directory"):
        write_comparison([tmp_path / "missing"], tmp_path / "out")


def test_label_takes_precedence_over_estimator(tmp_path):
    assert read_run(make_run(tmp_path, "a", estimator="canon", label="canon-mu1")).label == "canon-mu1"
    assert read_run(make_run(tmp_path, "b", estimator="canon")).label == "canon"


# ------------------------------------------------------------------------------------------------------- reports


def test_comparison_table(tmp_path):
    runs = [make_run(tmp_path / "runs", f"grpo-{seed}", seed=seed, initial=0.2, final=final, wall_time=wall,
                     final_length=length)
            for seed, final, wall, length in ((0, 0.5, 100.0, 70.0), (1, 0.6, 110.0, 80.0), (2, 0.7, 120.0, 90.0))]
    runs.append(make_run(tmp_path / "runs", "canon-0", estimator="canon", label="canon-eff", initial=0.3, final=0.8,
                         final_tokens_per_correct=math.inf))
    runs.append(make_run(tmp_path / "runs", "canon-1", estimator="canon", label="canon-eff", seed=1, initial=0.3,
                         final=0.4, complete=False))  # final = its step-2 eval: 0.3 + 0.1 * 2 / 4 = 0.35
    runs.append(make_run(tmp_path / "runs", "dr-0", estimator="dr_grpo", initial=0.1, final=0.45))
    out = tmp_path / "report"
    summary = write_comparison(runs, out)
    assert summary == out / "summary.md"
    rows = table_rows(summary)
    assert set(rows) == {"grpo", "canon-eff", "dr_grpo"}

    grpo = rows["grpo"]
    assert grpo["seeds (n)"] == "3"
    assert grpo["initial acc (%)"] == "20.0"
    assert grpo["final acc (%) ± 95% CI"] == "60.0 ± 24.8"
    assert grpo["Δ acc (points)"] == "+40.0"
    assert grpo["final greedy pass@1 (%)"] == "60.0"
    assert grpo["tokens / correct"] == "200.0"
    assert grpo["final response length (tokens)"] == "80.0"
    assert grpo["wall time (s)"] == "110"
    assert grpo["incomplete"] == "0"

    assert rows["dr_grpo"]["final acc (%) ± 95% CI"] == "45.0 (n=1)"
    assert rows["dr_grpo"]["Δ acc (points)"] == "+35.0"

    canon = rows["canon-eff"]
    assert canon["incomplete"] == "1"
    half = 12.706205 * (0.8 - 0.35) / math.sqrt(2) / math.sqrt(2)  # t_{0.975,1} * s / sqrt(2), s = |diff| / sqrt 2
    assert canon["final acc (%) ± 95% CI"] == f"57.5 ± {100 * half:.1f}"
    assert canon["tokens / correct"] == "300.0 (+1 run(s) ∞)"  # the killed run's last eval had 300 tokens/correct

    text = summary.read_text()
    assert "incomplete (no summary.json)" in text
    assert "final evaluations are at different steps" in text
    for name in ("accuracy_vs_step", "length_vs_step", "entropy_vs_step", "accuracy_vs_token_budget"):
        assert f"]({name}.png)" in text
        assert_png(out / f"{name}.png")
    assert "- `../runs/grpo-0`" in text and "- `../runs/canon-1`" in text


def test_plot_run_writes_pngs(tmp_path):
    run = make_run(tmp_path, "run", steps=30, eval_every=10, label="mine")
    paths = plot_run(run)
    assert [p.name for p in paths] == ["accuracy.png", "reward.png", "response_length.png", "entropy.png"]
    for path in paths:
        assert path.parent == run / "plots"
        assert_png(path)


def test_plot_run_of_a_run_killed_before_training(tmp_path):
    run = tmp_path / "early"
    run.mkdir()
    (run / "config.yaml").write_text("estimator: grpo\nseed: 0\n")
    (run / "metrics.jsonl").write_text("")
    for path in plot_run(run):
        assert_png(path)
