"""The lab's run configuration: a YAML file, then ``key=value`` overrides from the command line.

Every mistake a user can make here — an unknown key, a value of the wrong type, an unknown estimator, task or
policy, a hyperparameter the estimator does not have — becomes a one-line `ConfigError` naming the valid choices.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from canonrl.lab.critic import CRITICS
from canonrl.lab.multi_turn import Branching
from canonrl.lab.policy import resolve_device
from canonrl.lab.windowed import parse_context
from canonrl.overrides import OverrideError, parse_override, parse_yaml
from canonrl.registry import estimator_class, param
from canonrl.training.losses import KL_ESTIMATORS, LOSS_AGG_MODES
from canonrl.training.policy_losses import ClipRange, PolicyLoss, get_loss, loss_names
from canonrl.training.prompt_sampling import make_prompt_sampler
from canonrl.training.selection import d3s_schedule

#: `prompt_sampler` values: "fresh" draws new problems from the task every step; the others pick from a fixed pool
PROMPT_SAMPLERS = ("fresh", "uniform", "vade")
#: `turn_order` values: one update over all turns, or SeeUPO's sequential updates from the last turn to the first
TURN_ORDERS = ("joint", "reverse")
#: `d3s` keys: the schedule's endpoints (required) and `d3s_keep`'s options
D3S_REQUIRED = ("n_init", "n_final", "k_init", "k_final")
D3S_OPTIONS = ("cross_group", "drop_constant", "keep_singletons", "per_row")


class ConfigError(ValueError):
    """A bad configuration value; the message is one line."""


def _default_estimator_params() -> dict[str, Any]:
    return {"split_by": "length", "mu": 1.0}


def mapping(help: str, factory: Callable[[], dict] = dict) -> Any:
    """A mapping-valued config field (a fresh default per instance) with a one-line help text."""
    return field(default_factory=factory, metadata={"help": help})


@dataclass
class TrainConfig:
    """A lab run. Every field is a config key (YAML or ``key=value``); its help is the docs' key table
    (`key_table`). Fields are grouped by concern; `validate` holds the cross-field rules."""

    # ---- what to train
    task: str = param("lab", "`lab`, `rg:<dataset>` (reasoning-gym), `boxed[:<dataset>]` (math-verify), or any registered task")
    task_options: dict[str, Any] = mapping("keyword arguments of the task")
    policy: str = param("auto", "auto (the task's shipped policy: lab-grid-tiny for grid, else lab-tiny), a preset (`lab-tiny`, `lab-grid-tiny`, `smollm2-135m-instruct`), a local Hugging Face model directory, or a model id in the local Hugging Face cache")
    estimator: str = param("canon", "any name from `canonrl estimators`")
    estimator_params: dict[str, Any] = mapping("the estimator's hyperparameters (default for canon: split_by length, mu 1.0)", _default_estimator_params)
    label: str | None = param(None, "the name of this configuration in `canonrl compare` reports (default: the estimator)")
    seed: int = param(0, "every random draw of a run derives from it (and the step)")
    # ---- rollouts
    steps: int = param(200, "training steps")
    prompts_per_step: int = param(16, "problems per step")
    group_size: int = param(8, "G: sampled responses per problem")
    temperature: float = param(1.0, "sampling temperature (also of the training forward's log-probs)")
    top_p: float = param(1.0, "nucleus sampling threshold")
    max_new_tokens: int = param(96, "the response budget in tokens")
    players: int = param(1, "players per game, for a multi-turn task with a multi-player mode (task=grid players=2: a race; each game's players are consecutive rows of a group)")
    context: str = param("full", "multi-turn tasks: `full` (one row per episode) or `window:K` (one row per step, its prompt the last K turns)")
    branching: dict[str, Any] | None = param(None, "branched episodes for the tree estimators (multi-turn tasks): {at: [turns], width: copies}; group_size = roots x width^len(at) (null: none)")
    # ---- the critic (GAE and the other critic estimators)
    critic: str = param("none", "`none`, `head` (a value head on the policy's last hidden state) or `separate` (a copy of the initial policy with a value head); the critic estimators (gae, sae) need one")
    critic_lr: float | None = param(None, "the critic's AdamW learning rate (null: 1e-3 for a head, 1e-4 for a separate model)")
    critic_epochs: int = param(4, "passes of the value loss over each step's rows")
    critic_warmup: int = param(0, "steps that train the critic alone before the policy's first update (VC-PPO)")
    value_clip: float = param(0.5, "verl's cliprange_value: how far a prediction may move from its sampling-time value before the loss clips")
    # ---- updates
    lr: float = param(2e-4, "AdamW learning rate")
    weight_decay: float = param(0.0, "AdamW weight decay")
    warmup_steps: int = param(0, "linear learning-rate warm-up steps")
    ppo_epochs: int = param(1, "passes over each batch; with 1 epoch and 1 minibatch the update is on-policy and needs no second forward pass")
    minibatches: int = param(1, "optimizer steps per epoch (must divide prompts_per_step x group_size)")
    micro_batch_size: int = param(32, "rows per forward/backward inside a minibatch (similar lengths together; gradients accumulate)")
    clip_low: float = param(0.2, "PPO clip below 1 (losses that clip: ppo_clip, clip_cov)")
    clip_high: float = param(0.28, "PPO clip above 1 (DAPO's clip-higher)")
    dual_clip: float | None = param(3.0, "verl's dual clip c for A < 0 (null: off)")
    policy_loss: str = param("ppo_clip", "a registered policy loss (`canonrl.training.policy_losses`): ppo_clip, clip_cov, kl_cov")
    policy_loss_params: dict[str, Any] = mapping("the policy loss's own parameters, e.g. clip_cov_ratio, kl_cov_ratio")
    loss_agg: str = param("seq-mean-token-sum-norm", "verl's loss aggregation: token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm (Dr.GRPO)")
    loss_scale_factor: float | None = param(None, "seq-mean-token-sum-norm's constant (null: max_new_tokens)")
    turn_order: str = param("joint", "multi-turn tasks: `joint` (one update over every turn) or `reverse` (SeeUPO: one update per turn position, the last turn first)")
    kl_coef: float = param(0.0, "weight of the KL to a frozen copy of the initial policy (0: off)")
    kl_estimator: str = param("low_var_kl", "the KL estimate: low_var_kl, k1, k2")
    grad_clip: float = param(1.0, "gradient-norm clipping")
    # ---- which training prompts and which tokens train
    prompt_sampler: str = param("fresh", "`fresh` problems every step, or `uniform` / `vade` picks from a fixed pool")
    prompt_sampler_params: dict[str, Any] = mapping("the pool sampler's parameters (vade: epsilon, ...)")
    prompt_pool: int = param(1024, "problems in the pool of a pool sampler")
    d3s: dict[str, Any] | None = param(None, "D^3S down-sampling of rows and tokens: {n_init, n_final, k_init, k_final} and options (null: off)")
    # ---- evaluation, checkpoints, logging
    eval_every: int = param(20, "steps between held-out evaluations (0: only at the end)")
    eval_problems: int = param(128, "held-out problems")
    eval_samples: int = param(4, "samples per held-out problem (mean@k)")
    eval_seed: int = param(1234, "the held-out problems' seed: the same for every run, so runs compare on one set")
    checkpoint_every: int = param(20, "steps between atomic checkpoints (0: none)")
    keep_checkpoints: int = param(2, "checkpoints kept")
    verify_timeout: float = param(2.0, "seconds a verifier may take per response; past it the reward is 0")
    device: str = param("auto", "where the policy runs: auto (CUDA when torch sees one, else the CPU), cpu, cuda, cuda:N")
    threads: int = param(0, "torch CPU threads (0: all cores)")
    tensorboard: bool = param(True, "write tensorboard logs")

    def validate(self) -> TrainConfig:
        """`check_values`, then build the estimator, the policy loss and the prompt sampler once each to check their
        parameters (a caller that builds them anyway can call `check_values` alone); returns self."""
        self.check_values()
        self.build_policy_loss()
        self.build_prompt_sampler()
        self.build_estimator()
        return self

    def check_values(self) -> None:
        """Every rule on the values and between them, without building a component (one-line ConfigErrors)."""
        positive = ("steps", "prompts_per_step", "group_size", "max_new_tokens", "ppo_epochs", "minibatches",
                    "eval_problems", "eval_samples", "keep_checkpoints", "micro_batch_size", "prompt_pool")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every", "threads", "warmup_steps", "kl_coef", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.verify_timeout > 0:
            raise ConfigError(f"verify_timeout must be > 0, got {self.verify_timeout}")
        if self.loss_agg not in LOSS_AGG_MODES:
            raise ConfigError(f"unknown loss_agg {self.loss_agg!r}; choose from {', '.join(LOSS_AGG_MODES)}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(f"unknown kl_estimator {self.kl_estimator!r}; choose from {', '.join(KL_ESTIMATORS)}")
        if self.players < 1 or self.group_size % self.players:
            raise ConfigError(f"players must be >= 1 and divide group_size ({self.group_size}), got {self.players}")
        if (self.prompts_per_step * self.group_size) % self.minibatches:
            raise ConfigError(
                f"minibatches ({self.minibatches}) must divide prompts_per_step x group_size ({self.prompts_per_step * self.group_size})"
            )
        try:
            resolve_device(self.device)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        self._check_policy_loss()
        self._check_prompt_sampler()
        self._check_critic()
        if self.turn_order not in TURN_ORDERS:
            raise ConfigError(f"unknown turn_order {self.turn_order!r}; choose from {', '.join(TURN_ORDERS)}")
        self.build_branching()
        self.context_window()
        self.d3s_schedule(1)

    def _check_critic(self) -> None:
        if self.critic not in CRITICS:
            raise ConfigError(f"unknown critic {self.critic!r}; choose from {', '.join(CRITICS)}")
        if self.critic_epochs < 1:
            raise ConfigError(f"critic_epochs must be >= 1, got {self.critic_epochs}")
        if self.critic_warmup < 0:
            raise ConfigError(f"critic_warmup must be >= 0, got {self.critic_warmup}")
        if not self.value_clip > 0:
            raise ConfigError(f"value_clip must be > 0, got {self.value_clip}")
        if self.critic_lr is not None and not self.critic_lr > 0:
            raise ConfigError(f"critic_lr must be > 0, got {self.critic_lr}")
        try:
            reads_values = estimator_class(self.estimator).critic
        except (KeyError, ValueError):
            return  # an unknown estimator: build_estimator names the choices
        if reads_values and self.critic == "none":
            raise ConfigError(f"estimator {self.estimator!r} reads a critic's values: set critic=head or critic=separate")
        if not reads_values and self.critic != "none":
            raise ConfigError(
                f"critic={self.critic} trains on a critic estimator's value targets, and estimator {self.estimator!r} "
                "reads no values: use critic=none, or a critic estimator (gae, sae)"
            )

    def context_window(self) -> int | None:
        """K of ``context=window:K``; None for ``context=full``."""
        try:
            window = parse_context(self.context)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if window is not None and self.branching is not None:
            raise ConfigError("branching copies whole episodes (context=full); it does not combine with context=window:K")
        return window

    def build_branching(self) -> Branching | None:
        """The rollout's `Branching` (None when off); bad keys and a group_size it does not divide are one-line errors."""
        if self.branching is None:
            return None
        unknown = sorted(set(self.branching) - {"at", "width"})
        if unknown or set(self.branching) != {"at", "width"}:
            raise ConfigError(f"branching takes exactly the keys at (a list of turns) and width; got {sorted(self.branching)}")
        at, width = self.branching["at"], self.branching["width"]
        if isinstance(at, int) and not isinstance(at, bool):
            at = [at]
        if not isinstance(at, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in at):
            raise ConfigError(f"branching.at must be a list of turn numbers, got {at!r}")
        if isinstance(width, bool) or not isinstance(width, int):
            raise ConfigError(f"branching.width must be an integer, got {width!r}")
        try:
            branching = Branching(tuple(at), width)
            branching.roots(self.group_size)
        except ValueError as error:
            raise ConfigError(_one_line(error)) from None
        return branching

    def _check_policy_loss(self) -> None:
        for key, value in self.policy_loss_params.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"policy_loss_params.{key} must be a number, got {value!r}")
        self.clip_range()

    def clip_range(self) -> ClipRange:
        """PPO's clip range from `clip_low`, `clip_high` and `dual_clip` (for the losses that clip)."""
        try:
            return ClipRange(self.clip_low, self.clip_high, self.dual_clip)
        except ValueError as error:
            raise ConfigError(_one_line(error)) from None

    def build_policy_loss(self) -> PolicyLoss:
        """The configured policy loss (`canonrl.training.policy_losses`); unknown names and parameters are one-line errors."""
        if self.policy_loss not in loss_names():
            raise ConfigError(f"unknown policy_loss {self.policy_loss!r}; choose from {', '.join(loss_names())}")
        params = {key: float(value) for key, value in self.policy_loss_params.items()}
        try:
            return get_loss(self.policy_loss, **params)
        except TypeError as error:  # an unknown parameter: the message names the loss
            raise ConfigError(_one_line(error)) from None
        except ValueError as error:
            raise ConfigError(f"policy_loss {self.policy_loss!r}: {_one_line(error)}") from None

    def _check_prompt_sampler(self) -> None:
        if self.prompt_sampler not in PROMPT_SAMPLERS:
            raise ConfigError(
                f"unknown prompt_sampler {self.prompt_sampler!r}; choose from {', '.join(PROMPT_SAMPLERS)}"
            )
        if self.prompt_sampler == "fresh":
            if self.prompt_sampler_params:
                raise ConfigError("prompt_sampler 'fresh' takes no prompt_sampler_params")
            return
        if self.prompts_per_step > self.prompt_pool:
            raise ConfigError(
                f"prompts_per_step ({self.prompts_per_step}) must be <= prompt_pool ({self.prompt_pool}) with "
                f"prompt_sampler {self.prompt_sampler!r}"
            )

    def build_prompt_sampler(self, seed: int = 0):
        """The configured pool sampler (None for "fresh"); bad parameters become one-line ConfigErrors."""
        if self.prompt_sampler == "fresh":
            return None
        try:
            return make_prompt_sampler(self.prompt_sampler, self.prompt_pool, seed, **self.prompt_sampler_params)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"prompt_sampler {self.prompt_sampler!r}: {_one_line(error)}") from None

    def d3s_options(self) -> dict[str, Any]:
        """`d3s_keep`'s keyword options from the `d3s` mapping (empty when D^3S is off)."""
        return {key: value for key, value in (self.d3s or {}).items() if key in D3S_OPTIONS}

    def d3s_schedule(self, step: int) -> tuple[int, float] | None:
        """(N responses kept per group, K fraction of tokens kept) at `step` (progress (step-1)/(steps-1));
        None when D^3S is off. Checks the `d3s` mapping (one-line ConfigErrors)."""
        if self.d3s is None:
            return None
        unknown = sorted(set(self.d3s) - set(D3S_REQUIRED) - set(D3S_OPTIONS))
        if unknown:
            raise ConfigError(
                f"unknown d3s key {', '.join(map(repr, unknown))}; valid keys: {', '.join(D3S_REQUIRED + D3S_OPTIONS)}"
            )
        missing = [key for key in D3S_REQUIRED if key not in self.d3s]
        if missing:
            raise ConfigError(f"d3s needs {', '.join(D3S_REQUIRED)}; missing {', '.join(missing)}")
        for key in D3S_OPTIONS:
            if key in self.d3s and not isinstance(self.d3s[key], bool):
                raise ConfigError(f"d3s.{key} must be true or false, got {self.d3s[key]!r}")
        for key in ("k_init", "k_final"):
            value = self.d3s[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"d3s.{key} must be a number, got {value!r}")
        progress = (step - 1) / (self.steps - 1) if self.steps > 1 else 0.0
        try:
            return d3s_schedule(
                min(max(progress, 0.0), 1.0), **{key: self.d3s[key] for key in D3S_REQUIRED}
            )
        except ValueError as error:
            raise ConfigError(f"d3s: {_one_line(error)}") from None

    def build_estimator(self):
        """The configured estimator; unknown names and hyperparameters become one-line ConfigErrors."""
        import canonrl

        names = [info.name for info in canonrl.estimators()]
        if self.estimator not in names:
            raise ConfigError(f"unknown estimator {self.estimator!r}; choose from {', '.join(names)}")
        try:
            return canonrl.get_estimator(self.estimator, **self.estimator_params)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"estimator {self.estimator!r}: {_one_line(error)}") from None

    @property
    def name(self) -> str:
        return self.label or self.estimator

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = typing.get_type_hints(TrainConfig)
_MAPPINGS = ("task_options", "estimator_params", "policy_loss_params", "prompt_sampler_params", "d3s", "branching")


