"""Lab tasks and bounded verification: reasoning-gym and boxed-math tasks, the registry, and verify_all's rules.

The fake tasks below live at module level so that verification workers can unpickle them (they import this
module by name; pytest puts tests/ on sys.path before the worker fork server starts).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from canonrl.lab import verification
from canonrl.lab.tasks import get_task, task_names
from canonrl.lab.tasks.base import Problem, Reward
from canonrl.lab.verification import Verifier, VerifyResult, verify_all

# ----------------------------------------------------------------------------------------------------------
# Fake tasks: the response says what the verifier does.

# How long the "sleep" verifier sleeps. Tests that a timeout fired bound the call's duration by this (and by per-
# response timeouts derived from it), never by a guess at the machine's speed: under any load the pool's 1 s
# timeouts return far sooner, while a broken timeout waits the full sleep.
SLEEP = 60.0


class ScriptedTask:
    """verify() obeys the response: ok, wrong, boom (raise), sleep (SLEEP s), nan, big (1.5), float, none, die."""

    name = "scripted"
    components = ("correct", "formatted")
    cheap = False

    def problems(self, split, count, seed):
        return [Problem(f"{split}{seed}-{i}", "ok") for i in range(count)]

    def verify(self, response: str, problem: Problem):
        if response == "ok":
            return Reward(1.0, {"correct": 1.0, "formatted": 1.0})
        if response == "wrong":
            return Reward(0.0, {"correct": 0.0, "formatted": 1.0})
        if response == "boom":
            raise ValueError("verifier bug")
        if response == "sleep":
            time.sleep(SLEEP)
            return Reward(1.0)
        if response == "nan":
            return Reward(float("nan"), {"correct": 1.0})
        if response == "big":
            return Reward(1.5, {"correct": -2.0, "formatted": float("inf")})
        if response == "float":
            return 0.5
        if response == "none":
            return None
        if response == "die":
            os._exit(3)
        raise AssertionError(response)


class CheapScriptedTask(ScriptedTask):
    cheap = True


class UnpicklableTask(ScriptedTask):
    def __init__(self):
        self.hook = lambda: None


PROBLEM = Problem("p", "ok")


@pytest.fixture(scope="module")
def verifier():
    with Verifier(workers=2) as v:
        yield v
    verification.shutdown()


def _run(verifier_or_none, task, responses, **kwargs) -> VerifyResult:
    kwargs.setdefault("timeout", SLEEP)  # only the sleeping verifier may time out, however loaded the machine is
    problems = [PROBLEM] * len(responses)
    if verifier_or_none is None:
        return verify_all(task, responses, problems, **kwargs)
    return verifier_or_none.verify_all(task, responses, problems, **kwargs)


def _check_rules(result: VerifyResult) -> None:
    # responses: ok, boom, nan, big, float, none, wrong
    assert result.scores == [1.0, 0.0, 0.0, 1.0, 0.5, 0.0, 0.0]
    assert result.components["correct"] == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert result.components["formatted"] == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]  # inf is invalid: 0
    assert (result.failures, result.timeouts, result.clamped) == (3, 0, 1)


RULES = ["ok", "boom", "nan", "big", "float", "none", "wrong"]


def test_cheap_task_is_verified_inline_with_the_same_rules():
    with Verifier(workers=2) as v:
        _check_rules(_run(v, CheapScriptedTask(), RULES))
        assert v.processes() == []  # no worker was started
    verification.shutdown()  # an earlier test may have started the module-level pool
    _check_rules(_run(None, CheapScriptedTask(), RULES))
    assert verification._default is None  # the module-level path did not build a pool either


def test_pool_applies_the_rules(verifier):
    result = _run(verifier, ScriptedTask(), RULES)
    _check_rules(result)
    assert len(result) == len(RULES)
    assert _run(verifier, ScriptedTask(), []).scores == []


def test_sleeping_verifier_times_out_without_hanging_the_caller(verifier):
    start = time.monotonic()
    result = _run(verifier, ScriptedTask(), ["ok", "sleep", "ok", "wrong", "ok"], timeout=1.0)
    elapsed = time.monotonic() - start
    assert result.scores == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert (result.timeouts, result.failures) == (1, 0)
    assert elapsed < SLEEP  # the caller did not wait for the sleeping verifier; no bound on how fast the machine is
    # the killed worker was replaced: the pool still works
    assert _run(verifier, ScriptedTask(), ["ok", "ok", "ok"]).scores == [1.0, 1.0, 1.0]


def test_total_timeout_caps_the_whole_call(verifier):
    per_response = SLEEP / 2
    start = time.monotonic()
    result = _run(verifier, ScriptedTask(), ["sleep"] * 4, timeout=per_response, total_timeout=1.0)
    # without the cap the call would last at least one per-response timeout (two of them, on two workers)
    assert time.monotonic() - start < per_response
    assert result.scores == [0.0] * 4 and result.timeouts == 4


def test_dead_worker_is_a_failure_and_is_replaced(verifier):
    result = _run(verifier, ScriptedTask(), ["die", "ok", "die", "ok"])
    assert result.scores == [0.0, 1.0, 0.0, 1.0]
    assert (result.failures, result.timeouts) == (2, 0)


def test_module_level_verify_all_uses_a_shared_pool_and_shuts_down():
    result = _run(None, ScriptedTask(), ["ok", "boom", "sleep"], timeout=1.0)
    assert result.scores == [1.0, 0.0, 0.0] and (result.failures, result.timeouts) == (1, 1)
    pids = [p.pid for p in verification._default.processes()]
    assert pids
    verification.shutdown()
    assert verification._default is None
    for pid in pids:  # reaped: not even a zombie is left
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_close_reaps_workers():
    with Verifier(workers=2) as v:
        assert _run(v, ScriptedTask(), ["ok"] * 4).scores == [1.0] * 4
        pids = [p.pid for p in v.processes()]
        assert len(pids) == 2
    assert v.processes() == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_bad_calls_raise_one_line_errors(verifier):
    for kwargs, word in (({"timeout": 0.0}, "timeout"), ({"total_timeout": -1.0}, "total_timeout")):
        with pytest.raises(ValueError, match=word):
            _run(verifier, ScriptedTask(), ["ok"], **kwargs)
    with pytest.raises(ValueError, match="same length"):
        verifier.verify_all(ScriptedTask(), ["ok", "ok"], [PROBLEM])
    with pytest.raises(ValueError, match="cannot be pickled") as error:
        _run(verifier, UnpicklableTask(), ["ok"])
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="workers"):
        Verifier(workers=0)


# ----------------------------------------------------------------------------------------------------------
# Extraction helpers (no optional dependency)


def test_answer_and_boxed_extraction():
    from canonrl.lab.tasks.answers import extract_answer_tag, last_boxed

    assert extract_answer_tag("<answer>1</answer> then <answer> 42 </answer>") == "42"
    assert extract_answer_tag("<answer>unclosed") is None and extract_answer_tag("none") is None
    assert last_boxed(r"\boxed{1} and \boxed{\frac{3}{4}}") == r"\frac{3}{4}"
    assert last_boxed(r"\boxed {x^{2}}") == "x^{2}"
    assert last_boxed(r"\boxed{1} then \boxed{2") is None  # a cut-off last box does not fall back
    assert last_boxed("no box") is None
    # Linear scans: adversarial repetitions cost no more than a few passes over a benign text of the same length
    # (the reference is one full scan). A quadratic scan of these texts takes minutes; timed in turns, under the
    # same load, with a floor far above any scheduling delay.
    tags, tags_benign = "<answer>" * 100_000 + "</answer>", "<answer></answer>" + "x" * 800_000
    boxes, boxes_benign = "\\boxed{" * 50_000, "\\boxed{" + "x" * 350_000
    assert extract_answer_tag(tags) == extract_answer_tag(tags_benign) == ""
    assert last_boxed(boxes) is None and last_boxed(boxes_benign) is None
    assert _fastest(lambda: extract_answer_tag(tags)) < 50 * _fastest(lambda: extract_answer_tag(tags_benign)) + 0.25
    assert _fastest(lambda: last_boxed(boxes)) < 50 * _fastest(lambda: last_boxed(boxes_benign)) + 0.25


def _fastest(call, repeats: int = 5) -> float:
    """The shortest of a few timings: a descheduled run does not count against the code."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


