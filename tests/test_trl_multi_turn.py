"""Step estimators in a real TRL GRPOTrainer run with a tool (tiny Llama, CPU, offline).

TRL 1.16 runs tools only with a chat template that renders tool calls and a response parser. The lab tokenizer has
neither, so the test gives it the smallest ones that work: a template over the lab vocabulary, and a parser that reads
the tokens ``ans`` and ``9`` as calls of the tool ``ans`` (a random policy emits them often, so completions have one
to three model turns). Tools on transformers < 5.13 also need the ``jmespath`` package.
"""

import warnings

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("jmespath")

import datasets  # noqa: E402

import canonrl  # noqa: E402
from canonrl.integrations.trl import CanonGRPOConfig, GRPOTrainer  # noqa: E402
from conftest import tiny_lab_model  # noqa: E402
from trl_recording import RecordingTrainer, cpu_config  # noqa: E402

NUM_GENERATIONS = 4
PROMPTS = ["3+4-2?", "7+5-3+8?"]

# user text, then per assistant message its text, its tool calls and </s>, per tool message ";result;", and "=" to
# open the next assistant turn: prefix-preserving, and it shows the tool name, arguments and result (TRL checks both)
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role == 'user' %}{{ m.content }}"
    "{% elif m.role == 'assistant' %}{{ m.content }}{% for c in m.tool_calls or [] %}{{ c.function.name }}"
    "{% for k, v in c.function.arguments.items() %}{{ k }}={{ v }}{% endfor %}{% endfor %}</s>"
    "{% elif m.role == 'tool' %};{{ m.content }};{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}={% endif %}"
)
# transformers' legacy response schema: every "ans" or "9" in a turn is one call of the tool `ans` with no arguments
RESPONSE_SCHEMA = {
    "x-regex": r"^(?P<content>(?:(?!ans|9)[\s\S])*)(?P<tool_calls>(?:ans|9)[\s\S]*)?$",
    "type": "object",
    "properties": {
        "role": {"const": "assistant"},
        "content": {"type": "string"},
        "tool_calls": {
            "type": "array",
            "x-regex-iterator": r"(ans|9)",
            "items": {"const": {"type": "function", "function": {"name": "ans", "arguments": {}}}},
        },
    },
}


def ans() -> str:
    """Look up the answer.

    Returns:
        The answer.
    """
    return "42"


def reward_messages(completions, **kwargs):
    """Mixed rewards: the number of messages (assistant turns and tool results), mod 3."""
    return [float(len(messages) % 3) for messages in completions]


def tool_model():
    model, tokenizer = tiny_lab_model()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.response_schema = RESPONSE_SCHEMA
    return model, tokenizer


def _args(tmp_path, estimator, params=None, **overrides):
    settings = dict(
        per_device_train_batch_size=8,
        num_generations=NUM_GENERATIONS,
        max_completion_length=24,
        max_tool_calling_iterations=2,
        # raises the end-of-sequence probability after 4 tokens, so that turns are short and tool results fit
        generation_kwargs={"exponential_decay_length_penalty": (4, 1.5)},
    )
    return cpu_config(tmp_path, estimator, params, **{**settings, **overrides})


class TurnRewardTrainer(RecordingTrainer):
    """The subclass hook: a per-turn reward, 1 for a model turn that called the tool, else 0."""

    step_inputs = ("step_rewards",)

    def canon_step_inputs(self, inputs, prompts, completions):
        self.hook_calls = getattr(self, "hook_calls", 0) + 1
        turns = [[m for m in messages if m["role"] == "assistant"] for messages in completions]
        return {"step_rewards": [[float(bool(m.get("tool_calls"))) for m in row] for row in turns]}


def _train(tmp_path, estimator, trainer_class=RecordingTrainer, **overrides):
    torch.set_num_threads(1)
    model, tokenizer = tool_model()
    dataset = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_class(
            model=model,
            reward_funcs=[reward_messages],
            args=_args(tmp_path, estimator, **overrides),
            train_dataset=dataset,
            processing_class=tokenizer,
            tools=[ans],
        )
        trainer.train()
    return trainer


