"""canonrl.lab.claims and the paired statistics of `canonrl compare`: claims-file validation, a claim run on
synthetic runs (the training itself is stubbed: a real 2 x 2 run takes ~40 s here), verdict files, the claims page,
and the compare report's paired-difference table."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from canonrl.lab import claims as claims_module
from canonrl.lab.claims import (
    ClaimError,
    load_claims,
    plan_claim,
    publish_verdicts,
    published_verdicts,
    run_claim,
    validate_claim,
    write_claims_page,
)
from canonrl.lab.report import PAIRED_COLUMNS, write_comparison

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"examples/regimes/hard-chains.yaml", "examples/regimes/mixed-chains.yaml",
           "examples/regimes/mixed-chains-g16.yaml"}

CLAIM = {
    "id": "tiny",
    "paper": {"title": "A paper", "arxiv": "0000.00000"},
    "statement": "dr_grpo at least matches grpo.",
    "paper_figure": "not stated",
    "base": None,
    "overrides": {"eval_problems": 4, "eval_samples": 2, "prompts_per_step": 2, "group_size": 4},
    "configurations": {"grpo": {"estimator": "grpo"}, "dr_grpo": {"estimator": "dr_grpo"}},
    "baseline": "grpo",
    "seeds": [0, 1, 2],
    "budget": {"steps": 2, "minutes": 1},
    "tests": [{"metric": "accuracy", "direction": "not_worse", "margin": 0.05},
              {"metric": "pass_at_k.16", "direction": "greater"}],
    "cannot_say": ["anything at scale"],
}


def broken(**changes):
    entry = copy.deepcopy(CLAIM)
    for key, value in changes.items():
        if value is None and key != "base":
            entry.pop(key, None)
        else:
            entry[key] = value
    return entry


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (broken(id="Bad Id"), "id must match"),
        (broken(colour="red"), "unknown key"),
        (broken(baseline="ppo"), "baseline 'ppo' is not one of the configurations"),
        (broken(configurations={"grpo": {"estimator": "grpo"}}), "at least two labels"),
        (broken(configurations={"grpo": {"estimator": "grpo"}, "x": {"params": {}}}), "needs an estimator"),
        (broken(seeds=[0, 0]), "distinct integers"),
        (broken(budget={"steps": 10, "minutes": 90}), "budget.minutes must be in"),
        (broken(budget={"minutes": 9}), "steps"),
        (broken(tests=[]), "non-empty list"),
        (broken(tests=[{"metric": "accuracy", "direction": "up"}]), "direction must be one of"),
        (broken(tests=[{"metric": "accuracy", "direction": "not_worse"}]), "needs a margin"),
        (broken(tests=[{"metric": "accuracy", "direction": "less", "candidate": "rloo"}]), "candidate 'rloo'"),
        (broken(statement=None), "statement must be"),
        (broken(paper={"title": "x"}), "paper must be"),
        (broken(base="preset.json"), "base must be"),
    ],
)
def test_validation_errors_are_one_line(entry, message):
    with pytest.raises(ClaimError, match=message) as error:
        validate_claim(entry)
    assert "\n" not in str(error.value)


def test_tests_get_their_defaults():
    claim = validate_claim(copy.deepcopy(CLAIM))
    assert claim.tests[0]["candidate"] == "dr_grpo" and claim.tests[0]["baseline"] == "grpo"
    assert claim.tests[0]["seeds"] == 3
    three = broken(configurations={**CLAIM["configurations"], "rloo": {"estimator": "rloo"}})
    with pytest.raises(ClaimError, match="name its candidate"):
        validate_claim(three)


def test_the_shipped_claims_load_and_plan(tmp_path):
    claims = load_claims()
    assert len(claims) >= 10
    for claim in claims.values():
        assert claim.seeds == [0, 1, 2, 3, 4], claim.id  # claims default to five paired seeds
        assert claim.budget["minutes"] <= 60 and claim.cannot_say, claim.id
        if claim.base is not None and not (ROOT / claim.base).exists():
            assert claim.base in PRESETS, claim.id  # a regime preset written by another change
            continue
        runs = plan_claim(claim, tmp_path / claim.id)
        assert len(runs) == len(claim.configurations) * len(claim.seeds)
        assert runs[0].run_dir.name == f"{claim.baseline}-seed0"
        assert {run.config.steps for run in runs} == {claim.budget["steps"]}
        by_label = {}
        for run in runs:  # paired: every configuration on the same seeds
            by_label.setdefault(run.config.label, []).append(run.config.seed)
        assert all(seeds == claim.seeds for seeds in by_label.values()), claim.id


def test_load_claims_file_errors(tmp_path):
    with pytest.raises(ClaimError, match="does not exist"):
        load_claims(tmp_path / "none.yaml")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"claims": [CLAIM, CLAIM]}))
    with pytest.raises(ClaimError, match="appears twice"):
        load_claims(tmp_path / "c.yaml")


# ------------------------------------------------------------------------------------------ a claim, end to end


def fake_run(run_dir: Path, config, accuracy: float, pass16: float) -> None:
    """What a finished `canonrl train` run leaves that the verdict reads."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    initial = {"kind": "eval", "step": 0, "accuracy": 0.2, "tokens_per_correct": 50.0, "entropy": 0.3,
               "pass_at_k": {"1": 0.2, "16": 0.5}}
    final = {"kind": "eval", "step": config.steps, "accuracy": accuracy, "tokens_per_correct": 40.0, "entropy": 0.2,
             "pass_at_k": {"1": accuracy, "16": pass16}}
    lines = [initial, {"kind": "train", "step": 1, "entropy": 0.3}, final]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (run_dir / "summary.json").write_text(json.dumps({"initial": initial, "final": final, "seed": config.seed}))


