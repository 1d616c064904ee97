"""Parity of the step and critic estimators with their reference implementations on random agent batches:
verl's ``compute_gae_advantage_return`` (from the PyPI wheel) and the official GiGPO, HGPO and TRLOO code
transcribed as oracles (tests/official_*.py), in both numerics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import canonrl
import official_trloo
from canonrl.reference import official_gigpo, official_hgpo

SEEDS = range(6)


def agent_batch(seed: int, *, groups: int = 3, trajectories: int = 4, max_steps: int = 5, anchors: int = 3):
    """Row-per-step rows in the official code's batch order (trajectory after trajectory, steps in time order)."""
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(groups):
        for t in range(trajectories):
            outcome = float(rng.integers(0, 2))
            for s in range(int(rng.integers(1, max_steps + 1))):
                reward = float(rng.choice([0.0, 0.0, 1.0, -0.5, 0.3]))
                rows.append((f"g{g}", f"g{g}-t{t}", s, reward, int(rng.integers(0, anchors)), outcome))
    n, width = len(rows), 4
    batch = dict(
        group=np.array([r[0] for r in rows], dtype=object),
        traj=np.array([r[1] for r in rows], dtype=object),
        step_index=torch.tensor([r[2] for r in rows]),
        step_rewards=torch.tensor([r[3] for r in rows], dtype=torch.float32),
        anchor=np.array([r[4] for r in rows], dtype=object),
        rewards=torch.tensor([r[5] for r in rows], dtype=torch.float32),
        mask=torch.ones(n, width),
    )
    token_rewards = torch.zeros(n, width)
    token_rewards[:, -1] = batch["rewards"]
    return batch, token_rewards


def canonrl_fields(batch: dict, permutation: np.ndarray | None = None) -> dict:
    order = np.arange(len(batch["rewards"])) if permutation is None else permutation
    return {
        "rewards": batch["rewards"][order],
        "group": list(batch["group"][order]),
        "traj": list(batch["traj"][order]),
        "step_index": batch["step_index"][order],
        "step_rewards": batch["step_rewards"][order],
        "anchor": list(batch["anchor"][order]),
        "mask": batch["mask"][order],
    }


def official_returns(batch: dict, gamma: float) -> torch.Tensor:
    n = len(batch["rewards"])
    return official_gigpo.step_discounted_returns(batch["step_rewards"].numpy(), batch["traj"], np.ones(n, bool), gamma)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", ["mean_norm", "mean_std_norm"])
