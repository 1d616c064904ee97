"""The TRL benchmark runs end to end on a tiny random policy (timings are reported, never asserted)."""

import math

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    from conftest import tiny_lab_model

    path = tmp_path_factory.mktemp("tiny-policy")
    model, tokenizer = tiny_lab_model()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def result(tiny_policy):
    from canonrl.lab.trl_bench import run_trl_benchmark

    calls = []
    out = run_trl_benchmark(
        str(tiny_policy), prompts=2, group_size=2, max_new_tokens=8, steps=2, warmup=1, threads=1, seed=0,
        progress=lambda *args: calls.append(args),
    )  # fmt: skip
    out["_progress_calls"] = calls
    return out


def test_both_contenders_ran_and_report_positive_rates(result):
    assert set(result["contenders"]) == {"canonrl", "trl"}
    for name, row in result["contenders"].items():
        assert row["steps"] == 2, name
        assert len(row["step_seconds"]) == 2
        for key in ("steps_per_second", "rollout_tokens_per_second", "rollout_phase_tokens_per_second",
                    "generation_tokens_per_second", "seconds_per_step"):
            assert row[key] > 0 and math.isfinite(row[key]), (name, key)
        # completions have at least one token (EOS) and at most max_new_tokens
        assert 1 <= row["mean_completion_tokens"] <= 8
    assert result["ratio_steps_per_second"] > 0
    assert result["config"]["threads"] == 1


def test_trl_token_count_matches_its_own_logged_length(result):
    trl = result["contenders"]["trl"]
    assert trl["logged_mean_completion_tokens"] == pytest.approx(trl["mean_completion_tokens"])


def test_progress_reports_every_timed_step(result):
    names = [call[0] for call in result["_progress_calls"]]
    assert names.count("canonrl") == 2 and names.count("trl") == 2
    # the timed steps alternate in blocks: ours first
    assert names[0] == "canonrl"


def test_markdown_table_renders(result):
    from canonrl.lab.trl_bench import markdown_table

    table = markdown_table(result)
    lines = table.splitlines()
    assert lines[0].startswith("| contender | steps/s | rollout tokens/s")
    assert "ratio to TRL" in lines[0]
    assert len(lines) == 4
    assert lines[2].startswith("| canonrl |") and lines[3].startswith("| trl |")
    assert lines[3].endswith("| 1.00x |")


def test_bad_arguments_are_rejected(tiny_policy):
    from canonrl.lab.trl_bench import run_trl_benchmark

    with pytest.raises(ValueError, match="group_size"):
        run_trl_benchmark(str(tiny_policy), group_size=1)
    with pytest.raises(ValueError, match="policy"):
        run_trl_benchmark("no-such-policy-dir")


def test_trl_does_one_generation_per_optimizer_step_and_no_extra_forward(result):
    settings = result["contenders"]["trl"]["settings"]
    assert settings["generation_batch_size"] == 2 * 2  # prompts x G completions
    assert settings["steps_per_generation"] == 1 and settings["gradient_accumulation_steps"] == 1
    assert settings["old_logprob_forward"] is False
    assert settings["final_lr"] == pytest.approx(result["config"]["lr"])  # constant schedule, as ours
    assert settings["eos_token_ids"] == [2]  # the lab tokenizer's </s>


def test_missing_trl_is_a_one_line_error(monkeypatch):
    import sys

    from canonrl.lab.trl_bench import run_trl_benchmark

    monkeypatch.setitem(sys.modules, "trl", None)
    with pytest.raises(RuntimeError, match="pip install trl"):
        run_trl_benchmark()


def test_command_line_prints_the_table(tiny_policy, capsys):
    from canonrl.lab.trl_bench import _main

    _main(["--policy", str(tiny_policy), "--prompts", "2", "--group-size", "2", "--max-new-tokens", "4",
           "--steps", "1", "--warmup", "1", "--threads", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert "| contender | steps/s |" in out and "| trl |" in out


def test_generation_is_timed_inside_the_rollout_phase_inside_the_step(result):
    from canonrl.lab import rollout, sampling

    for name, row in result["contenders"].items():
        assert 0 < row["generation_seconds"] <= row["rollout_phase_seconds"] <= row["seconds"], name
    # our sampler is restored after the benchmark
    assert sampling.generate.__module__ == "canonrl.lab.sampling" and sampling.generate.__name__ == "generate"
    assert rollout.generate is sampling.generate  # the timing wrapper was taken off again
