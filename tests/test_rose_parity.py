"""ROSE against the official code (tests/official_rose.py) on random rollout trees.

Each prompt's responses are built as the official rollout builds them: response r either starts from the prompt
(``parent_traj = -1``) or copies ``parent[:branch_pos]`` of an earlier response and continues with fresh tokens,
``branch_pos`` lying in the parent's own continuation (the official rollout branches at the response that generated
the max-entropy token, never inside an inherited prefix). The same rows go to both sides: to the official function
as ``tree_metadata`` (per row ``prompt_index``, ``parent_traj``, ``branch_pos``), to canonrl cut at the branch
points on each response's path (``turn_ids``), with ``node``/``parent`` = prefix identities (the prompt and the
prefix's tokens; a response's own end is its full token tuple).
"""

from __future__ import annotations

import random

import pytest
import torch

import canonrl
from official_rose import compute_grpo_iterative_branching_outcome_advantage as official


def lcp(a: list[int], b: list[int]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def prompt_tree(rng: random.Random, n: int, counter: list[int], *, distinct_positions: bool, restart: float = 0.2):
    """(responses as token lists, metadata dicts) of one prompt. ``distinct_positions``: no two different prefixes
    branch at one position (resampled until so)."""
    responses, meta, used = [], [], {}

    def fresh(count: int) -> list[int]:
        counter[0] += count
        return list(range(counter[0] - count, counter[0]))

    for r in range(n):
        parent, position, prefix = -1, -1 if r == 0 else 0, []
        if r > 0 and rng.random() >= restart:
            collide = not distinct_positions and rng.random() < 0.5  # look for a position another prefix uses
            for attempt in range(40):
                candidate = rng.randrange(r)
                own = max(meta[candidate]["branch_pos"], 0)
                k = rng.randint(own, len(responses[candidate]) - 1)
                shared = tuple(responses[candidate][:k])
                if collide and attempt < 20 and used.get(k, shared) == shared:
                    continue
                if not distinct_positions or used.get(k, shared) == shared:
                    parent, position, prefix = candidate, k, list(shared)
                    used[k] = shared
                    break
        responses.append(prefix + fresh(rng.randint(1, 5)))
        meta.append({"parent_traj": parent, "branch_pos": position, "prefix_len": len(prefix)})
    return responses, meta


def random_batch(seed: int, *, prompts: int = 3, n: int = 6, distinct_positions: bool = False, lam: float = 0.0):
    """(official advantages, canonrl fields, official branch values, expected branch values) of a random batch."""
    rng = random.Random(seed)
    counter = [1]
    trees = [prompt_tree(rng, n, counter, distinct_positions=distinct_positions) for _ in range(prompts)]
    # interleave the prompts' rows, each prompt's rows keeping their order (parent_traj indexes them)
    order = [p for p in range(prompts) for _ in range(n)]
    rng.shuffle(order)
    taken = [0] * prompts
    rows = []
    for p in order:
        rows.append((p, taken[p]))
        taken[p] += 1
    width = max(len(resp) for responses, _ in trees for resp in responses) + 2
    B = len(rows)
    rewards = torch.tensor([rng.choice([0.0, 0.0, 1.0, 1.0, 0.5]) for _ in range(B)])
    token_rewards, mask = torch.zeros(B, width), torch.zeros(B, width)
    turn_ids = torch.full((B, width), -1)
    per_sample, nodes, parents, expected = [], [], [], {}
    for b, (p, r) in enumerate(rows):
        responses, meta = trees[p]
        tokens = responses[r]
        L = len(tokens)
        token_rewards[b, L - 1] = rewards[b]
        mask[b, :L] = 1
        per_sample.append({"prompt_index": p, **meta[r]})
        points = sorted({0} | {lcp(tokens, other) for j, other in enumerate(responses) if j != r})
        assert points[-1] < L  # no response ends at a branch point
        for k in points:
            expected.setdefault((p, k), []).append(float(rewards[b]))
        cuts = points + [L]
        for i in range(len(points)):
            turn_ids[b, cuts[i] : cuts[i + 1]] = i
        ends = [(p, tuple(tokens[:k])) for k in points[1:]] + [(p, tuple(tokens))]
        nodes.append(ends)
        parents.append([(p, ())] + ends[:-1])
    adv, returns = official(token_rewards, mask, tree_metadata={"per_sample": per_sample, "n_per_prompt": n},
                            config={"length_penalty": lam})
    assert torch.equal(adv, returns)
    values = dict(official.branch_value)
    fields = dict(rewards=rewards, group=[p for p, _ in rows], mask=mask, turn_ids=turn_ids, node=nodes, parent=parents)
    return adv, fields, values, {key: sum(v) / len(v) for key, v in expected.items()}


@pytest.mark.parametrize("seed", range(8))
def test_position_keying_matches_official_on_random_trees(seed):
    adv, fields, values, expected = random_batch(seed)
    # the official branch values are the means over the responses whose path holds each branch position
    assert values == pytest.approx(expected, abs=1e-12)
    torch.testing.assert_close(canonrl.advantages("rose", keying="position", **fields), adv, atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", range(8))
def test_prefix_keying_matches_official_without_shared_positions(seed):
    adv, fields, _, _ = random_batch(100 + seed, distinct_positions=True)
    torch.testing.assert_close(canonrl.advantages("rose", **fields), adv, atol=1e-6, rtol=0)
    position = canonrl.advantages("rose", keying="position", **fields)
    torch.testing.assert_close(position, canonrl.advantages("rose", **fields), atol=1e-6, rtol=0)


def test_random_trees_do_share_positions():
    """The trees of the position test do branch two different prefixes at one position, and the keyings differ."""
    differ = 0
    for seed in range(8):
        adv, fields, _, _ = random_batch(seed)
        differ += not torch.allclose(canonrl.advantages("rose", **fields), adv, atol=1e-6)
    assert differ >= 4


@pytest.mark.parametrize("lam", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("seed", range(4))
def test_length_penalty_matches_official(seed, lam):
    adv, fields, _, _ = random_batch(200 + seed, lam=lam)
    plain, _, _, _ = random_batch(200 + seed)
    assert not torch.equal(adv, plain)  # the penalty acts on these batches
    out = canonrl.advantages("rose", keying="position", length_penalty=lam, **fields)
    torch.testing.assert_close(out, adv, atol=1e-6, rtol=0)
    adv, fields, _, _ = random_batch(300 + seed, distinct_positions=True, lam=lam)
    torch.testing.assert_close(canonrl.advantages("rose", length_penalty=lam, **fields), adv, atol=1e-6, rtol=0)


def meta(parent: int, position: int) -> dict:
    return {"prompt_index": 0, "parent_traj": parent, "branch_pos": position, "prefix_len": max(position, 0)}


def test_the_keyings_differ_when_two_prefixes_branch_at_one_position():
    """Two responses from the prompt, a (reward 1) and c (0), each branched at token 3: a' (1) from a, c' (0) from c.

        prefix:   V(a[:3]) = mean(a, a') = 1,  V(c[:3]) = 0,  V(root) = 1/2
                  a, a': [0.5, 0],  c, c': [-0.5, 0]      (first segment, second segment)
        position: V(3) = mean(a, a', c, c') = 1/2 = V(root)
                  a, a': [0, 0.5],  c, c': [0, -0.5]

    The official code gives the position values."""
    width = 6
    mask = torch.ones(4, width)
    token_rewards = torch.zeros(4, width)
    token_rewards[[0, 2], -1] = 1.0
    per_sample = [meta(-1, -1), meta(-1, 0), meta(0, 3), meta(1, 3)]  # rows: a, c, a', c'
    adv, _ = official(token_rewards, mask, tree_metadata={"per_sample": per_sample, "n_per_prompt": 4},
                      config={"length_penalty": 0.0})
    turn_ids = torch.tensor([[0] * 3 + [1] * 3] * 4)
    fields = dict(
        rewards=torch.tensor([1.0, 0.0, 1.0, 0.0]), group=[0] * 4, mask=mask, turn_ids=turn_ids,
        node=[["a3", "a"], ["c3", "c"], ["a3", "a'"], ["c3", "c'"]],
        parent=[["R", "a3"], ["R", "c3"], ["R", "a3"], ["R", "c3"]],
    )
    position = torch.tensor([[0.0] * 3 + [0.5] * 3, [0.0] * 3 + [-0.5] * 3] * 2)
    prefix = torch.tensor([[0.5] * 3 + [0.0] * 3, [-0.5] * 3 + [0.0] * 3] * 2)
    assert torch.equal(adv, position)
    assert torch.equal(canonrl.advantages("rose", keying="position", **fields), position)
    assert torch.equal(canonrl.advantages("rose", **fields), prefix)


def test_official_adds_ancestor_positions_not_on_the_path():
    """A quirk of the official code, not reproduced: a (reward 1, 8 tokens) from the prompt; c (reward 1) branched
    from a at 5; d (reward 0) branched from c at 3, inside the prefix c inherited from a. d = a[:3] + its own tokens,
    so its branch points are {0, 3}, but the official code adds its ancestor c's position 5 as well, so V(5) =
    mean(a, c, d) = 2/3 instead of mean(a, c) = 1 (V(0) = V(3) = 2/3 either way):

        official: a [0,3): 0, [3,5): 0, [5,8): 1 - 2/3;    d [0,3): 0, [3,5): 0, [5,8): 0 - 2/3
        canonrl:  a [0,3): 0, [3,5): 1 - 2/3, [5,8): 0;    d [0,3): 0, [3,8): 0 - 2/3

    (The official rollout never branches inside an inherited prefix, so this does not arise there.)"""
    mask = torch.ones(3, 8)
    token_rewards = torch.zeros(3, 8)
    token_rewards[[0, 1], -1] = 1.0
    per_sample = [meta(-1, -1), meta(0, 5), meta(1, 3)]
    adv, _ = official(token_rewards, mask, tree_metadata={"per_sample": per_sample, "n_per_prompt": 3},
                      config={"length_penalty": 0.0})
    assert official.branch_value == pytest.approx({(0, 0): 2 / 3, (0, 3): 2 / 3, (0, 5): 2 / 3})
    third = 1 / 3
    assert adv[0].tolist() == pytest.approx([0.0] * 5 + [third] * 3)
    assert adv[2].tolist() == pytest.approx([0.0] * 5 + [-2 * third] * 3)
    fields = dict(
        rewards=torch.tensor([1.0, 1.0, 0.0]), group=[0] * 3, mask=mask,
        turn_ids=torch.tensor([[0] * 3 + [1] * 2 + [2] * 3, [0] * 3 + [1] * 2 + [2] * 3, [0] * 3 + [1] * 5]),
        node=[["p3", "p5", "a"], ["p3", "p5", "c"], ["p3", "d"]],
        parent=[["R", "p3", "p5"], ["R", "p3", "p5"], ["R", "p3"]],
    )
    for keying in ("position", "prefix"):
        out = canonrl.advantages("rose", keying=keying, **fields)
        assert out[0].tolist() == pytest.approx([0.0] * 3 + [third] * 2 + [0.0] * 3)
        assert out[2].tolist() == pytest.approx([0.0] * 3 + [-2 * third] * 5)


def test_official_caps_lengths_at_nonzero_token_ids():
    """Another quirk, not followed: given ``responses`` (as verl's trainer passes them), the official length is at most
    the count of non-zero token ids, so a token id 0 inside a response cuts off its last token's advantage."""
    token_rewards, mask = torch.zeros(2, 5), torch.ones(2, 5)
    token_rewards[0, -1] = 1.0
    metadata = {"per_sample": [meta(-1, -1), meta(-1, 0)], "n_per_prompt": 2}
    responses = torch.tensor([[5, 0, 7, 8, 9], [4, 4, 4, 4, 4]])
    adv, _ = official(token_rewards, mask, tree_metadata=metadata, responses=responses, config={"length_penalty": 0.0})
    assert adv[0].tolist() == [0.5, 0.5, 0.5, 0.5, 0.0]
    fields = dict(rewards=torch.tensor([1.0, 0.0]), group=[0, 0], mask=mask, node=["x", "y"], parent=[None, None])
    assert canonrl.advantages("rose", keying="position", **fields)[0].tolist() == [0.5] * 5
