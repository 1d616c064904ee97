"""Side-by-side timing of the estimators against the memory floor and verl's built-ins, in one process.

The floor is what any estimator must at least do on the same tensors: one masked broadcast
``scores[:, None] * mask`` (write the [B, T] output), plus, for an estimator that reads a per-token input, one
masked row-sum of that input. Ratios to it are what the README reports; absolute times depend on the machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

import canonrl

#: (label, registry name, hyperparameters, per-token input it must reduce per row, or None). Response lengths are
#: the row sums of the mask, so estimators that need them have "mask" there.
CASES: tuple[tuple[str, str, dict, str | None], ...] = (
    ("grpo", "grpo", {}, None),
    ("dr_grpo", "dr_grpo", {}, None),
    ("rloo", "rloo", {}, None),
    ("reinforce_pp", "reinforce_pp", {}, "mask"),
    ("reinforce_pp_baseline", "reinforce_pp_baseline", {}, "mask"),
    ("dapo", "dapo", {}, "mask"),
    ("canon (entropy, mu=1)", "canon", {"split_by": "entropy", "mu": 1.0}, "entropy"),
    ("canon (length, alpha=0.9)", "canon", {"split_by": "length", "mu": 0.5, "alpha": 0.9}, "mask"),
    ("canon (entropy, cosine schedule)", "canon", {"split_by": "entropy", "mu": "cosine-first-inter-later-intra"}, "entropy"),
    ("canon (entropy, accuracy schedule)", "canon", {"split_by": "entropy", "mu": "first-inter-later-intra"}, "entropy"),
    ("ktae (grpo base)", "ktae", {}, "token_ids"),
    ("ktae (upstream float32 numerics)", "ktae", {"numerics": "upstream"}, "token_ids"),
    ("gdpo (2 reward components)", "gdpo", {}, None),
    ("qae", "qae", {}, None),
    ("ngrpo", "ngrpo", {}, None),
    ("rlev (rloo base)", "rlev", {}, None),
    ("mapo", "mapo", {}, None),
    ("agrae", "agrae", {}, None),
    ("hadw (grpo base)", "hadw", {}, None),
    ("unlikely", "unlikely", {}, "logprobs"),
    ("psr_nsr (w_reinforce)", "psr_nsr", {}, None),
    ("opo", "opo", {}, "mask"),
    ("gpg", "gpg", {}, None),
    ("remax", "remax", {}, None),
    ("aapo", "aapo", {}, None),
    ("adora", "adora", {}, "mask"),
    ("capo", "capo", {}, None),
    ("progrpo", "progrpo", {}, "logprobs"),
    ("ace (reads logprobs and ref_logprobs)", "ace", {}, "logprobs"),
)
#: Qwen2.5's vocabulary size: KTAE's benchmark draws token ids from it.
QWEN_VOCABULARY = 151_936


@dataclass
class Row:
    device: str
    label: str
    seconds: float
    floor_seconds: float | None
    #: mask tokens of the batch the contender ran on (for tokens/s)
    tokens: int

    @property
    def ratio(self) -> float | None:
        return None if self.floor_seconds is None else self.seconds / self.floor_seconds

    def cells(self) -> tuple[str, str, str, str, str]:
        """device, contender, time (ms), × floor, M tokens/s — as the CLI and the markdown table print them."""
        ratio = "" if self.ratio is None else f"{self.ratio:.2f}"
        rate = f"{self.tokens / self.seconds / 1e6:.1f}"
        return self.device, self.label, f"{self.seconds * 1e3:.1f}", ratio, rate


COLUMNS = ("device", "contender", "time (ms)", "× floor", "M tokens/s")
LEFT_COLUMNS = ("device", "contender")


def synthetic_batch(prompts: int, group_size: int, tokens: int, device: str, seed: int = 0) -> dict:
    """Binary rewards, shuffled group ids, right-padded float32 masks of random length, float32 entropies and
    Zipf-distributed token ids over Qwen's vocabulary (frequent ids shared across rollouts, a long rare tail)."""
    generator = torch.Generator().manual_seed(seed)
    rows = prompts * group_size
    group = torch.arange(prompts).repeat_interleave(group_size)[torch.randperm(rows, generator=generator)]
    lengths = torch.randint(tokens // 8, tokens + 1, (rows,), generator=generator)
    mask = (torch.arange(tokens)[None, :] < lengths[:, None]).float()
    def binary() -> torch.Tensor:
        return (torch.rand(rows, generator=generator) < 0.5).float().to(device)

    rewards = binary()
    return {
        "rewards": rewards,
        "group": group.to(device),
        "mask": mask.to(device),
        "entropy": torch.rand(rows, tokens, generator=generator).to(device),
        "token_ids": zipf_token_ids(rows, tokens, generator).to(device),
        "logprobs": -torch.rand(rows, tokens, generator=generator).to(device),
        "ref_logprobs": -torch.rand(rows, tokens, generator=generator).to(device),
        "greedy_rewards": binary(),
        "reference_rewards": binary(),
        "prompt_confidence": torch.rand(prompts, generator=generator).clamp_min(0.01)[group].to(device),
        "human_values": torch.rand(prompts, generator=generator)[group].to(device),  # RLEV's per-prompt value
        "reward_components": torch.stack([rewards, binary()], dim=1),  # multi-reward estimators' [B, K] rewards
    }


def zipf_token_ids(rows: int, tokens: int, generator: torch.Generator, exponent: float = 1.1) -> torch.Tensor:
    """[rows, tokens] ids with P(rank k) proportional to k^-exponent over the vocabulary, ranks shuffled onto ids."""
    weights = torch.arange(1, QWEN_VOCABULARY + 1, dtype=torch.float64).pow(-exponent)
    cumulative = torch.cumsum(weights, 0) / weights.sum()
    uniform = torch.rand(rows * tokens, generator=generator, dtype=torch.float64)
    ranks = torch.searchsorted(cumulative, uniform).clamp_max(QWEN_VOCABULARY - 1)
    return torch.randperm(QWEN_VOCABULARY, generator=generator)[ranks].view(rows, tokens)


def _timed_blocks(contenders: list[tuple[str, Callable[[], object]]], device: str, repeats: int) -> dict[str, float]:
    """Median seconds per contender, each timed in its own block of back-to-back calls after one warm-up call.

    Back-to-back calls are how a trainer calls an estimator: each call allocates its own [B, T] output, and that
    cost (page faults on CPU) belongs to the floor and the contenders alike.
    """

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    medians = {}
    for label, fn in contenders:
        fn()  # warm-up: lazy imports, caches
        sync()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync()
            samples.append(time.perf_counter() - start)
        medians[label] = statistics.median(samples)
    return medians


def _verl_contenders(batch: dict) -> list[tuple[str, Callable[[], object]]]:
    try:
        from verl.trainer.ppo import core_algos
    except Exception:  # noqa: BLE001 — verl is optional; any import failure means "not available"
        return []
    mask = batch["mask"]
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (mask * positions).amax(-1).long()
    token_rewards = torch.zeros_like(mask)
    token_rewards[torch.arange(mask.shape[0], device=mask.device), last] = batch["rewards"]
    uids = np.array([f"uid-{g}" for g in batch["group"].tolist()], dtype=object)

    def run(fn: Callable) -> Callable[[], object]:
        return lambda: fn(token_level_rewards=token_rewards, response_mask=mask, index=uids)

    return [
        ("verl 0.9 grpo (loop)", run(core_algos.compute_grpo_outcome_advantage)),
        ("verl 0.9 grpo_vectorized", run(core_algos.compute_grpo_vectorized_outcome_advantage)),
    ]


FLOOR = "floor: scores[:, None] * mask"
#: what each floor reads besides writing the output, by the per-token input an estimator reduces
FLOOR_READS = {
    "mask": "row-sum of the mask (lengths)",
    "entropy": "masked row-sum of entropy",
    "token_ids": "masked row-sum of token_ids",
    "logprobs": "masked row-sum of logprobs",
}


def keep_freed_memory_for_reuse() -> bool:
    """Ask glibc to serve large allocations from the heap and keep freed memory (no mmap/munmap per call).

    Otherwise every [B, T] output is a fresh mmap whose page faults cost more than the arithmetic and vary from
    call to call, which drowns the differences being measured. Returns False where this is not glibc.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 2**30) and libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def run_benchmark(
    *,
    prompts: int = 512,
    group_size: int = 16,
    tokens: int = 2048,
    repeats: int = 5,
    devices: list[str] | None = None,
    with_verl: bool = True,
    loop_groups: int = 2,
    reuse_memory: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if reuse_memory:
        keep_freed_memory_for_reuse()
    rows: list[Row] = []
    for device in devices:
        if progress:
            progress(device)
        batch = synthetic_batch(prompts, group_size, tokens, device)
        mask, entropy, scores = batch["mask"], batch["entropy"], batch["rewards"]
        total_tokens = int(mask.sum().item())
        # Each floor: the output write plus one masked row-sum of the per-token input an estimator must reduce.
        floor_reads = {
            "mask": lambda mask=mask: mask.sum(-1),
            "entropy": lambda entropy=entropy, mask=mask: (entropy * mask).sum(-1),
            "token_ids": lambda batch=batch, mask=mask: (batch["token_ids"] * mask).sum(-1),
            "logprobs": lambda batch=batch, mask=mask: (batch["logprobs"] * mask).sum(-1),
        }
        reads: dict[str, str | None] = {}
        contenders: list[tuple[str, Callable[[], object]]] = [(FLOOR, lambda scores=scores, mask=mask: scores[:, None] * mask)]
        contenders += [(f"read {name}", fn) for name, fn in floor_reads.items()]
        for label, name, hyperparameters, reads_input in CASES:
            estimator = canonrl.get_estimator(name, **hyperparameters)
            inputs = {k: batch[k] for k in ("rewards", "group", "mask", *estimator.required_inputs())}
            if estimator.multi_reward:
                inputs["rewards"] = batch["reward_components"]
            contenders.append((f"canonrl {label}", lambda e=estimator, i=inputs: e(**i)))
            reads[f"canonrl {label}"] = reads_input
        if with_verl:
            contenders += _verl_contenders(batch)
        times = _timed_blocks(contenders, device, repeats)
        floor = times[FLOOR]
        floor_with = {None: floor} | {name: floor + times[f"read {name}"] for name in floor_reads}
        rows.append(Row(device, FLOOR, floor, floor, total_tokens))
        for name, label in FLOOR_READS.items():
            rows.append(Row(device, "floor + " + label, floor_with[name], floor_with[name], total_tokens))
        for label, _ in contenders:
            if label != FLOOR and not label.startswith("read "):
                rows.append(Row(device, label, times[label], floor_with[reads.get(label)], total_tokens))
        if loop_groups:
            rows.append(_ktae_loop_row(batch, device, prompts, loop_groups, floor_with["token_ids"], total_tokens))
    return rows


def _ktae_loop_row(batch: dict, device: str, prompts: int, loop_groups: int, floor: float, tokens: int) -> Row:
    """The spec's per-group loop (canonrl.reference.ktae_loop) on a few groups, extrapolated to the batch."""
    from canonrl.reference.ktae_loop import ktae_loop

    rows = torch.isin(batch["group"], batch["group"].unique()[:loop_groups]).nonzero().flatten()
    subset = {k: batch[k][rows].cpu() for k in ("rewards", "group", "mask", "token_ids")}
    start = time.perf_counter()
    ktae_loop(**subset)
    seconds = (time.perf_counter() - start) * prompts / loop_groups
    label = f"ktae per-group loop of the spec (extrapolated from {loop_groups} groups)"
    return Row(device, label, seconds, floor, tokens)


def markdown_table(rows: list[Row]) -> str:
    return markdown(COLUMNS, LEFT_COLUMNS, rows)


def markdown(columns: tuple[str, ...], left: tuple[str, ...], rows) -> str:
    """A markdown table of rows with ``cells()``; the ``left`` columns left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" if c in left else "---:" for c in columns) + "|"]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)
