"""The held-out evaluation's sample metrics: pass@k (Chen et al. 2021), length by correctness, per difficulty."""

import json
import math

import pytest
import torch
from scipy.special import comb

from canonrl.lab.evaluate import evaluate, pass_at_k, pass_at_k_table, sample_metrics
from canonrl.lab.tasks.base import Problem, Reward
from canonrl.lab.tasks.lab import LabTask


def exact(n: int, c: int, k: int) -> float:
    return 1.0 - comb(n - c, k, exact=True) / comb(n, k, exact=True)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 16, 30])
def test_pass_at_k_matches_the_binomial_formula(n):
    counts = list(range(n + 1))
    for k in range(1, n + 1):
        got = pass_at_k(n, counts, k)
        want = torch.tensor([exact(n, c, k) for c in counts], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_pass_at_k_by_hand_and_at_the_edges():
    # n = 4, c = 1: pass@1 = 1/4, pass@2 = 1 - C(3,2)/C(4,2) = 1/2, pass@4 = 1
    assert pass_at_k(4, [1], 1).tolist() == [0.25]
    assert pass_at_k(4, [1], 2).tolist() == pytest.approx([0.5])
    assert pass_at_k(4, [1], 4).tolist() == [1.0]
    # n = 5, c = 2, k = 3: 1 - C(3,3)/C(5,3) = 0.9
    assert pass_at_k(5, [2], 3).item() == pytest.approx(0.9)
    for n in (1, 4, 16):
        for k in range(1, n + 1):
            assert pass_at_k(n, [0], k).item() == 0.0  # nothing right: never
            assert pass_at_k(n, [n], k).item() == 1.0  # everything right: always
        assert pass_at_k(n, [1], n).item() == 1.0  # k = n: any right sample is drawn
    # a large n stays finite and exact (no huge binomials)
    assert pass_at_k(1000, [3], 500).item() == pytest.approx(exact(1000, 3, 500), rel=1e-9)
    assert pass_at_k(4, torch.tensor(2), 2).shape == ()
    with pytest.raises(ValueError):
        pass_at_k(4, [1], 5)
    with pytest.raises(ValueError):
        pass_at_k(4, [5], 1)


def test_pass_at_k_table_has_every_power_of_two_up_to_n():
    assert list(pass_at_k_table([0, 3, 6], 6)) == ["1", "2", "4"]
    table = pass_at_k_table([0, 4, 16, 1], 16)
    assert list(table) == ["1", "2", "4", "8", "16"]
    assert table["1"] == pytest.approx((0 + 4 + 16 + 1) / 64)
    assert table["16"] == pytest.approx(0.75)
    for k in table:
        assert table[k] == pytest.approx(sum(exact(16, c, int(k)) for c in (0, 4, 16, 1)) / 4)
    values = list(table.values())
    assert values == sorted(values)  # pass@k grows with k


class Chains:
    """Problems with a difficulty (their length); verify is never called by sample_metrics."""

    name = "chains"
    components = ("correct",)

    def difficulty(self, problem):
        return int(problem.answer)


def test_sample_metrics_by_hand():
    problems = [Problem("a", "3"), Problem("b", "10"), Problem("c", "3")]  # levels 3, 10, 3: 10 sorts after 3
    scores = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.5, 1.0]  # 8 rows for 3 problems x 2 samples: an error
    with pytest.raises(ValueError):
        sample_metrics(Chains(), problems, scores, [1] * 8, 2)
    scores = [1.0, 0.0, 0.0, 0.0, 1.0, 0.5]
    lengths = [10, 20, 30, 40, 50, 60]
    plain = sample_metrics(LabTask(), [Problem("a", "1", {"operands": [1]})] * 3, scores, lengths, 2)
    assert plain["pass_at_k"] == {"1": pytest.approx(2 / 6), "2": pytest.approx(2 / 3)}
    assert plain["length_correct"] == 30.0  # rows 0 and 4 (0.5 is not correct)
    assert plain["length_incorrect"] == (20 + 30 + 40 + 60) / 4

    class NoDifficulty:
        name = "x"
        components = ()

    assert "by_difficulty" not in sample_metrics(NoDifficulty(), problems, scores, lengths, 2)
    levels = sample_metrics(Chains(), problems, scores, lengths, 2)["by_difficulty"]
    assert list(levels) == ["3", "10"]
    assert levels["3"] == {
        "problems": 2, "accuracy": pytest.approx(2.5 / 4), "tokens_per_correct": (10 + 20 + 50 + 60) / 2,
        "response_length": 35.0, "pass_at_k": {"1": 0.5, "2": 1.0}, "length_correct": 30.0, "length_incorrect": 40.0,
    }  # fmt: skip
    assert levels["10"]["problems"] == 1 and levels["10"]["accuracy"] == 0.0
    assert levels["10"]["tokens_per_correct"] == math.inf and levels["10"]["length_correct"] is None
    assert levels["10"]["pass_at_k"] == {"1": 0.0, "2": 0.0} and levels["10"]["length_incorrect"] == 35.0
    all_right = sample_metrics(Chains(), problems[:1], [1.0, 1.0], [5, 7], 2)
    assert all_right["length_incorrect"] is None and all_right["length_correct"] == 6.0


