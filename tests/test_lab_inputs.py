"""The lab trainer supplies the extra estimator inputs (greedy and reference rewards, reference log-probs, prompt
confidence, reward components) exactly when the configured estimator asks for them, with the right values.

Test-only estimators (registered for this module only) declare the inputs and record the batch they receive;
each value is then recomputed independently: a separate greedy evaluation, a fresh copy of the initial weights,
a plain forward per row. Everything runs with one torch thread on a 2-layer, 32-wide Llama, 4 prompts x 4 samples.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from canonrl.lab.config import load_config
from canonrl.lab.policy import Policy, load_policy
from canonrl.lab.seeds import seed_of as _seed
from canonrl.lab.tasks.base import Reward, reward_components
from canonrl.lab.tasks.lab import LabTask
from canonrl.lab.trainer import WALL_CLOCK_KEYS, Trainer
from canonrl.registry import _REGISTRY, SequenceEstimator, register
from conftest import ParityTask, tiny_lab_model, train_until_interrupted, use_test_tasks

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS, GROUP = 4, 4
TINY = [
    "max_new_tokens=16",
    f"prompts_per_step={PROMPTS}",
    f"group_size={GROUP}",
    "eval_problems=8",
    "eval_samples=2",
    "threads=1",
    "tensorboard=false",
    "task=inputs",
]
EXTRA_METRICS = ("greedy_reward", "greedy_tokens", "greedy_seconds", "reference_reward", "reference_tokens",
                 "reference_seconds", "ref_logprobs_seconds", "prompt_confidence")  # fmt: skip

# ----------------------------------------------------------------------------------------------------------------
# a task with mixed rewards for a random policy, and two reward components
# ----------------------------------------------------------------------------------------------------------------


class InputsTask(ParityTask):
    """`ParityTask` (`correct` when the response text has even length) with `formatted` when its length is a
    multiple of 3, so a random policy gets mixed groups on both."""

    name = "inputs"
    components = ("correct", "formatted", "length")
    reward_components = ("correct", "formatted")

    def verify(self, response, problem):
        correct = float(len(response) % 2 == 0)
        formatted = float(len(response) % 3 == 0)
        return Reward(correct, {"correct": correct, "formatted": formatted, "length": min(1.0, len(response) / 64)})


class ValuedTask(InputsTask):
    """`InputsTask` with the lab task's per-prompt values."""

    name = "valued"

    def value(self, problem):
        return self.inner.value(problem)


@pytest.fixture(autouse=True)
def inputs_task(monkeypatch):
    use_test_tasks(monkeypatch, {"inputs": InputsTask, "valued": ValuedTask})


# ----------------------------------------------------------------------------------------------------------------
# test-only estimators: GRPO-like advantages (so updates are real) that record their batch
# ----------------------------------------------------------------------------------------------------------------

SEEN: dict[str, list] = {}


class Recording(SequenceEstimator):
    description = "test only: records its batch"

    def sequence_advantages(self, batch):
        SEEN.setdefault(self.name, []).append(batch)
        scores = self.scores(batch)
        centred = scores - batch.grouping.mean(scores)[batch.group_index]
        return torch.where(batch.valid, centred, 0.0)

    def scores(self, batch):
        return batch.rewards


class Plain(Recording):
    name = "_test_inputs_plain"


class Greedy(Recording):
    name = "_test_inputs_greedy"
    requires = ("greedy_rewards",)


class ReferenceRewards(Recording):
    name = "_test_inputs_reference"
    requires = ("reference_rewards",)


class RefLogprobs(Recording):
    name = "_test_inputs_ref_logprobs"
    requires = ("ref_logprobs",)


class Confidence(Recording):
    name = "_test_inputs_confidence"
    requires = ("prompt_confidence",)


class Multi(Recording):
    name = "_test_inputs_multi"
    multi_reward = True


class Everything(Recording):
    """Every extra input, each of which moves the advantages (so resume must reproduce all of them)."""

    name = "_test_inputs_all"
    requires = ("greedy_rewards", "reference_rewards", "ref_logprobs", "prompt_confidence")
    multi_reward = True

    def scores(self, batch):
        return (
            batch.reward_components[:, 0] - batch.greedy_rewards
            + 0.5 * batch.reward_components[:, 1] - 0.25 * batch.reference_rewards
            - 0.1 * batch.masked_row_mean("ref_logprobs") + batch.prompt_confidence
        )  # fmt: skip


