"""The lab's run configuration: a YAML file, then ``key=value`` overrides from the command line.

Every mistake a user can make here — an unknown key, a value of the wrong type, an unknown estimator, task or
policy, a hyperparameter the estimator does not have — becomes a one-line `ConfigError` naming the valid choices.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from canonrl.losses import KL_ESTIMATORS, LOSS_AGG_MODES, POLICY_LOSSES

#: `prompt_sampler` values: "fresh" draws new problems from the task every step; the others pick from a fixed pool
PROMPT_SAMPLERS = ("fresh", "uniform", "vade")
#: the `policy_loss_params` each policy loss takes (clip_low, clip_high, dual_clip are top-level keys)
POLICY_LOSS_PARAMS = {
    "ppo_clip": (),
    "clip_cov": ("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub"),
    "kl_cov": ("kl_cov_ratio", "ppo_kl_coef"),
}
#: `d3s` keys: the schedule's endpoints (required) and `d3s_keep`'s options
D3S_REQUIRED = ("n_init", "n_final", "k_init", "k_final")
D3S_OPTIONS = ("cross_group", "drop_constant", "keep_singletons", "per_row")


class ConfigError(ValueError):
    """A bad configuration value; the message is one line."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` as a string (a float needs a dot there); users mean a number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def _default_estimator_params() -> dict[str, Any]:
    return {"metric": "length", "mu": 1.0}


@dataclass
class TrainConfig:
    # what to train
    task: str = "lab"
    task_options: dict[str, Any] = field(default_factory=dict)
    policy: str = "lab-tiny"
    estimator: str = "canon"
    estimator_params: dict[str, Any] = field(default_factory=_default_estimator_params)
    label: str | None = None  # a name for this configuration in `canonrl compare` reports (default: estimator)
    seed: int = 0
    # rollouts
    steps: int = 200
    prompts_per_step: int = 16
    group_size: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 96
    # updates
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    ppo_epochs: int = 1
    minibatches: int = 1
    micro_batch_size: int = 32  # rows per forward/backward (similar lengths together); gradients accumulate
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float | None = 3.0
    policy_loss: str = "ppo_clip"  # ppo_clip | clip_cov | kl_cov (canonrl.losses.policy_loss)
    policy_loss_params: dict[str, Any] = field(default_factory=dict)  # e.g. clip_cov_ratio, kl_cov_ratio
    # which training prompts: "fresh" problems every step, or a sampler over a fixed pool of `prompt_pool` problems
    prompt_sampler: str = "fresh"
    prompt_sampler_params: dict[str, Any] = field(default_factory=dict)
    prompt_pool: int = 1024
    # D^3S down-sampling of rows and tokens (canonrl.selection.d3s_keep); None = off
    d3s: dict[str, Any] | None = None
    loss_agg: str = "seq-mean-token-sum-norm"
    loss_scale_factor: float | None = None  # seq-mean-token-sum-norm's constant; default max_new_tokens
    kl_coef: float = 0.0
    kl_estimator: str = "low_var_kl"
    grad_clip: float = 1.0
    # evaluation, checkpoints, logging
    eval_every: int = 20
    eval_problems: int = 128
    eval_samples: int = 4
    eval_seed: int = 1234  # the held-out problems: the same for every run, so runs compare on one set
    checkpoint_every: int = 20
    keep_checkpoints: int = 2
    verify_timeout: float = 2.0
    threads: int = 0  # torch CPU threads; 0 = all cores
    tensorboard: bool = True

    def validate(self) -> "TrainConfig":
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
        if (self.prompts_per_step * self.group_size) % self.minibatches:
            raise ConfigError(
                f"minibatches ({self.minibatches}) must divide prompts_per_step x group_size ({self.prompts_per_step * self.group_size})"
            )
        self._validate_policy_loss()
        self._validate_prompt_sampler()
        self.d3s_schedule(1)
        self.build_estimator()
        return self

    def _validate_policy_loss(self) -> None:
        import torch

        from canonrl.losses import policy_loss

        if self.policy_loss not in POLICY_LOSSES:
            raise ConfigError(f"unknown policy_loss {self.policy_loss!r}; choose from {', '.join(POLICY_LOSSES)}")
        allowed = POLICY_LOSS_PARAMS[self.policy_loss]
        unknown = sorted(set(self.policy_loss_params) - set(allowed))
        if unknown:
            choices = ", ".join(allowed) if allowed else "none (clip_low, clip_high, dual_clip are top-level keys)"
            raise ConfigError(
                f"policy_loss {self.policy_loss!r} has no parameter {', '.join(map(repr, unknown))}; it takes {choices}"
            )
        for key, value in self.policy_loss_params.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"policy_loss_params.{key} must be a number, got {value!r}")
        try:  # the loss's own checks (ratio in (0, 1], lb < ub, ...) on a one-token batch
            one = torch.zeros(1, 1)
            policy_loss(self.policy_loss, one, one, one, torch.ones(1, 1), **self.loss_params())
        except (TypeError, ValueError) as error:
            raise ConfigError(f"policy_loss {self.policy_loss!r}: {_one_line(error)}") from None

    def loss_params(self) -> dict[str, Any]:
        """The keyword arguments of `canonrl.losses.policy_loss` for the configured loss (without a generator)."""
        params = {key: float(value) for key, value in self.policy_loss_params.items()}
        if self.policy_loss in ("ppo_clip", "clip_cov"):
            params.update(clip_low=self.clip_low, clip_high=self.clip_high, dual_clip=self.dual_clip)
        return params

    def _validate_prompt_sampler(self) -> None:
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
        self.build_prompt_sampler()

    def build_prompt_sampler(self, seed: int = 0):
        """The configured pool sampler (None for "fresh"); bad parameters become one-line ConfigErrors."""
        from canonrl.prompt_sampling import make_prompt_sampler

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
        from canonrl.selection import d3s_schedule

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
_MAPPINGS = ("task_options", "estimator_params", "policy_loss_params", "prompt_sampler_params", "d3s")


def _unknown_key(key: str) -> ConfigError:
    return ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(FIELDS)}")


def _coerce(key: str, value: Any) -> Any:
    """Check a value against the field's declared type (YAML already parsed numbers and booleans)."""
    kind = FIELDS[key].type
    if value is None:
        if "None" in kind:
            return None
        raise ConfigError(f"{key} cannot be null")
    if kind.startswith("dict"):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return value
    if kind.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if kind.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if kind.startswith("bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if kind.startswith("str"):
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    return value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings; values are parsed as YAML; ``estimator_params.mu=0.5`` sets one entry."""
    values = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. estimator=grpo, estimator_params.mu=0.5)")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("+")
        try:
            value = _parse_yaml(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: value is not valid YAML") from None
        head, _, rest = key.partition(".")
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
            loaded = _parse_yaml(path.read_text()) or {}
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
