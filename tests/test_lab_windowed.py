"""One row per environment step (``context=window:K``): the prompts as the window moves, the sampler's log-probs
against a fresh forward, the step fields, the layout rules, EGAE and GiGPO training by name, and resume bit-exact."""

from __future__ import annotations

import pytest
import torch

from canonrl.lab.config import ConfigError, load_config
from canonrl.lab.forward import sequence_logprobs
from canonrl.lab.trainer import Trainer
from canonrl.lab.windowed import StepRows, parse_context
from conftest import SHORT_RESUME, assert_resume_is_bit_exact

TINY = ["task=grid", "prompts_per_step=2", "group_size=4", "eval_problems=4", "eval_samples=2", "threads=1",
        "tensorboard=false"]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


def test_parse_context():
    assert parse_context("full") is None and parse_context("window:0") == 0 and parse_context("window:12") == 12
    for bad in ("window", "window:-1", "window:2.5", "last:3"):
        with pytest.raises(ValueError, match="context must be 'full' or 'window:K'"):
            parse_context(bad)
    with pytest.raises(ConfigError, match="context must be"):
        load_config(None, ["task=grid", "context=window:x"])
    with pytest.raises(ConfigError, match="does not combine with context=window"):
        load_config(None, ["task=grid", "estimator=rose", "context=window:2", "branching.at=[1]", "branching.width=2"])


def real(ids: torch.Tensor, mask: torch.Tensor) -> list[int]:
    return ids[mask.bool()].tolist()


@pytest.mark.parametrize("window", [1, 12])
def test_each_step_row_reads_its_window(window, tmp_path):
    trainer = Trainer(load_config(None, [*TINY, "estimator=gigpo", f"context=window:{window}", "steps=1"]), tmp_path)
    problems, _ = trainer.draw_problems(1)
    rollouts, verdict = trainer.rollout(1, problems)
    rows = rollouts.turns
    assert isinstance(rows, StepRows) and len(verdict.scores) == 8  # verdicts per episode, rows per step
    episode, turn = rows.episode.tolist(), rows.step_index.tolist()
    assert sorted(zip(episode, turn)) == list(zip(episode, turn))  # (episode, turn) order
    assert [turn.count(0)] == [8] and all(rows.episodes.counts[e] == episode.count(e) for e in range(8))
    prompts = [real(rollouts.prompt_ids[r], rollouts.prompt_mask[r]) for r in range(len(episode))]
    actions = [real(rollouts.response_ids[r], rollouts.response_mask[r]) for r in range(len(episode))]
    policy, task = trainer.policy, trainer.task
    for r in range(1, len(episode)):
        if episode[r] != episode[r - 1]:
            continue
        if turn[r] <= window:  # the whole history: the previous row's prompt, its action, then an observation
            head = prompts[r - 1] + actions[r - 1]
            assert prompts[r][: len(head)] == head and 0 < len(prompts[r]) - len(head) <= 16
        else:  # the window's start state as a prompt, then the last K actions and observations
            first_row = r - turn[r]
            state = replayed(trainer, problems[episode[r] // 4], actions[first_row : first_row + turn[r] - window])
            head = policy.encode_prompts([task.prompt_at(problems[episode[r] // 4], state)])[0][0].tolist()
            assert prompts[r][: len(head)] == head
            assert prompts[r][len(head) :][: len(actions[r - window])] == actions[r - window]
    with torch.no_grad():
        fresh, _ = sequence_logprobs(policy.model, rollouts, trainer.config.temperature)
    mask = rollouts.response_mask > 0
    assert torch.allclose(fresh[mask], rollouts.logprobs[mask], atol=1e-4)
    fields = rows.step_fields()
    assert fields["traj"].tolist() == episode and fields["step_index"].tolist() == turn
    expected = torch.tensor([rows.episodes.step_rewards[e][t] for e, t in zip(episode, turn)])
    assert torch.equal(fields["step_rewards"], expected)


def replayed(trainer, problem, actions: list[list[int]]):
    """The environment state after these sampled actions from the problem's start."""
    state = trainer.task.reset(problem)
    for ids in actions:
        state = trainer.task.step(state, trainer.policy.tokenizer.decode(ids, skip_special_tokens=True)).state
    return state


def test_the_layout_rules(tmp_path):
    with pytest.raises(ValueError, match=r"'egae' is defined on the row-per-step layout; context=full gives "
                                         r"row-per-trajectory: set context=window:K"):
        Trainer(load_config(None, [*TINY, "estimator=egae", "critic=head", "steps=1"]), tmp_path)
    with pytest.raises(ValueError, match=r"'matchtir' is defined on the row-per-trajectory layout; "
                                         r"context=window:2 gives row-per-step: set context=full"):
        Trainer(load_config(None, [*TINY, "estimator=matchtir", "context=window:2", "steps=1"]), tmp_path)
    with pytest.raises(ValueError, match=r"lays out episodes one row per step; task 'lab' is single-turn"):
        Trainer(load_config(None, ["estimator=grpo", "context=window:2", "steps=1"]), tmp_path)
    with pytest.raises(ValueError, match=r"needs metric, which the lab gives per episode, not per step row"):
        Trainer(load_config(None, [*TINY, "estimator=arenarl", "context=window:2", "steps=1"]), tmp_path)


@pytest.mark.parametrize("overrides", [["estimator=egae", "critic=head"], ["estimator=gigpo"], ["estimator=grpo"]])
def test_estimators_train_on_step_rows(overrides, tmp_path):
    trainer = Trainer(load_config(None, [*TINY, *overrides, "context=window:2", "steps=1"]), tmp_path)
    result = trainer.train_step(1)
    rollouts, advantages = result.rollouts, result.advantages
    assert advantages.shape[0] == rollouts.turns.episode.numel() > 8  # one row per step
    assert torch.isfinite(advantages).all() and (advantages[rollouts.response_mask == 0] == 0).all()
    # GRPO over step rows moves only where a maze's episodes differ in outcome; the others have turn rewards/critic
    moves = result.metrics["mixed_groups"] > 0 if overrides == ["estimator=grpo"] else True
    assert bool((advantages != 0).any()) == moves
    assert result.metrics["turns"] == pytest.approx(advantages.shape[0] / 8)
    evaluation = trainer.evaluate(1)
    assert 0 <= evaluation["accuracy"] <= 1 and evaluation["turns"] >= 1


def test_a_killed_windowed_run_resumes_bit_exactly(tmp_path):
    config = load_config(None, [*TINY, "estimator=gigpo", "context=window:2", *SHORT_RESUME])
    assert_resume_is_bit_exact(config, tmp_path, at_step=2)
