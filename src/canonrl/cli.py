"""The ``canonrl`` command line: ``estimators``, ``bench``, ``bench-steps``, ``bench-trees``, and the lab's ``train``, ``compare``, ``eval``, ``lab warmstart``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="canonrl: advantage estimators for RL from verifiable rewards.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()

if TYPE_CHECKING:
    from canonrl.registry import EstimatorInfo


def _format_default(value: object) -> str:
    return repr(value) if isinstance(value, str) else str(value)


@app.command("estimators")
def list_estimators(
    details: bool = typer.Option(False, "--details", help="also list every hyperparameter with its help text"),
    markdown: bool = typer.Option(False, "--markdown", help="print docs/estimators.md's tables (markdown)"),
    update: Path = typer.Option(
        None, "--update", help="rewrite the estimator tables between this file's marker comments (docs/estimators.md)"
    ),
) -> None:
    """Print the registry: each estimator, its paper, the inputs it needs and its hyperparameters."""
    import canonrl

    if update is not None:
        try:
            before = update.read_text()
            after = with_estimator_tables(before)
        except (OSError, ValueError) as error:
            raise typer.BadParameter(str(error), param_hint="--update") from None
        if after != before:
            update.write_text(after)
        console.print(f"{update}: estimator tables {'updated' if after != before else 'already up to date'}")
        return
    if markdown:
        typer.echo(marked_estimator_tables())
        return
    table = Table(title="canonrl estimators", show_lines=True)
    for column in ("name", "description", "paper", "inputs", "hyperparameters (defaults)"):
        table.add_column(column, overflow="fold")
    for info in canonrl.estimators():
        paper = f"{info.paper.title}\narXiv {info.paper.arxiv}" if info.paper else "-"
        if not info.verified:
            paper += "\n(best reading, not fully verified)"
        if details:
            hyper = "\n".join(f"{h.name}={_format_default(h.default)}: {h.help}" for h in info.hyperparameters)
        else:
            hyper = ", ".join(f"{h.name}={_format_default(h.default)}" for h in info.hyperparameters)
        inputs = ", ".join(info.inputs)
        if info.producer:
            inputs += f"\n(needs a producer: {info.producer})"
        table.add_row(info.name, f"{info.description}\n[{info.level}-level]", paper, inputs, hyper or "-")
    console.print(table)


# The estimator tables of docs/estimators.md, generated from the registry: one for the outcome-level estimators
# (one reward per response, no critic), one for the step and critic estimators. Each sits between
# <!-- KEY:begin --> and <!-- KEY:end --> in docs/estimators.md; tests/test_readme_estimators.py fails when they are
# stale.
_INPUTS = "inputs beyond rewards, group, mask"
TABLE_COLUMNS = {
    "estimators": ("name", "level", "method", "paper", _INPUTS, "needs a producer", "works in", "verified"),
    "step-estimators": ("name", "level", "method", "paper", _INPUTS, "needs a producer", "layouts", "verified"),
}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table_row(info: EstimatorInfo) -> tuple[str, ...]:
    paper = "–"
    if info.paper:
        paper = f"{info.paper.short_title}, [arXiv {info.paper.arxiv}](https://arxiv.org/abs/{info.paper.arxiv})"
    inputs = info.inputs_note or ", ".join(f"`{name}`" for name in info.requires) or "–"
    if info.outcome_level:
        where = info.works_in
    else:
        where = ", ".join(layout.removeprefix("row-").replace("-", " ") for layout in info.layouts)
    verified = "yes" if info.verified else "best reading"
    producer = _cell(info.producer or "–")
    return (f"`{info.name}`", info.level, _cell(info.description), _cell(paper), _cell(inputs), producer, _cell(where),
            verified)


def estimator_tables() -> dict[str, str]:
    """The estimator tables of docs/estimators.md (marker key -> markdown table), from the registry."""
    import canonrl

    infos = canonrl.estimators()
    tables = {}
    for key, columns in TABLE_COLUMNS.items():
        rows = [_table_row(info) for info in infos if info.outcome_level == (key == "estimators")]
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        tables[key] = "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    return tables


def marked_estimator_tables() -> str:
    """Every estimator table between its marker comments, as ``canonrl estimators --markdown`` prints them."""
    tables = estimator_tables().items()
    return "\n\n".join(f"<!-- {key}:begin -->\n{table}\n<!-- {key}:end -->" for key, table in tables)


def with_estimator_tables(text: str) -> str:
    """``text`` (docs/estimators.md) with the estimator tables between its marker comments regenerated."""
    for key, table in estimator_tables().items():
        begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
        if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
            raise ValueError(f"expected one {begin} followed by one {end}")
        head, rest = text.split(begin)
        tail = rest.split(end)[1]
        text = f"{head}{begin}\n{table}\n{end}{tail}"
    return text


@app.command("bench")
def bench(
    prompts: int = typer.Option(512, help="prompts in the synthetic batch"),
    group_size: int = typer.Option(16, help="responses per prompt"),
    tokens: int = typer.Option(2048, help="response tokens (T)"),
    repeats: int = typer.Option(5, help="timed repetitions per contender (median reported)"),
    device: list[str] = typer.Option(None, help="device(s) to run on; default: cpu, and cuda when present"),
    verl: bool = typer.Option(True, help="include verl's grpo and grpo_vectorized when verl is installed"),
    loop_groups: int = typer.Option(2, help="groups the per-group KTAE loop reference runs on (0 = skip)"),
    reuse_memory: bool = typer.Option(
        True, help="let glibc reuse freed memory, so no contender pays page faults for its output (CPU only)"
    ),
    markdown: Path = typer.Option(None, help="also write the table as markdown to this file"),
) -> None:
    """Time every estimator against the memory floor (and verl's GRPO) on one synthetic batch."""
    import torch

    from canonrl.bench import COLUMNS, LEFT_COLUMNS, markdown_table, run_benchmark

    for name in device or []:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise typer.BadParameter("CUDA is not available on this machine", param_hint="--device")
    with console.status("benchmarking") as status:
        rows = run_benchmark(
            prompts=prompts,
            group_size=group_size,
            tokens=tokens,
            repeats=repeats,
            devices=device or None,
            with_verl=verl,
            loop_groups=loop_groups,
            reuse_memory=reuse_memory,
            progress=lambda text: status.update(f"benchmarking {text}"),
        )
    mask_tokens = f" ({rows[0].tokens:,} mask tokens)" if rows else ""
    title = f"{prompts} prompts × {group_size} responses × {tokens} tokens{mask_tokens}, median of {repeats}"
    _show_bench_table(title, COLUMNS, rows, LEFT_COLUMNS, markdown, markdown_table)


def _show_bench_table(title: str, columns, rows, left: tuple[str, ...], markdown: Path | None, to_markdown) -> None:
    """Print a benchmark's rows as a table (``left`` columns left-aligned) and write its markdown when asked."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column in left else "right")
    for row in rows:
        table.add_row(*row.cells())
    console.print(table)
    if markdown:
        markdown.write_text(to_markdown(rows) + "\n")
        console.print(f"markdown table written to {markdown}")


@app.command("bench-steps")
def bench_steps(
    sizes: str = typer.Option("32,128,512", help="prompts per batch, comma-separated (one table block each)"),
    trajectories: int = typer.Option(8, help="trajectories per prompt"),
    max_steps: int = typer.Option(16, help="steps per trajectory, drawn from 1..max_steps"),
    tokens_per_step: int = typer.Option(256, help="response tokens of a row in the row-per-step layout"),
    tokens: int = typer.Option(4096, help="tokens of a row in the row-per-trajectory layout (T)"),
    repeats: int = typer.Option(3, help="timed repetitions per contender (median reported)"),
    device: str = typer.Option("cpu", help="device to run on"),
    official_up_to: int = typer.Option(32, help="run the official GiGPO/HGPO loops up to this many prompts"),
    markdown: Path = typer.Option(None, help="also write the table as markdown to this file"),
) -> None:
    """Time the step and critic estimators on agent batches in both layouts, against the floor and the official code."""
    from canonrl.bench_steps import COLUMNS, LEFT_COLUMNS, markdown_table, run_step_benchmark

    prompts = _integers(sizes, "--sizes")
    with console.status("benchmarking") as status:
        rows = run_step_benchmark(
            sizes=prompts,
            trajectories=trajectories,
            max_steps=max_steps,
            tokens_per_step=tokens_per_step,
            tokens=tokens,
            repeats=repeats,
            device=device,
            official_up_to=official_up_to,
            progress=lambda text: status.update(f"benchmarking {text}"),
        )
    title = f"step estimators, median of {repeats}"
    _show_bench_table(title, COLUMNS, rows, LEFT_COLUMNS, markdown, markdown_table)


def _integers(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=option) from None


@app.command("bench-trees")
def bench_trees(
    sizes: str = typer.Option("32,128,512", help="prompts per batch, comma-separated (one table block each)"),
    branching: str = typer.Option("6,6,6", help="children per node at each depth (SPO-tree's 6-6-6)"),
    tokens: int = typer.Option(16, help="tokens per edge (segment)"),
    repeats: int = typer.Option(3, help="timed repetitions per contender (median reported)"),
    device: str = typer.Option("cpu", help="device to run on"),
    markdown: Path = typer.Option(None, help="also write the table as markdown to this file"),
) -> None:
    """Time the tree estimators on full rollout trees, per edge and per leaf, against a per-node loop."""
    from canonrl.bench_trees import COLUMNS, LEFT_COLUMNS, markdown_table, run_tree_benchmark

    prompts, fan_out = _integers(sizes, "--sizes"), _integers(branching, "--branching")
    if any(k < 2 for k in fan_out):
        raise typer.BadParameter("every depth needs at least 2 children (a branch point)", param_hint="--branching")
    with console.status("benchmarking") as status:
        rows = run_tree_benchmark(sizes=prompts, branching=fan_out, tokens=tokens, repeats=repeats, device=device,
                                  progress=lambda text: status.update(f"benchmarking {text}"))
    title = f"tree estimators, {'-'.join(map(str, fan_out))} trees, median of {repeats}"
    _show_bench_table(title, COLUMNS, rows, LEFT_COLUMNS, markdown, markdown_table)


@app.command("simulate")
def simulate(
    overrides: list[str] = typer.Argument(
        None,
        help="key=value settings: model.<field> (difficulty, reward, length_corr, entropy_corr, ...), "
        "conditions.<field> (share, gap, share2, gap2, noise), <estimator>.<hyperparameter>, align.<estimator>",
    ),
    estimator: list[str] = typer.Option(None, "--estimator", "-e", help="estimator(s) to measure (default: all)"),
    group_sizes: str = typer.Option("2,4,8,16,32,64", help="comma-separated group sizes"),
    responses: int = typer.Option(32768, help="simulated responses per estimator and group size"),
    seed: int = typer.Option(0, help="seed of every simulated batch"),
    out: Path = typer.Option(Path("simulate-report"), help="report folder (summary.md, results.json, PNGs)"),
    focus: int = typer.Option(8, help="group size of the per-estimator table and the per-p plots"),
) -> None:
    """Measure estimators against known true advantages on simulated rollouts (bias, variance, sign errors, zeros,
    weight by difficulty, CANON's amplification) and write a report folder."""
    import sys

    from canonrl.simulate import run_simulation
    from canonrl.simulate.report import write_report

    try:
        config = simulation_config(overrides or [], estimator or [], group_sizes, responses, seed)
        config.validate()
    except (ValueError, KeyError, TypeError) as error:
        raise typer.BadParameter(str(error).strip("'\"").splitlines()[0]) from None
    with console.status("simulating") as status:
        result = run_simulation(config, progress=lambda text: status.update(f"simulating {text}"))
    command = "canonrl simulate " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["simulate"] else "canonrl simulate"
    summary = write_report(result, out, command.strip(), focus)
    console.print(f"{len(result.measures)} estimator x group size runs in {result.seconds:.1f} s; report: {summary}")


def simulation_config(overrides: list[str], estimators: list[str], group_sizes: str, responses: int, seed: int):
    """A `SimulationConfig` from the command line's pieces (one-line ValueErrors for bad ones)."""
    from dataclasses import fields, replace

    from canonrl.overrides import parse_override
    from canonrl.simulate import ConditionModel, RolloutModel, SimulationConfig

    try:
        sizes = tuple(int(g) for g in group_sizes.split(","))
    except ValueError:
        raise ValueError(f"--group-sizes must be comma-separated integers, got {group_sizes!r}") from None
    sections: dict[str, dict] = {"model": {}, "conditions": {}, "align": {}}
    params: dict[str, dict] = {}
    for item in overrides:  # the same key=value syntax as `canonrl train` (canonrl.overrides)
        head, name, value = parse_override(item, "model.length_corr=-0.5")
        if not name:
            raise ValueError(f"settings are section.key=value (e.g. model.length_corr=-0.5), got {item!r}")
        (sections[head] if head in sections else params.setdefault(head, {}))[name] = value
    for section, cls in (("model", RolloutModel), ("conditions", ConditionModel)):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(sections[section]) - known)
        if unknown:
            raise ValueError(f"unknown {section} setting {unknown[0]!r}; known: {', '.join(sorted(known))}")
    return SimulationConfig(
        estimators=tuple(estimators),
        group_sizes=sizes,
        responses=responses,
        seed=seed,
        model=replace(RolloutModel(), **sections["model"]),
        conditions=replace(ConditionModel(), **sections["conditions"]),
        params=params,
        align=sections["align"],
    )


def _register_lab() -> None:
    # the lab's imports (transformers, tasks) stay lazy inside its commands; registering them costs nothing
    from canonrl.lab.cli import register

    register(app)


_register_lab()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
