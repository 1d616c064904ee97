"""canonrl's estimators as verl advantage estimators (verl 0.9), all importing verl lazily (``import canonrl``
never imports verl):

- :mod:`~canonrl.integrations.verl.adapter`: :func:`register_all` registers every canonrl estimator verl can feed
  in verl's ``ADV_ESTIMATOR_REGISTRY``, under its canonrl name when verl has no estimator of that name (``canon``,
  ``ktae``, ``dr_grpo``, ``gigpo``, ...) and always under ``canonrl_<name>`` (``canonrl_grpo``, ...). Built-in verl
  names are never touched; :data:`VERL_NAMES` maps each registered name to its canonrl name. The functions follow
  verl's contract ``fn(token_level_rewards, response_mask, index=None, config=None, **kwargs) -> (advantages,
  returns)``, with hyperparameters from the ``algorithm`` config under the canonrl name
  (``+algorithm.canon.mu=1.0``). Installing canonrl adds the ``verl.plugins`` entry point
  ``canonrl = "canonrl.integrations.verl:verl_plugin"``, so ``import verl`` registers everything in every process.
- :mod:`~canonrl.integrations.verl.v1`: the v1 trainer's advantage step for canonrl estimators, and the opt-in
  trainers ``trainer.v1.trainer_mode=canonrl_sync|canonrl_colocate_async|canonrl_separate_async`` (registered by
  the entry point too) that run it without patching verl.
- :mod:`~canonrl.integrations.verl.patch`: :func:`patch_compute_advantage` routes verl's own trainers (legacy,
  v1, separation and async) through canonrl's dispatcher (:mod:`~canonrl.integrations.verl.dispatcher`), so that
  canonrl estimators also receive entropies, token ids, log-probs, values, per-turn fields and the global step.
- :mod:`~canonrl.integrations.verl.checkpoints`: estimator states saved with verl's checkpoints.
"""

from __future__ import annotations

import os
from typing import Any

from canonrl.integrations.verl.adapter import (
    BATCH_KEYS,
    NON_TENSOR_KEYS,
    PATCH_ENV,
    REWARD_KEYS_KEY,
    REWARD_WEIGHTS_KEY,
    SUPPORTED_VERL,
    VERL,
    VERL_NAMES,
    advantage_fn,
    check_verl_version,
    compute,
    hyperparameters_from_config,
    register_all,
    reward_keys,
    stack_reward_components,
)
from canonrl.integrations.verl.checkpoints import (
    ESTIMATOR_STATE_FILE,
    estimator_states,
    load_estimator_states,
)
from canonrl.integrations.verl.dispatcher import KEPT_ENTROPY_KEY, canonrl_compute_advantage
from canonrl.integrations.verl.patch import is_patched, patch_compute_advantage, unpatch_compute_advantage
from canonrl.integrations.verl.v1 import (
    MULTI_TURN_ROWS_KEY,
    TRAINER_MODES,
    V1_FIELDS,
    final_session_rows,
    register_trainers,
)

__all__ = [
    "VERL_NAMES",
    "BATCH_KEYS",
    "NON_TENSOR_KEYS",
    "V1_FIELDS",
    "SUPPORTED_VERL",
    "TRAINER_MODES",
    "register_all",
    "register_trainers",
    "patch_compute_advantage",
    "unpatch_compute_advantage",
    "is_patched",
    "advantage_fn",
    "compute",
    "canonrl_compute_advantage",
    "hyperparameters_from_config",
    "check_verl_version",
    "final_session_rows",
    "estimator_states",
    "load_estimator_states",
    "ESTIMATOR_STATE_FILE",
    "KEPT_ENTROPY_KEY",
    "MULTI_TURN_ROWS_KEY",
    "PATCH_ENV",
    "REWARD_KEYS_KEY",
    "REWARD_WEIGHTS_KEY",
    "VERL",
    "reward_keys",
    "stack_reward_components",
]


def _plugin() -> dict[str, str]:
    """Register the estimators and the opt-in v1 trainers (and with ``CANONRL_VERL_PATCH=1`` patch). verl logs a
    failing plugin at debug level only, so a broken install would show as "unknown adv_estimator" later: a failure
    here is logged as an error and warned first."""
    try:
        names = register_all()
        _register_trainers_if_available()
        if os.environ.get(PATCH_ENV, "").strip().lower() in ("1", "true", "yes"):
            patch_compute_advantage()
    except Exception as error:
        import logging
        import warnings

        message = (f"canonrl's verl plugin failed, so canonrl's estimators are not (all) registered or patched: "
                   f"{type(error).__name__}: {error}")  # fmt: skip
        logging.getLogger("canonrl").error(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        raise
    return names


def _register_trainers_if_available() -> None:
    import importlib.util

    if importlib.util.find_spec("transfer_queue") is not None:  # verl's v1 trainers need it
        register_trainers()


def __getattr__(attribute: str) -> Any:
    # verl's plugin loader only calls ``EntryPoint.load()``, i.e. imports the module and reads the attribute; it
    # never calls what it gets. Reading ``verl_plugin`` therefore does the registration (PEP 562 module getattr).
    if attribute == "verl_plugin":
        return _plugin()
    raise AttributeError(f"module {__name__!r} has no attribute {attribute!r}")
