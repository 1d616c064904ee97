"""canonrl's estimators as SkyRL advantage estimators (``skyrl`` 0.3.0 on PyPI, and the older ``skyrl_train``).

SkyRL keeps its estimators in ``AdvantageEstimatorRegistry`` (``skyrl.backends.skyrl_train.utils.ppo_utils`` in the
``skyrl`` package; ``skyrl_train.utils.ppo_utils`` in the older standalone ``skyrl-train``). Its trainer calls the
selected one as::

    fn(token_level_rewards=..., response_mask=..., index=uids, values=..., grpo_norm_by_std=...,
       gamma=..., lambd=..., config=cfg.trainer.algorithm)  ->  (advantages, returns)

which is verl's contract plus SkyRL's keyword arguments, so each registered function is a thin shim over the verl
adapter's :func:`canonrl.integrations.verl.compute` (the same reward reading, uid grouping, masking and per-
hyperparameter estimator cache). SkyRL is imported only inside :func:`register_estimators`; ``import canonrl`` never
imports it.

- :func:`register_estimators` registers canonrl estimators under ``canonrl_<name>`` (``canonrl_grpo``,
  ``canonrl_dr_grpo``, ...); select one with ``trainer.algorithm.advantage_estimator=canonrl_<name>``.
- SkyRL's ``AlgorithmConfig`` is a dataclass that rejects unknown keys, so canonrl hyperparameters are given at
  registration (``hyperparameters={"canon": {"split_by": "length"}}``), not in SkyRL's config. SkyRL's
  ``grpo_norm_by_std=False`` selects ``scale="none"`` for ``canonrl_grpo`` unless ``scale`` is set there.
- SkyRL's advantage step gives rewards (per token, summed to the outcome), the prompt uid of each row and the
  response mask, nothing else a canonrl estimator reads (no entropies, token ids, log-probs, metrics; ``values`` only
  for its own critic). By default every outcome-level estimator whose configured inputs SkyRL gives is registered;
  the others are listed with the reason in :data:`SKIPPED`. Naming one of them explicitly raises a one-line error.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from canonrl.fields import Consumer
from canonrl.integrations.verl import compute as _verl_compute

__all__ = ["PREFIX", "SKYRL", "SKYRL_NAMES", "SKIPPED", "advantage_fn", "registry", "register_estimators"]

#: The prefix of every SkyRL name canonrl registers (SkyRL's own ``grpo``/``rloo``/... are never touched).
PREFIX = "canonrl_"

#: What SkyRL's advantage step gives an estimator beyond rewards, group and mask.
SKYRL = Consumer(
    "SkyRL",
    {"token_rewards": "SkyRL's token_level_rewards (each token's reward), as given"},
    missing="SkyRL's advantage step passes only rewards, uids, the response mask and critic values; the estimator "
    "works in the canonrl library and lab (docs/skyrl.md)",
)

#: SkyRL name -> canonrl name, filled by :func:`register_estimators`.
SKYRL_NAMES: dict[str, str] = {}
#: canonrl name -> why the last default :func:`register_estimators` call left it out.
SKIPPED: dict[str, str] = {}

#: The module paths of SkyRL's registry: the ``skyrl`` package (0.3.0), then the standalone ``skyrl-train``.
REGISTRY_MODULES = ("skyrl.backends.skyrl_train.utils.ppo_utils", "skyrl_train.utils.ppo_utils")
#: SkyRL's own keyword arguments to every estimator, which canonrl's estimators do not read.
SKYRL_KWARGS = ("values", "gamma", "lambd", "grpo_norm_by_std", "epsilon")

_FUNCTIONS: dict[tuple[str, str], Any] = {}  # (canonrl name, repr of hyperparameters) -> the registered function


def registry() -> Any:
    """SkyRL's ``AdvantageEstimatorRegistry`` class; a one-line ``ImportError`` when SkyRL is not installed."""
    import importlib

    errors = []
    for module in REGISTRY_MODULES:
        try:
            return importlib.import_module(module).AdvantageEstimatorRegistry
        except Exception as e:  # ImportError, or skyrl 0.3.0's pydantic error on Python 3.11 (docs/skyrl.md)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            errors.append(f"{module}: {type(e).__name__}: {first}" if first else f"{module}: {type(e).__name__}")
    raise ImportError(
        "canonrl.integrations.skyrl needs SkyRL's training code (skyrl[fsdp] >= 0.4 on Python >= 3.12, see "
        f"docs/skyrl.md); not importable: {'; '.join(errors)}"
    )


def _key(hyperparameters: Mapping[str, Any]) -> str:
    return repr(sorted(hyperparameters.items(), key=lambda kv: kv[0]))


