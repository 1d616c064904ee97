"""Tree-OPO (row per completion, ``node`` = its prefix) and ARPO (row per branched trajectory, one token per
segment) on small hand-computed trees."""

from __future__ import annotations

import math

import pytest
import torch

import canonrl
from conftest import segment_rows


def completions(nodes, parents, rewards, group=None):
    """One completion per row (two tokens): ``node`` its prefix, ``parent`` that prefix's parent."""
    n = len(nodes)
    return dict(rewards=torch.tensor(rewards), group=group or [0] * n, node=nodes, parent=parents, mask=torch.ones(n, 2))


def tree_opo(baseline="expectation", **fields):
    out = canonrl.advantages("tree_opo", baseline=baseline, **fields)
    assert (out[:, 0] == out[:, 1]).all()
    return out[:, 0]


#: A chain of prefixes R -> x -> y, two completions from each:
#:
#:     R: 0, 0     x: 1, 0     y: 1, 1
#:
#: expectation: V(y) = 1, V(x) = 3/4, V(R) = 3/6; raw r - V = [-1/2, -1/2, 1/4, -3/4, 0, 0], mean -1/4.
#: optimistic: V = 1 everywhere; raw [-1, -1, 0, -1, 0, 0], mean -1/2.
#: pessimistic: V(y) = 1, V(x) = V(R) = 0; raw [0, 0, 1, 0, 0, 0], mean 1/6.
CHAIN = (["R", "R", "x", "x", "y", "y"], [None, None, "R", "R", "x", "x"], [0.0, 0.0, 1.0, 0.0, 1.0, 1.0])


def test_tree_opo_chain_by_hand():
    fields = completions(*CHAIN)
    assert tree_opo(**fields).tolist() == pytest.approx([-0.25, -0.25, 0.5, -0.5, 0.25, 0.25])
    assert tree_opo("optimistic", **fields).tolist() == pytest.approx([-0.5, -0.5, 0.5, -0.5, 0.5, 0.5])
    assert tree_opo("pessimistic", **fields).tolist() == pytest.approx([-1 / 6] * 2 + [5 / 6] + [-1 / 6] * 3)
    raw = canonrl.advantages("tree_opo", center=False, **fields)[:, 0]
    assert raw.tolist() == pytest.approx([-0.5, -0.5, 0.25, -0.75, 0.0, 0.0])
    half = canonrl.advantages("tree_opo", center=False, alpha=0.5, **fields)[:, 0]
    assert half.tolist() == pytest.approx([-0.25, -0.25, 1 - 3 / 8, -3 / 8, 0.5, 0.5])


#: Unequal branching, no completion from the root prompt Q itself:
#:
#:              Q
#:           /     \
#:          a       b
#:        /   \     |
#:      a1     a2   (b: 1)
#:   (1, 0, 0) (1)
#:
#: rows: a1: 1, 0, 0; a2: 1; b: 1. Without rows from a, a's link to Q is unknown: a and Q are separate roots.
UNEQUAL = (["a1", "a1", "a1", "a2", "b"], ["a", "a", "a", "a", "Q"], [1.0, 0.0, 0.0, 1.0, 1.0])


def test_tree_opo_unequal_branching_by_hand():
    """a is no row's node, so a1 and a2 are roots here: V(a1) = 1/3, V(a2) = 1, V(b) = 1; raw r - V =
    [2/3, -1/3, -1/3, 0, 0], mean 0. Naming a (rows from a: one completion, reward 0) changes its subtree only."""
    fields = completions(*UNEQUAL)
    assert tree_opo(**fields).tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0], abs=1e-6)
    nodes, parents, rewards = UNEQUAL
    with_a = completions([*nodes, "a"], [*parents, "Q"], [*rewards, 0.0])
    # V(a) = (1 + 0 + 0 + 1 + 0) / 5 = 2/5; raw = [2/3, -1/3, -1/3, 0, 0, -2/5], mean = -2/30
    raw = [2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, -2 / 5]
    assert tree_opo(**with_a).tolist() == pytest.approx([v + 1 / 15 for v in raw], abs=1e-6)
    optimistic = tree_opo("optimistic", **with_a)  # V = 1 on a1, a2, a, b: raw r - 1, mean -3/6
    assert optimistic.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0.5, -0.5])


