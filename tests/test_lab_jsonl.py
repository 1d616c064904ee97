"""The jsonl task: a user's dataset file, disjoint deterministic splits, exact and math-verify verification, and
one-line errors naming the line."""

from __future__ import annotations

import json
import pickle

import pytest

from canonrl.lab.tasks import get_task
from canonrl.lab.tasks.jsonl import JsonlTask
from canonrl.lab.verification import verify_all


def _write(path, records) -> str:
    lines = [record if isinstance(record, str) else json.dumps(record) for record in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture
def dataset(tmp_path) -> str:
    records = [{"prompt": f"What is {i} plus {i + 1}?", "answer": str(2 * i + 1)} for i in range(200)]
    records[5]["answer"] = 11  # a number is read as its text
    return _write(tmp_path / "sums.jsonl", records)


def test_registry_builds_it_with_options(dataset):
    task = get_task(f"jsonl:{dataset}", verifier="exact")
    assert isinstance(task, JsonlTask) and task.name == f"jsonl:{dataset}"
    assert task.components == task.reward_components == ("correct", "formatted")
    assert task.cheap and task.verifier == "exact"


def test_splits_are_disjoint_deterministic_and_cover_the_file(dataset):
    task = JsonlTask(dataset, verifier="exact")
    train = [p for seed in range(3) for p in task.problems("train", 100, seed=seed)]
    heldout = [p for seed in range(3) for p in task.problems("heldout", 50, seed=seed)]
    assert not {p.prompt for p in train} & {p.prompt for p in heldout}
    assert task.split_size("train") + task.split_size("heldout") == 200
    assert 15 <= task.split_size("heldout") <= 70  # about heldout_fraction = 0.2 of 200, by hash
    # a pure function of (split, count, seed); a shorter draw is a prefix of a longer one; seeds differ
    a = task.problems("train", 30, seed=4)
    assert a == JsonlTask(dataset, verifier="exact").problems("train", 30, seed=4)
    assert a[:7] == task.problems("train", 7, seed=4)
    assert a != task.problems("train", 30, seed=5)
    # more problems than the split holds: every line once per pass, then reshuffled
    size = task.split_size("heldout")
    many = task.problems("heldout", 2 * size + 3, seed=0)
    assert len({p.meta["line"] for p in many[:size]}) == size and len(many) == 2 * size + 3
    assert all(p.meta["split"] == "heldout" and task.in_split(p.prompt.split("\n\n")[0], "heldout") for p in many)
    assert task.problems("train", 0, seed=0) == []
    with pytest.raises(ValueError, match="split must be one of"):
        task.problems("test", 1, seed=0)


def test_the_split_field_assigns_lines_and_a_shared_prompt_is_refused(tmp_path):
    records = [{"prompt": f"q{i}", "answer": "1", "split": "test" if i < 3 else "train"} for i in range(10)]
    task = JsonlTask(_write(tmp_path / "s.jsonl", records), verifier="exact", answer_format="text")
    assert sorted(p.prompt for p in task.problems("heldout", 3, seed=0)) == ["q0", "q1", "q2"]
    assert task.split_size("train") == 7
    records.append({"prompt": "  q1 ", "answer": "1", "split": "train"})  # q1 again, whitespace aside
    with pytest.raises(ValueError, match=r"line 11: the same prompt is in the heldout split on line 2"):
        JsonlTask(_write(tmp_path / "s.jsonl", records))
    only_train = _write(tmp_path / "t.jsonl", [{"prompt": "q", "answer": "1", "split": "train"}])
    with pytest.raises(ValueError, match="has no heldout problems"):
        JsonlTask(only_train).problems("heldout", 1, seed=0)


def test_exact_verification(dataset):
    task = JsonlTask(dataset, verifier="exact")
    p = task.problems("train", 1, seed=0)[0]
    assert "\\boxed{}" in p.prompt
    assert task.verify(f"so \\boxed{{ {p.answer} }}", p).components == {"correct": 1.0, "formatted": 1.0}
    assert task.verify(f"\\boxed{{{p.answer}.0}}", p).score == 0.0  # equal as numbers, but not as text
    assert task.verify(p.answer, p).components == {"correct": 0.0, "formatted": 0.0}  # not boxed
    assert task.verify("\\boxed{}", p).components == {"correct": 0.0, "formatted": 1.0}
    tags = JsonlTask(dataset, verifier="exact", answer_format="answer_tag", instruction="")
    q = tags.problems("train", 1, seed=0)[0]
    assert q.prompt.endswith("?") and tags.verify(f"<answer>\n{q.answer}\n</answer>", q).score == 1.0
    text = JsonlTask(dataset, verifier="exact", answer_format="text")
    r = text.problems("train", 1, seed=0)[0]
    assert text.verify(f"  {r.answer}\n", r).score == 1.0 and text.verify("  ", r).components["formatted"] == 0.0
    # cheap: verified inline, never by worker processes
    result = verify_all(task, [f"\\boxed{{{p.answer}}}", "\\boxed{-1}"], [p, p])
    assert result.scores == [1.0, 0.0]


def test_math_verify_verification(tmp_path):
    pytest.importorskip("math_verify")
    path = _write(
        tmp_path / "m.jsonl",
        [
            {"question": "Half of one?", "solution": "\\frac{1}{2}"},
            {"question": "Capital of France?", "solution": "Paris"},
            {"question": "Six sevens?", "solution": 42},
        ],
    )
    task = JsonlTask(path, prompt_field="question", answer_field="solution", split_field=None, heldout_fraction=0.01)
    assert task.verifier == "math-verify" and not task.cheap  # "auto", with math-verify installed
    problems = {p.meta["line"]: p for p in task.problems("train", 3, seed=0)}
    half, paris, answer = problems[1], problems[2], problems[3]
    assert task.verify("\\boxed{0.5}", half).score == 1.0
    assert task.verify("\\boxed{1/2}", half).score == 1.0
    assert task.verify("\\boxed{0.25}", half).score == 0.0
    assert task.verify("\\boxed{Paris}", paris).score == 1.0  # not math: the exact comparison decides
    assert task.verify("\\boxed{London}", paris).score == 0.0
    assert task.verify("\\boxed{42.0}", answer).score == 1.0
    assert pickle.loads(pickle.dumps(task)).verify("\\boxed{42}", answer).score == 1.0  # as a worker gets it
    assert b"Capital" not in pickle.dumps(task)  # the dataset does not travel with every verification call
    exact = JsonlTask(path, prompt_field="question", answer_field="solution", verifier="exact")
    assert exact.cheap and exact.verify("\\boxed{0.5}", half).score == 0.0


def test_math_verify_in_workers_is_bounded(tmp_path):
    pytest.importorskip("math_verify")
    path = _write(tmp_path / "m.jsonl", [{"prompt": f"p{i}", "answer": str(i)} for i in range(20)])
    task = JsonlTask(path, verifier="math-verify")
    problems = task.problems("train", 3, seed=0)
    responses = [f"\\boxed{{{problems[0].answer}}}", r"\boxed{9^{9^{9^{9}}}}", "no box"]
    result = verify_all(task, responses, problems, timeout=10.0)
    assert result.scores == [1.0, 0.0, 0.0] and result.components["formatted"] == [1.0, 1.0, 0.0]


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "a", "answer": "1"}', "", "{not json"], r"line 3: invalid JSON"),
        (['{"prompt": "a", "answer": "1"}', "[1, 2]"], r"line 2: expected a JSON object, got an array"),
        (
            ['{"prompt": "a", "answer": "1"}', '{"question": "b", "answer": "2"}'],
            r"line 2: missing field 'prompt' \(fields: 'question', 'answer'\)",
        ),
        (['{"prompt": "a"}'], r"line 1: missing field 'answer'"),
        (['{"prompt": "", "answer": "1"}'], r"line 1: field 'prompt' must be a non-empty string, got an empty"),
        (['{"prompt": "a", "answer": [1]}'], r"line 1: field 'answer' must be a non-empty string or a number, got an"),
        (['{"prompt": "a", "answer": true}'], r"line 1: field 'answer' .* got a boolean"),
        (
            ['{"prompt": "a", "answer": "1", "split": "dev"}'],
            r"line 1: field 'split' must be one of 'train', .*, got 'dev'",
        ),
    ],
)
def test_bad_lines_are_one_line_errors_naming_the_line(tmp_path, lines, message):
    path = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError, match=message) as error:
        JsonlTask(path)
    assert "\n" not in str(error.value) and str(error.value).startswith(path)


