"""canonrl advantages inside TRL's :class:`trl.GRPOTrainer`.

    from canonrl.integrations.trl import CanonGRPOConfig, GRPOTrainer
    args = CanonGRPOConfig(output_dir="out", advantage_estimator="canon", advantage_params={"split_by": "entropy"})
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=dataset)

TRL 1.16 has no advantage hook, so the subclass overrides two private methods (the pattern the TRL maintainers
suggest, trl#4525): ``_calculate_rewards`` keeps the gathered per-function rewards and
``_generate_and_score_completions`` calls ``super()`` and replaces ``output["advantages"]`` by canonrl's token-level
``[B, T]`` advantages, which ``_compute_loss`` accepts as is. Private methods change between TRL releases, so the
supported range is pinned in :data:`SUPPORTED_TRL` and checked at import.

Multi-turn and tool-using completions (``tools=``, ``environment_factory=``, or a ``rollout_func`` returning
``env_mask``) are one row per trajectory: TRL's ``tool_mask`` is 0 on tool-result tokens, and the model's turns are
the runs of ``completion_mask * tool_mask``. Step estimators get those runs as ``turn_ids`` and the outcome reward on
each row's last model token as ``token_rewards``; per-turn inputs TRL does not record (per-turn rewards, anchors,
players) come only from a subclass hook, :meth:`GRPOTrainer.canon_step_inputs` (docs/trl.md).

This is the only canonrl module that imports ``trl``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import trl
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from torch import Tensor

from canonrl.fields import Consumer
from canonrl.registry import Estimator, estimator_class, get_estimator
from canonrl.steps import mask_run_ids

#: TRL releases this integration is tested with (it overrides private GRPOTrainer methods).
SUPPORTED_TRL = ">=1.16,<1.17"

#: GRPOTrainer private methods this module overrides or calls.
_REQUIRED_METHODS = ("_calculate_rewards", "_generate_and_score_completions", "_get_per_token_logps_and_entropies")

#: Optional estimator inputs the trainer can provide (beyond rewards, group and mask).
#: what GRPOTrainer gives an estimator beyond rewards, group and mask, and how
TRL = Consumer(
    "GRPOTrainer",
    {
        "entropy": "the old-policy forward's per-token entropies",
        "logprobs": "the old-policy forward's per-token log-probs",
        "token_ids": "the completion ids",
        "ref_logprobs": "the reference model's per-token log-probs (beta > 0)",
        "turn_ids": "the model's turns: runs of completion_mask * tool_mask (one turn per completion without tools)",
    },
    missing="use the estimator in the canonrl library or lab, or with verl",
)

#: Per-turn inputs TRL 1.16 does not record but a :class:`GRPOTrainer` subclass may supply, one list per completion
#: with one value per model turn, by naming them in ``step_inputs`` and returning them from ``canon_step_inputs``.
HOOK_INPUTS = ("step_rewards", "anchor", "agent", "step_values", "step_labels")

_HOOK_MISSING = (
    "TRL 1.16 records no per-turn inputs: declare it in a GRPOTrainer subclass's step_inputs and return it from "
    "canon_step_inputs (docs/trl.md: multi-turn and tool-using completions), or use the estimator in the canonrl "
    "library or lab, or with verl"
)


def _consumer(step_inputs: tuple[str, ...], required: tuple[str, ...]) -> Consumer:
    """TRL's consumer plus the per-turn inputs a trainer subclass supplies through ``canon_step_inputs``; its advice
    for a missing input names the hook where the hook could supply it."""
    provides = dict(TRL.provides)
    provides.update({name: "from the trainer subclass's canon_step_inputs" for name in step_inputs})
    missing = [name for name in required if name not in provides and name not in ("rewards", "group", "mask")]
    advice = _HOOK_MISSING if missing and missing[0] in HOOK_INPUTS else TRL.missing
    return Consumer(TRL.name, provides, missing=advice)

#: Multimodal/forward extras TRL passes to ``_get_per_token_logps_and_entropies`` (copied from the output dict).
_FORWARD_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


def check_trl_version(version: str | None = None) -> None:
    """Raise ImportError if TRL lacks the hooks this module needs; warn if its version is outside SUPPORTED_TRL."""
    version = trl.__version__ if version is None else version
    missing = [m for m in _REQUIRED_METHODS if not hasattr(trl.GRPOTrainer, m)]
    if missing:
        raise ImportError(
            f"canonrl.integrations.trl needs trl{SUPPORTED_TRL}; trl {version} has no GRPOTrainer.{missing[0]}"
        )
    if Version(version) not in SpecifierSet(SUPPORTED_TRL, prereleases=True):
        warnings.warn(
            f"canonrl.integrations.trl is tested with trl{SUPPORTED_TRL}, found trl {version}: it overrides private "
            "GRPOTrainer methods that may have changed (run canonrl's tests/test_trl_integration.py to check)",
            UserWarning,
            stacklevel=2,
        )


check_trl_version()


def _build_estimator(name: str, params: dict[str, Any], step_inputs: tuple[str, ...] = ()) -> Estimator:
    """An estimator instance, with any configuration error turned into a one-line ValueError."""
    try:
        estimator_class(name)
        estimator = get_estimator(name, **params)
    except (TypeError, ValueError) as error:
        message = " ".join(str(error).split())
        raise ValueError(f"advantage_estimator={name!r}: {message}") from None
    layouts = type(estimator).layouts
    if type(estimator).level == "step" and "row-per-trajectory" not in layouts:
        raise ValueError(
            f"advantage_estimator={name!r}: a step estimator defined on {'/'.join(layouts)} rows; GRPOTrainer gives "
            "one row per completion whose steps are the model's turns (row-per-trajectory)"
        )
    try:
        return _consumer(step_inputs, tuple(estimator.required_inputs())).check(estimator)
    except ValueError as error:
        raise ValueError(f"advantage_estimator={name!r}: {error}") from None


@dataclass
class CanonGRPOConfig(trl.GRPOConfig):
    """:class:`trl.GRPOConfig` plus the canonrl estimator that replaces TRL's advantage computation.

    ``scale_rewards`` and ``multi_objective_aggregation`` no longer shape the advantages (the estimator does);
    ``reward_weights`` still weights the reward functions' sum.
    """

    advantage_estimator: str = field(
        default="canon", metadata={"help": "canonrl estimator name (see `canonrl estimators`), e.g. canon, grpo, ktae."}
    )
    advantage_params: dict | str = field(
        default_factory=dict,
        metadata={"help": "Estimator hyperparameters, a dict or a JSON string: '{\"metric\": \"entropy\"}'."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.advantage_params, str):
            try:
                self.advantage_params = json.loads(self.advantage_params) if self.advantage_params.strip() else {}
            except json.JSONDecodeError as error:
                raise ValueError(f"advantage_params is not valid JSON: {error}") from None
        if not isinstance(self.advantage_params, dict):
            raise ValueError(f"advantage_params must be a dict, got {type(self.advantage_params).__name__}")
        # per-turn inputs a trainer subclass may supply are checked by the trainer, which knows its step_inputs
        _build_estimator(self.advantage_estimator, self.advantage_params, HOOK_INPUTS)
        super().__post_init__()
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                "multi_objective_aggregation must be 'sum_then_normalize' with a canonrl advantage_estimator "
                f"(the estimator replaces TRL's normalization), got {self.multi_objective_aggregation!r}"
            )


class GRPOTrainer(trl.GRPOTrainer):
    """:class:`trl.GRPOTrainer` whose advantages come from a canonrl estimator (token-level, ``[B, T]``).

    Pass a :class:`CanonGRPOConfig` (a plain ``GRPOConfig`` gives ``canon`` with its defaults).

    Attributes set at each generation, for inspection and logging:
        estimator: the canonrl estimator instance.
        rewards_per_func: ``(N, n_funcs)`` per-function rewards gathered over processes (NaN = not applicable).
        advantage_inputs: the gathered batch fields the estimator read (``rewards``, ``group``, ``mask`` and its
            required inputs) and ``step``.
        canon_advantages: the gathered ``[N, T]`` advantages before slicing to this process.

    Step estimators (``level == "step"``, row-per-trajectory) get ``turn_ids``: the runs of
    ``completion_mask * tool_mask``, i.e. the model's turns between tool results (one turn per completion without
    tools), and ``token_rewards``: the outcome reward on each completion's last model token (turn rewards 0 before
    it). Per-turn inputs TRL does not record come from a subclass: name them in :attr:`step_inputs` and return them
    from :meth:`canon_step_inputs`.
    """

    #: The per-turn inputs (a subset of :data:`HOOK_INPUTS`) this class's :meth:`canon_step_inputs` returns.
    step_inputs: tuple[str, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_trl_version()
        unknown = [name for name in self.step_inputs if name not in HOOK_INPUTS]
        if unknown:
            raise ValueError(f"{type(self).__name__}.step_inputs: {unknown[0]!r} is not one of {list(HOOK_INPUTS)}")
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if hasattr(config, "advantage_estimator"):  # refuse before TRL loads the model
            _build_estimator(config.advantage_estimator, config.advantage_params or {}, self.step_inputs)
        super().__init__(*args, **kwargs)
        name = getattr(self.args, "advantage_estimator", "canon")
        params = getattr(self.args, "advantage_params", {}) or {}
        self.estimator = _build_estimator(name, params, self.step_inputs)
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError("multi_objective_aggregation must be 'sum_then_normalize' with a canonrl estimator")
        self.rewards_per_func: Tensor | None = None
        self.advantage_inputs: dict[str, Any] = {}
        self.canon_advantages: Tensor | None = None
        self._scored: tuple[Any, Any, Any] | None = None

    # -- the subclass hook for per-turn inputs -----------------------------------------------------------------

    def canon_step_inputs(self, inputs: list[dict], prompts: list, completions: list) -> dict[str, list]:
        """Per-turn inputs of this process's completions, for the names in :attr:`step_inputs`.

        Called once per generation batch, after the reward functions, with what TRL gave them: ``inputs`` (the
        dataset rows), ``prompts`` and ``completions`` (with tools, each a list of messages: an assistant message per
        model turn, the tool messages between them); ``self.environments`` holds the rollouts' environments when
        ``environment_factory`` is used. Return ``{name: one list per completion}``, each list holding one value per
        model turn (the runs of ``completion_mask * tool_mask``), e.g. ``{"step_rewards": [[0.0, 1.0], [1.0]]}``.
        Completions TRL masked out entirely (``mask_truncated_completions``) have no turns: their lists are ignored.
        """
        return {}

    # -- hooks -------------------------------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self.rewards_per_func = rewards_per_func
        self._scored = (inputs, prompts, completions)
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        self.rewards_per_func = None
        output = super()._generate_and_score_completions(inputs)
        if self.rewards_per_func is None:
            raise RuntimeError("GRPOTrainer._calculate_rewards was not called: this TRL version is not supported")
        output["advantages"] = self._canon_advantages(output)
        return output

    # -- internals ---------------------------------------------------------------------------------------------

    def _gather_tokens(self, tensor: Tensor, pad_value: float | int = 0) -> Tensor:
        """Right-pad a local ``[b, T]`` tensor to the longest T over processes and gather to ``[N, T_max]``."""
        if self.accelerator.num_processes == 1:
            return tensor
        tensor = self.accelerator.pad_across_processes(tensor, dim=1, pad_index=pad_value, pad_first=False)
        return self.accelerator.gather(tensor)

    @torch.no_grad()
    def _policy_logps_and_entropies(self, output: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Per-token log-probs and entropies ``[b, T]`` of the current policy on this process's completions."""
        from trl.models.utils import disable_gradient_checkpointing

        prompt_ids, prompt_mask = output["prompt_ids"], output["prompt_mask"]
        completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
        extras = {k: output[k] for k in _FORWARD_KEYS if output.get(k) is not None}
        mode = "train" if self.model.training else "eval"
        batch_size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            logps, entropies, _ = self._get_per_token_logps_and_entropies(
                self.model,
                torch.cat([prompt_ids, completion_ids], dim=1),
                torch.cat([prompt_mask, completion_mask], dim=1),
                completion_ids.size(1),
                batch_size=batch_size,
                compute_entropy=True,
                **extras,
            )
        return logps, entropies

    def _canon_advantages(self, output: dict[str, Any]) -> Tensor:
        mode = "train" if self.model.training else "eval"
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        rewards_per_func = self.rewards_per_func
        device = rewards_per_func.device
        completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
        local_rows, local_len = completion_ids.shape
        loss_mask = completion_mask if output.get("tool_mask") is None else completion_mask * output["tool_mask"]

        # Rewards exactly as TRL's sum_then_normalize sums them; rows where every function returned None are
        # unscorable: they get reward 0 and an empty mask, so they take no part in any statistic and get advantage 0.
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        rewards = (rewards_per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
        rewards = torch.where(unscorable, torch.zeros_like(rewards), rewards)
        # RepeatSampler yields each prompt num_generations times in a row; gathering keeps whole groups together.
        group = torch.arange(rewards.shape[0], device=device) // num_generations

        required = self.estimator.required_inputs()
        mask = self._gather_tokens(loss_mask)
        mask = mask * (~unscorable).unsqueeze(1).to(mask.dtype)
        fields: dict[str, Any] = {"rewards": rewards, "group": group, "mask": mask}
        if "token_ids" in required:
            fields["token_ids"] = self._gather_tokens(completion_ids, self._tokenizer.pad_token_id or 0)
        if "entropy" in required or ("logprobs" in required and output.get("old_per_token_logps") is None):
            logps, entropies = self._policy_logps_and_entropies(output)
            if "entropy" in required:
                fields["entropy"] = self._gather_tokens(entropies.float())
            if "logprobs" in required:
                fields["logprobs"] = self._gather_tokens(logps.float())
        elif "logprobs" in required:
            fields["logprobs"] = self._gather_tokens(output["old_per_token_logps"].float())
        if "ref_logprobs" in required:
            if output.get("ref_per_token_logps") is None:
                raise ValueError(
                    f"advantage_estimator={self.args.advantage_estimator!r} needs the reference model's log-probs, "
                    "which GRPOTrainer computes only with beta > 0 (set beta, e.g. 0.001)"
                )
            fields["ref_logprobs"] = self._gather_tokens(output["ref_per_token_logps"].float())
        if type(self.estimator).level == "step":
            fields.update(self._turn_fields(output, loss_mask, rewards))
        if type(self.estimator).multi_reward:
            # Each reward function is one component; a function that returned None for a row counts 0 there.
            # reward_weights are not applied: the multi-reward estimator weights its components itself.
            fields["rewards"] = torch.nan_to_num(rewards_per_func, nan=0.0)

        step = self.state.global_step + 1
        advantages = self.estimator(step=step, **fields)
        self.advantage_inputs = {**fields, "step": step}
        self.canon_advantages = advantages
        self._log_canon(advantages, fields["mask"], mode)

        start = self.accelerator.process_index * local_rows
        return advantages[start : start + local_rows, :local_len].to(torch.float32)

    def _turn_fields(self, output: dict[str, Any], loss_mask: Tensor, rewards: Tensor) -> dict[str, Any]:
        """``turn_ids`` (the runs of TRL's loss mask: the model's turns between tool results), ``token_rewards`` (the
        outcome reward on each row's last model token) and the subclass's per-turn inputs, gathered."""
        turn_ids = self._gather_tokens(mask_run_ids(loss_mask), pad_value=-1)
        has_turns = (turn_ids >= 0).any(-1)
        last = torch.where(turn_ids >= 0, torch.arange(turn_ids.shape[1], device=turn_ids.device), -1).amax(-1)
        token_rewards = torch.zeros(turn_ids.shape, dtype=torch.float32, device=turn_ids.device)
        rows = has_turns.nonzero().flatten()
        token_rewards[rows, last[rows]] = rewards.to(token_rewards.device).float()[rows]
        fields: dict[str, Any] = {"turn_ids": turn_ids, "token_rewards": token_rewards}
        if self.step_inputs:
            inputs, prompts, completions = self._scored
            given = self.canon_step_inputs(inputs, prompts, completions) or {}
            local_rows = loss_mask.shape[0]
            for name in self.step_inputs:
                values = given.get(name)
                if values is None or len(values) != local_rows:
                    raise ValueError(
                        f"{type(self).__name__}.canon_step_inputs must return {name!r} as one list per completion "
                        f"({local_rows} here), got {'nothing' if values is None else f'{len(values)} lists'}"
                    )
                values = [list(v) for v in values]
                if self.accelerator.num_processes > 1:
                    from accelerate.utils import gather_object

                    values = gather_object(values)
                # rows TRL masked out entirely have no turns: their per-turn values have nothing to attach to
                fields[name] = [v if keep else [] for v, keep in zip(values, has_turns.tolist(), strict=True)]
        return fields

    def _log_canon(self, advantages: Tensor, mask: Tensor, mode: str) -> None:
        """Replace the per-completion advantages TRL already logged by canonrl's (per-completion token mean)."""
        lengths = mask.sum(-1).clamp_min(1)
        per_completion = ((advantages * mask).sum(-1) / lengths).tolist()
        logged = self._logs.get("advantages") if isinstance(self._logs, dict) else None
        if logged is not None and len(logged) >= len(per_completion):
            n = len(per_completion)
            for i, value in enumerate(per_completion):
                logged[len(logged) - n + i] = value
        valid = mask.sum(-1) > 0
        if valid.any():
            mean = torch.tensor(per_completion)[valid.cpu()].mean()
            self._metrics[mode]["canonrl/advantage_mean"].append(float(mean))
            self._metrics[mode]["canonrl/advantage_abs_max"].append(float(advantages.abs().max()))


__all__ = ["HOOK_INPUTS", "SUPPORTED_TRL", "CanonGRPOConfig", "GRPOTrainer", "check_trl_version"]