def _runs(tool_mask, completion_mask):
    """Each row's turns, independently of canonrl: a new turn starts at a model token after a non-model token."""
    turn_ids = torch.full(tool_mask.shape, -1, dtype=torch.long)
    for i in range(tool_mask.shape[0]):
        turn, before = -1, False
        for t in range(tool_mask.shape[1]):
            model_token = bool(tool_mask[i, t]) and bool(completion_mask[i, t])
            if model_token and not before:
                turn += 1
            if model_token:
                turn_ids[i, t] = turn
            before = model_token
    return turn_ids


def _row_key(prompt_ids, completion_ids):
    return tuple(prompt_ids.tolist()) + (-1,) + tuple(completion_ids.tolist())


def _check_run(trainer, estimator):
    """The advantages TRL trained on are the estimator's, called directly on the turns TRL's tool mask gives."""
    assert trainer.state.global_step == 2 and len(trainer.generations) == 2 and len(trainer.loss_inputs) == 2
    turn_counts = []
    for step, (gen, loss) in enumerate(zip(trainer.generations, trainer.loss_inputs), start=1):
        fields, out = gen["fields"], gen["output"]
        assert "tool_mask" in out  # TRL returns its tool mask with the completions
        turn_ids = _runs(out["tool_mask"], out["completion_mask"])
        assert torch.equal(fields["turn_ids"], turn_ids)
        assert torch.equal(fields["mask"], out["completion_mask"] * out["tool_mask"])
        turn_counts += (turn_ids.amax(1) + 1).tolist()
        # the outcome reward sits on each completion's last model token
        last = torch.where(turn_ids >= 0, torch.arange(turn_ids.shape[1]), -1).amax(1)
        expected_token_rewards = torch.zeros(turn_ids.shape)
        expected_token_rewards[torch.arange(len(last)), last] = fields["rewards"]
        torch.testing.assert_close(fields["token_rewards"], expected_token_rewards)

        batch = {k: v for k, v in fields.items() if k != "step"}
        expected = canonrl.get_estimator(estimator)(step=step, **batch)
        assert out["advantages"].shape == out["completion_ids"].shape
        assert (out["advantages"] - expected).abs().max() <= 1e-6
        assert (out["advantages"][out["tool_mask"] == 0] == 0).all()  # tool results get no advantage
        # one advantage per turn: constant over each turn's tokens
        for i, j in (turn_ids >= 0).nonzero().tolist():
            first = (turn_ids[i] == turn_ids[i, j]).nonzero()[0, 0]
            assert out["advantages"][i, j] == out["advantages"][i, first]

        # the loss received those advantages (TRL shuffles rows between generation and loss: match them)
        by_key = {}
        for j in range(expected.shape[0]):
            by_key.setdefault(_row_key(out["prompt_ids"][j], out["completion_ids"][j]), []).append(expected[j])
        for i in range(loss["advantages"].shape[0]):
            candidates = by_key[_row_key(loss["prompt_ids"][i], loss["completion_ids"][i])]
            assert any((loss["advantages"][i] - c).abs().max() <= 1e-6 for c in candidates)
    # the run had single- and multi-turn completions, and a training signal
    assert {1, 2} <= set(turn_counts)
    assert any(g["output"]["advantages"].abs().max() > 0 for g in trainer.generations)


def test_matchtir_trains_on_tool_turns(tmp_path):
    trainer = _train(tmp_path, "matchtir")
    _check_run(trainer, "matchtir")
    assert any((g["fields"]["turn_ids"].amax(1) >= 2).any() for g in trainer.generations)  # three turns, too
    # the per-turn part is live: advantages differ between the turns of some completion
    assert any(
        len(set(adv[ids >= 0].tolist())) > 1
        for g in trainer.generations
        for adv, ids in zip(g["output"]["advantages"], g["fields"]["turn_ids"])
    )


