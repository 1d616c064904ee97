"""canonrl's estimators as verl advantage estimators (verl >= 0.9).

Three pieces, all importing verl lazily (``import canonrl`` never imports verl):

- :func:`register_all` registers every canonrl estimator in verl's ``ADV_ESTIMATOR_REGISTRY`` under its canonrl name
  when verl has no estimator of that name (``canon``, ``ktae``, ``dr_grpo``, ``dapo``, ``reinforce_pp``, ...) and
  always under ``canonrl_<name>`` (``canonrl_grpo``, ``canonrl_rloo``, ...). Built-in verl names are never touched.
  :data:`VERL_NAMES` maps each registered verl name to its canonrl name. Installing canonrl adds the
  ``verl.plugins`` entry point ``canonrl = "canonrl.integrations.verl:verl_plugin"``, so ``import verl`` registers
  everything in every process (driver and Ray workers alike).
- The registered functions follow verl's contract ``fn(token_level_rewards, response_mask, index=None, config=None,
  **kwargs) -> (advantages, returns)``. Hyperparameters come from the ``algorithm`` config, under the canonrl name:
  ``+algorithm.canon.mu=1.0 +algorithm.canon.split_by=length``.
- :func:`patch_compute_advantage` wraps verl's dispatcher so that canonrl estimators also receive entropies
  (``entropys``), token ids (``responses``), log-probs (``old_log_probs``) and the global step, which verl's plain
  dispatcher never passes. :func:`unpatch_compute_advantage` undoes it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextvars import ContextVar
from enum import Enum
from typing import Any

from canonrl.fields import Consumer

__all__ = [
    "VERL_NAMES",
    "BATCH_KEYS",
    "register_all",
    "patch_compute_advantage",
    "unpatch_compute_advantage",
    "is_patched",
    "advantage_fn",
]

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

#: The batch key the ``keep_entropy`` patch copies the legacy trainer's entropies to before verl pops ``entropys``.
KEPT_ENTROPY_KEY = "canonrl_entropys"

#: canonrl batch field -> the TransferQueue field the v1 trainer stores it under (entropies are written there by
#: ``_compute_old_log_prob``, response ids by the agent loop, old log-probs are already fetched for the advantage).
V1_FIELDS: dict[str, str] = {
    "entropy": "entropy",
    "token_ids": "responses",
    "metric": "canonrl_metric",
    "human_values": "canonrl_human_values",
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
_ORIGINALS: dict[tuple[str, str], Any] = {}  # (module, attribute) -> what the patch replaced
# Inputs the wrapped v1 ``_compute_advantage`` fetched from TransferQueue for the dispatcher call it makes; a context
# variable rather than a global because the async v1 trainers may compute advantages in several threads.
_V1_INPUTS: ContextVar[dict[str, Any] | None] = ContextVar("canonrl_verl_v1_inputs", default=None)


# ------------------------------------------------------------------------------------------------------------------
# Hyperparameters from verl's ``algorithm`` config
# ------------------------------------------------------------------------------------------------------------------


def _config_get(config: Any, key: str, default: Any = None) -> Any:
    if config is None:
        return default
    if hasattr(config, "get"):
        try:
            return config.get(key, default)
        except Exception:  # a structured config that rejects unknown keys
            return default
    return getattr(config, key, default)


def _plain(value: Any) -> Any:
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
        sub = _config_get(config, key)
        if sub is None:
            continue
        sub = _plain(sub)
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
    if name == "grpo" and "scale" not in found and _config_get(config, "norm_adv_by_std_in_grpo", True) is False:
        found["scale"] = "none"
    weights = _plain(_config_get(config, REWARD_WEIGHTS_KEY))
    if estimator_class(name).multi_reward and weights is not None and "weights" in valid and "weights" not in found:
        found["weights"] = tuple(float(w) for w in weights)
    return dict(found)


def reward_keys(config: Any) -> list[str] | None:
    """verl's ``algorithm.gdpo_reward_keys``: the reward components a multi-reward estimator gets, or None."""
    keys = _plain(_config_get(config, REWARD_KEYS_KEY))
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


