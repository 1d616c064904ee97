"""A canonrl TRL GRPOTrainer that records what its estimator read, what generation returned, and the advantages the
loss received (shared by the TRL test files)."""

from __future__ import annotations

import torch

from canonrl.integrations.trl import CanonGRPOConfig, GRPOTrainer

#: what every TRL test run shares: two steps on the CPU, no logging, saving or workers, no KL term, a fixed seed
CPU_RUN = dict(max_steps=2, learning_rate=1e-2, beta=0.0, use_cpu=True, bf16=False, gradient_checkpointing=False,
               report_to="none", save_strategy="no", logging_steps=1, seed=0, dataloader_num_workers=0)  # fmt: skip


def cpu_config(tmp_path, estimator: str, params: dict | None, **settings) -> CanonGRPOConfig:
    """A CanonGRPOConfig for a short CPU run of ``estimator`` (``CPU_RUN`` plus the test's own ``settings``)."""
    return CanonGRPOConfig(output_dir=str(tmp_path), advantage_estimator=estimator, advantage_params=params or {},
                           **{**CPU_RUN, **settings})  # fmt: skip


class RecordingTrainer(GRPOTrainer):
    """Records what the estimator read, the generation output, and the advantages the loss received."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.generations, self.loss_inputs = [], []

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        record = {
            "fields": {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in self.advantage_inputs.items()},
            "rewards_per_func": self.rewards_per_func.clone(),
            "output": {k: v.clone() for k, v in output.items() if isinstance(v, torch.Tensor)},
            "entropy_check": None,
        }
        if "entropy" in self.advantage_inputs:  # an independent plain forward with the same (not yet updated) weights
            ids = torch.cat([output["prompt_ids"], output["completion_ids"]], 1)
            att = torch.cat([output["prompt_mask"], output["completion_mask"]], 1)
            t = output["completion_ids"].shape[1]
            with torch.no_grad():
                logits = self.model(input_ids=ids, attention_mask=att).logits[:, -t - 1 : -1]
            logp = torch.log_softmax(logits.float() / self.temperature, -1)
            record["entropy_check"] = -(logp.exp() * logp).sum(-1)
        self.generations.append(record)
        return output

    def _compute_loss(self, model, inputs):
        self.loss_inputs.append({k: inputs[k].clone() for k in ("prompt_ids", "completion_ids", "advantages")})
        return super()._compute_loss(model, inputs)
