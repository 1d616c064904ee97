"""Parity of canonrl's estimators with verl's own implementations (``verl.trainer.ppo.core_algos``).

verl's functions take ``token_level_rewards`` [B, T] (the outcome score on the last valid token), ``response_mask``
[B, T] and ``index``, a numpy object array of uid strings; they return ``(advantages, returns)``.

Where canonrl and verl follow the same convention the advantages agree within 1e-5 on random batches (groups of
unequal sizes, uids in shuffled order, right-padded masks of random lengths, binary and continuous rewards). Where
canonrl documents a different convention, the difference is tested *as a difference* on tiny hand-built batches:

- a fully masked row: verl counts it in its group's statistics (verl issue #6452), canonrl leaves it out;
- singletons: canonrl's default ``singleton="zero"`` gives 0, verl's grpo gives ~ the raw score;
- ``std="population"`` and ``eps`` other than verl's 1e-6;
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")  # ~6-8 s: imported once for the module
from omegaconf import OmegaConf  # noqa: E402  (a dependency of verl)

import canonrl  # noqa: E402
from canonrl.ops import discounted_returns  # noqa: E402

pytestmark = pytest.mark.verl

ATOL = 1e-5
RTOL = 1e-5
EPS = 1e-6  # verl's default epsilon
SEEDS = [0, 1, 2]

VERL = {
    "grpo": core_algos.compute_grpo_outcome_advantage,
    "grpo_vectorized": core_algos.compute_grpo_vectorized_outcome_advantage,
    "rloo": core_algos.compute_rloo_outcome_advantage,
    "rloo_vectorized": core_algos.compute_rloo_vectorized_outcome_advantage,
    "reinforce_plus_plus": core_algos.compute_reinforce_plus_plus_outcome_advantage,
    "reinforce_plus_plus_baseline": core_algos.compute_reinforce_plus_plus_baseline_outcome_advantage,
}


# ----------------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    rewards: torch.Tensor  # [B] float32
    index: np.ndarray  # [B] object array of uid strings
    mask: torch.Tensor  # [B, T] float32, right-padded
    token_level_rewards: torch.Tensor  # [B, T] the score on the last valid token
    sizes: list[int]  # group sizes, in uid order

    def without(self, row: int) -> Batch:
        keep = [i for i in range(len(self.index)) if i != row]
        return Batch(
            self.rewards[keep], self.index[keep], self.mask[keep], self.token_level_rewards[keep], list(self.sizes)
        )


def score_on_last_token(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl's placement: each row's score on its last mask position (nothing for a fully masked row)."""
    out = torch.zeros(mask.shape, dtype=torch.float32)
    for i in range(mask.shape[0]):
        valid = mask[i].nonzero().flatten()
        if len(valid):
            out[i, valid[-1]] = rewards[i]
    return out


def random_batch(seed: int, *, binary: bool, sizes: list[int] | None = None, T: int = 24) -> Batch:
    """Groups of unequal sizes (2..16 unless ``sizes`` is given), uids in shuffled order, right-padded masks."""
    g = torch.Generator().manual_seed(seed)
    if sizes is None:
        sizes = torch.randint(2, 17, (6,), generator=g).tolist()
        sizes[0], sizes[1] = 2, 16  # always unequal, both extremes present
    uids = [f"uid-{torch.randint(0, 16**8, (1,), generator=g).item():08x}-{k}" for k in range(len(sizes))]
    ordered = [uid for uid, n in zip(uids, sizes) for _ in range(n)]
    perm = torch.randperm(len(ordered), generator=g).tolist()
    index = np.array([ordered[i] for i in perm], dtype=object)
    B = len(index)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    if binary:
        rewards = torch.randint(0, 2, (B,), generator=g).float()
    else:
        rewards = torch.randn(B, generator=g) * 1.5 + 0.3
    return Batch(rewards, index, mask, score_on_last_token(rewards, mask), sizes)


def verl_adv(name: str, batch: Batch, **kwargs) -> torch.Tensor:
    fn = VERL[name]
    if name == "reinforce_plus_plus":
        advantages, _ = fn(batch.token_level_rewards.clone(), batch.mask.clone(), **kwargs)
    else:
        advantages, _ = fn(batch.token_level_rewards.clone(), batch.mask.clone(), batch.index, **kwargs)
    return advantages


def canon_adv(name: str, batch: Batch, **hyperparameters) -> torch.Tensor:
    return canonrl.advantages(name, rewards=batch.rewards, group=batch.index, mask=batch.mask, **hyperparameters)


