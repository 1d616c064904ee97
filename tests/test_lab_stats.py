"""canonrl.lab.stats: paired bootstrap / permutation results checked by hand, every verdict branch, metric paths."""

from __future__ import annotations

import json
import math

import pytest

from canonrl.lab.report import read_run
from canonrl.lab.stats import (
    Comparison,
    MetricError,
    bootstrap_ci,
    metric_value,
    overall_verdict,
    paired_comparison,
    permutation_p,
    values_by_seed,
    verdict,
)


def test_permutation_p_is_exact_on_few_seeds():
    assert permutation_p([1, 2, 3, 4, 5]) == pytest.approx(2 / 32)  # only all-positive (and its mirror) as extreme
    assert permutation_p([-0.1, -0.2, -0.3, -0.4, -0.5]) == pytest.approx(2 / 32)
    # sums of sign patterns of |d| = 1,1,2,3,4 at least the observed 9: all +, or one of the two 1s flipped
    assert permutation_p([1, -1, 2, 3, 4]) == pytest.approx(6 / 32)
    assert permutation_p([0.1, 0.2]) == pytest.approx(2 / 4)
    assert permutation_p([0.0, 0.0, 0.0]) == 1.0
    assert permutation_p([]) is None


def test_bootstrap_ci_is_reproducible_and_bounded():
    low, high = bootstrap_ci([1, 2, 3, 4, 5])
    assert 1 <= low < 3 < high <= 5
    assert bootstrap_ci([1, 2, 3, 4, 5]) == (low, high)  # fixed generator seed
    assert bootstrap_ci([1, 3]) == (1.0, 3.0)  # two values: resampled means are 1, 2 or 3
    assert bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)  # no spread
    assert bootstrap_ci([2.0]) is None


def test_paired_comparison_keeps_only_shared_seeds():
    comparison = paired_comparison({0: 1.0, 1: 2.0, 2: 3.0}, {0: 2.0, 1: 4.0, 2: 3.5, 3: 9.0}, metric="m",
                                   baseline_label="b", candidate_label="c")
    assert comparison.seeds == [0, 1, 2] and comparison.n == 3
    assert comparison.differences == [1.0, 2.0, 0.5]
    assert comparison.mean == pytest.approx(7 / 6)
    assert comparison.unpaired == {"c": [3]}
    assert comparison.p_value == pytest.approx(2 / 8)
    assert comparison.ci_low == pytest.approx(0.5) and comparison.ci_high == pytest.approx(2.0)
    with pytest.raises(ValueError, match="share no seed"):
        paired_comparison({0: 1.0}, {1: 1.0})


def fixed(low: float | None, high: float | None, n: int = 5) -> Comparison:
    mean = 0.0 if low is None else (low + high) / 2
    return Comparison("m", "b", "c", list(range(n)), [0.0] * n, [mean] * n, [mean] * n, mean, low, high, 0.5)


@pytest.mark.parametrize(
    ("test", "ci", "expected"),
    [
        ({"direction": "greater"}, (0.01, 0.2), "reproduced"),
        ({"direction": "greater"}, (-0.2, -0.01), "contradicted"),
        ({"direction": "greater"}, (-0.1, 0.1), "inconclusive"),
        ({"direction": "greater", "threshold": 0.05}, (0.01, 0.2), "inconclusive"),
        ({"direction": "less"}, (-0.2, -0.01), "reproduced"),
        ({"direction": "less"}, (0.01, 0.2), "contradicted"),
        ({"direction": "less"}, (-0.1, 0.1), "inconclusive"),
        ({"direction": "not_worse", "margin": 0.02}, (-0.01, 0.05), "reproduced"),
        ({"direction": "not_worse", "margin": 0.02}, (-0.08, -0.03), "contradicted"),
        ({"direction": "not_worse", "margin": 0.02}, (-0.05, 0.01), "inconclusive"),
        ({"direction": "not_worse", "margin": 5, "better": "lower"}, (-10, 4), "reproduced"),
        ({"direction": "not_worse", "margin": 5, "better": "lower"}, (6, 9), "contradicted"),
        ({"direction": "not_worse", "margin": 5, "better": "lower"}, (3, 9), "inconclusive"),
        ({"direction": "equivalent", "margin": 0.03}, (-0.02, 0.02), "reproduced"),
        ({"direction": "equivalent", "margin": 0.03}, (0.04, 0.1), "contradicted"),
        ({"direction": "equivalent", "margin": 0.03}, (-0.1, -0.04), "contradicted"),
        ({"direction": "equivalent", "margin": 0.03}, (-0.02, 0.05), "inconclusive"),
    ],
)
def test_verdict_branches(test, ci, expected):
    outcome, reason = verdict(test, fixed(*ci))
    assert outcome == expected, reason
    assert "\n" not in reason


