"""`canonrl simulate`: the simulator's own correctness, the published qualitative results it must reproduce, the
report folder and the command line's errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

import canonrl
from canonrl.cli import app
from canonrl.simulate import ConditionModel, RolloutModel, SimulationConfig, run_simulation, simulate_batch
from canonrl.simulate.amplification import (
    amplification,
    amplification_study,
    high_part,
    inter_advantage,
    sample_conditions,
)
from canonrl.simulate.measures import alignment_of, estimator_advantages, measure
from canonrl.simulate.model import DIFFICULTY_BUCKETS

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(group_size: int = 8, prompts: int = 4096, seed: int = 0, **model):
    return simulate_batch(RolloutModel(**model), prompts, group_size, torch.Generator().manual_seed(seed))


def measured(name: str, b, **hyperparameters):
    advantages = estimator_advantages(canonrl.get_estimator(name, **hyperparameters), b)
    return measure(name, advantages, b, alignment_of(name)), advantages


# ----------------------------------------------------------------------------------------------------------------
# the simulator itself
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reward", ["bernoulli", "beta:4"])
def test_true_advantages_average_to_zero(reward):
    b = batch(prompts=8192, reward=reward)
    truth = b.true_advantage
    assert abs(float(truth.mean())) < 4 * float(truth.std()) / math.sqrt(truth.numel())
    # and within a difficulty bucket (p is known exactly, so r - p is centred at every p)
    hard = b.p < 1 / 3
    assert abs(float(truth[hard].mean())) < 4 * float(truth[hard].std()) / math.sqrt(int(hard.sum()))


def test_continuous_rewards_have_mean_p_and_the_stated_variance():
    b = batch(prompts=4096, group_size=16, reward="beta:3", difficulty="fixed:0.3")
    assert float(b.rewards.mean()) == pytest.approx(0.3, abs=0.005)
    assert float(b.rewards.var()) == pytest.approx(0.3 * 0.7 / 4, rel=0.05)
    assert 0 < float(b.rewards.min()) and float(b.rewards.max()) < 1
    assert float(b.true_std[0]) == pytest.approx(math.sqrt(0.3 * 0.7 / 4))


def test_length_and_entropy_follow_the_reward_as_configured():
    def gap(b, values):  # mean over correct minus mean over wrong responses
        correct = b.rewards > 0.5
        return float(values[correct].mean() - values[~correct].mean())

    shorter = batch(prompts=4096, difficulty="fixed:0.5", length_corr=-0.6, entropy_corr=0.6)
    lengths = shorter.mask.sum(-1).log()
    entropy = shorter.inputs["entropy"].sum(-1) / shorter.mask.sum(-1)
    assert gap(shorter, lengths) < -0.3 and gap(shorter, entropy.log()) > 0.2
    independent = batch(prompts=4096, difficulty="fixed:0.5", length_corr=0.0, entropy_corr=0.0)
    assert abs(gap(independent, independent.mask.sum(-1).double().log())) < 0.03
    # corr(log length, r) = rho for unclamped lengths (log length = log mean + spread z, up to rounding)
    b = batch(prompts=1024, difficulty="fixed:0.5", length_corr=-0.6, mean_length=96, max_length=10**4)
    log_length = b.mask.sum(-1).double().log()
    assert float(torch.corrcoef(torch.stack([log_length, b.rewards.double()]))[0, 1]) == pytest.approx(-0.6, abs=0.03)


def test_informative_groups_match_the_closed_form_of_the_conditional_mean():
    """"Your Group-Relative Advantage Is Biased": E[p_hat | 1 <= #correct <= G - 1] = (p - p^G) / (1 - (1-p)^G - p^G)."""
    for p, group_size in ((0.2, 8), (0.7, 4)):
        b = batch(group_size=group_size, prompts=20000, difficulty=f"fixed:{p}")
        group_mean = b.rewards.view(-1, group_size).mean(1)
        informative = b.informative.view(-1, group_size)[:, 0]
        expected = (p - p**group_size) / (1 - (1 - p) ** group_size - p**group_size)
        assert float(group_mean[informative].mean()) == pytest.approx(expected, abs=0.01)
        degenerate = (1 - p) ** group_size + p**group_size
        assert float((~informative).double().mean()) == pytest.approx(degenerate, abs=0.01)


def test_dr_grpo_converges_to_the_true_advantage_as_groups_grow():
    rmse = {g: measured("dr_grpo", batch(group_size=g, prompts=32768 // g))[0].rmse for g in (2, 8, 64)}
    assert rmse[2] > rmse[8] > rmse[64]
    # r - p_hat = (r - p) - (p_hat - p): the error is the baseline's, of variance E[p (1 - p)] / G = 1 / (6 G)
    assert rmse[64] == pytest.approx(math.sqrt(1 / (6 * 64)), rel=0.1)
    m, _ = measured("dr_grpo", batch(group_size=64, prompts=512))
    assert m.fitted_scale == pytest.approx(1.0, abs=0.03) and m.sign_error == 0.0


def test_the_inputs_estimators_ask_for_are_simulated_with_the_right_shapes():
    b = batch(group_size=4, prompts=64)
    rows, width = b.mask.shape
    for name in ("entropy", "logprobs", "token_ids", "ref_logprobs"):
        assert b.inputs[name].shape == (rows, width)
        assert torch.all(b.inputs[name][b.mask == 0] == 0)
    for name in ("greedy_rewards", "reference_rewards", "prompt_confidence", "metric", "human_values"):
        assert b.inputs[name].shape == (rows,)
    # per-prompt inputs are constant within a prompt's group
    for name in ("greedy_rewards", "prompt_confidence", "metric", "human_values"):
        per_group = b.inputs[name].view(-1, 4)
        assert torch.equal(per_group, per_group[:, :1].expand(-1, 4))
    assert b.inputs["reward_components"].shape == (rows, 2)
    assert torch.equal(b.inputs["reward_components"][:, 0], b.rewards)


def test_every_registered_estimator_runs_through_the_simulator():
    result = run_simulation(SimulationConfig(group_sizes=(1, 2, 16), responses=2048))
    names = {info.name for info in canonrl.estimators() if info.outcome_level}
    assert {m.estimator for m in result.measures} == names
    assert len(result.measures) == 3 * len(names)
    for m in result.measures:
        for value in (m.bias, m.variance, m.rmse, m.sign_error, m.zero_fraction, m.fitted_scale):
            assert math.isfinite(value), (m.estimator, m.group_size)
        assert 0 <= m.zero_fraction <= 1 and 0 <= m.sign_error <= 1
        assert sum(m.true_weight_by_difficulty.values()) == pytest.approx(1.0)
    # G = 1: a group baseline has nothing to compare with; the core's singleton convention gives exact zeros
    singletons = {m.estimator: m for m in result.measures if m.group_size == 1}
    assert singletons["grpo"].zero_fraction == 1.0 and singletons["remax"].zero_fraction < 1.0


def test_the_same_seed_gives_the_same_measures():
    config = SimulationConfig(estimators=("grpo", "qae"), group_sizes=(4,), responses=1024, seed=3)
    first, second = run_simulation(config), run_simulation(config)
    assert [m.as_dict() for m in first.measures] == [m.as_dict() for m in second.measures]
    other = run_simulation(SimulationConfig(estimators=("grpo", "qae"), group_sizes=(4,), responses=1024, seed=4))
    assert first.measures[0].bias != other.measures[0].bias


# ----------------------------------------------------------------------------------------------------------------
# the published qualitative results
# ----------------------------------------------------------------------------------------------------------------


def bucket_mean(binned: list[float], label: str) -> float:
    _, low, high = next(b for b in DIFFICULTY_BUCKETS if b[0] == label)
    values = [v for i, v in enumerate(binned) if low <= (i + 0.5) / len(binned) < high]
    return sum(values) / len(values)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo"])
@pytest.mark.parametrize("group_size", [4, 8, 16])
def test_group_relative_advantages_are_biased_down_on_hard_and_up_on_easy_prompts(name, group_size):
    """"Your Group-Relative Advantage Is Biased": on the groups that carry a signal, the group mean over-estimates p
    on hard prompts (advantages under-estimated) and under-estimates it on easy ones (over-estimated)."""
    m, _ = measured(name, batch(group_size=group_size, prompts=65536 // group_size))
    assert bucket_mean(m.informative_bias_by_p, "hard") < -0.005  # shrinks with G: p - E[p_hat | informative]
    assert bucket_mean(m.informative_bias_by_p, "easy") > 0.005
    # over all groups (degenerate ones included) the Dr.GRPO numerator is unbiased at every p (error: the group
    # mean's, std <= 0.5 / sqrt(G) per group, over ~ 65536 / G / 10 groups per bin)
    if name == "dr_grpo":
        assert max(abs(v) for v in m.bias_by_p) < 4 * 0.5 / math.sqrt(65536 / 10)


def test_dr_grpo_conditional_bias_equals_the_closed_form():
    p, group_size = 0.25, 8
    m, _ = measured("dr_grpo", batch(group_size=group_size, prompts=30000, difficulty=f"fixed:{p}"))
    conditional_mean = (p - p**group_size) / (1 - (1 - p) ** group_size - p**group_size)
    informative_bias = [v for v in m.informative_bias_by_p if not math.isnan(v)]
    assert informative_bias == [pytest.approx(p - conditional_mean, abs=0.005)]


@pytest.mark.parametrize("group_size", [8, 16])
def test_qae_zeroes_about_80_percent_of_responses_at_its_default_k(group_size):
    """QAE (K = 0.4) reports that about 80% of responses get zero advantage."""
    m, _ = measured("qae", batch(group_size=group_size, prompts=65536 // group_size))
    assert 0.7 <= m.zero_fraction <= 0.9
    grpo, _ = measured("grpo", batch(group_size=group_size, prompts=65536 // group_size))
    assert grpo.zero_fraction < 0.25  # only the degenerate groups


def conditions_sample(group_size=16, prompts=20000, seed=0, **conditions):
    return sample_conditions(
        RolloutModel(difficulty="beta:2,2"), ConditionModel(**conditions), prompts, group_size,
        torch.Generator().manual_seed(seed),
    )  # fmt: skip


def test_canon_amplifies_the_grouping_metric_most_with_equal_halves():
    """CANON Theorem 1 (equal halves): amplification peaks at k = G / 2 and falls as the split is unbalanced."""
    sample = conditions_sample(gap=0.4)
    ratios = {k: amplification(sample, k)[0] for k in range(1, 16)}
    assert max(ratios, key=ratios.get) == 8
    assert ratios[8] > 1.4
    assert ratios[8] > ratios[6] > ratios[4] > ratios[2] > ratios[1]
    assert ratios[8] > ratios[10] > ratios[12] > ratios[14] > ratios[15]


def test_canon_amplification_grows_with_the_metric_reward_correlation():
    study = amplification_study(
        RolloutModel(difficulty="beta:2,2"), ConditionModel(), group_size=8, prompts=20000,
        noises=(4.0, 1.0, 0.3), independent=((0.2, 0.5),), generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    assert study.correlations[0] < study.correlations[1] < study.correlations[2]
    at_half = [row[3] for row in study.ratio]
    assert at_half[0] < at_half[1] < at_half[2]
    # a metric that barely tracks the condition is amplified like an independent one, G / (G - 1)
    assert at_half[0] == pytest.approx(8 / 7, abs=0.05)
    # the reward gap scales both signals alike: the ratio does not depend on it
    gaps = [amplification(conditions_sample(group_size=8, gap=gap, seed=3), 4)[0] for gap in (0.15, 0.45)]
    assert gaps[0] == pytest.approx(gaps[1], abs=0.05)


def test_an_independent_condition_leaves_canons_ratio_unchanged():
    """CANON Theorem 2: the amplification of an independent condition c2 does not depend on its gap or share (it is
    G / (G - 1)), and c2 does not change the amplification of the grouping condition."""
    c2_ratios, c1_ratios = [], []
    for gap2, share2 in ((0.1, 0.5), (0.3, 0.5), (-0.3, 0.5), (0.3, 0.2), (0.3, 0.8)):
        c1, c2 = amplification(conditions_sample(gap=0.3, gap2=gap2, share2=share2, seed=2), 8)
        c1_ratios.append(c1)
        c2_ratios.append(c2)
    assert max(abs(r - 16 / 15) for r in c2_ratios) < 0.03
    assert max(c1_ratios) - min(c1_ratios) < 0.05
    assert min(c1_ratios) > max(c2_ratios) + 0.3  # the grouping condition is amplified far more: selective


def test_inter_advantage_at_equal_halves_is_canonrls_canon_inter():
    sample = conditions_sample(group_size=8, prompts=64)
    ours = inter_advantage(sample.rewards, high_part(sample.metric, 4))
    canon = canonrl.advantages(
        "canon", rewards=sample.rewards.flatten().float(), group=torch.arange(64).repeat_interleave(8),
        mask=torch.ones(512, 1), metric=sample.metric.flatten().float(), mu=1.0,
    )  # fmt: skip
    torch.testing.assert_close(ours.flatten().float(), canon.flatten(), atol=1e-6, rtol=0)
    # hand-computed: rewards [1, 0 | 1, 1] with the last two in C+: A_inter = [1 - 1, 0 - 1, 1 - 0.5, 1 - 0.5]
    by_hand = inter_advantage(torch.tensor([[1.0, 0.0, 1.0, 1.0]]), torch.tensor([[False, False, True, True]]))
    assert by_hand.tolist() == [[0.0, -1.0, 0.5, 0.5]]


# ----------------------------------------------------------------------------------------------------------------
# bad parameters: one-line errors
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model, message",
    [
        ({"difficulty": "fixed:0.2,1.3"}, r"success probabilities must lie in \[0, 1\], got \[1.3\]"),
        ({"difficulty": "fixed:-0.1"}, r"must lie in \[0, 1\]"),
        ({"difficulty": "gauss"}, "difficulty must be 'uniform'"),
        ({"reward": "beta:0"}, "reward must be 'bernoulli' or 'beta:KAPPA'"),
        ({"length_corr": 1.5}, r"length_corr must be a correlation in \[-1, 1\]"),
    ],
)
def test_bad_model_parameters_are_one_line_errors(model, message):
    with pytest.raises(ValueError, match=message) as error:
        batch(**model)
    assert "\n" not in str(error.value)


def test_bad_group_size_and_unknown_estimator_are_one_line_errors():
    with pytest.raises(ValueError, match="group size must be >= 1, got 0"):
        batch(group_size=0)
    with pytest.raises(ValueError, match=r"group sizes must be integers >= 1, got \[4, 0\]"):
        SimulationConfig(group_sizes=(4, 0)).validate()
    with pytest.raises(ValueError, match="nope") as error:
        SimulationConfig(estimators=("nope",)).validate()
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="share must lie in"):
        ConditionModel(share=1.0).validate()


@pytest.mark.parametrize(
    "args, message",
    [
        (["-e", "nope"], "nope"),
        (["--group-sizes", "2,0"], "group sizes must be integers >= 1"),
        (["--group-sizes", "two"], "--group-sizes must be comma-separated integers"),
        (["model.difficulty=fixed:2"], "success probabilities must lie in"),
        (["model.colour=red"], "unknown model setting 'colour'"),
        (["grpo.epsilon=1"], "epsilon"),
        (["justaword"], "override 'justaword' is not key=value"),
        (["lengthcorr=1"], "settings are section.key=value"),
    ],
)
def test_cli_bad_parameters_are_one_line_errors(args, message, tmp_path):
    result = CliRunner().invoke(app, ["simulate", "--out", str(tmp_path / "r"), *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------------------------------------------
# the report folder
# ----------------------------------------------------------------------------------------------------------------


def test_cli_writes_the_report_folder(tmp_path):
    out = tmp_path / "report"
    args = ["simulate", "-e", "grpo", "-e", "canon", "-e", "qae", "--group-sizes", "2,8", "--responses", "2048",
            "--seed", "5", "--out", str(out), "model.length_corr=-0.5", "canon.mu=0.75", "align.qae=fit"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = (out / "summary.md").read_text()
    assert "canonrl simulate" in summary and "(seed 5)" in summary
    for name in ("grpo", "canon", "qae"):
        assert f"| `{name}` |" in summary
    payload = json.loads((out / "results.json").read_text())
    assert payload["seed"] == 5 and payload["model"]["length_corr"] == -0.5
    assert {m["alignment"] for m in payload["measures"] if m["estimator"] == "qae"} == {"fit"}
    assert len(payload["measures"]) == 6
    for png in ("bias-vs-p.png", "informative-bias-vs-p.png", "rmse-vs-group-size.png",
                "zero-fraction-vs-group-size.png", "difficulty-weight.png", "canon-amplification.png"):  # fmt: skip
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    # the hyperparameter reached the estimator: CANON at mu = 0.75 differs from the default mu = 1
    default = run_simulation(SimulationConfig(estimators=("canon",), group_sizes=(8,), responses=2048, seed=5))
    measured_075 = next(m for m in payload["measures"] if m["estimator"] == "canon" and m["group_size"] == 8)
    assert measured_075["rmse"] != pytest.approx(default.measures[0].rmse)


def test_settings_parse_like_train_overrides():
    """`canonrl simulate` reads key=value as `canonrl train` does (canonrl.overrides): YAML values, 1e-3 a number."""
    from canonrl.cli import simulation_config
    from canonrl.overrides import parse_override

    config = simulation_config(["model.length_corr=-5e-1", "grpo.eps=1e-6", "align.grpo=z"], ["grpo"], "4", 64, 0)
    assert config.model.length_corr == -0.5 and config.params == {"grpo": {"eps": 1e-6}} and config.align == {"grpo": "z"}
    assert parse_override("estimator_params.mu=1e-3") == ("estimator_params", "mu", 1e-3)
    assert parse_override("d3s={n_init: 8}") == ("d3s", "", {"n_init": 8})