@pytest.mark.parametrize("episode_stats", ["steps", "trajectories"])
def test_gigpo_matches_the_official_code(seed, mode, episode_stats):
    batch, token_rewards = agent_batch(seed)
    expected, _ = official_gigpo.gigpo_advantage(
        token_rewards, official_returns(batch, 0.95), batch["mask"], batch["anchor"], batch["group"], batch["traj"],
        step_advantage_w=0.7, mode=mode, compute_mean_std_cross_steps=episode_stats == "steps",
    )
    params = dict(gamma=0.95, step_advantage_w=0.7, mode=mode, episode_stats=episode_stats)
    for numerics in ("exact", "upstream"):
        out = canonrl.advantages("gigpo", numerics=numerics, **params, **canonrl_fields(batch))
        assert torch.allclose(out, expected, atol=1e-5), numerics
    # the official code reads time from batch order; canonrl from step_index, so a shuffled batch gives the same
    permutation = np.random.default_rng(seed).permutation(len(batch["rewards"]))
    shuffled = canonrl.advantages("gigpo", **params, **canonrl_fields(batch, permutation))
    assert torch.allclose(shuffled, expected[permutation], atol=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("history_length", [0, 1, 2, 4])
def test_hgpo_matches_the_official_code(seed, history_length):
    batch, token_rewards = agent_batch(seed, max_steps=6, anchors=2)
    returns = official_returns(batch, 0.95)
    for mode, base_group, alpha in [("mean_std_norm", False, 1.0), ("mean_norm", True, 1.0), ("mean_std_norm", True, 0.0)]:
        expected, _ = official_hgpo.hgpo_advantage(
            token_rewards, returns, batch["mask"], batch["anchor"], batch["group"], batch["traj"], history_length,
            mode=mode, length_weight_alpha=alpha, base_group=base_group,
        )
        params = dict(history_length=history_length, mode=mode, length_weight_alpha=alpha, base_group=base_group)
        out = canonrl.advantages("hgpo", **params, **canonrl_fields(batch))
        assert torch.allclose(out, expected, atol=1e-5), (mode, base_group, alpha)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_trloo_matches_the_official_code_on_its_grid(seed, gamma):
    rng = np.random.default_rng(seed)
    max_turns, rows = 3, []
    for g in range(3):
        for t in range(5):
            turns = int(rng.integers(1, max_turns + 1))
            for s in range(max_turns):
                live = s < turns
                rows.append((g, f"{g}-{t}", s if live else -1, float(rng.normal()) if live else 0.0,
                             int(rng.random() > 0.2) if live else 0))
    n = len(rows)
    index = np.array([r[0] for r in rows], dtype=object)
    turn = torch.tensor([r[2] for r in rows])
    step_rewards = torch.tensor([r[3] for r in rows], dtype=torch.float32)
    loss_mask = torch.tensor([r[4] for r in rows])
    mask = torch.ones(n, 4) * loss_mask[:, None]  # a turn masked out of the loss: an all-zero mask row
    token_rewards = torch.zeros(n, 4)
    token_rewards[:, -1] = step_rewards
    expected_adv, expected_ret = official_trloo.trloo_advantage(token_rewards, mask, loss_mask, turn, index, max_turns,
                                                                gamma=gamma)
    for numerics in ("exact", "upstream"):
        adv, ret = canonrl.get_estimator("trloo", gamma=gamma, numerics=numerics).compute_with_returns(
            rewards=step_rewards, group=list(index), mask=mask, traj=[r[1] for r in rows], step_index=turn,
            step_rewards=step_rewards,
        )
        assert torch.allclose(adv, expected_adv, atol=1e-5) and torch.allclose(ret, expected_ret, atol=1e-5)


@pytest.mark.parametrize("steps,trajectories", [(2, 2), (3, 3), (3, 4), (4, 8), (5, 16), (2, 16)])
def test_upstream_numerics_reproduce_the_official_noise_on_constant_groups(steps, trajectories):
    """All trajectories reach the goal in the same number of steps: the official float32 statistics give spurious
    advantages (steps.md §5.1) that numerics='upstream' reproduces and 'exact' removes."""
    n = steps * trajectories
    traj = np.array([t for t in range(trajectories) for _ in range(steps)], dtype=object)
    group = np.zeros(n, dtype=object)
    anchor = np.array(list(range(steps)) * trajectories, dtype=object)
    step_rewards = torch.tensor(([0.0] * (steps - 1) + [1.0]) * trajectories)
    token_rewards, mask = torch.zeros(n, 2), torch.ones(n, 2)
    token_rewards[:, -1] = 1.0
    returns = official_gigpo.step_discounted_returns(step_rewards.numpy(), traj, np.ones(n, bool), 0.95)
    expected, _ = official_gigpo.gigpo_advantage(token_rewards, returns, mask, anchor, group, traj, mode="mean_std_norm")
    fields = dict(rewards=torch.ones(n), group=list(group), mask=mask, traj=list(traj),
                  step_index=torch.arange(steps).repeat(trajectories), step_rewards=step_rewards, anchor=list(anchor))
    upstream = canonrl.advantages("gigpo", mode="mean_std_norm", numerics="upstream", **fields)
    assert torch.equal(upstream, expected)
    assert (canonrl.advantages("gigpo", mode="mean_std_norm", **fields) == 0).all()
    hgpo_expected, _ = official_hgpo.hgpo_advantage(token_rewards, returns, mask, anchor, group, traj, 2)
    hgpo_upstream = canonrl.advantages("hgpo", numerics="upstream", **fields)
    assert torch.allclose(hgpo_upstream, hgpo_expected, atol=1e-6, rtol=1e-4)


def test_the_official_noise_is_real():
    """Eight or sixteen trajectories that reach the goal in the same number of steps: the official code's anchor
    groups of equal returns (0.95^k) get |A| ~ 0.056 instead of 0."""
    for steps, trajectories in [(4, 8), (2, 16)]:
        n = steps * trajectories
        traj = np.array([t for t in range(trajectories) for _ in range(steps)], dtype=object)
        rewards = np.array(([0.0] * (steps - 1) + [1.0]) * trajectories, dtype=np.float32)
        returns = official_gigpo.step_discounted_returns(rewards, traj, np.ones(n, bool), 0.95)
        anchor = np.array(list(range(steps)) * trajectories, dtype=object)
        out, _ = official_gigpo.gigpo_advantage(torch.ones(n, 1), returns, torch.ones(n, 1), anchor,
                                                np.zeros(n, dtype=object), traj, mode="mean_std_norm")
        assert out.abs().max() > 0.05


# ----------------------------------------------------------------------------------------------------------- GAE
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (0.5, 1.0)])
def test_gae_matches_verl_on_multi_turn_masks(seed, gamma, lam):
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    g = torch.Generator().manual_seed(seed)
    B, T = 8, 40
    mask = (torch.rand(B, T, generator=g) > 0.35).float()  # holes: observation and tool tokens
    mask[:, 30:] *= (torch.rand(B, 1, generator=g) > 0.5).float()  # right padding on some rows
    mask[0, :] = 0
    mask[0, 5] = 1  # a one-token response
    token_rewards = torch.randn(B, T, generator=g) * (torch.rand(B, T, generator=g) > 0.8).float()
    values = torch.randn(B, T, generator=g)
    expected_adv, expected_ret = core_algos.compute_gae_advantage_return(token_rewards, values, mask, gamma, lam)
    estimator = canonrl.get_estimator("gae", gamma=gamma, lam=lam, masked_rewards="drop")
    adv, ret = estimator.compute_with_returns(token_rewards=token_rewards, values=values, mask=mask, group=list(range(B)))
    inside = mask > 0
    assert torch.allclose(adv[inside], expected_adv[inside], atol=1e-5)
    assert torch.allclose(ret[inside], expected_ret[inside], atol=1e-5)
    assert (adv[~inside] == 0).all() and (ret[~inside] == 0).all()
    # rewards only on policy tokens: 'move' (the default) changes nothing
    on_policy = token_rewards * mask
    expected_adv, _ = core_algos.compute_gae_advantage_return(on_policy, values, mask, gamma, lam)
    adv = canonrl.advantages("gae", gamma=gamma, lam=lam, token_rewards=on_policy, values=values, mask=mask,
                             group=list(range(B)))
    assert torch.allclose(adv[inside], expected_adv[inside], atol=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.95)])