def gamma_config(gamma: float):
    return OmegaConf.create({"gamma": gamma})


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected.float(), atol=ATOL, rtol=RTOL)


def verl_masked_whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-weighted mean, unbiased token variance, + 1e-8 (verl's masked_whiten), in float64, 0 off the mask."""
    values, mask = values.double(), mask.double()
    n = mask.sum()
    mean = (values * mask).sum() / n
    var = (((values - mean) ** 2) * mask).sum() / (n - 1)
    return ((values - mean) / torch.sqrt(var + 1e-8) * mask).float()


def test_random_batches_are_what_the_tests_claim():
    batch = random_batch(0, binary=True)
    assert len(set(batch.sizes)) > 1 and min(batch.sizes) >= 2 and max(batch.sizes) <= 16
    # uids are not contiguous: some uid's rows are interleaved with another's
    runs = sum(1 for a, b in zip(batch.index[:-1], batch.index[1:]) if a != b) + 1
    assert runs > len(batch.sizes)
    lengths = batch.mask.sum(-1)
    assert lengths.min() >= 1 and len(set(lengths.tolist())) > 1
    # right-padded, score on the last valid token
    assert torch.equal(batch.mask, batch.mask.cummin(-1).values)
    last = lengths.long() - 1
    assert torch.equal(batch.token_level_rewards[torch.arange(len(last)), last], batch.rewards)
    assert torch.equal(batch.token_level_rewards.sum(-1), batch.rewards)
    assert set(batch.rewards.tolist()) == {0.0, 1.0}


# ----------------------------------------------------------------------------------------------------------------
# Agreement where the conventions are the same
# ----------------------------------------------------------------------------------------------------------------

AGREEMENT = [
    # id, canonrl name, canonrl hyperparameters, verl name, verl kwargs
    ("grpo", "grpo", {}, "grpo", {}),
    ("grpo-vectorized", "grpo", {}, "grpo_vectorized", {}),
    ("grpo-explicit", "grpo", {"eps": EPS, "std": "unbiased"}, "grpo", {"epsilon": EPS}),
    ("grpo-eps-1e-2", "grpo", {"eps": 1e-2}, "grpo_vectorized", {"epsilon": 1e-2}),
    ("grpo-scale-none", "grpo", {"scale": "none"}, "grpo", {"norm_adv_by_std_in_grpo": False}),
    ("grpo-scale-none-vec", "grpo", {"scale": "none"}, "grpo_vectorized", {"norm_adv_by_std_in_grpo": False}),
    ("dr_grpo", "dr_grpo", {}, "grpo", {"norm_adv_by_std_in_grpo": False}),
    ("dr_grpo-vec", "dr_grpo", {}, "grpo_vectorized", {"norm_adv_by_std_in_grpo": False}),
    ("rloo", "rloo", {}, "rloo", {}),
    ("rloo-vectorized", "rloo", {}, "rloo_vectorized", {}),
    ("reinforce_pp-gamma1", "reinforce_pp", {"gamma": 1.0}, "reinforce_plus_plus", {"config": gamma_config(1.0)}),
    ("reinforce_pp-gamma0.9", "reinforce_pp", {"gamma": 0.9}, "reinforce_plus_plus", {"config": gamma_config(0.9)}),
    ("reinforce_pp_baseline", "reinforce_pp_baseline", {}, "reinforce_plus_plus_baseline", {}),
]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "continuous"])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "name, hyperparameters, verl_name, verl_kwargs", [case[1:] for case in AGREEMENT], ids=[c[0] for c in AGREEMENT]
)
def test_agrees_with_verl(name, hyperparameters, verl_name, verl_kwargs, seed, binary):
    batch = random_batch(seed, binary=binary)
    expected = verl_adv(verl_name, batch, **verl_kwargs)
    actual = canon_adv(name, batch, **hyperparameters)
    assert actual.shape == batch.mask.shape and actual.dtype == torch.float32
    assert expected.abs().max() > 0.1  # a non-trivial comparison
    assert_close(actual, expected)
    assert torch.all(actual[batch.mask == 0] == 0)


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.5])
@pytest.mark.parametrize("seed", SEEDS)
def test_reinforce_pp_token_rewards_agree_with_verl(seed, gamma):
    """Per-token rewards (a KL-like penalty on every response token plus the outcome on the last one)."""
    batch = random_batch(seed, binary=False)
    g = torch.Generator().manual_seed(1000 + seed)
    kl = -0.05 * torch.rand(batch.mask.shape, generator=g)
    token_rewards = (kl * batch.mask + batch.token_level_rewards)
    # Padding holds garbage: both implementations must ignore rewards outside the mask.
    token_rewards = torch.where(batch.mask > 0, token_rewards, 7.0 * torch.randn(batch.mask.shape, generator=g))
    expected, _ = VERL["reinforce_plus_plus"](token_rewards.clone(), batch.mask.clone(), config=gamma_config(gamma))
    actual = canonrl.advantages(
        "reinforce_pp", token_rewards=token_rewards, group=batch.index, mask=batch.mask, gamma=gamma
    )
    assert expected.abs().max() > 0.1
    assert_close(actual, expected)
    # ...and the per-token penalty matters: outcome-only advantages are different.
    outcome_only = canon_adv("reinforce_pp", batch, gamma=gamma)
    assert (actual - outcome_only).abs().max() > 1e-3