def test_claim_run_writes_verdicts_and_resumes(tmp_path, monkeypatch):
    calls = []

    def stub_run_all(runs, jobs, progress=None):
        calls.append([run.run_dir.name for run in runs])
        for run in runs:
            if not (run.run_dir / "summary.json").exists():
                better = run.config.label == "dr_grpo"
                fake_run(run.run_dir, run.config, 0.5 + (0.02 if better else 0.0) + 0.01 * run.config.seed,
                         0.7 + (0.05 + 0.01 * run.config.seed if better else 0.0))
        return {run.run_dir: "" for run in runs}

    monkeypatch.setattr("canonrl.lab.compare.run_all", stub_run_all)
    claim = validate_claim(copy.deepcopy(CLAIM))
    out = tmp_path / "claim"
    record = run_claim(claim, out, jobs=2, command="canonrl claims run tiny")
    assert calls[0] == ["grpo-seed0", "grpo-seed1", "grpo-seed2", "dr_grpo-seed0", "dr_grpo-seed1", "dr_grpo-seed2"]
    assert [t["verdict"] for t in record["tests"]] == ["reproduced", "reproduced"]
    assert record["verdict"] == "reproduced"
    accuracy = record["tests"][0]["comparison"]
    assert accuracy["seeds"] == [0, 1, 2] and accuracy["mean"] == pytest.approx(0.02)
    assert record["tests"][1]["comparison"]["p_value"] == pytest.approx(2 / 8)
    assert record["seeds"] == [0, 1, 2] and record["deviations"] == []
    assert "package" in record["code_version"]
    saved = json.loads((out / "verdict.json").read_text())
    assert saved["command"] == "canonrl claims run tiny" and saved["runs"]["grpo"][0] == "runs/grpo-seed0"
    assert (out / "differences.png").is_file() and (out / "pareto.png").is_file()
    assert "reproduced" in (out / "verdict.md").read_text()
    config = yaml.safe_load((out / "configs" / "dr_grpo.yaml").read_text())
    assert config["steps"] == 2 and config["label"] == "dr_grpo" and config["group_size"] == 4

    # run again with other seeds and an override: finished runs are reused, the deviation recorded
    again = run_claim(claim, out, seeds=[0, 1], overrides=["eval_samples=4"], jobs=2)
    assert again["deviations"] and "seeds [0, 1]" in again["deviations"][0]
    assert again["tests"][0]["comparison"]["n"] == 2
    assert again["tests"][0]["verdict"] == "inconclusive"  # the pre-stated test asked for all three seeds
    assert again["tests"][0]["reason"] == "2 paired seed(s); the test needs 3"


def test_a_missing_metric_is_inconclusive_not_a_crash(tmp_path, monkeypatch):
    def stub_run_all(runs, jobs, progress=None):
        for run in runs:
            fake_run(run.run_dir, run.config, 0.5, 0.7)
        return {run.run_dir: "" for run in runs}

    monkeypatch.setattr("canonrl.lab.compare.run_all", stub_run_all)
    entry = broken(tests=[{"metric": "length_incorrect", "direction": "greater"}])
    record = run_claim(validate_claim(entry), tmp_path / "c", jobs=1)
    assert record["tests"][0]["verdict"] == "inconclusive"
    assert record["tests"][0]["reason"].startswith("not evaluable: run ")


