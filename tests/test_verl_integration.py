"""canonrl's estimators inside verl: registration, verl's real ``compute_advantage``, the patch, the entry point."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
ray_trainer = pytest.importorskip("verl.trainer.ppo.ray_trainer")  # needs verl's cachetools/uvicorn/fastapi extras
from omegaconf import OmegaConf  # noqa: E402  (a dependency of verl)
from verl import DataProto  # noqa: E402

import canonrl  # noqa: E402
from canonrl.integrations import verl as cv  # noqa: E402
from canonrl.integrations.verl.adapter import cached_estimator as estimator_for  # noqa: E402

pytestmark = pytest.mark.verl

ATOL = 1e-5
#: pyproject: [project.entry-points."verl.plugins"] canonrl = "canonrl.integrations.verl:verl_plugin"
ENTRY_POINT_VALUE = "canonrl.integrations.verl:verl_plugin"


@pytest.fixture(scope="module", autouse=True)
def registered():
    before = dict(core_algos.ADV_ESTIMATOR_REGISTRY)
    names = cv.register_all()
    yield names, before
    cv.unpatch_compute_advantage()


def make_inputs(seed: int = 0, sizes=(4, 3, 5, 4), T: int = 7, vocab: int = 6):
    """Groups of unequal sizes (no singletons), uids shuffled, right-padded masks, score on the last valid token."""
    g = torch.Generator().manual_seed(seed)
    uids = np.array([f"u{k}" for k, n in enumerate(sizes) for _ in range(n)], dtype=object)
    perm = torch.randperm(len(uids), generator=g).numpy()
    uids = uids[perm]
    B = len(uids)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    scores = torch.rand(B, generator=g).round(decimals=1)
    token_level_rewards = torch.zeros(B, T)
    token_level_rewards[torch.arange(B), lengths - 1] = scores
    return {
        "token_level_rewards": token_level_rewards,
        "response_mask": mask,
        "uid": uids,
        "rewards": scores,
        "entropys": torch.rand(B, T, generator=g) * 2,
        "responses": torch.randint(0, vocab, (B, T), generator=g),
    }


def data_proto(x, *keys: str) -> DataProto:
    tensors = {"token_level_rewards": x["token_level_rewards"].clone(), "response_mask": x["response_mask"].clone()}
    tensors.update({k: x[k].clone() for k in keys})
    return DataProto.from_dict(tensors=tensors, non_tensors={"uid": x["uid"].copy()})


def run(x, estimator: str, *keys: str, config=None, **kwargs) -> torch.Tensor:
    # the module attribute, so that the patch (when applied) is what runs
    out = ray_trainer.compute_advantage(data_proto(x, *keys), adv_estimator=estimator, config=config, **kwargs)
    return out.batch["advantages"]


def algo(**extra):
    return OmegaConf.create({"adv_estimator": "x", "norm_adv_by_std_in_grpo": True, **extra})


# ---------------------------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------------------------


def test_register_all_names_and_idempotence(registered):
    names, before = registered
    for name in ("canon", "ktae", "dr_grpo", "dapo", "canonrl_grpo", "canonrl_rloo", "canonrl_canon"):
        assert callable(core_algos.get_adv_estimator_fn(name))
    assert names["canonrl_grpo"] == "grpo" and names["canon"] == "canon"
    assert "grpo" not in names and "rloo" not in names
    # no built-in (or previously registered) name was overridden
    for name, fn in before.items():
        assert core_algos.ADV_ESTIMATOR_REGISTRY[name] is fn
    snapshot = dict(core_algos.ADV_ESTIMATOR_REGISTRY)
    assert cv.register_all() == names
    assert core_algos.ADV_ESTIMATOR_REGISTRY == snapshot
    registered = set(cv.VERL_NAMES.values())
    assert {e.name for e in canonrl.estimators() if e.outcome_level} <= registered  # missing inputs: errors that say so
    # step estimators of verl's agent-loop layout (a trajectory per row) and critic ones: registered
    assert {"gigpo", "trloo", "matchtir", "mars", "gae"} <= registered and "canonrl_gae" in cv.VERL_NAMES
    # trees, row-per-step-only and producer inputs verl has no key for: not registered
    assert not {"rose", "spo_tree", "egae", "spo_chain", "fspo"} & registered


def test_the_installed_verl_is_a_tested_release():
    import verl

    assert cv.check_verl_version(), (
        f"verl {verl.__version__} is outside canonrl's tested range {cv.SUPPORTED_VERL}: rerun the verl tests "
        f"and, if they pass, widen SUPPORTED_VERL and the pin in pyproject.toml"
    )


def test_an_untested_verl_release_warns_with_the_range():
    with pytest.warns(RuntimeWarning, match=r"tested with verl >=0\.9,<0\.10, not 0\.10\.0"):
        assert not cv.check_verl_version("0.10.0")
    assert cv.check_verl_version("0.9.1")


def test_a_failing_plugin_says_so_before_verl_swallows_it(monkeypatch, caplog):
    def broken():
        raise AttributeError("'module' object has no attribute 'ADV_ESTIMATOR_REGISTRY'")

    monkeypatch.setattr(cv, "register_all", broken)
    with pytest.warns(RuntimeWarning, match="canonrl's verl plugin failed.*ADV_ESTIMATOR_REGISTRY"):
        with pytest.raises(AttributeError):
            cv.verl_plugin  # noqa: B018 — reading the attribute runs the plugin, as verl's loader does
    assert any(r.levelname == "ERROR" and "plugin failed" in r.getMessage() for r in caplog.records)


def test_importing_canonrl_does_not_import_verl():
    code = "import sys, canonrl, canonrl.integrations, canonrl.integrations.verl; assert 'verl' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)  # a hang guard only


# ---------------------------------------------------------------------------------------------------------------
# Parity through verl's real dispatcher
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_canonrl_grpo_matches_verl_grpo(seed):
    x = make_inputs(seed)
    for norm in (True, False):
        ours = run(x, "canonrl_grpo", config=algo(norm_adv_by_std_in_grpo=norm))
        theirs = run(x, "grpo", norm_adv_by_std_in_grpo=norm, config=algo(norm_adv_by_std_in_grpo=norm))
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=ATOL)


def test_dr_grpo_matches_verl_grpo_without_std():
    x = make_inputs(2)
    ours = run(x, "dr_grpo", config=algo())
    theirs = run(x, "grpo", norm_adv_by_std_in_grpo=False, config=algo())
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=ATOL)


def test_canonrl_rloo_matches_verl_rloo():
    x = make_inputs(3)
    ours, theirs = run(x, "canonrl_rloo", config=algo()), run(x, "rloo", config=algo())
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=ATOL)


def test_canon_length_from_hydra_style_config():
    x = make_inputs(4)
    config = OmegaConf.merge(algo(), OmegaConf.from_dotlist(["canon.mu=0.5", "canon.split_by=length"]))
    ours = run(x, "canon", config=config)
    direct = canonrl.advantages(
        "canon", rewards=x["rewards"], group=list(x["uid"]), mask=x["response_mask"], mu=0.5, split_by="length"
    )
    torch.testing.assert_close(ours, direct, atol=ATOL, rtol=ATOL)
    assert ours.abs().sum() > 0
    assert torch.all(ours[x["response_mask"] == 0] == 0)


def test_one_estimator_per_hyperparameters_keeps_its_step():
    x = make_inputs(5)
    config = algo(canon={"split_by": "length", "mu": 0.25})
    run(x, "canon", config=config)
    run(x, "canon", config=config)
    est = estimator_for("canon", {"split_by": "length", "mu": 0.25})
    assert est.step == 2


def test_bad_hyperparameter_is_a_one_line_error():
    x = make_inputs(6)
    with pytest.raises(ValueError, match=r"unknown hyperparameter 'muu'.*valid: .*mu") as err:
        run(x, "canon", config=algo(canon={"muu": 1.0, "split_by": "length"}))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("patch", [False, True], ids=["unpatched", "patched"])
def test_canonrl_remax_matches_verl_remax(patch, request):
    if patch:
        request.getfixturevalue("patched")
    x = make_inputs(10)
    g = torch.Generator().manual_seed(10)
    x["reward_baselines"] = torch.rand(len(x["uid"]), generator=g).round(decimals=1)  # verl's greedy rewards
    ours = run(x, "canonrl_remax", "reward_baselines", config=algo())
    theirs = run(x, "remax", "reward_baselines", config=algo())
    assert theirs.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize(
    "canonrl_name, config, verl_name",
    [("canonrl_opo", {}, "opo"), ("canonrl_gpg", {"canonrl_gpg": {"alpha": "verl"}}, "gpg")],
)
def test_reward_only_builtins_match_verl(canonrl_name, config, verl_name):
    for seed in (11, 12):
        x = make_inputs(seed, sizes=(4, 3, 5, 4, 2, 6))
        x["token_level_rewards"][0] = 0  # a zero reward (GPG's verl alpha counts non-zero rewards)
        ours, theirs = run(x, canonrl_name, config=algo(**config)), run(x, verl_name, config=algo())
        assert theirs.abs().max() > 0.1
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=ATOL)


# ---------------------------------------------------------------------------------------------------------------
# GDPO: reward components from verl's reward_extra_info
# ---------------------------------------------------------------------------------------------------------------

GDPO_KEYS = ["accuracy_reward", "format_reward"]
#: canonrl's gdpo with verl's conventions (eps 1e-6, token-weighted batch whitening, singletons' raw score)
VERL_GDPO = {"eps": 1e-6, "batch_norm": "token", "singleton": "raw"}


def gdpo_proto(x, seed: int, prompt_width: int = 3) -> tuple[DataProto, np.ndarray]:
    """A batch as verl's legacy trainer has it for GDPO: each reward component a non_tensor_batch column (from the
    reward function's reward_extra_info), and prompts/attention_mask, which verl's GDPO reads to place them."""
    g = torch.Generator().manual_seed(seed)
    rows = len(x["uid"])
    components = np.stack(
        [torch.randint(0, 2, (rows,), generator=g).numpy(), torch.rand(rows, generator=g).round(decimals=1).numpy()],
        axis=1,
    ).astype(np.float32)
    data = data_proto(x)
    data.batch["prompts"] = torch.ones(rows, prompt_width, dtype=torch.long)
    data.batch["attention_mask"] = torch.cat([torch.ones(rows, prompt_width), x["response_mask"]], 1).long()
    for k, key in enumerate(GDPO_KEYS):
        data.non_tensor_batch[key] = components[:, k].astype(object)
    return data, components


@pytest.mark.parametrize("weights", [None, [1.0, 0.5]])
def test_patched_canonrl_gdpo_gets_the_reward_components_and_matches_verl_gdpo(patched, weights):
    x = make_inputs(13, sizes=(4, 3, 5, 4, 6))
    extra = {"gdpo_reward_keys": GDPO_KEYS}
    if weights is not None:
        extra["gdpo_reward_weights"] = weights
    data, components = gdpo_proto(x, 13)
    theirs = ray_trainer.compute_advantage(data, adv_estimator="gdpo", config=algo(**extra)).batch["advantages"]
    data, _ = gdpo_proto(x, 13)
    ours = ray_trainer.compute_advantage(
        data, adv_estimator="canonrl_gdpo", config=algo(canonrl_gdpo=VERL_GDPO, **extra)
    ).batch["advantages"]
    assert theirs.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=ATOL)
    # and it is canonrl's gdpo on those components, with the config's weights
    direct = canonrl.advantages(
        "gdpo", rewards=torch.from_numpy(components), group=list(x["uid"]), mask=x["response_mask"],
        weights=None if weights is None else tuple(weights), **VERL_GDPO,
    )  # fmt: skip
    torch.testing.assert_close(ours, direct, atol=ATOL, rtol=ATOL)
    # the components matter: the scalar reward alone gives something else
    alone = canonrl.advantages("gdpo", rewards=x["rewards"], group=list(x["uid"]), mask=x["response_mask"], **VERL_GDPO)
    assert (ours - alone).abs().max() > 0.1


def test_gdpo_without_reward_keys_uses_the_outcome_reward_as_verl_does(patched):
    x = make_inputs(14)
    ours = run(x, "canonrl_gdpo", config=algo(canonrl_gdpo=VERL_GDPO))
    data, _ = gdpo_proto(x, 14)
    theirs = core_algos.compute_gdpo_outcome_advantage(x["token_level_rewards"], x["response_mask"], x["uid"])[0]
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=ATOL)


def test_gdpo_reward_components_errors():
    x = make_inputs(15)
    config = algo(gdpo_reward_keys=GDPO_KEYS)
    with pytest.raises(ValueError, match="gdpo_reward_keys.*patch_compute_advantage") as err:
        ray_trainer.compute_advantage(gdpo_proto(x, 15)[0], adv_estimator="canonrl_gdpo", config=config)
    assert "\n" not in str(err.value)
    cv.patch_compute_advantage()
    try:
        data, _ = gdpo_proto(x, 15)
        del data.non_tensor_batch["format_reward"]
        with pytest.raises(ValueError, match="reward component 'format_reward'.*not in the batch's non_tensor_batch"):
            ray_trainer.compute_advantage(data, adv_estimator="canonrl_gdpo", config=config)
        data, _ = gdpo_proto(x, 15)
        data.non_tensor_batch["format_reward"][2] = None
        with pytest.raises(ValueError, match=r"'format_reward'.*missing \(None\) or not finite at rows \[2\]"):
            ray_trainer.compute_advantage(data, adv_estimator="canonrl_gdpo", config=config)
        data.non_tensor_batch["format_reward"][2] = "high"
        with pytest.raises(ValueError, match="'format_reward'.*non-numeric"):
            ray_trainer.compute_advantage(data, adv_estimator="canonrl_gdpo", config=config)
        with pytest.raises(ValueError, match="gdpo_reward_keys must be a non-empty list"):
            ray_trainer.compute_advantage(
                gdpo_proto(x, 15)[0], adv_estimator="canonrl_gdpo", config=algo(gdpo_reward_keys="format_reward")
            )
    finally:
        cv.unpatch_compute_advantage()


# ---------------------------------------------------------------------------------------------------------------
# Extra inputs: without and with the patch
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["canon", "ktae"])
def test_missing_input_without_patch_says_how_to_get_it(estimator):
    assert not cv.is_patched()
    x = make_inputs(7)
    with pytest.raises(ValueError, match="patch_compute_advantage") as err:
        run(x, estimator, "entropys", "responses", config=algo())  # present in the batch, but verl does not pass them
    assert "\n" not in str(err.value)


def test_patched_canon_entropy_and_ktae_match_canonrl(patched):
    x = make_inputs(8)
    common = {"rewards": x["rewards"], "group": list(x["uid"]), "mask": x["response_mask"]}
    canon = run(x, "canon", "entropys", "responses", config=algo(canon={"split_by": "entropy"}))
    direct = canonrl.advantages("canon", entropy=x["entropys"], **common)
    torch.testing.assert_close(canon, direct, atol=ATOL, rtol=ATOL)
    ktae = run(x, "ktae", "entropys", "responses", config=algo())
    direct = canonrl.advantages("ktae", token_ids=x["responses"], **common)
    torch.testing.assert_close(ktae, direct, atol=ATOL, rtol=ATOL)
    # other estimators still go through verl's own code
    verl_grpo = core_algos.compute_grpo_outcome_advantage(x["token_level_rewards"], x["response_mask"], x["uid"])[0]
    torch.testing.assert_close(run(x, "grpo", config=algo()), verl_grpo, atol=ATOL, rtol=ATOL)


def test_patch_reads_global_steps_and_kept_entropies(patched):
    x = make_inputs(9)
    data = data_proto(x, "responses")
    data.batch[cv.KEPT_ENTROPY_KEY] = x["entropys"].clone()
    data.meta_info["global_steps"] = 7
    config = algo(canon={"split_by": "entropy", "mu": 0.75})
    out = ray_trainer.compute_advantage(data, adv_estimator="canon", config=config)
    assert estimator_for("canon", {"split_by": "entropy", "mu": 0.75}).step == 7
    assert cv.KEPT_ENTROPY_KEY not in out.batch.keys()  # dropped after use, not shipped to the actor update
    direct = canonrl.advantages(
        "canon", rewards=x["rewards"], group=list(x["uid"]), mask=x["response_mask"], entropy=x["entropys"], mu=0.75
    )
    torch.testing.assert_close(out.batch["advantages"], direct, atol=ATOL, rtol=ATOL)


def test_patch_is_idempotent_and_reversible():
    original = ray_trainer.compute_advantage
    method = ray_trainer.RayPPOTrainer.__dict__["_compute_old_log_prob"]
    cv.patch_compute_advantage()
    first = ray_trainer.compute_advantage
    cv.patch_compute_advantage()
    assert ray_trainer.compute_advantage is first is not original and cv.is_patched()
    cv.unpatch_compute_advantage()
    assert ray_trainer.compute_advantage is original and not cv.is_patched()
    assert ray_trainer.RayPPOTrainer.__dict__["_compute_old_log_prob"] is method


# ---------------------------------------------------------------------------------------------------------------
# The verl.plugins entry point
# ---------------------------------------------------------------------------------------------------------------


def test_entry_point_loaded_by_import_verl(tmp_path: Path):
    """A throwaway dist-info with canonrl's entry point on sys.path: plain ``import verl`` registers (and patches)."""
    dist = tmp_path / "canonrl_verl_probe-0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: canonrl-verl-probe\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text(f"[verl.plugins]\ncanonrl = {ENTRY_POINT_VALUE}\n")
    code = textwrap.dedent(
        """
        import verl
        from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY
        registry = sorted(ADV_ESTIMATOR_REGISTRY)
        assert "canon" in registry and "canonrl_grpo" in registry, registry
        from verl.trainer.ppo import ray_trainer  # CANONRL_VERL_PATCH=1: the plugin also patched the dispatcher
        assert getattr(ray_trainer.compute_advantage, "canonrl_patched", False)
        """
    )
    src = str(Path(cv.__file__).parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), src, os.environ.get("PYTHONPATH", "")])}
    env.pop("VERL_USE_EXTERNAL_PLUGINS", None)
    env[cv.PATCH_ENV] = "1"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]


def test_installed_entry_point():
    eps = [ep for ep in importlib.metadata.entry_points(group="verl.plugins") if ep.value.startswith("canonrl")]
    if not eps:
        pytest.skip('canonrl\'s verl.plugins entry point is not installed (add it to pyproject and reinstall)')
    assert [ep.value for ep in eps] == [ENTRY_POINT_VALUE]
    assert eps[0].load() == cv.VERL_NAMES
