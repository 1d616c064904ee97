"""Property-based tests (hypothesis) over random batches, for every registered estimator.

Each estimator is run in several configurations (its defaults plus known variants; CANON over metrics, mu values
and alpha < 1). Random batches have 0..40 rows and 1..12 tokens, group ids drawn from a small pool of
non-contiguous ids in arbitrary order (unequal groups, singletons), given as an int tensor, a list of strings, a
list of ints or a numpy array; masks of random lengths, left/right padded, non-contiguous or fully masked; rewards
binary (0/1 or -1/+1), on a grid, or arbitrary finite float32 values with |r| <= 1e3; finite entropies (padding
positions hold 0, garbage or NaN, which the library must ignore).

Float comparisons use a tolerance derived from the conditioning of the batch: float32 rounding of the rewards
(about eps32 * max|r|) divided by the smallest denominator the estimator divides by (group std + eps, batch std,
whitening std), so that an ill-conditioned example (two rewards one ulp apart in a group) cannot fail spuriously
while a real error (of the order of the advantages themselves) still does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import canonrl
from canonrl.methods._schedules import ACCURACY_SCHEDULES

EPS32 = float(np.finfo(np.float32).eps)
#: Safety factor on the float32 error estimates (a few roundings per reduction, up to 40 rows).
SLACK = 64.0
RTOL = SLACK * EPS32
#: The trainer step passed to every call (past the cosine schedules' warm-up).
STEP = 37

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
#: Multiplies every test's number of examples (e.g. CANONRL_PROPERTY_EXAMPLES=20 for a long local run); the
#: default keeps the whole file under a minute on two CPU cores.
EXAMPLES_FACTOR = float(os.environ.get("CANONRL_PROPERTY_EXAMPLES", "1"))


def examples(n: int) -> int:
    return max(1, round(n * EXAMPLES_FACTOR))


# ---------------------------------------------------------------------------------------------------------------
# Configurations: every registered estimator, with its defaults and known variants
# ---------------------------------------------------------------------------------------------------------------

_CANON_VARIANTS: list[dict[str, Any]] = [
    *({"split_by": split, "mu": mu} for split in ("entropy", "length", "given") for mu in (0.0, 0.5, 1.0)),
    {"split_by": "entropy", "mu": 0.25},
    {"split_by": "entropy", "mu": 1.0, "alpha": 0.5},
    {"split_by": "length", "mu": 0.7, "alpha": 0.5},
    {"split_by": "given", "mu": 0.3, "alpha": 0.25, "discounted_half": "low"},
    {"split_by": "given", "mu": 0.5, "singleton": "raw"},
    {"split_by": "length", "mu": 1.0, "normalizer": 3.0},
    {"split_by": "entropy", "mu": "cosine-first-inter-later-intra"},
    {"split_by": "given", "mu": "cosine-first-intra-later-inter"},
    {"split_by": "entropy", "mu": "first-inter-later-intra"},
    {"split_by": "length", "mu": "first-intra-later-inter"},
    {"split_by": "random", "mu": 0.6},
    {"split_by": "index", "mu": 1.0},
]

KNOWN_VARIANTS: dict[str, list[dict[str, Any]]] = {
    "grpo": [
        {"std": "population"},
        {"scale": "batch"},
        {"scale": "none"},
        {"singleton": "raw"},
        {"eps": 1e-4, "std": "population", "scale": "batch"},
        {"eps": 0.0},
        {"eps": 0.0, "scale": "batch"},
    ],
    "dr_grpo": [{"singleton": "raw"}],
    "rloo": [{"singleton": "raw"}],
    "dapo": [
        {"max_length": 10, "buffer_length": 6},
        {"max_length": 10, "buffer_length": 6, "filter_groups": False, "penalty_factor": 0.5},
        {"overlong": False, "eps": 0.0},
        {"overlong": False, "filter_groups": False, "std": "population", "singleton": "raw"},
    ],
    "reinforce_pp": [{"gamma": 0.9}, {"gamma": 0.0}],
    "reinforce_pp_baseline": [{"singleton": "raw"}],
    "canon": _CANON_VARIANTS,
    "gdpo": [{"batch_norm": "token", "eps": 1e-6}, {"batch_norm": "none"}, {"singleton": "raw"}],
    "qae": [{"quantile": "linear"}, {"k": 0.6, "singleton": "raw"}, {"k": 1.0, "eps": 0.0}],
    "ngrpo": [{"num_max": 0}, {"num_max": 3, "max_reward": 2.0, "std": "population"}, {"singleton": "raw"}],
    "mapo": [{"std": "unbiased"}, {"singleton": "raw"}],
    "agrae": [{"alpha": 0.5}, {"singleton": "raw", "std": "population"}],
    "rlev": [{"base": "grpo"}, {"base": "dr_grpo", "cap": None}, {"base": "grpo", "base_params": {"scale": "batch"}}],
    "hadw": [{"anchor": "hard"}, {"anchor": "official", "lambda_scale": 1.5}, {"init_anchor": 0.5}, {"base": "dr_grpo"}],
    "unlikely": [{"ties": "batch_order"}, {"beta": 1.0, "std": "population", "eps": 1e-4}, {"singleton": "raw"}],
    "psr_nsr": [{"mode": "psr"}, {"mode": "nsr"}, {"mode": "grpo_n"}, {"form": "code"}],
    "opo": [{"singleton": "raw"}],
    "gpg": [{"alpha": "verl"}, {"alpha": "none"}, {"scale_std": True}, {"singleton": "raw"}],
    "aapo": [{"clip_low": -1.0, "clip_high": 1.0}, {"singleton": "raw"}],
    "adora": [{"no_correct": "one"}, {"truncation_length": 8, "lam": 0.5}, {"base": "rloo"}],
    "capo": [{"switch_step": 0}, {"switch_step": 1000}, {"base": "dr_grpo", "switch_step": 1000}],
    "progrpo": [{"skip_all_correct": True}, {"only_correct": True, "alpha": 0.5}, {"low_fraction": 1.0}],
    "ace": [{"activation": "relu"}, {"length_normalize": True, "alpha": 0.5}, {"base": "dr_grpo"}],
    "effective_rank": [{"bonus_at": "all"}, {"base": "dr_grpo"}, {"base": "rloo", "kappa": 0.5}],
    "arenarl": [{"grpo_after": False}, {"eps": 0.0}],
    "ktae": [
        {"base": "dr_grpo"},
        {"base": "canon", "base_params": {"mu": 1.0}},  # reads entropy through its base
        {"base": "canon", "base_params": {"split_by": "length", "mu": 0.5}},
        {"base": "grpo", "base_params": {"scale": "batch"}},
        {"form": "paper", "numerics": "upstream"},
        {"min_count": 2, "ignore_token_ids": (0, 3), "top": 0.5},
    ],
    "hapo": [
        {"redistribute": False},
        {"h_hat": "upstream"},
        {"beta": 0.5, "entropy_pivot": 0.5},
        {"scale": False, "redistribute": False},
        {"fallback_threshold": math.pi / 2, "eps": 0.0},  # irrational: 0/1 rewards never land on it
    ],
    "iapo": [{"normalisation": "upstream"}, {"mode": "last_token"}, {"horizon": 3, "w_c": 0.5, "w_s": 2.0}],
    "qrm": [{"normalize": "none"}, {"eos": "keep"}, {"center": "group"}, {"center": "group", "normalize": "none"},
            {"center": "batch", "normalize": "none"}],
    "oar": [
        {"base": "dr_grpo"},
        {"sum_to_length": False, "q": 0.8, "beta": 2.0},
        {"base": "grpo", "base_params": {"scale": "batch"}},
        {"base": "canon", "base_params": {"mu": 1.0}},  # reads entropy through its base
    ],
}


#: What the tests read from each configured estimator, rather than from lists of names kept here: whether it is
#: group-local (``batch_level_reason``), whether it wraps a base (``wraps_base``), the rewards it accepts
#: (``reward_range``; a restricted range gets rewards mapped into [0, 1]) and how it z-scores (``z_score_bound``).
ANY_REWARD = (-math.inf, math.inf)


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    #: the hyperparameters passed to ``canonrl.advantages`` (a ``metric`` string included)
    hp: tuple[tuple[str, Any], ...]
    #: all resolved hyperparameters (defaults filled in)
    params: tuple[tuple[str, Any], ...]
    level: str
    #: optional batch inputs the configured estimator reads (entropy, metric, token_ids, logprobs, ...)
    inputs: tuple[str, ...]
    #: reads rewards as [B, K] components (GDPO)
    multi_reward: bool = False
    #: why the configured estimator is batch-level, or None when it is group-local (its ``batch_level_reason``)
    batch_level: str | None = None
    #: runs a ``base`` estimator (``base``/``base_params``) and reshapes its advantages
    wraps_base: bool = False
    #: the rewards it accepts on valid rows
    reward_range: tuple[float, float] = ANY_REWARD
    #: divides reward deviations by a group std + eps, then multiplies the z-scores by at most this
    z_score_bound: float | None = None

    @property
    def p(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def id(self) -> str:
        return self.name + ("[" + ",".join(f"{k}={v}" for k, v in self.hp) + "]" if self.hp else "")

    def __str__(self) -> str:
        return self.id

    # --- classification used by the tests -------------------------------------------------------------------
    @property
    def sequence_core(self) -> Config:
        """The configuration of the sequence-level estimator inside (a wrapper's base), else itself."""
        if self.wraps_base:
            return make_config(self.p["base"], self.p["base_params"] or {})
        return self

    @property
    def accuracy_mu(self) -> bool:
        """CANON with an accuracy schedule: mu depends on the batch accuracy, rewards must lie in [0, 1]."""
        p = self.sequence_core.p
        return isinstance(p.get("mu"), str) and p["mu"] in ACCURACY_SCHEDULES

    @property
    def canon_metric(self) -> str | None:
        """The metric CANON regroups by, if this configuration runs CANON (directly or as KTAE's base)."""
        core = self.sequence_core
        return core.p["split_by"] if core.name == "canon" else None

    @property
    def singleton_zero(self) -> bool:
        return self.p.get("singleton", "zero") == "zero"


def make_config(name: str, variant: dict[str, Any]) -> Config:
    info = next(i for i in canonrl.estimators() if i.name == name)
    estimator = canonrl.get_estimator(name, **variant)
    params = tuple(sorted(dataclasses.asdict(estimator.params).items(), key=lambda kv: kv[0]))
    # The configured instance is the authority on the inputs it reads (CANON's depend on its metric, KTAE's on its
    # base); EstimatorInfo.requires lists the class-level ones.
    required = tuple(sorted(set(estimator.required_inputs()) | set(info.requires)))
    return Config(
        name=name,
        hp=tuple(sorted(variant.items())),
        params=params,
        level=info.level,
        inputs=required,
        multi_reward=info.multi_reward,
        batch_level=estimator.batch_level_reason,
        wraps_base=info.wraps_base,
        reward_range=tuple(estimator.reward_range),
        z_score_bound=estimator.z_score_bound,
    )


def _build_configs() -> list[Config]:
    configs: list[Config] = []
    seen = set()
    for info in canonrl.estimators():
        if not info.outcome_level:
            continue  # step- and critic-level estimators: tests/test_step_properties.py
        for variant in [{}, *KNOWN_VARIANTS.get(info.name, [])]:
            cfg = make_config(info.name, variant)
            if repr((cfg.name, cfg.params)) not in seen:  # a variant equal to the defaults
                seen.add(repr((cfg.name, cfg.params)))
                configs.append(cfg)
    return configs


CONFIGS = _build_configs()


# ---------------------------------------------------------------------------------------------------------------
# Random batches
# ---------------------------------------------------------------------------------------------------------------

GROUP_FORMS = ("int64-tensor", "int32-tensor", "str-list", "int-list", "ndarray")
#: Mask dtypes that must give a float32 result (a float64 mask is tested on its own, see test_float64_mask).
MASK_DTYPES = (torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32)


@dataclasses.dataclass
class Batch:
    rewards: np.ndarray  # [B] float64 holding float32-representable values
    gid: list[int]  # [B] raw group ids
    mask: np.ndarray  # [B, T] bool
    entropy: np.ndarray  # [B, T] float32; padding may hold garbage or NaN
    metric: np.ndarray  # [B] float32
    token_ids: np.ndarray | None = None  # [B, T] int64 from a small vocabulary (tokens repeat)
    logprobs: np.ndarray | None = None  # [B, T] float32 <= 0
    ref_logprobs: np.ndarray | None = None  # [B, T] float32 <= 0 (a reference policy's)
    token_scores: np.ndarray | None = None  # [B, T] float32 >= 0 (a producer's per-token statistic)
    token_rewards: np.ndarray | None = None  # [B, T] float32 signed (a token-level reward model's scores)
    greedy_rewards: np.ndarray | None = None  # [B] a greedy response's reward, per row
    reference_rewards: np.ndarray | None = None  # [B] a reference response's reward, per row
    prompt_confidence: np.ndarray | None = None  # [B] in (0, 1], one value per group
    second_reward: np.ndarray | None = None  # [B] a second reward component (multi-reward estimators)
    indicators: np.ndarray | None = None  # [B, 3] a producer's per-response indicators (effective rank)
    group_form: str = "int64-tensor"
    mask_dtype: torch.dtype = torch.float32
    reward_dtype: torch.dtype = torch.float32
    entropy_dtype: torch.dtype = torch.float32
    metric_dtype: torch.dtype = torch.float32

    @property
    def B(self) -> int:
        return self.mask.shape[0]

    @property
    def T(self) -> int:
        return self.mask.shape[1]

    @property
    def valid(self) -> np.ndarray:
        return self.mask.any(1)

    @property
    def lengths(self) -> np.ndarray:
        return self.mask.sum(1)

    def take(self, rows) -> Batch:
        rows = np.asarray(rows, dtype=np.int64)
        return dataclasses.replace(
            self,
            rewards=self.rewards[rows],
            gid=[self.gid[i] for i in rows],
            mask=self.mask[rows],
            entropy=self.entropy[rows],
            metric=self.metric[rows],
            token_ids=None if self.token_ids is None else self.token_ids[rows],
            **{name: None if getattr(self, name) is None else getattr(self, name)[rows] for name in ROW_ARRAYS},
        )

    def with_rewards(self, rewards) -> Batch:
        return dataclasses.replace(self, rewards=_f32(rewards))

    def group_arg(self):
        if self.group_form == "int64-tensor":
            return torch.tensor(self.gid, dtype=torch.int64)
        if self.group_form == "int32-tensor":
            return torch.tensor(self.gid, dtype=torch.int32)
        if self.group_form == "str-list":
            return [f"uid-{g}" for g in self.gid]
        if self.group_form == "int-list":
            return list(self.gid)
        return np.asarray(self.gid, dtype=np.int64)

    def groups(self) -> dict[int, np.ndarray]:
        """Raw group id -> row indices."""
        ids = np.asarray(self.gid, dtype=np.int64)
        return {g: np.flatnonzero(ids == g) for g in sorted(set(self.gid))}


#: Optional per-row arrays a Batch may carry, sliced by ``take``.
ROW_ARRAYS = (
    *("logprobs", "ref_logprobs", "token_scores", "token_rewards"),  # per token
    *("greedy_rewards", "reference_rewards", "prompt_confidence", "second_reward", "indicators"),  # per response
)


def random_row_inputs(rng: np.random.Generator, gid: list[int], mask: np.ndarray, fill) -> dict[str, np.ndarray]:
    """The optional per-row inputs of the newer estimators, random but valid (prompt confidence: one per group)."""
    B, T = mask.shape
    confidence = {g: float(rng.uniform(0.05, 1.0)) for g in set(gid)}
    return {
        "logprobs": np.where(mask, -rng.exponential(1.0, (B, T)), fill).astype(np.float32),
        "ref_logprobs": np.where(mask, -rng.exponential(1.0, (B, T)), fill).astype(np.float32),
        "token_scores": np.where(mask, rng.exponential(1.0, (B, T)), fill).astype(np.float32),
        "token_rewards": np.where(mask, rng.normal(0.5, 2.0, (B, T)), fill).astype(np.float32),
        "greedy_rewards": _f32(rng.integers(0, 2, B)),
        "reference_rewards": _f32(rng.integers(0, 2, B)),
        "prompt_confidence": _f32([confidence[g] for g in gid]),
        "second_reward": _f32(rng.integers(0, 2, B)),
        "indicators": rng.normal(0.0, 3.0, (B, 3)).astype(np.float32),  # the last draw: the others stay as seeded
    }


def _f32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).astype(np.float32).astype(np.float64)