def _estimator(name: str, hyperparameters: dict[str, Any]):
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
    est = _estimator(name, hyperparameters_from_config(name, config))
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


# ------------------------------------------------------------------------------------------------------------------
# The patched dispatcher
# ------------------------------------------------------------------------------------------------------------------


def _extra_inputs(data: Any) -> dict[str, Any]:
    keys = set(data.batch.keys())
    out = {}
    for field, candidates in BATCH_KEYS.items():
        for key in candidates:
            if key in keys:
                out[field] = data.batch[key]
                break
    for field, candidates in NON_TENSOR_KEYS.items():
        for key in candidates:
            if key in data.non_tensor_batch:
                out[field] = _per_row(data.non_tensor_batch[key])
                break
    step = (data.meta_info or {}).get("global_steps")
    if step is not None:
        out["step"] = int(step)
    return out


def _per_row(values: Any) -> list:
    """A ``non_tensor_batch`` object array as a plain list: per-row arrays and tuples (of per-turn values) as lists."""
    return [v.tolist() if hasattr(v, "tolist") else list(v) if isinstance(v, tuple) else v for v in values]


def _make_patched(original: Any):
    def compute_advantage(
        data,
        adv_estimator,
        gamma: float = 1.0,
        lam: float = 1.0,
        num_repeat: int = 1,
        norm_adv_by_std_in_grpo: bool = True,
        config=None,
    ):
        from verl.trainer.ppo import core_algos

        name = adv_estimator.value if isinstance(adv_estimator, Enum) else adv_estimator
        fn = core_algos.ADV_ESTIMATOR_REGISTRY.get(name) if isinstance(name, str) else None
        canonrl_name = _canonrl_name_of(fn)
        if canonrl_name is None:
            return original(
                data,
                adv_estimator=adv_estimator,
                gamma=gamma,
                lam=lam,
                num_repeat=num_repeat,
                norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo,
                config=config,
            )
        if "response_mask" not in data.batch.keys():
            from verl.trainer.ppo.ray_trainer import compute_response_mask

            data.batch["response_mask"] = compute_response_mask(data)
        kwargs = {
            "token_level_rewards": data.batch["token_level_rewards"],
            "response_mask": data.batch["response_mask"],
            "config": config,
        }
        if "uid" in data.non_tensor_batch:
            kwargs["index"] = data.non_tensor_batch["uid"]
        kwargs.update(_extra_inputs(data))
        kwargs.update(_v1_inputs_for(data))
        keys = reward_keys(config)
        if keys is not None and "reward_components" not in kwargs and estimator_is_multi_reward(canonrl_name):
            kwargs["reward_components"] = stack_reward_components(
                len(data), keys, data.non_tensor_batch.get, "the batch's non_tensor_batch"
            )
        advantages, returns = fn(**kwargs)
        data.batch["advantages"] = advantages
        data.batch["returns"] = returns
        if KEPT_ENTROPY_KEY in data.batch.keys():
            data.batch.pop(KEPT_ENTROPY_KEY)  # only kept for the advantage; do not ship it to the actor update
        return data

    compute_advantage.__wrapped__ = original
    compute_advantage.canonrl_patched = True
    compute_advantage.__doc__ = "verl's compute_advantage, patched by canonrl to pass extra inputs to its estimators."
    return compute_advantage


def estimator_is_multi_reward(name: str) -> bool:
    from canonrl.registry import estimator_class

    return estimator_class(name).multi_reward