def _unknown_key(key: str) -> ConfigError:
    return ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(FIELDS)}")


def _coerce(key: str, value: Any) -> Any:
    """Check a value against the field's annotation (YAML already parsed numbers and booleans); ints pass as floats."""
    kind = _TYPES[key]
    optional = type(None) in typing.get_args(kind)
    if optional:
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} cannot be null")
    base = typing.get_origin(kind) or kind
    if base is dict and not isinstance(value, dict):
        raise ConfigError(f"{key} must be a mapping, got {value!r}")
    if base in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float) if base is float else int)):
        raise ConfigError(f"{key} must be {'a number' if base is float else 'an integer'}, got {value!r}")
    if base is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if base is str and not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return float(value) if base is float else value


def key_table() -> str:
    """The markdown table of every config key: its default and its help (docs/lab.md holds it)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(TrainConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = "null" if default is None else yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        rows.append(f"| `{f.name}` | `{shown}` | {f.metadata['help']} |")
    return "\n".join(rows) + "\n"


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings; values are parsed as YAML; ``estimator_params.mu=0.5`` sets one entry."""
    values = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    for item in overrides:
        try:
            head, rest, value = parse_override(item, "estimator=grpo, estimator_params.mu=0.5")
        except OverrideError as error:
            raise ConfigError(str(error)) from None
        if head not in FIELDS:
            raise _unknown_key(head)
        if rest:
            if head not in _MAPPINGS:
                raise ConfigError(f"{head} has no sub-keys; dotted keys work for {', '.join(_MAPPINGS)}")
            values[head] = {**(values.get(head) or {}), rest: value}
        else:
            values[head] = value
    return values


def load_config(path: Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Defaults, then the YAML file (if any), then the overrides; validated."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = parse_yaml(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {_one_line(error)}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
        values.update(loaded)
    params_given_whole = "estimator_params" in values or any(
        item.split("=", 1)[0].strip().lstrip("+") == "estimator_params" for item in overrides
    )
    values = apply_overrides(values, list(overrides))
    if not params_given_whole:
        # the default estimator keeps its configured defaults under dotted overrides; another starts from its own
        default_estimator = values.get("estimator", TrainConfig.estimator) == TrainConfig.estimator
        base = _default_estimator_params() if default_estimator else {}
        values["estimator_params"] = {**base, **values.get("estimator_params", {})}
    for key in values:
        if key not in FIELDS:
            raise _unknown_key(key)
    config = TrainConfig(**{key: _coerce(key, value) for key, value in values.items()})
    return config.validate()


def save_config(config: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
