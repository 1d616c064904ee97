"""Parity of canonrl's ``spo_chain`` and ``spo_tree`` with the official SPO code (transcribed in official_spo.py).

Random inputs (seeded numpy generators, several seeds; a hypothesis test for the chain) go through the official
pipeline and, converted, through canonrl:

* chain: response log-probs -> official cut points (p < 0.9, minus 1, every ``cutpoint_interval``-th) -> Monte Carlo
  rollouts per cut point -> official ``_compute_mc_value`` -> official ``_compute_token_advantages`` (probability
  mask included). canonrl gets the same partition as ``turn_ids`` (segment k = tokens (c_{k-1}, c_k], the last
  segment ending at the last token with the score as its value), the MC values as ``step_values``, the value of a
  cut point -1 (the bare prompt) as ``prompt_values`` (NaN otherwise) and the same log-probs. Both the row-per-
  response and the row-per-segment layouts are checked.
* tree: random rollout trees (official ``_construct_tree`` with a stand-in expander: depth 1 to 3, equal or unequal
  branching, early-finishing children, all-equal leaves) -> JSON -> official ``extract_edges_from_tree`` in "rloo"
  and "grpo" modes, with and without the drop of zero-advantage edges. canonrl gets one row per edge (``node`` =
  the child's full text, ``parent`` = the parent's, the leaf's reward; several trees as groups, rows shuffled) and,
  separately, one row per root-to-leaf path (``turn_ids`` segments). canonrl keeps the edges the official code drops:
  they must be exactly 0 there.

Tolerances. The official code works in float64 (Python floats, ``np.mean``); canonrl returns float32 and casts the
values it is given (chain ``step_values``) or computes (tree node values, computed in float64 then cast) to float32.
All values here lie in [-1, 2], so each cast moves a value by at most 2 * 2**-24 = 1.2e-7; an advantage is a
difference of two such values plus one more rounding: |error| <= 4e-7, hence ``ATOL = 1e-6`` for "rloo" and the
chain. In "grpo" the difference is divided by std(children) + 1e-8, and the std is itself computed from float32
values (error <= ATOL as well): |error| <= ATOL * (1 + |A|) / std, the tolerance used per edge; where the official
std is 0 (all children equal), both sides must be ~0 (the official (c - p) / 1e-8 is float64 noise, <= 1e-8 here).
Inputs that both sides read exactly (log-probs, scores, leaf rewards) are float32 numbers, so the probability mask and
the exact zeros agree bit for bit: wherever the official advantage is exactly 0, canonrl's must be exactly 0.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import canonrl
from conftest import segment_rows
from official_spo import HybridInferenceStrategy, MathEpisodeGeneratorWithMCAdvantages, edges_from_tree_string

ATOL = 1e-6
LOG_09 = np.float32(np.log(0.9))  # float32 log-probs around the 0.9 threshold: exp() is 0.9 +- ~1e-8, never 0.9


def f32(x: float) -> float:
    """A Python float that float32 holds exactly (both sides then read the same number)."""
    return float(np.float32(x))


def draw_reward(rng, kind: str) -> float:
    if kind == "binary":
        return float(rng.integers(0, 2))
    if kind == "continuous":
        return f32(rng.uniform(0.0, 1.0))
    return f32(rng.uniform(-1.0, 2.0))  # "wide": outside [0, 1] too


# ---------------------------------------------------------------------------------------------------------- chain
class AnswerReward:
    """The reward function stand-in: a rollout's answer is the repr of its reward."""

    def __init__(self, penalty: float):
        self.penalty = penalty

    def __call__(self, query, response, data_instance):
        return float(response), False

    def get_unfinished_response_penalty(self):
        return self.penalty