def test_tree_opo_single_prefix_is_group_centring_and_lone_completion_gives_zero():
    fields = completions(["P"] * 3 + ["Z"], [None] * 4, [1.0, 0.0, 0.0, 0.5], group=[0, 0, 0, 1])
    assert tree_opo(**fields).tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0.0])
    assert tree_opo(**completions(["P"], [None], [1.0])).tolist() == [0.0]


def test_tree_opo_all_equal_rewards_give_exactly_zero():
    nodes, parents, _ = CHAIN
    for baseline in ("expectation", "optimistic", "pessimistic"):
        for alpha in (1.0, 0.3):
            fields = completions(nodes, parents, [0.95**3] * 6)
            out = canonrl.advantages("tree_opo", baseline=baseline, alpha=alpha, **fields)
            assert (out == 0).all()


def test_tree_opo_relabelling_and_row_permutation():
    nodes, parents, rewards = UNEQUAL
    nodes, parents, rewards = [*nodes, "a"], [*parents, "Q"], [*rewards, 0.0]
    expected = tree_opo(**completions(nodes, parents, rewards))
    relabel = {name: 50 + i for i, name in enumerate(["Q", "a", "b", "a1", "a2"])}
    ints = completions(
        torch.tensor([relabel[v] for v in nodes]), torch.tensor([relabel[v] for v in parents]), rewards
    )
    assert torch.equal(tree_opo(**ints), expected)
    for order in ([5, 4, 3, 2, 1, 0], [3, 0, 5, 1, 4, 2]):
        permuted = completions([nodes[i] for i in order], [parents[i] for i in order], [rewards[i] for i in order])
        assert torch.equal(tree_opo(**permuted), expected[order])


def test_tree_opo_errors():
    with pytest.raises(ValueError, match="baseline"):
        canonrl.advantages("tree_opo", baseline="mean", **completions(["P"], [None], [1.0]))
    fields = completions(["P", "P"], [None, None], [1.0, 0.0])
    fields["turn_ids"] = torch.tensor([[0, 0], [0, 1]])
    with pytest.raises(ValueError, match=r"one step .* at rows \[1\]"):
        canonrl.advantages("tree_opo", **fields)


# --- ARPO: one row per branched trajectory, one token per segment ------------------------------------------------


def arpo(attribution="soft", **fields):
    return canonrl.advantages("arpo", attribution=attribution, **fields)


#: Branching at P:   R -> P -> e0 (1)
#:                        P -> e1 (0)
#:                   R -> e2 (1)
#: GRPO: mean 2/3, unbiased std sqrt(((1/3)^2 * 2 + (2/3)^2) / 2) = sqrt(1/3); A = [1/3, -2/3, 1/3] / (s + 1e-6).
SHARED = ([["P", "e0"], ["P", "e1"], ["e2"]], [["R", "P"], ["R", "P"], ["R"]], [1.0, 0.0, 1.0])


def test_arpo_soft_and_hard_by_hand():
    s = math.sqrt(1 / 3) + 1e-6
    a = [1 / 3 / s, -2 / 3 / s, 1 / 3 / s]
    fields = segment_rows(*SHARED)
    assert arpo(**fields) == pytest.approx(torch.tensor([[a[0], a[0]], [a[1], a[1]], [a[2], 0.0]]), abs=1e-6)
    shared = (a[0] + a[1]) / 2  # both copies of P get the mean of the branches through P
    expected = torch.tensor([[shared, a[0]], [shared, a[1]], [a[2], 0.0]])
    assert arpo("hard", **fields) == pytest.approx(expected, abs=1e-6)


def test_arpo_unequal_branching_hard_by_hand():
    """R -> a -> {a1 (1), a2 (0), a3 (0)}, R -> b -> b1 (1): GRPO over 4 trajectories, mean 1/2, unbiased std
    sqrt(1/3); A = +-(1/2) / (s + eps). a's copies get (1/2 - 1/2 - 1/2) / 3 / (s + eps), b's keeps b1's."""
    s = math.sqrt(1 / 3) + 1e-6
    fields = segment_rows(
        [["a", "a1"], ["a", "a2"], ["a", "a3"], ["b", "b1"]], [["R", "a"]] * 3 + [["R", "b"]], [1.0, 0.0, 0.0, 1.0]
    )
    a = [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s]
    mean_a = sum(a[:3]) / 3
    expected = torch.tensor([[mean_a, a[0]], [mean_a, a[1]], [mean_a, a[2]], [a[3], a[3]]])
    assert arpo("hard", **fields) == pytest.approx(expected, abs=1e-6)