def _v1_inputs_for(data: Any) -> dict[str, Any]:
    """What the wrapped v1 ``_compute_advantage`` fetched, padded or cut to the batch's response width."""
    fetched = _V1_INPUTS.get()
    if not fetched:
        return {}
    import torch.nn.functional as F

    from canonrl.batch import PER_TOKEN_FIELDS

    rows, width = data.batch["response_mask"].shape
    out: dict[str, Any] = {}
    for field, value in fetched.items():
        if field == "step":
            out[field] = value
            continue
        if value.shape[0] != rows:
            raise ValueError(
                f"canonrl: the v1 trainer's {V1_FIELDS.get(field, field)!r} has {value.shape[0]} rows but the advantage batch "
                f"has {rows}; compute_advantage_for_multi_trajectories passed a subset of the rows"
            )
        if field in PER_TOKEN_FIELDS:
            value = F.pad(value, (0, width - value.shape[1]))  # pads, or crops when negative
        out[field] = value
    return out


def _v1_fetch(trainer: Any, batch: Any) -> dict[str, Any]:
    """Fetch from TransferQueue the inputs the configured canonrl estimator needs beyond verl's fixed field list."""
    from verl.trainer.ppo import core_algos
    from verl.trainer.ppo.v1 import trainer_base

    algorithm = trainer.config.algorithm
    name = algorithm.adv_estimator
    name = name.value if isinstance(name, Enum) else name
    canonrl_name = _canonrl_name_of(core_algos.ADV_ESTIMATOR_REGISTRY.get(name))
    if canonrl_name is None:
        return {}
    est = _estimator(canonrl_name, hyperparameters_from_config(canonrl_name, algorithm))
    needed = [field for field in est.required_inputs() if field in V1_FIELDS]
    out: dict[str, Any] = {}
    if needed:
        fields = [V1_FIELDS[f] for f in needed]
        # TransferQueue answers a request for a field some row lacks with an empty TensorDict, not an error
        fetched = trainer_base.tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        missing = [f for f in fields if f not in fetched.keys()]
        if missing:
            raise ValueError(
                f"canonrl estimator {canonrl_name!r} needs the TransferQueue field(s) {missing} in verl's v1 trainer, "
                f"which the rows of this batch lack; 'entropy' exists only when old log-probs are recomputed "
                f"(not with algorithm.rollout_correction.bypass_mode=true)"
            )
        for field, tq_field in zip(needed, fields):
            value = fetched[tq_field]
            out[field] = value.to_padded_tensor(0) if getattr(value, "is_nested", False) else value
    keys = reward_keys(algorithm)
    if keys is not None and type(est).multi_reward:
        extra = trainer_base.tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["extra_fields"])
        if "extra_fields" not in extra.keys():
            raise ValueError(
                f"canonrl estimator {canonrl_name!r} needs the reward components of algorithm.{REWARD_KEYS_KEY}, "
                f"but the rows of this batch have no 'extra_fields' in TransferQueue"
            )
        infos = [_reward_extra_info(row) for row in extra["extra_fields"]]
        out["reward_components"] = stack_reward_components(
            len(infos),
            keys,
            lambda key: [info.get(key) for info in infos] if all(key in info for info in infos) else None,
            "the rows' extra_fields['reward_extra_info'] in TransferQueue",
        )
    step = getattr(trainer, "global_steps", None)
    if step is not None:
        out["step"] = int(step)
    return out


def _reward_extra_info(extra_fields: Any) -> dict:
    """A v1 row's ``extra_fields["reward_extra_info"]`` (TransferQueue may wrap the dict as NonTensorData)."""
    extra_fields = getattr(extra_fields, "data", extra_fields)
    info = extra_fields.get("reward_extra_info", {}) if isinstance(extra_fields, Mapping) else {}
    return getattr(info, "data", info) or {}


def _make_v1_compute_advantage(original: Any):
    def _compute_advantage(self, batch, metrics):
        token = _V1_INPUTS.set(_v1_fetch(self, batch))
        try:
            return original(self, batch, metrics)
        finally:
            _V1_INPUTS.reset(token)

    _compute_advantage.__wrapped__ = original
    _compute_advantage.canonrl_patched = True
    return _compute_advantage


