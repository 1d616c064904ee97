"""Inputs the lab reads off the policy's hidden states: VERL's effective-rank indicators (a no-grad forward, the
hidden state at each response token), checked against the producer run on one unpadded forward per row."""

from __future__ import annotations

import pytest
import torch

from canonrl.lab.config import load_config
from canonrl.lab.trainer import Trainer
from canonrl.producers.effective_rank import effective_rank_indicators

TINY = ["prompts_per_step=2", "group_size=4", "eval_problems=4", "eval_samples=2", "threads=1", "tensorboard=false",
        "max_new_tokens=48", "estimator=effective_rank"]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


def test_effective_rank_indicators_read_each_response_token(tmp_path):
    trainer = Trainer(load_config(None, [*TINY, "steps=1"]), tmp_path)
    problems, _ = trainer.draw_problems(1)
    rollouts, verdict = trainer.rollout(1, problems)
    inputs, metrics = trainer.extra_inputs(1, problems, rollouts, verdict.scores)
    indicators = inputs["indicators"]
    assert indicators.shape == (8, 3) and metrics["effective_rank"] > 1
    model = trainer.policy.model
    for row in range(8):
        prompt = rollouts.prompt_ids[row][rollouts.prompt_mask[row].bool()]
        length = int(rollouts.lengths[row])
        ids = torch.cat([prompt, rollouts.response_ids[row, :length]])[None]
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][:, prompt.numel() :].float()
        expected = effective_rank_indicators(hidden, torch.ones(1, length))
        assert torch.allclose(indicators[row], expected[0], atol=1e-3)


def test_effective_rank_trains_in_the_lab(tmp_path):
    result = Trainer(load_config(None, [*TINY, "steps=1"]), tmp_path).train_step(1)
    assert torch.isfinite(result.advantages).all() and "indicators" in result.inputs
