"""The step benchmark runs end to end on a tiny batch: every contender appears, with positive times (timings are
reported, never asserted), and the CLI writes its markdown table."""

from __future__ import annotations

import pytest

from canonrl.bench_steps import FLOOR, ROW_PER_STEP, ROW_PER_TRAJECTORY, run_step_benchmark


@pytest.fixture(scope="module")
def rows():
    return run_step_benchmark(sizes=(2, 3), trajectories=3, max_steps=4, tokens_per_step=8, tokens=64, repeats=1,
                              official_up_to=2)


def test_every_contender_runs_at_every_size_in_both_layouts(rows):
    for layout, cases in (("row-per-step", ROW_PER_STEP), ("row-per-trajectory", ROW_PER_TRAJECTORY)):
        labels = [r.label for r in rows if r.layout == layout]
        expected = [FLOOR] + [f"canonrl {label}" for label, _, _ in cases]
        assert all(labels.count(label) == 2 for label in expected), labels
    assert all(r.seconds > 0 and r.floor_seconds > 0 for r in rows)


def test_official_loops_run_only_up_to_the_limit(rows):
    official = [r for r in rows if r.label.startswith("official") and r.layout == "row-per-step"]
    assert {r.label for r in official} == {"official gigpo", "official hgpo"}
    assert all(r.size.startswith("2×") for r in official)
    compared = [r for r in rows if r.official_seconds is not None and r.layout == "row-per-step"]
    assert {r.label for r in compared} == {"canonrl gigpo (mean_std_norm)", "canonrl hgpo (K = 2)"}


def test_cli_writes_markdown(tmp_path):
    from typer.testing import CliRunner

    from canonrl.cli import app

    out = tmp_path / "steps.md"
    result = CliRunner().invoke(app, ["bench-steps", "--sizes", "2", "--trajectories", "2", "--max-steps", "3",
                                      "--tokens-per-step", "4", "--tokens", "32", "--repeats", "1",
                                      "--markdown", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text().startswith("| layout | batch | contender |")
    bad = CliRunner().invoke(app, ["bench-steps", "--sizes", "two"])
    assert bad.exit_code != 0 and "comma-separated integers" in bad.output