def test_bad_files_and_options(tmp_path):
    with pytest.raises(ValueError, match="path: no such file") as error:
        get_task(f"jsonl:{tmp_path / 'missing.jsonl'}")
    assert "\n" not in str(error.value)
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no problems"):
        JsonlTask(tmp_path / "empty.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "a", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(ValueError, match="line 2: not UTF-8"):
        JsonlTask(tmp_path / "latin1.jsonl")
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"prompt": "a", "answer": "1"}\n')
    bom = JsonlTask(tmp_path / "bom.jsonl", verifier="exact")  # a byte-order mark is not an error
    assert bom.split_size("train") + bom.split_size("heldout") == 1
    good = _write(tmp_path / "good.jsonl", [{"prompt": "a", "answer": "1"}])
    for options, match in [
        ({"verifier": "fuzzy"}, "verifier must be one of auto, math-verify, exact"),
        ({"answer_format": "xml"}, "answer_format must be one of boxed, answer_tag, text"),
        ({"prompt_field": ""}, "prompt_field must be a non-empty string"),
        ({"heldout_fraction": 0.0}, "heldout_fraction"),
        ({"max_answer_chars": 0}, "max_answer_chars"),
        ({"math_verify_timeout": 0.5}, "math_verify_timeout"),
    ]:
        with pytest.raises(ValueError, match=match):
            JsonlTask(good, **options)


def test_without_math_verify_auto_is_exact(dataset, monkeypatch):
    import canonrl.lab.tasks.jsonl as jsonl

    monkeypatch.setattr(jsonl, "_math_verify_installed", lambda: False)
    task = JsonlTask(dataset)
    assert task.verifier == "exact" and task.cheap
    with pytest.raises(ValueError, match="needs the math-verify package") as error:
        JsonlTask(dataset, verifier="math-verify")
    assert "\n" not in str(error.value)
