"""The verl contract for canonrl's estimators: :func:`compute` (``(advantages, returns)`` from verl's inputs),
hyperparameters from verl's ``algorithm`` config, one function per estimator registered in verl's
``ADV_ESTIMATOR_REGISTRY`` (:func:`register_all`), and what verl can give an estimator (:data:`VERL`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from canonrl.fields import Consumer

#: verl releases this adapter is tested with: it wraps the dispatcher and private trainer methods, whose signatures
#: change between minor releases. Registration warns outside this range (:func:`check_verl_version`).
SUPPORTED_VERL = ">=0.9,<0.10"

#: verl estimator name -> canonrl estimator name, filled by :func:`register_all`.
VERL_NAMES: dict[str, str] = {}

#: canonrl batch field -> the DataProto ``batch`` keys the patched dispatcher reads it from (first one present wins).
BATCH_KEYS: dict[str, tuple[str, ...]] = {
    "entropy": ("entropys", "canonrl_entropys"),
    "token_ids": ("responses",),
    "logprobs": ("old_log_probs",),
    "metric": ("canonrl_metric",),
    "human_values": ("canonrl_human_values",),
    "greedy_rewards": ("reward_baselines",),
    "ref_logprobs": ("ref_log_prob",),
    "values": ("values",),
    "turn_ids": ("canonrl_turn_ids",),
}

#: canonrl per-step field -> the ``non_tensor_batch`` keys (object arrays, one entry per row) the patched dispatcher
#: reads it from (first one present wins): the agent loop's per-turn scores, the anchor of each turn, the player
NON_TENSOR_KEYS: dict[str, tuple[str, ...]] = {
    "step_rewards": ("canonrl_step_rewards", "turn_scores"),
    "anchor": ("canonrl_anchor", "anchor_obs"),
    "agent": ("canonrl_agent", "agent"),
}

#: verl's own GDPO config keys, read for canonrl's multi-reward estimators too: the names of the reward components
#: (keys of the reward function's ``reward_extra_info``) and their weights.
REWARD_KEYS_KEY = "gdpo_reward_keys"
REWARD_WEIGHTS_KEY = "gdpo_reward_weights"

#: Set to 1 to have the entry point (``import verl``) also apply :func:`patch_compute_advantage`.
PATCH_ENV = "CANONRL_VERL_PATCH"
_HOW_TO_GET = {
    "entropy": "per-token entropies (batch key 'entropys')",
    "token_ids": "response token ids (batch key 'responses')",
    "logprobs": "old log-probs (batch key 'old_log_probs')",
    "metric": "a per-response metric (batch key 'canonrl_metric')",
    "human_values": "each prompt's human value v on its rows (batch key 'canonrl_human_values')",
    "greedy_rewards": "the greedy response's reward per row (batch key 'reward_baselines', which verl fills only "
    "for its own adv_estimator=remax)",
    "ref_logprobs": "the reference policy's log-probs (batch key 'ref_log_prob'; verl computes them only with a "
    "reference policy, e.g. actor_rollout_ref.actor.use_kl_loss=true)",
    "reference_rewards": "a reference-policy response's reward per row (verl does not generate one)",
    "prompt_confidence": "a per-prompt confidence (verl does not compute prompt log-probs)",
    "values": "the critic's values (batch key 'values': critic.enable=true)",
    "token_rewards": "verl's token_level_rewards (each token's reward), as given",
    "turn_ids": "each token's turn (batch key 'canonrl_turn_ids' [bs, T]; default: the runs of response_mask)",
    "step_rewards": "per-turn rewards, one list per row (non_tensor_batch 'turn_scores' or 'canonrl_step_rewards')",
    "anchor": "the anchor state of each turn, one list per row (non_tensor_batch 'anchor_obs' or 'canonrl_anchor')",
    "agent": "the player of each row (non_tensor_batch 'agent' or 'canonrl_agent')",
}
#: what verl's advantage step can give an estimator beyond rewards, group and mask (with the patch), and how
VERL = Consumer(
    "verl",
    {field: _HOW_TO_GET[field] for field in (*BATCH_KEYS, *NON_TENSOR_KEYS, "token_rewards")},
    missing="the estimator works in the canonrl library and lab, not in verl (docs/estimators.md: where each works)",
)

_FUNCTIONS: dict[str, Any] = {}  # canonrl name -> the one function object registered with verl
_ESTIMATORS: dict[tuple[str, str], Any] = {}  # (canonrl name, repr of hyperparameters) -> estimator instance
_HYPERPARAMETERS: dict[tuple[str, str], dict[str, Any]] = {}  # the same keys -> the hyperparameters, as given
# ------------------------------------------------------------------------------------------------------------------
# Hyperparameters from verl's ``algorithm`` config
# ------------------------------------------------------------------------------------------------------------------


def config_get(config: Any, key: str, default: Any = None) -> Any:
    if config is None:
        return default
    if hasattr(config, "get"):
        try:
            return config.get(key, default)
        except Exception:  # a structured config that rejects unknown keys
            return default
    return getattr(config, key, default)


def plain_config(value: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists (resolved); anything else unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf comes with verl
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def hyperparameters_from_config(name: str, config: Any) -> dict[str, Any]:
    """The hyperparameters of canonrl estimator ``name`` in verl's ``algorithm`` config (``algorithm.<name>``).

    ``algorithm.canonrl_<name>`` is accepted too. For ``grpo``, verl's ``algorithm.norm_adv_by_std_in_grpo=False``
    selects ``scale="none"`` unless ``scale`` is set explicitly. Unknown keys raise a one-line ``ValueError``.
    """
    from canonrl.registry import estimator_class

    found = {}
    for key in (name, f"canonrl_{name}"):
        sub = config_get(config, key)
        if sub is None:
            continue
        sub = plain_config(sub)
        if not isinstance(sub, Mapping):
            raise ValueError(
                f"algorithm.{key} must be a mapping of hyperparameters (e.g. +algorithm.{key}.<param>=...), "
                f"got {type(sub).__name__}"
            )
        found.update(sub)
    valid = [h.name for h in estimator_class(name).info().hyperparameters]
    unknown = sorted(set(found) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown hyperparameter {unknown[0]!r} in algorithm.{name} for canonrl estimator {name!r}; "
            f"valid: {', '.join(valid) or 'none'}"
        )
    if name == "grpo" and "scale" not in found and config_get(config, "norm_adv_by_std_in_grpo", True) is False:
        found["scale"] = "none"
    weights = plain_config(config_get(config, REWARD_WEIGHTS_KEY))
    if estimator_class(name).multi_reward and weights is not None and "weights" in valid and "weights" not in found:
        found["weights"] = tuple(float(w) for w in weights)
    return dict(found)


def reward_keys(config: Any) -> list[str] | None:
    """verl's ``algorithm.gdpo_reward_keys``: the reward components a multi-reward estimator gets, or None."""
    keys = plain_config(config_get(config, REWARD_KEYS_KEY))
    if keys is None:
        return None
    if isinstance(keys, str) or not all(isinstance(k, str) for k in keys) or not keys:
        raise ValueError(f"algorithm.{REWARD_KEYS_KEY} must be a non-empty list of reward names, got {keys!r}")
    return list(keys)