#: ``algorithm.<key>``: which rows of a multi-turn v1 batch a canonrl sequence-level estimator groups — "final" (each
#: agent-loop session's final output, broadcast to its other rows, as verl does for its own GRPO) or "all" (every
#: turn row, verl's default for other estimators)
MULTI_TURN_ROWS_KEY = "canonrl_multi_turn_rows"


def final_session_rows(batch_keys: list[str]) -> tuple[list[int], list[int]]:
    """(the row of each session's final output, each row's position in that list) from the v1 trainer's batch keys
    ``{uid}_{session_id}_{index}`` (verl's ``compute_advantage_for_multi_trajectories`` parsing)."""
    final: dict[str, tuple[int, int]] = {}
    sessions = []
    for row, key in enumerate(batch_keys):
        fields = key.rsplit("_", 2)
        if len(fields) != 3:
            raise ValueError(f"batch key {key!r} at row {row} is not verl's {{uid}}_{{session_id}}_{{index}}")
        session, index = f"{fields[0]}_{fields[1]}", int(fields[2])
        sessions.append(session)
        if session not in final or final[session][0] < index:
            final[session] = (index, row)
    position = {session: slot for slot, session in enumerate(final)}
    return [row for _, row in final.values()], [position[session] for session in sessions]


def _make_multi_trajectories(original: Any):
    def compute_advantage_for_multi_trajectories(data, batch_keys, adv_estimator, gamma=1.0, lam=1.0, num_repeat=1,
                                                 norm_adv_by_std_in_grpo=True, config=None):  # fmt: skip
        import torch
        from verl.trainer.ppo import core_algos, ray_trainer

        from canonrl.registry import estimator_class

        name = adv_estimator.value if isinstance(adv_estimator, Enum) else adv_estimator
        canonrl_name = _canonrl_name_of(core_algos.ADV_ESTIMATOR_REGISTRY.get(name)) if isinstance(name, str) else None
        rows = _config_get(config, MULTI_TURN_ROWS_KEY, "final")
        if rows not in ("final", "all"):
            raise ValueError(f"algorithm.{MULTI_TURN_ROWS_KEY} must be 'final' or 'all', got {rows!r}")
        final, slot = final_session_rows(list(batch_keys))
        by_session = (canonrl_name is not None and rows == "final" and len(final) < len(batch_keys)
                      and estimator_class(canonrl_name).level == "sequence")  # fmt: skip
        arguments = dict(adv_estimator=adv_estimator, gamma=gamma, lam=lam, num_repeat=num_repeat,
                         norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo, config=config)  # fmt: skip
        if not by_session:
            return original(data, batch_keys, **arguments)
        # one advantage per session, from its final output's group statistics, on every row of the session
        final_data = ray_trainer.compute_advantage(data.select_idxs(final), **arguments)
        mask = final_data.batch["response_mask"]
        per_session = final_data.batch["advantages"][torch.arange(len(final)), mask.argmax(dim=1)]
        scores = per_session[torch.tensor(slot)].unsqueeze(-1) * data.batch["response_mask"]
        data.batch["advantages"] = scores
        data.batch["returns"] = scores
        return data

    compute_advantage_for_multi_trajectories.__wrapped__ = original
    compute_advantage_for_multi_trajectories.canonrl_patched = True
    return compute_advantage_for_multi_trajectories


#: The file in each verl checkpoint folder (``global_step_N``) that holds canonrl's estimator states.
ESTIMATOR_STATE_FILE = "canonrl_estimators.pt"


def estimator_states() -> list[dict[str, Any]]:
    """Every estimator this process has built for verl: its name, hyperparameters and ``state_dict`` (the step it
    counted, and a stateful estimator's history, e.g. HA-DW's anchor)."""
    return [{"name": name, "hyperparameters": _HYPERPARAMETERS[(name, params)], "state": est.state_dict()}
            for (name, params), est in _ESTIMATORS.items()]  # fmt: skip