def draw_logprobs(rng, n: int) -> np.ndarray:
    """[n] float32 log-probs: p = 1, p in (0.9, 1), p in (0.02, 0.9), p a few float32 ulps around 0.9."""
    out = np.empty(n, dtype=np.float32)
    for i, kind in enumerate(rng.choice(4, size=n, p=[0.1, 0.4, 0.4, 0.1])):
        if kind == 0:
            out[i] = 0.0
        elif kind == 1:
            out[i] = np.log(rng.uniform(0.9, 1.0))
        elif kind == 2:
            out[i] = np.log(rng.uniform(0.02, 0.9))
        else:
            value, ulps = LOG_09, int(rng.integers(-2, 3))
            for _ in range(abs(ulps)):
                value = np.nextafter(value, np.float32(np.sign(ulps)), dtype=np.float32)
            out[i] = value
    return out


def chain_case(seed: int, n_traj: int, interval: int, kind: str, max_len: int = 14):
    """Official trajectories with cut points and MC values filled in, and their response log-probs (float32)."""
    rng = np.random.default_rng(seed)
    penalty = 0.0 if kind != "wide" else -0.5
    gen = MathEpisodeGeneratorWithMCAdvantages(reward_function=AnswerReward(penalty), cutpoint_interval=interval)
    trajectories, response_logprobs = [], []
    for _ in range(n_traj):
        n_query, n_response = int(rng.integers(1, 5)), int(rng.integers(1, max_len + 1))
        logprobs = draw_logprobs(rng, n_query - 1 + n_response)
        response_logprobs.append(logprobs[n_query - 1 :])
        trajectories.append(
            {
                "query_token_ids": list(range(n_query)),
                "response_token_ids": list(range(n_response)),
                "actor_shifted_log_probs": [float(x) for x in logprobs],  # float32 numbers, read in float64
                "score": draw_reward(rng, kind),
            }
        )
    gen.add_cutpoints(trajectories)
    results = []
    for traj_idx, traj in enumerate(trajectories):
        for value_idx in range(len(traj["cutpoints"])):
            n_mc = int(rng.choice([0, 1, 4, 9], p=[0.05, 0.15, 0.4, 0.4]))  # 0 rollouts: official value 0.0
            children = [
                {"answer": repr(draw_reward(rng, kind)), "finish_reason": "length" if rng.random() < 0.2 else "stop"}
                for _ in range(n_mc)
            ]
            results.append(
                {
                    "query": f"q{traj_idx}/{value_idx}",
                    "traj_idx": traj_idx,
                    "value_idx": value_idx,
                    "data_instance": {},
                    "_treetune__reasoning_tree": json.dumps({"children": children}),
                }
            )
    rng.shuffle(results)
    gen._update_trajectories_w_values(trajectories, results)
    return gen, trajectories, response_logprobs


def official_chain(gen, trajectories) -> list[np.ndarray]:
    return [np.asarray(gen._compute_token_advantages(traj)[1], dtype=np.float64) for traj in trajectories]


def segments_of(traj) -> tuple[list[int], list[float], float]:
    """(segment ends, values at the ends, prompt value or NaN) of an official trajectory."""
    cutpoints, values = [int(c) for c in traj["cutpoints"]], [float(v) for v in traj["cutpoints_values"]]
    prompt = math.nan
    if cutpoints and cutpoints[0] == -1:
        prompt, cutpoints, values = values[0], cutpoints[1:], values[1:]
    return cutpoints + [len(traj["response_token_ids"]) - 1], values + [traj["score"]], prompt


def chain_rows(trajectories, response_logprobs) -> dict:
    """canonrl row-per-response batch: ``turn_ids`` numbering the segments (c_{k-1}, c_k]."""
    width = max(len(t["response_token_ids"]) for t in trajectories)
    turn_ids = torch.full((len(trajectories), width), -1)
    logprobs = torch.zeros(len(trajectories), width)
    step_values, prompt_values = [], []
    for b, (traj, lp) in enumerate(zip(trajectories, response_logprobs)):
        ends, values, prompt = segments_of(traj)
        for t in range(len(lp)):
            turn_ids[b, t] = sum(end < t for end in ends)
        logprobs[b, : len(lp)] = torch.from_numpy(lp)
        step_values.append(values)
        prompt_values.append(prompt)
    return dict(
        rewards=torch.tensor([t["score"] for t in trajectories]),
        group=[0] * len(trajectories),
        mask=(turn_ids >= 0).float(),
        turn_ids=turn_ids,
        step_values=step_values,
        prompt_values=torch.tensor(prompt_values),
        logprobs=logprobs,
    )


