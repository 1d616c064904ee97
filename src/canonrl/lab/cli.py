"""`canonrl train`, `canonrl compare`, `canonrl eval` and `canonrl lab warmstart`.

Bad configuration ends in one line (`error: ...`, exit code 2), never a traceback.
"""

from __future__ import annotations

import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console()
lab_app = typer.Typer(help="The lab's config keys, shipped policy and TRL benchmark.", no_args_is_help=True)


@contextmanager
def lab_command():
    """Configuration and input errors print as one line and exit 2; real bugs still show their traceback.

    transformers' per-file progress bars (loading and writing shards) are turned off: the lab draws its own.
    """
    from transformers.utils import logging as transformers_logging

    from canonrl.lab.trainer import TrainingError

    transformers_logging.disable_progress_bar()
    try:
        yield
    except TrainingError as error:
        console.print(f"[red]training stopped:[/red] {error}", highlight=False)
        raise typer.Exit(1) from None
    except (ValueError, FileNotFoundError) as error:
        console.print(f"[red]error:[/red] {' '.join(str(error).split())}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
    )


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def train_command(
    overrides: list[str] = typer.Argument(None, help="config overrides key=value, e.g. estimator=grpo steps=50 estimator_params.mu=0.5"),
    config: Path = typer.Option(None, "--config", "-c", help="a YAML config file (overrides apply on top)"),
    out: Path = typer.Option(None, "--out", "-o", help="run directory (default runs/<estimator>-seed<seed>-<time>)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last checkpoint"),
) -> None:
    """Train a policy with RL on a task (default: the lab task, lab-tiny and CANON), then print the figures."""
    from canonrl.lab.config import load_config
    from canonrl.lab.report import plot_run
    from canonrl.lab.trainer import Trainer, default_run_dir

    with lab_command():
        if resume:
            if out is None:
                raise ValueError("--resume needs --out <run directory>")
            if overrides or config:
                raise ValueError("--resume continues a run with its saved config; drop the overrides and --config")
            settings = load_config(out / "config.yaml")
        else:
            settings = load_config(config, overrides or [])
            if out is not None and (out / "metrics.jsonl").exists():
                raise ValueError(f"{out} already holds a run; add --resume to continue it, or choose another --out")
        run_dir = out or default_run_dir(settings)
        trainer = Trainer(settings, run_dir, resume=resume)
        console.print(
            f"training [bold]{settings.policy}[/bold] on [bold]{settings.task}[/bold] with "
            f"[bold]{settings.estimator}[/bold] {settings.estimator_params or ''} for {settings.steps} steps "
            f"({settings.prompts_per_step} prompts x {settings.group_size}) -> {run_dir}",
            highlight=False,
        )
        state = {"eval": None}
        with _progress() as progress:
            bar = progress.add_task("train", total=settings.steps, completed=trainer.step, status="evaluating")

            def on_step(step: int, records: dict) -> None:
                if records.get("eval"):
                    state["eval"] = records["eval"]["accuracy"]
                train = records.get("train") or {}
                status = (
                    f"reward {train.get('reward', 0):.2f} len {train.get('response_length', 0):.0f} "
                    f"H {train.get('entropy', 0):.2f} | held-out {_percent(state['eval'])}"
                )
                progress.update(bar, completed=step, status=status)

            summary = trainer.train(on_step)
        plots = plot_run(run_dir)
    _print_summary(summary, run_dir, plots)


def _number(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isinf(value)) else f"{value:.2f}"


def _print_summary(summary: dict, run_dir: Path, plots: list[Path]) -> None:
    initial, final = summary["initial"] or {}, summary["final"] or {}
    table = Table(title=f"{summary['label']} (seed {summary['seed']}) on {summary['task']}: {summary['steps']} steps in {summary['wall_time']:.0f} s")
    for column in ("held-out", "start", "end", "change"):
        table.add_column(column, justify="right" if column != "held-out" else "left")
    for key, name in (("accuracy", f"accuracy (mean@{final.get('k', '?')}, sampled)"), ("greedy_pass1", "greedy pass@1")):
        a, b = initial.get(key), final.get(key)
        change = "-" if a is None or b is None else f"{100 * (b - a):+.1f} pts"
        table.add_row(name, _percent(a), _percent(b), change)
    for key, name in (("response_length", "response length (tokens)"), ("entropy", "entropy (nats/token)"), ("tokens_per_correct", "tokens per correct answer")):
        a, b = initial.get(key), final.get(key)
        table.add_row(name, _number(a), _number(b), "")
    console.print(table)
    console.print(f"run directory: {run_dir}\nmetrics: {run_dir / 'metrics.jsonl'} (TensorBoard: {run_dir / 'tensorboard'})")
    console.print("plots: " + ", ".join(str(p) for p in plots), highlight=False)


