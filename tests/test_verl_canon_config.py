"""examples/verl/canon_qwen2.5_math_7b.yaml: composes with Hydra against verl's installed config and validates with
verl's config classes and verl's own start-up check, on CPU (the config itself needs GPUs to run)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

pytest.importorskip("verl")
hydra = pytest.importorskip("hydra")
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

pytestmark = pytest.mark.verl

CONFIG_DIR = Path(__file__).resolve().parents[1] / "examples" / "verl"
CONFIG_NAME = "canon_qwen2.5_math_7b"


@pytest.fixture(scope="module")
def cfg():
    # The YAML's defaults list starts with verl's ppo_trainer, found through hydra.searchpath pkg://verl.trainer.config
    # (the installed package), exactly as `python -m verl.trainer.main_ppo --config-path=... --config-name=...` does.
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name=CONFIG_NAME)


def test_paper_settings(cfg):
    actor = cfg.actor_rollout_ref.actor
    rollout = cfg.actor_rollout_ref.rollout
    assert cfg.algorithm.adv_estimator == "canon"
    assert rollout.n == 16
    assert rollout.name == "vllm"
    assert rollout.temperature == 1.0
    assert actor.optim.lr == pytest.approx(1e-6)
    assert actor.clip_ratio_low == pytest.approx(0.2)
    assert actor.clip_ratio_high == pytest.approx(0.28)
    assert actor.loss_agg_mode == "seq-mean-token-sum"
    assert actor.ppo_epochs == 1
    assert actor.ppo_mini_batch_size == 32
    assert actor.entropy_coeff == 0
    # no KL anywhere
    assert actor.use_kl_loss is False
    assert cfg.algorithm.use_kl_in_reward is False
    assert cfg.data.train_batch_size == 512
    assert cfg.data.max_prompt_length == 2048
    assert cfg.data.max_response_length == 8192
    assert cfg.actor_rollout_ref.model.path == "Qwen/Qwen2.5-Math-7B"
    # verl's default trainer; the patch feeds it entropies (tests/test_verl_v1_trainer.py)
    assert cfg.trainer.use_v1 is True
    canon = cfg.algorithm.canon
    assert canon.split_by == "entropy"
    assert canon.mu == "cosine-first-inter-later-intra"
    assert (canon.schedule_steps, canon.warmup_steps, canon.cycles) == (150, 30, 3)
    assert (canon.mu_high, canon.mu_low) == (1.0, 0.4)
    # the official code's Z = max response length under seq-mean-token-sum
    assert canon.normalizer == cfg.data.max_response_length


def test_says_it_needs_gpus():
    text = (CONFIG_DIR / f"{CONFIG_NAME}.yaml").read_text()
    assert "NEEDS GPUs" in text and "CANONRL_VERL_PATCH=1" in text


def test_verl_dataclasses(cfg):
    from verl.trainer.config import AlgoConfig
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.config import FSDPActorConfig, RolloutConfig

    # verl keeps `algorithm` a DictConfig during training (AlgoConfig is only a type hint there), so canonrl's extra
    # `algorithm.canon` key reaches the estimator; AlgoConfig itself has no such field, so validate the rest.
    algorithm = OmegaConf.create(OmegaConf.to_container(cfg.algorithm, resolve=True))
    algorithm.pop("canon")
    algo = omega_conf_to_dataclass(algorithm, AlgoConfig)
    assert isinstance(algo, AlgoConfig)
    assert algo.adv_estimator == "canon" and algo.use_kl_in_reward is False

    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert isinstance(actor, FSDPActorConfig)
    assert actor.clip_ratio_high == pytest.approx(0.28)
    assert actor.loss_agg_mode == "seq-mean-token-sum"
    assert actor.optim.lr == pytest.approx(1e-6)
    assert actor.use_kl_loss is False

    rollout = omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)
    assert isinstance(rollout, RolloutConfig)
    assert rollout.n == 16 and rollout.name == "vllm"


def test_verl_startup_validation(cfg):
    """verl.trainer.main_ppo runs validate_config before starting Ray; it must pass (no reference model, no critic)."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # verl: "Disabled critic as algorithm.adv_estimator != gae"
        use_ref = need_reference_policy(cfg)
        use_critic = need_critic(cfg)
    assert use_ref is False and use_critic is False
    validate_config(config=cfg, use_reference_policy=use_ref, use_critic=use_critic)


def test_canonrl_accepts_algorithm_canon(cfg):
    from canonrl.integrations.verl import hyperparameters_from_config
    from canonrl.registry import get_estimator

    hp = hyperparameters_from_config("canon", cfg.algorithm)
    assert hp == {
        "split_by": "entropy",
        "mu": "cosine-first-inter-later-intra",
        "schedule_steps": 150,
        "warmup_steps": 30,
        "cycles": 3,
        "mu_high": 1.0,
        "mu_low": 0.4,
        "normalizer": 8192,
    }
    est = get_estimator("canon", **hp)
    assert "entropy" in est.required_inputs()
    # the paper's Cosin-FILI values (spec: 0.067 at step 1, 1.0 after warm-up, 0.70 at 50, 0.40 at 69, restart at 70)
    mus = [float(est.mu_at(step)) for step in (1, 30, 50, 69, 70)]
    assert mus == pytest.approx([1 / 15, 1.0, 0.7, 0.4, 1.0], abs=2e-3)