# ----------------------------------------------------------------------------------------------------------
# reasoning-gym tasks


def _norm(text: str) -> str:
    return " ".join(text.split())


def _questions(problems) -> set[str]:
    return {_norm(p.meta["entry"]["question"]) for p in problems}


@pytest.fixture(scope="module")
def rg():
    return pytest.importorskip("reasoning_gym")


@pytest.mark.parametrize(
    "dataset, config",
    [
        ("chain_sum", None),
        ("basic_arithmetic", None),
        ("spell_backward", None),
        # few distinct questions: both seed streams produce the same ones, only the hash filter separates them
        ("chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}),
    ],
)
def test_rg_splits_never_share_a_question(rg, dataset, config):
    from canonrl.lab.tasks.reasoning_gym import ReasoningGymTask

    task = ReasoningGymTask(dataset, config=config)
    train = [p for seed in range(3) for p in task.problems("train", 120, seed=seed)]
    heldout = [p for seed in range(3) for p in task.problems("heldout", 40, seed=seed)]
    assert len(train) == 360 and len(heldout) == 120
    assert not _questions(train) & _questions(heldout)
    assert all(task.in_split(p.meta["entry"]["question"], "heldout") for p in heldout)
    if config is not None:
        assert len(_questions(train)) < 200  # the space really is small: the test would catch an overlap
        raw = rg.create_dataset(dataset, size=300, seed=0, **config)
        assert {_norm(e["question"]) for e in raw} & _questions(heldout)


def test_rg_problems_are_a_pure_function_of_the_seed(rg):
    task = get_task("rg:chain_sum")
    a = task.problems("train", 20, seed=5)
    assert [(p.prompt, p.answer) for p in a] == [(p.prompt, p.answer) for p in task.problems("train", 20, seed=5)]
    assert [p.prompt for p in a[:7]] == [p.prompt for p in task.problems("train", 7, seed=5)]
    assert [p.prompt for p in a] != [p.prompt for p in task.problems("train", 20, seed=6)]
    assert task.problems("heldout", 0, seed=5) == []
    assert "<answer>" in a[0].prompt and a[0].prompt.startswith(a[0].meta["entry"]["question"].rstrip())
    with pytest.raises(ValueError, match="split"):
        task.problems("test", 3, seed=0)


RG_GOLD = ["chain_sum", "basic_arithmetic", "spell_backward", "gsm_symbolic", "prime_factorization"]


@pytest.mark.parametrize("dataset", RG_GOLD)
def test_rg_gold_scores_one_and_wrong_scores_zero(rg, verifier, dataset):
    task = get_task(f"rg:{dataset}")
    problems = task.problems("heldout", 4, seed=1)
    responses = [f"reasoning...\n<answer>{p.answer}</answer>" for p in problems]
    responses += ["<answer>999999937 wrong</answer>", "no tags at all"]
    result = verifier.verify_all(task, responses, problems + problems[:2], timeout=SLEEP)
    assert result.scores == [1.0] * 4 + [0.0, 0.0], result
    if dataset == "prime_factorization":  # its scorer raises on junk: a failure, every component 0
        assert result.failures == 1 and result.components["formatted"] == [1.0] * 4 + [0.0, 0.0]
    else:
        assert result.failures == 0 and result.components["formatted"] == [1.0] * 5 + [0.0]


def test_rg_binary_threshold_and_raw_component(rg, verifier):
    task = get_task("rg:fraction_simplification")  # gives 0.01 for any wrong answer
    problems = task.problems("train", 2, seed=0)
    responses = [f"<answer>{problems[0].answer}</answer>", "<answer>wrong</answer>"]
    result = verifier.verify_all(task, responses, problems, timeout=SLEEP)
    assert result.scores == [1.0, 0.0]
    assert result.components["raw"] == [1.0, 0.01]
    # spell_backward gives partial credit; binary=False passes it through
    partial = get_task("rg:spell_backward", binary=False)
    p = partial.problems("train", 1, seed=0)[0]
    reward = partial.verify(f"<answer>{p.answer[:-1]}</answer>", p)
    assert 0.0 < reward.score < 1.0 and reward.components["raw"] == reward.score


def test_rg_raising_scorer_becomes_a_counted_failure(rg, verifier):
    task = get_task("rg:prime_factorization")
    problems = task.problems("train", 3, seed=0)
    with pytest.raises(ValueError):
        task.verify("<answer>zzz_wrong</answer>", problems[1])  # the dataset itself raises on junk
    responses = [f"<answer>{problems[0].answer}</answer>", "<answer>zzz_wrong</answer>", "<answer>zzz_wrong</answer>"]
    result = verifier.verify_all(task, responses, problems, timeout=SLEEP)
    assert result.scores == [1.0, 0.0, 0.0] and result.failures == 2


def test_rg_composite_and_bad_names(rg):
    with pytest.raises(ValueError, match="chain_sum") as error:
        get_task("rg:no_such_dataset")
    assert "\n" not in str(error.value) and "dataset" in str(error.value)
    with pytest.raises(ValueError, match="config") as error:
        get_task("rg:composite")
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="config"):
        get_task("rg:chain_sum", config={"no_such_option": 1})
    with pytest.raises(ValueError, match="heldout_fraction"):
        get_task("rg:chain_sum", heldout_fraction=1.0)
    composite = get_task("rg:composite", config={"datasets": [{"name": "chain_sum", "weight": 1.0, "config": {}}]})
    p = composite.problems("train", 2, seed=0)[1]
    assert composite.verify(f"<answer>{p.answer}</answer>", p).score == 1.0