def chain_segment_rows(trajectories, response_logprobs, order) -> tuple[dict, list[tuple[int, int, int]]]:
    """canonrl row-per-segment batch (rows in ``order``) and, per row, (trajectory, first token, last token + 1)."""
    rows = []
    for b, traj in enumerate(trajectories):
        ends, values, prompt = segments_of(traj)
        start = 0
        for k, (end, value) in enumerate(zip(ends, values)):
            rows.append((b, k, start, end + 1, value, prompt))
            start = end + 1
    rows = [rows[i % len(rows)] for i in order]
    width = max(stop - start for _, _, start, stop, _, _ in rows)
    mask, logprobs = torch.zeros(len(rows), width), torch.zeros(len(rows), width)
    for i, (b, _, start, stop, _, _) in enumerate(rows):
        mask[i, : stop - start] = 1
        logprobs[i, : stop - start] = torch.from_numpy(response_logprobs[b][start:stop])
    batch = dict(
        rewards=torch.tensor([trajectories[b]["score"] for b, *_ in rows]),
        group=[0] * len(rows),
        traj=[b for b, *_ in rows],
        step_index=torch.tensor([k for _, k, *_ in rows]),
        mask=mask,
        logprobs=logprobs,
        step_values=torch.tensor([value for *_, value, _ in rows]),
        prompt_values=torch.tensor([prompt for *_, prompt in rows]),
    )
    return batch, [(b, start, stop) for b, _, start, stop, _, _ in rows]


def assert_chain_row(got: torch.Tensor, want: np.ndarray, what) -> None:
    got64 = got.double().numpy()
    assert np.allclose(got64, want, rtol=0.0, atol=ATOL), (what, got64.tolist(), want.tolist())
    assert (got64[want == 0] == 0).all(), (what, "official exact zeros", got64.tolist(), want.tolist())


@pytest.mark.parametrize("kind", ["binary", "continuous", "wide"])
@pytest.mark.parametrize("interval", [1, 2, 5])
@pytest.mark.parametrize("seed", range(4))
def test_spo_chain_matches_official(seed, interval, kind):
    gen, trajectories, logprobs = chain_case(1000 * seed + 10 * interval + len(kind), 12, interval, kind)
    official = official_chain(gen, trajectories)
    out = canonrl.advantages("spo_chain", **chain_rows(trajectories, logprobs))
    for b, want in enumerate(official):
        assert_chain_row(out[b, : len(want)], want, b)
        assert (out[b, len(want) :] == 0).all()


@pytest.mark.parametrize("seed", range(3))
def test_spo_chain_row_per_segment_matches_official(seed):
    gen, trajectories, logprobs = chain_case(77 + seed, 8, 2, "continuous")
    official = official_chain(gen, trajectories)
    n_segments = sum(len(segments_of(t)[0]) for t in trajectories)
    order = np.random.default_rng(seed).permutation(n_segments).tolist() + [0]  # shuffled, one duplicated
    batch, spans = chain_segment_rows(trajectories, logprobs, order)
    out = canonrl.advantages("spo_chain", **batch)
    for i, (b, start, stop) in enumerate(spans):
        assert_chain_row(out[i, : stop - start], official[b][start:stop], (i, b))