def test_claims_page_lists_run_and_not_run_claims(tmp_path, monkeypatch):
    def stub_run_all(runs, jobs, progress=None):
        for run in runs:
            fake_run(run.run_dir, run.config, 0.5 - 0.1 * (run.config.label == "dr_grpo"), 0.7)
        return {run.run_dir: "" for run in runs}

    monkeypatch.setattr("canonrl.lab.compare.run_all", stub_run_all)
    claim = validate_claim(copy.deepcopy(CLAIM))
    other = validate_claim({**copy.deepcopy(CLAIM), "id": "later"})
    run_claim(claim, tmp_path / "reports" / "tiny", jobs=1)
    published = publish_verdicts([tmp_path / "reports" / "tiny" / "verdict.json"], tmp_path / "docs" / "claims")
    assert published == published_verdicts(tmp_path / "docs" / "claims") == [tmp_path / "docs" / "claims" / "tiny.json"]
    page = write_claims_page({"tiny": claim, "later": other}, published, tmp_path / "docs" / "claims.md")
    text = page.read_text()
    assert "| [tiny](#tiny) | A paper | contradicted |" in text
    assert "| [later](#later) | A paper | not run |" in text
    assert "## later: not run" in text and "anything at scale" in text
    assert "**contradicted**" in text  # accuracy: the whole CI (-0.1) lies below -margin
    assert (tmp_path / "docs" / "claims" / "tiny-differences.png").is_file()
    assert "](claims/tiny-differences.png)" in text


def test_the_claims_command_line(tmp_path):
    from canonrl.cli import app

    runner = CliRunner()
    listing = runner.invoke(app, ["claims", "list"])
    assert listing.exit_code == 0 and "canon-eff" in listing.output
    shown = runner.invoke(app, ["claims", "show", "canon-eff"])
    assert shown.exit_code == 0 and "alpha" in shown.output
    missing = runner.invoke(app, ["claims", "show", "nope"])
    assert missing.exit_code == 2 and "no claim 'nope'" in missing.output
    page = tmp_path / "claims.md"
    report = runner.invoke(app, ["claims", "report", "--from", str(tmp_path / "none"), "--out", str(page)])
    assert report.exit_code == 0 and "not run" in page.read_text()


def test_the_checked_in_claims_page_is_current(tmp_path):
    """docs/claims.md is what `canonrl claims report` writes from the shipped claims and the verdicts published in
    docs/claims/."""
    page = write_claims_page(load_claims(), published_verdicts(ROOT / "docs" / "claims"), tmp_path / "claims.md")
    assert page.read_text() == (ROOT / "docs" / "claims.md").read_text(), "run `canonrl claims report`"


# ---------------------------------------------------------------------------------- compare's paired statistics


def compare_run(root: Path, label: str, seed: int, accuracy: float, tokens: float) -> Path:
    run = root / f"{label}-seed{seed}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"estimator: {label}\nseed: {seed}\ntask: lab\nsteps: 4\n")
    records = [{"kind": "eval", "step": 0, "accuracy": 0.2, "entropy": 0.5, "tokens_per_correct": 60.0,
                "pass_at_k": {"1": 0.2, "4": 0.4}},
               {"kind": "eval", "step": 4, "accuracy": accuracy, "entropy": 0.4, "tokens_per_correct": tokens,
                "pass_at_k": {"1": accuracy, "4": accuracy + 0.1}}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "summary.json").write_text(json.dumps({"initial": records[0], "final": records[1], "wall_time": 1.0}))
    return run


def paired_rows(summary: Path) -> list[list[str]]:
    lines = summary.read_text().splitlines()
    start = lines.index("| " + " | ".join(PAIRED_COLUMNS) + " |")
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def test_compare_report_adds_paired_differences(tmp_path):
    dirs = [compare_run(tmp_path, "grpo", s, 0.5 + 0.01 * s, 40.0) for s in range(3)]
    dirs += [compare_run(tmp_path, "canon", s, 0.6 + 0.01 * s, 30.0 + s) for s in range(3)]
    summary = write_comparison(dirs, tmp_path / "report")  # grpo first: the baseline
    rows = paired_rows(summary)
    metrics = [row[1] for row in rows]
    assert metrics == ["final accuracy (points)", "AUC of accuracy (points)", "tokens / correct", "pass@4 (points)",
                       "entropy (nats/token)"]
    accuracy = rows[0]
    assert accuracy[0] == "canon − grpo" and accuracy[2] == "+10.0" and accuracy[3] == "[+10.0, +10.0]"
    assert accuracy[4] == "0.25" and accuracy[5] == "3"  # 3 seeds all one way: 2/8
    auc = rows[1]  # (0.2 + final) / 2 per run: a 5-point difference
    assert auc[2] == "+5.0"
    assert rows[2][2] == "-9.000"
    assert (tmp_path / "report" / "differences.png").is_file() and (tmp_path / "report" / "pareto.png").is_file()


def test_compare_report_without_shared_seeds_has_no_paired_table(tmp_path):
    dirs = [compare_run(tmp_path, "grpo", 0, 0.5, 40.0), compare_run(tmp_path, "canon", 1, 0.6, 30.0)]
    text = write_comparison(dirs, tmp_path / "report").read_text()
    assert "## Paired differences" not in text
    assert claims_module.MAX_MINUTES == 60
