"""AttnRL's tree advantage ("attnrl": row per root -> leaf path, one step per segment) on small hand-computed trees.

A(node) = (V(node) - V(root) + V(node) - V(parent)) / sqrt(n(node)), V = mean leaf reward below, n = leaves below.
"""

from __future__ import annotations

import math

import pytest
import torch

import canonrl
from canonrl.methods.attnrl import keep_rows
from conftest import segment_rows


def attnrl(**fields):
    return canonrl.advantages("attnrl", **fields)


#: The spec's test vector (token-level.md B9): R1 (reward 1) branched once at s into B (reward 0); R2 (reward 0)
#: never branched.
#:
#:            root
#:          /      \
#:      R1[:s]      R2(0)
#:      /    \
#:  R1[s:](1)  B(0)
#:
#: V(root) = 1/3 (leaves R1[s:], B, R2), V(R1[:s]) = 1/2 with n = 2.
SPEC_TREE = ([["p", "p1"], ["p", "b"], ["r2"]], [[None, "p"], [None, "p"], [None]], [1.0, 0.0, 0.0])


def test_spec_test_vector():
    """adv(R1[:s]) = (1/6 + 1/6)/sqrt(2) = 0.2357, adv(R1[s:]) = 2/3 + 1/2 = 1.1667, adv(B) = -1/3 - 1/2 = -0.8333;
    R2 is dropped (a path of length 1): 0 here, and its row is not kept."""
    fields = segment_rows(*SPEC_TREE)
    out = attnrl(**fields)
    shared = (1 / 6 + 1 / 6) / math.sqrt(2)
    expected = torch.tensor([[shared, 2 / 3 + 1 / 2], [shared, -1 / 3 - 1 / 2], [0.0, 0.0]])
    assert out == pytest.approx(expected, abs=1e-6)
    assert out[0, 0].item() == pytest.approx(0.2357, abs=1e-4)
    assert out[0, 1].item() == pytest.approx(1.1667, abs=1e-4)
    assert out[1, 1].item() == pytest.approx(-0.8333, abs=1e-4)
    assert keep_rows(**fields).tolist() == [True, True, False]
    # kept: R2 is a leaf under the root, adv = 2 (0 - 1/3) / sqrt(1); the other rows do not change
    kept = canonrl.advantages("attnrl", drop_unbranched=False, **fields)
    assert kept[2, 0].item() == pytest.approx(-2 / 3, abs=1e-6)
    assert torch.equal(kept[:2], out[:2])


def test_the_root_as_an_explicit_id_is_the_same_as_none():
    nodes, _, rewards = SPEC_TREE
    named = segment_rows(nodes, [["ROOT", "p"], ["ROOT", "p"], ["ROOT"]], rewards)
    for drop in (True, False):
        assert torch.equal(
            canonrl.advantages("attnrl", drop_unbranched=drop, **named),
            canonrl.advantages("attnrl", drop_unbranched=drop, **segment_rows(*SPEC_TREE)),
        )
    assert keep_rows(**named).tolist() == [True, True, False]


#: Unequal branching, one path per leaf:
#:
#:               root
#:           /    |    \
#:          a     b     c(0)
#:       /  |  \    \
#:   a1(1) a2(0) a3(0) b1(1)
#:
#: V(root) = 2/5 (five leaves), V(a) = 1/3 (n = 3), V(b) = 1 (n = 1); c is an unbranched path.
UNEQUAL = (
    [["a", "a1"], ["a", "a2"], ["a", "a3"], ["b", "b1"], ["c"]],
    [[None, "a"], [None, "a"], [None, "a"], [None, "b"], [None]],
    [1.0, 0.0, 0.0, 1.0, 0.0],
)


def test_unequal_branching_by_hand():
    """adv(a) = 2 (1/3 - 2/5)/sqrt(3); adv(a1) = 3/5 + 2/3; adv(a2) = adv(a3) = -2/5 - 1/3; adv(b) = 2 (3/5)/1;
    adv(b1) = 3/5 + 0; c: dropped (0), or 2 (0 - 2/5) = -4/5 when kept."""
    shared = 2 * (1 / 3 - 2 / 5) / math.sqrt(3)
    expected = [
        [shared, 3 / 5 + 2 / 3],
        [shared, -2 / 5 - 1 / 3],
        [shared, -2 / 5 - 1 / 3],
        [6 / 5, 3 / 5],
        [0.0, 0.0],
    ]
    fields = segment_rows(*UNEQUAL)
    assert attnrl(**fields) == pytest.approx(torch.tensor(expected), abs=1e-6)
    expected[4][0] = -4 / 5
    assert canonrl.advantages("attnrl", drop_unbranched=False, **fields) == pytest.approx(
        torch.tensor(expected), abs=1e-6
    )
    assert keep_rows(**fields).tolist() == [True, True, True, True, False]


def test_single_node_tree_and_chain_give_zero():
    """root -> s(5): V(root) = 5 = V(s). root -> x -> y -> z(1): every node has value 1."""
    single = segment_rows([["s"]], [[None]], [5.0])
    chain = segment_rows([["x", "y", "z"]], [[None, "x", "y"]], [1.0])
    for drop in (True, False):
        assert canonrl.advantages("attnrl", drop_unbranched=drop, **single).tolist() == [[0.0]]
        assert canonrl.advantages("attnrl", drop_unbranched=drop, **chain).tolist() == [[0.0, 0.0, 0.0]]


