"""tree_from_branches: row-per-leaf rollouts (parent row, branch position) to turn_ids / node / parent."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

import canonrl
from canonrl.branches import tree_from_branches
from conftest import branched_rollouts


def test_one_branch_by_hand():
    """R0 = a b c d (r = 1), R1 = e f g (r = 0), R2 = a b | x y, branched from R0 after 2 tokens (r = 0).

    R0 and R2 are cut after "a b" (a prefix both carry: node 2 = row 0's token 1, prefix length 2); R1 never
    branches. ROSE then gives V("a b") = 1/2 against the group mean 1/3."""
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]]).float()
    tree = tree_from_branches(torch.tensor([-1, -1, 0]), torch.tensor([0, 0, 2]), mask)
    assert tree["turn_ids"].tolist() == [[0, 0, 1, 1], [0, 0, 0, -1], [0, 0, 1, 1]]
    assert tree["node"].tolist() == [[2, 4], [8, -1], [2, 14]]  # prefix id = owner row * (T + 1) + length
    assert tree["parent"].tolist() == [[-1, 2], [-1, -1], [-1, 2]]
    rose = canonrl.advantages("rose", rewards=torch.tensor([1.0, 0.0, 0.0]), group=[0, 0, 0], mask=mask, **tree)
    third, sixth = 1 / 3, 1 / 6
    expected = [[sixth, sixth, 0.5, 0.5], [-third, -third, -third, 0.0], [sixth, sixth, -0.5, -0.5]]
    torch.testing.assert_close(rose, torch.tensor(expected))


def test_branch_of_a_branch_inside_the_copied_prefix_names_the_ancestors_prefix():
    """R0 = 6 tokens; R1 branches from R0 at 4; R2 branches from R1 at 2 (inside what R1 copied from R0), R3 from R0
    at 4 (the same prefix as R1's branch). Both branch points are prefixes of R0: rows 0, 1 and 3 are cut at 2 and
    4, row 2 at 2 only, and every copy of a prefix has the same id."""
    mask = torch.ones(4, 6)
    tree = tree_from_branches(torch.tensor([-1, 0, 1, 0]), torch.tensor([0, 4, 2, 4]), mask)
    assert tree["turn_ids"].tolist() == [[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 2, 2]]
    node, parent = tree["node"], tree["parent"]
    at_2, at_4 = 0 * 7 + 2, 0 * 7 + 4
    assert node[:, 0].tolist() == [at_2] * 4
    assert node[[0, 1, 3], 1].tolist() == [at_4] * 3
    assert len({node[0, 2].item(), node[1, 2].item(), node[2, 1].item(), node[3, 2].item()}) == 4  # four leaves
    assert parent[[0, 1, 3], 2].tolist() == [at_4] * 3 and parent[2, 1].item() == at_2


def test_errors_name_the_rows():
    mask = torch.ones(3, 4)
    with pytest.raises(ValueError, match=r"parent_row: .*rows \[1\]"):
        tree_from_branches(torch.tensor([-1, 1, -1]), torch.tensor([0, 2, 0]), mask)
    with pytest.raises(ValueError, match=r"parent_row: .*rows \[2\]"):
        tree_from_branches(torch.tensor([-1, -1, 7]), torch.tensor([0, 0, 2]), mask)
    with pytest.raises(ValueError, match=r"branch_pos: .*rows \[1, 2\]"):
        tree_from_branches(torch.tensor([-1, 0, 0]), torch.tensor([0, 4, 0]), mask)
    with pytest.raises(ValueError, match="cycle"):
        tree_from_branches(torch.tensor([1, 0, -1]), torch.tensor([2, 2, 0]), mask)
    with pytest.raises(ValueError, match=r"mask: .*rows \[0\]"):
        tree_from_branches(torch.tensor([-1, -1, -1]), torch.tensor([0, 0, 0]), torch.tensor([[0.0] * 4] + [[1.0] * 4] * 2))


def brute_force(parents, positions, lengths):
    """Tokens as (sampling row, position) pairs; a row is cut after every prefix some row branched from, and at its
    end; segments named by the prefix (a tuple of tokens) they reach."""
    tokens = []
    for row, (parent, position, length) in enumerate(zip(parents, positions, lengths)):
        copied = tokens[parent][:position] if parent >= 0 else []
        tokens.append(copied + [(row, t) for t in range(len(copied), length)])
    branch_prefixes = {tuple(tokens[p][:k]) for p, k in zip(parents, positions) if p >= 0}
    segments = []
    for row_tokens in tokens:
        cuts = [k for k in range(1, len(row_tokens) + 1) if tuple(row_tokens[:k]) in branch_prefixes]
        cuts = sorted(set(cuts) | {len(row_tokens)})
        segments.append([tuple(row_tokens[:k]) for k in cuts])
    return segments


@settings(max_examples=150, deadline=None)
@given(branched_rollouts())
def test_matches_a_brute_force_over_token_prefixes(rollouts):
    parents, positions, lengths, _ = rollouts
    width = max(lengths)
    mask = torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths])
    tree = tree_from_branches(torch.tensor(parents), torch.tensor(positions), mask)
    expected = brute_force(parents, positions, lengths)
    name_of: dict[int, tuple] = {}
    for row, prefixes in enumerate(expected):
        ends = [len(prefix) - 1 for prefix in prefixes]
        turn_ids = tree["turn_ids"][row]
        assert (turn_ids[lengths[row]:] == -1).all()
        assert [int(turn_ids[end]) for end in ends] == list(range(len(prefixes)))
        assert (turn_ids[: lengths[row]].diff() >= 0).all()
        for k, prefix in enumerate(prefixes):
            node = int(tree["node"][row, k])
            assert name_of.setdefault(node, prefix) == prefix  # one id per prefix ...
            parent = int(tree["parent"][row, k])
            assert parent == (-1 if k == 0 else int(tree["node"][row, k - 1]))
        assert (tree["node"][row, len(prefixes):] == -1).all()
    assert len(set(name_of.values())) == len(name_of)  # ... and one prefix per id
