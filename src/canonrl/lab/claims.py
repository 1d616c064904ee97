"""Pre-stated claims: papers' claims written down as tests before anything runs, run by `canonrl claims run`.

A claims file (the shipped one is ``canonrl/lab/claims.yaml``) is ``{version: 1, claims: [claim, ...]}``; a claim:

- ``id`` (``[a-z0-9-]+``), ``paper`` (``{title, arxiv}``), ``statement`` (the paper's claim in words),
  ``paper_figure`` (the paper's own numbers, or "not stated"), ``cannot_say`` (a list: what the lab's scale cannot
  say about the claim);
- ``base``: a lab config file (a regime preset such as ``examples/regimes/hard-chains.yaml``; a relative path is
  looked up from the working directory, then from the checkout the package runs from) or null; ``overrides``: lab
  config keys applied on top (a mapping);
- ``configurations``: ``{label: {estimator, estimator_params, overrides}}``; ``baseline``: one of the labels;
- ``seeds``: the seeds every configuration runs (paired; default five: 0..4);
- ``budget``: ``{steps, minutes}``: the steps every run trains (set on top of ``overrides``) and the estimated wall
  time of the whole claim, all runs, two at a time on two cores; at most `MAX_MINUTES`;
- ``tests``: ``[{metric, direction, threshold | margin, better, candidate, baseline, seeds}]``: ``candidate`` (default:
  the one configuration that is not the baseline) minus ``baseline`` (default: the claim's) on ``metric``; the
  syntax of metrics and the verdict rules are in `canonrl.lab.stats`. ``seeds`` (default: all the claim's seeds)
  is the least number of paired seeds the test needs.

Every error in the file is one line naming the claim and the field. Runs live in ``<out>/runs/<label>-seed<seed>``,
exactly as `canonrl compare` lays them out, so running a claim again resumes it and reuses finished runs.
``<out>/verdict.json`` and ``<out>/verdict.md`` record the claim, the command, the seeds, the code version and,
per test, the paired comparison and its verdict; a run with other seeds or extra overrides than the claim's is
recorded as a deviation from the pre-stated test.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from canonrl.lab.stats import DIRECTIONS, VERDICTS, check_test, compare_runs, overall_verdict, verdict

#: the longest a claim's test may take: all its runs, two at a time on two CPU cores
MAX_MINUTES = 60
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
CLAIM_KEYS = {"id", "paper", "statement", "paper_figure", "base", "overrides", "configurations", "baseline", "seeds",
              "budget", "tests", "cannot_say"}
CONFIGURATION_KEYS = {"estimator", "estimator_params", "overrides"}
TEST_KEYS = {"metric", "direction", "threshold", "margin", "better", "candidate", "baseline", "seeds", "note"}
_ID = re.compile(r"^[a-z0-9][a-z0-9-]*$")


class ClaimError(ValueError):
    """A malformed claims file; the message is one line naming the claim and the field."""


@dataclass
class Claim:
    id: str
    paper: dict[str, str]
    statement: str
    paper_figure: str
    base: str | None
    overrides: dict[str, Any]
    configurations: dict[str, dict[str, Any]]
    baseline: str
    seeds: list[int]
    budget: dict[str, Any]
    tests: list[dict[str, Any]]
    cannot_say: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def shipped_claims_path() -> Path:
    return Path(str(resources.files("canonrl.lab") / "claims.yaml"))


def load_claims(path: str | Path | None = None) -> dict[str, Claim]:
    """{id: Claim} of a claims file (default: the shipped one), validated; raises `ClaimError` (one line)."""
    path = Path(path) if path is not None else shipped_claims_path()
    if not path.is_file():
        raise ClaimError(f"claims file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ClaimError(f"claims file {path} is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(data, dict) or not isinstance(data.get("claims"), list):
        raise ClaimError(f"claims file {path}: expected a mapping with a list `claims`")
    claims: dict[str, Claim] = {}
    for index, entry in enumerate(data["claims"]):
        claim = validate_claim(entry, where=f"{path.name}: claim #{index + 1}")
        if claim.id in claims:
            raise ClaimError(f"{path.name}: claim id {claim.id!r} appears twice")
        claims[claim.id] = claim
    return claims


def validate_claim(entry: Any, where: str = "claim") -> Claim:
    """One claim entry as a `Claim`; raises `ClaimError` (one line) on the first problem found."""
    if not isinstance(entry, dict):
        raise ClaimError(f"{where}: expected a mapping, got {type(entry).__name__}")
    claim_id = entry.get("id")
    if not isinstance(claim_id, str) or not _ID.match(claim_id):
        raise ClaimError(f"{where}: id must match [a-z0-9-]+, got {claim_id!r}")
    where = f"claim {claim_id!r}"

    def fail(message: str) -> ClaimError:
        return ClaimError(f"{where}: {message}")

    unknown = sorted(set(entry) - CLAIM_KEYS)
    if unknown:
        raise fail(f"unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(CLAIM_KEYS))})")
    for key in ("statement", "paper_figure"):
        if not isinstance(entry.get(key), str) or not entry[key].strip():
            raise fail(f"{key} must be a non-empty string")
    paper = entry.get("paper")
    if not isinstance(paper, dict) or not paper.get("title") or "arxiv" not in paper:
        raise fail("paper must be a mapping with title and arxiv")
    base = entry.get("base")
    if base is not None and not (isinstance(base, str) and base.endswith((".yaml", ".yml"))):
        raise fail(f"base must be null or a .yaml config path, got {base!r}")
    overrides = entry.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise fail("overrides must be a mapping of lab config keys to values")
    configurations = entry.get("configurations")
    if not isinstance(configurations, dict) or len(configurations) < 2:
        raise fail("configurations must map at least two labels to {estimator, estimator_params, overrides}")
    for label, spec in configurations.items():
        if not isinstance(label, str) or not _ID.match(label.lower().replace("_", "-").replace(".", "-")):
            raise fail(f"configuration label {label!r} must be a simple name")
        if not isinstance(spec, dict) or not isinstance(spec.get("estimator"), str):
            raise fail(f"configuration {label!r} needs an estimator")
        extra = sorted(set(spec) - CONFIGURATION_KEYS)
        if extra:
            raise fail(f"configuration {label!r}: unknown key(s) {', '.join(extra)} (known: {', '.join(sorted(CONFIGURATION_KEYS))})")
        for key in ("estimator_params", "overrides"):
            if not isinstance(spec.get(key) or {}, dict):
                raise fail(f"configuration {label!r}: {key} must be a mapping")
    baseline = entry.get("baseline")
    if baseline not in configurations:
        raise fail(f"baseline {baseline!r} is not one of the configurations ({', '.join(configurations)})")
    seeds = entry.get("seeds", list(DEFAULT_SEEDS))
    if (not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
            or len(set(seeds)) != len(seeds)):
        raise fail(f"seeds must be a list of distinct integers, got {seeds!r}")
    budget = entry.get("budget")
    if not isinstance(budget, dict) or not isinstance(budget.get("steps"), int) or budget["steps"] < 1:
        raise fail("budget must be a mapping with steps (a positive integer) and minutes")
    minutes = budget.get("minutes")
    if not isinstance(minutes, (int, float)) or isinstance(minutes, bool) or not 0 < minutes <= MAX_MINUTES:
        raise fail(f"budget.minutes must be in (0, {MAX_MINUTES}], got {minutes!r}: say what the claim needs instead")
    tests = entry.get("tests")
    if not isinstance(tests, list) or not tests:
        raise fail("tests must be a non-empty list")
    checked = []
    for number, test in enumerate(tests, 1):
        if not isinstance(test, dict) or not isinstance(test.get("metric"), str):
            raise fail(f"test {number} must be a mapping with a metric")
        extra = sorted(set(test) - TEST_KEYS)
        if extra:
            raise fail(f"test {number}: unknown key(s) {', '.join(extra)} (known: {', '.join(sorted(TEST_KEYS))})")
        test = dict(test)
        test.setdefault("baseline", baseline)
        if "candidate" not in test:
            others = [label for label in configurations if label != test["baseline"]]
            if len(others) != 1:
                raise fail(f"test {number}: name its candidate (one of {', '.join(others)})")
            test["candidate"] = others[0]
        for role in ("candidate", "baseline"):
            if test[role] not in configurations:
                raise fail(f"test {number}: {role} {test[role]!r} is not one of the configurations")
        if test["candidate"] == test["baseline"]:
            raise fail(f"test {number}: candidate and baseline are both {test['candidate']!r}")
        test.setdefault("seeds", len(seeds))
        try:
            check_test(test)
        except ValueError as error:
            raise fail(f"test {number}: {error}") from None
        checked.append(test)
    cannot_say = entry.get("cannot_say") or []
    if not isinstance(cannot_say, list) or not all(isinstance(line, str) for line in cannot_say):
        raise fail("cannot_say must be a list of strings")
    return Claim(
        id=claim_id, paper={k: str(v) for k, v in paper.items()}, statement=entry["statement"].strip(),
        paper_figure=entry["paper_figure"].strip(), base=base, overrides=dict(overrides),
        configurations={label: {"estimator": spec["estimator"], "estimator_params": dict(spec.get("estimator_params") or {}),
                                "overrides": dict(spec.get("overrides") or {})} for label, spec in configurations.items()},
        baseline=baseline, seeds=list(seeds), budget=dict(budget), tests=checked, cannot_say=list(cannot_say),
    )


# ------------------------------------------------------------------------------------------------------ running


def resolve_base(base: str | None) -> Path | None:
    """A claim's base config: absolute, else from the working directory, else from the source checkout's root."""
    if base is None:
        return None
    path = Path(base)
    if path.is_absolute() or path.exists():
        return path
    checkout = Path(__file__).resolve().parents[3] / base
    if checkout.exists():
        return checkout
    raise ClaimError(f"base config {base} not found (looked in {Path.cwd()} and {checkout.parent})")


def configuration_files(claim: Claim, out: Path) -> list[Path]:
    """One YAML per configuration in ``<out>/configs/``: the base file, the claim's overrides and budget steps, then
    the configuration's own label, estimator, params and overrides (the first written is the baseline)."""
    base_path = resolve_base(claim.base)
    base = {}
    if base_path is not None:
        loaded = yaml.safe_load(base_path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ClaimError(f"claim {claim.id!r}: base config {base_path} is not a mapping")
        base = {k: v for k, v in loaded.items() if k not in ("label", "estimator", "estimator_params", "seed")}
    folder = out / "configs"
    folder.mkdir(parents=True, exist_ok=True)
    order = [claim.baseline] + [label for label in claim.configurations if label != claim.baseline]
    paths = []
    for label in order:
        spec = claim.configurations[label]
        values = {**base, **claim.overrides, "steps": claim.budget["steps"], **spec["overrides"], "label": label,
                  "estimator": spec["estimator"], "estimator_params": spec["estimator_params"]}
        path = folder / f"{label}.yaml"
        path.write_text(yaml.safe_dump(values, sort_keys=False))
        paths.append(path)
    return paths


def plan_claim(claim: Claim, out: Path, seeds: list[int] | None = None, overrides: list[str] = ()):
    """`canonrl.lab.compare.plan_runs` for a claim: every configuration on the same seeds (paired)."""
    from canonrl.lab.compare import plan_runs

    try:
        return plan_runs([str(p) for p in configuration_files(claim, out)], list(seeds or claim.seeds), None,
                         list(overrides), out / "runs")
    except ValueError as error:
        raise ClaimError(f"claim {claim.id!r}: {' '.join(str(error).split())}") from None


def code_version() -> dict[str, Any]:
    """The git commit of the checkout the package runs from (with a dirty flag), else the package version."""
    import canonrl

    where = Path(__file__).resolve().parent
    version: dict[str, Any] = {"package": canonrl.__version__}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                    capture_output=True, text=True, timeout=30)
            version["git"] = commit.stdout.strip()
            version["dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def evaluate_claim(claim: Claim, run_dirs: list[Path], out: Path, *, command: str, seeds: list[int],
                   overrides: list[str] = (), failed: dict[str, str] | None = None) -> dict[str, Any]:
    """Evaluate every test on the runs; write ``verdict.json``, ``verdict.md`` and the plots in `out`."""
    from canonrl.lab.report import RunError, plot_differences, plot_pareto, read_run

    groups: dict[str, list] = {label: [] for label in claim.configurations}
    unreadable = dict(failed or {})
    for run_dir in run_dirs:
        try:
            run = read_run(run_dir)
        except RunError as error:
            unreadable.setdefault(str(run_dir), str(error))
            continue
        if run.label in groups and run.final is not None:
            groups[run.label].append(run)
    results, plotted = [], []
    for test in claim.tests:
        entry: dict[str, Any] = {"test": test}
        try:
            comparison = compare_runs(groups[test["baseline"]], groups[test["candidate"]], test["metric"],
                                      baseline_label=test["baseline"], candidate_label=test["candidate"])
        except ValueError as error:
            entry.update(verdict="inconclusive", reason=f"not evaluable: {' '.join(str(error).split())}", comparison=None)
        else:
            outcome, reason = verdict(test, comparison)
            entry.update(verdict=outcome, reason=reason, comparison=comparison.to_dict())
            plotted.append((comparison, test["metric"], 1.0))
        results.append(entry)
    plots = []
    if plotted:
        plots.append(plot_differences(plotted, out / "differences.png", title=f"{claim.id}: candidate − baseline per test "
                                      "(mean, 95% bootstrap CI; x: per-seed differences)").name)
    if any(groups.values()):
        plots.append(plot_pareto({label: runs for label, runs in groups.items() if runs}, out / "pareto.png").name)
    deviations = []
    if sorted(seeds) != sorted(claim.seeds):
        deviations.append(f"seeds {seeds} instead of the claim's {claim.seeds}")
    if overrides:
        deviations.append(f"extra overrides {list(overrides)}")
    record = {
        "claim": claim.to_dict(),
        "verdict": overall_verdict([r["verdict"] for r in results]),
        "tests": results,
        "command": command,
        "seeds": list(seeds),
        "code_version": code_version(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "deviations": deviations,
        "runs": {label: [str(Path(run.path).relative_to(out)) if Path(run.path).is_relative_to(out) else str(run.path)
                         for run in runs] for label, runs in groups.items()},
        "failed_runs": unreadable,
        "plots": plots,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "verdict.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "verdict.md").write_text(verdict_markdown(record, plot_prefix=""))
    return record


def run_claim(claim: Claim, out: Path, *, seeds: list[int] | None = None, overrides: list[str] = (), jobs: int = 2,
              command: str = "", progress=None) -> dict[str, Any]:
    """Plan, run (resuming finished and interrupted runs) and evaluate a claim; returns the verdict record."""
    from canonrl.lab.compare import run_all

    seeds = list(seeds or claim.seeds)
    runs = plan_claim(claim, out, seeds, overrides)
    results = run_all(runs, max(1, min(jobs, len(runs))), progress)
    failed = {str(path): error for path, error in results.items() if error}
    return evaluate_claim(claim, [run.run_dir for run in runs], out, command=command or f"canonrl claims run {claim.id}",
                          seeds=seeds, overrides=overrides, failed=failed)


# ------------------------------------------------------------------------------------------------------ reports


def _cell(value: float | None, scale: float) -> str:
    return "—" if value is None else f"{scale * value:+.3g}"


def result_line(entry: dict[str, Any]) -> str:
    """'difference ± CI' of one test result, in the metric's own unit."""
    comparison = entry.get("comparison")
    if not comparison:
        return entry.get("reason", "not evaluable")
    if comparison.get("ci_low") is None:
        return f"{_cell(comparison['mean'], 1)} (n={comparison['n']}, no CI)"
    return (f"{_cell(comparison['mean'], 1)}, 95% CI [{_cell(comparison['ci_low'], 1)}, {_cell(comparison['ci_high'], 1)}], "
            f"p = {comparison['p_value']:.3g}, n = {comparison['n']}")


def _test_text(test: dict[str, Any]) -> str:
    direction = test["direction"]
    bound = (f"margin {test['margin']:g}" if direction in ("not_worse", "equivalent") else f"threshold {test.get('threshold', 0):g}")
    better = ", lower is better" if test.get("better") == "lower" else ""
    return f"`{test['metric']}`: {test['candidate']} − {test['baseline']} {direction} ({bound}{better})"


def verdict_markdown(record: dict[str, Any], plot_prefix: str = "", heading: str = "#") -> str:
    """A verdict record as markdown (verdict.md, and a section of docs/claims.md)."""
    claim = record["claim"]
    version = record.get("code_version") or {}
    code = version.get("git", "") + (" (dirty)" if version.get("dirty") else "") if version.get("git") else f"canonrl {version.get('package', '?')}"
    lines = [f"{heading} {claim['id']}: {record['verdict']}", "",
             f"**Paper:** {claim['paper']['title']} (arXiv {claim['paper']['arxiv']}).", "",
             f"**Claim:** {claim['statement']}", "", f"**The paper's figure:** {claim['paper_figure']}", "",
             "| test | lab result (difference, 95% CI) | verdict |", "|---|---|---|"]
    for entry in record["tests"]:
        lines.append(f"| {_test_text(entry['test'])} | {result_line(entry)} | **{entry['verdict']}**: {entry['reason']} |".replace("\n", " "))
    lines += ["", f"Command: `{record['command']}`; seeds {record['seeds']}; code {code}; {record.get('time', '')}."]
    if record.get("deviations"):
        lines += ["", "> **Not the pre-stated test:** " + "; ".join(record["deviations"]) + "."]
    if record.get("failed_runs"):
        lines += ["", "> **Failed runs:** " + "; ".join(f"`{k}`: {v}" for k, v in record["failed_runs"].items())]
    for plot in record.get("plots", []):
        lines += ["", f"![{claim['id']} {plot[:-4]}]({plot_prefix}{plot})"]
    if claim.get("cannot_say"):
        lines += ["", "What the lab's scale cannot say:", ""] + [f"- {line}" for line in claim["cannot_say"]]
    return "\n".join(lines) + "\n"


def publish_verdicts(verdict_files: list[Path], folder: Path) -> list[Path]:
    """Copy each run's verdict into `folder` (docs/claims/): ``<id>.json`` with its plots beside it as
    ``<id>-<plot>``, so the page can be rebuilt from the repository alone (run folders stay out of it). A newer
    verdict of the same claim replaces the published one."""
    published = []
    for path in verdict_files:
        record = json.loads(Path(path).read_text())
        cid = record["claim"]["id"]
        folder.mkdir(parents=True, exist_ok=True)
        plots = []
        for plot in record.get("plots", []):
            if (Path(path).parent / plot).is_file():
                shutil.copyfile(Path(path).parent / plot, folder / f"{cid}-{plot}")
                plots.append(f"{cid}-{plot}")
        target = folder / f"{cid}.json"
        target.write_text(json.dumps({**record, "plots": plots}, indent=2) + "\n")
        published.append(target)
    return published


def published_verdicts(folder: Path) -> list[Path]:
    """The verdicts published in `folder` by :func:`publish_verdicts`."""
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def write_claims_page(claims: dict[str, Claim], published: list[Path], page: Path) -> Path:
    """docs/claims.md: every claim, in the claims file's order, with its published verdict (:func:`publish_verdicts`;
    plots next to it, under ``<page dir>/claims/``) where one exists, else as "not run" with its pre-stated tests."""
    records = {}
    for path in published:
        record = json.loads(Path(path).read_text())
        records[record["claim"]["id"]] = record
    lines = ["# Claims: papers' claims as pre-stated tests in the lab", "",
             "Generated by `canonrl claims report` from the `verdict.json` files of `canonrl claims run` (do not edit "
             "by hand; the verdicts it publishes are in `docs/claims/`). Each claim was written down — configurations, "
             "metric, direction, threshold, seeds, budget — in `src/canonrl/lab/claims.yaml` before it was run; the "
             "verdict rules are in [lab.md](lab.md#claims-and-statistics). Every test that was run is listed, whatever "
             "its verdict.", "",
             "| claim | paper | verdict |", "|---|---|---|"]
    order = list(claims) + [cid for cid in records if cid not in claims]
    for cid in order:
        title = claims[cid].paper["title"] if cid in claims else records[cid]["claim"]["paper"]["title"]
        state = records[cid]["verdict"] if cid in records else "not run"
        lines.append(f"| [{cid}](#{cid}) | {title} | {state} |")
    for cid in order:
        lines += [""]
        if cid in records:
            lines.append(f'<a id="{cid}"></a>')
            lines.append(verdict_markdown(records[cid], plot_prefix="claims/", heading="##"))
            continue
        claim = claims[cid]
        lines += [f'<a id="{cid}"></a>', f"## {cid}: not run", "",
                  f"**Paper:** {claim.paper['title']} (arXiv {claim.paper['arxiv']}).", "",
                  f"**Claim:** {claim.statement}", "", f"**The paper's figure:** {claim.paper_figure}", "",
                  f"**Pre-stated tests** (seeds {claim.seeds}, {claim.budget['steps']} steps, about "
                  f"{claim.budget['minutes']} min; `canonrl claims run {cid}`):", ""]
        lines += [f"- {_test_text(test)}" + (f" — {test['note']}" if test.get("note") else "") for test in claim.tests]
        if claim.cannot_say:
            lines += ["", "What the lab's scale cannot say:", ""] + [f"- {line}" for line in claim.cannot_say]
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(lines).rstrip() + "\n")
    return page


__all__ = ["DIRECTIONS", "VERDICTS", "Claim", "ClaimError", "load_claims", "validate_claim", "plan_claim",
           "run_claim", "evaluate_claim", "publish_verdicts", "published_verdicts", "write_claims_page", "code_version"]