@pytest.mark.parametrize("seed", SEEDS)
def test_sequence_estimators_accept_token_rewards_like_verl(seed):
    """token_rewards without rewards: the outcome is the masked row sum, as verl's ``token_level_rewards.sum(-1)``."""
    batch = random_batch(seed, binary=True)
    g = torch.Generator().manual_seed(2000 + seed)
    token_rewards = batch.token_level_rewards - 0.02 * torch.rand(batch.mask.shape, generator=g) * batch.mask
    for name, verl_name in [("grpo", "grpo"), ("rloo", "rloo_vectorized"), ("reinforce_pp_baseline", "reinforce_plus_plus_baseline")]:
        expected, _ = VERL[verl_name](token_rewards.clone(), batch.mask.clone(), batch.index)
        actual = canonrl.advantages(name, token_rewards=token_rewards, group=batch.index, mask=batch.mask)
        assert_close(actual, expected)


def test_integer_group_ids_and_int_mask_agree_with_verl_uids():
    """The same grouping given as int ids (in another order) and an int64 mask gives the same result."""
    batch = random_batch(3, binary=False)
    _, codes = np.unique(batch.index, return_inverse=True)
    int_ids = torch.from_numpy((codes * 7919 + 13).astype(np.int64))  # non-contiguous integer ids
    expected = verl_adv("grpo", batch)
    actual = canonrl.advantages("grpo", rewards=batch.rewards, group=int_ids, mask=batch.mask.long())
    assert_close(actual, expected)


# ----------------------------------------------------------------------------------------------------------------
# Singleton groups
# ----------------------------------------------------------------------------------------------------------------

SINGLETON_SIZES = [1, 5, 1, 2, 16, 1, 9, 1, 3]


def singleton_rows(batch: Batch) -> torch.Tensor:
    uids, counts = np.unique(batch.index, return_counts=True)
    alone = {u for u, c in zip(uids, counts) if c == 1}
    return torch.tensor([u in alone for u in batch.index])


RAW_SINGLETONS = [
    ("grpo", "grpo", {"singleton": "raw"}, "grpo", {}),
    ("grpo-vectorized", "grpo", {"singleton": "raw"}, "grpo_vectorized", {}),
    ("grpo-scale-none", "grpo", {"singleton": "raw", "scale": "none"}, "grpo", {"norm_adv_by_std_in_grpo": False}),
    ("dr_grpo", "dr_grpo", {"singleton": "raw"}, "grpo", {"norm_adv_by_std_in_grpo": False}),
    ("dr_grpo-vec", "dr_grpo", {"singleton": "raw"}, "grpo_vectorized", {"norm_adv_by_std_in_grpo": False}),
    ("rloo-loop", "rloo", {"singleton": "raw"}, "rloo", {}),
    ("reinforce_pp_baseline", "reinforce_pp_baseline", {"singleton": "raw"}, "reinforce_plus_plus_baseline", {}),
]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "continuous"])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "name, hyperparameters, verl_name, verl_kwargs", [c[1:] for c in RAW_SINGLETONS], ids=[c[0] for c in RAW_SINGLETONS]
)
def test_singleton_raw_matches_verl(name, hyperparameters, verl_name, verl_kwargs, seed, binary):
    batch = random_batch(seed, binary=binary, sizes=SINGLETON_SIZES)
    alone = singleton_rows(batch)
    assert alone.sum() == 4
    expected = verl_adv(verl_name, batch, **verl_kwargs)
    actual = canon_adv(name, batch, **hyperparameters)
    assert_close(actual, expected)