def test_lab_difficulty_is_the_operand_count():
    task = LabTask(min_operands=2, max_operands=8)
    problems = task.problems("heldout", 64, seed=0)
    for problem in problems:
        operands = problem.prompt.count("+") + problem.prompt.count("-") + 1
        assert task.difficulty(problem) == len(problem.meta["operands"]) == operands
    assert {task.difficulty(p) for p in problems} == set(range(2, 9))


class EvenLengths:
    """Lab problems with their operand count as difficulty; a response is right when its text has even length."""

    name = "even"
    components = ("correct",)
    cheap = True

    def __init__(self):
        self.inner = LabTask(min_operands=2, max_operands=4)

    def problems(self, split, count, seed):
        return self.inner.problems(split, count, seed)

    def difficulty(self, problem):
        return self.inner.difficulty(problem)

    def verify(self, response, problem):
        score = float(len(response) % 2 == 0)
        return Reward(score, {"correct": score})


def test_evaluate_reports_the_sample_metrics(policy_dir, one_thread):
    from canonrl.lab.policy import load_policy

    policy = load_policy(str(policy_dir))
    result = evaluate(policy, EvenLengths(), problems=24, seed=3, samples=8, max_new_tokens=12, greedy=False)
    assert list(result["pass_at_k"]) == ["1", "2", "4", "8"]
    assert result["pass_at_k"]["1"] == pytest.approx(result["accuracy"])  # binary scores: pass@1 = mean@k
    assert 0 < result["accuracy"] < 1
    total = 24 * 8
    right = result["accuracy"] * total
    assert right * result["length_correct"] + (total - right) * result["length_incorrect"] == pytest.approx(
        total * result["response_length"]
    )
    levels = result["by_difficulty"]
    assert set(levels) <= {"2", "3", "4"} and sum(level["problems"] for level in levels.values()) == 24
    weighted = sum(level["accuracy"] * level["problems"] for level in levels.values()) / 24
    assert weighted == pytest.approx(result["accuracy"])
    for level in levels.values():
        assert set(level) == {"problems", "accuracy", "pass_at_k", "tokens_per_correct", "response_length",
                              "length_correct", "length_incorrect"}  # fmt: skip
        assert list(level["pass_at_k"]) == ["1", "2", "4", "8"]
    for key in ("accuracy", "k", "response_length", "length_cv", "entropy", "finished", "tokens_per_correct",
                "budget_accuracy"):  # fmt: skip
        assert key in result
    assert json.loads(json.dumps(result)) == result  # the eval record stays JSON


def test_multi_turn_evaluation_reports_pass_at_k_and_difficulty(one_thread):
    from canonrl.lab.multi_turn import evaluate_environment
    from canonrl.lab.policy import load_policy
    from canonrl.lab.tasks.calc import CalcTask

    result = evaluate_environment(load_policy("lab-tiny"), CalcTask(), problems=6, seed=0, samples=4, greedy=False)
    assert list(result["pass_at_k"]) == ["1", "2", "4"]
    assert 0 <= result["pass_at_k"]["1"] <= result["pass_at_k"]["4"] <= 1
    assert set(result["by_difficulty"]) <= {"3", "4", "5"}
    assert sum(level["problems"] for level in result["by_difficulty"].values()) == 6


def test_run_log_mirrors_nested_eval_metrics_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from canonrl.lab.run_log import RunLog

    record = {"accuracy": 0.5, "pass_at_k": {"1": 0.5, "2": 0.75}, "length_correct": None,
              "tokens_per_correct": math.inf,
              "by_difficulty": {"3": {"accuracy": 0.5, "length_incorrect": None, "pass_at_k": {"1": 0.5}}}}  # fmt: skip
    with RunLog(tmp_path, tensorboard=True) as log:
        log.log("eval", 0, record)
    line = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert line["by_difficulty"]["3"]["length_incorrect"] is None and line["tokens_per_correct"] == math.inf


def test_the_regime_presets_are_valid_configs():
    from pathlib import Path

    from canonrl.lab.config import load_config
    from canonrl.lab.tasks import get_task

    presets = sorted((Path(__file__).resolve().parents[1] / "examples" / "regimes").glob("*.yaml"))
    assert {path.stem for path in presets} >= {"hard-chains", "mixed-chains", "mixed-chains-g16"}
    for path in presets:
        config = load_config(path)
        config.check_values()
        assert config.task == "lab" and config.eval_samples == 16 and config.eval_problems >= 128
        task = get_task(config.task, **config.task_options)  # the operand range is a valid one
        assert task.min_operands < task.max_operands  # every preset mixes at least two levels