def advantage_fn(name: str, hyperparameters: Mapping[str, Any] | None = None):
    """The SkyRL-contract function for canonrl estimator ``name`` with ``hyperparameters`` (one object per pair).

    ``fn(token_level_rewards, response_mask, index, config=None, **kwargs) -> (advantages, returns)``, both [bs, T]
    and 0 outside the mask; SkyRL's ``values``/``gamma``/``lambd``/``epsilon`` are ignored and ``grpo_norm_by_std``
    maps to ``scale`` for ``grpo`` as verl's ``norm_adv_by_std_in_grpo`` does. ``config`` (SkyRL's
    ``AlgorithmConfig``) is not read: hyperparameters come from here.
    """
    hyperparameters = dict(hyperparameters or {})
    key = (name, _key(hyperparameters))
    fn = _FUNCTIONS.get(key)
    if fn is None:

        def fn(token_level_rewards, response_mask, index=None, config=None, **kwargs):
            norm_by_std = kwargs.get("grpo_norm_by_std", True)
            for skyrl_kwarg in SKYRL_KWARGS:
                kwargs.pop(skyrl_kwarg, None)
            algorithm = {name: hyperparameters, "norm_adv_by_std_in_grpo": bool(norm_by_std)}
            return _verl_compute(name, token_level_rewards, response_mask, index=index, config=algorithm, **kwargs)

        fn.__name__ = fn.__qualname__ = f"{PREFIX}{name}_advantage"
        fn.__doc__ = f"canonrl's {name!r} estimator under SkyRL's advantage-estimator contract."
        fn.canonrl_name = name
        fn.canonrl_hyperparameters = dict(hyperparameters)
        _FUNCTIONS[key] = fn
    return fn


def _why_not(name: str, hyperparameters: Mapping[str, Any]) -> str | None:
    """Why SkyRL cannot run canonrl estimator ``name`` with ``hyperparameters``; None when it can."""
    from canonrl.integrations.verl import hyperparameters_from_config
    from canonrl.registry import estimator_class, get_estimator

    info = estimator_class(name).info()
    if not info.outcome_level:
        if info.critic:
            return f"{name!r} is a critic estimator; the adapter covers outcome-level ones (SkyRL has its own 'gae')"
        return f"{name!r} is a step-level estimator; SkyRL's advantage step gives one outcome per row"
    params = hyperparameters_from_config(name, {name: dict(hyperparameters)})  # unknown keys: one-line ValueError
    try:
        SKYRL.check(get_estimator(name, **params))
    except ValueError as e:
        return str(e).splitlines()[0]
    return None


def register_estimators(
    names: Iterable[str] | None = None, hyperparameters: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, str]:
    """Register canonrl estimators in SkyRL's ``AdvantageEstimatorRegistry`` as ``canonrl_<name>``.

    ``names``: canonrl names (``"grpo"``; ``"canonrl_grpo"`` is accepted too). None: every outcome-level estimator
    whose inputs SkyRL gives at its hyperparameters; the others go to :data:`SKIPPED` with the reason, and an
    explicitly named one raises a one-line ``ValueError``. ``hyperparameters``: canonrl name -> its hyperparameters
    (``{"canon": {"split_by": "length"}}``). Idempotent for the same hyperparameters; a name already held by another
    function (SkyRL's, another plugin's, or canonrl's with other hyperparameters) raises ``ValueError``. Call it in
    the driver before SkyRL's ``ray.init`` (SkyRL's ``sync_registries`` ships the registry to its workers) or in the
    process that computes advantages. Returns :data:`SKYRL_NAMES`.
    """
    from canonrl.registry import estimator_class, estimators

    registry_class = registry()
    hyperparameters = {k.removeprefix(PREFIX): dict(v) for k, v in (hyperparameters or {}).items()}
    for name in hyperparameters:
        estimator_class(name)  # unknown name: one-line ValueError
    explicit = names is not None
    wanted = [n.removeprefix(PREFIX) for n in names] if explicit else [info.name for info in estimators()]
    if not explicit:
        SKIPPED.clear()
    available = set(registry_class.list_available())
    for name in wanted:
        estimator_class(name)
        params = hyperparameters.get(name, {})
        reason = _why_not(name, params)
        if reason is not None:
            if explicit:
                raise ValueError(f"canonrl.integrations.skyrl: cannot register {name!r}: {reason}")
            SKIPPED[name] = reason
            continue
        fn = advantage_fn(name, params)
        skyrl_name = f"{PREFIX}{name}"
        if skyrl_name in available:
            held = registry_class.get(skyrl_name)
            if held is fn or (
                getattr(held, "canonrl_name", None) == name and getattr(held, "canonrl_hyperparameters", None) == params
            ):
                SKYRL_NAMES[skyrl_name] = name
                continue  # already ours (or a Ray-synced copy of ours): nothing to do
            raise ValueError(
                f"SkyRL already has an advantage estimator {skyrl_name!r} that is not canonrl's {name!r} with "
                f"{params or 'default hyperparameters'}; unregister it first (AdvantageEstimatorRegistry.unregister)"
            )
        registry_class.register(skyrl_name, fn)
        SKYRL_NAMES[skyrl_name] = name
    return dict(SKYRL_NAMES)