def stack_reward_components(rows: int, keys: list[str], lookup: Any, where: str) -> Any:
    """[rows, K] float32 from ``lookup(key)`` (one value per row, or None when the key is missing)."""
    import numpy as np
    import torch

    columns = []
    for key in keys:
        values = lookup(key)
        if values is None:
            raise ValueError(
                f"canonrl: reward component {key!r} (algorithm.{REWARD_KEYS_KEY}) is not in {where}; the reward "
                f"function must return a dict with it (verl's reward_extra_info)"
            )
        try:
            column = np.asarray(values, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError):
            raise ValueError(f"canonrl: reward component {key!r} in {where} holds non-numeric values") from None
        if column.shape[0] != rows:
            raise ValueError(f"canonrl: reward component {key!r} has {column.shape[0]} values for {rows} rows")
        column = torch.from_numpy(column)
        if not torch.isfinite(column).all():
            from canonrl.batch import describe_rows

            raise ValueError(
                f"canonrl: reward component {key!r} in {where} is missing (None) or not finite at rows "
                f"{describe_rows(~torch.isfinite(column))}"
            )
        columns.append(column)
    return torch.stack(columns, dim=1)


def cached_estimator(name: str, hyperparameters: dict[str, Any]):
    """One estimator instance per (name, hyperparameters), so step counters and schedules persist across calls."""
    key = (name, repr(sorted(hyperparameters.items(), key=lambda kv: kv[0])))
    est = _ESTIMATORS.get(key)
    if est is None:
        from canonrl.registry import get_estimator

        try:
            est = get_estimator(name, **hyperparameters)
        except TypeError as e:  # unknown hyperparameter (already caught above) or a bad value type
            raise ValueError(str(e).splitlines()[0]) from None
        _ESTIMATORS[key] = est
        _HYPERPARAMETERS[key] = dict(hyperparameters)
    return est


