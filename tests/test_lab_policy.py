"""Policy presets, local directories and model ids from the local Hugging Face cache (offline)."""

from __future__ import annotations

import shutil

import pytest
import torch

from canonrl.lab import policy as policy_module
from canonrl.lab.policy import LAB_TINY_DIR, load_policy, preset_names, register_policy, resolve_policy_dir

pytestmark = pytest.mark.skipif(not (LAB_TINY_DIR / "config.json").exists(), reason="lab-tiny is not built")


def test_presets_and_directories_resolve():
    assert preset_names()[:3] == ["lab-tiny", "lab-grid-tiny", "smollm2-135m-instruct"]
    assert resolve_policy_dir("lab-tiny") == LAB_TINY_DIR
    assert resolve_policy_dir(str(LAB_TINY_DIR)) == LAB_TINY_DIR


def test_a_model_id_in_the_local_hub_cache_loads_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    snapshot = tmp_path / "models--canonrl--tiny" / "snapshots" / "0123abcd"
    shutil.copytree(LAB_TINY_DIR, snapshot)
    (tmp_path / "models--canonrl--tiny" / "refs").mkdir()
    (tmp_path / "models--canonrl--tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert resolve_policy_dir("canonrl/tiny") == snapshot
    cached, shipped = load_policy("canonrl/tiny"), load_policy("lab-tiny")
    for (name, a), (_, b) in zip(cached.model.state_dict().items(), shipped.model.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="nor a model id in the local Hugging Face cache"):
        resolve_policy_dir("canonrl/not-cached")


def test_a_registered_preset_is_a_policy_name(tmp_path, monkeypatch):
    monkeypatch.setattr(policy_module, "_PRESETS", dict(policy_module._PRESETS))
    register_policy("my-tiny")(lambda: LAB_TINY_DIR)
    assert "my-tiny" in preset_names() and resolve_policy_dir("my-tiny") == LAB_TINY_DIR
    with pytest.raises(ValueError, match="already registered"):
        register_policy("lab-tiny")(lambda: tmp_path)
