"""IGPO's answer probe in the lab (`canonrl.lab.answer_probe`): turn starts by hand, the probe's log-probs against
one unpadded forward per (row, turn start), and IGPO's log-prob information gain training on lab-calc."""

from __future__ import annotations

import pytest
import torch

from canonrl.lab.answer_probe import answer_logprobs, turn_starts
from canonrl.lab.config import load_config
from canonrl.lab.trainer import Trainer

TINY = ["task=calc", "prompts_per_step=2", "group_size=4", "eval_problems=4", "eval_samples=2", "threads=1",
        "tensorboard=false", "estimator=igpo", "estimator_params.info_gain=log_prob"]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


def test_turn_starts_by_hand():
    turn_ids = torch.tensor([[0, 0, -1, -1, 1, -1, 2], [0, -1, 1, 1, -1, -1, -1]])
    assert turn_starts(turn_ids) == [[0, 4, 6], [0, 2]]


def test_the_probe_reads_the_answer_after_each_turn(tmp_path):
    trainer = Trainer(load_config(None, [*TINY, "steps=1"]), tmp_path)
    problems, _ = trainer.draw_problems(1)
    rollouts, _ = trainer.rollout(1, problems)
    step_values, prompt_values = answer_logprobs(trainer.policy, rollouts, problems, trainer.task)
    model, tokenizer = trainer.policy.model, trainer.policy.tokenizer
    answer = tokenizer(problems[0].answer, add_special_tokens=False).input_ids
    prefix = tokenizer("ans=", add_special_tokens=False).input_ids

    def brute(row: int, cut: int) -> float:  # one forward of prompt + what the row read before `cut` + the probe
        prompt = rollouts.prompt_ids[row][rollouts.prompt_mask[row].bool()].tolist()
        read = rollouts.response_ids[row, :cut][rollouts.attention[row, :cut].bool()].tolist()
        ids = torch.tensor([prompt + read + prefix + answer])
        with torch.no_grad():
            log_dist = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        picked = log_dist.gather(-1, ids[0, 1:, None]).squeeze(-1)
        return float(picked[-len(answer) :].mean())

    starts = turn_starts(rollouts.turns.turn_ids)
    for row in range(4):  # the first problem's episodes
        assert len(step_values[row]) == len(rollouts.turns.step_rewards[row]) == len(starts[row])
        assert prompt_values[row].item() == pytest.approx(brute(row, 0), abs=1e-4)
        for turn, cut in enumerate(starts[row][1:]):  # after turn t = before turn t + 1
            assert step_values[row][turn] == pytest.approx(brute(row, cut), abs=1e-4)


def test_igpo_trains_on_calc_with_information_gains(tmp_path):
    result = Trainer(load_config(None, [*TINY, "steps=1"]), tmp_path).train_step(1)
    assert "prompt_values" in result.inputs and isinstance(result.inputs["step_values"], list)
    assert torch.isfinite(result.advantages).all() and (result.advantages != 0).any()
    assert result.metrics["answer_probe_seconds"] > 0 and result.metrics["answer_logprob_start"] < 0


def test_igpo_probe_needs_an_answer(tmp_path):
    with pytest.raises(ValueError, match=r"needs prompt_values and step_values from an answer probe"):
        Trainer(load_config(None, ["task=grid", "estimator=igpo", "estimator_params.info_gain=prob", "steps=1"]), tmp_path)