def _tiny_to_zero(x: float) -> float:
    # Keep rewards "moderate": no magnitudes below 1e-6 (their squares would underflow float32 in a variance).
    return 0.0 if abs(x) < 1e-6 else x


FINITE_REWARD = st.floats(-1e3, 1e3, width=32, allow_subnormal=False).map(_tiny_to_zero)


def reward_arrays(n: int):
    """[n] rewards: 0/1, -1/+1, a grid of eighths, or arbitrary finite float32 values (hypothesis-drawn).

    The structured kinds come from a drawn seed (cheap); the arbitrary floats are drawn element by element so that
    hypothesis can reach its edge values.
    """
    seeds = st.integers(0, 2**32 - 1).map(np.random.default_rng)
    return st.one_of(
        seeds.map(lambda rng: _f32(rng.integers(0, 2, n))),
        seeds.map(lambda rng: _f32(rng.choice([-1.0, 1.0], n))),
        seeds.map(lambda rng: _f32(rng.integers(-8000, 8001, n) / 8)),
        st.lists(FINITE_REWARD, min_size=n, max_size=n).map(_f32),
    )


MASK_STYLES = {
    # style: probabilities of (right padded, left padded, arbitrary holes, fully masked) rows
    "right-padded": (1.0, 0.0, 0.0, 0.0),
    "mixed": (0.4, 0.2, 0.25, 0.15),
    "holes": (0.0, 0.0, 0.8, 0.2),
    "mostly-empty": (0.3, 0.0, 0.1, 0.6),
}


