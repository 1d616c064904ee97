"""Checkpoint I/O for a run directory: ``checkpoints/step-NNNNNN/`` (a Hugging Face model directory plus the
optimizer's and the trainer's state) and a ``latest`` pointer, written so that a crash never leaves a half-written
checkpoint behind the pointer."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from canonrl.lab.policy import save_policy_dir

PREFIX = "step-"
TRAINER_STATE = "trainer_state.pt"


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory and an atomic rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint the `latest` pointer under `root` names, if it is complete."""
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / TRAINER_STATE).is_file() else None


def save_checkpoint(root: Path, step: int, policy, write_state: Callable[[Path], None], keep: int) -> Path:
    """Write step-NNNNNN/ (the policy, then `write_state(directory)`) through a temporary directory, move the
    `latest` pointer to it, and delete all but the newest `keep` checkpoints."""
    name = f"{PREFIX}{step:06d}"
    final = save_policy_dir(policy.model, policy.tokenizer, root / name, write_state)
    atomic_write_text(root / "latest", name + "\n")
    kept = sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir())
    for old in kept[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final