def test_spo_chain_official_edge_cases():
    """No cut point (all p >= 0.9: all 0), only the prompt cut point (-1: score - V(prompt) on every low-p token),
    equal consecutive values (exactly 0), probabilities a float32 ulp either side of 0.9."""
    above = np.nextafter(LOG_09, np.float32(1.0), dtype=np.float32)  # p just above 0.9: masked, no candidate
    below = np.nextafter(LOG_09, np.float32(-1.0), dtype=np.float32)  # p just below 0.9: a candidate, kept
    cases = [
        (np.array([0.0, above, above], dtype=np.float32), [], 1.0),
        (np.array([below, above, 0.0, np.log(0.95)], dtype=np.float32), [0.25], 1.0),
        (
            np.array([np.log(0.5), np.log(0.5), np.log(0.3), np.log(0.2), 0.0], dtype=np.float32),
            [0.5, 0.5, 0.5, 0.5],
            0.5,
        ),
    ]
    gen = MathEpisodeGeneratorWithMCAdvantages(reward_function=AnswerReward(0.0), cutpoint_interval=1)
    trajectories, logprobs = [], []
    for lp, _values, score in cases:
        trajectories.append(
            {"query_token_ids": [0], "response_token_ids": list(range(len(lp))),
             "actor_shifted_log_probs": [float(x) for x in lp], "score": score}
        )  # fmt: skip
        logprobs.append(lp)
    gen.add_cutpoints(trajectories)
    for traj, (_, values, _) in zip(trajectories, cases):
        assert len(traj["cutpoints"]) == len(values)
        traj["cutpoints_values"], traj["cutpoints_values_std"] = list(values), [0.0] * len(values)
    official = official_chain(gen, trajectories)
    assert official[0].tolist() == [0.0, 0.0, 0.0]
    assert official[1].tolist() == [0.75, 0.0, 0.0, 0.0]
    assert official[2].tolist() == [0.0] * 5
    out = canonrl.advantages("spo_chain", **chain_rows(trajectories, logprobs))
    for b, want in enumerate(official):
        assert_chain_row(out[b, : len(want)], want, b)


@settings(max_examples=60, deadline=None)
@given(
    probs=st.lists(st.sampled_from([1.0, 0.99, 0.95, 0.9, 0.89, 0.5, 0.1]), min_size=1, max_size=10),
    values=st.lists(st.sampled_from([0.0, 0.25, 1 / 3, 0.5, 1.0]), min_size=10, max_size=10),
    score=st.sampled_from([0.0, 1.0]),
    interval=st.integers(1, 3),
)
def test_spo_chain_matches_official_hypothesis(probs, values, score, interval):
    lp = np.log(np.array(probs)).astype(np.float32)
    gen = MathEpisodeGeneratorWithMCAdvantages(reward_function=AnswerReward(0.0), cutpoint_interval=interval)
    traj = {"query_token_ids": [0, 1], "response_token_ids": list(range(len(lp))), "score": score,
            "actor_shifted_log_probs": [-0.1] + [float(x) for x in lp]}  # fmt: skip
    gen.add_cutpoints([traj])
    n = len(traj["cutpoints"])
    traj["cutpoints_values"], traj["cutpoints_values_std"] = values[:n], [0.0] * n
    want = official_chain(gen, [traj])[0]
    out = canonrl.advantages("spo_chain", **chain_rows([traj], [lp]))
    assert_chain_row(out[0], want, (probs, values))


