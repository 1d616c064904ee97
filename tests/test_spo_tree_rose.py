"""SPO-tree (row per edge) and ROSE (row per response, one step per segment) on small hand-computed trees."""

from __future__ import annotations

import math

import pytest
import torch

import canonrl
from conftest import segment_rows

#: Unequal branching, used by both estimators:
#:
#:            R
#:        /   |   \
#:       a    b    c(0)
#:     / | \   \
#:  a1(1) a2(0) a3(0)  b1(1)
#:
#: recursive means (SPO-tree): V(a) = 1/3, V(b) = 1, V(c) = 0, V(R) = (1/3 + 1 + 0) / 3 = 4/9;
#: leaf means (ROSE): V(a) = 1/3, V(b) = 1, V(R) = (1 + 0 + 0 + 1 + 0) / 5 = 2/5.
UNEQUAL_NODES = ["a", "b", "c", "a1", "a2", "a3", "b1"]
UNEQUAL_PARENTS = ["R", "R", "R", "a", "a", "a", "b"]
UNEQUAL_REWARDS = [7.0, 7.0, 0.0, 1.0, 0.0, 0.0, 1.0]  # inner edges' rewards (7) are ignored


def edges(nodes, parents, rewards, group=None, mask=None):
    """A row-per-edge batch: one edge per row, two tokens each."""
    n = len(nodes)
    return dict(
        rewards=torch.tensor(rewards),
        group=group or [0] * n,
        node=nodes,
        parent=parents,
        mask=torch.ones(n, 2) if mask is None else mask,
    )


def spo(mode="rloo", **fields):
    out = canonrl.advantages("spo_tree", mode=mode, **fields)
    assert (out[:, 0] == out[:, 1]).all()
    return out[:, 0]


def test_spo_tree_two_levels_by_hand():
    """R -> {a, b(0)}, a -> {a1(1), a2(0)}: V(a) = 0.5, V(R) = 0.25."""
    fields = edges(["a", "b", "a1", "a2"], ["R", "R", "a", "a"], [9.0, 0.0, 1.0, 0.0])
    assert spo(**fields).tolist() == pytest.approx([0.25, -0.25, 0.5, -0.5])
    # grpo: std(R's children {0.5, 0}) = 0.25, std(a's children {1, 0}) = 0.5
    assert spo("grpo", **fields).tolist() == pytest.approx([1.0, -1.0, 1.0, -1.0])


def test_spo_tree_unequal_branching_by_hand():
    fields = edges(UNEQUAL_NODES, UNEQUAL_PARENTS, UNEQUAL_REWARDS)
    rloo = [1 / 3 - 4 / 9, 1 - 4 / 9, -4 / 9, 2 / 3, -1 / 3, -1 / 3, 0.0]
    assert spo(**fields).tolist() == pytest.approx(rloo, abs=1e-6)
    std_root, std_a = math.sqrt(42 / 243), math.sqrt(2 / 9)  # b has one child: std 0 and A = 0 / eps = 0
    grpo = [a / std_root for a in rloo[:3]] + [a / std_a for a in rloo[3:6]] + [0.0]
    assert spo("grpo", **fields).tolist() == pytest.approx(grpo, rel=1e-5)


def test_spo_tree_single_edge_and_chain_give_zero():
    """R -> a(5): V(R) = V(a). R -> x -> y -> z(1): every node has value 1."""
    for mode in ("rloo", "grpo"):
        assert spo(mode, **edges(["a"], ["R"], [5.0])).tolist() == [0.0]
        assert spo(mode, **edges(["x", "y", "z"], ["R", "x", "y"], [0.0, 0.0, 1.0])).tolist() == [0.0] * 3


def test_spo_tree_all_equal_leaves_give_exactly_zero():
    reward = 0.95**3
    fields = edges(UNEQUAL_NODES, UNEQUAL_PARENTS, [reward] * 7)
    for mode in ("rloo", "grpo"):
        assert (spo(mode, **fields) == 0).all()


def test_spo_tree_two_trees_repeated_edge_and_empty_mask():
    """Tree 1 (group 0): R -> {a(1), b(0)}; tree 2 (group 1): Q -> {c(1), d(1)}. The edge R -> a appears twice (one
    node, both copies get its advantage); the row of b has no mask token: 0, but its leaf still counts in V(R)."""
    mask = torch.ones(5, 2)
    mask[1] = 0
    fields = edges(
        ["a", "b", "c", "d", "a"],
        ["R", "R", "Q", "Q", "R"],
        [1.0, 0.0, 1.0, 1.0, 1.0],
        group=[0, 0, 1, 1, 0],
        mask=mask,
    )
    assert spo(**fields).tolist() == [0.5, 0.0, 0.0, 0.0, 0.5]


def test_spo_tree_relabelling_and_row_permutation():
    fields = edges(UNEQUAL_NODES, UNEQUAL_PARENTS, UNEQUAL_REWARDS)
    expected = spo("grpo", **fields)
    relabel = {name: 100 + i for i, name in enumerate(["R", *UNEQUAL_NODES])}
    ints = edges(
        torch.tensor([relabel[v] for v in UNEQUAL_NODES]),
        torch.tensor([relabel[v] for v in UNEQUAL_PARENTS]),
        UNEQUAL_REWARDS,
    )
    assert torch.equal(spo("grpo", **ints), expected)
    for order in ([6, 5, 4, 3, 2, 1, 0], [3, 0, 6, 1, 5, 2, 4]):
        permuted = edges(
            [UNEQUAL_NODES[i] for i in order], [UNEQUAL_PARENTS[i] for i in order], [UNEQUAL_REWARDS[i] for i in order]
        )
        assert torch.equal(spo("grpo", **permuted), expected[order])


