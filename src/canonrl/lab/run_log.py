"""A run's log: one JSON line per record in ``metrics.jsonl`` (a ``train`` record per step, an ``eval`` record per
evaluation), mirrored to TensorBoard, with a wall clock that continues across resumes."""

from __future__ import annotations

import json
import time
from pathlib import Path


class RunLog:
    """Append records to ``run_dir/metrics.jsonl`` (and TensorBoard under ``run_dir/tensorboard`` when asked); a
    context manager that closes the TensorBoard writer. `elapsed()` is the run's wall time, the time of a resumed
    run's earlier part included."""

    def __init__(self, run_dir: Path, *, tensorboard: bool, resumed_at_step: int = 0):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.touch()
        self.before = self._last_time()
        self.started = time.perf_counter()
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # heavy, and only when asked

            purge = resumed_at_step + 1 if resumed_at_step else None
            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            self.writer.close()

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.started

    def log(self, kind: str, step: int, metrics: dict) -> dict:
        """Write ``{"kind", "step", "time", **metrics}``; returns the record."""
        record = {"kind": kind, "step": step, "time": self.elapsed(), **metrics}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record, allow_nan=True) + "\n")
        if self.writer is not None:
            prefix = "eval" if kind == "eval" else "train"
            for key, value in record.items():
                if key not in ("step", "kind"):
                    self._add_scalars(f"{prefix}/{key}", value, step)
        return record

    def _add_scalars(self, tag: str, value, step: int) -> None:
        """A number as one scalar, a (nested) dict as one scalar per number in it; None and the rest are skipped."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            self.writer.add_scalar(tag, value, step)
        elif isinstance(value, dict):
            for sub, v in value.items():
                self._add_scalars(f"{tag}/{sub}", v, step)

    def _last_time(self) -> float:
        last = 0.0
        for line in self.path.read_text().splitlines():
            if line.strip():
                last = json.loads(line).get("time", last)
        return last