# ----------------------------------------------------------------------------------------------------------- tree
class ScriptedExpander:
    """Stand-in for the vLLM node expander: children with unique texts ``<i>``, a reward drawn per child, and
    finish_reason "stop" (a leaf) with probability ``finish`` (always "stop" on the last level, unless
    ``truncate_last``, which sends such children to the max-depth leaf branch)."""

    def __init__(self, rng, branching, finish: float, kind: str, truncate_last: bool = False):
        self.rng, self.branching, self.finish, self.kind = rng, branching, finish, kind
        self.truncate_last = truncate_last
        self.rewards: dict[str, float] = {}

    async def expand(self, current_node, prefix, depth, max_tokens):
        branching = self.branching[depth]
        n = int(self.rng.integers(branching[0], branching[1] + 1)) if isinstance(branching, tuple) else branching
        children = []
        for _ in range(n):
            text = f"<{len(self.rewards)}>"
            self.rewards[text] = draw_reward(self.rng, self.kind) if self.kind != "equal" else 0.95**3
            last = max_tokens is None
            stop = (not self.truncate_last or self.rng.random() < 0.5) if last else self.rng.random() < self.finish
            children.append(
                {"text": text, "depth": depth + 1, "full_text": prefix + "\n" + text, "stop_text": "",
                 "finish_reason": "stop" if stop else "length"}
            )  # fmt: skip
        return children

    def reward_function(self, query, response, dataset_instance):
        return self.rewards[response.split("\n")[-1]], False


def official_trees(seed: int, n_trees: int, max_depth: int, branching, finish: float, kind: str, truncate_last=False):
    """Official tree JSON strings (as ``generate`` stores them) for ``n_trees`` prompts."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_trees):
        expander = ScriptedExpander(rng, branching, finish, kind, truncate_last)
        strategy = HybridInferenceStrategy(expander, expander.reward_function, M=30)
        tree = strategy.construct_tree(f"Q{seed}/{i}", max_depth, data_instance={"_treetune__idx": i})
        out.append(strategy._convert_tree_to_string(tree))
    return out


def walk(node, parent=None):
    """(node, parent) pairs of every edge, depth first."""
    for child in node.get("children", []):
        yield child, node
        yield from walk(child, node)


def tree_edge_rows(tree_strings, rng) -> tuple[dict, list[tuple[str, str]], list[float]]:
    """canonrl row-per-edge batch (rows shuffled), each row's official key (query_text, response_text) and the
    official std of its parent's children (for the grpo tolerance)."""
    rows = []
    for group, tree_str in enumerate(tree_strings):
        tree = json.loads(tree_str)
        for node, parent in walk(tree):
            reward = node["reward"] if node["leaf"] else 7.0  # inner rows' rewards are ignored
            rows.append((node["full_text"], parent["full_text"], reward, group, node["text"], parent["reward_std"]))
    rows = [rows[i] for i in rng.permutation(len(rows))]
    batch = dict(
        rewards=torch.tensor([r[2] for r in rows]),
        group=[r[3] for r in rows],
        node=[r[0] for r in rows],
        parent=[r[1] for r in rows],
        mask=torch.ones(len(rows), 2),
    )
    return batch, [(r[1], r[4]) for r in rows], [r[5] for r in rows]


def tree_path_rows(tree_strings) -> tuple[dict, list[list[tuple[str, str]]], list[list[float]]]:
    """canonrl row-per-path batch (``segment_rows``: one one-token segment per edge of a root-to-leaf path)."""
    nodes, parents, rewards, groups, keys, stds = [], [], [], [], [], []

    def down(node, path, group):
        for child in node.get("children", []):
            step = path + [(child, node)]
            if child["leaf"]:
                nodes.append([c["full_text"] for c, _ in step])
                parents.append([p["full_text"] for _, p in step])
                rewards.append(child["reward"])
                groups.append(group)
                keys.append([(p["full_text"], c["text"]) for c, p in step])
                stds.append([p["reward_std"] for _, p in step])
            else:
                down(child, step, group)

    for group, tree_str in enumerate(tree_strings):
        down(json.loads(tree_str), [], group)
    return segment_rows(nodes, parents, rewards, group=groups), keys, stds


def official_edges(tree_strings, mode: str, drop: bool) -> dict[tuple[str, str], dict]:
    edges = {}
    for tree_str in tree_strings:
        for edge in edges_from_tree_string(tree_str, adv_method=mode, only_adv_greater_than_zero=drop):
            key = (edge["query_text"], edge["response_text"])
            assert key not in edges
            edges[key] = edge
    return edges