@pytest.mark.parametrize("seed", SEEDS)
def test_singleton_raw_is_the_raw_score(seed):
    batch = random_batch(seed, binary=False, sizes=SINGLETON_SIZES)
    alone = singleton_rows(batch)
    for name, value in [("grpo", batch.rewards / (1 + EPS)), ("dr_grpo", batch.rewards), ("rloo", batch.rewards)]:
        actual = canon_adv(name, batch, singleton="raw")
        assert_close(actual[alone], (value[:, None] * batch.mask)[alone])


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "continuous"])
@pytest.mark.parametrize("seed", SEEDS)
def test_singleton_zero_matches_verl_rloo_vectorized(seed, binary):
    batch = random_batch(seed, binary=binary, sizes=SINGLETON_SIZES)
    expected = verl_adv("rloo_vectorized", batch)
    actual = canon_adv("rloo", batch)  # default singleton="zero"
    assert_close(actual, expected)
    assert torch.all(actual[singleton_rows(batch)] == 0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "name, verl_name, verl_kwargs",
    [
        ("grpo", "grpo", {}),
        ("grpo", "grpo_vectorized", {}),
        ("dr_grpo", "grpo", {"norm_adv_by_std_in_grpo": False}),
        ("rloo", "rloo", {}),
    ],
)
def test_singleton_zero_differs_from_verl(name, verl_name, verl_kwargs, seed):
    """Default singleton="zero": canonrl gives exactly 0 where verl keeps ~ the raw score; other rows agree."""
    batch = random_batch(seed, binary=False, sizes=SINGLETON_SIZES)
    alone = singleton_rows(batch)
    assert torch.all(batch.rewards[alone].abs() > 1e-3)
    expected = verl_adv(verl_name, batch, **verl_kwargs)
    actual = canon_adv(name, batch)
    # the difference: exactly 0 here, ~ r / (1 + eps) (or r) in verl
    assert torch.equal(actual[alone], torch.zeros_like(actual[alone]))
    raw = batch.rewards[alone] / (1 + EPS) if verl_kwargs.get("norm_adv_by_std_in_grpo", True) else batch.rewards[alone]
    assert_close(expected[alone], raw[:, None] * batch.mask[alone])
    assert (expected[alone] - actual[alone]).abs().max() > 1e-3
    # the rest of the batch is unaffected (sequence-level estimators: no coupling between groups)
    assert_close(actual[~alone], expected[~alone])


@pytest.mark.parametrize("seed", SEEDS)
def test_singleton_zero_is_verl_with_the_singletons_scores_zeroed(seed):
    """For estimators with batch whitening (RF++-baseline) "zero" shifts every row; it equals verl run with the
    singletons' scores set to 0 (a zero-baseline singleton with score 0 contributes 0), and differs from plain verl."""
    batch = random_batch(seed, binary=False, sizes=SINGLETON_SIZES)
    alone = singleton_rows(batch)
    zeroed_rewards = batch.rewards.where(~alone, 0.0)
    zeroed = Batch(zeroed_rewards, batch.index, batch.mask, score_on_last_token(zeroed_rewards, batch.mask), batch.sizes)
    actual = canon_adv("reinforce_pp_baseline", batch)
    assert_close(actual, verl_adv("reinforce_plus_plus_baseline", zeroed))
    assert (actual - verl_adv("reinforce_plus_plus_baseline", batch)).abs().max() > 1e-2
    for name, verl_name, verl_kwargs in [
        ("grpo", "grpo", {}),
        ("dr_grpo", "grpo", {"norm_adv_by_std_in_grpo": False}),
        ("rloo", "rloo", {}),
    ]:
        assert_close(canon_adv(name, batch), verl_adv(verl_name, zeroed, **verl_kwargs))


# ----------------------------------------------------------------------------------------------------------------
# (a) A fully masked row: verl counts it in its group (issue #6452), canonrl does not
# ----------------------------------------------------------------------------------------------------------------


