"""Reward scoring: decode sampled responses, verify them against their problems (bounded in time), and shape the
verdicts into the estimator's ``rewards``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from canonrl.lab.sampling import Rollouts
from canonrl.lab.verification import VerifyResult, verify_all


def score_rollouts(policy, task, rollouts: Rollouts, problems, timeout: float = 2.0) -> tuple[list[str], VerifyResult]:
    """Decode and verify; returns (texts, verdicts)."""
    texts = policy.decode(rollouts.response_ids, rollouts.response_mask)
    return texts, verify_all(task, texts, problems, timeout=timeout)


@dataclass
class RewardScorer:
    """Scores a trainer's rollouts and counts the verifier's failures and timeouts across calls."""

    policy: object
    task: object
    timeout: float
    device: torch.device | str = "cpu"
    failures: int = 0
    timeouts: int = 0

    def __call__(self, rollouts: Rollouts, problems) -> VerifyResult:
        """The verdicts of `rollouts`, row i against `problems[i]`."""
        _, verdict = score_rollouts(self.policy, self.task, rollouts, problems, timeout=self.timeout)
        self.failures += verdict.failures
        self.timeouts += verdict.timeouts
        return verdict

    def scores(self, rollouts: Rollouts, problems) -> torch.Tensor:
        """[B] float32 scores of `rollouts`."""
        return torch.tensor(self(rollouts, problems).scores, dtype=torch.float32, device=self.device)


def estimator_rewards(verdict: VerifyResult, names: tuple[str, ...] | None, device="cpu") -> torch.Tensor:
    """The estimator's `rewards` on `device`: the scores [B] (`names` None), or for a multi-reward estimator the
    reward components named by `names` [B, K] (the score alone, [B, 1], for a task without components)."""
    scores = torch.tensor(verdict.scores, dtype=torch.float32, device=device)
    if names is None:
        return scores
    if not names:
        return scores.unsqueeze(1)
    components = [verdict.components[name] for name in names]
    return torch.tensor(components, dtype=torch.float32, device=device).T.contiguous()
