"""The lab task: disjoint deterministic splits, the exact verifier, warm-start traces and the lab tokenizer."""

from __future__ import annotations

import random
import re
import statistics

import pytest

from canonrl.lab.tasks.base import Problem, Reward, Task
from canonrl.lab.tasks.lab import MAX_TOTAL, VOCAB, LabTask, TraceStyle, build_tokenizer, chain_value, trace

SEEDS = [0, 1, 2, 12345]
_STEP = re.compile(r"(\d+)([+-])(\d)=(\d+)")


@pytest.fixture(scope="module")
def task() -> LabTask:
    return LabTask()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _problem(prompt: str) -> Problem:
    """A Problem as LabTask builds it, from a prompt like '7+5-3+8?'."""
    body = prompt.rstrip("?")
    operands = [int(c) for c in body[::2]]
    ops = list(body[1::2])
    return Problem(prompt, str(chain_value(operands, ops)), {"operands": operands, "ops": ops})


# ----------------------------------------------------------------------------------------------------------------
# problems and splits
# ----------------------------------------------------------------------------------------------------------------


def test_lab_task_satisfies_the_task_protocol(task):
    assert isinstance(task, Task)
    assert task.name == "lab" and task.components == ("correct", "formatted") and task.cheap is True


@pytest.mark.parametrize("seed", SEEDS)
def test_train_and_heldout_never_share_a_prompt(task, seed):
    train = {p.prompt for p in task.problems("train", 3000, seed=seed)}
    heldout = {p.prompt for p in task.problems("heldout", 1000, seed=seed)}
    assert train and heldout
    assert not train & heldout
    assert all(task.in_split(p, "train") and not task.in_split(p, "heldout") for p in train)
    assert all(task.in_split(p, "heldout") and not task.in_split(p, "train") for p in heldout)


def test_splits_stay_disjoint_across_seeds(task):
    train = {p.prompt for seed in SEEDS for p in task.problems("train", 2000, seed=seed)}
    heldout = {p.prompt for seed in SEEDS for p in task.problems("heldout", 500, seed=seed + 1000)}
    assert not train & heldout


def test_heldout_bucket_is_about_a_tenth_of_prompts(task):
    prompts = [f"{a}{o1}{b}{o2}{c}?" for a in range(1, 10) for b in range(1, 10) for c in range(1, 10) for o1 in "+-" for o2 in "+-"]
    share = sum(task.in_split(p, "heldout") for p in prompts) / len(prompts)
    assert 0.07 < share < 0.13
    assert LabTask(heldout_buckets=2).in_split("1+2+3?", "heldout") != LabTask(heldout_buckets=2).in_split("1+2+3?", "train")


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_problems_are_deterministic_per_seed(task, split):
    a = task.problems(split, 200, seed=3)
    b = LabTask().problems(split, 200, seed=3)
    assert [(p.prompt, p.answer, p.meta) for p in a] == [(p.prompt, p.answer, p.meta) for p in b]
    c = task.problems(split, 200, seed=4)
    assert [p.prompt for p in a] != [p.prompt for p in c]
    # a prefix of a longer draw: count does not change which problems come first
    assert [p.prompt for p in task.problems(split, 50, seed=3)] == [p.prompt for p in a[:50]]


def test_problems_are_well_formed(task):
    for p in task.problems("train", 1000, seed=0):
        operands, ops = p.meta["operands"], p.meta["ops"]
        assert 3 <= len(operands) <= 5 and len(ops) == len(operands) - 1
        assert all(1 <= x <= 9 for x in operands) and set(ops) <= {"+", "-"}
        assert p.prompt == str(operands[0]) + "".join(o + str(x) for o, x in zip(ops, operands[1:])) + "?"
        assert p.answer == str(chain_value(operands, ops))
        total = operands[0]
        for op, x in zip(ops, operands[1:]):
            total = total + x if op == "+" else total - x
            assert 0 <= total <= MAX_TOTAL  # running totals stay in range


def test_operand_count_options(task):
    short = LabTask(min_operands=2, max_operands=2)
    assert all(len(p.meta["operands"]) == 2 for p in short.problems("train", 100, seed=0))
    for bad in ({"min_operands": 1}, {"min_operands": 4, "max_operands": 3}, {"max_operands": 9}, {"heldout_buckets": 1}):
        with pytest.raises(ValueError):
            LabTask(**bad)
    with pytest.raises(ValueError, match="split"):
        task.problems("test", 1, seed=0)


# ----------------------------------------------------------------------------------------------------------------
# chain_value and verify
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "operands,ops,value",
    [
        ([7, 5, 3, 8], ["+", "-", "+"], 17),
        ([9], [], 9),
        ([1, 2], ["+"], 3),
        ([3, 9], ["-"], -6),
        ([9, 9, 9, 9, 9], ["+", "+", "+", "+"], 45),
        ([5, 5, 5, 1], ["-", "+", "-"], 4),
    ],
)
def test_chain_value_by_hand(operands, ops, value):
    assert chain_value(operands, ops) == value