# ----------------------------------------------------------------------------------------------------------
# Boxed math (math-verify)


@pytest.fixture(scope="module")
def boxed():
    pytest.importorskip("reasoning_gym")
    pytest.importorskip("math_verify")
    return get_task("boxed")


def test_boxed_splits_and_determinism(boxed):
    assert boxed.name == "boxed:gsm_symbolic"
    train = boxed.problems("train", 150, seed=0) + boxed.problems("train", 150, seed=1)
    heldout = boxed.problems("heldout", 60, seed=0)
    assert not _questions(train) & _questions(heldout)
    again = boxed.problems("heldout", 60, seed=0)
    assert [(p.prompt, p.answer) for p in again] == [(p.prompt, p.answer) for p in heldout]
    assert "\\boxed{}" in heldout[0].prompt


def test_boxed_gold_scores_one_and_wrong_scores_zero(boxed, verifier):
    problems = boxed.problems("heldout", 4, seed=2)
    responses = [f"So the answer is $\\boxed{{{p.answer}}}$." for p in problems]
    responses += [
        f"\\boxed{{{float(problems[0].answer) + 1}}}",  # wrong value
        f"the answer is {problems[1].answer}",  # right value, but not boxed
        f"\\boxed{{{problems[2].answer}}} wait, no: \\boxed{{-7}}",  # only the last box counts
    ]
    result = verifier.verify_all(boxed, responses, problems + problems[:3], timeout=SLEEP)
    assert result.scores == [1.0] * 4 + [0.0, 0.0, 0.0], result
    assert result.components["formatted"] == [1.0] * 4 + [1.0, 0.0, 1.0]
    assert (result.failures, result.timeouts) == (0, 0)
    # inline, in the main thread, math-verify's own alarms work too
    assert boxed.verify(responses[0], problems[0]).score == 1.0