def test_egae_matches_dr_kernel(seed, gamma, lam):
    """Dr. Kernel's egae branch: official_trloo's turn returns on each row's last token, then verl's GAE."""
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    g = torch.Generator().manual_seed(seed)
    max_turns, trajectories, width = 3, 6, 6
    n = max_turns * trajectories
    lengths = torch.randint(1, width + 1, (n,), generator=g)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).float()  # right-padded, as the official indexing assumes
    step_rewards = torch.randn(n, generator=g)
    token_rewards = torch.zeros(n, width)
    token_rewards[torch.arange(n), lengths - 1] = step_rewards
    values = torch.randn(n, width, generator=g)
    turn_scores = official_trloo.compute_multi_turn_returns(token_rewards.sum(-1), gamma, max_turns)
    placed = token_rewards.clone()
    placed[torch.arange(n), lengths - 1] = turn_scores
    expected_adv, expected_ret = core_algos.compute_gae_advantage_return(placed, values, mask, gamma, lam)
    adv, ret = canonrl.get_estimator("egae", gamma=gamma, lam=lam).compute_with_returns(
        rewards=step_rewards, group=[i // (2 * max_turns) for i in range(n)], mask=mask, values=values,
        traj=[i // max_turns for i in range(n)], step_index=torch.arange(max_turns).repeat(trajectories),
        step_rewards=step_rewards,
    )
    inside = mask > 0
    assert torch.allclose(adv[inside], expected_adv[inside], atol=1e-5)
    assert torch.allclose(ret[inside], expected_ret[inside], atol=1e-5)
