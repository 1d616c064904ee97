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

import dataclasses
import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import canonrl
from canonrl.schedules import ACCURACY_SCHEDULES

EPS32 = float(np.finfo(np.float32).eps)
#: Safety factor on the float32 error estimates (a few roundings per reduction, up to 40 rows).
SLACK = 64.0
RTOL = SLACK * EPS32
#: The trainer step passed to every call (past the cosine schedules' warm-up).
STEP = 37

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------------------------
# Configurations: every registered estimator, with its defaults and known variants
# ---------------------------------------------------------------------------------------------------------------

_CANON_VARIANTS: list[dict[str, Any]] = [
    *({"metric": metric, "mu": mu} for metric in ("entropy", "length", "given") for mu in (0.0, 0.5, 1.0)),
    {"metric": "entropy", "mu": 0.25},
    {"metric": "entropy", "mu": 1.0, "alpha": 0.5},
    {"metric": "length", "mu": 0.7, "alpha": 0.5},
    {"metric": "given", "mu": 0.3, "alpha": 0.25, "discounted_half": "low"},
    {"metric": "given", "mu": 0.5, "singleton": "raw"},
    {"metric": "length", "mu": 1.0, "normalizer": 3.0},
    {"metric": "entropy", "mu": "cosine-first-inter-later-intra"},
    {"metric": "given", "mu": "cosine-first-intra-later-inter"},
    {"metric": "entropy", "mu": "first-inter-later-intra"},
    {"metric": "length", "mu": "first-intra-later-inter"},
    {"metric": "random", "mu": 0.6},
    {"metric": "index", "mu": 1.0},
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
}


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    #: the hyperparameters passed to ``canonrl.advantages`` (a ``metric`` string included)
    hp: tuple[tuple[str, Any], ...]
    #: all resolved hyperparameters (defaults filled in)
    params: tuple[tuple[str, Any], ...]
    level: str
    needs_entropy: bool
    needs_metric: bool

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
    def accuracy_mu(self) -> bool:
        """CANON with an accuracy schedule: mu depends on the batch accuracy, rewards must lie in [0, 1]."""
        return isinstance(self.p.get("mu"), str) and self.p["mu"] in ACCURACY_SCHEDULES

    @property
    def canon_metric(self) -> str | None:
        return self.p["metric"] if self.name == "canon" else None

    @property
    def singleton_zero(self) -> bool:
        return self.p.get("singleton", "zero") == "zero"


def _build_configs() -> list[Config]:
    configs: list[Config] = []
    seen = set()
    for info in canonrl.estimators():
        for variant in [{}, *KNOWN_VARIANTS.get(info.name, [])]:
            estimator = canonrl.get_estimator(info.name, **variant)
            params = tuple(sorted(dataclasses.asdict(estimator.params).items(), key=lambda kv: kv[0]))
            if (info.name, params) in seen:
                continue
            seen.add((info.name, params))
            # The configured instance is the authority on the inputs it reads (CANON's depend on its metric);
            # EstimatorInfo.requires lists the class-level ones.
            required = set(estimator.required_inputs()) | set(info.requires)
            hp = tuple(sorted(variant.items()))
            configs.append(
                Config(
                    name=info.name,
                    hp=hp,
                    params=params,
                    level=info.level,
                    needs_entropy="entropy" in required,
                    needs_metric="metric" in required,
                )
            )
    return configs


CONFIGS = _build_configs()


def configs(predicate=lambda c: True) -> Any:
    selected = [c for c in CONFIGS if predicate(c)]
    return pytest.mark.parametrize("cfg", selected, ids=[c.id for c in selected])


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


def _f32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).astype(np.float32).astype(np.float64)


def _tiny_to_zero(x: float) -> float:
    # Keep rewards "moderate": no magnitudes below 1e-6 (their squares would underflow float32 in a variance).
    return 0.0 if abs(x) < 1e-6 else x


FINITE_REWARD = st.floats(-1e3, 1e3, width=32, allow_subnormal=False).map(_tiny_to_zero)


def reward_arrays(n: int):
    def lists(element):
        return st.lists(element, min_size=n, max_size=n).map(_f32)

    return st.one_of(
        lists(st.sampled_from([0.0, 1.0])),
        lists(st.sampled_from([-1.0, 1.0])),
        lists(st.integers(-8000, 8000).map(lambda k: k / 8)),
        lists(FINITE_REWARD),
    )


