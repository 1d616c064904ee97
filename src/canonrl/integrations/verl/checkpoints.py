"""canonrl's estimator states (step counts, HA-DW's anchor) saved into and restored from verl's checkpoints."""

from __future__ import annotations

import os
from typing import Any

from canonrl.integrations.verl import adapter
from canonrl.integrations.verl.adapter import cached_estimator, config_get

#: The file in each verl checkpoint folder (``global_step_N``) that holds canonrl's estimator states.
ESTIMATOR_STATE_FILE = "canonrl_estimators.pt"


def estimator_states() -> list[dict[str, Any]]:
    """Every estimator this process has built for verl: its name, hyperparameters and ``state_dict`` (the step it
    counted, and a stateful estimator's history, e.g. HA-DW's anchor)."""
    return [{"name": name, "hyperparameters": adapter._HYPERPARAMETERS[(name, params)], "state": est.state_dict()}
            for (name, params), est in adapter._ESTIMATORS.items()]  # fmt: skip


def load_estimator_states(states: list[dict[str, Any]]) -> None:
    """Rebuild the estimators of :func:`estimator_states` and give each its saved state."""
    for entry in states:
        cached_estimator(entry["name"], entry["hyperparameters"]).load_state_dict(entry["state"])


def _checkpoint_folder(trainer: Any) -> str:
    """The ``global_step_N`` folder the trainer saves to, or loaded from (its ``global_steps`` is then N)."""
    config = trainer.config.trainer
    if config_get(config, "resume_mode") == "resume_path" and config_get(config, "resume_from_path"):
        folder = config.resume_from_path
    else:
        folder = os.path.join(config.default_local_dir, f"global_step_{trainer.global_steps}")
    return folder if os.path.isabs(folder) else os.path.join(os.getcwd(), folder)


def save_estimator_states_of(trainer: Any) -> None:
    """Write :func:`estimator_states` into the checkpoint folder the trainer just saved."""
    import torch

    folder = _checkpoint_folder(trainer)
    os.makedirs(folder, exist_ok=True)
    torch.save(estimator_states(), os.path.join(folder, ESTIMATOR_STATE_FILE))


def load_estimator_states_of(trainer: Any) -> None:
    """After the trainer loaded a checkpoint (``global_steps`` > 0: it resumed), restore the states saved there."""
    import torch

    if getattr(trainer, "global_steps", 0):
        path = os.path.join(_checkpoint_folder(trainer), ESTIMATOR_STATE_FILE)
        if os.path.exists(path):
            load_estimator_states(torch.load(path, weights_only=True))


def make_saving(original: Any):
    def _save_checkpoint(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        save_estimator_states_of(self)
        return result

    _save_checkpoint.__wrapped__ = original
    _save_checkpoint.canonrl_patched = True
    return _save_checkpoint


def make_loading(original: Any):
    def _load_checkpoint(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        load_estimator_states_of(self)
        return result

    _load_checkpoint.__wrapped__ = original
    _load_checkpoint.canonrl_patched = True
    return _load_checkpoint