class NeedsHumanValues(Recording):
    name = "_test_inputs_human_values"
    requires = ("human_values",)


class NeedsTokenRewards(Recording):
    name = "_test_inputs_token_rewards"
    requires = ("token_rewards",)


ESTIMATORS = (Plain, Greedy, ReferenceRewards, RefLogprobs, Confidence, Multi, Everything, NeedsHumanValues, NeedsTokenRewards)


@pytest.fixture(scope="module", autouse=True)
def registered():
    for cls in ESTIMATORS:
        register(cls)
    yield
    for cls in ESTIMATORS:
        _REGISTRY.pop(cls.name, None)


@pytest.fixture(autouse=True)
def clear_seen():
    SEEN.clear()


def make_trainer(policy_dir: Path, run_dir: Path, estimator, *overrides: str) -> Trainer:
    config = load_config(None, [f"policy={policy_dir}", *TINY, f"estimator={estimator.name}", *overrides])
    return Trainer(config, run_dir)


def step_problems(trainer: Trainer, step: int):
    return trainer.task.problems("train", PROMPTS, seed=_seed(trainer.config.seed, "problems", step))


def frozen_copy(trainer: Trainer) -> Policy:
    return Policy(copy.deepcopy(trainer.policy.model).eval(), trainer.policy.tokenizer, "copy")


def moved(trainer: Trainer, policy_dir: Path) -> bool:
    initial = load_policy(str(policy_dir)).model.state_dict()
    return any(not torch.equal(v, initial[k]) for k, v in trainer.policy.model.state_dict().items())


def verify_scores(policy, task, rollouts, problems) -> torch.Tensor:
    from canonrl.lab.evaluate import score_rollouts

    _, verdict = score_rollouts(policy, task, rollouts, problems)
    return torch.tensor(verdict.scores)


# ----------------------------------------------------------------------------------------------------------------
# no cost unless asked
# ----------------------------------------------------------------------------------------------------------------


def test_an_estimator_without_extra_inputs_pays_nothing(policy_dir, tmp_path, monkeypatch):
    from canonrl.lab import inputs, rollout, sampling

    calls = []
    real = sampling.generate
    for module in (rollout, inputs):  # every module of the step that samples
        monkeypatch.setattr(module, "generate", lambda *a, **k: calls.append(k) or real(*a, **k))
    trainer = make_trainer(policy_dir, tmp_path, Plain)
    assert trainer.reference is None and trainer.reward_names is None
    result = trainer.train_step(1)
    assert len(calls) == 1 and "prompt_confidence" not in calls[0]  # the policy's rollout only
    assert result.rollouts.prompt_confidence is None and result.inputs == {}
    assert not set(EXTRA_METRICS) & set(result.metrics)
    (batch,) = SEEN[Plain.name]
    assert batch.rewards.shape == (PROMPTS * GROUP,) and batch.reward_components is None
    for name in ("greedy_rewards", "reference_rewards", "ref_logprobs", "prompt_confidence"):
        assert getattr(batch, name) is None


def test_an_input_the_lab_cannot_supply_is_an_error_up_front(policy_dir, tmp_path):
    with pytest.raises(ValueError, match=r"needs token_rewards \(\[B, T\], per-token rewards .*\), which the lab trainer does not provide"):
        make_trainer(policy_dir, tmp_path, NeedsTokenRewards)


# ----------------------------------------------------------------------------------------------------------------
# human_values: the task's per-prompt value (RLEV)
# ----------------------------------------------------------------------------------------------------------------


def test_human_values_are_each_prompts_value_from_the_task(policy_dir, tmp_path):
    trainer = make_trainer(policy_dir, tmp_path, NeedsHumanValues, "task=lab")
    result = trainer.train_step(1)
    (batch,) = SEEN[NeedsHumanValues.name]
    problems = step_problems(trainer, 1)
    # by hand: points = operations, over an exam of ten 4-operation problems (the default 5 operands)
    expected = torch.tensor([len(p.meta["ops"]) / 40 for p in problems]).repeat_interleave(GROUP)
    assert torch.equal(batch.human_values, expected)
    assert set(batch.human_values.mul(40).round().tolist()) <= {2.0, 3.0, 4.0}
    assert result.metrics["prompt_value"] == pytest.approx(expected.mean().item())