def _random_mask(rng: np.random.Generator, B: int, T: int, style: str) -> np.ndarray:
    kinds = rng.choice(4, size=B, p=MASK_STYLES[style])
    lengths = rng.integers(0, T + 1, B)
    positions = np.arange(T)
    right = positions[None, :] < lengths[:, None]
    left = positions[None, :] >= T - lengths[:, None]
    holes = rng.random((B, T)) < rng.uniform(0.2, 0.8)
    return np.select([kinds[:, None] == 0, kinds[:, None] == 1, kinds[:, None] == 2], [right, left, holes], False)


@st.composite
def batches(draw, *, distinct_metrics: bool = False, min_rows: int = 0, max_rows: int = 40, max_tokens: int = 12):
    """A random batch. ``distinct_metrics``: no two rows share a mean entropy or a given metric value.

    Group ids come from a pool of up to 10 non-contiguous ids in arbitrary order, with random (Dirichlet) weights:
    groups of unequal sizes, singletons, one big group. Bulk per-token data comes from a drawn numpy seed.
    """
    T = draw(st.integers(1, max_tokens))
    B = draw(st.integers(min_rows, max_rows))
    pool = draw(st.lists(st.integers(-100, 10**6), min_size=1, max_size=10, unique=True))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    weights = rng.dirichlet(np.full(len(pool), draw(st.sampled_from([0.3, 1.0, 10.0]))))
    gid = [int(g) for g in rng.choice(pool, size=B, p=weights)]
    mask = _random_mask(rng, B, T, draw(st.sampled_from(sorted(MASK_STYLES))))
    rewards = draw(reward_arrays(B))

    if draw(st.booleans()):
        entropy = rng.uniform(0.0, 20.0, (B, T))
    else:  # one value per row from a tiny set: ties in the mean entropy
        entropy = np.repeat(rng.choice([0.5, 2.0, 3.0], size=(B, 1)), T, axis=1)
    if distinct_metrics:
        # Row means in [50 k, 50 k + 20], k a permutation: distinct and well separated.
        entropy = entropy + 50.0 * rng.permutation(B)[:, None]
        metric = rng.permutation(B) * 0.75 - 7.0
    elif draw(st.booleans()):
        metric = rng.integers(0, 3, B).astype(np.float64)  # ties
    else:
        metric = rng.uniform(-100.0, 100.0, B)
    padding = draw(st.sampled_from(["zero", "garbage", "nan"]))
    fill = {"zero": 0.0, "nan": np.nan, "garbage": rng.uniform(-1e4, 1e4, (B, T))}[padding]
    return Batch(
        rewards=rewards,
        gid=gid,
        mask=mask,
        entropy=np.where(mask, entropy, fill).astype(np.float32),
        metric=metric.astype(np.float32),
        token_ids=rng.integers(0, 8, (B, T)),
        **random_row_inputs(rng, gid, mask, fill),
        group_form=draw(st.sampled_from(GROUP_FORMS)),
        mask_dtype=draw(st.sampled_from(MASK_DTYPES)),
    )


# ---------------------------------------------------------------------------------------------------------------
# Running an estimator and float32 tolerances
# ---------------------------------------------------------------------------------------------------------------


def effective_rewards(cfg: Config, b: Batch) -> np.ndarray:
    """Configurations that accept only some rewards (a declared ``reward_range``: MAPO needs r >= 0, A-GRAE's p and
    omega and CANON's accuracy schedules need r in [0, 1]) see rewards outside [0, 1] taken mod 1 (a map applied row
    by row, so that it commutes with permutations and row insertion)."""
    if cfg.reward_range != ANY_REWARD:
        r = b.rewards
        return _f32(np.where((r >= 0) & (r <= 1), r, np.mod(r, 1.0)))
    return b.rewards