def test_verdict_needs_enough_seeds_and_a_ci():
    assert verdict({"direction": "greater", "seeds": 5}, fixed(0.1, 0.2, n=3))[0] == "inconclusive"
    assert verdict({"direction": "greater"}, fixed(None, None, n=1))[0] == "inconclusive"
    with pytest.raises(ValueError, match="needs a margin"):
        verdict({"direction": "not_worse"}, fixed(0.1, 0.2))
    with pytest.raises(ValueError, match="direction must be one of"):
        verdict({"direction": "bigger"}, fixed(0.1, 0.2))


def test_overall_verdict():
    assert overall_verdict(["reproduced", "reproduced"]) == "reproduced"
    assert overall_verdict(["reproduced", "inconclusive"]) == "inconclusive"
    assert overall_verdict(["reproduced", "contradicted", "inconclusive"]) == "contradicted"
    assert overall_verdict([]) == "inconclusive"


# ------------------------------------------------------------------------------------------------------ metrics


def write_run(root, name, *, seed=0, label="grpo", accuracies=(0.2, 0.4, 0.8), steps=(0, 5, 10), summary=True,
              extra=None):
    """A run dir with eval lines at `steps` (accuracy as given) and the newer eval keys; train lines every step."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"estimator: grpo\nlabel: {label}\nseed: {seed}\ntask: lab\n")
    lines, evals = [], []
    for step in range(steps[-1] + 1):
        if step:
            lines.append({"kind": "train", "step": step, "entropy": float(step), "response_length": 10.0})
        if step in steps:
            accuracy = accuracies[steps.index(step)]
            record = {"kind": "eval", "step": step, "accuracy": accuracy, "entropy": 0.5, "tokens_per_correct": 40.0,
                      "pass_at_k": {"1": accuracy, "16": min(1.0, accuracy + 0.3)}, "length_incorrect": None,
                      "by_difficulty": {"3": {"accuracy": 0.9, "problems": 5}, "7": {"accuracy": accuracy / 2},
                                        "8": {"accuracy": accuracy / 4}},
                      "budget_accuracy": {"64": accuracy}, **(extra or {})}
            lines.append(record)
            evals.append(record)
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if summary:
        (run / "summary.json").write_text(json.dumps({"initial": evals[0], "final": evals[-1], "seed": seed}))
    return run


def test_metric_paths(tmp_path):
    run = read_run(write_run(tmp_path, "a"))
    assert metric_value(run, "accuracy") == 0.8
    assert metric_value(run, "pass_at_k.16") == pytest.approx(1.0)
    assert metric_value(run, "by_difficulty.8.accuracy") == pytest.approx(0.2)
    assert metric_value(run, "by_difficulty.{7,8}.accuracy") == pytest.approx((0.4 + 0.2) / 2)
    assert metric_value(run, "budget_accuracy.64") == 0.8
    assert metric_value(run, "initial:accuracy") == 0.2
    assert metric_value(run, "gain:accuracy") == pytest.approx(0.6)
    # trapezoid: (0.2+0.4)/2*5 + (0.4+0.8)/2*5 = 4.5 over 10 steps
    assert metric_value(run, "auc:accuracy") == pytest.approx(0.45)
    assert metric_value(run, "early:accuracy") == pytest.approx(0.3)  # over steps 0..5
    assert metric_value(run, "late:accuracy") == pytest.approx(0.6)  # over steps 5..10
    assert metric_value(run, "train:entropy") == pytest.approx(5.5)  # mean of 1..10
    assert metric_value(run, "train:entropy@8:") == pytest.approx(9.0)
    assert metric_value(run, "train:entropy@:2") == pytest.approx(1.5)


def test_metric_errors_are_one_line_naming_the_run(tmp_path):
    run = read_run(write_run(tmp_path, "a"))
    for metric, message in [("length_incorrect", "no finite 'length_incorrect'"), ("pass_at_k.64", "pass_at_k.64"),
                            ("nope:accuracy", "unknown prefix"), ("train:loss", "no training records"),
                            ("auc:missing", "eval records")]:
        with pytest.raises(MetricError, match=message) as error:
            metric_value(run, metric)
        assert "\n" not in str(error.value)
        if "prefix" not in message:
            assert str(run.path) in str(error.value)


def test_incomplete_run_uses_its_last_eval_line(tmp_path):
    run = read_run(write_run(tmp_path, "a", summary=False))
    assert metric_value(run, "accuracy") == 0.8 and math.isclose(metric_value(run, "gain:accuracy"), 0.6)


def test_values_by_seed_refuses_repeated_seeds(tmp_path):
    runs = [read_run(write_run(tmp_path, f"a{i}", seed=0)) for i in range(2)]
    with pytest.raises(MetricError, match="seed 0 appears twice"):
        values_by_seed(runs, "accuracy")