def test_arpo_single_trajectory_chain_and_no_branching_is_grpo():
    """A lone trajectory R -> x -> y gets 0; trajectories without shared segments get plain GRPO in both modes."""
    chain = segment_rows([["x", "y", "z"]], [["R", "x", "y"]], [1.0])
    for attribution in ("soft", "hard"):
        assert arpo(attribution, **chain).tolist() == [[0.0, 0.0, 0.0]]
    fields = segment_rows([["u"], ["v"], ["w"]], [[None]] * 3, [1.0, 0.0, 0.5])
    grpo = canonrl.advantages("grpo", rewards=torch.tensor([1.0, 0.0, 0.5]), group=[0] * 3, mask=torch.ones(3, 1))
    for attribution in ("soft", "hard"):
        assert torch.equal(arpo(attribution, **fields), grpo)


def test_arpo_all_equal_rewards_give_exactly_zero():
    nodes, parents, _ = SHARED
    for attribution in ("soft", "hard"):
        assert (arpo(attribution, **segment_rows(nodes, parents, [0.95**3] * 3)) == 0).all()


def test_arpo_relabelling_and_row_permutation():
    nodes = [["a", "a1"], ["a", "a2"], ["a", "a3"], ["b", "b1"], ["c"]]
    parents = [["R", "a"]] * 3 + [["R", "b"], ["R"]]
    rewards = [1.0, 0.0, 0.0, 1.0, 0.0]
    for attribution in ("soft", "hard"):
        expected = arpo(attribution, **segment_rows(nodes, parents, rewards))
        relabel = {name: (3, name) for row in nodes + parents for name in row}
        relabelled = segment_rows(
            [[relabel[v] for v in row] for row in nodes], [[relabel[v] for v in row] for row in parents], rewards
        )
        assert torch.equal(arpo(attribution, **relabelled), expected)
        for order in ([4, 3, 2, 1, 0], [2, 4, 0, 3, 1]):
            permuted = segment_rows([nodes[i] for i in order], [parents[i] for i in order], [rewards[i] for i in order])
            assert torch.equal(arpo(attribution, **permuted), expected[order])


def test_arpo_errors():
    with pytest.raises(ValueError, match="attribution"):
        arpo("mean", **segment_rows(*SHARED))
    with pytest.raises(ValueError, match="needs .node."):
        canonrl.advantages("arpo", rewards=torch.ones(1), group=[0], mask=torch.ones(1, 1))


@pytest.mark.parametrize("name", ["arpo", "fspo"])
def test_a_row_without_steps_takes_no_part(name):
    """A fully masked row whose turn_ids are all -1 (a lab ghost row) is a trajectory without a step: it gets 0 and
    leaves the others' advantages as they are without it."""
    batch = segment_rows([["a", "b"], ["a", "c"], ["d"]], [[None, "a"], [None, "a"], [None]], [1.0, 0.0, 1.0])
    extra = {"step_labels": [[1, 1], [1, -1], [1]]} if name == "fspo" else {}
    without = canonrl.advantages(name, **batch, **extra)
    ghost = dict(batch)
    ghost["rewards"] = torch.tensor([1.0, 0.0, 1.0, 1.0])
    ghost["group"] = [0, 0, 0, 0]
    ghost["turn_ids"] = torch.cat([batch["turn_ids"], torch.full((1, 2), -1)])
    ghost["mask"] = (ghost["turn_ids"] >= 0).float()
    ghost["node"] = batch["node"] + [[]]
    ghost["parent"] = batch["parent"] + [[]]
    if name == "fspo":
        extra = {"step_labels": extra["step_labels"] + [[]]}
    with_ghost = canonrl.advantages(name, **ghost, **extra)
    assert torch.equal(with_ghost[:3], without) and (with_ghost[3] == 0).all()
