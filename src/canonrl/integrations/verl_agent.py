"""canonrl's step estimators on verl-agent's row-per-step batches (GiGPO, HGPO and the other row-per-step estimators).

verl-agent (github.com/langfengQ/verl-agent, a hard fork of verl 0.3, not on PyPI; read at commit ``20bd331``) has no
estimator registry to plug into: this module gives the two functions a verl-agent user wires into its trainer. Like
:mod:`canonrl.integrations.verl` it imports nothing from verl at module import; it reads only ``data.batch``
(a TensorDict or a dict of tensors), ``data.non_tensor_batch`` (a dict of numpy arrays, one entry per row) and
``data.meta_info``, so verl's and verl-agent's ``DataProto`` both work.

**The layout.** One batch row per environment step. ``TrajectoryCollector.gather_rollout_data``
(``agent_system/multi_turn_rollout/rollout_loop.py``) appends, environment after environment, each environment's
active steps in time order, with ``non_tensor_batch`` keys ``uid`` (the prompt group: ``env.rollout.n``
environments share one), ``traj_uid`` (the trajectory), ``anchor_obs`` (the observation the step starts from:
GiGPO's anchor state), ``rewards`` (the step's environment reward) and ``active_masks``; the reward manager
(``agent_system/reward_manager/episode.py``) puts the episode reward on the last response token of every step row
(``token_level_scores`` -> ``token_level_rewards``). Then ``RayPPOTrainer.fit`` (``verl/trainer/ppo/ray_trainer.py``)
calls ``adjust_batch`` (``agent_system/multi_turn_rollout/utils.py``), which appends copies of random rows until the
batch size divides the data-parallel sizes, and ``_balance_batch``, which reorders the rows -- both *before*
``compute_advantage``. After that, batch order no longer gives a step's time position, and a duplicated row is
indistinguishable from a real step (the official GiGPO counts the copies twice in its group and anchor statistics;
steps.md §5.3).

**The hook.** :func:`record_step_index` writes ``non_tensor_batch["canonrl_step_index"]``: each row's position in its
trajectory, read from the rollout order. Call it once, on the rollout batch, before ``adjust_batch``: in
``RayPPOTrainer.fit`` right after ``batch = gen_batch_output`` (or at the end of
``TrajectoryCollector.multi_turn_loop``, on the ``DataProto`` that ``gather_rollout_data`` returns). Copies made
later carry their original's index, so canonrl's core counts a repeated ``(traj_uid, step_index)`` once and gives
every copy the step's advantage, whatever the order of the rows.

**The advantage.** :func:`compute_advantage` replaces verl-agent's dispatch for ``gigpo`` / ``hgpo`` (and serves
canonrl's other row-per-step estimators: ``trloo``, ``igpo``, ``srgpo``, ``mapo_dialogue``). It reads the keys of
:class:`VerlAgentKeys` (verl-agent's names by default), computes the step returns itself from the raw per-step
``rewards`` in ``step_index`` order (verl-agent's precomputed ``batch["step_rewards"]`` returns are not read) and
writes ``batch["advantages"]`` and ``batch["returns"]``. Hyperparameters come from the ``algorithm`` config as in
:func:`canonrl.integrations.verl.hyperparameters_from_config` (``algorithm.<name>.<param>``); verl-agent's own keys
are honoured: ``algorithm.gamma`` is the discount when ``algorithm.<name>.gamma`` is not set (verl-agent discounts
its step returns with ``algorithm.gamma``), ``history_length=config.env.history_length`` is HGPO's K, and the
verl-agent-only keys ``gigpo.enable_similarity`` (must be false), ``gigpo.similarity_thresh`` and
``hgpo.weight_type`` (never read by verl-agent's code) are accepted and ignored.

Wiring, in ``RayPPOTrainer.fit`` of verl-agent's ``verl/trainer/ppo/ray_trainer.py``::

    from canonrl.integrations import verl_agent as canonrl_verl_agent
    ...
    batch = gen_batch_output
    canonrl_verl_agent.record_step_index(batch)        # before adjust_batch / _balance_batch
    ...
    # in place of the call batch = compute_advantage(batch, ...) (which gets no config):
    batch = canonrl_verl_agent.compute_advantage(batch, self.config.algorithm.adv_estimator,
                                                 config=self.config.algorithm,
                                                 history_length=self.config.env.get("history_length"))

Config lines, as in verl-agent's scripts::

    algorithm.adv_estimator=gigpo algorithm.gamma=0.95 algorithm.gigpo.step_advantage_w=1.0 \
        algorithm.gigpo.mode=mean_norm +algorithm.gigpo.episode_stats=steps

Differences from verl-agent worth knowing (docs/verl-agent.md): duplicated rows count once; time order is
``step_index``; constant groups give exactly 0 (``+algorithm.gigpo.numerics=upstream`` keeps the official float32
noise); the invalid-action penalty that verl-agent's ``apply_invalid_action_penalty`` subtracts from the *discounted*
``batch["step_rewards"]`` is not read (it still reaches the episode part through ``token_level_rewards``); subtract it
from ``non_tensor_batch["rewards"]`` to have it in the step returns (then it is also discounted into earlier steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from canonrl.fields import Consumer
from canonrl.integrations.verl import adapter

__all__ = ["STEP_INDEX_KEY", "ESTIMATORS", "VerlAgentKeys", "VERL_AGENT", "record_step_index", "compute_advantage"]

#: The ``non_tensor_batch`` key :func:`record_step_index` writes.
STEP_INDEX_KEY = "canonrl_step_index"

#: The canonrl estimators :func:`compute_advantage` runs on verl-agent's layout (step-level, defined row-per-step,
#: reading nothing beyond what the layout gives): :func:`estimator_names` with the registry of this release.
ESTIMATORS: tuple[str, ...] = ("gigpo", "hgpo", "igpo", "mapo_dialogue", "srgpo", "trloo")


@dataclass(frozen=True)
class VerlAgentKeys:
    """Where :func:`compute_advantage` reads each input (verl-agent's names by default)."""

    group: str = "uid"  # non_tensor_batch: the prompt group of the row
    traj: str = "traj_uid"  # non_tensor_batch: the trajectory of the row
    step_index: str = STEP_INDEX_KEY  # non_tensor_batch: written by record_step_index
    anchor: str = "anchor_obs"  # non_tensor_batch: the anchor state of the step
    step_rewards: str = "rewards"  # non_tensor_batch: the step's raw environment reward
    active: str = "active_masks"  # non_tensor_batch: True on every row gather_rollout_data keeps
    token_level_rewards: str = "token_level_rewards"  # batch: the episode reward on the row's last response token
    response_mask: str = "response_mask"  # batch: 1 on the response tokens


#: what verl-agent's batch gives a canonrl estimator beyond rewards, group and mask
VERL_AGENT = Consumer(
    "verl-agent",
    {
        "traj": "non_tensor_batch 'traj_uid'",
        "step_index": "non_tensor_batch 'canonrl_step_index' (record_step_index after the rollout)",
        "step_rewards": "non_tensor_batch 'rewards' (each step's environment reward)",
        "anchor": "non_tensor_batch 'anchor_obs'",
    },
    missing="verl-agent's batch has no such key: add it in the rollout, or use the library directly",
)

#: verl-agent's own ``algorithm.<name>`` keys that canonrl does not take: key -> the only accepted value (None: any)
_VERL_AGENT_ONLY: dict[str, dict[str, Any]] = {
    "gigpo": {"enable_similarity": False, "similarity_thresh": None},
    "hgpo": {"weight_type": "length"},
}


def _where(rows: Any) -> str:
    import torch

    from canonrl.batch import describe_rows

    return describe_rows(torch.as_tensor(rows, dtype=torch.bool))


def _column(data: Any, key: str, caller: str, hint: str) -> Any:
    import numpy as np

    non_tensor = getattr(data, "non_tensor_batch", None)
    if non_tensor is None or key not in non_tensor:
        raise ValueError(f"{caller}: non_tensor_batch has no {key!r} ({hint})")
    values = np.asarray(non_tensor[key])
    if values.ndim == 0 or values.shape[0] != _rows(data):
        raise ValueError(f"{caller}: non_tensor_batch[{key!r}] must hold one entry per row ({_rows(data)} rows)")
    return values


def _rows(data: Any) -> int:
    batch = getattr(data, "batch", None)
    if batch is not None:
        size = getattr(batch, "batch_size", None)
        if size is not None and len(size):
            return int(size[0])
        for value in batch.values():
            return int(value.shape[0])
    non_tensor = getattr(data, "non_tensor_batch", None) or {}
    for value in non_tensor.values():
        return len(value)
    return 0


def _is_none(values: Any) -> Any:
    """[N] bool: the entries of a 1-D ``non_tensor_batch`` column that are None."""
    import numpy as np

    if values.dtype != object:
        return np.zeros(values.shape[0], dtype=bool)
    try:
        flags = np.asarray(values == None, dtype=bool)  # noqa: E711 (elementwise on an object array)
        if flags.shape == values.shape[:1]:
            return flags
    except (TypeError, ValueError):  # entries that are arrays compare elementwise themselves
        pass
    return np.fromiter((v is None for v in values), dtype=bool, count=values.shape[0])


def rollout_positions(traj_uid: Any) -> Any:
    """[N] int64: each row's position among the rows of its trajectory, in row order (its within-trajectory rank by
    row index: :meth:`canonrl.groups.Grouping.rank`)."""
    import torch

    from canonrl.batch import encode_groups
    from canonrl.groups import Grouping

    n = len(traj_uid)
    codes, count = encode_groups(traj_uid, n, torch.device("cpu")) if n else (torch.zeros(0, dtype=torch.long), 0)
    trajectories = Grouping(codes, torch.ones(n, dtype=torch.bool), count)
    return trajectories.rank(torch.arange(n)).numpy().astype("int64")


def record_step_index(data: Any, *, traj_key: str = "traj_uid", active_key: str = "active_masks") -> Any:
    """Write ``data.non_tensor_batch["canonrl_step_index"]``: each row's position in its trajectory (0, 1, ...), in
    the order the rollout appended the rows. Returns ``data`` (modified in place).

    Call it once on the rollout batch, before verl-agent's ``adjust_batch`` duplicates rows and ``_balance_batch``
    reorders them: in ``RayPPOTrainer.fit`` right after ``batch = gen_batch_output``. Calling it again on the same,
    unreordered batch is a no-op; on a batch whose rows moved since, it raises (the recorded positions are the true
    ones, the new order is not). Rows with a missing (None) ``traj_uid`` and, when ``active_masks`` is present,
    inactive rows (which ``gather_rollout_data`` drops) are errors naming the rows.
    """
    import numpy as np

    caller = "record_step_index(data)"
    traj = _column(data, traj_key, caller, "verl-agent's trajectory id, set by the rollout loop")
    missing = _is_none(traj)
    if missing.any():
        raise ValueError(f"{caller}: non_tensor_batch[{traj_key!r}] is None at rows {_where(missing)}")
    if active_key in data.non_tensor_batch:
        active = _column(data, active_key, caller, "")
        inactive = ~np.asarray(active, dtype=bool)
        if inactive.any():
            raise ValueError(
                f"{caller}: non_tensor_batch[{active_key!r}] is False at rows {_where(inactive)}; record the step "
                f"index on the batch gather_rollout_data returns (it keeps only active steps)"
            )
    positions = rollout_positions(traj)
    recorded = data.non_tensor_batch.get(STEP_INDEX_KEY)
    if recorded is not None:
        recorded = np.asarray(recorded)
        if recorded.shape == positions.shape and (recorded == positions).all():
            return data
        moved = recorded != positions if recorded.shape == positions.shape else np.ones(len(positions), bool)
        raise ValueError(
            f"{caller}: {STEP_INDEX_KEY!r} was already recorded and rows {_where(moved)} no longer sit at their "
            f"recorded positions (rows were duplicated or reordered since); record it once, right after the rollout"
        )
    data.non_tensor_batch[STEP_INDEX_KEY] = positions
    return data


# ------------------------------------------------------------------------------------------------------------------
# The advantage
# ------------------------------------------------------------------------------------------------------------------


def estimator_names() -> tuple[str, ...]:
    """Every registered canonrl estimator that runs on verl-agent's layout: step-level, defined row-per-step, and
    reading nothing beyond :data:`VERL_AGENT` provides."""
    from canonrl.registry import estimator_class, estimators

    names = []
    for info in estimators():
        cls = estimator_class(info.name)
        if cls.level == "step" and "row-per-step" in cls.layouts and not VERL_AGENT.missing_inputs(cls.requires):
            names.append(info.name)
    return tuple(names)


def _name(adv_estimator: Any) -> str:
    name = adv_estimator.value if isinstance(adv_estimator, Enum) else adv_estimator
    if not isinstance(name, str):
        raise ValueError(f"compute_advantage: adv_estimator must be an estimator name, got {adv_estimator!r}")
    return name[len("canonrl_") :] if name.startswith("canonrl_") else name


def hyperparameters(name: str, config: Any = None, *, history_length: int | None = None) -> dict[str, Any]:
    """canonrl estimator ``name``'s hyperparameters from verl-agent's ``algorithm`` config: ``algorithm.<name>`` and
    ``algorithm.canonrl_<name>`` as in :func:`canonrl.integrations.verl.hyperparameters_from_config`, less verl-agent's
    own keys canonrl does not take; ``algorithm.gamma`` and ``history_length`` (verl-agent's
    ``env.history_length``) fill ``gamma`` / ``history_length`` where ``algorithm.<name>`` does not set them."""
    from collections.abc import Mapping

    from canonrl.registry import estimator_class


    valid = {h.name for h in estimator_class(name).info().hyperparameters}
    plain: dict[str, Any] = {}
    for key in (name, f"canonrl_{name}"):
        sub = adapter.plain_config(adapter.config_get(config, key))
        if sub is None:
            continue
        if isinstance(sub, Mapping):
            sub = dict(sub)
            for only, accepted in _VERL_AGENT_ONLY.get(name, {}).items():
                if only in sub and only not in valid:
                    value = sub.pop(only)
                    if accepted is not None and value != accepted:
                        raise ValueError(
                            f"algorithm.{key}.{only}={value!r} is not supported by canonrl's {name!r} (only "
                            f"{accepted!r}); for similarity clustering, cluster the anchors in the rollout and store "
                            f"the cluster ids in anchor_obs"
                        )
        plain[key] = sub
    found = adapter.hyperparameters_from_config(name, plain)
    gamma = adapter.plain_config(adapter.config_get(config, "gamma"))
    if "gamma" in valid and "gamma" not in found and gamma is not None:
        found["gamma"] = float(gamma)
    if "history_length" in valid and "history_length" not in found and history_length is not None:
        found["history_length"] = int(history_length)
    return found


def compute_advantage(
    data: Any,
    adv_estimator: Any = "gigpo",
    config: Any = None,
    *,
    history_length: int | None = None,
    keys: VerlAgentKeys = VerlAgentKeys(),
    step: int | None = None,
) -> Any:
    """canonrl estimator ``adv_estimator`` (``gigpo``, ``hgpo``, ..., or ``canonrl_<name>``; a verl-agent
    ``AdvantageEstimator`` member works too) on a verl-agent batch; writes ``data.batch["advantages"]`` and
    ``data.batch["returns"]`` ([bs, response_length], 0 off the response mask) and returns ``data``.

    ``config`` is verl-agent's ``algorithm`` config (see :func:`hyperparameters`); ``history_length`` its
    ``env.history_length`` (HGPO's K). Inputs: the group, trajectory, step index, anchor and per-step reward from
    ``non_tensor_batch`` and the episode reward ``token_level_rewards.sum(-1)`` from ``batch`` (names in ``keys``).
    The batch must carry the step index of :func:`record_step_index`, recorded before ``adjust_batch``; rows may
    then be duplicated and in any order. ``step`` (default ``meta_info["global_steps"]``) is the trainer step.
    """
    import numpy as np
    import torch

    name = _name(adv_estimator)
    supported = estimator_names()
    if name not in supported:
        raise ValueError(
            f"compute_advantage: canonrl estimator {name!r} does not run on verl-agent's row-per-step layout; "
            f"choose from {', '.join(supported)}"
        )
    caller = "compute_advantage(data)"
    if keys.step_index not in getattr(data, "non_tensor_batch", {}):
        raise ValueError(
            f"{caller}: non_tensor_batch has no {keys.step_index!r}: call "
            f"canonrl.integrations.verl_agent.record_step_index(batch) right after the rollout, before adjust_batch"
        )
    est = VERL_AGENT.check(adapter.cached_estimator(name, hyperparameters(name, config, history_length=history_length)))
    batch = data.batch
    if keys.token_level_rewards not in batch.keys():
        raise ValueError(f"{caller}: batch has no {keys.token_level_rewards!r} (the reward manager's episode reward)")
    token_level_rewards = batch[keys.token_level_rewards]
    if keys.response_mask in batch.keys():
        mask = batch[keys.response_mask]
    elif "responses" in batch.keys() and "attention_mask" in batch.keys():  # verl's compute_response_mask
        mask = batch["attention_mask"][:, -batch["responses"].shape[1] :]
    else:
        raise ValueError(f"{caller}: batch has no {keys.response_mask!r} (nor 'responses' and 'attention_mask')")
    step_index = _column(data, keys.step_index, caller, "")
    try:
        step_index = torch.from_numpy(np.asarray(step_index, dtype=np.int64))
    except (TypeError, ValueError):
        raise ValueError(f"{caller}: non_tensor_batch[{keys.step_index!r}] must hold integers") from None
    fields: dict[str, Any] = {
        "rewards": token_level_rewards.sum(-1).float(),
        "group": _ids(data, keys.group, caller, "the prompt group"),
        "mask": mask,
        "traj": _ids(data, keys.traj, caller, "the trajectory id"),
        "step_index": step_index.to(mask.device),
    }
    needs = est.required_inputs()
    if "step_rewards" in needs:
        rewards = _column(data, keys.step_rewards, caller, "each step's environment reward")
        try:
            rewards = np.asarray(rewards, dtype=np.float32)
        except (TypeError, ValueError):
            raise ValueError(f"{caller}: non_tensor_batch[{keys.step_rewards!r}] must hold numbers") from None
        fields["step_rewards"] = torch.from_numpy(rewards).to(mask.device)
    if "anchor" in needs:
        fields["anchor"] = _ids(data, keys.anchor, caller, "each step's anchor state", hashable=True)
    if step is None:
        step = (getattr(data, "meta_info", None) or {}).get("global_steps")
    advantages, returns = est.compute_with_returns(step=None if step is None else int(step), **fields)
    if token_level_rewards.dtype.is_floating_point and advantages.dtype != token_level_rewards.dtype:
        advantages, returns = advantages.to(token_level_rewards.dtype), returns.to(token_level_rewards.dtype)
    batch["advantages"] = advantages
    batch["returns"] = returns
    return data


def _ids(data: Any, key: str, caller: str, meaning: str, *, hashable: bool = False) -> list:
    """A ``non_tensor_batch`` id column as a list of hashable ids (arrays, lists and dicts made hashable as
    verl-agent's ``to_hashable`` does); None entries are an error naming the rows."""
    values = _column(data, key, caller, meaning)
    missing = _is_none(values) if values.ndim == 1 else None
    if missing is not None and missing.any():
        raise ValueError(f"{caller}: non_tensor_batch[{key!r}] is None at rows {_where(missing)}")
    if values.ndim > 1:  # e.g. image anchors stacked by numpy into one array
        return [tuple(v.reshape(-1).tolist()) for v in values]
    out = values.tolist()
    if hashable:
        try:
            hash(tuple(out))
        except TypeError:
            out = [_hashable(v) for v in out]
    return out


def _hashable(x: Any) -> Any:
    import numpy as np

    if isinstance(x, np.ndarray):
        return tuple(x.reshape(-1).tolist())
    if isinstance(x, (list, tuple)):
        return tuple(_hashable(e) for e in x)
    if isinstance(x, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in x.items()))
    return x