def load_estimator_states(states: list[dict[str, Any]]) -> None:
    """Rebuild the estimators of :func:`estimator_states` and give each its saved state."""
    for entry in states:
        _estimator(entry["name"], entry["hyperparameters"]).load_state_dict(entry["state"])


def _checkpoint_folder(trainer: Any) -> str:
    """The ``global_step_N`` folder the trainer saves to, or loaded from (its ``global_steps`` is then N)."""
    config = trainer.config.trainer
    if _config_get(config, "resume_mode") == "resume_path" and _config_get(config, "resume_from_path"):
        folder = config.resume_from_path
    else:
        folder = os.path.join(config.default_local_dir, f"global_step_{trainer.global_steps}")
    return folder if os.path.isabs(folder) else os.path.join(os.getcwd(), folder)


def _make_saving(original: Any):
    def _save_checkpoint(self, *args, **kwargs):
        import torch

        result = original(self, *args, **kwargs)
        folder = _checkpoint_folder(self)
        os.makedirs(folder, exist_ok=True)
        torch.save(estimator_states(), os.path.join(folder, ESTIMATOR_STATE_FILE))
        return result

    _save_checkpoint.__wrapped__ = original
    _save_checkpoint.canonrl_patched = True
    return _save_checkpoint


def _make_loading(original: Any):
    def _load_checkpoint(self, *args, **kwargs):
        import torch

        result = original(self, *args, **kwargs)
        if getattr(self, "global_steps", 0):  # resumed: restore the states saved beside the weights
            path = os.path.join(_checkpoint_folder(self), ESTIMATOR_STATE_FILE)
            if os.path.exists(path):
                load_estimator_states(torch.load(path, weights_only=True))
        return result

    _load_checkpoint.__wrapped__ = original
    _load_checkpoint.canonrl_patched = True
    return _load_checkpoint


def _patch_checkpoints(trainer_cls: Any) -> None:
    """Save and restore canonrl's estimator states with the trainer's checkpoints (``ESTIMATOR_STATE_FILE``)."""
    for name, make in (("_save_checkpoint", _make_saving), ("_load_checkpoint", _make_loading)):
        method = trainer_cls.__dict__.get(name)
        if method is not None and not getattr(method, "canonrl_patched", False):
            _set(trainer_cls, name, make(method))


def _make_kept_entropy(original: Any):
    def _compute_old_log_prob(self, batch):
        old_log_prob, mfu = original(self, batch)
        if "entropys" in old_log_prob.batch.keys():
            old_log_prob.batch[KEPT_ENTROPY_KEY] = old_log_prob.batch["entropys"]
        return old_log_prob, mfu

    _compute_old_log_prob.__wrapped__ = original
    _compute_old_log_prob.canonrl_patched = True
    return _compute_old_log_prob


def _set(owner: Any, attribute: str, value: Any) -> None:
    key = (repr(owner), attribute)
    if key not in _ORIGINALS:
        _ORIGINALS[key] = (owner, attribute, getattr(owner, attribute))
    setattr(owner, attribute, value)