def test_a_task_without_values_cannot_feed_human_values(policy_dir, tmp_path):
    with pytest.raises(ValueError, match="needs human_values, a per-prompt value, which task 'inputs' does not give"):
        make_trainer(policy_dir, tmp_path, NeedsHumanValues)


def test_rlev_trains_in_the_lab_with_the_values(policy_dir, tmp_path):
    from canonrl.methods.rlev import value_weighted_rewards
    from canonrl.registry import get_estimator

    trainer = make_trainer(policy_dir, tmp_path, NeedsHumanValues, "task=valued", "estimator=rlev", "lr=0.05")
    captured = []
    advantages = trainer.advantages_and_returns
    trainer.advantages_and_returns = lambda step, rollouts, rewards, **inputs: captured.append(
        (rewards, inputs)
    ) or advantages(step, rollouts, rewards, **inputs)
    result = trainer.train_step(1)
    rewards, inputs = captured[0]
    group = torch.arange(PROMPTS).repeat_interleave(GROUP)
    scaled = value_weighted_rewards(rewards, inputs["human_values"])
    expected = get_estimator("rloo")(rewards=scaled, group=group, mask=result.rollouts.response_mask)
    assert torch.allclose(result.advantages, expected)
    assert inputs["human_values"].unique().numel() > 1 and rewards.unique().numel() == 2  # values and rewards both vary
    assert moved(trainer, policy_dir)


# ----------------------------------------------------------------------------------------------------------------
# greedy_rewards (ReMax)
# ----------------------------------------------------------------------------------------------------------------


def test_greedy_rewards_equal_a_separate_greedy_evaluation(policy_dir, tmp_path):
    from canonrl.lab.evaluate import _sample_in_chunks

    trainer = make_trainer(policy_dir, tmp_path, Greedy, "lr=0.05")
    assert trainer.reference is None  # greedy decoding uses the current policy, no reference model
    for step in (1, 2):
        before = frozen_copy(trainer)  # the policy that samples this step
        result = trainer.train_step(step)
        batch = SEEN[Greedy.name][-1]
        problems = step_problems(trainer, step)
        (greedy,) = _sample_in_chunks(before, [p.prompt for p in problems], 256, max_new_tokens=16, greedy=True)
        expected = verify_scores(before, trainer.task, greedy, problems)
        assert torch.equal(batch.greedy_rewards, expected.repeat_interleave(GROUP))
        assert torch.equal(result.inputs["greedy_rewards"], batch.greedy_rewards)
        assert result.metrics["greedy_tokens"] == int(greedy.lengths.sum())
        assert result.metrics["greedy_reward"] == pytest.approx(expected.mean().item())
        assert result.metrics["greedy_seconds"] > 0 and "reference_tokens" not in result.metrics
    assert moved(trainer, policy_dir)  # step 2's greedy responses came from an updated policy


# ----------------------------------------------------------------------------------------------------------------
# reference_rewards (AAPO)
# ----------------------------------------------------------------------------------------------------------------


def test_reference_rewards_come_from_the_initial_weights_after_updates(policy_dir, tmp_path):
    from canonrl.lab.sampling import generate

    trainer = make_trainer(policy_dir, tmp_path, ReferenceRewards, "lr=0.05", "temperature=0.8")
    for step in (1, 2, 3):
        result = trainer.train_step(step)
    assert moved(trainer, policy_dir)
    batch = SEEN[ReferenceRewards.name][-1]
    initial = load_policy(str(policy_dir))
    problems = step_problems(trainer, 3)
    ids, mask = initial.encode_prompts([p.prompt for p in problems])

    def sample(model):
        generator = torch.Generator().manual_seed(_seed(0, "reference", 3))
        return generate(
            model.eval(), ids, mask, max_new_tokens=16, eos_id=initial.eos_id, pad_id=initial.pad_id,
            temperature=0.8, generator=generator, repeats=GROUP,
        )  # fmt: skip

    reference = sample(initial.model)
    repeated = [p for p in problems for _ in range(GROUP)]
    expected = verify_scores(initial, trainer.task, reference, repeated)
    assert torch.equal(batch.reference_rewards, expected)
    assert result.metrics["reference_tokens"] == int(reference.lengths.sum())
    assert result.metrics["reference_reward"] == pytest.approx(expected.mean().item())
    # the trained policy, with the same draws, answers differently: the reference really is the initial policy
    current = sample(copy.deepcopy(trainer.policy.model))
    assert not torch.equal(current.response_ids, reference.response_ids)
    assert batch.reference_rewards.shape == (PROMPTS * GROUP,)


