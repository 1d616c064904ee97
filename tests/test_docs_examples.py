"""Every code block of README.md and docs/*.md works.

- ```python blocks run: each file's blocks in order, in one namespace per file, in a subprocess per file (all files
  at once) in a scratch directory, offline. A file whose blocks import an optional piece that is not installed (verl,
  TRL, the lab's transformers) is skipped; the CI installs them all, so there every block runs.
- ```bash blocks are checked, not run: each command's first word is an entry point (`canonrl`, `python`, `pip`,
  `pytest`, ...); every `canonrl <subcommand>` exists and parses its options and arguments as written (click's own
  parser); `key=value` overrides of `canonrl train` / `compare` build a valid lab config (`load_config`), those of
  `canonrl simulate` a valid simulation; `python -m <module>` names a module that exists; `pip install` extras exist
  in pyproject.toml; `pytest` paths exist.
- ```yaml blocks parse (and one that holds lab config keys is a valid lab config); ```text blocks are prose.
- A block opts out only with `<!-- not-run: reason -->` on the line before its fence; the opt-outs are counted.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
import typer.main
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"python", "bash", "yaml", "text"}
OPT_OUT = re.compile(r"^<!-- not-run: (?P<reason>.*\S) -->$")
# Keep this small: each opt-out is a block no test runs. docs/trl.md: Qwen2.5-0.5B from the Hub on a GPU.
EXPECTED_OPT_OUTS = 1
ENTRY_POINTS = {"canonrl", "python", "python3", "pip", "pytest", "tensorboard", "."}
# an import that needs an optional piece: the module imported -> the distribution that must be importable
OPTIONAL = {"canonrl.integrations.verl": "verl", "canonrl.integrations.trl": "trl", "canonrl.lab": "transformers"}
PYTHON_TIMEOUT_S = 300
# the ClickException class, whether typer vendors click (recent typer) or uses it
CLICK_EXCEPTION = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    opt_out: str | None  # the reason, where the block opts out

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    blocks, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = re.match(r"^```(\S*)\s*$", lines[i])
        if match:
            start, language = i, match.group(1)
            i += 1
            while i < len(lines) and lines[i] != "```":
                i += 1
            assert i < len(lines), f"{path.relative_to(ROOT)}:{start + 1}: unclosed code block"
            marker = OPT_OUT.match(lines[start - 1].strip()) if start else None
            code = "\n".join(lines[start + 1 : i]) + "\n"
            blocks.append(Block(path, start + 1, language, code, marker.group("reason") if marker else None))
        i += 1
    return blocks


BLOCKS = [block for path in DOC_FILES for block in code_blocks(path)]


def test_every_block_names_a_known_language_and_opt_outs_are_few():
    unknown = [f"{b.where}: ```{b.language}" for b in BLOCKS if b.language not in LANGUAGES]
    assert not unknown, f"every code block names one of {sorted(LANGUAGES)}: {unknown}"
    opted_out = [f"{b.where}: {b.opt_out}" for b in BLOCKS if b.opt_out]
    assert len(opted_out) == EXPECTED_OPT_OUTS, f"opt-outs changed (keep them few, update the count): {opted_out}"
    for path in DOC_FILES:  # a marker must sit right above a fence, or it opts nothing out
        lines = path.read_text().splitlines()
        for n, line in enumerate(lines):
            if "not-run" in line:
                assert OPT_OUT.match(line.strip()) and n + 1 < len(lines) and lines[n + 1].startswith("```"), (
                    f"{path.relative_to(ROOT)}:{n + 1}: a `<!-- not-run: reason -->` marker goes on the line before "
                    "a fence"
                )


def test_the_readme_holds_exactly_the_two_set_up_commands():
    text = (ROOT / "README.md").read_text()
    setup = text[text.index("## Set-up\n") : text.index("\n## ", text.index("## Set-up\n"))]
    commands = re.findall(r"```bash\n(.*?)```", setup, re.S)
    assert len(commands) == 2 and all(c.count("\n") == 1 for c in commands), "Set-up holds two one-line commands"
    install, tests = (c.strip() for c in commands)
    assert install.startswith("python3 -m venv .venv") and install.endswith("&& canonrl train"), install
    assert tests.startswith("python3 -m venv .venv") and tests.endswith("&& python -m pytest"), tests
    others = [b for b in BLOCKS if b.path.name == "README.md" and b.code.strip() not in (install, tests)]
    assert not [b.where for b in others if "pip install" in b.code or "venv" in b.code], "no third set-up command"


def test_relative_links_resolve():
    broken = []
    for path in DOC_FILES:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (path.parent / target.split("#")[0]).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, broken


# ----------------------------------------------------------------------------------------------------------------
# python: run
# ----------------------------------------------------------------------------------------------------------------

RUNNER = r"""
import json, sys, types
blocks = json.load(open(sys.argv[1]))
module = types.ModuleType("docs_example")  # a real module: dataclasses and pickling look classes up through it
sys.modules[module.__name__] = module
for where, code in blocks:
    print(f"--- running {where}", flush=True)
    exec(compile(code, where, "exec"), module.__dict__)
