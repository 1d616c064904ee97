"""Estimator state dicts: every registered estimator's ``state_dict()`` round-trips (a fresh estimator loaded with it
continues exactly as the original), holds only what ``torch.load(..., weights_only=True)`` reads, and refuses the
state of another estimator or one with missing keys. HA-DW (an anchor with a history, and a repeated step rolling
back to its snapshot) and wrappers around it are the cases with more than a step counter.
"""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch

import canonrl
from canonrl.bench import synthetic_batch
from canonrl.bench_steps import episodes, row_per_step, row_per_trajectory

#: what a layout's own fields are (always passed); the estimator's ``required_inputs()`` are passed as well
LAYOUT_FIELDS = {
    "row-per-response": ("rewards", "group", "mask"),
    "row-per-step": ("rewards", "group", "mask", "traj", "step_index"),
    "row-per-trajectory": ("rewards", "group", "mask", "turn_ids", "token_rewards"),
}
PREFERRED_LAYOUTS = ("row-per-response", "row-per-step", "row-per-trajectory")

#: stateful variants beyond the defaults: HA-DW's anchors, and wrappers whose base is HA-DW
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("hadw", {"anchor": "hard", "h": 2}),
    ("hadw", {"anchor": "official", "window": 2, "lambda_scale": 1.5}),
    ("hadw", {"init_anchor": 0.5, "m": 2, "base": "dr_grpo"}),
    ("capo", {"base": "hadw"}),
    ("rlev", {"base": "hadw", "base_params": {"anchor": "hard"}}),
    ("ktae", {"base": "hadw"}),
    ("effective_rank", {"base": "hadw", "bonus_at": "all"}),
]


def layout_of(estimator: canonrl.Estimator) -> str:
    return next(layout for layout in PREFERRED_LAYOUTS if layout in estimator.layouts)


def batch_fields(estimator: canonrl.Estimator, seed: int) -> dict[str, Any]:
    """A small batch of the estimator's layout with the inputs it reads; different seeds give different batches."""
    generator = torch.Generator().manual_seed(1000 + seed)
    if "node" in estimator.required_inputs():
        return tree_fields(estimator, generator)
    layout = layout_of(estimator)
    if layout == "row-per-response":
        fields = synthetic_batch(3, 4, 6, "cpu", seed=seed)
        rows = len(fields["rewards"])
        fields["metric"] = torch.rand(rows, generator=generator)  # a per-response value (>= 0: RLEV's v)
        fields["human_values"] = fields["metric"]
        fields["step_labels"] = torch.randint(-1, 2, (rows,), generator=generator).float()  # one step per row
        fields["step_values"] = torch.rand(rows, generator=generator)
        if type(estimator).multi_reward:
            fields["rewards"] = fields["reward_components"]
    else:
        ep = episodes(2, 3, 3, seed=seed)
        if layout == "row-per-step":
            fields = row_per_step(ep, 3, "cpu")
        else:
            fields = row_per_trajectory(ep, 24, "cpu")
            fields["step_rewards"] = [s.tolist() for s in torch.split(ep["step_rewards"], ep["lengths"].tolist())]
            fields["anchor"] = [a.tolist() for a in torch.split(ep["anchor"], ep["lengths"].tolist())]
        rows = len(fields["rewards"])
        steps = len(ep["traj"])  # per-step labels and potentials, in (trajectory, time) order
        labels = torch.randint(-1, 2, (steps,), generator=generator).float()
        potentials = torch.rand(steps, generator=generator)
        if layout == "row-per-step":
            fields["step_labels"], fields["step_values"] = labels, potentials
        else:
            split = ep["lengths"].tolist()
            fields["step_labels"] = [x.tolist() for x in torch.split(labels, split)]
            fields["step_values"] = [x.tolist() for x in torch.split(potentials, split)]
    fields["values"] = torch.randn(fields["mask"].shape, generator=generator)
    fields["token_scores"] = torch.rand(fields["mask"].shape, generator=generator)
    fields.setdefault("token_rewards", torch.randn(fields["mask"].shape, generator=generator))
    fields["agent"] = torch.arange(rows) % 2
    fields["indicators"] = torch.randn(rows, 3, generator=generator)  # a producer's per-response indicators
    keep = {*LAYOUT_FIELDS[layout], *estimator.required_inputs()}
    return {name: value for name, value in fields.items() if name in keep}


