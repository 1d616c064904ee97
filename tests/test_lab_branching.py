"""Branched multi-turn rollouts (config `branching`): the lineage record by hand, the copies' shared prefixes and
KV caches (their log-probs equal a fresh forward's), ghosts of ended episodes, the tree the estimators get, every tree
estimator of the registry training by name on lab-grid, and resume bit-exact."""

from __future__ import annotations

import pytest
import torch

import canonrl
from canonrl.lab.config import ConfigError, load_config
from canonrl.lab.forward import sequence_logprobs
from canonrl.lab.multi_turn import Branches, Branching, completions_of
from canonrl.lab.trainer import Trainer
from conftest import SHORT_RESUME, assert_resume_is_bit_exact

TINY = ["task=grid", "prompts_per_step=2", "group_size=8", "eval_problems=4", "eval_samples=2", "threads=1",
        "tensorboard=false", "branching.at=[1,3]", "branching.width=2"]  # fmt: skip
TREE_ESTIMATORS = [info.name for info in canonrl.estimators() if "node" in info.requires]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_lineage_of_two_branchings_by_hand():
    first = Branches.roots(2).branch(2, column=3, ended=torch.tensor([False, True]))
    assert first.parent_row.tolist() == [-1, 0, -1, 2]
    assert first.branch_pos.tolist() == [0, 3, 0, 3]
    assert first.ghost.tolist() == [False, False, False, True]
    second = first.branch(2, column=7, ended=torch.zeros(4, dtype=torch.bool))
    # copy 0 keeps its lineage with the parent renumbered to the parent's copy 0; copy 1 branches from copy 0
    assert second.parent_row.tolist() == [-1, 0, 0, 2, -1, 4, 4, 6]
    assert second.branch_pos.tolist() == [0, 7, 3, 7, 0, 7, 3, 7]
    assert second.ghost.tolist() == [False] * 6 + [True, True]


def test_completions_name_the_prefix_each_row_last_started_from():
    # row 0: segments A (root) then B; row 1: A then C; row 2: one segment D from the prompt
    tree = {"node": torch.tensor([[10, 11], [10, 12], [13, -1]]), "parent": torch.tensor([[-1, 10], [-1, 10], [-1, -1]])}
    out = completions_of(tree, torch.tensor([0, 0, 0]))
    prompt = 14  # past every prefix id
    assert out["node"].tolist() == [10, 10, prompt]
    assert out["parent"].tolist() == [prompt, prompt, -1]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["branching.at=[1]", "branching.width=1"], r"branching width must be >= 2"),
        (["branching.at=[3,1]", "branching.width=2"], r"branching turns must be increasing turn numbers >= 1"),
        (["branching.at=[1,2]", "branching.width=3", "group_size=8"], r"group_size \(8\) must be a multiple of width \*\* len\(at\) = 9"),
        (["branching.at=[1]"], r"branching takes exactly the keys at \(a list of turns\) and width"),
    ],
)
def test_bad_branching_is_a_one_line_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["task=grid", "estimator=rose", *overrides])


def test_a_tree_estimator_needs_a_branched_rollout(tmp_path):
    with pytest.raises(ValueError, match=r"needs node, parent, which a branched multi-turn rollout gives"):
        Trainer(load_config(None, ["task=grid", "estimator=rose", "steps=1"]), tmp_path)
    with pytest.raises(ValueError, match=r"only a multi-turn task has"):
        Trainer(load_config(None, ["estimator=grpo", "branching.at=[1]", "branching.width=2", "steps=1"]), tmp_path)


def test_branched_rows_share_their_prefix_and_the_cache_is_copied_right(tmp_path):
    trainer = Trainer(load_config(None, [*TINY, "estimator=rose", "steps=1"]), tmp_path)
    rollouts, verdict = trainer.rollout(1)
    branches = rollouts.turns.branches
    assert rollouts.response_ids.shape[0] == 16 == len(verdict.scores)
    assert isinstance(trainer.sample.branching, Branching) and trainer.sample.branching.roots(8) == 2
    for row in range(16):
        parent, position = int(branches.parent_row[row]), int(branches.branch_pos[row])
        assert parent < 0 or parent // 8 == row // 8  # a problem's rows stay together
        if parent >= 0:
            assert torch.equal(rollouts.response_ids[row, :position], rollouts.response_ids[parent, :position])
            assert torch.equal(rollouts.logprobs[row, :position], rollouts.logprobs[parent, :position])
    for row in branches.ghost.nonzero().flatten().tolist():
        assert rollouts.response_mask[row].sum() == 0
    # every copy continued from its own copy of the KV cache: the sampler's log-probs are a fresh forward's
    with torch.no_grad():
        fresh, _ = sequence_logprobs(trainer.policy.model, rollouts, trainer.config.temperature)
    mask = rollouts.response_mask > 0
    assert torch.allclose(fresh[mask], rollouts.logprobs[mask], atol=1e-4)
    # the copies diverge: not every leaf of a root repeats its tokens
    assert len({tuple(row.tolist()) for row in rollouts.response_ids[:8]}) > 1


@pytest.mark.parametrize("estimator", TREE_ESTIMATORS)
def test_a_tree_estimator_trains_on_grid_by_name(estimator, tmp_path):
    result = Trainer(load_config(None, [*TINY, f"estimator={estimator}", "steps=1"]), tmp_path).train_step(1)
    advantages, rollouts = result.advantages, result.rollouts
    assert torch.isfinite(advantages).all() and (advantages[rollouts.response_mask == 0] == 0).all()
    assert (advantages != 0).any()
    ghosts = rollouts.turns.branches.ghost
    assert (advantages[ghosts] == 0).all()


def test_a_killed_branched_run_resumes_bit_exactly(tmp_path):
    config = load_config(None, [*TINY, "estimator=spo_tree", *SHORT_RESUME])
    assert_resume_is_bit_exact(config, tmp_path, at_step=2)