def patch_compute_advantage(*, keep_entropy: bool = True) -> None:
    """Make verl's dispatcher pass entropies, token ids, log-probs and the step to canonrl estimators (idempotent).

    Replaces ``verl.trainer.ppo.ray_trainer.compute_advantage`` (the legacy ``RayPPOTrainer`` path) and the name
    ``compute_advantage`` in ``verl.trainer.ppo.v1.utils`` (the v1 trainer's
    ``compute_advantage_for_multi_trajectories`` calls it). For estimator names not registered by canonrl the
    original runs unchanged.

    With ``keep_entropy`` (default) ``RayPPOTrainer._compute_old_log_prob`` is also wrapped to copy the entropies to
    the batch key ``canonrl_entropys`` before the legacy trainer pops ``entropys``; the patched dispatcher reads and
    then drops that key. The v1 trainer (verl 0.9's default) fetches only a fixed list of TransferQueue fields for
    its advantage step, so ``PPOTrainer._compute_advantage`` is wrapped too: when the configured estimator is
    canonrl's, the wrapper first reads the fields it needs (:data:`V1_FIELDS`: ``entropy``, ``responses``) from
    TransferQueue and hands them, with ``global_steps``, to the patched dispatcher.
    Must run in the process that runs the trainer (verl's ``TaskRunner`` Ray actor): set ``CANONRL_VERL_PATCH=1``
    to have the ``verl.plugins`` entry point do it at ``import verl``.
    """
    from verl.trainer.ppo import ray_trainer

    register_all()
    current = ray_trainer.compute_advantage
    if not getattr(current, "canonrl_patched", False):
        _set(ray_trainer, "compute_advantage", _make_patched(current))
    patched = ray_trainer.compute_advantage
    try:
        from verl.trainer.ppo.v1 import utils as v1_utils
        from verl.trainer.ppo.v1.trainer_base import PPOTrainer
    except ImportError:  # pragma: no cover - verl's v1 trainer needs TransferQueue (in canonrl[verl])
        v1_utils = None
    if v1_utils is not None:
        if not getattr(v1_utils.compute_advantage, "canonrl_patched", False):
            _set(v1_utils, "compute_advantage", patched)
        multi = v1_utils.compute_advantage_for_multi_trajectories
        if not getattr(multi, "canonrl_patched", False):
            multi = _make_multi_trajectories(multi)
            _set(v1_utils, "compute_advantage_for_multi_trajectories", multi)
        from verl.trainer.ppo.v1 import trainer_base

        if not getattr(trainer_base.compute_advantage_for_multi_trajectories, "canonrl_patched", False):
            _set(trainer_base, "compute_advantage_for_multi_trajectories", multi)  # imported there by name
        method = PPOTrainer.__dict__["_compute_advantage"]
        if not getattr(method, "canonrl_patched", False):
            _set(PPOTrainer, "_compute_advantage", _make_v1_compute_advantage(method))
        _patch_checkpoints(PPOTrainer)
    _patch_checkpoints(ray_trainer.RayPPOTrainer)
    if keep_entropy:
        trainer_cls = ray_trainer.RayPPOTrainer
        method = trainer_cls.__dict__.get("_compute_old_log_prob")
        if method is not None and not getattr(method, "canonrl_patched", False):
            _set(trainer_cls, "_compute_old_log_prob", _make_kept_entropy(method))


def unpatch_compute_advantage() -> None:
    """Undo :func:`patch_compute_advantage` (registrations stay)."""
    while _ORIGINALS:
        _, (owner, attribute, original) = _ORIGINALS.popitem()
        setattr(owner, attribute, original)


def is_patched() -> bool:
    from verl.trainer.ppo import ray_trainer

    return bool(getattr(ray_trainer.compute_advantage, "canonrl_patched", False))


# ------------------------------------------------------------------------------------------------------------------
# The ``verl.plugins`` entry point
# ------------------------------------------------------------------------------------------------------------------


def _plugin() -> dict[str, str]:
    """Register (and with ``CANONRL_VERL_PATCH=1`` patch). verl logs a failing plugin at debug level only, so a broken
    install would show as "unknown adv_estimator" later: a failure here is logged as an error and warned first."""
    try:
        names = register_all()
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


def __getattr__(attribute: str) -> Any:
    # verl's plugin loader only calls ``EntryPoint.load()``, i.e. imports the module and reads the attribute; it
    # never calls what it gets. Reading ``verl_plugin`` therefore does the registration (PEP 562 module getattr).
    if attribute == "verl_plugin":
        return _plugin()
    raise AttributeError(f"module {__name__!r} has no attribute {attribute!r}")