def run(cfg: Config, b: Batch, *, step: int = STEP) -> torch.Tensor:
    kwargs: dict[str, Any] = dict(cfg.hp)
    rewards = effective_rewards(cfg, b)
    if cfg.multi_reward:
        second = np.zeros(b.B) if b.second_reward is None else b.second_reward
        rewards = np.stack([rewards, second], axis=1)
    kwargs.update(
        rewards=torch.tensor(rewards, dtype=torch.float64).to(b.reward_dtype),
        group=b.group_arg(),
        mask=torch.from_numpy(b.mask.copy()).to(b.mask_dtype),
    )
    if "entropy" in cfg.inputs:
        kwargs["entropy"] = torch.from_numpy(b.entropy.copy()).to(b.entropy_dtype)
    if "metric" in cfg.inputs:
        kwargs.pop("metric", None)  # a metric tensor selects split_by="given"
        kwargs["metric"] = torch.from_numpy(b.metric.copy()).to(b.metric_dtype)
    if "human_values" in cfg.inputs:  # RLEV's human value v >= 0
        kwargs["human_values"] = torch.from_numpy(np.abs(b.metric)).to(b.metric_dtype)
    if "token_ids" in cfg.inputs:
        kwargs["token_ids"] = torch.from_numpy(_filled(b.token_ids, b, 0, np.int64))
    if "logprobs" in cfg.inputs:
        kwargs["logprobs"] = torch.from_numpy(_filled(b.logprobs, b, -1.0, np.float32)).to(b.entropy_dtype)
    if "ref_logprobs" in cfg.inputs:
        kwargs["ref_logprobs"] = torch.from_numpy(_filled(b.ref_logprobs, b, -1.5, np.float32)).to(b.entropy_dtype)
    if "token_rewards" in cfg.inputs:  # validated over the whole row: padding must be finite
        values = np.where(b.mask, _filled(b.token_rewards, b, 1.0, np.float32), 0.0).astype(np.float32)
        kwargs["token_rewards"] = torch.from_numpy(values).to(b.entropy_dtype)
    if "token_scores" in cfg.inputs:
        kwargs["token_scores"] = torch.from_numpy(_filled(b.token_scores, b, 1.0, np.float32)).to(b.entropy_dtype)
    for name, default in (("greedy_rewards", 0.0), ("reference_rewards", 0.0), ("prompt_confidence", 0.5)):
        if name in cfg.inputs:
            values = np.full(b.B, default) if getattr(b, name) is None else getattr(b, name)
            kwargs[name] = torch.tensor(values, dtype=torch.float32)
    if "indicators" in cfg.inputs:
        values = np.ones((b.B, 3)) if b.indicators is None else b.indicators
        kwargs["indicators"] = torch.tensor(values, dtype=torch.float32)
    return canonrl.advantages(cfg.name, step=step, **kwargs)


def _filled(values: np.ndarray | None, b: Batch, default: float, dtype) -> np.ndarray:
    """A per-token input, or a constant one for hand-built batches that do not carry it."""
    return np.full(b.mask.shape, default, dtype=dtype) if values is None else values.astype(dtype)


def row_values(out: torch.Tensor, b: Batch) -> np.ndarray:
    """[B] float64: each row's value at its first mask position (0 for fully masked rows)."""
    if b.B == 0:
        return np.zeros(0)
    first = np.argmax(b.mask, axis=1)
    values = out.double().numpy()[np.arange(b.B), first]
    return np.where(b.valid, values, 0.0)


def _overlong(lengths: np.ndarray, p: dict[str, Any]) -> np.ndarray:
    if not p["overlong"]:
        return np.zeros(len(lengths))
    expected = p["max_length"] - p["buffer_length"]
    return np.clip((expected - lengths) / p["buffer_length"], -1.0, 0.0) * p["penalty_factor"]


def _group_stats(values: np.ndarray, b: Batch, ddof: int):
    """Yield (rows, std) for every group of >= 2 valid rows whose values are not all equal."""
    valid = b.valid
    for rows in b.groups().values():
        rows = rows[valid[rows]]
        if len(rows) >= 2 and values[rows].max() > values[rows].min():
            yield rows, float(np.std(values[rows], ddof=ddof))


def _scores_for_whitening(cfg: Config, b: Batch) -> tuple[np.ndarray, np.ndarray]:
    """float64 (values, token weights) that REINFORCE++(-baseline) whitens; values per row or per token."""
    r, valid = b.rewards, b.valid
    if cfg.name == "reinforce_pp_baseline":
        scores = np.zeros(b.B)
        for rows in b.groups().values():
            rows = rows[valid[rows]]
            if len(rows) == 1:
                scores[rows] = r[rows] if cfg.p["singleton"] == "raw" else 0.0
            elif len(rows) > 1:
                scores[rows] = r[rows] - r[rows].mean()
        return scores, b.lengths.astype(np.float64)
    gamma = cfg.p["gamma"]
    returns = np.zeros((b.B, b.T))
    for i in range(b.B):
        count = int(b.mask[i].sum())  # discounting counts mask tokens
        returns[i, b.mask[i]] = [gamma ** (count - 1 - k) * r[i] for k in range(count)]
    return returns[b.mask], np.ones(int(b.mask.sum()))


def error_scale(cfg: Config, b: Batch) -> float:
    """Absolute float32 error to expect in the advantages of ``b``: rounding of the inputs over the denominator."""
    p, valid = cfg.p, b.valid
    if cfg.name == "ktae":  # base advantage + a key score in (-top, top) computed from counts
        return error_scale(cfg.sequence_core, b) + SLACK * EPS32 * p["top"]
    if cfg.name == "hapo":
        return _hapo_error_scale(cfg, b)
    if cfg.name == "iapo":  # GRPO (unbiased std, eps) + two unit-normalised token terms computed in float64
        core = make_config("grpo", {"eps": p["eps"], "std": "unbiased"})
        return error_scale(core, b) + SLACK * EPS32 * (p["w_s"] + p["w_c"])
    r = effective_rewards(cfg, b)
    magnitude = float(np.abs(r[valid]).max()) if valid.any() else 0.0
    denominator = 1.0
    if cfg.name == "dapo" or (cfg.name == "grpo" and p["scale"] == "group"):
        shaped = r + (_overlong(b.lengths, p) if cfg.name == "dapo" else 0.0)
        magnitude = float(np.abs(shaped[valid]).max()) if valid.any() else 0.0
        ddof = 1 if p["std"] == "unbiased" else 0
        stds = [std + p["eps"] for _, std in _group_stats(shaped, b, ddof)]
        denominator = min(stds, default=1.0)
    elif cfg.name == "grpo" and p["scale"] == "batch":
        values = r[valid]
        ddof = 1 if p["std"] == "unbiased" else 0
        if len(values) > ddof and values.max() > values.min():
            denominator = float(np.std(values, ddof=ddof)) + p["eps"]
    elif cfg.name in ("reinforce_pp", "reinforce_pp_baseline"):
        values, weights = _scores_for_whitening(cfg, b)
        total = weights.sum()
        if total > 1:
            mean = (values * weights).sum() / total
            variance = (weights * (values - mean) ** 2).sum() / (total - 1)
            denominator = math.sqrt(variance + 1e-8)
            magnitude = max(magnitude, float(np.abs(values).max()))
    elif cfg.name == "canon":
        denominator = p["normalizer"]
    elif cfg.z_score_bound is not None:
        values = r
        if cfg.name == "unlikely":  # the reshaped rewards r (1 - beta rank / G) are what is z-scored
            values = r * (1.0 - p["beta"])
        stds = [std + p["eps"] for _, std in _group_stats(values, b, 0)]
        if cfg.name == "ngrpo":
            stds = [
                float(np.std(np.concatenate([r[rows], [p["max_reward"]] * p["num_max"]]))) + p["eps"]
                for rows, _ in _group_stats(r, b, 0)
            ] + stds
        if cfg.name == "mapo":  # its percent-deviation term divides by the group mean
            stds += [abs(float(r[rows].mean())) + p["eps"] for rows, _ in _group_stats(r, b, 0)]
        denominator = min(stds, default=1.0)
        if cfg.name == "gdpo" and p["batch_norm"] == "sample":
            # the weighted sum of z-scores is then divided by its batch std + batch_eps, which can be tiny
            denominator *= p["batch_eps"]
        magnitude *= cfg.z_score_bound
    elif cfg.wraps_base:
        amplification = _wrapper_amplification(cfg, b)
        scaled_core = error_scale(cfg.sequence_core, b) * amplification
        if cfg.name == "hadw":
            # the weight's exponent reads |p_g - anchor|, whose float32 rounding grows with |r|; base |A| <= sqrt(B)
            return scaled_core + amplification * math.sqrt(max(b.B, 1)) * SLACK * EPS32 * magnitude
        return scaled_core
    return SLACK * (EPS32 * magnitude + 1e-30) / max(denominator, 1e-30)