def batch_with_masked_row() -> tuple[Batch, int, torch.Tensor]:
    """Group "p": rewards 1, 0, 1 plus a fully masked row (reward 0); group "q": 0, 1, 1. Shuffled order."""
    index = np.array(["q", "p", "p", "q", "p", "p", "q"], dtype=object)
    rewards = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    lengths = torch.tensor([3, 5, 2, 4, 0, 1, 5])  # row 4 is fully masked
    mask = (torch.arange(5)[None, :] < lengths[:, None]).float()
    batch = Batch(rewards, index, mask, score_on_last_token(rewards, mask), [4, 3])
    siblings = torch.tensor([False, True, True, False, False, True, False])  # the valid rows of "p"
    return batch, 4, siblings


MASKED_ROW_CASES = [
    ("grpo", {}, "grpo", {}, True),
    ("grpo", {}, "grpo_vectorized", {}, True),
    ("dr_grpo", {}, "grpo", {"norm_adv_by_std_in_grpo": False}, True),
    ("rloo", {}, "rloo", {}, True),
    ("rloo", {}, "rloo_vectorized", {}, True),
    ("reinforce_pp_baseline", {}, "reinforce_plus_plus_baseline", {}, False),
]


@pytest.mark.parametrize(
    "name, hyperparameters, verl_name, verl_kwargs, per_group",
    MASKED_ROW_CASES,
    ids=[f"{c[0]}-vs-{c[2]}" for c in MASKED_ROW_CASES],
)
def test_fully_masked_row_differs_from_verl(name, hyperparameters, verl_name, verl_kwargs, per_group):
    batch, masked, siblings = batch_with_masked_row()
    verl_full = verl_adv(verl_name, batch, **verl_kwargs)
    actual = canon_adv(name, batch, **hyperparameters)

    # Both give the masked row nothing.
    assert torch.all(actual[masked] == 0) and torch.all(verl_full[masked] == 0)
    # canonrl equals verl run on the batch with that row removed...
    keep = [i for i in range(len(batch.index)) if i != masked]
    assert_close(actual[keep], verl_adv(verl_name, batch.without(masked), **verl_kwargs))
    # ...and differs from verl on the full batch for the masked row's siblings (verl counts the row).
    assert (actual[siblings] - verl_full[siblings]).abs().max() > 0.05
    if per_group:  # without batch whitening the other group is untouched
        other = ~siblings
        other[masked] = False
        assert_close(actual[other], verl_full[other])


def test_fully_masked_row_grpo_values():
    """The numbers behind the difference: group p's statistics over {1, 0, 1} vs verl's over {1, 0, 1, 0}."""
    batch, masked, siblings = batch_with_masked_row()
    rows = siblings.nonzero().flatten()  # rewards 1, 0, 1
    actual = canon_adv("grpo", batch)[rows, 0]
    verl_full = verl_adv("grpo", batch)[rows, 0]
    mean, std = 2 / 3, math.sqrt(1 / 3)  # canonrl: over the three valid rows
    assert_close(actual, torch.tensor([1 - mean, 0 - mean, 1 - mean]) / (std + EPS))
    mean, std = 1 / 2, math.sqrt(1 / 3)  # verl: the masked row's 0 counts
    assert_close(verl_full, torch.tensor([1 - mean, 0 - mean, 1 - mean]) / (std + EPS))


# ----------------------------------------------------------------------------------------------------------------
# (b) GRPO's std / eps conventions
# ----------------------------------------------------------------------------------------------------------------


def tiny_grpo_batch() -> Batch:
    index = np.array(["a", "b", "a", "b", "b", "b"], dtype=object)
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # a: {1, 0}; b: {1, 0, 0, 0}
    lengths = torch.tensor([2, 3, 1, 3, 2, 3])
    mask = (torch.arange(3)[None, :] < lengths[:, None]).float()
    return Batch(rewards, index, mask, score_on_last_token(rewards, mask), [2, 4])


def test_grpo_population_std_differs_from_verl():
    batch = tiny_grpo_batch()
    verl = verl_adv("grpo", batch)[:, 0]
    unbiased = canon_adv("grpo", batch, std="unbiased")[:, 0]
    population = canon_adv("grpo", batch, std="population")[:, 0]
    assert_close(unbiased, verl)
    # unbiased std: a sqrt(1/2), b 1/2; population std: a 1/2, b sqrt(3)/4
    centered = torch.tensor([0.5, 0.75, -0.5, -0.25, -0.25, -0.25])
    a_unbiased, b_unbiased = math.sqrt(0.5), 0.5
    a_population, b_population = 0.5, math.sqrt(3) / 4
    group_a = torch.tensor([True, False, True, False, False, False])
    std_unbiased = torch.where(group_a, a_unbiased, b_unbiased)
    std_population = torch.where(group_a, a_population, b_population)
    assert_close(verl, centered / (std_unbiased + EPS))
    assert_close(population, centered / (std_population + EPS))
    assert (population - verl).abs().min() > 0.05  # every row differs
    # population = unbiased * sqrt(n / (n - 1)) per group (up to eps)
    n = torch.tensor([2.0, 4, 2, 4, 4, 4])
    torch.testing.assert_close(population, verl * torch.sqrt(n / (n - 1)), atol=1e-4, rtol=1e-4)


