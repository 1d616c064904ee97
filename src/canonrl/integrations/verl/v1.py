"""canonrl estimators in verl's v1 trainer (verl 0.9's default, ``trainer.use_v1=true``).

The v1 trainer keeps its rows in TransferQueue, and its ``PPOTrainer._compute_advantage`` fetches a fixed field
list (``uid, response_mask, rm_scores, rollout_log_probs, old_log_probs, ref_log_prob, values``). For a canonrl
estimator, :func:`advantage_step` replaces that step: the same KL-in-reward, rollout correction and write-back, and
in addition

- the TransferQueue fields the estimator needs (:data:`V1_FIELDS`: ``entropy``, ``responses``, ``canonrl_*``);
- from each row's ``extra_fields`` (where the agent loop stores them): per-turn ``turn_scores``, ``anchor_obs``,
  ``agent`` (or their ``canonrl_*`` keys, :data:`NON_TENSOR_KEYS`) and the reward components a multi-reward
  estimator reads (``reward_extra_info``);
- multi-turn rows grouped by agent-loop session (:data:`MULTI_TURN_ROWS_KEY`).

Two ways in. verl's own seam: :func:`register_trainers` registers ``canonrl_sync``, ``canonrl_colocate_async`` and
``canonrl_separate_async`` in the v1 trainer registry (``trainer.v1.trainer_mode=canonrl_sync``); each is verl's
trainer of that mode with this advantage step and canonrl's estimator states in its checkpoints, and no global
patch. Or the patch (:func:`canonrl.integrations.verl.patch_compute_advantage`), which routes verl's own trainers
here for canonrl names.
"""

from __future__ import annotations

from typing import Any

from canonrl.integrations.verl.adapter import (
    BATCH_KEYS,
    NON_TENSOR_KEYS,
    REWARD_KEYS_KEY,
    cached_estimator,
    config_get,
    hyperparameters_from_config,
    reward_keys,
)
from canonrl.integrations.verl.checkpoints import load_estimator_states_of, save_estimator_states_of
from canonrl.integrations.verl.dispatcher import KEPT_ENTROPY_KEY, canonrl_compute_advantage, estimator_name

#: canonrl batch field -> the TransferQueue field the v1 trainer stores it under (entropies are written there by
#: ``_compute_old_log_prob``, response ids by the agent loop, ``canonrl_*`` fields by the user's agent loop).
V1_FIELDS: dict[str, str] = {
    "entropy": "entropy",
    "token_ids": "responses",
    "metric": "canonrl_metric",
    "human_values": "canonrl_human_values",
    "turn_ids": "canonrl_turn_ids",
}

#: the batch key :func:`canonrl_compute_advantage` reads each fetched field from (:data:`BATCH_KEYS`)
_BATCH_KEY = {"entropy": KEPT_ENTROPY_KEY, **{field: BATCH_KEYS[field][0] for field in V1_FIELDS if field != "entropy"}}

#: ``algorithm.<key>``: which rows of a multi-turn v1 batch a canonrl sequence-level estimator groups — "final" (each
#: agent-loop session's final output, broadcast to its other rows, as verl does for its own GRPO) or "all" (every
#: turn row, verl's default for other estimators)
MULTI_TURN_ROWS_KEY = "canonrl_multi_turn_rows"

#: the names :func:`register_trainers` registers, and verl's trainer mode each one runs as
TRAINER_MODES = {"canonrl_sync": "sync", "canonrl_colocate_async": "colocate_async",
                 "canonrl_separate_async": "separate_async"}  # fmt: skip


# ------------------------------------------------------------------------------------------------------------------
# The advantage step
# ------------------------------------------------------------------------------------------------------------------