# ----------------------------------------------------------------------------------------------------------------
# ref_logprobs (ACE)
# ----------------------------------------------------------------------------------------------------------------


def row_logprobs(model, rollouts, row: int, temperature: float) -> torch.Tensor:
    """One row's response log-probs from a plain, unpadded forward of prompt + response."""
    prompt = rollouts.prompt_ids[row][rollouts.prompt_mask[row].bool()]
    length = int(rollouts.response_mask[row].sum())
    response = rollouts.response_ids[row, :length]
    with torch.no_grad():
        logits = model(input_ids=torch.cat([prompt, response]).unsqueeze(0)).logits[0].float() / temperature
    log_dist = logits[len(prompt) - 1 : -1].log_softmax(dim=-1)
    return log_dist.gather(-1, response.unsqueeze(-1)).squeeze(-1)


def test_ref_logprobs_equal_an_independent_reference_forward(policy_dir, tmp_path):
    trainer = make_trainer(policy_dir, tmp_path, RefLogprobs, "lr=0.05", "temperature=0.7", "micro_batch_size=5")
    assert trainer.reference is not None
    for step in (1, 2):
        result = trainer.train_step(step)
    assert moved(trainer, policy_dir)
    batch = SEEN[RefLogprobs.name][-1]
    rollouts = result.rollouts
    initial = load_policy(str(policy_dir)).model.eval()
    assert batch.ref_logprobs.shape == rollouts.response_mask.shape
    assert torch.all(batch.ref_logprobs[rollouts.response_mask == 0] == 0)
    for row in range(rollouts.response_ids.shape[0]):
        length = int(rollouts.response_mask[row].sum())
        expected = row_logprobs(initial, rollouts, row, 0.7)
        assert torch.allclose(batch.ref_logprobs[row, :length], expected, atol=1e-5), row
    # the sampler's log-probs (the updated policy) differ from the reference's
    assert (batch.ref_logprobs - rollouts.logprobs).abs().max() > 1e-3
    assert result.metrics["ref_logprobs_seconds"] > 0


def test_kl_penalty_reuses_the_ace_reference_logprobs(policy_dir, tmp_path):
    """With ACE and a KL term, the KL reads the step's ref_logprobs: same loss and weights as its own forwards."""
    results = []
    for reuse in (True, False):
        trainer = make_trainer(policy_dir, tmp_path / str(reuse), RefLogprobs, "kl_coef=0.5", "lr=0.05", "minibatches=2")
        if not reuse:
            update = trainer.update
            trainer.update = lambda step, rollouts, advantages, ref_logprobs=None, loss_mask=None, update=update: (
                update(step, rollouts, advantages)
            )
        metrics = [trainer.train_step(step).metrics for step in (1, 2)]
        results.append((metrics, trainer.policy.model.state_dict()))
    (reused, weights_reused), (own, weights_own) = results
    for a, b in zip(reused, own):
        assert a["kl"] > 0 and a["kl"] == pytest.approx(b["kl"], rel=1e-4, abs=1e-7)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-7)
    for name in weights_own:
        assert torch.allclose(weights_reused[name], weights_own[name], atol=1e-5), name


# ----------------------------------------------------------------------------------------------------------------
# prompt_confidence (ProGRPO)
# ----------------------------------------------------------------------------------------------------------------


