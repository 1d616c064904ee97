"""canonrl estimators under SkyRL's advantage-estimator contract.

Without SkyRL (the usual case: its training extra needs CUDA wheels) the adapter's functions are called exactly as
SkyRL's ``compute_advantages_and_returns`` calls a registered estimator, on hand-built tensors, and the registration
logic runs against a stand-in with the registry's semantics. With SkyRL's training code importable, the real
``AdvantageEstimatorRegistry`` is used too.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest
import torch

import canonrl
from canonrl.integrations import skyrl as adapter

# Unequal groups (3, 2, 4, 1 rows, interleaved), unequal lengths, two fully masked rows.
UIDS = ["a", "b", "a", "c", "b", "c", "a", "c", "c", "d"]
LENGTHS = [5, 3, 0, 6, 2, 4, 1, 6, 0, 3]
OUTCOMES = [1.0, 0.0, 1.0, 0.5, 1.0, 0.0, 0.0, 1.0, 0.25, 1.0]
T = 6


def skyrl_batch():
    """SkyRL's inputs: per-token rewards (the outcome on the last response token), a 0/1 mask, uids as a list."""
    mask = torch.zeros(len(UIDS), T)
    rewards = torch.zeros(len(UIDS), T)
    for i, (length, outcome) in enumerate(zip(LENGTHS, OUTCOMES)):
        mask[i, :length] = 1.0
        if length:
            rewards[i, length - 1] = outcome
    return rewards, mask, list(UIDS)


def call_like_skyrl(fn, rewards, mask, index, grpo_norm_by_std=True):
    """As ``ppo_utils.compute_advantages_and_returns`` calls the registry's function (skyrl 0.3.0)."""
    return fn(
        token_level_rewards=rewards,
        response_mask=mask,
        index=index,
        values=torch.zeros_like(rewards),
        grpo_norm_by_std=grpo_norm_by_std,
        gamma=1.0,
        lambd=1.0,
        config=object(),  # SkyRL's AlgorithmConfig, which the adapter does not read
    )


CASES = [
    ("grpo", {}),
    ("dr_grpo", {}),
    ("rloo", {}),
    ("canon", {"split_by": "length"}),
]


@pytest.mark.parametrize(("name", "params"), CASES, ids=[c[0] for c in CASES])
def test_wrapped_function_equals_canonrl(name, params):
    rewards, mask, index = skyrl_batch()
    advantages, returns = call_like_skyrl(adapter.advantage_fn(name, params), rewards, mask, index)
    expected = canonrl.advantages(name, rewards=rewards.sum(-1), group=index, mask=mask, **params)
    assert advantages.shape == (len(UIDS), T)
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, advantages)
    assert (advantages[mask == 0] == 0).all()
    assert (advantages[[2, 8]] == 0).all()  # masked rows
    assert advantages[mask.bool()].abs().sum() > 0


def test_uids_as_numpy_array_like_step_wise_training():
    rewards, mask, index = skyrl_batch()
    fn = adapter.advantage_fn("rloo")
    as_list, _ = call_like_skyrl(fn, rewards, mask, index)
    as_array, _ = call_like_skyrl(fn, rewards, mask, np.array(index))
    torch.testing.assert_close(as_array, as_list)


def test_grpo_norm_by_std_false_selects_scale_none():
    rewards, mask, index = skyrl_batch()
    advantages, _ = call_like_skyrl(adapter.advantage_fn("grpo"), rewards, mask, index, grpo_norm_by_std=False)
    expected = canonrl.advantages("grpo", rewards=rewards.sum(-1), group=index, mask=mask, scale="none")
    torch.testing.assert_close(advantages, expected)
    scaled, _ = call_like_skyrl(adapter.advantage_fn("grpo", {"scale": "group"}), rewards, mask, index, False)
    assert not torch.allclose(scaled, advantages)  # an explicit scale wins over grpo_norm_by_std


def test_one_function_per_name_and_hyperparameters():
    assert adapter.advantage_fn("grpo") is adapter.advantage_fn("grpo", {})
    assert adapter.advantage_fn("canon", {"split_by": "length"}) is not adapter.advantage_fn("canon")
    assert adapter.advantage_fn("grpo").canonrl_name == "grpo"


