"""`canonrl compare`: several configurations x seeds, trained in parallel processes, on one task and budget.

Each run is an ordinary `canonrl train` run directory under ``<report>/runs/<label>-seed<seed>``; runs go to a
process pool (spawned, so each child sets its own torch thread count: the cores are split between the jobs),
and the parent follows them by reading their metrics.jsonl. A run that fails is reported with its one-line
error; the others go on. An interrupted comparison is resumed by running the same command again: finished runs
are kept, unfinished ones continue from their checkpoints.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from canonrl.lab.config import TrainConfig, load_config


@dataclass
class PlannedRun:
    config: TrainConfig
    run_dir: Path


def plan_runs(
    configurations: list[str], seeds: list[int], base_config: Path | None, overrides: list[str], runs_root: Path
) -> list[PlannedRun]:
    """One run per (configuration, seed). A configuration is an estimator name or a YAML file of its own."""
    if not configurations:
        raise ValueError("--estimator: give at least one estimator or config file")
    planned: list[PlannedRun] = []
    labels: set[str] = set()
    for item in configurations:
        if item.endswith((".yaml", ".yml")):
            config = load_config(Path(item), list(overrides))
        else:
            config = load_config(base_config, [*overrides, f"estimator={item}"])
        if config.name in labels:
            raise ValueError(f"two configurations are both labelled {config.name!r}; give them distinct `label`s")
        labels.add(config.name)
        for seed in seeds:
            seeded = TrainConfig(**{**config.to_dict(), "seed": seed})
            planned.append(PlannedRun(seeded, runs_root / f"{config.name}-seed{seed}"))
    return planned


def _run_one(config_dict: dict, run_dir: str, threads: int) -> str:
    """Child process: train (or resume) one run; returns '' or a one-line error."""
    import torch
    from transformers.utils import logging as transformers_logging

    from canonrl.lab.trainer import Trainer, TrainingError

    transformers_logging.disable_progress_bar()  # the parent draws one bar per run
    torch.set_num_threads(threads)
    config = TrainConfig(**{**config_dict, "threads": threads})
    path = Path(run_dir)
    try:
        if (path / "summary.json").exists():
            return ""
        resume = (path / "checkpoints" / "latest").exists()
        Trainer(config, path, resume=resume).train()
        return ""
    except (ValueError, TrainingError) as error:
        return " ".join(str(error).split())


def _steps_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    done = 0
    for line in path.read_text().splitlines():
        if '"kind": "train"' in line:
            try:
                done = max(done, json.loads(line)["step"])
            except (ValueError, KeyError):
                pass
    return done


def run_all(runs: list[PlannedRun], jobs: int, progress=None) -> dict[Path, str]:
    """Run everything, `jobs` at a time; returns run_dir -> error ('' for success)."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    bars = {}
    if progress is not None:
        for run in runs:
            bars[run.run_dir] = progress.add_task(run.run_dir.name, total=run.config.steps, status="queued")
    results: dict[Path, str] = {}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_run_one, run.config.to_dict(), str(run.run_dir), threads): run for run in runs}
        pending = set(futures)
        while pending:
            time.sleep(1.0)
            for future in list(pending):
                run = futures[future]
                if future.done():
                    pending.discard(future)
                    error = future.exception()
                    results[run.run_dir] = f"{type(error).__name__}: {error}" if error else future.result()
                if progress is not None:
                    status = "done" if future.done() and not results.get(run.run_dir) else results.get(run.run_dir, "")
                    progress.update(bars[run.run_dir], completed=_steps_done(run.run_dir), status=status[:60] or "running")
    failed = {path: error for path, error in results.items() if error}
    if failed and len(failed) == len(runs):
        first = next(iter(failed.values()))
        raise ValueError(f"every run failed; the first: {first}")
    return results