def test_boxed_adversarial_inputs_return_within_the_bound(boxed, verifier):
    from canonrl.lab.tasks.boxed import BoxedMathTask

    problem = boxed.problems("train", 1, seed=3)[0]
    power_tower = r"\boxed{9^{9^{9^{9}}}}"
    polynomial = "\\boxed{" + "+".join(f"{i}x^{{{i % 97}}}y^{{{i % 13}}}" for i in range(1, 2200)) + "}"
    assert len(polynomial) > 20_000
    verifier.verify_all(boxed, ["\\boxed{1}"], [problem], timeout=SLEEP)  # warm
    start = time.monotonic()
    responses = [power_tower, polynomial, f"\\boxed{{{problem.answer}}}"]
    result = verifier.verify_all(boxed, responses, [problem] * 3, timeout=2.0)
    assert result.scores == [0.0, 0.0, 1.0]
    assert time.monotonic() - start < SLEEP  # an unbounded parse of the power tower never returns
    # with no length limit the polynomial reaches math-verify; the worker's deadline still bounds the call
    unlimited = BoxedMathTask(max_boxed_chars=100_000)
    start = time.monotonic()
    result = verifier.verify_all(unlimited, [polynomial, power_tower], [problem] * 2, timeout=1.5)
    assert result.scores == [0.0, 0.0]
    assert time.monotonic() - start < SLEEP