def test_import_canonrl_does_not_import_skyrl():
    code = (
        "import sys, canonrl, canonrl.integrations.skyrl\n"
        "assert not any(m == 'skyrl' or m.startswith(('skyrl.', 'skyrl_train')) for m in sys.modules), 'skyrl'\n"
        "assert 'verl' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _importable(module):
    try:
        importlib.import_module(module)
    except Exception:  # ImportError, or skyrl 0.3.0's pydantic error on Python 3.11
        return False
    return True


SKYRL_MODULE = next((m for m in adapter.REGISTRY_MODULES if _importable(m)), None)


@pytest.mark.skipif(SKYRL_MODULE is not None, reason="SkyRL is installed")
def test_without_skyrl_register_fails_in_one_line():
    with pytest.raises(ImportError, match="needs SkyRL's training code") as error:
        adapter.register_estimators()
    assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------------------------------------------
# Registration against a stand-in with the semantics of SkyRL 0.3.0's BaseFunctionRegistry (no Ray)
# ----------------------------------------------------------------------------------------------------------------


class FakeRegistry:
    _functions: dict = {}

    @classmethod
    def register(cls, name, func):
        if name in cls._functions:
            raise ValueError(f"advantage estimator '{name}' already registered")
        cls._functions[name] = func

    @classmethod
    def get(cls, name):
        return cls._functions[name]

    @classmethod
    def list_available(cls):
        return list(cls._functions)


@pytest.fixture
def fake_registry(monkeypatch):
    FakeRegistry._functions = {"grpo": object(), "rloo": object()}
    monkeypatch.setattr(adapter, "registry", lambda: FakeRegistry)
    monkeypatch.setattr(adapter, "SKYRL_NAMES", {})
    monkeypatch.setattr(adapter, "SKIPPED", {})
    return FakeRegistry


def test_default_registration_reads_the_registry(fake_registry):
    names = adapter.register_estimators()
    for info in canonrl.estimators():
        skyrl_name = f"canonrl_{info.name}"
        if skyrl_name in names:
            assert info.outcome_level and not info.critic
            assert not [f for f in info.requires if f not in ("rewards", "group", "mask", *adapter.SKYRL.provides)]
        else:
            assert info.name in adapter.SKIPPED, info.name
    assert {"canonrl_grpo", "canonrl_dr_grpo", "canonrl_rloo", "canonrl_gdpo"} <= set(names)
    assert "entropy" in adapter.SKIPPED["canon"] and "gae" in adapter.SKIPPED and "gigpo" in adapter.SKIPPED
    assert fake_registry._functions["grpo"] is not fake_registry._functions["canonrl_grpo"]  # SkyRL's kept
    assert adapter.register_estimators() == names  # idempotent


def test_hyperparameters_make_canon_registrable(fake_registry):
    names = adapter.register_estimators(["canon", "canonrl_grpo"], {"canon": {"split_by": "length"}})
    assert names == {"canonrl_canon": "canon", "canonrl_grpo": "grpo"}
    rewards, mask, index = skyrl_batch()
    advantages, _ = call_like_skyrl(fake_registry.get("canonrl_canon"), rewards, mask, index)
    expected = canonrl.advantages("canon", rewards=rewards.sum(-1), group=index, mask=mask, split_by="length")
    torch.testing.assert_close(advantages, expected)
    with pytest.raises(ValueError, match="already has an advantage estimator 'canonrl_canon'"):
        adapter.register_estimators(["canon"], {"canon": {"split_by": "random"}})


def test_explicit_names_skyrl_cannot_feed_raise(fake_registry):
    with pytest.raises(ValueError, match="cannot register 'canon'.*needs entropy"):
        adapter.register_estimators(["canon"])
    with pytest.raises(ValueError, match="step-level"):
        adapter.register_estimators(["gigpo"])
    with pytest.raises(ValueError, match="unknown hyperparameter 'nope'"):
        adapter.register_estimators(["grpo"], {"grpo": {"nope": 1}})
    with pytest.raises(ValueError, match="unknown estimator"):
        adapter.register_estimators(["no_such_estimator"])
    assert "canonrl_canon" not in fake_registry._functions


# ----------------------------------------------------------------------------------------------------------------
# The real registry (runs only where SkyRL's training code imports)
# ----------------------------------------------------------------------------------------------------------------


def _unregister_canonrl(registry):
    for name in list(registry.list_available()):
        if name.startswith(adapter.PREFIX):
            registry.unregister(name)


def test_real_skyrl_registry():
    if SKYRL_MODULE is None:
        pytest.importorskip(adapter.REGISTRY_MODULES[0])
    ppo_utils = importlib.import_module(SKYRL_MODULE)
    registry = ppo_utils.AdvantageEstimatorRegistry
    _unregister_canonrl(registry)
    try:
        names = adapter.register_estimators(hyperparameters={"canon": {"split_by": "length"}})
        assert {"canonrl_grpo", "canonrl_rloo", "canonrl_dr_grpo", "canonrl_canon"} <= set(names)
        assert set(names) <= set(registry.list_available())
        assert adapter.register_estimators(hyperparameters={"canon": {"split_by": "length"}}) == names
        rewards, mask, index = skyrl_batch()
        for name, params in CASES:
            advantages, returns = ppo_utils.compute_advantages_and_returns(
                token_level_rewards=rewards.clone(),
                response_mask=mask,
                index=index,
                adv_estimator=f"canonrl_{name}",
                config=None,
                values=None,
                gamma=1.0,
                lambd=1.0,
                grpo_norm_by_std=True,
            )
            expected = canonrl.advantages(name, rewards=rewards.sum(-1), group=index, mask=mask, **params)
            torch.testing.assert_close(advantages, expected)
            torch.testing.assert_close(returns, advantages)
        # SkyRL's own GRPO and RLOO on groups of two or more rows with tokens (SkyRL gives a lone row mean 0, std 1
        # and counts a fully masked row's reward in its group; canonrl leaves such a row out)
        keep = [
            i for i, uid in enumerate(UIDS) if LENGTHS[i] and sum(u == uid and n > 0 for u, n in zip(UIDS, LENGTHS)) > 1
        ]
        sub = (rewards[keep], mask[keep], [UIDS[i] for i in keep])
        for name in ("grpo", "rloo"):
            ours, _ = call_like_skyrl(registry.get(f"canonrl_{name}"), *sub)
            theirs, _ = call_like_skyrl(registry.get(name), sub[0].clone(), sub[1], sub[2])
            torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=1e-5)
    finally:
        _unregister_canonrl(registry)
        adapter.SKYRL_NAMES.clear()


def _group_sizes():
    sizes = defaultdict(int)
    for uid in UIDS:
        sizes[uid] += 1
    return dict(sizes)


def test_the_batch_has_unequal_groups_and_masked_rows():
    assert sorted(_group_sizes().values()) == [1, 2, 3, 4]
    assert LENGTHS.count(0) == 2
