"""Benchmark the lab trainer against TRL's `GRPOTrainer`, in one process, on the same machine state.

    python -m canonrl.lab.trl_bench --policy lab-tiny --prompts 16 --group-size 8 --max-new-tokens 96 --steps 10

Both contenders train the same policy weights (loaded twice, one copy each) on the lab task, with the same
prompts per step, group size G, max new tokens, temperature 1 / top-p 1 sampling, learning rate (constant),
Dr.GRPO advantages (reward minus group mean, no std) and Dr.GRPO's loss (token sums divided by
rows x max_new_tokens), no KL term, fp32 on CPU. TRL runs with ``bf16=False, gradient_checkpointing=False,
use_cpu=True`` (TRL 1.16 turns both on by default, also on CPU, which makes a step about 10x slower).

Timing. After `warmup` untimed steps each (ours first, then TRL's first steps, which also pay for TRL's
dataloader and optimizer set-up), the timed steps alternate in blocks: ours `block` steps, TRL `block` steps,
and so on, so that load from other processes on the machine falls on both evenly. Our blocks run inside a TRL
`TrainerCallback.on_step_end`; a TRL step is timed from the end of whatever ran before it (the previous TRL
step's `on_step_end`, or our block) to its own `on_step_end`, so it includes everything TRL does per optimizer
step: fetching the batch, generation, rewards, the loss forward/backward, clipping, the optimizer and scheduler
step, and the previous step's logging. Our step is the wall time of `Trainer.train_step`. torch's thread count is
fixed for the whole run.

Throughput. "rollout tokens/s" is generated completion tokens (EOS included, padding excluded, counted the same
way on both sides) divided by the wall time of the whole step. "generation tokens/s" divides the same tokens by
the sampling time alone: our rollout's `canonrl.lab.sampling.generate` call (wrapped for the duration of our steps), TRL's
`_generate_single_turn` (padding, `model.generate`, EOS masking). The result dict also has
"rollout_phase_tokens_per_second": prompts to scored completions, i.e. for us `Trainer.rollout` (encode, sample,
decode, verify; from the step's own `rollout_tokens_per_second`), for TRL `_generate` plus `_calculate_rewards`
(tokenize, generate, decode, reward function). TRL's methods are timed by a thin subclass that only wraps them.

What differs in the work per step (policy defaults, all kept as they are):

- TRL samples with `model.generate` (logits processors, stopping criteria, per-step bookkeeping); we sample
  with our own KV-cache loop (`canonrl.lab.sampling.generate`), which also records each token's log-prob and
  the distribution's entropy.
- Neither side runs a second forward for old log-probs: we use the sampling log-probs; TRL, with
  ``num_iterations=1`` and ``steps_per_generation == gradient_accumulation_steps == 1``, skips it too and takes
  ``per_token_logps.detach()`` in the loss.
- TRL computes per-token entropies in its training forward (a metric) and a set of clip-ratio metrics; we
  compute entropy while sampling and do not recompute it.
- TRL's optimizer is the `transformers` default (``adamw_torch_fused`` with torch >= 2.8); ours is
  `torch.optim.AdamW` with its defaults. Both clip the gradient norm at 1.0.
- TRL logs every step (``logging_steps=1``: metric averaging, `Trainer.log`); its tqdm progress bar is removed
  (which only saves TRL work). We compute our step metrics.
- Clipping: TRL ``epsilon=clip_low, epsilon_high=clip_high`` as ours; our dual clip has no TRL counterpart. With
  one on-policy epoch the ratio is 1 and none of this changes the update.
- Problems: TRL draws lab train problems from a `datasets.Dataset` (one epoch of ``prompts x (warmup+steps)``
  rows, shuffled); we draw them from the task by step seed. Same distribution, different prompts, so the mean
  completion lengths are close but not identical; compare tokens/s when they differ.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

__all__ = ["run_trl_benchmark", "markdown_table"]

Progress = Callable[[str, int, int, float], None]  # (contender, timed steps done, timed steps total, seconds)


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else float("nan")


def _contender(
    name: str, seconds: list[float], tokens: list[int], phase_seconds: list[float], generation_seconds: list[float],
    rows: int, **extra,
) -> dict:  # fmt: skip
    total = sum(seconds)
    total_tokens = sum(tokens)
    return {
        "name": name,
        "steps": len(seconds),
        "seconds": total,
        "step_seconds": seconds,
        "seconds_per_step": total / len(seconds),
        "median_seconds_per_step": statistics.median(seconds),
        "steps_per_second": len(seconds) / total,
        "rollout_tokens": total_tokens,
        "rollout_tokens_per_second": total_tokens / total,
        "rollout_phase_seconds": sum(phase_seconds),
        "rollout_phase_tokens_per_second": _rate(total_tokens, sum(phase_seconds)),
        "generation_seconds": sum(generation_seconds),
        "generation_tokens_per_second": _rate(total_tokens, sum(generation_seconds)),
        "mean_completion_tokens": total_tokens / (rows * len(seconds)),
        **extra,
    }


def run_trl_benchmark(
    policy: str = "lab-tiny",
    prompts: int = 16,
    group_size: int = 8,
    max_new_tokens: int = 96,
    lr: float = 2e-4,
    steps: int = 10,
    warmup: int = 2,
    threads: int = 0,
    seed: int = 0,
    progress: Progress | None = None,
    block: int = 2,
) -> dict:
    """Train `steps` timed steps (after `warmup`) with canonrl's lab trainer and with TRL's GRPOTrainer; compare.

    `policy` is a preset name (``lab-tiny``) or a Hugging Face model directory. `threads` = 0 keeps torch's
    default thread count (fixed for the run either way). `block` is how many timed steps each contender runs
    before handing over to the other. Returns a dict with ``config``, ``contenders`` (``canonrl`` and ``trl``:
    steps/s, s/step, rollout tokens/s over the whole step, over sampling alone and over the rollout phase, mean
    completion tokens, the per-step times), ``ratio_steps_per_second`` (ours / TRL's), ``notes`` and the load
    average before and after.
    """
    try:
        import datasets
        import transformers
        import trl
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
        from trl import GRPOConfig, GRPOTrainer
    except ImportError:
        raise RuntimeError("the TRL benchmark needs trl and datasets: pip install trl") from None

    from canonrl.lab import rollout
    from canonrl.lab.config import load_config
    from canonrl.lab.policy import resolve_policy_dir
    from canonrl.lab.tasks.base import Problem
    from canonrl.lab.tasks.lab import LabTask
    from canonrl.lab.trainer import Trainer

    for name, value in (("prompts", prompts), ("steps", steps), ("block", block)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (GRPO needs a group), got {group_size}")
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1 (the first step of each pays one-off set-up costs), got {warmup}")
    if threads < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")

    policy_dir = resolve_policy_dir(policy)
    sample = rollout.generate  # what the trainer's single-turn rollout samples with
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = prompts * group_size
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="canonrl-trl-bench-") as scratch:
        # ------------------------------------------------------------------ ours
        config = load_config(
            None,
            [
                f"policy={json.dumps(str(policy))}", "task=lab", "estimator=dr_grpo",
                "loss_agg=seq-mean-token-sum-norm", f"prompts_per_step={prompts}", f"group_size={group_size}",
                f"max_new_tokens={max_new_tokens}", f"steps={warmup + steps}", f"seed={seed}", "temperature=1.0",
                "top_p=1.0", "kl_coef=0.0", "warmup_steps=0", "ppo_epochs=1", "minibatches=1",
                "eval_every=0", "checkpoint_every=0", "tensorboard=false", f"threads={threads}",
            ],
        )  # fmt: skip
        config.lr = float(lr)  # set directly: YAML would read a value like 1e-05 as a string
        config.validate()
        ours = Trainer(config, os.path.join(scratch, "canonrl-run"))

        ours_seconds: list[float] = []
        ours_tokens: list[int] = []
        ours_phase: list[float] = []
        ours_generation: list[float] = []
        ours_generate_seconds = [0.0]
        ours_step = 0

        def timed_generate(*args, **kwargs):
            # the trainer's rollout (canonrl.lab.rollout) samples with its module's `generate`, so it finds this wrapper
            started = time.perf_counter()
            try:
                return sample(*args, **kwargs)
            finally:
                ours_generate_seconds[0] += time.perf_counter() - started

        def run_ours(count: int, timed: bool) -> None:
            nonlocal ours_step
            for _ in range(count):
                ours_step += 1
                ours_generate_seconds[0] = 0.0
                rollout.generate = timed_generate
                try:
                    started = time.perf_counter()
                    result = ours.train_step(ours_step)
                    elapsed = time.perf_counter() - started
                finally:
                    rollout.generate = sample
                if timed:
                    new_tokens = int(round(result.metrics["response_length"] * rows))
                    ours_seconds.append(elapsed)
                    ours_tokens.append(new_tokens)
                    ours_phase.append(new_tokens / result.metrics["rollout_tokens_per_second"])
                    ours_generation.append(ours_generate_seconds[0])
                    if progress is not None:
                        progress("canonrl", len(ours_seconds), steps, elapsed)

        # ------------------------------------------------------------------ TRL
        tokenizer = AutoTokenizer.from_pretrained(policy_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32, local_files_only=True)
        # stop at the lab tokenizer's EOS and pad with its pad token, exactly as our sampler does
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        model.generation_config.bos_token_id = tokenizer.bos_token_id
        chat = bool(getattr(tokenizer, "chat_template", None))  # as canonrl's Policy: template only if it has one

        task = LabTask()
        problems = task.problems("train", prompts * (warmup + steps), seed=seed)
        dataset = datasets.Dataset.from_list(
            [
                {"prompt": [{"role": "user", "content": p.prompt}] if chat else p.prompt, "answer": p.answer}
                for p in problems
            ]
        )

        def lab_reward(completions, answer, **_):
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            return [task.verify(text, Problem("", str(a))).score for text, a in zip(texts, answer)]

        trl_phase_current = [0.0]
        trl_generation_current = [0.0]
        trl_tokens_current = [0]

        class TimedGRPOTrainer(GRPOTrainer):
            """GRPOTrainer with its rollout methods timed; nothing else changes."""

            def _generate_single_turn(self, *args, **kwargs):
                started = time.perf_counter()
                out = super()._generate_single_turn(*args, **kwargs)
                trl_generation_current[0] += time.perf_counter() - started
                return out

            def _generate(self, prompts_):
                started = time.perf_counter()
                out = super()._generate(prompts_)
                trl_phase_current[0] += time.perf_counter() - started
                trl_tokens_current[0] += sum(len(ids) for ids in out[1])  # completion ids, EOS included
                return out

            def _calculate_rewards(self, *args, **kwargs):
                started = time.perf_counter()
                out = super()._calculate_rewards(*args, **kwargs)
                trl_phase_current[0] += time.perf_counter() - started
                return out

        trl_seconds: list[float] = []
        trl_tokens: list[int] = []
        trl_phase: list[float] = []
        trl_generation: list[float] = []
        trl_logged_lengths: list[float] = []
        thread_drift: list[int] = []

        class Alternate(TrainerCallback):
            mark = 0.0

            def on_train_begin(self, args, state, control, **kwargs):
                self.mark = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                now = time.perf_counter()
                if torch.get_num_threads() != threads:
                    thread_drift.append(torch.get_num_threads())
                    torch.set_num_threads(threads)
                step = state.global_step
                if step > warmup:
                    trl_seconds.append(now - self.mark)
                    trl_tokens.append(trl_tokens_current[0])
                    trl_phase.append(trl_phase_current[0])
                    trl_generation.append(trl_generation_current[0])
                    if progress is not None:
                        progress("trl", len(trl_seconds), steps, trl_seconds[-1])
                trl_tokens_current[0] = 0
                trl_phase_current[0] = 0.0
                trl_generation_current[0] = 0.0
                if step >= warmup and (step - warmup) % block == 0 and len(ours_seconds) < steps:
                    run_ours(min(block, steps - len(ours_seconds)), timed=True)
                self.mark = time.perf_counter()

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and state.global_step > warmup and "completions/mean_length" in logs:
                    trl_logged_lengths.append(float(logs["completions/mean_length"]))

        args = GRPOConfig(
            output_dir=os.path.join(scratch, "trl-run"),
            per_device_train_batch_size=rows,  # TRL >= 0.19 counts completions: `prompts` prompts x G
            gradient_accumulation_steps=1,
            steps_per_generation=1,  # one generation batch (= one optimizer step) per generation
            num_generations=group_size,
            num_iterations=1,
            max_completion_length=max_new_tokens,
            temperature=1.0,
            top_p=1.0,
            learning_rate=lr,
            lr_scheduler_type="constant",  # ours is constant; TRL's default decays linearly to 0
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=config.grad_clip,
            loss_type="dr_grpo",
            scale_rewards="none",
            beta=0.0,
            epsilon=config.clip_low,
            epsilon_high=config.clip_high,
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            eval_strategy="no",
            logging_steps=1,
            max_steps=warmup + steps,
            seed=seed,
            dataloader_num_workers=0,
        )
        trainer = TimedGRPOTrainer(
            model=model,
            reward_funcs=lab_reward,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[Alternate()],
        )
        for callback in list(trainer.callback_handler.callbacks):
            if type(callback).__name__ in ("ProgressCallback", "PrinterCallback"):
                trainer.remove_callback(callback)
        torch.set_num_threads(threads)

        run_ours(warmup, timed=False)
        trainer.train()
        if len(ours_seconds) < steps:  # not reached with the schedule above; kept for safety
            run_ours(steps - len(ours_seconds), timed=True)
        generate_every = trainer.args.steps_per_generation * trainer.args.num_iterations
        trl_settings = {
            "optim": str(getattr(trainer.args.optim, "value", trainer.args.optim)),
            "generation_batch_size": trainer.args.generation_batch_size,
            "steps_per_generation": trainer.args.steps_per_generation,
            "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
            # TRL's rule in _generate_and_score_completions: a no-grad forward for old log-probs only when misaligned
            "old_logprob_forward": trainer.args.gradient_accumulation_steps % generate_every != 0,
            "final_lr": trainer._get_learning_rate(),
            "eos_token_ids": list(trainer.eos_token_ids),
        }

    canon = _contender("canonrl", ours_seconds, ours_tokens, ours_phase, ours_generation, rows)
    theirs = _contender(
        "trl", trl_seconds, trl_tokens, trl_phase, trl_generation, rows,
        logged_mean_completion_tokens=(sum(trl_logged_lengths) / len(trl_logged_lengths)) if trl_logged_lengths else None,
        settings=trl_settings,
    )  # fmt: skip
    notes = []
    lengths = (canon["mean_completion_tokens"], theirs["mean_completion_tokens"])
    if min(lengths) > 0 and max(lengths) / min(lengths) > 1.25:
        notes.append(
            f"mean completion lengths differ (canonrl {lengths[0]:.1f}, trl {lengths[1]:.1f} tokens): "
            "steps/s is not like for like; compare rollout tokens/s"
        )
    if thread_drift:
        notes.append(f"torch's thread count changed during the run ({thread_drift}); it was reset to {threads}")
    return {
        "config": {
            "policy": str(policy),
            "policy_dir": str(policy_dir),
            "prompts": prompts,
            "group_size": group_size,
            "max_new_tokens": max_new_tokens,
            "lr": lr,
            "steps": steps,
            "warmup": warmup,
            "block": block,
            "threads": threads,
            "seed": seed,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        },
        "contenders": {"canonrl": canon, "trl": theirs},
        "ratio_steps_per_second": canon["steps_per_second"] / theirs["steps_per_second"],
        "ratio_rollout_tokens_per_second": canon["rollout_tokens_per_second"] / theirs["rollout_tokens_per_second"],
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "notes": notes,
    }


def markdown_table(result: dict) -> str:
    """One row per contender: steps/s, rollout tokens/s (whole step; sampling only), lengths, s/step, ratio."""
    trl_rate = result["contenders"]["trl"]["steps_per_second"]
    lines = [
        "| contender | steps/s | rollout tokens/s | generation tokens/s | mean completion tokens | s/step | ratio to TRL |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in result["contenders"].items():
        lines.append(
            f"| {name} | {row['steps_per_second']:.3f} | {row['rollout_tokens_per_second']:.0f} "
            f"| {row['generation_tokens_per_second']:.0f} | {row['mean_completion_tokens']:.1f} "
            f"| {row['seconds_per_step']:.3f} | {row['steps_per_second'] / trl_rate:.2f}x |"
        )
    return "\n".join(lines)


def _main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Benchmark canonrl's lab trainer against TRL's GRPOTrainer on CPU.")
    parser.add_argument("--policy", default="lab-tiny", help="preset name or Hugging Face model directory")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per contender")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per contender")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block", type=int, default=2, help="timed steps per contender before switching")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the full result here")
    args = parser.parse_args(argv)

    def progress(name: str, done: int, total: int, seconds: float) -> None:
        print(f"  {name:8s} step {done}/{total}: {seconds:.2f} s", flush=True)

    result = run_trl_benchmark(
        policy=args.policy, prompts=args.prompts, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
        lr=args.lr, steps=args.steps, warmup=args.warmup, threads=args.threads, seed=args.seed,
        progress=progress, block=args.block,
    )  # fmt: skip
    c = result["config"]
    print(
        f"\npolicy {c['policy']} | {c['prompts']} prompts x G={c['group_size']}, max {c['max_new_tokens']} new tokens, "
        f"lr {c['lr']} | {c['steps']} timed steps each (+{c['warmup']} warm-up), blocks of {c['block']} | "
        f"{c['threads']} threads | load average {result['load_average_before'][0]:.2f} -> {result['load_average_after'][0]:.2f}\n"
    )
    print(markdown_table(result))
    for note in result["notes"]:
        print(f"\nnote: {note}")
    if args.json_path:
        with open(args.json_path, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    _main()
