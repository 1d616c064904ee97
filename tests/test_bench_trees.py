"""The tree benchmark runs end to end on tiny trees: every contender appears in both layouts with positive times
(timings are reported, never asserted), the per-node loops agree with canonrl (checked inside the benchmark before
timing), and the CLI writes its markdown table."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import canonrl
from canonrl.bench_trees import (
    BUILD,
    FLOOR,
    ROW_PER_EDGE,
    ROW_PER_LEAF,
    full_trees,
    loop_rose,
    loop_spo_tree,
    row_per_edge,
    row_per_leaf,
    run_tree_benchmark,
)
from canonrl.cli import app


@pytest.fixture(scope="module")
def rows():
    return run_tree_benchmark(sizes=(2, 3), branching=(2, 3, 2), tokens=3, repeats=1)


def test_every_contender_runs_at_every_size_in_both_layouts(rows):
    for layout, cases, extra in (("row per edge", ROW_PER_EDGE, []), ("row per leaf", ROW_PER_LEAF, [BUILD])):
        labels = [r.label for r in rows if r.layout == layout]
        expected = [FLOOR, *extra] + [f"canonrl {label}" for label, _, _ in cases] + [f"per-node loop: {cases[0][0]}"]
        assert sorted(labels) == sorted(expected * 2), labels
    assert all(r.seconds > 0 for r in rows)
    assert [r.nodes for r in rows if r.label == FLOOR] == [2 * 21] * 2 + [3 * 21] * 2  # 1 + 2 + 6 + 12 per tree


def test_the_generated_trees_and_the_loops_agree_with_canonrl():
    trees = full_trees(3, (2, 3, 2), seed=1)
    edges = row_per_edge(trees, tokens=2)
    torch.testing.assert_close(loop_spo_tree(edges), canonrl.advantages("spo_tree", **edges))
    leaves, rollouts = row_per_leaf(trees, (2, 3, 2), tokens=2)
    assert (leaves["turn_ids"].amax(1) == 2).all()  # every leaf cut into one segment per depth
    torch.testing.assert_close(loop_rose(leaves), canonrl.advantages("rose", **leaves))
    same_tree = canonrl.advantages("spo_tree", **edges)[-len(trees["leaves"]):, 0]  # the leaf edges ...
    torch.testing.assert_close(canonrl.advantages("spo_tree", **leaves)[:, -1], same_tree)  # ... are the last segments
    assert set(rollouts) == {"parent_row", "branch_pos", "mask"}


def test_cli_writes_markdown_and_rejects_bad_options(tmp_path):
    out = tmp_path / "trees.md"
    result = CliRunner().invoke(app, ["bench-trees", "--sizes", "2", "--branching", "2,2", "--tokens", "2",
                                      "--repeats", "1", "--markdown", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text().startswith("| layout | batch | contender |")
    for option, value, message in (("--sizes", "two", "comma-separated integers"), ("--branching", "2,1", "2 children")):
        bad = CliRunner().invoke(app, ["bench-trees", option, value])
        assert bad.exit_code != 0 and message in bad.output
