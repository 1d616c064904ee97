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


# --- ROSE's options: the official position keying and length penalty ---------------------------------------------


def test_rose_position_keying_averages_prefixes_branching_at_one_position():
    """A -> {a(1), a2(1)} and C -> {c(0), c2(0)}, A and C both one token long, so both branch at position 1.

    prefix: V(A) = 1, V(C) = 0, V(root) = 1/2:  A-rows [1/2, 0], C-rows [-1/2, 0]
    position: V(1) = mean of all four = 1/2 = V(root):  A-rows [0, 1/2], C-rows [0, -1/2]"""
    fields = segment_rows(
        [["A", "a"], ["A", "a2"], ["C", "c"], ["C", "c2"]], [["R", "A"]] * 2 + [["R", "C"]] * 2, [1.0, 1.0, 0.0, 0.0]
    )
    assert rose(**fields).tolist() == [[0.5, 0.0], [0.5, 0.0], [-0.5, 0.0], [-0.5, 0.0]]
    assert rose(keying="position", **fields).tolist() == [[0.0, 0.5], [0.0, 0.5], [0.0, -0.5], [0.0, -0.5]]
    # positions count from the row's first segment: leading tokens outside every segment do not shift them
    shifted = torch.tensor([[-1, 0, 1, -1], [0, 1, -1, -1], [-1, -1, 0, 1], [0, 1, -1, -1]])
    moved = rose(keying="position", **{**fields, "turn_ids": shifted, "mask": (shifted >= 0).float()})
    assert moved[shifted >= 0].tolist() == [0.0, 0.5, 0.0, 0.5, 0.0, -0.5, 0.0, -0.5]
    # UNEQUAL_RESPONSES has the same collision (a and b at position 1); the shared-prefix tree has none
    nodes, parents, rewards = UNEQUAL_RESPONSES
    unequal = segment_rows(nodes, parents, rewards)
    assert not torch.allclose(rose(keying="position", **unequal), rose(**unequal))
    shared = segment_rows([["P", "e0"], ["P", "e1"], ["e2"]], [["R", "P"], ["R", "P"], ["R"]], [1.0, 0.0, 1.0])
    assert rose(keying="position", **shared) == pytest.approx(rose(**shared), abs=1e-6)


def penalty_rows(order):
    """One prompt, rows in ``order`` of: s1 (reward 1, 3 tokens from the root), s2 (1: the 2-token prefix P, then 1
    token), b (0.5: P, then 4 tokens), w (0: 4 tokens from the root). V(root) = 2.5/4 = 0.625, V(P) = 0.75."""
    rows = {
        "s1": ([0, 0, 0, -1, -1, -1], ["s1"], ["R"], 1.0),
        "s2": ([0, 0, 1, -1, -1, -1], ["P", "s2"], ["R", "P"], 1.0),
        "b": ([0, 0, 1, 1, 1, 1], ["P", "b"], ["R", "P"], 0.5),
        "w": ([0, 0, 0, 0, -1, -1], ["w"], ["R"], 0.0),
    }
    turn_ids = torch.tensor([rows[name][0] for name in order])
    return dict(
        rewards=torch.tensor([rows[name][3] for name in order]),
        group=[0] * len(order),
        node=[rows[name][1] for name in order],
        parent=[rows[name][2] for name in order],
        turn_ids=turn_ids,
        mask=(turn_ids >= 0).float(),
    )


def segments(out, turn_ids):
    """The value of each segment of each row (its first token's), row after row."""
    return [out[b][row.tolist().index(t)].item() for b, row in enumerate(turn_ids) for t in range(int(row.max()) + 1)]


@pytest.mark.parametrize("keying", ["prefix", "position"])
def test_rose_length_penalty_by_hand(keying):
    """Without the penalty: s1 [0.375], s2 [0.125, 0.25], b [0.125, -0.25], w [-0.625].

    s1 and s2 are the shortest correct responses (3 tokens); the first row of the two is "the shortest":
    - s1 first: b shares only the root with it: pen = 1 - (3/6)^lambda on all of b;
    - s2 first: b shares P (2 tokens): pen = 1 - (1/4)^lambda on b's segment after P only.
    A <- A - |A| pen. The other tied response gets pen = 1 - 1 = 0, w is not correct."""
    plain = {"s1": [0.375], "s2": [0.125, 0.25], "b": [0.125, -0.25], "w": [-0.625]}
    for order, lam, b_expected in [
        (["s1", "s2", "b", "w"], 1.0, [0.125 - 0.125 * 0.5, -0.25 - 0.25 * 0.5]),
        (["s2", "s1", "b", "w"], 1.0, [0.125, -0.25 - 0.25 * 0.75]),
        (["s2", "s1", "w", "b"], 2.0, [0.125, -0.25 - 0.25 * 15 / 16]),
    ]:
        fields = penalty_rows(order)
        expected = [v for name in order for v in (b_expected if name == "b" else plain[name])]
        out = rose(keying=keying, length_penalty=lam, **fields)
        assert segments(out, fields["turn_ids"]) == pytest.approx(expected, abs=1e-6)
        assert segments(rose(keying=keying, **fields), fields["turn_ids"]) == pytest.approx(
            [v for name in order for v in plain[name]], abs=1e-6
        )
    # a lone correct response is not penalised; equal rewards stay exactly 0
    fields = penalty_rows(["s1", "s2", "b", "w"])
    fields["rewards"] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert torch.equal(rose(keying=keying, length_penalty=1.0, **fields), rose(keying=keying, **fields))
    fields["rewards"] = torch.full((4,), 0.7)
    assert (rose(keying=keying, length_penalty=1.0, **fields) == 0).all()


def test_rose_option_errors():
    fields = segment_rows([["P", "e0"], ["P", "e1"]], [["R", "P"], ["R", "P"]], [1.0, 0.0])
    with pytest.raises(ValueError, match="keying must be one of"):
        rose(keying="token", **fields)
    with pytest.raises(ValueError, match="length_penalty must lie in"):
        rose(length_penalty=-0.5, **fields)
    # row per step: a response's segments are rows of their own, so there are no positions within one row
    steps = dict(
        rewards=torch.tensor([0.0, 1.0, 0.0]),
        group=[0, 0, 0],
        mask=torch.ones(3, 2),
        traj=[0, 0, 1],
        step_index=torch.tensor([0, 1, 0]),
        node=["P", "e0", "e1"],
        parent=["R", "P", "R"],
    )
    assert rose(**steps).shape == (3, 2)
    # one row per response and no turn_ids: one segment each, GRPO's centring under either keying
    whole = dict(rewards=torch.tensor([1.0, 0.0]), group=[0, 0], mask=torch.ones(2, 2), node=["u", "v"], parent=[None] * 2)
    assert rose(keying="position", **whole).tolist() == [[0.5, 0.5], [-0.5, -0.5]]
    with pytest.raises(ValueError, match=r"keying='position' needs each response in one row .* at rows \[0, 1\]"):
        rose(keying="position", **steps)