def test_grpo_eps_differs_from_verl_default():
    batch = tiny_grpo_batch()
    canon = canon_adv("grpo", batch, eps=0.1)
    assert_close(canon, verl_adv("grpo", batch, epsilon=0.1))
    assert (canon - verl_adv("grpo", batch)).abs().max() > 0.05


# ----------------------------------------------------------------------------------------------------------------
# (c) REINFORCE++ with a hole inside a response's mask
# ----------------------------------------------------------------------------------------------------------------
#
# verl 0.9.x carries the running return through masked positions unchanged (no reward added, no discount applied),
# so that rewards propagate past observation spans of multi-turn rollouts; canonrl discounts per mask token too.
# Both agree for any gamma, with holes and with right-padded masks.


def holed_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row 0: tokens 0 and 3 with a hole at 1-2 and the reward 1 on token 3; row 1: five tokens, reward 0.5."""
    mask = torch.tensor([[1.0, 0, 0, 1, 0], [1, 1, 1, 1, 1]])
    token_level_rewards = torch.tensor([[0.0, 0, 0, 1, 0], [0, 0, 0, 0, 0.5]])
    return mask, token_level_rewards, torch.tensor([1.0, 0.5])


def test_reinforce_pp_hole_gamma_below_one_agrees_with_verl():
    """Discounting counts mask tokens, as verl 0.9 does: the hole is skipped, not discounted."""
    mask, tlr, rewards = holed_batch()
    gamma = 0.9
    verl_advantages, verl_returns = VERL["reinforce_plus_plus"](tlr.clone(), mask.clone(), config=gamma_config(gamma))
    # token 0 is one mask token before the reward: gamma^1, not gamma^3 (three positions away)
    right_row = [gamma**4, gamma**3, gamma**2, gamma, 1.0]
    expected_returns = torch.tensor([[gamma, 0, 0, 1, 0], [0.5 * x for x in right_row]])
    assert_close(verl_returns, expected_returns)
    assert_close(discounted_returns(tlr, mask, gamma), expected_returns)
    for kwargs in ({"rewards": rewards}, {"token_rewards": tlr}):
        actual = canonrl.advantages("reinforce_pp", group=[0, 1], mask=mask, gamma=gamma, **kwargs)
        assert_close(actual, verl_advantages)
        assert actual.abs().max() > 0.1


@pytest.mark.parametrize("as_token_rewards", [False, True])
def test_reinforce_pp_hole_gamma_one_agrees_with_verl(as_token_rewards):
    """A reward after the hole reaches the tokens before it in both (verl 0.9 carries, it does not reset)."""
    mask, tlr, rewards = holed_batch()
    verl_advantages, verl_returns = VERL["reinforce_plus_plus"](tlr.clone(), mask.clone(), config=gamma_config(1.0))
    assert verl_returns[0, 0] == 1.0  # carried over the hole, not reset to 0
    kwargs = {"token_rewards": tlr} if as_token_rewards else {"rewards": rewards}
    actual = canonrl.advantages("reinforce_pp", group=[0, 1], mask=mask, gamma=1.0, **kwargs)
    assert_close(actual, verl_advantages)
    assert actual[0, 0] == actual[0, 3] != 0


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.5])
def test_reinforce_pp_right_padded_agrees_with_verl(gamma):
    """The same rewards without the hole (right-padded): agreement for every gamma."""
    mask = torch.tensor([[1.0, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    rewards = torch.tensor([1.0, 0.5, -1.0])
    tlr = score_on_last_token(rewards, mask)
    expected, _ = VERL["reinforce_plus_plus"](tlr.clone(), mask.clone(), config=gamma_config(gamma))
    actual = canonrl.advantages("reinforce_pp", rewards=rewards, group=[0, 1, 2], mask=mask, gamma=gamma)
    assert_close(actual, expected)
    assert expected.abs().max() > 0.1