# ----------------------------------------------------------------------------------------------------------
# Registry


def test_registry_names_and_errors():
    assert task_names()[:6] == ["lab", "rg:<dataset>", "boxed[:<dataset>]", "jsonl:<path>", "grid", "calc"]
    for bad in ("nope", "rgchain_sum", "boxed-gsm", "lab:extra", "Lab"):
        with pytest.raises(ValueError, match="unknown task") as error:
            get_task(bad)
        message = str(error.value)
        assert "\n" not in message and "'lab'" in message and "rg:" in message and "boxed[:" in message
        assert "'jsonl:<path>'" in message and "e.g. rg:chain_sum" in message and "default gsm_symbolic" in message
    for incomplete in ("rg", "rg:", "jsonl:", "boxed:"):
        with pytest.raises(ValueError, match="needs its <") as error:
            get_task(incomplete)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="task name string"):
        get_task(None)


class ThrowawayTask:
    """A task registered by this test module under throwaway names (see the two tests below)."""

    components = ()
    cheap = True

    def __init__(self, argument: str = "none", scale: int = 1):
        self.name, self.argument, self.scale = f"throwaway:{argument}", argument, scale

    def problems(self, split, count, seed):
        return [Problem(f"{self.argument} {split} {seed} {i}", str(i * self.scale)) for i in range(count)]

    def verify(self, response, problem):
        return Reward(float(response == problem.answer))


@pytest.fixture
def throwaway(monkeypatch):
    """Registers ThrowawayTask as 'throwaway-plain' and 'throwaway[:<argument>]'; unregistered afterwards."""
    import canonrl.lab.tasks as registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register_task("throwaway-plain")(ThrowawayTask)
    registry.register_task("throwaway[:<argument>]", hint="a test's task")(ThrowawayTask)
    return registry