def eval_command(
    policy: str = typer.Argument(..., help="a preset (lab-tiny, smollm2-135m-instruct), a model directory, a checkpoint or a run directory"),
    task: str = typer.Option("lab", help="task name (lab, rg:<dataset>, boxed[:<dataset>])"),
    problems: int = typer.Option(256, help="held-out problems"),
    samples: int = typer.Option(4, help="samples per problem (mean@k)"),
    max_new_tokens: int = typer.Option(96, help="the largest token budget"),
    budgets: str = typer.Option("16,24,32,48,64,96", help="token budgets to report accuracy at (comma-separated)"),
    temperature: float = typer.Option(1.0),
    top_p: float = typer.Option(1.0),
    seed: int = typer.Option(1234, help="picks the held-out problems (the trainer's eval_seed default)"),
) -> None:
    """Evaluate a model or checkpoint on a task's held-out split, with accuracy at several token budgets."""
    from canonrl.lab.evaluate import evaluate
    from canonrl.lab.policy import load_policy
    from canonrl.lab.tasks import get_task

    with lab_command():
        path = Path(policy)
        if (path / "summary.json").exists() and (path / "policy").is_dir():
            policy = str(path / "policy")
        try:
            budget_list = tuple(int(b) for b in budgets.split(",") if b.strip())
        except ValueError:
            raise ValueError(f"--budgets must be comma-separated integers, got {budgets!r}") from None
        if max(budget_list, default=0) > max_new_tokens:
            max_new_tokens = max(budget_list)
        loaded = load_policy(policy)
        with console.status(f"evaluating {policy} on {problems} held-out problems of {task}"):
            result = evaluate(
                loaded, get_task(task), problems=problems, seed=seed, samples=samples,
                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, budgets=budget_list,
            )  # fmt: skip
    table = Table(title=f"{policy} on {task} (held-out, {problems} problems x {samples} samples, T={temperature})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row(f"accuracy (mean@{samples})", _percent(result["accuracy"]))
    table.add_row("greedy pass@1", _percent(result.get("greedy_pass1")))
    table.add_row("response length (tokens)", f"{result['response_length']:.1f} (cv {result['length_cv']:.2f})")
    table.add_row("entropy (nats/token)", f"{result['entropy']:.3f}")
    table.add_row("tokens per correct answer", f"{result['tokens_per_correct']:.1f}")
    for budget, accuracy in result["budget_accuracy"].items():
        table.add_row(f"accuracy within {budget} tokens", _percent(accuracy))
    console.print(table)


@lab_app.command("keys")
def keys_command() -> None:
    """Print every `canonrl train` config key with its default and help, as the markdown table of docs/lab.md."""
    from canonrl.lab.config import key_table

    typer.echo(key_table(), nl=False)


WARMSTART_POLICIES = ("lab-tiny", "lab-grid-tiny")


@lab_app.command("warmstart")
def warmstart_command(
    policy: str = typer.Option("lab-tiny", help=f"which shipped policy to rebuild: {', '.join(WARMSTART_POLICIES)}"),
    out: Path = typer.Option(None, help="where to write the policy (default: the packaged directory of --policy)"),
    steps: int = typer.Option(None, help="supervised steps (default: the recipe's)"),
    seed: int = typer.Option(0),
) -> None:
    """Rebuild lab-tiny (lab-task traces) or lab-grid-tiny (noisy expert episodes of lab-grid): supervised training
    of a small Llama, deterministic for a seed."""
    from canonrl.lab.policy import LAB_GRID_TINY_DIR, LAB_TINY_DIR
    from canonrl.lab.warmstart import WarmstartConfig, warmstart
    from canonrl.lab.warmstart_grid import GridWarmstartConfig, warmstart_grid

    if policy not in WARMSTART_POLICIES:
        raise typer.BadParameter(f"expected one of {', '.join(WARMSTART_POLICIES)}, got {policy!r}", param_hint="--policy")
    recipe_class, build, target = (
        (WarmstartConfig, warmstart, LAB_TINY_DIR) if policy == "lab-tiny" else (GridWarmstartConfig, warmstart_grid, LAB_GRID_TINY_DIR)
    )
    recipe = recipe_class(seed=seed) if steps is None else recipe_class(seed=seed, steps=steps)
    target = out or target
    with lab_command(), _progress() as progress:
        bar = progress.add_task("warm-start", total=recipe.steps, status="")
        summary = build(target, recipe, progress=lambda s, n, loss: progress.update(bar, completed=s, status=f"loss {loss:.3f}"))
    heldout = summary["heldout"]
    length = f"length {heldout['response_length']:.1f} tokens"
    length += f" (cv {heldout['length_cv']:.2f})" if "length_cv" in heldout else f", {heldout['turns']:.1f} turns"
    console.print(
        f"{policy} written to {target}: {summary['parameters']:,} parameters, {summary['train_seconds']:.0f} s; "
        f"held-out accuracy at T=1 {_percent(heldout['accuracy'])}, greedy {_percent(heldout.get('greedy_pass1'))}, "
        f"{length}",
        highlight=False,
    )


@lab_app.command("bench-trl")
def bench_trl_command(
    policy: str = typer.Option("lab-tiny"),
    prompts: int = typer.Option(16, help="prompts per step"),
    group_size: int = typer.Option(8, help="G: responses per prompt"),
    max_new_tokens: int = typer.Option(96),
    steps: int = typer.Option(10, help="timed steps per contender"),
    warmup: int = typer.Option(2, help="untimed steps per contender first"),
    threads: int = typer.Option(0, help="torch threads (0 = torch's default)"),
    markdown: Path = typer.Option(None, help="also write the table to this file"),
) -> None:
    """Time the lab trainer against TRL's GRPOTrainer (same policy, task, batch, lr, Dr.GRPO loss) in one process."""
    from canonrl.lab.trl_bench import markdown_table, run_trl_benchmark

    with lab_command(), console.status("benchmarking against TRL") as status:
        result = run_trl_benchmark(
            policy=policy, prompts=prompts, group_size=group_size, max_new_tokens=max_new_tokens,
            steps=steps, warmup=warmup, threads=threads,
            progress=lambda name, done, total, seconds: status.update(f"{name} step {done}/{total}: {seconds:.2f} s"),
        )  # fmt: skip
    table = markdown_table(result)
    console.print(table, highlight=False, soft_wrap=True)
    if markdown:
        markdown.write_text(table + "\n")


@lab_app.command("bench-multi-turn")
def bench_multi_turn_command(
    prompts: int = typer.Option(8, help="mazes"),
    group_size: int = typer.Option(8, help="episodes per maze"),
    repeats: int = typer.Option(3, help="timed runs per contender (median)"),
    markdown: Path = typer.Option(None, help="also write the table to this file"),
) -> None:
    """Time the multi-turn rollout against a model.generate-per-turn loop on lab-grid, and split a grid training step."""
    from canonrl.lab.bench_multi_turn import run_multi_turn_benchmark

    with lab_command(), console.status("benchmarking the multi-turn rollout"):
        result = run_multi_turn_benchmark(prompts=prompts, group_size=group_size, repeats=repeats)
    table = result.markdown()
    console.print(table, highlight=False, soft_wrap=True)
    if markdown:
        markdown.write_text(table + "\n")


def compare_command(
    estimators: list[str] = typer.Option(
        ["grpo", "dr_grpo", "canon"], "--estimator", "-e",
        help="an estimator name or a YAML config file (with its own label and estimator_params); repeat the option",
    ),
    seeds: str = typer.Option("0,1,2", help="comma-separated seeds"),
    overrides: list[str] = typer.Argument(None, help="overrides for every run, key=value (e.g. steps=60)"),
    config: Path = typer.Option(None, "--config", "-c", help="base YAML config for every run"),
    out: Path = typer.Option(None, "--out", "-o", help="report folder (default reports/compare-<time>)"),
    jobs: int = typer.Option(0, help="runs in parallel (default: as many as CPU cores allow)"),
) -> None:
    """Train several estimators x seeds on the same task and budget, then write a report with plots."""
    from canonrl.lab.compare import plan_runs, run_all
    from canonrl.lab.report import write_comparison

    with lab_command():
        seed_list = _int_list(seeds, "--seeds")
        out = out or Path("reports") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
        runs = plan_runs(estimators, seed_list, config, overrides or [], out / "runs")
        jobs = jobs or max(1, min(len(runs), os.cpu_count() or 1))
        console.print(f"{len(runs)} runs ({len(estimators)} configurations x {len(seed_list)} seeds), {jobs} at a time -> {out}")
        with _progress() as progress:
            run_all(runs, jobs, progress)
        command = "canonrl compare " + " ".join(sys.argv[2:])
        summary = write_comparison([run.run_dir for run in runs], out, command=command)
    console.print(f"report: {summary}")
    _print_comparison_table(summary)


def _print_comparison_table(summary_path: Path) -> None:
    lines = Path(summary_path).read_text().splitlines()
    table_lines = []
    for line in lines:
        if line.startswith("|"):
            table_lines.append(line)
        elif table_lines:
            break
    if table_lines:
        console.print("\n".join(table_lines), highlight=False, soft_wrap=True)


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{option} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"{option} is empty")
    return values


def register(app: typer.Typer) -> None:
    from canonrl.lab.claims_cli import claims_app

    app.command("train")(train_command)
    app.command("eval")(eval_command)
    app.command("compare")(compare_command)
    app.add_typer(lab_app, name="lab")
    app.add_typer(claims_app, name="claims")