def assert_edge(got: float, want: float, mode: str, std: float, what) -> None:
    if mode == "rloo":
        assert abs(got - want) <= ATOL, (what, got, want)
    elif std == 0.0:
        assert abs(got) <= ATOL and abs(want) <= 1e-8, (what, got, want)
    else:
        assert abs(got - want) <= ATOL * (1 + abs(want)) / std, (what, got, want, std)


TREE_SHAPES = {
    # name: (max_depth, branching per depth (int: fixed, (lo, hi): random per node), finish probability)
    "depth1_equal": (1, [6], 0.0),
    "depth1_unequal": (1, [(1, 5)], 0.0),
    "depth2_early_stops": (2, [(2, 4), (1, 4)], 0.3),
    "depth3_666": (3, [6, 6, 6], 0.2),
    "depth3_456": (3, [4, 5, 6], 0.0),
    "depth3_unequal": (3, [(1, 4), (1, 4), (1, 4)], 0.35),
}


@pytest.mark.parametrize("mode", ["rloo", "grpo"])
@pytest.mark.parametrize("kind", ["binary", "continuous", "wide"])
@pytest.mark.parametrize("shape", sorted(TREE_SHAPES))
@pytest.mark.parametrize("seed", range(3))
def test_spo_tree_matches_official(seed, shape, kind, mode):
    max_depth, branching, finish = TREE_SHAPES[shape]
    n_trees = 2 if shape == "depth3_666" else 3
    trees = official_trees(seed * 100 + len(shape) + len(kind), n_trees, max_depth, branching, finish, kind, seed == 2)
    every, kept = official_edges(trees, mode, drop=False), official_edges(trees, mode, drop=True)
    assert set(kept) <= set(every)
    for key in kept:
        assert kept[key]["advantage"] == every[key]["advantage"]

    batch, keys, stds = tree_edge_rows(trees, np.random.default_rng(seed))
    assert sorted(keys) == sorted(every)
    out = canonrl.advantages("spo_tree", mode=mode, **batch)
    assert (out[:, 0] == out[:, 1]).all()
    for row, (key, std) in enumerate(zip(keys, stds)):
        got = out[row, 0].item()
        assert_edge(got, every[key]["advantage"], mode, std, key)
        if key not in kept:  # dropped by the official code: canonrl keeps the edge, with exactly 0
            assert got == 0.0, (key, got)

    paths, path_keys, path_stds = tree_path_rows(trees)
    out = canonrl.advantages("spo_tree", mode=mode, **paths)
    for row, (row_keys, row_stds) in enumerate(zip(path_keys, path_stds)):
        for t, (key, std) in enumerate(zip(row_keys, row_stds)):
            assert_edge(out[row, t].item(), every[key]["advantage"], mode, std, (row, key))
        assert (out[row, len(row_keys) :] == 0).all()


@pytest.mark.parametrize("mode", ["rloo", "grpo"])
def test_spo_tree_all_equal_leaves_and_chains_official_drops_everything(mode):
    """All leaves equal (0.95**3) on an unequal depth-3 tree, and single-child chains: the official code drops every
    edge; canonrl gives exactly 0 on all of them."""
    trees = official_trees(5, 3, 3, [(1, 4), (1, 4), (1, 4)], 0.3, "equal")
    trees += official_trees(6, 2, 3, [1, 1, 1], 0.0, "binary")
    assert official_edges(trees, mode, drop=True) == {}
    batch, keys, _ = tree_edge_rows(trees, np.random.default_rng(0))
    assert len(keys) > 0
    assert (canonrl.advantages("spo_tree", mode=mode, **batch) == 0).all()
    paths, _, _ = tree_path_rows(trees)
    assert (canonrl.advantages("spo_tree", mode=mode, **paths) == 0).all()