# ------------------------------------------------------------------------------------------------------------------
# The functions registered with verl
# ------------------------------------------------------------------------------------------------------------------


def compute(
    name: str,
    token_level_rewards: Any,
    response_mask: Any,
    index: Any = None,
    config: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """verl's estimator contract for canonrl estimator ``name``: ``(advantages, returns)``, both [bs, T] and masked.

    The outcome reward is ``token_level_rewards.sum(-1)``, as in verl's built-ins; ``token_level_rewards`` is also
    passed as canonrl's ``token_rewards`` (token-level estimators such as ``reinforce_pp`` read it). Extra inputs
    (``entropy``, ``token_ids``, ``logprobs``, ``metric``) and ``step`` come as keyword arguments from the patched
    dispatcher; ``reward_baselines`` (verl's ReMax baselines) is read as ``greedy_rewards``. A multi-reward estimator
    (``gdpo``) gets ``reward_components`` [bs, K] from the patched dispatcher when ``algorithm.gdpo_reward_keys``
    names them, else the outcome reward as K = 1 (verl's GDPO does the same).
    """
    if index is None:
        raise ValueError(
            f"canonrl estimator {name!r} needs verl's 'uid' (the prompt group of each response) in non_tensor_batch"
        )
    est = cached_estimator(name, hyperparameters_from_config(name, config))
    rewards = token_level_rewards.sum(-1).float()
    if type(est).multi_reward:
        components = kwargs.get("reward_components")
        if components is not None:
            rewards = components.to(rewards.device)
        elif reward_keys(config) is not None:
            raise ValueError(
                f"canonrl estimator {name!r} needs the reward components of algorithm.{REWARD_KEYS_KEY}, which "
                f"verl's compute_advantage does not pass: call canonrl.integrations.verl.patch_compute_advantage() "
                f"in the trainer process (or set {PATCH_ENV}=1); see docs/verl.md"
            )
    if kwargs.get("greedy_rewards") is None and kwargs.get("reward_baselines") is not None:
        kwargs["greedy_rewards"] = kwargs["reward_baselines"]  # verl's own dispatcher passes this one unpatched
    VERL.check(est)
    kwargs.setdefault("token_rewards", token_level_rewards)
    fields: dict[str, Any] = _turn_fields(est, kwargs)
    for field in est.required_inputs():
        value = kwargs.get(field)
        if value is None:
            raise ValueError(
                f"canonrl estimator {name!r} needs {_HOW_TO_GET.get(field, field)}, which verl's compute_advantage "
                f"does not pass: call canonrl.integrations.verl.patch_compute_advantage() in the trainer process "
                f"(or set {PATCH_ENV}=1) and keep that key in the batch (see docs/verl.md)"
            )
        fields[field] = value
    step = kwargs.get("step")
    call = {"rewards": rewards, "token_rewards": token_level_rewards, "group": index, "mask": response_mask}
    call.update(fields)
    advantages, returns = est.compute_with_returns(step=None if step is None else int(step), **call)
    if advantages.dtype != token_level_rewards.dtype and token_level_rewards.dtype.is_floating_point:
        advantages, returns = advantages.to(token_level_rewards.dtype), returns.to(token_level_rewards.dtype)
    return advantages, returns


def _turn_fields(est: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The step fields of verl's agent-loop layout (one row per trajectory) a step estimator reads: ``turn_ids``
    (batch key ``canonrl_turn_ids``, else the runs of the response mask: each run of policy tokens between tool or
    observation holes is a turn) and, when the batch has them, the per-turn rewards, anchors and players. The
    counts of per-turn values must match the turns; the core's validation names the rows where they do not."""
    if type(est).level != "step":
        return {}
    fields: dict[str, Any] = {"turn_ids": kwargs.get("turn_ids", "mask_runs")}
    for field in ("step_rewards", "anchor", "agent"):
        if kwargs.get(field) is not None:
            fields[field] = kwargs[field]
    return fields


def advantage_fn(name: str):
    """The verl-contract function for canonrl estimator ``name`` (the same object on every call)."""
    fn = _FUNCTIONS.get(name)
    if fn is None:

        def fn(token_level_rewards, response_mask, index=None, config=None, **kwargs):
            return compute(name, token_level_rewards, response_mask, index=index, config=config, **kwargs)

        fn.__name__ = fn.__qualname__ = f"canonrl_{name}_advantage"
        fn.__doc__ = f"canonrl's {name!r} estimator under verl's advantage-estimator contract."
        fn.canonrl_name = name
        _FUNCTIONS[name] = fn
    return fn


def _canonrl_name_of(fn: Any) -> str | None:
    """The canonrl name behind a registered verl function, or None for verl's own and other plugins' estimators."""
    name = getattr(fn, "canonrl_name", None)
    return name if name is not None and _FUNCTIONS.get(name) is fn else None


def check_verl_version(version: str | None = None) -> bool:
    """Whether verl's version (default: the installed one) is in :data:`SUPPORTED_VERL`; warns once when it is not."""
    import warnings

    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if version is None:
        import verl

        version = verl.__version__
    if Version(version) in SpecifierSet(SUPPORTED_VERL):
        return True
    warnings.warn(
        f"canonrl's verl adapter is tested with verl {SUPPORTED_VERL}, not {version}: the patched dispatcher and the "
        f"wrapped trainer methods may not match this release (run canonrl's verl tests to check)",
        RuntimeWarning, stacklevel=2,
    )  # fmt: skip
    return False


def register_all() -> dict[str, str]:
    """Register every canonrl estimator with verl (idempotent); returns :data:`VERL_NAMES`.

    Each estimator gets ``canonrl_<name>`` and, when verl has no estimator of that name, ``<name>``. A name verl
    already holds (a built-in, or another plugin's) is left alone.
    """
    from verl.trainer.ppo import core_algos

    from canonrl.registry import estimator_class, estimators

    if not VERL_NAMES:  # the first registration in this process
        check_verl_version()
    registry = core_algos.ADV_ESTIMATOR_REGISTRY
    builtin = {e.value for e in core_algos.AdvantageEstimator}
    for info in estimators():
        cls = estimator_class(info.name)
        if not info.outcome_level and VERL.missing_inputs(tuple(cls().required_inputs())):
            continue  # a step input verl has no key for (a tree's nodes, a producer's values): library and lab only
        if not info.outcome_level and not {"row-per-trajectory", "row-per-response"} & set(cls.layouts):
            continue  # verl's agent loop keeps a trajectory in one row; row-per-step needs verl-agent's layout
        fn = advantage_fn(info.name)
        for verl_name in (info.name, f"canonrl_{info.name}"):
            if verl_name in builtin:
                continue
            if verl_name in registry and registry[verl_name] is not fn:
                continue  # someone else's estimator: never re-register a taken name
            core_algos.register_adv_est(verl_name)(fn)
            VERL_NAMES[verl_name] = info.name
    return dict(VERL_NAMES)