def mask_rows(T: int):
    def prefix(n):
        return [True] * n + [False] * (T - n)

    return st.one_of(
        st.integers(0, T).map(prefix),  # right padded, length 0..T
        st.integers(0, T).map(lambda n: prefix(n)[::-1]),  # left padded
        st.integers(0, 2**T - 1).map(lambda bits: [bool(bits >> t & 1) for t in range(T)]),  # any holes
        st.just([False] * T),  # fully masked
    )


@st.composite
def batches(draw, *, distinct_metrics: bool = False, min_rows: int = 0, max_rows: int = 40, max_tokens: int = 12):
    """A random batch. ``distinct_metrics``: no two rows share a mean entropy or a given metric value."""
    T = draw(st.integers(1, max_tokens))
    B = draw(st.integers(min_rows, max_rows))
    pool = draw(st.lists(st.integers(-100, 10**6), min_size=1, max_size=10, unique=True))
    gid = draw(st.lists(st.sampled_from(pool), min_size=B, max_size=B))
    mask = np.array(draw(st.lists(mask_rows(T), min_size=B, max_size=B)), dtype=bool).reshape(B, T)
    rewards = draw(reward_arrays(B))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

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
    if padding != "zero":
        fill = np.nan if padding == "nan" else rng.uniform(-1e4, 1e4, (B, T))
        entropy = np.where(mask, entropy, fill)
    else:
        entropy = np.where(mask, entropy, 0.0)
    return Batch(
        rewards=rewards,
        gid=gid,
        mask=mask,
        entropy=entropy.astype(np.float32),
        metric=metric.astype(np.float32),
        group_form=draw(st.sampled_from(GROUP_FORMS)),
        mask_dtype=draw(st.sampled_from(MASK_DTYPES)),
    )


# ---------------------------------------------------------------------------------------------------------------
# Running an estimator and float32 tolerances
# ---------------------------------------------------------------------------------------------------------------


def effective_rewards(cfg: Config, b: Batch) -> np.ndarray:
    """Accuracy-based mu schedules need rewards in [0, 1]: those configurations see r mod 1 (same map for all rows)."""
    if cfg.accuracy_mu:
        return _f32(np.mod(b.rewards, 1.0))
    return b.rewards


def run(cfg: Config, b: Batch, *, step: int = STEP) -> torch.Tensor:
    kwargs: dict[str, Any] = dict(cfg.hp)
    kwargs.update(
        rewards=torch.tensor(effective_rewards(cfg, b), dtype=torch.float64).to(b.reward_dtype),
        group=b.group_arg(),
        mask=torch.from_numpy(b.mask.copy()).to(b.mask_dtype),
    )
    if cfg.needs_entropy:
        kwargs["entropy"] = torch.from_numpy(b.entropy.copy()).to(b.entropy_dtype)
    if cfg.needs_metric:
        kwargs.pop("metric", None)  # a metric tensor selects metric="given"
        kwargs["metric"] = torch.from_numpy(b.metric.copy()).to(b.metric_dtype)
    out = canonrl.advantages(cfg.name, step=step, **kwargs)
    note(f"{cfg.id}: rewards={effective_rewards(cfg, b).tolist()} gid={b.gid} lengths={b.lengths.tolist()}")
    return out


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
        positions = np.flatnonzero(b.mask[i])
        if len(positions):
            last = positions[-1]
            returns[i, b.mask[i]] = [gamma ** (last - t) * r[i] for t in positions]
    return returns[b.mask], np.ones(int(b.mask.sum()))


def error_scale(cfg: Config, b: Batch) -> float:
    """Absolute float32 error to expect in the advantages of ``b``: rounding of the inputs over the denominator."""
    p, valid = cfg.p, b.valid
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
    return SLACK * (EPS32 * magnitude + 1e-30) / max(denominator, 1e-30)


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
# Coverage of the registry
# ---------------------------------------------------------------------------------------------------------------


def test_every_registered_estimator_is_configured():
    names = {info.name for info in canonrl.estimators()}
    assert names == {c.name for c in CONFIGS}
    canon = [c.p for c in CONFIGS if c.name == "canon"]
    if canon:
        assert {"entropy", "length", "given"} <= {p["metric"] for p in canon}
        assert {0.0, 0.5, 1.0} <= {p["mu"] for p in canon if not isinstance(p["mu"], str)}
        assert any(p["alpha"] < 1 for p in canon)
    for cfg in CONFIGS:
        estimator = canonrl.get_estimator(cfg.name, **{k: v for k, v in cfg.hp})
        for field in estimator.required_inputs():
            assert field in ("entropy", "metric"), f"{cfg.id} requires {field!r}, which these tests do not generate"