"""

PYTHON_FILES = sorted({b.path for b in BLOCKS if b.language == "python" and not b.opt_out})


def missing_optional(blocks: list[Block]) -> list[str]:
    imported = set()
    for block in blocks:
        imported |= set(re.findall(r"^\s*(?:from|import)\s+([\w.]+)", block.code, re.M))
    needed = {name.split(".")[0] for name in imported}
    needed |= {dist for name in imported for module, dist in OPTIONAL.items() if name.startswith(module)}
    return sorted(name for name in needed if importlib.util.find_spec(name) is None)


@pytest.fixture(scope="module")
def python_runs(tmp_path_factory):
    """Start every file's run at once (they mostly wait on imports); each test then waits for its own."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    runs = {}
    for path in PYTHON_FILES:
        blocks = [b for b in BLOCKS if b.path == path and b.language == "python" and not b.opt_out]
        missing = missing_optional(blocks)
        if missing:
            runs[path] = f"needs {', '.join(missing)}"
            continue
        cwd = tmp_path_factory.mktemp(path.stem)
        (cwd / "blocks.json").write_text(json.dumps([(b.where, b.code) for b in blocks]))
        with open(cwd / "output.txt", "w") as output:  # a file, not a pipe: nobody reads while the runs go on
            process = subprocess.Popen(
                [sys.executable, "-c", RUNNER, "blocks.json"], cwd=cwd, env=env, stdout=output,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        runs[path] = (process, cwd / "output.txt")
    yield runs
    for run in runs.values():
        if not isinstance(run, str) and run[0].poll() is None:
            run[0].kill()


@pytest.mark.parametrize("path", PYTHON_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(path, python_runs):
    run = python_runs[path]
    if isinstance(run, str):
        pytest.skip(run)
    process, output = run
    try:
        process.wait(timeout=PYTHON_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"{path.relative_to(ROOT)}: the python blocks took over {PYTHON_TIMEOUT_S} s")
    assert process.returncode == 0, f"{path.relative_to(ROOT)}'s python blocks failed:\n{output.read_text()[-6000:]}"


# ----------------------------------------------------------------------------------------------------------------
# bash: check, do not run
# ----------------------------------------------------------------------------------------------------------------


def shell_commands(code: str) -> list[list[str]]:
    """The simple commands of a block: continuation lines joined, comments dropped, split at && || ; |, leading
    VAR=value assignments dropped."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        command: list[str] = []
        for token in [*shlex.split(line, comments=True), ";"]:
            if token in {"&&", "||", ";", "|"}:
                while command and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", command[0]):
                    command.pop(0)
                if command:
                    commands.append(command)
                command = []
            else:
                command.append(token)
    return commands


def module_exists(name: str) -> bool:
    """Whether ``name`` can be found, without importing it (verl's package import alone takes seconds)."""
    top, *parts = name.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None:
        return False
    locations = list(spec.submodule_search_locations or [])
    for n, part in enumerate(parts):
        found = [Path(d) / part for d in locations if (Path(d) / part).is_dir()]
        if n == len(parts) - 1 and any((Path(d) / f"{part}.py").is_file() for d in locations):
            return True
        if not found:
            return False
        locations = [str(d) for d in found]
    return True


def check_python(args: list[str]) -> None:
    if args[:1] != ["-m"]:
        assert args and (ROOT / args[0]).is_file(), f"python runs a module (-m) or a file of the repository: {args}"
        return
    module, rest = args[1], args[2:]
    if module.split(".")[0] in {"verl", "trl"} and importlib.util.find_spec(module.split(".")[0]) is None:
        return  # an optional piece that is not installed here (the CI has it)
    assert module_exists(module), f"python -m {module}: no such module"
    if module == "pytest":
        check_pytest(rest)
    options = dict(a.split("=", 1) for a in rest if a.startswith("--config-") and "=" in a)
    if "--config-name" in options:  # Hydra: the config file must be in the repository
        directory = options.get("--config-path", "").replace("$PWD/", "")
        assert (ROOT / directory / f"{options['--config-name']}.yaml").is_file(), options


def check_pytest(args: list[str]) -> None:
    for arg in args:
        if not arg.startswith("-"):
            assert (ROOT / arg.split("::")[0]).exists(), f"pytest {arg}: no such path"


def check_pip(args: list[str]) -> None:
    assert args[:1] == ["install"], f"pip {args}"
    pyproject = (ROOT / "pyproject.toml").read_text()
    section = pyproject[pyproject.index("[project.optional-dependencies]") :].split("\n[", 1)[0]
    extras = set(re.findall(r"^([\w-]+)\s*=", section, re.M))
    for arg in args[1:]:
        match = re.fullmatch(r"(?:\.|canonrl)\[([\w,-]+)\]", arg)
        if match:
            unknown = set(match.group(1).split(",")) - extras
            assert not unknown, f"pip install {arg}: no extra {sorted(unknown)} in pyproject.toml"


def check_canonrl(args: list[str]) -> None:
    from canonrl.cli import app, simulation_config
    from canonrl.lab.config import FIELDS, load_config

    command, name = typer.main.get_command(app), ["canonrl"]
    args = list(args)
    while hasattr(command, "commands"):  # a group: descend to the subcommand
        assert args and args[0] in command.commands, f"{' '.join(name)} has no subcommand {args[:1]}"
        name.append(args.pop(0))
        command = command.commands[name[-1]]
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # click's own parser: options, types, arguments
            context = command.make_context(" ".join(name), list(args))
    except typer.Exit:
        return  # --help
    except CLICK_EXCEPTION as error:
        raise AssertionError(f"{' '.join(name)} {shlex.join(args)}: {error.format_message()}") from None
    params, sub = context.params, name[1:]
    if sub in (["train"], ["compare"]):
        overrides = list(params.get("overrides") or [])
        for item in overrides:
            key = item.split("=", 1)[0].lstrip("+").split(".")[0]
            assert key in FIELDS, f"{' '.join(name)}: {item!r} is not a config key"
        estimators = [e for e in params.get("estimators") or [] if not e.endswith((".yaml", ".yml"))]
        for estimator in estimators or [None]:
            load_config(None, overrides + ([f"estimator={estimator}"] if estimator else []))
    if sub == ["simulate"]:
        simulation_config(
            params["overrides"] or [], params["estimator"] or [], params["group_sizes"], params["responses"],
            params["seed"],
        ).validate()  # fmt: skip


BASH_BLOCKS = [b for b in BLOCKS if b.language == "bash" and not b.opt_out]


@pytest.mark.parametrize("block", BASH_BLOCKS, ids=lambda b: b.where)
def test_bash_commands_exist_and_parse(block):
    for command in shell_commands(block.code):
        program, args = command[0], command[1:]
        assert program in ENTRY_POINTS, f"{block.where}: {program!r} is not one of {sorted(ENTRY_POINTS)}"
        try:
            if program == "canonrl":
                check_canonrl(args)
            elif program in {"python", "python3"}:
                check_python(args)
            elif program == "pip":
                check_pip(args)
            elif program == "pytest":
                check_pytest(args)
        except (AssertionError, ValueError) as error:
            raise AssertionError(f"{block.where}: {shlex.join(command)}\n{error}") from None


# ----------------------------------------------------------------------------------------------------------------
# yaml: parse
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.language == "yaml"], ids=lambda b: b.where)
def test_yaml_blocks_parse(block, tmp_path):
    data = yaml.safe_load(block.code)
    from canonrl.lab.config import FIELDS, load_config

    if isinstance(data, dict) and data and set(data) <= set(FIELDS):  # a lab config: it must load
        (tmp_path / "config.yaml").write_text(block.code)
        load_config(tmp_path / "config.yaml")
