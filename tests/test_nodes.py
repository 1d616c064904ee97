"""The node table on a hand-built tree: depths, leaves, recursive values, leaf means, children's std; the errors."""

from __future__ import annotations

import pytest
import torch

from canonrl.batch import make_batch

#: row per edge: R -> a, R -> b, a -> a1, a -> a2 (R is no row's node: a root); leaves b, a1, a2 with rewards 0, 1, 0
EDGES = dict(rewards=torch.tensor([9.0, 0.0, 1.0, 0.0]), group=[0] * 4, mask=torch.ones(4, 2),
             node=["a", "b", "a1", "a2"], parent=["R", "R", "a", "a"])


def node_values(batch, per_node):
    """The value of each row's node."""
    nodes = batch.nodes
    return per_node[nodes.step_node[batch.steps.occ_step]].tolist()


def test_tree_structure_and_values_by_hand():
    batch = make_batch(**EDGES)
    nodes = batch.nodes
    assert nodes.num_nodes == 5
    rows_depth = nodes.depth[nodes.step_node].tolist()
    assert rows_depth == [1, 1, 2, 2] and nodes.max_depth == 2
    leaf_of_row = nodes.is_leaf[nodes.step_node].tolist()
    assert leaf_of_row == [False, True, True, True]
    leaf_values = torch.zeros(nodes.num_nodes).index_put_((nodes.step_node,), batch.rewards)
    # V(a) = mean(1, 0) = 0.5; V(R) = mean(V(a), V(b)) = 0.25
    recursive = nodes.value_from_children(leaf_values)
    assert node_values(batch, recursive) == pytest.approx([0.5, 0.0, 1.0, 0.0])
    assert recursive[nodes.step_parent[0]].item() == pytest.approx(0.25)
    # leaves below: a -> {1, 0} = 0.5; R -> {0, 1, 0} = 1/3
    below = nodes.mean_of_leaves(leaf_values)
    assert below[nodes.step_parent[0]].item() == pytest.approx(1 / 3)
    assert node_values(batch, below)[0] == pytest.approx(0.5)
    # population std of children: R over {V(a) = 0.5, V(b) = 0} = 0.25; a over {1, 0} = 0.5
    spread = nodes.children_std(recursive)
    assert spread[nodes.step_parent[0]].item() == pytest.approx(0.25)
    assert spread[nodes.step_node[0]].item() == pytest.approx(0.5)


def test_integer_ids_and_roots_given_as_minus_one():
    batch = make_batch(rewards=torch.zeros(3), group=[0] * 3, mask=torch.ones(3, 1), node=torch.tensor([10, 11, 12]),
                       parent=torch.tensor([-1, 10, 11]))
    assert batch.nodes.depth[batch.nodes.step_node].tolist() == [0, 1, 2]


def test_a_node_with_two_parents_and_a_cycle_are_errors():
    with pytest.raises(ValueError, match=r"node/parent: a node has two parents .* at rows \[1, 2\]"):
        make_batch(rewards=torch.zeros(3), group=[0] * 3, mask=torch.ones(3, 1), node=["a", "b", "b"],
                   parent=["R", "a", "R"], traj=[0, 1, 2]).nodes
    with pytest.raises(ValueError, match="the tree has a cycle"):
        make_batch(rewards=torch.zeros(2), group=[0] * 2, mask=torch.ones(2, 1), node=["a", "b"], parent=["b", "a"]).nodes
    with pytest.raises(ValueError, match="a tree needs node and parent"):
        make_batch(rewards=torch.zeros(1), group=[0], mask=torch.ones(1, 1)).nodes


def test_deep_chain_depths_by_pointer_jumping():
    n = 300
    batch = make_batch(rewards=torch.zeros(n), group=[0] * n, mask=torch.ones(n, 1), node=list(range(1, n + 1)),
                       parent=list(range(n)))
    assert batch.nodes.depth[batch.nodes.step_node].tolist() == list(range(1, n + 1))