def tree_fields(estimator: canonrl.Estimator, generator: torch.Generator) -> dict[str, Any]:
    """The tree R -> {a, b}, a -> {a1, a2}, b -> {b1} with random leaf rewards: one row per edge (SPO-tree) or one row
    per response holding its root-to-leaf path as one-token segments (ROSE, ARPO); Tree-OPO: one completion per row
    from the prefixes R, a, b (a and b children of R)."""
    leaf = {name: float(torch.rand(1, generator=generator)) for name in ("a1", "a2", "b1")}
    if estimator.name == "tree_opo":
        rewards = [leaf["a1"], leaf["a2"], leaf["b1"], 0.5]
        return dict(rewards=torch.tensor(rewards), group=[0] * 4, mask=torch.ones(4, 2), node=["a", "a", "b", "R"],
                    parent=["R", "R", "R", None])  # fmt: skip
    if estimator.name == "spo_tree":
        nodes, parents = ["a", "b", "a1", "a2", "b1"], ["R", "R", "a", "a", "b"]
        rewards = [leaf.get(n, 0.0) for n in nodes]
        return dict(rewards=torch.tensor(rewards), group=[0] * 5, mask=torch.ones(5, 2), node=nodes, parent=parents)
    turn_ids = torch.tensor([[0, 1]] * 3)
    return dict(
        rewards=torch.tensor([leaf["a1"], leaf["a2"], leaf["b1"]]), group=[0] * 3, mask=torch.ones(3, 2),
        turn_ids=turn_ids, node=[["a", "a1"], ["a", "a2"], ["b", "b1"]], parent=[["R", "a"], ["R", "a"], ["R", "b"]],
    )  # fmt: skip


def configurations() -> list[tuple[str, dict[str, Any]]]:
    return [(info.name, {}) for info in canonrl.estimators()] + VARIANTS


def config_id(config: tuple[str, dict[str, Any]]) -> str:
    name, params = config
    return name + "".join(f"-{k}={v}" for k, v in params.items())


CONFIGURATIONS = configurations()


