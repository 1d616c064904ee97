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

from canonrl.losses import KL_ESTIMATORS, LOSS_AGG_MODES


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
                    "eval_problems", "eval_samples", "keep_checkpoints", "micro_batch_size")  # fmt: skip
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
        self.build_estimator()
        return self

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
_MAPPINGS = ("task_options", "estimator_params")


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
            values.setdefault(head, {})
            values[head] = {**values[head], rest: value}
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