def advantage_step(trainer: Any, batch: Any, metrics: dict) -> Any:
    """verl 0.9's ``PPOTrainer._compute_advantage`` for a canonrl estimator (its steps 1, 2 and 4 as verl has
    them; tests/test_verl_v1_trainer.py pins them against verl's own step), with the estimator's extra inputs."""
    import numpy as np
    from verl.trainer.ppo.v1 import trainer_base as tb  # the names verl's own step uses

    tq, algorithm = tb.tq, trainer.config.algorithm
    fields = ["uid", "response_mask", "rm_scores", "rollout_log_probs", "old_log_probs", "ref_log_prob", "values"]
    data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
    response_mask = data["response_mask"]
    data = tb.DataProto(batch=data.to_padded_tensor())
    data.batch["token_level_scores"] = data.batch["rm_scores"]
    data.non_tensor_batch["uid"] = np.array(data.batch.pop("uid").tolist(), dtype=object)
    if algorithm.use_kl_in_reward:
        data, kl_metrics = tb.apply_kl_penalty(data, kl_ctrl=trainer.kl_ctrl_in_reward, kl_penalty=algorithm.kl_penalty)
        metrics.update(kl_metrics)
    else:
        data.batch["token_level_rewards"] = data.batch["token_level_scores"]
    rollout_corr_config = algorithm.get("rollout_correction", None)
    bypass = rollout_corr_config and rollout_corr_config.get("bypass_mode", False)
    rollout_correction = rollout_corr_config is not None and "rollout_log_probs" in data.batch and not bypass
    if rollout_correction:
        data, is_metrics = tb.compute_rollout_correction_and_add_to_batch(data, rollout_corr_config)
        metrics.update(is_metrics)

    add_estimator_inputs(trainer, batch, data)
    data = multi_trajectories(data, batch.keys, algorithm.adv_estimator, config=algorithm)

    written = ["advantages", "returns"]
    if algorithm.use_kl_in_reward:
        written.append("token_level_rewards")
    if rollout_correction:
        written.append("response_mask")
        if "rollout_is_weights" in data.batch:
            written.append("rollout_is_weights")
    output = {field: tb.response_to_nested(data.batch[field], response_mask) for field in written}
    output = tb.TensorDict(output, batch_size=len(batch))
    return tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=output)


def add_estimator_inputs(trainer: Any, batch: Any, data: Any) -> None:
    """Put into ``data`` what the configured canonrl estimator reads beyond verl's fixed fields: TransferQueue
    tensors into ``data.batch``, the rows' ``extra_fields`` entries into ``data.non_tensor_batch``, and the step."""
    import numpy as np
    import torch.nn.functional as F
    from verl.trainer.ppo.v1 import trainer_base

    algorithm = trainer.config.algorithm
    name = estimator_name(algorithm.adv_estimator)
    est = cached_estimator(name, hyperparameters_from_config(name, algorithm))
    tq, keys, partition = trainer_base.tq, batch.keys, batch.partition_id
    width = data.batch["response_mask"].shape[1]
    wanted = [f for f in V1_FIELDS if f in est.required_inputs() or (f == "turn_ids" and type(est).level == "step")]
    if wanted:
        # TransferQueue answers a request for a field some row lacks with an empty TensorDict, not an error
        fetched = tq.kv_batch_get(keys=keys, partition_id=partition, select_fields=[V1_FIELDS[f] for f in wanted])
        for field in wanted:
            if V1_FIELDS[field] not in fetched.keys():
                if field == "turn_ids":
                    continue  # optional: the runs of response_mask are the turns
                raise ValueError(
                    f"canonrl estimator {name!r} needs the TransferQueue field {V1_FIELDS[field]!r} in verl's v1 "
                    f"trainer, which the rows of this batch lack; 'entropy' exists only when old log-probs are "
                    f"recomputed (not with algorithm.rollout_correction.bypass_mode=true)"
                )
            value = fetched[V1_FIELDS[field]]
            value = value.to_padded_tensor(0) if getattr(value, "is_nested", False) else value
            data.batch[_BATCH_KEY[field]] = F.pad(value, (0, width - value.shape[1])) if value.dim() == 2 else value
    row_infos = _extra_fields(tq, keys, partition) if _reads_extra_fields(est, algorithm) else None
    if row_infos is not None:
        for candidates in NON_TENSOR_KEYS.values():
            for key in candidates:
                if all(key in info for info in row_infos):
                    data.non_tensor_batch[key] = _object_array([info[key] for info in row_infos])
                    break
        for key in reward_keys(algorithm) or []:
            rewards = [_reward_extra_info(info) for info in row_infos]
            if all(key in info for info in rewards):
                data.non_tensor_batch[key] = np.array([info[key] for info in rewards], dtype=object)
            elif type(est).multi_reward:
                raise ValueError(
                    f"canonrl estimator {name!r}: reward component {key!r} (algorithm.{REWARD_KEYS_KEY}) is missing "
                    f"from the rows' extra_fields['reward_extra_info'] in TransferQueue"
                )
    step = getattr(trainer, "global_steps", None)
    if step is not None:
        data.meta_info["global_steps"] = int(step)


