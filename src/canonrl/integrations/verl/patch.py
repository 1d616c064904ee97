"""Applying and undoing canonrl's patches of verl: the dispatcher (wherever verl's modules imported it by name),
the v1 trainer's advantage step, the legacy trainer's entropies, and estimator states in checkpoints."""

from __future__ import annotations

import sys
from typing import Any

from canonrl.integrations.verl.adapter import register_all
from canonrl.integrations.verl.checkpoints import make_loading, make_saving
from canonrl.integrations.verl.dispatcher import make_kept_entropy, make_patched
from canonrl.integrations.verl.v1 import make_multi_trajectories, make_v1_compute_advantage

_ORIGINALS: dict[tuple[str, str], Any] = {}  # (repr of the owner, attribute) -> (owner, attribute, what was replaced)


def _set(owner: Any, attribute: str, value: Any) -> None:
    key = (repr(owner), attribute)
    if key not in _ORIGINALS:
        _ORIGINALS[key] = (owner, attribute, getattr(owner, attribute))
    setattr(owner, attribute, value)


def _replace_everywhere(original: Any, patched: Any) -> list[str]:
    """Replace ``original`` in every imported verl module that holds it under its own name: ``from ... import
    compute_advantage`` binds the name at import, so a module imported before the patch (the separation trainer,
    and through it the fully-async and one-step-off-policy trainers) would otherwise keep verl's function. Modules
    imported after the patch import the patched function. Returns the modules changed."""
    name = original.__name__
    changed = []
    for module_name, module in list(sys.modules.items()):
        if (module_name == "verl" or module_name.startswith("verl.")) and getattr(module, name, None) is original:
            _set(module, name, patched)
            changed.append(module_name)
    return changed


def _patch_method(owner: Any, name: str, make: Any) -> None:
    method = owner.__dict__.get(name)
    if method is not None and not getattr(method, "canonrl_patched", False):
        _set(owner, name, make(method))


def patch_compute_advantage(*, keep_entropy: bool = True) -> None:
    """Make verl's trainers pass entropies, token ids, log-probs, values, per-turn fields and the step to canonrl
    estimators (idempotent). For estimator names not registered by canonrl verl's own code runs unchanged.

    - verl's dispatcher ``compute_advantage`` (the legacy ``RayPPOTrainer`` and the separation, fully-async and
      one-step-off-policy trainers, which import it by name) and the v1 ``compute_advantage_for_multi_trajectories``
      are replaced in every verl module that holds them.
    - The v1 ``PPOTrainer._compute_advantage`` runs :func:`canonrl.integrations.verl.v1.advantage_step` for canonrl
      names: it fetches from TransferQueue the fields the estimator needs (``entropy``, ``responses``, the rows'
      ``extra_fields``) beyond verl's fixed list. The opt-in trainers of
      :func:`canonrl.integrations.verl.v1.register_trainers` do the same without any patch.
    - Both trainers save and restore canonrl's estimator states with their checkpoints.
    - With ``keep_entropy`` (default) ``RayPPOTrainer._compute_old_log_prob`` also copies the entropies to the batch
      key ``canonrl_entropys`` before the legacy trainer pops ``entropys``; the dispatcher reads and drops that key.

    Must run in the process that runs the trainer (verl's ``TaskRunner`` Ray actor): set ``CANONRL_VERL_PATCH=1``
    to have the ``verl.plugins`` entry point do it at ``import verl``.
    """
    from verl.trainer.ppo import ray_trainer

    register_all()
    current = ray_trainer.compute_advantage
    if not getattr(current, "canonrl_patched", False):
        _replace_everywhere(current, make_patched(current))
    try:
        from verl.trainer.ppo.v1 import utils as v1_utils
        from verl.trainer.ppo.v1.trainer_base import PPOTrainer
    except ImportError:  # pragma: no cover - verl's v1 trainer needs TransferQueue (in canonrl[verl])
        PPOTrainer = None
    if PPOTrainer is not None:
        multi = v1_utils.compute_advantage_for_multi_trajectories
        if not getattr(multi, "canonrl_patched", False):
            _replace_everywhere(multi, make_multi_trajectories(multi))
        _patch_method(PPOTrainer, "_compute_advantage", make_v1_compute_advantage)
        _patch_method(PPOTrainer, "_save_checkpoint", make_saving)
        _patch_method(PPOTrainer, "_load_checkpoint", make_loading)
    _patch_method(ray_trainer.RayPPOTrainer, "_save_checkpoint", make_saving)
    _patch_method(ray_trainer.RayPPOTrainer, "_load_checkpoint", make_loading)
    if keep_entropy:
        _patch_method(ray_trainer.RayPPOTrainer, "_compute_old_log_prob", make_kept_entropy)


def unpatch_compute_advantage() -> None:
    """Undo :func:`patch_compute_advantage` (registrations stay)."""
    while _ORIGINALS:
        _, (owner, attribute, original) = _ORIGINALS.popitem()
        setattr(owner, attribute, original)


def is_patched() -> bool:
    from verl.trainer.ppo import ray_trainer

    return bool(getattr(ray_trainer.compute_advantage, "canonrl_patched", False))