def test_verify_exact_answer_scores_one(task):
    problem = _problem("7+5-3+8?")
    assert problem.answer == "17"
    assert task.verify("7+5=12;12-3=9;9+8=17;ans=17", problem) == Reward(1.0, {"correct": 1.0, "formatted": 1.0})
    assert task.verify("ans=17", problem).score == 1.0  # only the answer counts
    assert task.verify("  7+5=12;ans=17\n", problem).score == 1.0  # surrounding whitespace is ignored
    # the last pass decides: a wrong first pass, then a rethink to the right answer
    assert task.verify("7+5=12;12-3=8;8+8=16;wait;7+5=12;12-3=9;9+8=17;ans=17", problem).score == 1.0


@pytest.mark.parametrize("response", ["7+5=12;12-3=9;9+8=17;ans=16", "ans=170", "ans=1", "ans=017"])
def test_verify_wrong_answer_scores_zero_but_formatted(task, response):
    assert task.verify(response, _problem("7+5-3+8?")) == Reward(0.0, {"correct": 0.0, "formatted": 1.0})


@pytest.mark.parametrize("response", ["", "7+5=12;12-3=9;9+8=17", "17", "ans=17;", "ans=", "ans=-3", "ans=17 extra", "ans17"])
def test_verify_missing_answer_is_unformatted(task, response):
    assert task.verify(response, _problem("7+5-3+8?")) == Reward(0.0, {"correct": 0.0, "formatted": 0.0})


def test_verify_every_generated_problem_accepts_its_answer(task):
    for p in task.problems("heldout", 300, seed=0):
        assert task.verify(f"ans={p.answer}", p).score == 1.0
        assert task.verify(f"ans={int(p.answer) + 1}", p).score == 0.0


# ----------------------------------------------------------------------------------------------------------------
# warm-start traces
# ----------------------------------------------------------------------------------------------------------------


def _passes(text: str) -> tuple[list[list[tuple[int, str, int, int]]], int]:
    """Parse a trace into passes of (left, op, right, result) steps and its final answer."""
    body, answer = text.rsplit("ans=", 1)
    passes = []
    for chunk in body.split("wait;"):
        steps = [s for s in chunk.split(";") if s]
        parsed = []
        for s in steps:
            m = _STEP.fullmatch(s)
            assert m, f"malformed step {s!r} in {text!r}"
            parsed.append((int(m[1]), m[2], int(m[3]), int(m[4])))
        passes.append(parsed)
    return passes, int(answer)


def _exact(left: int, op: str, right: int) -> int:
    return left + right if op == "+" else left - right


def _check_trace(task: LabTask, problem: Problem, text: str) -> tuple[bool, bool, bool]:
    """Structure of one trace; returns (slipped in the last pass, rethought, verified correct)."""
    operands, ops = problem.meta["operands"], problem.meta["ops"]
    passes, answer = _passes(text)
    assert 1 <= len(passes) <= 2
    for steps in passes:
        # each pass works the whole chain, left to right, continuing from its own running total
        assert [(op, right) for _, op, right, _ in steps] == list(zip(ops, operands[1:]))
        assert steps[0][0] == operands[0]
        for (_, _, _, result), (left, _, _, _) in zip(steps, steps[1:]):
            assert left == result
        for left, op, right, result in steps:
            # a slip is a dropped carry/borrow (+-10) or an off-by-one; results stay in 0..99
            assert result - _exact(left, op, right) in (0, -1, 1, -10, 10) or result in (0, 99)
    last = passes[-1]
    assert answer == last[-1][3]  # the answer is where the last pass ended
    slipped = any(result != _exact(left, op, right) for left, op, right, result in last)
    correct = task.verify(text, problem).score == 1.0
    assert correct == (answer == chain_value(operands, ops))
    if not slipped:
        assert correct  # a clean last pass is always right
    return slipped, len(passes) == 2, correct


def test_trace_without_slips_or_rethinking_is_correct(task):
    clean = TraceStyle(slip_crossing=0.0, slip_plain=0.0, rethink_after_slip=0.0, rethink_clean=0.0)
    rng = random.Random(0)
    for p in task.problems("train", 300, seed=0):
        text = trace(p, rng, clean)
        assert "wait" not in text
        steps = ";".join(
            f"{left}{op}{right}={_exact(left, op, right)}"
            for left, op, right in _chain_steps(p.meta["operands"], p.meta["ops"])
        )
        assert text == f"{steps};ans={p.answer}"
        assert task.verify(text, p).score == 1.0


def _chain_steps(operands, ops):
    total = operands[0]
    for op, x in zip(ops, operands[1:]):
        yield total, op, x
        total = _exact(total, op, x)