def test_spo_tree_official_example_by_hand():
    """The oracle on a hand-computed tree (R -> {a -> {1, 0, 0}, b -> {1}, c = 0}): V(a) = 1/3, V(b) = 1,
    V(R) = 4/9; b -> b1 has advantage 0 and is dropped."""
    spec = {"": ["a", "b", "c"], "a": ["a1", "a2", "a3"], "b": ["b1"]}
    rewards = {"c": 0.0, "a1": 1.0, "a2": 0.0, "a3": 0.0, "b1": 1.0}

    class Expander:
        async def expand(self, current_node, prefix, depth, max_tokens):
            name = current_node["text"] if depth else ""
            return [
                {"text": c, "depth": depth + 1, "full_text": prefix + "\n" + c, "stop_text": "",
                 "finish_reason": "stop" if c in rewards else "length"}
                for c in spec[name]
            ]  # fmt: skip

    def reward_function(query, response, dataset_instance):
        return rewards[response.split("\n")[-1]], False

    strategy = HybridInferenceStrategy(Expander(), reward_function)
    tree = strategy._convert_tree_to_string(strategy.construct_tree("R", 3, data_instance={"_treetune__idx": 0}))
    kept = {e["response_text"]: e["advantage"] for e in edges_from_tree_string(tree)}
    assert set(kept) == {"a", "b", "c", "a1", "a2", "a3"}
    expected = {"a": 1 / 3 - 4 / 9, "b": 5 / 9, "c": -4 / 9, "a1": 2 / 3, "a2": -1 / 3, "a3": -1 / 3}
    assert kept == pytest.approx(expected, abs=1e-15)
    batch, keys, _ = tree_edge_rows([tree], np.random.default_rng(1))
    out = canonrl.advantages("spo_tree", **batch)[:, 0]
    for row, (_, text) in enumerate(keys):
        assert out[row].item() == pytest.approx(expected.get(text, 0.0), abs=ATOL)


def test_spo_tree_official_drop_criterion_is_advantage_plus_prover_advantage():
    """The official drop tests ``advantage + prover_advantage != 0`` (BoK(v) = 1 - (1 - v)^4), not ``advantage != 0``.
    For rewards in [0, 1] the two agree (BoK is increasing there); outside, an edge with a non-zero advantage can be
    dropped: R -> {a = c, b = 3 - c}, V(R) = 1.5, c - 1.5 = -(BoK(c) - BoK(1.5)) exactly in float64. canonrl (no drop,
    and a docstring that describes the drop as "advantage exactly 0") gives that edge its advantage."""
    c = 1.7441511159495167
    rewards = {"a": c, "b": 3 - c}

    class Expander:
        async def expand(self, current_node, prefix, depth, max_tokens):
            return [
                {"text": t, "depth": 1, "full_text": prefix + "\n" + t, "stop_text": "", "finish_reason": "stop"}
                for t in "ab"
            ]

    def reward_function(query, response, dataset_instance):
        return rewards[response.split("\n")[-1]], False

    strategy = HybridInferenceStrategy(Expander(), reward_function)
    tree = strategy._convert_tree_to_string(strategy.construct_tree("R", 1, data_instance={"_treetune__idx": 0}))
    every = {e["response_text"]: e for e in edges_from_tree_string(tree, only_adv_greater_than_zero=False)}
    assert every["a"]["advantage"] == pytest.approx(0.2441511159495167, abs=1e-15)
    assert every["a"]["advantage"] + every["a"]["prover_advantage"] == 0.0
    assert [e["response_text"] for e in edges_from_tree_string(tree)] == ["b"]  # "a" is dropped
    batch, keys, _ = tree_edge_rows([tree], np.random.default_rng(0))
    out = canonrl.advantages("spo_tree", **batch)[:, 0]
    assert out[keys.index(("R", "a"))].item() == pytest.approx(0.2441511159495167, abs=ATOL)