def test_a_registered_task_is_found_by_name(throwaway):
    assert isinstance(get_task("throwaway-plain"), ThrowawayTask)
    task = get_task("throwaway:abc", scale=3)
    assert (task.argument, task.scale, task.name) == ("abc", 3, "throwaway:abc")
    assert get_task("throwaway").argument == "none"  # an optional argument left out: the factory's default
    assert task.problems("train", 2, seed=0)[1].answer == "3"
    assert task_names()[:6] == ["lab", "rg:<dataset>", "boxed[:<dataset>]", "jsonl:<path>", "grid", "calc"]
    assert task_names()[6:] == ["throwaway-plain", "throwaway[:<argument>]"]
    with pytest.raises(ValueError, match="unknown task") as error:
        get_task("nope")
    assert "'throwaway[:<argument>]' (a test's task)" in str(error.value)


def test_a_new_module_in_the_package_is_all_it_takes(throwaway, tmp_path, monkeypatch):
    (tmp_path / "zz_throwaway.py").write_text(
        "from canonrl.lab.tasks import register_task\n"
        "@register_task('zz-throwaway:<argument>')\n"
        "class ZZ:\n"
        "    def __init__(self, argument):\n"
        "        self.name = 'zz-throwaway:' + argument\n",
        encoding="utf-8",
    )
    monkeypatch.setattr(throwaway, "__path__", [*throwaway.__path__, str(tmp_path)])
    monkeypatch.setattr(throwaway, "_builtins_loaded", False)
    monkeypatch.delitem(sys.modules, "canonrl.lab.tasks.zz_throwaway", raising=False)
    try:
        assert get_task("zz-throwaway:x").name == "zz-throwaway:x"
        assert task_names()[6] == "zz-throwaway:<argument>"  # after the six shipped families
    finally:
        sys.modules.pop("canonrl.lab.tasks.zz_throwaway", None)


def test_register_task_refuses_bad_patterns_and_name_clashes(throwaway):
    for bad in ("", "a:b", "a:<b", "x[:y]", "1abc", "a b"):
        with pytest.raises(ValueError, match="pattern"):
            throwaway.register_task(bad)
    with pytest.raises(ValueError, match="already registered"):
        throwaway.register_task("lab")(ThrowawayTask)
    throwaway.register_task("throwaway-plain")(ThrowawayTask)  # the same class again (a reloaded module): fine


def test_registry_builds_each_family(rg):
    assert get_task("rg:chain_sum").name == "rg:chain_sum"
    assert get_task("rg:chain_sum", cheap=True).cheap is True
    pytest.importorskip("math_verify")
    task = get_task("boxed:basic_arithmetic")
    assert task.name == "boxed:basic_arithmetic" and task.components == ("correct", "formatted")
    p = task.problems("train", 1, seed=0)[0]
    assert task.verify(f"\\boxed{{{p.answer}}}", p).score == 1.0
    assert get_task("boxed").name == "boxed:gsm_symbolic"


def test_lab_task_through_the_registry_is_cheap():
    from canonrl.lab.tasks.lab import LabTask

    task = get_task("lab")
    assert isinstance(task, LabTask) and task.name == "lab" and getattr(task, "cheap", False)
    problems = task.problems("train", 3, seed=0)
    result = verify_all(task, [f"ans={p.answer}" for p in problems], problems)
    assert result.scores == [1.0] * 3 and verification._default is None


def test_importing_the_registry_imports_no_optional_dependency():
    # Importing the package imports no task module; building tasks of every family imports neither optional
    # library either (they are imported when a reasoning-gym task is built or math-verify verifies).
    code = (
        "import sys, canonrl.lab.tasks, canonrl.lab.verification; "
        "print(sorted(m for m in ('reasoning_gym', 'math_verify', 'canonrl.lab.tasks.lab') if m in sys.modules)); "
        "from canonrl.lab.tasks import get_task, task_names; task_names(); get_task('lab'); "
        "import canonrl.lab.tasks.boxed, canonrl.lab.tasks.jsonl, canonrl.lab.tasks.reasoning_gym; "
        "print(sorted(m for m in ('reasoning_gym', 'math_verify') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True)
    assert out.stdout.split() == ["[]", "[]"]
