import pytest
import torch
from hypothesis import strategies as st

from canonrl.lab.tasks.base import Reward
from canonrl.lab.tasks.lab import LabTask


def full_mask(rows: int, tokens: int = 3) -> torch.Tensor:
    return torch.ones(rows, tokens)


def per_response(adv: torch.Tensor) -> torch.Tensor:
    """The scalar of a sequence-level advantage (its first token; callers use masks starting at token 0)."""
    return adv[:, 0]


def row_values(out: torch.Tensor) -> torch.Tensor:
    """[B] the value of each row of an output that is constant on the row's non-zero tokens (0 for an all-zero row)."""
    return out.sum(-1) / (out != 0).sum(-1).clamp_min(1)


def tiny_lab_model():
    """A random 2-layer Llama with the lab tokenizer (seeded): (model, tokenizer), for tests that need a policy."""
    from canonrl.lab.tasks.lab import build_tokenizer
    from canonrl.lab.warmstart import WarmstartConfig, build_model

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    model = build_model(WarmstartConfig(hidden_size=32, intermediate_size=64, layers=2, heads=2), tokenizer)
    return model, tokenizer


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread, and far faster when another process holds the other core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------------------------
# test tasks for the lab trainer
# ----------------------------------------------------------------------------------------------------------------


class ParityTask:
    """Lab problems, but a response scores 1 when its text has even length.

    A random policy never solves a lab problem, so on the lab task every reward (and every advantage) is 0 and
    no update moves a weight. This verifier gives it mixed groups, so the updates, and what resume must
    reproduce, are real.
    """

    name = "parity"
    components = ("correct",)
    cheap = True

    def __init__(self):
        self.inner = LabTask()

    def problems(self, split, count, seed):
        return self.inner.problems(split, count, seed)

    def verify(self, response, problem):
        score = float(len(response) % 2 == 0)
        return Reward(score, {"correct": score})


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    """A saved tiny lab policy (`tiny_lab_model`), one per test module."""
    model, tokenizer = tiny_lab_model()
    directory = tmp_path_factory.mktemp("tiny-policy")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


class Interrupt(Exception):
    """Stops a lab run from its step callback, as a kill would."""


def train_until_interrupted(config, run_dir, at_step: int) -> None:
    """Run the lab trainer on `config` in `run_dir` and stop it right after step `at_step` is logged."""
    from canonrl.lab.trainer import Trainer

    def interrupt(step, records):
        if step == at_step:
            raise Interrupt

    with pytest.raises(Interrupt):
        Trainer(config, run_dir).train(interrupt)


@pytest.fixture
def patched():
    """verl's compute_advantage patched by canonrl for one test (verl tests only: it imports verl)."""
    from canonrl.integrations import verl as cv

    cv.patch_compute_advantage()
    yield
    cv.unpatch_compute_advantage()


#: the shortest run a resume check needs: killed after step 2, whose checkpoint was not written yet, it resumes from
#: step 1's and must replay step 2 exactly
SHORT_RESUME = ("steps=2", "eval_every=0", "checkpoint_every=1")


def assert_resume_is_bit_exact(config, tmp_path, at_step: int = 3) -> list[dict]:
    """Train `config` straight through, and again killed right after step `at_step` and resumed: both logs must
    agree record for record, wall-clock fields aside. Returns the records."""
    import json

    from canonrl.lab.trainer import WALL_CLOCK_KEYS, Trainer

    Trainer(config, tmp_path / "a").train()
    train_until_interrupted(config, tmp_path / "b", at_step=at_step)
    Trainer(config, tmp_path / "b", resume=True).train()

    def records(run_dir):
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK_KEYS} for line in lines if line]

    straight = records(tmp_path / "a")
    assert straight == records(tmp_path / "b")
    return straight


def use_test_tasks(monkeypatch, tasks: dict) -> None:
    """Make `task=<name>` build `tasks[name]()` for the names in `tasks`; every other name goes to the real registry."""
    import canonrl.lab.tasks

    # register the built-in tasks first: loading them inside the patched copy would mark them loaded for good while
    # the real registry, restored after the test, never got them
    canonrl.lab.tasks._load_builtins()
    monkeypatch.setattr(canonrl.lab.tasks, "_REGISTRY", dict(canonrl.lab.tasks._REGISTRY))
    for name, factory in tasks.items():
        canonrl.lab.tasks.register_task(name)(lambda factory=factory, **options: factory())


def segment_rows(nodes, parents, rewards, group=None):
    """A row-per-trajectory tree batch: row b has len(nodes[b]) segments of one token each (turn ids 0, 1, ...),
    padded with mask-0 tokens; ``node``/``parent`` per segment as per-row lists."""
    width = max(len(row) for row in nodes)
    turn_ids = torch.tensor([list(range(len(row))) + [-1] * (width - len(row)) for row in nodes])
    return dict(
        rewards=torch.tensor(rewards),
        group=group or [0] * len(nodes),
        node=nodes,
        parent=parents,
        turn_ids=turn_ids,
        mask=(turn_ids >= 0).float(),
    )


@st.composite
def branched_rollouts(draw, max_rows: int = 8, max_groups: int = 1):
    """Row-per-leaf rollouts: (parent_row, branch_pos, lengths, group) lists. Rows have 2..7 tokens; a row is a root
    response of a random group or branches from an earlier row of its group at a legal position (one tree per
    root)."""
    count = draw(st.integers(1, max_rows))
    lengths, parents, positions, groups = [], [], [], []
    for row in range(count):
        parent = draw(st.integers(-1, row - 1)) if row else -1
        position = draw(st.integers(1, lengths[parent] - 1)) if parent >= 0 else 0
        lengths.append(draw(st.integers(max(2, position + 1), 7)))
        parents.append(parent)
        positions.append(position)
        groups.append(groups[parent] if parent >= 0 else draw(st.integers(0, max_groups - 1)))
    return parents, positions, lengths, groups