def test_always_rethinking_clean_traces_are_correct_and_doubled(task):
    style = TraceStyle(slip_crossing=0.0, slip_plain=0.0, rethink_after_slip=1.0, rethink_clean=1.0)
    rng = random.Random(1)
    for p in task.problems("train", 100, seed=1):
        text = trace(p, rng, style)
        first, second = text.rsplit(";ans=", 1)[0].split(";wait;")
        assert first == second
        assert task.verify(text, p).score == 1.0


def test_always_slipping_first_pass_is_visible_in_the_trace(task):
    style = TraceStyle(slip_crossing=1.0, slip_plain=1.0, rethink_after_slip=0.0, rethink_clean=0.0)
    rng = random.Random(2)
    for p in task.problems("train", 200, seed=2):
        passes, _ = _passes(trace(p, rng, style))
        left, op, right, result = passes[0][0]
        assert result != _exact(left, op, right) or result in (0, 99)  # the first step always slips (unless clamped)


@pytest.mark.parametrize("seed", [0, 1])
def test_traces_are_consistent_with_their_slips(task, seed):
    rng = random.Random(seed)
    problems = task.problems("train", 2000, seed=seed)
    results = [_check_trace(task, p, trace(p, rng)) for p in problems]
    slipped = [s for s, _, _ in results]
    rethought = [r for _, r, _ in results]
    assert any(slipped) and not all(slipped)
    assert any(rethought) and not all(rethought)


def test_traces_are_deterministic_for_an_rng_seed(task):
    problems = task.problems("train", 100, seed=0)
    a = [trace(p, random.Random(5)) for p in problems]
    b = [trace(p, random.Random(5)) for p in problems]
    assert a == b


def test_trace_accuracy_and_length_spread(task, tokenizer):
    """The traces (the warm-start policy's targets) mix rewards within groups and vary in length.

    The issue asks for a policy whose responses have length CV >= 0.2; the traces it is trained on are the proxy.
    """
    rng = random.Random(0)
    problems = task.problems("train", 2000, seed=7)
    texts = [trace(p, rng) for p in problems]
    accuracy = sum(task.verify(t, p).score for t, p in zip(texts, problems)) / len(problems)
    assert 0.3 <= accuracy <= 0.9
    lengths = [len(tokenizer(t, add_special_tokens=False).input_ids) + 1 for t in texts]  # + EOS
    cv = statistics.pstdev(lengths) / statistics.mean(lengths)
    assert cv >= 0.2


def test_rethinking_happens_more_often_after_a_slip(task):
    rng = random.Random(3)
    counts = {True: [0, 0], False: [0, 0]}  # first pass slipped -> [rethought, total]
    for p in task.problems("train", 3000, seed=3):
        passes, _ = _passes(trace(p, rng))
        first_slipped = any(result != _exact(left, op, right) for left, op, right, result in passes[0])
        counts[first_slipped][0] += len(passes) == 2
        counts[first_slipped][1] += 1
    after_slip = counts[True][0] / counts[True][1]
    after_clean = counts[False][0] / counts[False][1]
    assert after_slip > after_clean
    assert after_slip == pytest.approx(0.5, abs=0.06) and after_clean == pytest.approx(0.2, abs=0.05)


# ----------------------------------------------------------------------------------------------------------------
# the lab tokenizer
# ----------------------------------------------------------------------------------------------------------------


def test_tokenizer_vocab_and_special_tokens(tokenizer):
    assert len(tokenizer) == len(VOCAB)
    assert tokenizer.convert_ids_to_tokens(list(range(len(VOCAB)))) == list(VOCAB)
    assert tokenizer.pad_token == "<pad>" and tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>"
    assert tokenizer.padding_side == "left"


@pytest.mark.parametrize("word", ["wait", "ans"])
def test_wait_and_ans_are_single_tokens(tokenizer, word):
    ids = tokenizer(word, add_special_tokens=False).input_ids
    assert ids == [VOCAB.index(word)]
    assert tokenizer(f"9+8=17;{word};", add_special_tokens=False).input_ids.count(VOCAB.index(word)) == 1


def test_tokenizer_is_one_token_per_character_otherwise(tokenizer):
    text = "7+5=12;12-3=9;"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == list(text)


def test_tokenizer_prepends_bos(tokenizer):
    ids = tokenizer("7+5?").input_ids
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 5


def test_tokenizer_round_trips_traces(task, tokenizer):
    rng = random.Random(0)
    for p in task.problems("train", 300, seed=0):
        text = trace(p, rng)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
        assert tokenizer.decode(tokenizer(p.prompt).input_ids, skip_special_tokens=True) == p.prompt
        assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == text


def test_tokenizer_saves_and_loads(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = "7+5=12;wait;7+5=12;ans=12"
    assert loaded(text).input_ids == tokenizer(text).input_ids
    assert loaded.padding_side == "left" and loaded.eos_token_id == tokenizer.eos_token_id