def test_turn_rewards_from_the_subclass_hook(tmp_path):
    trainer = _train(tmp_path, "trloo", TurnRewardTrainer)
    assert trainer.hook_calls == 2
    _check_run(trainer, "trloo")
    for g in trainer.generations:
        step_rewards, turn_ids = g["fields"]["step_rewards"], g["fields"]["turn_ids"]
        assert [len(r) for r in step_rewards] == (turn_ids.amax(1) + 1).tolist()
    assert any(r and r[0] == 1.0 for g in trainer.generations for r in g["fields"]["step_rewards"])


def test_masked_out_completions_have_no_turns(tmp_path):
    """With mask_truncated_completions TRL zeroes a truncated completion's masks: it has no turns, and the hook's
    values for it are dropped rather than misattributed."""
    trainer = _train(tmp_path, "trloo", TurnRewardTrainer, max_steps=1, mask_truncated_completions=True)
    g = trainer.generations[0]
    empty = g["output"]["completion_mask"].sum(1) == 0
    assert empty.any() and (~empty).any()
    assert (g["fields"]["turn_ids"][empty] == -1).all()
    assert all((r == []) == bool(e) for r, e in zip(g["fields"]["step_rewards"], empty.tolist()))
    expected = canonrl.get_estimator("trloo")(step=1, **{k: v for k, v in g["fields"].items() if k != "step"})
    assert (g["output"]["advantages"] - expected).abs().max() <= 1e-6


@pytest.mark.parametrize(
    "estimator,match",
    [
        ("spo_chain", "a step estimator defined on row-per-response/row-per-step rows; GRPOTrainer gives one row"),
        ("gae", "needs values .*; use the estimator in the canonrl library or lab, or with verl"),
        ("rose", "needs node .*; use the estimator in the canonrl library or lab, or with verl"),
    ],
)
def test_config_refuses_what_no_trainer_can_feed(tmp_path, estimator, match):
    with pytest.raises(ValueError, match=match) as info:
        CanonGRPOConfig(output_dir=str(tmp_path), advantage_estimator=estimator, use_cpu=True)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "estimator,field",
    [("trloo", "step_rewards"), ("gigpo", "step_rewards"), ("mars", "agent"), ("fspo", "step_labels")],
)
def test_trainer_refuses_turn_inputs_without_the_hook(tmp_path, estimator, field):
    args = CanonGRPOConfig(output_dir=str(tmp_path), advantage_estimator=estimator, use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match=f"needs {field} .*TRL 1.16 records no per-turn inputs: declare it in a "
                                         "GRPOTrainer subclass's step_inputs") as info:
        GRPOTrainer(model=None, reward_funcs=[reward_messages], args=args)  # refused before TRL loads a model
    assert "\n" not in str(info.value)


def test_hook_declarations_are_checked(tmp_path):
    args = CanonGRPOConfig(output_dir=str(tmp_path), advantage_estimator="gigpo", use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="needs anchor"):  # step_rewards alone is not enough for gigpo
        TurnRewardTrainer(model=None, reward_funcs=[reward_messages], args=args)

    class Bad(GRPOTrainer):
        step_inputs = ("values",)

    with pytest.raises(ValueError, match="Bad.step_inputs: 'values' is not one of"):
        Bad(model=None, reward_funcs=[reward_messages], args=args)


def test_hook_must_return_one_list_per_completion(tmp_path):
    class Short(TurnRewardTrainer):
        def canon_step_inputs(self, inputs, prompts, completions):
            return {"step_rewards": [[1.0]]}

    with pytest.raises(ValueError, match="Short.canon_step_inputs must return 'step_rewards' as one list per "
                                         "completion \\(8 here\\), got 1 lists"):
        _train(tmp_path, "trloo", Short)