# ---------------------------------------------------------------------------------------------------------------
# 5, 6, 8, 9: finiteness, the mask, dtype/shape, sequence-level constancy
# ---------------------------------------------------------------------------------------------------------------


@configs()
@settings(max_examples=20, **SETTINGS)
@given(b=batches(), step=st.integers(1, 400))
def test_finite_zero_outside_mask_float32(cfg, b, step):
    out = run(cfg, b, step=step)
    assert out.dtype == torch.float32
    assert out.shape == b.mask.shape
    assert torch.isfinite(out).all(), f"non-finite output {out}"
    outside = torch.from_numpy(~b.mask)
    assert (out[outside] == 0.0).all(), "nonzero advantage outside the mask"
    assert (out[torch.from_numpy(~b.valid)] == 0.0).all(), "fully masked row not 0"


@configs(lambda c: c.level == "sequence")
@settings(max_examples=15, **SETTINGS)
@given(b=batches())
def test_sequence_level_is_constant_over_the_mask(cfg, b):
    out = run(cfg, b).double().numpy()
    expected = np.where(b.mask, row_values(torch.from_numpy(out), b)[:, None], 0.0)
    np.testing.assert_array_equal(np.where(b.mask, out, 0.0), expected)


LOW_PRECISION = (torch.bfloat16, torch.float16)


@configs()
@settings(max_examples=10, **SETTINGS)
@given(
    b=batches(),
    reward_dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float64, torch.float32]),
    entropy_dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float64]),
    metric_dtype=st.sampled_from([torch.bfloat16, torch.float64, torch.int64]),
    mask_dtype=st.sampled_from([*MASK_DTYPES, torch.bfloat16, torch.float16]),
)
def test_low_precision_and_mixed_dtype_inputs_give_float32(cfg, b, reward_dtype, entropy_dtype, metric_dtype, mask_dtype):
    b = dataclasses.replace(
        b,
        reward_dtype=reward_dtype,
        entropy_dtype=entropy_dtype,
        metric_dtype=metric_dtype,
        mask_dtype=mask_dtype,
        metric=np.round(b.metric).astype(np.float32),  # integral, so that it survives an int64 metric
    )
    out = run(cfg, b)
    assert out.dtype == torch.float32
    assert out.shape == b.mask.shape
    assert torch.isfinite(out).all()
    assert (out[torch.from_numpy(~b.mask)] == 0.0).all()


@pytest.mark.parametrize("name", [info.name for info in canonrl.estimators()])
def test_float64_mask_gives_float32(name):
    """Documented: advantages are float32 whatever the mask's dtype ("bool, int or float holding 0/1")."""
    cfg = next(c for c in CONFIGS if c.name == name and not c.hp)
    b = Batch(
        rewards=_f32([1.0, 0.0, 1.0, 1.0, 0.5]),
        gid=[3, 3, 7, 7, 7],
        mask=np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 1], [1, 1, 0]], dtype=bool),
        entropy=np.linspace(0.1, 1.5, 15, dtype=np.float32).reshape(5, 3),
        metric=np.array([0.1, 0.2, 0.3, 0.4, 0.5], dtype=np.float32),
        mask_dtype=torch.float64,
    )
    out = run(cfg, b)
    assert out.dtype == torch.float32, f"{name} returns {out.dtype} for a float64 mask"


# ---------------------------------------------------------------------------------------------------------------
# 1: row permutation equivariance
# ---------------------------------------------------------------------------------------------------------------


# CANON ranks each group's responses by the metric and breaks ties by batch order (a stable sort, as the official
# code). With tied metrics, permuting rows can legitimately move a response to the other half. So for an arbitrary
# permutation CANON gets metrics without ties: per-row mean entropies offset by 50 * (a permutation of 0..B-1) and
# a given metric of distinct values. metric="length" (ties are the rule) and "index"/"random" (the split depends on
# batch order by definition) are left to the next test, which only permutes rows across groups.
@configs(lambda c: c.canon_metric not in ("length", "index", "random"))
@settings(max_examples=15, **SETTINGS)
@given(b=batches(distinct_metrics=True), data=st.data())
def test_row_permutation_equivariance(cfg, b, data):
    perm = np.array(data.draw(st.permutations(range(b.B))), dtype=np.int64)
    out = run(cfg, b)
    permuted = run(cfg, b.take(perm))
    assert_close(permuted, out[torch.from_numpy(perm)], error_scale(cfg, b), "permuted")


