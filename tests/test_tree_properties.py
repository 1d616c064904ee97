"""Property-based tests (hypothesis) of every registered tree estimator (a step estimator reading ``node`` and
``parent``), read from the registry, on fuzzed rollout trees: node relabelling, row permutation, one batch per tree
giving the same numbers as the whole batch, exact zeros for equal rewards, finite values on the mask only.

Two layouts are drawn: branched rollouts (row per leaf, cut at the branch points by ``tree_from_branches``; ROSE,
ARPO, AttnRL and SPO-tree read them) and completions from prefixes (row per completion, ``node`` = the prefix it
starts from; Tree-OPO)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import canonrl
from canonrl.branches import tree_from_branches
from conftest import branched_rollouts

TREE_ESTIMATORS = [info.name for info in canonrl.estimators() if info.level == "step" and "node" in info.requires]
#: Tree estimators whose rows are completions from a prefix node rather than branched rollouts.
COMPLETION_LAYOUT = {"tree_opo"}
#: Configurations beyond the defaults that change which statistics are taken.
VARIANTS = {
    "spo_tree": [{}, {"mode": "grpo"}],
    "arpo": [{}, {"attribution": "hard"}],
    "tree_opo": [{}, {"baseline": "optimistic"}, {"baseline": "pessimistic", "center": False}],
}
CASES = [(name, params) for name in TREE_ESTIMATORS for params in VARIANTS.get(name, [{}])]
SETTINGS = dict(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_every_tree_estimator_is_fuzzed_here():
    assert set(COMPLETION_LAYOUT) <= set(TREE_ESTIMATORS) and len(TREE_ESTIMATORS) >= 4


@st.composite
def tree_batches(draw, name: str):
    """Inputs of ``name``'s layout for one to three trees (one per prompt group), rewards in {0, 1} or floats."""
    if name in COMPLETION_LAYOUT:
        return draw(completion_batches())
    parents, positions, lengths, groups = draw(branched_rollouts(max_rows=9, max_groups=3))
    width = max(lengths)
    mask = torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths])
    tree = tree_from_branches(torch.tensor(parents), torch.tensor(positions), mask)
    segments = tree["turn_ids"].amax(1) + 1
    node = [tree["node"][b, : segments[b]].tolist() for b in range(len(lengths))]
    parent = [tree["parent"][b, : segments[b]].tolist() for b in range(len(lengths))]
    rewards = draw(st.lists(reward_values(), min_size=len(lengths), max_size=len(lengths)))
    return dict(rewards=torch.tensor(rewards), group=groups, mask=mask, turn_ids=tree["turn_ids"], node=node,
                parent=parent)


def reward_values():
    return st.one_of(st.sampled_from([0.0, 1.0]), st.floats(-2, 2, allow_nan=False, width=32))


@st.composite
def completion_batches(draw):
    """A forest of prefixes (one tree per group; node 0 of each group its root) and one completion per row from a
    random prefix: ``node`` the prefix, ``parent`` its parent (-1 for the root)."""
    groups = draw(st.integers(1, 3))
    prefix_parent, prefix_group = [], []
    for group in range(groups):
        first = len(prefix_parent)
        for k in range(draw(st.integers(1, 4))):
            prefix_parent.append(draw(st.integers(first, first + k - 1)) if k else -1)
            prefix_group.append(group)
    rows = draw(st.integers(1, 9))
    prefix = draw(st.lists(st.integers(0, len(prefix_parent) - 1), min_size=rows, max_size=rows))
    rewards = draw(st.lists(reward_values(), min_size=rows, max_size=rows))
    return dict(rewards=torch.tensor(rewards), group=[prefix_group[k] for k in prefix], mask=torch.ones(rows, 2),
                node=[[k] for k in prefix], parent=[[prefix_parent[k]] for k in prefix])


def run(name, params, inputs):
    return canonrl.advantages(name, **inputs, **params)


def relabelled(inputs, salt: int):
    """Node ids as strings of a shuffled numbering; roots stay None."""
    ids = sorted({i for row in inputs["node"] + inputs["parent"] for i in row if i != -1})
    shuffled = torch.randperm(len(ids), generator=torch.Generator().manual_seed(salt)).tolist()
    name = {i: f"prefix-{shuffled[k]}" for k, i in enumerate(ids)}
    return {**inputs, "node": [[name[i] for i in row] for row in inputs["node"]],
            "parent": [[None if i == -1 else name[i] for i in row] for row in inputs["parent"]]}


def rows_taken(inputs, rows: list[int]):
    """The batch restricted to (and reordered as) ``rows``."""
    index = torch.tensor(rows)
    out = {**inputs, "rewards": inputs["rewards"][index], "mask": inputs["mask"][index],
           "group": [inputs["group"][b] for b in rows], "node": [inputs["node"][b] for b in rows],
           "parent": [inputs["parent"][b] for b in rows]}
    if "turn_ids" in inputs:
        out["turn_ids"] = inputs["turn_ids"][index]
    return out


def fuzzed(test):
    """One hypothesis search per (estimator, configuration): the test gets name, params, inputs and a salt."""

    def check(name, params, data, salt):
        test(name, params, data.draw(tree_batches(name)), salt)

    check.__name__, check.__doc__ = test.__name__, test.__doc__
    search = given(data=st.data(), salt=st.integers(0, 2**16))(check)
    return pytest.mark.parametrize(("name", "params"), CASES)(settings(**SETTINGS)(search))


@fuzzed
def test_node_relabelling_changes_nothing(name, params, inputs, salt):
    torch.testing.assert_close(run(name, params, relabelled(inputs, salt)), run(name, params, inputs),
                               rtol=1e-6, atol=1e-6)  # ids may change the order of float sums


@fuzzed
def test_row_permutation_permutes_the_output(name, params, inputs, salt):
    order = torch.randperm(len(inputs["group"]), generator=torch.Generator().manual_seed(salt)).tolist()
    torch.testing.assert_close(run(name, params, rows_taken(inputs, order)), run(name, params, inputs)[order],
                               rtol=1e-6, atol=1e-6)


@fuzzed
def test_one_batch_per_tree_gives_the_same_numbers(name, params, inputs, salt):
    """Every tree here is one prompt group's; a group-local estimator run on each group alone agrees."""
    if not canonrl.get_estimator(name, **params).group_local:
        return
    whole = run(name, params, inputs)
    for group in set(inputs["group"]):
        rows = [b for b, g in enumerate(inputs["group"]) if g == group]
        torch.testing.assert_close(run(name, params, rows_taken(inputs, rows)), whole[rows], rtol=1e-6, atol=1e-6)


@fuzzed
def test_equal_rewards_give_exact_zeros_and_values_stay_on_the_mask(name, params, inputs, salt):
    out = run(name, params, inputs)
    assert torch.isfinite(out).all() and (out[inputs["mask"] == 0] == 0).all()
    constant = {**inputs, "rewards": torch.full_like(inputs["rewards"], float(salt % 3))}
    assert (run(name, params, constant) == 0).all()
