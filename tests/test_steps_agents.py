"""SRGPO, AdvEvo-MARL's public baseline and multi-turn MAPO on hand-computed batches; SRGPO's random step groups."""

from __future__ import annotations

import pytest
import torch

import canonrl
from canonrl.batch import make_batch
from canonrl.methods.srgpo import random_chunks

ATOL = 1e-4
#: Prompt "q": trajectory A (episode reward 1) has step rewards 0, 1; trajectory B (episode reward 0) 0, 0, 0.
ROWS = dict(rewards=torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0]), group=["q"] * 5, mask=torch.ones(5, 2),
            traj=["A", "A", "B", "B", "B"], step_index=torch.tensor([0, 1, 0, 1, 2]),
            step_rewards=torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]))


def values(out: torch.Tensor) -> list[float]:
    return out[:, 0].tolist()


def test_srgpo_by_hand():
    # A^E over step rows: mean 0.4, unbiased std sqrt(0.3) -> +1.0954 (A), -0.7303 (B).
    # one random group of all 5 steps (size 16): process rewards mean 0.2, std sqrt(0.2) -> -0.4472, +1.7889
    out = canonrl.advantages("srgpo", **ROWS)
    assert values(out) == pytest.approx([1.0954 - 0.2236, 1.0954 + 0.8944, -0.9539, -0.9539, -0.9539], abs=ATOL)
    # groups of one step: A^S = 0 everywhere
    alone = canonrl.advantages("srgpo", step_group_size=1, **ROWS)
    assert values(alone) == pytest.approx([1.0954, 1.0954, -0.7303, -0.7303, -0.7303], abs=ATOL)


def test_srgpo_random_groups_are_seeded_chunks_within_their_scope():
    batch = make_batch(rewards=torch.zeros(40), group=[i // 20 for i in range(40)], mask=torch.ones(40, 1),
                       traj=[i // 5 for i in range(40)], step_index=torch.arange(5).repeat(8))
    steps = batch.steps
    chunks = random_chunks(steps, steps.group, 3, torch.Generator().manual_seed(0))
    assert torch.equal(chunks, random_chunks(steps, steps.group, 3, torch.Generator().manual_seed(0)))
    assert not torch.equal(chunks, random_chunks(steps, steps.group, 3, torch.Generator().manual_seed(1)))
    _, sizes = torch.unique(chunks, dim=0, return_counts=True)
    assert sizes.max() == 3 and sorted(sizes.tolist()) == [2, 2] + [3] * 12  # 20 steps per group: 6 x 3 + 2
    assert (chunks[:, 0] == steps.group).all()  # never across scopes
    # the trainer step reseeds the groups: two calls at different steps differ, the same step repeats
    estimator = canonrl.get_estimator("srgpo", step_group_size=3)
    fields = dict(rewards=torch.rand(40, generator=torch.Generator().manual_seed(2)), group=[0] * 40,
                  mask=torch.ones(40, 1), traj=[i // 5 for i in range(40)], step_index=torch.arange(5).repeat(8),
                  step_rewards=torch.rand(40, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(estimator(step=1, **fields), estimator(step=1, **fields))
    assert not torch.equal(estimator(step=1, **fields), estimator(step=2, **fields))


def test_advevo_marl_public_baseline_by_hand():
    # returns (gamma 1): A (1, 1), B (0, 0, 0); attackers A0, B0: mean 0.5; defenders A1, B1, B2: mean 1/3
    out = canonrl.advantages("advevo_marl", agent=["att", "def", "att", "def", "def"], **ROWS)
    assert values(out) == pytest.approx([0.5, 2 / 3, -0.5, -1 / 3, -1 / 3], abs=ATOL)
    # without step rewards: the outcome of each row; one role per row given per row
    outcome = {k: v for k, v in ROWS.items() if k != "step_rewards"}
    out = canonrl.advantages("advevo_marl", agent=["att", "att", "def", "def", "def"], **outcome)
    assert values(out) == pytest.approx([0.0, 0.0, 0.0, 0.0, 0.0], abs=0)  # constant role groups: exactly 0


def test_mapo_dialogue_by_hand():
    # returns (gamma 1): A (1, 1), B (0, 0, 0). per turn position: positions 0 and 1 hold {1, 0} -> +-0.7071;
    # position 2 holds B's turn alone -> 0. batch: mean 0.4, std sqrt(0.3) -> +1.0954, -0.7303. beta 0.5
    out = canonrl.advantages("mapo_dialogue", **ROWS)
    expected = [0.5 * 0.7071 + 0.5 * 1.0954] * 2 + [0.5 * -0.7071 + 0.5 * -0.7303] * 2 + [0.5 * -0.7303]
    assert values(out) == pytest.approx(expected, abs=ATOL)
    assert not canonrl.get_estimator("mapo_dialogue").group_local
    assert canonrl.get_estimator("mapo_dialogue", beta=1.0).group_local


@pytest.mark.parametrize("name,params,match", [
    ("srgpo", {"scope": "everywhere"}, "scope must be one of"),
    ("srgpo", {"step_group_size": -1}, "step_group_size must be an integer >= 0"),
    ("advevo_marl", {"scale": "z"}, "scale must be one of"),
    ("mapo_dialogue", {"beta": 1.5}, r"beta must lie in \[0.0, 1.0\]"),
])
def test_bad_hyperparameters_are_one_line_errors(name, params, match):
    with pytest.raises(ValueError, match=match) as error:
        canonrl.get_estimator(name, **params)
    assert "\n" not in str(error.value)