def run(estimator: canonrl.Estimator, seeds_and_steps) -> list[torch.Tensor]:
    return [estimator(step=step, **batch_fields(estimator, seed)) for seed, step in seeds_and_steps]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def through_torch_save(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("config", CONFIGURATIONS, ids=config_id)
def test_state_dict_round_trips(config):
    name, params = config
    original = canonrl.get_estimator(name, **params)
    run(original, [(0, 1), (1, 2), (2, 3)])
    state = through_torch_save(original.state_dict())
    assert state["estimator"] == name and state["step"] == 3

    # a fresh estimator loaded with the state continues exactly as the original: at a new step, ...
    copy_of_original = copy.deepcopy(original)
    restored = canonrl.get_estimator(name, **params)
    restored.load_state_dict(state)
    assert restored.state_dict() == original.state_dict()
    assert_same(run(restored, [(3, 4), (4, None), (5, 4)]), run(original, [(3, 4), (4, None), (5, 4)]))
    # ... and on a repeat of the last step (HA-DW rolls back to its snapshot before it)
    repeated = canonrl.get_estimator(name, **params)
    repeated.load_state_dict(state)
    assert_same(run(repeated, [(6, 3), (7, 4)]), run(copy_of_original, [(6, 3), (7, 4)]))


@pytest.mark.parametrize("config", [c for c in CONFIGURATIONS if "hadw" in config_id(c)], ids=config_id)
def test_a_history_is_restored_not_only_the_step(config):
    """Where the state is more than the step, an estimator given only the step continues differently."""
    name, params = config
    original = canonrl.get_estimator(name, **params)
    run(original, [(0, 1), (1, 2), (2, 3)])
    state = original.state_dict()
    hadw = state if name == "hadw" else state["base"]
    assert hadw["estimator"] == "hadw" and len(hadw["accuracies"]) >= 1 and hadw["last_step"] == 3
    assert hadw["before"] is not None
    only_step = canonrl.get_estimator(name, **params)
    only_step.step = 3
    assert not torch.equal(run(only_step, [(3, 4)])[0], run(original, [(3, 4)])[0])


def test_effective_rank_restores_its_baselines_not_only_the_step():
    original = canonrl.get_estimator("effective_rank")
    run(original, [(0, 1), (1, 2), (2, 3)])
    state = original.state_dict()
    assert state["previous_means"] is not None and any(m != 0.0 for m in state["mids"])
    only_step = canonrl.get_estimator("effective_rank")
    only_step.step = 3
    assert not torch.equal(run(only_step, [(3, 4)])[0], run(original, [(3, 4)])[0])


@pytest.mark.parametrize("config", CONFIGURATIONS, ids=config_id)
def test_state_dicts_hold_only_plain_values(config):
    name, params = config
    estimator = canonrl.get_estimator(name, **params)
    assert through_torch_save(estimator.state_dict()) == estimator.state_dict()
    run(estimator, [(0, 1), (1, 2)])
    assert through_torch_save(estimator.state_dict()) == estimator.state_dict()


def test_the_base_state_is_the_step():
    estimator = canonrl.get_estimator("grpo")
    assert estimator.state_dict() == {"estimator": "grpo", "step": 0}
    estimator(**batch_fields(estimator, 0))
    assert estimator.state_dict() == {"estimator": "grpo", "step": 1}
    fresh = canonrl.get_estimator("grpo")
    fresh.load_state_dict({"estimator": "grpo", "step": 7})
    fresh(**batch_fields(fresh, 0))
    assert fresh.step == 8


def one_line_error(estimator: canonrl.Estimator, state: Any, match: str) -> None:
    before = copy.deepcopy(estimator.state_dict())
    with pytest.raises(ValueError, match=match) as info:
        estimator.load_state_dict(state)
    assert "\n" not in str(info.value)
    assert estimator.state_dict() == before  # a refused state changes nothing


def test_the_state_of_another_estimator_is_refused():
    grpo, hadw = canonrl.get_estimator("grpo"), canonrl.get_estimator("hadw")
    run(hadw, [(0, 1)])
    one_line_error(grpo, hadw.state_dict(), "cannot load a state of estimator 'hadw' into estimator 'grpo'")
    one_line_error(hadw, grpo.state_dict(), "cannot load a state of estimator 'grpo' into estimator 'hadw'")
    # a wrapper checks its base's state too: capo over hadw does not take capo over grpo's
    capo_hadw, capo_grpo = canonrl.get_estimator("capo", base="hadw"), canonrl.get_estimator("capo")
    one_line_error(capo_hadw, capo_grpo.state_dict(), "cannot load a state of estimator 'grpo' into estimator 'hadw'")
    one_line_error(grpo, ["not", "a", "dict"], "must be a dict")


def test_missing_or_unexpected_keys_are_refused():
    hadw = canonrl.get_estimator("hadw")
    run(hadw, [(0, 1), (1, 2)])
    state = hadw.state_dict()
    fresh = canonrl.get_estimator("hadw")
    one_line_error(fresh, {k: v for k, v in state.items() if k != "accuracies"}, r"missing keys \['accuracies'\]")
    one_line_error(fresh, {**state, "extra": 1}, r"unexpected keys \['extra'\]")
    one_line_error(fresh, {**state, "base": {"estimator": "grpo"}}, r"'grpo' state: missing keys \['step'\]")
    one_line_error(fresh, {**state, "accuracies": "0.5"}, "accuracies must be a list of numbers")
    one_line_error(canonrl.get_estimator("grpo"), {"estimator": "grpo", "step": "3"}, "step must be an int")
    one_line_error(canonrl.get_estimator("grpo"), {"estimator": "grpo"}, r"missing keys \['step'\]")