def _order_preserving_within_groups(b: Batch, perm: np.ndarray) -> np.ndarray:
    """A permutation that places groups' rows where ``perm`` does but keeps each group's rows in batch order."""
    result = perm.copy()
    ids = np.asarray(b.gid)
    for rows in b.groups().values():
        slots = np.flatnonzero(np.isin(perm, rows))
        result[slots] = rows  # ``rows`` is sorted: batch order within the group
    return result


# Interleaving groups differently while keeping every group's internal order is an equivariance even with metric
# ties (ties keep batch order within a group), so it covers CANON with metric="length", tied entropies/metrics and
# metric="index". Only metric="random" draws one random number per batch position and is excluded.
@configs(lambda c: c.canon_metric != "random")
@settings(max_examples=15, **SETTINGS)
@given(b=batches(), data=st.data())
def test_group_order_preserving_permutation_equivariance(cfg, b, data):
    perm = _order_preserving_within_groups(b, np.array(data.draw(st.permutations(range(b.B))), dtype=np.int64))
    out = run(cfg, b)
    permuted = run(cfg, b.take(perm))
    assert_close(permuted, out[torch.from_numpy(perm)], error_scale(cfg, b), "permuted")


# ---------------------------------------------------------------------------------------------------------------
# 2: group independence
# ---------------------------------------------------------------------------------------------------------------


#: Estimators whose advantage of a row depends only on the rows of its own group.
GROUP_LOCAL = ("grpo", "dr_grpo", "rloo", "dapo", "canon")
#: Deliberately not tested for group independence: configurations with batch-level statistics.
BATCH_LEVEL = (
    # (estimator, predicate on its resolved hyperparameters, why)
    ("reinforce_pp", lambda p: True, "whitened over all tokens of the batch (no groups)"),
    ("reinforce_pp_baseline", lambda p: True, "group baseline, then whitened over all tokens of the batch"),
    ("grpo", lambda p: p["scale"] == "batch", "divides by one std of all rewards of the batch"),
    ("canon", lambda p: isinstance(p["mu"], str) and p["mu"] in ACCURACY_SCHEDULES, "mu = f(batch accuracy)"),
)


def batch_level_reason(cfg: Config) -> str | None:
    for name, predicate, reason in BATCH_LEVEL:
        if cfg.name == name and predicate(cfg.p):
            return reason
    return None


def is_group_local(cfg: Config) -> bool:
    return cfg.name in GROUP_LOCAL and batch_level_reason(cfg) is None