def _hapo_error_scale(cfg: Config, b: Batch) -> float:
    """HAPO: a z-score over a group's tokens (population std, rows weighted by length), or GRPO's (unbiased std)
    in a fallback group, times a redistribution factor 1 + beta h^ with h^ in [-1, 1] from batch statistics."""
    p, valid = cfg.p, b.valid
    r = effective_rewards(cfg, b)
    magnitude = float(np.abs(r[valid]).max()) if valid.any() else 0.0
    denominator, bound = 1.0, 2.0 * magnitude
    if p["scale"]:
        stds = [std + p["eps"] for _, std in _group_stats(r, b, 1)]
        for rows, _ in _group_stats(r, b, 1):
            weights = b.lengths[rows].astype(np.float64)
            mean = (weights * r[rows]).sum() / weights.sum()
            stds.append(math.sqrt((weights * (r[rows] - mean) ** 2).sum() / weights.sum()) + p["eps"])
        denominator, bound = min(stds, default=1.0), max(p["fallback_threshold"], math.sqrt(max(b.B, 1)))
    factor = max(1.0, abs(1.0 - p["beta"])) if p["redistribute"] else 1.0
    return SLACK * EPS32 * (magnitude * factor / max(denominator, 1e-30) + p["beta"] * bound)


def _wrapper_amplification(cfg: Config, b: Batch) -> float:
    """How much a wrapper can multiply its base's rounding error."""
    p = cfg.p
    if cfg.name == "oar":  # weights up to 1 + beta, or up to the row's length once they sum to it
        return max(1.0 + p["beta"], float(b.T) if p["sum_to_length"] else 0.0)
    if cfg.name == "hadw":
        return p["lambda_scale"] * math.exp(p["max_magnitude"])
    if cfg.name == "ace":
        shift = np.where(b.mask, (b.logprobs if b.logprobs is not None else -1.0), 0.0)
        ref = np.where(b.mask, (b.ref_logprobs if b.ref_logprobs is not None else -1.5), 0.0)
        c = np.abs(shift - ref).sum(1).max(initial=0.0)
        return 1.0 + p["alpha"] * (c + 1.0)
    if cfg.name == "rlev":
        value = np.abs(b.metric).max(initial=0.0) * p["alpha"]
        return 1.0 + (value if p["cap"] is None else min(value, p["cap"]))
    if cfg.name == "progrpo":
        return 1.0 + p["alpha"]
    return 1.0


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str = "") -> None:
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    bound = atol + RTOL * expected.abs()
    bad = ~((actual - expected).abs() <= bound)  # NaN counts as bad
    if bad.any():
        rows = bad.any(-1).nonzero().flatten().tolist() if bad.dim() > 1 else bad.nonzero().flatten().tolist()
        raise AssertionError(
            f"{what}: mismatch at rows {rows[:10]} (atol={atol:.3g})\n"
            f"actual:   {actual[rows[:5]].tolist()}\nexpected: {expected[rows[:5]].tolist()}"
        )


# ---------------------------------------------------------------------------------------------------------------
# Layout: every test is parametrized by estimator and checks, on each generated batch, all of that estimator's
# configurations to which the property applies (sharing the batch generation buys more examples per configuration
# in the time budget). A failure names the configuration.
# ---------------------------------------------------------------------------------------------------------------

NAMES = [info.name for info in canonrl.estimators() if info.outcome_level]


def variants(name: str, applies=lambda c: True) -> list[Config]:
    return [c for c in CONFIGS if c.name == name and applies(c)]


def for_estimators(applies=lambda c: True):
    return pytest.mark.parametrize("name", [n for n in NAMES if variants(n, applies)])


@contextlib.contextmanager
def checking(cfg: Config):
    try:
        yield
    except Exception as error:
        raise AssertionError(f"[{cfg.id}] {type(error).__name__}: {error}") from error


def test_every_registered_estimator_is_configured():
    assert set(NAMES) == {c.name for c in CONFIGS}
    canon = [c.p for c in CONFIGS if c.name == "canon"]
    if canon:
        assert {"entropy", "length", "given"} <= {p["split_by"] for p in canon}
        assert {0.0, 0.5, 1.0} <= {p["mu"] for p in canon if not isinstance(p["mu"], str)}
        assert any(p["alpha"] < 1 for p in canon)
    for cfg in CONFIGS:
        for field in cfg.inputs:
            generated = ("entropy", "metric", "human_values", "token_ids", "logprobs", "ref_logprobs", *ROW_ARRAYS)
            assert field in generated, f"{cfg.id} needs {field!r}: not generated"
        low, high = cfg.reward_range  # a restricted range gets the batches' rewards mapped into [0, 1]
        assert low <= 0.0 and high >= 1.0, f"{cfg.id} accepts rewards in {cfg.reward_range}, which misses [0, 1]"


# ---------------------------------------------------------------------------------------------------------------
# 5, 6, 8, 9: finiteness, the mask, dtype and shape, sequence-level constancy
# ---------------------------------------------------------------------------------------------------------------


@for_estimators()
@settings(max_examples=examples(40), **SETTINGS)
@given(b=batches(), step=st.integers(1, 400))
def test_finite_float32_and_exactly_zero_outside_the_mask(name, b, step):
    outside = torch.from_numpy(~b.mask)
    for cfg in variants(name):
        with checking(cfg):
            out = run(cfg, b, step=step)
            assert out.dtype == torch.float32
            assert out.shape == b.mask.shape
            assert torch.isfinite(out).all(), f"non-finite output {out}"
            assert (out[outside] == 0.0).all(), "nonzero advantage outside the mask"
            assert (out[torch.from_numpy(~b.valid)] == 0.0).all(), "fully masked row not 0"


