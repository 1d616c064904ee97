"""The rollout component: how a trainer step turns its problems into verified responses.

A rollout is any callable ``rollout(policy, problems, step) -> (Rollouts, VerifyResult)`` (the `Rollout`
protocol): the single-turn rollout here samples ``group_size`` responses per problem and verifies them; the
multi-turn and branching rollouts of agent environments are other implementations of the same protocol, so the
trainer does not change with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from canonrl.lab.rewards import score_rollouts
from canonrl.lab.sampling import Rollouts, generate
from canonrl.lab.seeds import seed_of
from canonrl.lab.verification import VerifyResult


class Rollout(Protocol):
    def __call__(self, policy, problems: list, step: int) -> tuple[Rollouts, VerifyResult]:
        """Responses to `problems` (rows grouped by problem) sampled from `policy`, and their verdicts."""


@dataclass
class SingleTurnRollout:
    """`group_size` sampled responses per problem from a generator seeded by (seed, "rollout", step), verified
    against their problem. With `prompt_confidence` the rollouts carry it (read off the sampler's prefill)."""

    task: object
    group_size: int
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    verify_timeout: float
    prompt_confidence: bool = False

    @classmethod
    def from_config(cls, config, task, *, prompt_confidence: bool = False) -> SingleTurnRollout:
        return cls(task, config.group_size, config.max_new_tokens, config.temperature, config.top_p, config.seed,
                   config.verify_timeout, prompt_confidence)  # fmt: skip

    def __call__(self, policy, problems: list, step: int) -> tuple[Rollouts, VerifyResult]:
        prompt_ids, prompt_mask = policy.encode_prompts([p.prompt for p in problems])
        generator = torch.Generator(device=prompt_ids.device).manual_seed(seed_of(self.seed, "rollout", step))
        confidence = {"prompt_confidence": True} if self.prompt_confidence else {}
        policy.model.eval()
        rollouts = generate(
            policy.model, prompt_ids, prompt_mask,
            max_new_tokens=self.max_new_tokens, eos_id=policy.eos_id, pad_id=policy.pad_id,
            temperature=self.temperature, top_p=self.top_p, generator=generator, repeats=self.group_size,
            **confidence,
        )  # fmt: skip
        policy.model.train()
        repeated = [p for p in problems for _ in range(self.group_size)]
        _, verdict = score_rollouts(policy, self.task, rollouts, repeated, timeout=self.verify_timeout)
        return rollouts, verdict