def _reads_extra_fields(est: Any, algorithm: Any) -> bool:
    return type(est).level == "step" or (type(est).multi_reward and reward_keys(algorithm) is not None)


def _extra_fields(tq: Any, keys: list[str], partition: str) -> list[dict]:
    """Each row's ``extra_fields`` dict (TransferQueue may wrap it as NonTensorData); {} for a row without."""
    from collections.abc import Mapping

    fetched = tq.kv_batch_get(keys=keys, partition_id=partition, select_fields=["extra_fields"])
    if "extra_fields" not in fetched.keys():
        return [{} for _ in keys]
    rows = [getattr(row, "data", row) for row in fetched["extra_fields"]]
    return [dict(row) if isinstance(row, Mapping) else {} for row in rows]


def _reward_extra_info(extra_fields: dict) -> dict:
    info = extra_fields.get("reward_extra_info", {})
    return getattr(info, "data", info) or {}


def _object_array(values: list) -> Any:
    """One object per row (a per-turn list stays one entry, not a second array dimension)."""
    import numpy as np

    out = np.empty(len(values), dtype=object)
    out[:] = [getattr(v, "data", v) for v in values]
    return out


# ------------------------------------------------------------------------------------------------------------------
# Multi-turn rows
# ------------------------------------------------------------------------------------------------------------------


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


def multi_trajectories(data: Any, batch_keys: list[str], adv_estimator: Any, config: Any = None) -> Any:
    """canonrl's advantages on a v1 batch whose agent-loop sessions may have several output rows: a sequence-level
    estimator groups each session once (its final output, broadcast to the session's rows) unless
    ``algorithm.canonrl_multi_turn_rows=all``; step-level and token-level estimators see every row."""
    import torch

    from canonrl.registry import estimator_class

    rows = config_get(config, MULTI_TURN_ROWS_KEY, "final")
    if rows not in ("final", "all"):
        raise ValueError(f"algorithm.{MULTI_TURN_ROWS_KEY} must be 'final' or 'all', got {rows!r}")
    final, slot = final_session_rows(list(batch_keys))
    level = estimator_class(estimator_name(adv_estimator)).level
    if rows == "all" or len(final) == len(batch_keys) or level != "sequence":
        return canonrl_compute_advantage(data, adv_estimator, config)
    final_data = canonrl_compute_advantage(data.select_idxs(final), adv_estimator, config)
    mask = final_data.batch["response_mask"]
    per_session = final_data.batch["advantages"][torch.arange(len(final)), mask.argmax(dim=1)]
    scores = per_session[torch.tensor(slot)].unsqueeze(-1) * data.batch["response_mask"]
    data.batch["advantages"] = scores
    data.batch["returns"] = scores
    return data