@for_estimators(lambda c: c.level == "sequence")
@settings(max_examples=examples(25), **SETTINGS)
@given(b=batches())
def test_sequence_level_is_constant_over_the_mask(name, b):
    for cfg in variants(name, lambda c: c.level == "sequence"):
        with checking(cfg):
            out = run(cfg, b).double().numpy()
            expected = np.where(b.mask, row_values(torch.from_numpy(out), b)[:, None], 0.0)
            np.testing.assert_array_equal(np.where(b.mask, out, 0.0), expected)


@for_estimators()
@settings(max_examples=examples(20), **SETTINGS)
@given(
    b=batches(),
    reward_dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float64, torch.float32]),
    entropy_dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float64]),
    metric_dtype=st.sampled_from([torch.bfloat16, torch.float64, torch.int64]),
    mask_dtype=st.sampled_from([*MASK_DTYPES, torch.bfloat16, torch.float16]),
)
def test_low_precision_and_mixed_dtype_inputs_give_float32(name, b, reward_dtype, entropy_dtype, metric_dtype, mask_dtype):
    b = dataclasses.replace(
        b,
        reward_dtype=reward_dtype,
        entropy_dtype=entropy_dtype,
        metric_dtype=metric_dtype,
        mask_dtype=mask_dtype,
        metric=np.round(b.metric).astype(np.float32),  # integral, so that it survives an int64 metric
    )
    for cfg in variants(name):
        with checking(cfg):
            out = run(cfg, b)
            assert out.dtype == torch.float32
            assert out.shape == b.mask.shape
            assert torch.isfinite(out).all()
            assert (out[torch.from_numpy(~b.mask)] == 0.0).all()


@pytest.mark.parametrize("name", NAMES)
def test_float64_mask_gives_float32(name):
    """Documented: advantages are float32 whatever the mask's dtype ("bool, int or float holding 0/1")."""
    b = Batch(
        rewards=_f32([1.0, 0.0, 1.0, 1.0, 0.5]),
        gid=[3, 3, 7, 7, 7],
        mask=np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 1], [1, 1, 0]], dtype=bool),
        entropy=np.linspace(0.1, 1.5, 15, dtype=np.float32).reshape(5, 3),
        metric=np.array([0.1, 0.2, 0.3, 0.4, 0.5], dtype=np.float32),
        token_ids=np.arange(15).reshape(5, 3) % 4,
        mask_dtype=torch.float64,
    )
    for cfg in variants(name):
        with checking(cfg):
            out = run(cfg, b)
            assert out.dtype == torch.float32, f"returns {out.dtype} for a float64 mask"


# ---------------------------------------------------------------------------------------------------------------
# 1: row permutation equivariance
# ---------------------------------------------------------------------------------------------------------------


def _any_permutation(c: Config) -> bool:
    # CANON ranks each group's responses by the metric and breaks ties by batch order (a stable sort, as the
    # official code). With tied metrics, permuting rows can legitimately move a response to the other half. So
    # for an arbitrary permutation CANON gets metrics without ties: mean entropies offset by 50 * (a permutation
    # of 0..B-1) and a given metric of distinct values (``batches(distinct_metrics=True)``). split_by="length" (ties
    # are the rule) and "index"/"random" (the split depends on batch order by definition) are left to the next
    # test, which only permutes rows across groups.
    return c.canon_metric not in ("length", "index", "random")


@for_estimators(_any_permutation)
@settings(max_examples=examples(30), **SETTINGS)
@given(b=batches(distinct_metrics=True), data=st.data())
def test_row_permutation_equivariance(name, b, data):
    perm = np.array(data.draw(st.permutations(range(b.B)), label="permutation"), dtype=np.int64)
    for cfg in variants(name, _any_permutation):
        with checking(cfg):
            expected = run(cfg, b)[torch.from_numpy(perm)]
            assert_close(run(cfg, b.take(perm)), expected, error_scale(cfg, b), "permuted")


def _order_preserving_within_groups(b: Batch, perm: np.ndarray) -> np.ndarray:
    """A permutation that puts each group's rows where ``perm`` does, but in their original relative order."""
    result = perm.copy()
    for rows in b.groups().values():
        result[np.flatnonzero(np.isin(perm, rows))] = rows  # ``rows`` is sorted: batch order within the group
    return result


def _position_independent(c: Config) -> bool:
    # split_by="random" draws one random number per batch position, so moving or inserting rows reshuffles it.
    return c.canon_metric != "random"


# Interleaving groups differently while keeping each group's internal order is an equivariance even with metric
# ties (ties keep batch order within a group): it covers split_by="length", tied entropies and metrics, and "index".
_group_order_permutation = _position_independent


@for_estimators(_group_order_permutation)
@settings(max_examples=examples(30), **SETTINGS)
@given(b=batches(), data=st.data())
def test_group_order_preserving_permutation_equivariance(name, b, data):
    perm = np.array(data.draw(st.permutations(range(b.B)), label="permutation"), dtype=np.int64)
    perm = _order_preserving_within_groups(b, perm)
    for cfg in variants(name, _group_order_permutation):
        with checking(cfg):
            expected = run(cfg, b)[torch.from_numpy(perm)]
            assert_close(run(cfg, b.take(perm)), expected, error_scale(cfg, b), "permuted")


# ---------------------------------------------------------------------------------------------------------------
# 2: group independence
# ---------------------------------------------------------------------------------------------------------------

# Each configured estimator declares whether it is group-local (``Estimator.batch_level_reason``: None, or why a row
# depends on other groups: a batch statistic, a batch-wide random grouping; a wrapper inherits its base's). The
# declaration is checked against a witness below, and the group-local configurations against random batches.


def batch_level_reason(cfg: Config) -> str | None:
    return cfg.batch_level


def is_group_local(cfg: Config) -> bool:
    return cfg.batch_level is None


def _locality_witnesses() -> tuple[Batch, tuple[Batch, ...]]:
    """Two groups of three, two changes of group 2's rewards (its accuracy moves, so does the batch's) and one of
    its entropies and token scores."""
    base = Batch(
        rewards=_f32([1.0, 0.0, 0.0, 1.0, 0.0, 0.0]),
        gid=[1, 1, 1, 2, 2, 2],
        mask=np.ones((6, 3), dtype=bool),
        entropy=np.arange(18, dtype=np.float32).reshape(6, 3),
        metric=np.arange(6, dtype=np.float32),
        token_ids=np.arange(18).reshape(6, 3) % 5,
        token_rewards=np.arange(-6.0, 12.0, dtype=np.float32).reshape(6, 3),
    )
    # A third change moves group 2's per-token inputs only (HAPO's entropy statistics are batch-wide).
    per_token = dataclasses.replace(
        base, entropy=base.entropy * np.repeat([1.0, 0.1], 3)[:, None].astype(np.float32),
        token_scores=np.concatenate([np.ones((3, 3)), np.arange(1.0, 10.0).reshape(3, 3)]).astype(np.float32),
        token_rewards=np.concatenate([base.token_rewards[:3], np.full((3, 3), 2.0)]).astype(np.float32),
    )  # fmt: skip
    changed = (base.with_rewards([1.0, 0.0, 0.0, 1.0, 1.0, 0.25]), base.with_rewards([1.0, 0.0, 0.0, 1, 1, 1]))
    return base, (*changed, per_token)