def test_all_equal_rewards_give_exactly_zero():
    nodes, parents, _ = UNEQUAL
    for drop in (True, False):
        out = canonrl.advantages("attnrl", drop_unbranched=drop, **segment_rows(nodes, parents, [0.95**3] * 5))
        assert (out == 0).all()


def test_two_prompts_have_their_own_roots():
    """Group 0 is the spec tree; group 1: root -> q -> {q1(1), q2(1)} plus an unbranched u(0): V(root) = 2/3,
    V(q) = 1 (n = 2). Group 0's advantages are the same as alone."""
    nodes, parents, rewards = SPEC_TREE
    fields = segment_rows(
        nodes + [["q", "q1"], ["q", "q2"], ["u"]],
        parents + [[None, "q"], [None, "q"], [None]],
        rewards + [1.0, 1.0, 0.0],
        group=[0, 0, 0, 1, 1, 1],
    )
    out = attnrl(**fields)
    assert torch.equal(out[:3], attnrl(**segment_rows(*SPEC_TREE)))
    shared = 2 * (1 - 2 / 3) / math.sqrt(2)
    assert out[3:] == pytest.approx(torch.tensor([[shared, 1 / 3], [shared, 1 / 3], [0.0, 0.0]]), abs=1e-6)


def test_relabelling_and_row_permutation():
    fields = segment_rows(*UNEQUAL)
    expected = attnrl(**fields)
    nodes, parents, rewards = UNEQUAL
    relabel = {name: (3, name) for row in nodes + parents for name in row if name is not None}
    relabelled = segment_rows(
        [[relabel[v] for v in row] for row in nodes],
        [[None if v is None else relabel[v] for v in row] for row in parents],
        rewards,
    )
    assert torch.equal(attnrl(**relabelled), expected)
    for order in ([4, 3, 2, 1, 0], [2, 4, 0, 3, 1]):
        permuted = segment_rows([nodes[i] for i in order], [parents[i] for i in order], [rewards[i] for i in order])
        assert torch.equal(attnrl(**permuted), expected[order])
        assert keep_rows(**permuted).tolist() == [i != 4 for i in order]


def test_row_per_step_layout_gives_the_same_segments():
    """The spec tree with one row per segment (traj, step_index): inner segments' rewards are not read."""
    steps = dict(
        rewards=torch.tensor([9.0, 1.0, 9.0, 0.0, 0.0]),
        group=[0] * 5,
        mask=torch.ones(5, 2),
        traj=[0, 0, 1, 1, 2],
        step_index=torch.tensor([0, 1, 0, 1, 0]),
        node=["p", "p1", "p", "b", "r2"],
        parent=[None, "p", None, "p", None],
    )
    out = attnrl(**steps)
    paths = attnrl(**segment_rows(*SPEC_TREE))
    assert torch.equal(out[:, 0], torch.stack([paths[0, 0], paths[0, 1], paths[1, 0], paths[1, 1], paths[2, 0]]))
    assert keep_rows(**steps).tolist() == [True, True, True, True, False]


def test_a_segment_without_mask_tokens_gets_zero_but_its_leaf_counts():
    fields = segment_rows(*SPEC_TREE)
    fields["mask"][1, 1] = 0  # B has no mask token: still a leaf with reward 0
    out = attnrl(**fields)
    assert out[1, 1].item() == 0.0
    assert out[0].tolist() == pytest.approx([(1 / 6 + 1 / 6) / math.sqrt(2), 2 / 3 + 1 / 2], abs=1e-6)


def test_errors_name_the_rows():
    # path 1 stops at p, which path 0 continues: its reward would not be one leaf below p
    with pytest.raises(ValueError, match=r"attnrl: a path's last segment must reach a leaf node .* at rows \[1\]"):
        attnrl(**segment_rows([["p", "e0"], ["p"]], [[None, "p"], [None]], [1.0, 0.0]))
    # two rows reach the leaf e with different rewards
    with pytest.raises(ValueError, match=r"attnrl: rows reaching one leaf node carry different rewards at rows"):
        attnrl(**segment_rows([["p", "e"], ["p", "e"]], [[None, "p"], [None, "p"]], [1.0, 0.0]))
    with pytest.raises(ValueError, match="a node has two parents"):
        attnrl(**segment_rows([["p", "e"], ["q", "e"]], [[None, "p"], [None, "q"]], [1.0, 1.0]))
    with pytest.raises(ValueError, match="estimator 'attnrl' needs 'node'"):
        canonrl.advantages("attnrl", rewards=torch.ones(2), group=[0, 0], mask=torch.ones(2, 1))
    with pytest.raises(ValueError, match="drop_unbranched must be a bool"):
        canonrl.get_estimator("attnrl", drop_unbranched="yes")
    with pytest.raises(ValueError, match=r"rewards has NaN at rows \[1\]"):
        attnrl(**segment_rows(*SPEC_TREE[:2], [1.0, float("nan"), 0.0]))


def test_registry_facts():
    info = next(i for i in canonrl.estimators() if i.name == "attnrl")
    assert info.level == "step" and info.requires == ("node", "parent") and info.verified
    assert info.producer is None and info.group_local and "row-per-trajectory" in info.layouts
    assert info.paper is not None and info.paper.arxiv == "2509.26628"
    assert [h.name for h in info.hyperparameters] == ["drop_unbranched"]