def make_multi_trajectories(original: Any):
    """verl's ``compute_advantage_for_multi_trajectories`` signature: canonrl names through
    :func:`multi_trajectories`, every other name through ``original``."""

    def compute_advantage_for_multi_trajectories(data, batch_keys, adv_estimator, gamma=1.0, lam=1.0, num_repeat=1,
                                                 norm_adv_by_std_in_grpo=True, config=None):  # fmt: skip
        if estimator_name(adv_estimator) is None:
            return original(data, batch_keys, adv_estimator=adv_estimator, gamma=gamma, lam=lam,
                            num_repeat=num_repeat, norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo, config=config)  # fmt: skip
        return multi_trajectories(data, batch_keys, adv_estimator, config=config)

    compute_advantage_for_multi_trajectories.__wrapped__ = original
    compute_advantage_for_multi_trajectories.canonrl_patched = True
    return compute_advantage_for_multi_trajectories


def make_v1_compute_advantage(original: Any):
    """verl's ``PPOTrainer._compute_advantage``: canonrl names through :func:`advantage_step`, others unchanged."""

    def _compute_advantage(self, batch, metrics):
        if estimator_name(self.config.algorithm.adv_estimator) is None:
            return original(self, batch, metrics)
        return advantage_step(self, batch, metrics)

    _compute_advantage.__wrapped__ = original
    _compute_advantage.canonrl_patched = True
    return _compute_advantage


# ------------------------------------------------------------------------------------------------------------------
# The opt-in trainers (verl's v1 trainer registry)
# ------------------------------------------------------------------------------------------------------------------


class CanonrlAdvantageStep:
    """Mixed into one of verl's v1 trainers: canonrl estimators get :func:`advantage_step`, every other estimator
    verl's own; canonrl's estimator states go into (and come back from) each checkpoint. Registered as
    ``canonrl_<mode>``, the trainer runs as verl's ``<mode>`` (verl's code compares ``trainer_mode`` with its own
    names, so the config's ``trainer.v1.trainer_mode`` is set back to ``<mode>`` once the class is chosen)."""

    verl_mode = "sync"

    def __init__(self, config: Any, *args: Any, **kwargs: Any):
        from omegaconf import open_dict

        with open_dict(config):
            config.trainer.v1.trainer_mode = self.verl_mode
        super().__init__(config, *args, **kwargs)

    def _compute_advantage(self, batch, metrics):
        if estimator_name(self.config.algorithm.adv_estimator) is None:
            return super()._compute_advantage(batch, metrics)
        return advantage_step(self, batch, metrics)

    def _save_checkpoint(self, *args, **kwargs):
        result = super()._save_checkpoint(*args, **kwargs)
        save_estimator_states_of(self)
        return result

    def _load_checkpoint(self, *args, **kwargs):
        result = super()._load_checkpoint(*args, **kwargs)
        load_estimator_states_of(self)
        return result


def register_trainers() -> dict[str, type]:
    """Register canonrl's v1 trainers (:data:`TRAINER_MODES`) with verl's ``register_trainer`` (idempotent)."""
    from verl.trainer.ppo.v1 import trainer_base
    from verl.trainer.ppo.v1.trainer_colocate_async import PPOTrainerColocateAsync
    from verl.trainer.ppo.v1.trainer_separate_async import PPOTrainerSeparateAsync
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    bases = {"sync": PPOTrainerSync, "colocate_async": PPOTrainerColocateAsync,
             "separate_async": PPOTrainerSeparateAsync}  # fmt: skip
    registered = {}
    for name, mode in TRAINER_MODES.items():
        cls = trainer_base.TRAINER_REGISTRY.get(name)
        if cls is None:
            base = bases[mode]
            cls = type(f"Canonrl{base.__name__}", (CanonrlAdvantageStep, base),
                       {"verl_mode": mode, "__module__": __name__, "__doc__": CanonrlAdvantageStep.__doc__})  # fmt: skip
            trainer_base.register_trainer(name)(cls)
        registered[name] = cls
    return registered