def test_spo_tree_errors():
    with pytest.raises(ValueError, match=r"rows reaching one leaf node carry different rewards at rows \[0, 1\]"):
        canonrl.advantages("spo_tree", **edges(["a", "a"], ["R", "R"], [1.0, 0.0]))
    with pytest.raises(ValueError, match="mode"):
        canonrl.advantages("spo_tree", mode="std", **edges(["a"], ["R"], [1.0]))
    with pytest.raises(ValueError, match="needs .node."):
        canonrl.advantages("spo_tree", rewards=torch.ones(1), group=[0], mask=torch.ones(1, 1))


# --- ROSE: one row per response, one token per segment ----------------------------------------------------------


def rose(**fields):
    return canonrl.advantages("rose", **fields)


#: The unequal tree above, one response per leaf: a1, a2, a3 share the prefix a, b1 goes through b, c is direct.
UNEQUAL_RESPONSES = (
    [["a", "a1"], ["a", "a2"], ["a", "a3"], ["b", "b1"], ["c"]],
    [["R", "a"], ["R", "a"], ["R", "a"], ["R", "b"], ["R"]],
    [1.0, 0.0, 0.0, 1.0, 0.0],
)


def test_rose_shared_prefix_by_hand():
    """Responses 0, 1 share the prefix P (rewards 1, 0); response 2 ends without branching (reward 1):

        R -> P -> e0(1)
             P -> e1(0)
        R -> e2(1)

    V(P) = 1/2, V(R) = 2/3. The root given as an id or as None (the group's mean) is the same."""
    expected = torch.tensor([[0.5 - 2 / 3, 0.5], [0.5 - 2 / 3, -0.5], [1 / 3, 0.0]])
    named = segment_rows([["P", "e0"], ["P", "e1"], ["e2"]], [["R", "P"], ["R", "P"], ["R"]], [1.0, 0.0, 1.0])
    none = segment_rows([["P", "e0"], ["P", "e1"], ["e2"]], [[None, "P"], [None, "P"], [None]], [1.0, 0.0, 1.0])
    assert rose(**named) == pytest.approx(expected, abs=1e-6)
    assert torch.equal(rose(**none), rose(**named))


def test_rose_unequal_branching_is_a_mean_over_leaves():
    """V(R) = 2/5 (leaves), not SPO-tree's 4/9; V(a) = 1/3, V(b) = 1."""
    out = rose(**segment_rows(*UNEQUAL_RESPONSES))
    expected = [[1 / 3 - 2 / 5, 2 / 3], [1 / 3 - 2 / 5, -1 / 3], [1 / 3 - 2 / 5, -1 / 3], [3 / 5, 0.0], [-2 / 5, 0.0]]
    assert out == pytest.approx(torch.tensor(expected), abs=1e-6)


def test_rose_without_branching_is_group_centring_and_single_response_gives_zero():
    """Two prompts, no branch points: A = r - mean of the group. A lone response (group 1) gets 0, and so does a
    chain R -> x -> y -> end."""
    fields = segment_rows([["u"], ["v"], ["w"], ["s"]], [[None]] * 4, [1.0, 0.0, 0.0, 0.5], group=[0, 0, 0, 1])
    assert rose(**fields)[:, 0].tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0.0])
    chain = segment_rows([["x", "y", "end"]], [["R", "x", "y"]], [1.0])
    assert rose(**chain).tolist() == [[0.0, 0.0, 0.0]]


def test_rose_all_equal_rewards_give_exactly_zero():
    nodes, parents, _ = UNEQUAL_RESPONSES
    assert (rose(**segment_rows(nodes, parents, [0.95**3] * 5)) == 0).all()


def test_rose_relabelling_and_row_permutation():
    fields = segment_rows(*UNEQUAL_RESPONSES)
    expected = rose(**fields)
    nodes, parents, rewards = UNEQUAL_RESPONSES
    relabel = {name: (7, name) for row in nodes + parents for name in row}  # tuples are whole ids
    relabelled = segment_rows(
        [[relabel[v] for v in row] for row in nodes], [[relabel[v] for v in row] for row in parents], rewards
    )
    assert torch.equal(rose(**relabelled), expected)
    for order in ([4, 3, 2, 1, 0], [2, 4, 0, 3, 1]):
        permuted = segment_rows([nodes[i] for i in order], [parents[i] for i in order], [rewards[i] for i in order])
        assert torch.equal(rose(**permuted), expected[order])


def test_rose_response_ending_at_a_branch_point_is_an_error():
    """Response 1 stops at P, which response 0 continues: its reward would not be one leaf below P."""
    fields = segment_rows([["P", "e0"], ["P"]], [["R", "P"], ["R"]], [1.0, 0.0])
    with pytest.raises(ValueError, match=r"last segment must reach a leaf node .* at rows \[1\]"):
        rose(**fields)