class TestGroupIndependence:
    def test_declarations(self):
        """Every configuration says group-local or gives a reason; the known batch-level ones say so."""
        for cfg in CONFIGS:
            estimator = canonrl.get_estimator(cfg.name, **dict(cfg.hp))
            reason = estimator.batch_level_reason
            assert reason is None or (isinstance(reason, str) and reason), f"{cfg.id}: reason {reason!r}"
            assert estimator.group_local == (reason is None), f"{cfg.id}: group_local disagrees with its reason"
        skipped = {c.name for c in CONFIGS if batch_level_reason(c)}
        assert {"reinforce_pp", "reinforce_pp_baseline", "grpo", "agrae"} <= skipped
        assert is_group_local(make_config("grpo", {})) and is_group_local(make_config("ktae", {}))
        assert not is_group_local(make_config("ktae", {"base": "grpo", "base_params": {"scale": "batch"}}))

    @pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.id)
    def test_declared_locality_matches_a_witness(self, cfg):
        """Changing group 2's rewards must change group 1's advantages for a configuration declared batch-level (a
        witness that skipping it below is needed) and leave them unchanged for one declared group-local (an
        estimator with a batch statistic that keeps the default declaration fails here)."""
        base, witnesses = _locality_witnesses()
        expected = run(cfg, base)[:3]
        if batch_level_reason(cfg):
            assert any(not torch.equal(run(cfg, changed)[:3], expected) for changed in witnesses), (
                f"{cfg.id} is declared batch-level ({cfg.batch_level}), but group 2 does not move group 1"
            )
        else:
            for changed in witnesses:
                atol = max(error_scale(cfg, base), error_scale(cfg, changed))
                what = f"{cfg.id} is declared group-local (batch_level_reason None), but group 2 moves group 1"
                assert_close(run(cfg, changed)[:3], expected, atol, what)

    @for_estimators(is_group_local)
    @settings(max_examples=examples(30), **SETTINGS)
    @given(b=batches(min_rows=1), data=st.data())
    def test_changing_one_group_leaves_the_others_unchanged(self, name, b, data):
        target = data.draw(st.sampled_from(sorted(set(b.gid))), label="group")
        rows = b.groups()[target]
        new_rewards = b.rewards.copy()
        new_rewards[rows] = data.draw(reward_arrays(len(rows)), label="new rewards")
        changed = b.with_rewards(new_rewards)
        if data.draw(st.booleans(), label="also change its entropy, metric, token ids and mask"):
            rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
            changed.entropy, changed.metric = changed.entropy.copy(), changed.metric.copy()
            changed.token_ids, changed.mask = changed.token_ids.copy(), changed.mask.copy()
            changed.entropy[rows] = rng.uniform(0.0, 20.0, (len(rows), b.T)).astype(np.float32)
            changed.metric[rows] = rng.uniform(-100.0, 100.0, len(rows)).astype(np.float32)
            changed.token_ids[rows] = rng.integers(0, 8, (len(rows), b.T))
            changed.mask[rows] = rng.random((len(rows), b.T)) < 0.6
            fresh = random_row_inputs(rng, [b.gid[i] for i in rows], changed.mask[rows], 0.0)
            for field, values in fresh.items():  # per-token inputs follow the new mask: no NaN inside it
                setattr(changed, field, getattr(changed, field).copy())
                getattr(changed, field)[rows] = values
        others = torch.from_numpy(np.asarray(b.gid) != target)
        for cfg in variants(name, is_group_local):
            with checking(cfg):
                atol = max(error_scale(cfg, b), error_scale(cfg, changed))
                assert_close(run(cfg, changed)[others], run(cfg, b)[others], atol, "other groups")


# ---------------------------------------------------------------------------------------------------------------
# 3: zero sum within groups
# ---------------------------------------------------------------------------------------------------------------


def _zero_sum(c: Config) -> str | None:
    """Which groups' advantages sum to 0: "all", "even" (an even number of valid rows) or None (not applicable)."""
    if not c.singleton_zero:  # 'raw' singletons keep their reward
        return None
    if c.name in ("grpo", "dr_grpo", "rloo", "dapo", "mapo", "unlikely"):
        return "all"
    if c.name == "gdpo":  # the batch mean of group z-scores is exactly 0; token weights break that
        return "all" if c.p["batch_norm"] != "token" else None
    if c.name in ("gpg", "arenarl"):
        return "all"
    if c.name in ("rlev", "adora") or (c.name == "capo" and _capo_switched(c.p)):
        return _zero_sum(c.sequence_core)  # the base's advantages, reweighted per group
    if c.name == "canon" and c.p["alpha"] == 1.0:
        # mu = 0 is intra only: zero sum within each half whatever the group's size; otherwise the inter terms
        # cancel only between equal halves.
        return "all" if c.p["mu"] == 0.0 else "even"
    return None


def _capo_switched(p: dict[str, Any]) -> bool:
    """CAPO is past its positive-only phase at the tests' step."""
    switch = p["switch_step"] if p["switch_step"] is not None else math.floor(p["switch_fraction"] * p["total_steps"])
    return switch < STEP


@for_estimators(lambda c: _zero_sum(c) is not None)
@settings(max_examples=examples(30), **SETTINGS)
@given(b=batches())
def test_zero_sum_within_groups(name, b):
    valid_rows = [rows[b.valid[rows]] for rows in b.groups().values()]
    for cfg in variants(name, lambda c: _zero_sum(c) is not None):
        with checking(cfg):
            values = row_values(run(cfg, b), b)
            atol = error_scale(cfg, b)
            for rows in valid_rows:
                if _zero_sum(cfg) == "even" and len(rows) % 2:
                    continue
                total = values[rows].sum()
                bound = len(rows) * (atol + RTOL * np.abs(values[rows]).max(initial=0.0))
                assert abs(total) <= bound, f"group rows {rows.tolist()} sum to {total}: {values[rows].tolist()}"


# ---------------------------------------------------------------------------------------------------------------
# 4: shift invariance, scale equivariance / invariance
# ---------------------------------------------------------------------------------------------------------------


def _shift_invariant(c: Config) -> bool:
    if not c.singleton_zero:  # 'raw' singletons keep the reward itself
        return False
    if c.name in ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline", "dapo", "qae", "gdpo", "opo"):
        return True
    if c.name == "gpg":
        return c.p["alpha"] != "verl"  # verl's alpha counts non-zero rewards
    if c.name in ("capo", "ace", "oar"):
        return _shift_invariant(c.sequence_core)
    if c.name == "hapo":  # token-level z-score (or GRPO's in a fallback group); h^ reads no reward
        return True
    if c.name == "hadw":  # the anchor is the batch accuracy, which shifts along
        return c.p["init_anchor"] is None and c.p["anchor"] != "official" and _shift_invariant(c.sequence_core)
    return c.name == "canon" and c.p["alpha"] == 1.0 and not c.accuracy_mu


@for_estimators(_shift_invariant)
@settings(max_examples=examples(30), **SETTINGS)
@given(b=batches(), shift=st.floats(-1e3, 1e3, width=32, allow_subnormal=False))
def test_shift_invariance(name, b, shift):
    shifted = b.with_rewards(b.rewards + shift)
    for cfg in variants(name, _shift_invariant):
        with checking(cfg):
            atol = max(error_scale(cfg, b), error_scale(cfg, shifted))
            assert_close(run(cfg, shifted), run(cfg, b), atol, f"shift {shift}")


def _scale_equivariant(c: Config) -> bool:
    if c.name in ("dr_grpo", "rloo", "opo"):
        return True
    if c.name == "gpg":
        return not c.p["scale_std"]
    if c.name in ("rlev", "capo", "oar"):
        return _scale_equivariant(c.sequence_core)
    if c.name == "grpo":
        return c.p["scale"] == "none"
    return c.name == "canon" and not c.accuracy_mu  # linear in the rewards, alpha < 1 included