class TestGroupIndependence:
    GROUP_LOCAL = GROUP_LOCAL
    BATCH_LEVEL = BATCH_LEVEL

    def test_every_configuration_is_classified(self):
        for cfg in CONFIGS:
            local = cfg.name in self.GROUP_LOCAL and batch_level_reason(cfg) is None
            skipped = any(cfg.name == name and predicate(cfg.p) for name, predicate, _ in self.BATCH_LEVEL)
            assert local != skipped, f"{cfg.id}: classify it as group-local or list it in BATCH_LEVEL"
        skipped = {c.name for c in CONFIGS if batch_level_reason(c)}
        assert {"reinforce_pp", "reinforce_pp_baseline", "grpo"} <= skipped

    @pytest.mark.parametrize(
        "cfg",
        [c for c in CONFIGS if batch_level_reason(c)],
        ids=lambda c: c.id,
    )
    def test_skipped_configurations_really_are_batch_level(self, cfg):
        """A witness that the skip is needed: changing group 2 changes group 1's advantages."""
        base = Batch(
            rewards=_f32([1.0, 0.0, 0.0, 1.0, 0.0, 0.0]),
            gid=[1, 1, 1, 2, 2, 2],
            mask=np.ones((6, 3), dtype=bool),
            entropy=np.arange(18, dtype=np.float32).reshape(6, 3),
            metric=np.arange(6, dtype=np.float32),
        )
        changed = base.with_rewards([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
        assert not torch.equal(run(cfg, base)[:3], run(cfg, changed)[:3])

    @configs(is_group_local)
    @settings(max_examples=15, **SETTINGS)
    @given(b=batches(min_rows=1), data=st.data())
    def test_changing_one_group_leaves_the_others_unchanged(self, cfg, b, data):
        target = data.draw(st.sampled_from(sorted(set(b.gid))), label="group")
        rows = b.groups()[target]
        new_rewards = b.rewards.copy()
        new_rewards[rows] = data.draw(reward_arrays(len(rows)), label="new rewards")
        changed = b.with_rewards(new_rewards)
        if data.draw(st.booleans(), label="also change entropy, metric and mask"):
            rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
            changed.entropy = changed.entropy.copy()
            changed.entropy[rows] = rng.uniform(0.0, 20.0, (len(rows), b.T)).astype(np.float32)
            changed.metric = changed.metric.copy()
            changed.metric[rows] = rng.uniform(-100.0, 100.0, len(rows)).astype(np.float32)
            changed.mask = changed.mask.copy()
            changed.mask[rows] = rng.random((len(rows), b.T)) < 0.6
        others = torch.from_numpy(np.asarray(b.gid) != target)
        atol = max(error_scale(cfg, b), error_scale(cfg, changed))
        assert_close(run(cfg, changed)[others], run(cfg, b)[others], atol, "other groups")


# ---------------------------------------------------------------------------------------------------------------
# 3: zero sum within groups
# ---------------------------------------------------------------------------------------------------------------


def _zero_sum(c: Config) -> str | None:
    """Which groups' advantages sum to 0: "all", "even" (even number of valid rows) or None (not applicable)."""
    if not c.singleton_zero:  # 'raw' singletons keep their reward
        return None
    if c.name == "grpo" and c.p["eps"] > 0 or c.name in ("dr_grpo", "rloo", "dapo"):
        return "all"
    if c.name == "canon" and c.p["alpha"] == 1.0:
        # mu = 0 is intra only: zero sum within each half whatever the group's size; otherwise the inter terms
        # cancel only between equal halves.
        return "all" if c.p["mu"] == 0.0 else "even"
    return None


@configs(lambda c: _zero_sum(c) is not None)
@settings(max_examples=15, **SETTINGS)
@given(b=batches())
def test_zero_sum_within_groups(cfg, b):
    values = row_values(run(cfg, b), b)
    atol = error_scale(cfg, b)
    groups = [rows[b.valid[rows]] for rows in b.groups().values()]
    if _zero_sum(cfg) == "even":
        groups = [rows for rows in groups if len(rows) % 2 == 0]
    for rows in groups:
        total = values[rows].sum()
        assert abs(total) <= len(rows) * (atol + RTOL * np.abs(values[rows]).max(initial=0.0)), (
            f"group rows {rows.tolist()} sum to {total}: {values[rows].tolist()}"
        )


# ---------------------------------------------------------------------------------------------------------------
# 4: shift invariance, scale equivariance / invariance
# ---------------------------------------------------------------------------------------------------------------


def _shift_invariant(c: Config) -> bool:
    if not c.singleton_zero:  # 'raw' singletons keep the reward itself
        return False
    if c.name in ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline", "dapo"):
        return True
    return c.name == "canon" and c.p["alpha"] == 1.0 and not c.accuracy_mu


@configs(_shift_invariant)
@settings(max_examples=15, **SETTINGS)
@given(b=batches(), shift=st.floats(-1e3, 1e3, width=32, allow_subnormal=False))
def test_shift_invariance(cfg, b, shift):
    shifted = b.with_rewards(b.rewards + shift)
    atol = max(error_scale(cfg, b), error_scale(cfg, shifted))
    assert_close(run(cfg, shifted), run(cfg, b), atol, f"shift {shift}")


def _scale_equivariant(c: Config) -> bool:
    if c.name in ("dr_grpo", "rloo"):
        return True
    if c.name == "grpo":
        return c.p["scale"] == "none"
    return c.name == "canon" and not c.accuracy_mu  # linear in the rewards, alpha < 1 included


SCALES = st.one_of(st.sampled_from([0.125, 0.5, 2.0, 16.0]), st.floats(0.01, 100.0))


@configs(_scale_equivariant)
@settings(max_examples=15, **SETTINGS)
@given(b=batches(), k=SCALES)
def test_scale_equivariance(cfg, b, k):
    scaled = b.with_rewards(b.rewards * k)
    atol = max(error_scale(cfg, b) * k, error_scale(cfg, scaled))
    assert_close(run(cfg, scaled), k * run(cfg, b).double(), atol, f"scale {k}")


def _scale_invariant(c: Config) -> bool:
    """z-scores without eps: (k r - k m) / (k s) = (r - m) / s; all-equal groups are documented to give 0."""
    if c.name == "grpo":
        return c.p["eps"] == 0.0 and c.p["scale"] in ("group", "batch")
    return c.name == "dapo" and c.p["eps"] == 0.0 and not c.p["overlong"]


@configs(_scale_invariant)
@settings(max_examples=15, **SETTINGS)
@given(b=batches(), k=SCALES)
def test_scale_invariance(cfg, b, k):
    scaled = b.with_rewards(b.rewards * k)
    atol = max(error_scale(cfg, b), error_scale(cfg, scaled))
    assert_close(run(cfg, scaled), run(cfg, b), atol, f"scale {k}")


# ---------------------------------------------------------------------------------------------------------------
# 6: fully masked rows do not change the other rows
# ---------------------------------------------------------------------------------------------------------------


# metric="random" draws one number per batch position, so extra rows reshuffle it; everything else must ignore
# fully masked rows (they are excluded from every statistic, whitening included, since they carry no tokens).
@configs(lambda c: c.canon_metric != "random")
@settings(max_examples=15, **SETTINGS)
@given(b=batches(), data=st.data())
def test_inserting_fully_masked_rows_changes_nothing(cfg, b, data):
    k = data.draw(st.integers(1, 5), label="extra rows")
    ids = sorted(set(b.gid)) + [-999_999]  # existing groups or a group of its own
    extra_gid = data.draw(st.lists(st.sampled_from(ids), min_size=k, max_size=k), label="extra ids")
    extra_rewards = data.draw(reward_arrays(k), label="extra rewards")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    positions = np.sort(rng.choice(b.B + k, size=k, replace=False))  # where the extra rows go
    original = np.setdiff1d(np.arange(b.B + k), positions)
    order = np.empty(b.B + k, dtype=np.int64)
    order[original] = np.arange(b.B)
    order[positions] = b.B + np.arange(k)
    big = Batch(
        rewards=np.concatenate([b.rewards, extra_rewards]),
        gid=b.gid + extra_gid,
        mask=np.concatenate([b.mask, np.zeros((k, b.T), dtype=bool)]),
        entropy=np.concatenate([b.entropy, rng.uniform(-1e3, 1e3, (k, b.T)).astype(np.float32)]),
        metric=np.concatenate([b.metric, rng.uniform(-1e3, 1e3, k).astype(np.float32)]),
        group_form=b.group_form,
        mask_dtype=b.mask_dtype,
    ).take(order)
    out_big = run(cfg, big)
    assert (out_big[torch.from_numpy(positions)] == 0.0).all()
    assert_close(out_big[torch.from_numpy(original)], run(cfg, b), error_scale(cfg, b), "rows kept")


# ---------------------------------------------------------------------------------------------------------------
# 7: all-equal groups (and singletons) give exactly 0
# ---------------------------------------------------------------------------------------------------------------


def _constant_groups_zero(c: Config) -> bool:
    if c.name in ("grpo", "dr_grpo", "rloo"):
        return True
    if c.name == "canon":
        return c.p["alpha"] == 1.0  # CANON-Eff's alpha shaping deliberately does not vanish
    if c.name == "dapo":  # the overlong term differs within a group unless filtered or off
        return c.p["filter_groups"] or not c.p["overlong"] or c.p["max_length"] - c.p["buffer_length"] >= 12
    return False


@configs(_constant_groups_zero)
@settings(max_examples=15, **SETTINGS)
@given(b=batches(min_rows=1), data=st.data())
def test_all_equal_groups_give_exactly_zero(cfg, b, data):
    ids = sorted(set(b.gid))
    chosen = data.draw(st.lists(st.sampled_from(ids), min_size=1, unique=True), label="constant groups")
    rewards = b.rewards.copy()
    for g in chosen:
        rewards[b.groups()[g]] = data.draw(st.one_of(st.sampled_from([0.0, 1.0, -1.0]), FINITE_REWARD))
    b = b.with_rewards(rewards)
    out = run(cfg, b)
    values = row_values(out, b)
    for g in chosen:
        rows = b.groups()[g]
        rows = rows[b.valid[rows]]
        if len(rows) >= 2 or cfg.singleton_zero:
            assert (values[rows] == 0.0).all(), f"all-equal group {g}: {values[rows].tolist()}"
            assert (out[torch.from_numpy(rows)] == 0.0).all()
    if cfg.singleton_zero:  # a group of one valid response has no baseline: 0
        for rows in b.groups().values():
            rows = rows[b.valid[rows]]
            if len(rows) == 1:
                assert values[rows[0]] == 0.0, f"singleton row {rows[0]} got {values[rows[0]]}"
