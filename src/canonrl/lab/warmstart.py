"""`canonrl lab warmstart`: build the `lab-tiny` policy from nothing, by supervised training on lab-task traces.

A small Llama (built from a config, no download) learns the warm-start traces of `canonrl.lab.tasks.lab` —
slips, rethinking and all — so that, sampled at temperature 1, it solves part of the held-out problems and
leaves RL a per-step error rate to drive down. The result is a plain Hugging Face directory (config, safetensors,
tokenizer) plus `warmstart.json` recording the recipe and the held-out accuracy it reached.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from canonrl.lab.tasks.lab import LabTask, TraceStyle, build_tokenizer, trace


@dataclass
class WarmstartConfig:
    seed: int = 0
    steps: int = 1200
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    hidden_size: int = 128
    intermediate_size: int = 384
    layers: int = 4
    heads: int = 4
    eval_problems: int = 256


def build_model(config: WarmstartConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(model_config)


def _training_batch(task: LabTask, tokenizer, rng: random.Random, size: int, style: TraceStyle):
    """Right-padded prompt+response ids, attention mask and labels (prompt and padding ignored: -100)."""
    problems = task.problems("train", size, seed=rng.getrandbits(62))
    prompts = tokenizer([p.prompt for p in problems]).input_ids
    responses = tokenizer([trace(p, rng, style) for p in problems], add_special_tokens=False).input_ids
    rows = [(p + r + [tokenizer.eos_token_id], [-100] * len(p) + r + [tokenizer.eos_token_id]) for p, r in zip(prompts, responses)]
    return padded_batch(rows, tokenizer.pad_token_id)


def fit(model, batches, config: WarmstartConfig, progress=None) -> tuple[list[float], float]:
    """Supervised training of `model` on `batches()` ((ids, attention, labels) per call) with AdamW, a linear
    warm-up and a cosine decay; returns (losses, seconds)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        done = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * done))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    start = time.perf_counter()
    losses = []
    model.train()
    for step in range(config.steps):
        ids, attention, labels = batches()
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, config.steps, loss.item())
    model.eval()
    return losses, time.perf_counter() - start


def padded_batch(rows: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded ids, attention and labels of (ids, labels) rows (labels -100 where nothing is learnt)."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
        attention[i, : len(row_ids)] = 1
    return ids, attention, labels


def warmstart(out_dir: Path, config: WarmstartConfig | None = None, progress=None) -> dict:
    """Train the lab-tiny policy (recipe `config`, default `WarmstartConfig()`) and write it to `out_dir` atomically.
    Returns the recorded summary."""
    config = config or WarmstartConfig()
    from canonrl.lab.evaluate import evaluate
    from canonrl.lab.policy import Policy

    torch.manual_seed(config.seed)
    rng = random.Random(f"warmstart/{config.seed}")
    task = LabTask()
    style = TraceStyle()
    tokenizer = build_tokenizer()
    model = build_model(config, tokenizer)
    losses, seconds = fit(model, lambda: _training_batch(task, tokenizer, rng, config.batch_size, style), config, progress)
    policy = Policy(model=model, tokenizer=tokenizer, source="lab-tiny")
    sampled = evaluate(policy, task, problems=config.eval_problems, seed=config.seed, samples=4, max_new_tokens=96)
    extra = {"trace_style": asdict(style)}
    return save_warmstarted(model, tokenizer, out_dir, config, losses, seconds, sampled, "canonrl lab warmstart", extra)


def save_warmstarted(model, tokenizer, out_dir, config, losses, seconds, heldout, rebuild, extra=None) -> dict:
    """Write the warm-started policy and its `warmstart.json` (recipe, size, loss, time, held-out results, the
    command that rebuilds it) to `out_dir` atomically; returns that summary."""
    from canonrl.lab.policy import save_policy_dir

    summary = {
        "recipe": asdict(config),
        **(extra or {}),
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "train_seconds": seconds,
        "heldout": heldout,
        "rebuild": rebuild,
    }
    save_policy_dir(
        model, tokenizer, Path(out_dir),
        lambda directory: (directory / "warmstart.json").write_text(json.dumps(summary, indent=2) + "\n"),
    )  # fmt: skip
    return summary
