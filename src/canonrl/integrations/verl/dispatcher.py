"""verl's dispatcher ``compute_advantage`` for canonrl estimators: it reads from the batch what verl's own dispatcher
never passes (entropies, token ids, log-probs, values, per-turn fields, the global step) and calls the estimator.

:func:`estimator_name` says whether a configured ``adv_estimator`` is canonrl's; :func:`canonrl_compute_advantage`
is the call for those; :func:`make_patched` wraps verl's dispatcher so that it routes canonrl names there and
every other name to verl unchanged.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from canonrl.integrations.verl.adapter import (
    BATCH_KEYS,
    NON_TENSOR_KEYS,
    _canonrl_name_of,
    reward_keys,
    stack_reward_components,
)

#: The batch key the ``keep_entropy`` patch copies the legacy trainer's entropies to before verl pops ``entropys``.
KEPT_ENTROPY_KEY = "canonrl_entropys"


def estimator_name(adv_estimator: Any) -> str | None:
    """The canonrl estimator behind verl's ``algorithm.adv_estimator`` (a name or verl's enum), or None when the
    name is verl's own or another plugin's."""
    from verl.trainer.ppo import core_algos

    name = adv_estimator.value if isinstance(adv_estimator, Enum) else adv_estimator
    return _canonrl_name_of(core_algos.ADV_ESTIMATOR_REGISTRY.get(name)) if isinstance(name, str) else None


def extra_inputs(data: Any) -> dict[str, Any]:
    """The estimator inputs a ``DataProto`` holds beyond rewards, group and mask (:data:`BATCH_KEYS`,
    :data:`NON_TENSOR_KEYS`, ``meta_info["global_steps"]``)."""
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


def canonrl_compute_advantage(data: Any, adv_estimator: Any, config: Any = None) -> Any:
    """Write canonrl's ``advantages`` and ``returns`` into ``data.batch`` for the canonrl estimator registered as
    ``adv_estimator``, with every input the batch holds; returns ``data`` (verl's dispatcher contract). A batch in
    verl-agent's row-per-step layout (``record_step_index`` ran on it) goes to
    :func:`canonrl.integrations.verl_agent.compute_advantage`."""
    from verl.trainer.ppo import core_algos

    name = adv_estimator.value if isinstance(adv_estimator, Enum) else adv_estimator
    canonrl_name = estimator_name(name)
    if canonrl_name is None:
        raise ValueError(f"algorithm.adv_estimator={name!r} is not a canonrl estimator registered with verl")
    from canonrl.integrations import verl_agent

    if verl_agent.STEP_INDEX_KEY in data.non_tensor_batch:  # verl-agent's row-per-step layout: record_step_index ran
        step = (data.meta_info or {}).get("global_steps")
        return verl_agent.compute_advantage(data, canonrl_name, config, step=None if step is None else int(step))
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
    kwargs.update(extra_inputs(data))
    keys = reward_keys(config)
    if keys is not None and estimator_is_multi_reward(canonrl_name):
        kwargs["reward_components"] = stack_reward_components(
            len(data), keys, data.non_tensor_batch.get, "the batch's non_tensor_batch"
        )
    advantages, returns = core_algos.ADV_ESTIMATOR_REGISTRY[name](**kwargs)
    data.batch["advantages"] = advantages
    data.batch["returns"] = returns
    if KEPT_ENTROPY_KEY in data.batch.keys():
        data.batch.pop(KEPT_ENTROPY_KEY)  # only kept for the advantage; do not ship it to the actor update
    return data


def make_patched(original: Any):
    """verl's ``compute_advantage`` signature: canonrl estimators through :func:`canonrl_compute_advantage`, every
    other name through ``original``."""

    def compute_advantage(data, adv_estimator, gamma: float = 1.0, lam: float = 1.0, num_repeat: int = 1,
                          norm_adv_by_std_in_grpo: bool = True, config=None):  # fmt: skip
        if estimator_name(adv_estimator) is None:
            return original(data, adv_estimator=adv_estimator, gamma=gamma, lam=lam, num_repeat=num_repeat,
                            norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo, config=config)  # fmt: skip
        return canonrl_compute_advantage(data, adv_estimator, config)

    compute_advantage.__wrapped__ = original
    compute_advantage.canonrl_patched = True
    compute_advantage.__doc__ = "verl's compute_advantage, patched by canonrl to pass extra inputs to its estimators."
    return compute_advantage


def estimator_is_multi_reward(name: str) -> bool:
    from canonrl.registry import estimator_class

    return estimator_class(name).multi_reward


def make_kept_entropy(original: Any):
    """The legacy trainer's ``_compute_old_log_prob``, also copying ``entropys`` to :data:`KEPT_ENTROPY_KEY`
    (the legacy trainer pops ``entropys`` before its advantage step)."""

    def _compute_old_log_prob(self, batch):
        old_log_prob, mfu = original(self, batch)
        if "entropys" in old_log_prob.batch.keys():
            old_log_prob.batch[KEPT_ENTROPY_KEY] = old_log_prob.batch["entropys"]
        return old_log_prob, mfu

    _compute_old_log_prob.__wrapped__ = original
    _compute_old_log_prob.canonrl_patched = True
    return _compute_old_log_prob