def test_prompt_confidence_equals_a_hand_computation(policy_dir, tmp_path):
    trainer = make_trainer(policy_dir, tmp_path, Confidence, "lr=0.05", "temperature=0.6")
    for step in (1, 2):
        before = frozen_copy(trainer)
        result = trainer.train_step(step)
        batch = SEEN[Confidence.name][-1]
        problems = step_problems(trainer, step)
        expected = []
        for problem in problems:
            ids, _ = before.encode_prompts([problem.prompt])  # one prompt: no padding
            with torch.no_grad():
                logits = before.model(input_ids=ids).logits[0].float()  # temperature 1, whatever the sampler's
            token_logprobs = logits[:-1].log_softmax(-1).gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)
            expected.append(token_logprobs.mean().exp())  # BOS (the first token) is not predicted
        expected = torch.stack(expected)
        assert torch.allclose(batch.prompt_confidence, expected.repeat_interleave(GROUP), atol=1e-5)
        per_prompt = batch.prompt_confidence.view(PROMPTS, GROUP)
        assert torch.equal(per_prompt, per_prompt[:, :1].expand(-1, GROUP))  # one value per prompt
        assert ((batch.prompt_confidence > 0) & (batch.prompt_confidence <= 1)).all()
        assert result.metrics["prompt_confidence"] == pytest.approx(expected.mean().item(), abs=1e-6)
    assert trainer.reference is None


def test_prompt_confidence_leaves_the_samples_unchanged_and_handles_one_token_prompts():
    from canonrl.lab.decoding import prompt_confidence_from_logits
    from canonrl.lab.sampling import generate, prompt_confidence

    model, tokenizer = tiny_lab_model()
    model.eval()
    policy = Policy(model, tokenizer, "tiny")
    ids, mask = policy.encode_prompts(["1+2?", "7+5-3+8?", "9?"])
    kwargs = dict(max_new_tokens=12, eos_id=policy.eos_id, pad_id=policy.pad_id, repeats=3)
    plain = generate(model, ids, mask, generator=torch.Generator().manual_seed(3), **kwargs)
    scored = generate(model, ids, mask, generator=torch.Generator().manual_seed(3), prompt_confidence=True, **kwargs)
    assert plain.prompt_confidence is None
    assert torch.equal(plain.response_ids, scored.response_ids) and torch.equal(plain.logprobs, scored.logprobs)
    direct = prompt_confidence(model, ids, mask)
    assert torch.allclose(scored.prompt_confidence, direct.repeat_interleave(3), atol=1e-6)
    assert torch.equal(scored.select(torch.tensor([4, 0])).prompt_confidence, scored.prompt_confidence[[4, 0]])
    # the generic (non-Llama) decoder reads the same numbers off its prefill
    from canonrl.lab import decoding

    generic = decoding.HFDecoder(model, ids, mask, 4, repeats=2, score_prompt=True)
    assert torch.allclose(generic.prompt_confidence, direct, atol=1e-6)
    # a prompt of one real token (here: BOS only) has nothing to average: confidence 1
    one = torch.tensor([[0, 0, 1], [1, 5, 14]])
    one_mask = torch.tensor([[0, 0, 1], [1, 1, 1]])
    confidence = prompt_confidence_from_logits(torch.randn(2, 3, 21), one, one_mask)
    assert confidence[0] == 1.0 and 0 < confidence[1] < 1


# ----------------------------------------------------------------------------------------------------------------
# reward components (GDPO)
# ----------------------------------------------------------------------------------------------------------------


def test_multi_reward_estimators_get_the_reward_components(policy_dir, tmp_path):
    trainer = make_trainer(policy_dir, tmp_path, Multi)
    assert trainer.reward_names == ("correct", "formatted")
    result = trainer.train_step(1)
    (batch,) = SEEN[Multi.name]
    rollouts = result.rollouts
    texts = trainer.policy.decode(rollouts.response_ids, rollouts.response_mask)
    correct = torch.tensor([float(len(t) % 2 == 0) for t in texts])
    formatted = torch.tensor([float(len(t) % 3 == 0) for t in texts])
    assert batch.reward_components.shape == (PROMPTS * GROUP, 2)
    assert torch.equal(batch.reward_components, torch.stack([correct, formatted], dim=1))
    assert torch.equal(batch.rewards, correct + formatted)  # the batch's scalar reward is their sum
    assert torch.equal(result.inputs["rewards"], batch.reward_components)
    # the logged reward is still the score (correctness), and the components are logged as before
    assert result.metrics["reward"] == pytest.approx(correct.mean().item())
    assert result.metrics["reward/formatted"] == pytest.approx(formatted.mean().item())
    assert trainer.reference is None