SCALES = st.one_of(st.sampled_from([0.125, 0.5, 2.0, 16.0]), st.floats(0.01, 100.0))


@for_estimators(_scale_equivariant)
@settings(max_examples=examples(30), **SETTINGS)
@given(b=batches(), k=SCALES)
def test_scale_equivariance(name, b, k):
    check_reward_scaling(name, b, k, _scale_equivariant, output_factor=k)


def check_reward_scaling(name, b, k, predicate, *, output_factor):
    """Rewards times k must give output_factor times the advantages (k: equivariant, 1: invariant)."""
    scaled = b.with_rewards(b.rewards * k)
    for cfg in variants(name, predicate):
        with checking(cfg):
            atol = max(error_scale(cfg, b) * output_factor, error_scale(cfg, scaled))
            assert_close(run(cfg, scaled), output_factor * run(cfg, b).double(), atol, f"scale {k}")


def _scale_invariant(c: Config) -> bool:
    """z-scores without eps: (k r - k m) / (k s) = (r - m) / s; all-equal groups are documented to give 0."""
    if c.name == "grpo":
        return c.p["eps"] == 0.0 and c.p["scale"] in ("group", "batch")
    if c.name == "qae":
        return c.p["eps"] == 0.0
    return c.name == "dapo" and c.p["eps"] == 0.0 and not c.p["overlong"]


@for_estimators(_scale_invariant)
@settings(max_examples=examples(30), **SETTINGS)
@given(b=batches(), k=SCALES)
def test_scale_invariance(name, b, k):
    check_reward_scaling(name, b, k, _scale_invariant, output_factor=1.0)


# ---------------------------------------------------------------------------------------------------------------
# 6: fully masked rows do not change the other rows
# ---------------------------------------------------------------------------------------------------------------


# Fully masked rows take part in no statistic (whitening included, since they carry no tokens).
_ignores_fully_masked_rows = _position_independent


@for_estimators(_ignores_fully_masked_rows)
@settings(max_examples=examples(30), **SETTINGS)
@given(b=batches(), data=st.data())
def test_inserting_fully_masked_rows_changes_nothing(name, b, data):
    k = data.draw(st.integers(1, 5), label="extra rows")
    ids = sorted(set(b.gid)) + [-999_999]  # existing groups or a group of their own
    extra_gid = data.draw(st.lists(st.sampled_from(ids), min_size=k, max_size=k), label="extra ids")
    extra_rewards = data.draw(reward_arrays(k), label="extra rewards")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    positions = np.sort(rng.choice(b.B + k, size=k, replace=False))  # where the extra rows go
    original = np.setdiff1d(np.arange(b.B + k), positions)
    order = np.empty(b.B + k, dtype=np.int64)
    order[original] = np.arange(b.B)
    order[positions] = b.B + np.arange(k)
    big = dataclasses.replace(
        b,
        rewards=np.concatenate([b.rewards, extra_rewards]),
        gid=b.gid + extra_gid,
        mask=np.concatenate([b.mask, np.zeros((k, b.T), dtype=bool)]),
        entropy=np.concatenate([b.entropy, rng.uniform(-1e3, 1e3, (k, b.T)).astype(np.float32)]),
        metric=np.concatenate([b.metric, rng.uniform(-1e3, 1e3, k).astype(np.float32)]),
        token_ids=np.concatenate([b.token_ids, rng.integers(0, 8, (k, b.T))]),
        **{
            field: np.concatenate([getattr(b, field), values])
            for field, values in random_row_inputs(rng, extra_gid, np.zeros((k, b.T), dtype=bool), 0.0).items()
        },
    ).take(order)
    for cfg in variants(name, _ignores_fully_masked_rows):
        with checking(cfg):
            out_big = run(cfg, big)
            assert (out_big[torch.from_numpy(positions)] == 0.0).all(), "inserted fully masked row not 0"
            assert_close(out_big[torch.from_numpy(original)], run(cfg, b), error_scale(cfg, b), "rows kept")


# ---------------------------------------------------------------------------------------------------------------
# 7: all-equal groups (and singletons) give exactly 0
# ---------------------------------------------------------------------------------------------------------------


def _constant_groups_zero(c: Config) -> bool:
    if c.name == "ktae":  # an all-correct or all-wrong group has no key tokens: the base advantage decides
        return _constant_groups_zero(c.sequence_core) and not (
            {"singleton", "alpha"} & set(c.p["base_params"] or {})
        )
    if c.name in ("grpo", "dr_grpo", "rloo", "qae", "mapo", "agrae", "opo", "gpg"):
        return True
    if c.name == "gdpo":  # raw singletons move the batch mean, which every row then subtracts
        return c.p["batch_norm"] != "token" and c.singleton_zero
    if c.name == "psr_nsr":
        return c.p["mode"] == "grpo_n"
    if c.name == "hapo":  # a constant group has token-level std 0, and h^ multiplies its zeros
        return True
    if c.name in ("hadw", "adora", "capo", "ace", "oar") or (c.name == "progrpo" and c.p["skip_all_correct"]):
        # the base's zeros are multiplied (or kept); a base singleton policy is not visible to this test
        return _constant_groups_zero(c.sequence_core) and "singleton" not in (c.p["base_params"] or {})
    if c.name == "canon":
        return c.p["alpha"] == 1.0  # CANON-Eff's alpha shaping deliberately does not vanish
    if c.name == "dapo":  # the overlong term differs within a group unless filtered, off, or out of reach
        return c.p["filter_groups"] or not c.p["overlong"] or c.p["max_length"] - c.p["buffer_length"] >= 12
    return False


@for_estimators(_constant_groups_zero)
@settings(max_examples=examples(30), **SETTINGS)
@given(b=batches(min_rows=1), data=st.data())
def test_all_equal_groups_give_exactly_zero(name, b, data):
    ids = sorted(set(b.gid))
    chosen = data.draw(st.lists(st.sampled_from(ids), min_size=1, unique=True), label="constant groups")
    rewards = b.rewards.copy()
    for g in chosen:
        rewards[b.groups()[g]] = data.draw(st.one_of(st.sampled_from([0.0, 1.0, -1.0]), FINITE_REWARD))
    second = b.second_reward.copy()  # multi-reward estimators: every component constant in the chosen groups
    second[np.isin(b.gid, chosen)] = 1.0
    b = dataclasses.replace(b.with_rewards(rewards), second_reward=second)
    valid_rows = {g: rows[b.valid[rows]] for g, rows in b.groups().items()}
    for cfg in variants(name, _constant_groups_zero):
        with checking(cfg):
            out = run(cfg, b)
            values = row_values(out, b)
            for g in chosen:
                rows = valid_rows[g]
                if len(rows) >= 2 or cfg.singleton_zero:
                    assert (values[rows] == 0.0).all(), f"all-equal group {g}: {values[rows].tolist()}"
                    assert (out[torch.from_numpy(rows)] == 0.0).all()
            if cfg.singleton_zero:  # a group of one valid response has no baseline: 0
                for rows in valid_rows.values():
                    if len(rows) == 1:
                        assert values[rows[0]] == 0.0, f"singleton row {rows[0]} got {values[rows[0]]}"