def test_single_reward_estimators_get_the_score_alone(policy_dir, tmp_path):
    trainer = make_trainer(policy_dir, tmp_path, Plain)
    result = trainer.train_step(1)
    (batch,) = SEEN[Plain.name]
    texts = trainer.policy.decode(result.rollouts.response_ids, result.rollouts.response_mask)
    assert torch.equal(batch.rewards, torch.tensor([float(len(t) % 2 == 0) for t in texts]))
    assert batch.reward_components is None


def test_lab_task_reward_components_are_correct_and_well_formed():
    task = LabTask()
    problem = task.problems("train", 1, seed=0)[0]
    assert reward_components(task) == ("correct", "formatted")
    right = task.verify(f"1+1=2;ans={problem.answer}", problem)
    wrong = task.verify(f"ans={int(problem.answer) + 1}", problem)
    unparsable = task.verify(f"ans={problem.answer};1+1=2", problem)  # does not end with the answer line
    assert [right.components[n] for n in reward_components(task)] == [1.0, 1.0]
    assert [wrong.components[n] for n in reward_components(task)] == [0.0, 1.0]
    assert [unparsable.components[n] for n in reward_components(task)] == [0.0, 0.0]


def test_reward_components_of_every_task_family():
    from canonrl.lab.tasks.boxed import BoxedMathTask
    from canonrl.lab.tasks.reasoning_gym import ReasoningGymTask

    for cls in (ReasoningGymTask, BoxedMathTask):
        assert cls.reward_components == ("correct", "formatted")
        assert set(cls.reward_components) <= set(cls.components)

    class Undeclared:
        components = ("correct", "raw")

    class Bare:
        components = ()

    class Wrong:
        name = "wrong"
        components = ("correct",)
        reward_components = ("correct", "style")

    assert reward_components(Undeclared()) == ("correct", "raw")
    assert reward_components(Bare()) == ()
    with pytest.raises(ValueError, match="style"):
        reward_components(Wrong())


# ----------------------------------------------------------------------------------------------------------------
# every input at once: metrics, and bit-exact resume
# ----------------------------------------------------------------------------------------------------------------


def test_resume_is_bit_exact_with_every_extra_input(policy_dir, tmp_path):
    overrides = ("steps=4", "checkpoint_every=2", "eval_every=2", "minibatches=2", "kl_coef=0.1", "lr=0.01")
    config = load_config(None, [f"policy={policy_dir}", *TINY, f"estimator={Everything.name}", *overrides])
    Trainer(config, tmp_path / "a").train()

    train_until_interrupted(config, tmp_path / "b", at_step=3)
    resumed = Trainer(config, tmp_path / "b", resume=True)
    assert resumed.step == 2 and resumed.reference is not None
    resumed.train()

    def records(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK_KEYS} for line in lines]

    a, b = records("a"), records("b")
    assert a == b and len(a) == 7
    raw = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    trains = [r for r in raw if r["kind"] == "train"]
    for r in trains:
        assert set(EXTRA_METRICS) <= set(r), r
        assert r["greedy_tokens"] > 0 and r["reference_tokens"] > 0 and 0 < r["prompt_confidence"] <= 1
    assert any(r["advantage_abs"] > 0 for r in trains)
    for name in ("greedy_seconds", "reference_seconds", "ref_logprobs_seconds"):
        assert name in WALL_CLOCK_KEYS
    from safetensors.torch import load_file

    weights_a = load_file(next((tmp_path / "a" / "policy").glob("*.safetensors")))
    weights_b = load_file(next((tmp_path / "b" / "policy").glob("*.safetensors")))
    initial = load_file(next(policy_dir.glob("*.safetensors")))
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert any(not torch.equal(weights_a[k], initial[k]) for k in initial)
