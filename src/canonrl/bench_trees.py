"""Side-by-side timing of the tree estimators on synthetic rollout trees, in one process.

Every prompt grows a full tree with the given branching (SPO-tree's 6-6-6 by default: 6 + 36 + 216 = 258 edges and
216 leaves per prompt), its leaves scored 0/1. Two layouts of the same trees:

- **row per edge** (SPO-tree's episodes): one row per edge, ``node``/``parent`` ids, ``tokens`` tokens each;
- **row per leaf** (ROSE's, ARPO's and AttnRL's rollouts): one row per leaf, its path cut into one segment per
  depth by ``turn_ids``. The inputs are built from each row's parent row and branch position by
  :func:`canonrl.tree_from_branches`, which is timed too.

Each contender's time is reported per tree node (the cost should stay flat as the batch grows: linear in nodes), as
a ratio to the memory floor of its layout (writing the [B, T] output from one value per step), and against a per-node
Python loop computing the same advantages (dictionaries of children and leaves, the way the official code walks its
trees), whose result is checked against canonrl's before timing.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

import canonrl
from canonrl.bench import _timed_blocks, keep_freed_memory_for_reuse, markdown

FLOOR = "floor: per-step value -> [B, T] output"
#: (label, registry name, hyperparameters) timed on each layout
ROW_PER_EDGE = (("spo_tree (rloo)", "spo_tree", {}), ("spo_tree (grpo)", "spo_tree", {"mode": "grpo"}))
ROW_PER_LEAF = (
    ("rose", "rose", {}),
    ("arpo (hard attribution)", "arpo", {"attribution": "hard"}),
    ("attnrl", "attnrl", {}),
    ("spo_tree (rloo)", "spo_tree", {}),
)
BUILD = "tree_from_branches (inputs)"
COLUMNS = ("layout", "batch", "contender", "time (ms)", "µs / node", "× floor", "vs per-node loop")
LEFT_COLUMNS = ("layout", "batch", "contender")


@dataclass
class TreeRow:
    layout: str
    size: str
    label: str
    seconds: float
    nodes: int
    floor_seconds: float
    loop_seconds: float | None = None

    def cells(self) -> tuple[str, ...]:
        speedup = "" if self.loop_seconds is None else f"{self.loop_seconds / self.seconds:.0f}×"
        return (self.layout, self.size, self.label, f"{self.seconds * 1e3:.1f}", f"{self.seconds / self.nodes * 1e6:.2f}",
                f"{self.seconds / self.floor_seconds:.2f}", speedup)


def full_trees(prompts: int, branching: tuple[int, ...], seed: int = 0) -> dict[str, torch.Tensor]:
    """Per non-root node, level by level: ``node`` id, ``parent`` id (a prompt's root is id p), ``group``, ``depth``;
    ``leaf_reward`` per leaf (in leaf order), 0/1 with a success rate drawn per prompt."""
    g = torch.Generator().manual_seed(seed)
    parent_ids, next_id = torch.arange(prompts), prompts
    node, parent, depth = [], [], []
    for level, fan_out in enumerate(branching, start=1):
        ids = torch.arange(next_id, next_id + len(parent_ids) * fan_out)
        node.append(ids)
        parent.append(parent_ids.repeat_interleave(fan_out))
        depth.append(torch.full_like(ids, level))
        parent_ids, next_id = ids, next_id + len(ids)
    leaves_per_prompt = math.prod(branching)
    rate = torch.rand(prompts, generator=g).repeat_interleave(leaves_per_prompt)
    node_all = torch.cat(node)
    return {
        "node": node_all,
        "parent": torch.cat(parent),
        "depth": torch.cat(depth),
        "group": _root_of(node_all, torch.cat(parent), prompts),
        "leaf_reward": (torch.rand(len(rate), generator=g) < rate).float(),
        "leaves": parent_ids,
    }


def _root_of(node: torch.Tensor, parent: torch.Tensor, prompts: int) -> torch.Tensor:
    up = torch.empty(int(node.max()) + 1, dtype=torch.long)
    up[:prompts] = torch.arange(prompts)
    up[node] = parent
    root = node.clone()
    while (root >= prompts).any():
        root = up[root]
    return root


def row_per_edge(trees: dict, tokens: int) -> dict:
    rewards = torch.zeros(len(trees["node"]))
    rewards[-len(trees["leaves"]):] = trees["leaf_reward"]  # the last level holds the leaves, in leaf order
    return {"rewards": rewards, "group": trees["group"], "mask": torch.ones(len(rewards), tokens),
            "node": trees["node"], "parent": trees["parent"]}


def row_per_leaf(trees: dict, branching: tuple[int, ...], tokens: int) -> tuple[dict, dict]:
    """The leaves as full rows (``tokens`` per segment) and the rollouts' own encoding: the first leaf below each
    node is where its subtree's rollout started, every other leaf branched from the leaf to its left-most sibling
    subtree at the depth where they part."""
    leaves_per_prompt, depth = math.prod(branching), len(branching)
    count = len(trees["leaves"])
    index = torch.arange(count) % leaves_per_prompt
    digits, rest = [], index
    for fan_out in reversed(branching):
        digits.append(rest % fan_out)
        rest = rest // fan_out
    digits = torch.stack(digits[::-1], 1)  # [L, depth]: the child taken at each level
    nonzero = digits != 0
    last_nonzero = torch.where(nonzero, torch.arange(depth), -1).amax(1)
    stride = torch.tensor([math.prod(branching[k + 1:]) for k in range(depth)])
    parent_row = torch.where(last_nonzero >= 0, torch.arange(count) - stride[last_nonzero.clamp_min(0)], -1)
    parent_row = torch.where(nonzero[:, 0] & (last_nonzero == 0), -1, parent_row)  # a new root response
    branch_pos = last_nonzero.clamp_min(0) * tokens
    mask = torch.ones(count, depth * tokens)
    rollouts = {"parent_row": parent_row, "branch_pos": branch_pos, "mask": mask}
    tree = canonrl.tree_from_branches(parent_row, branch_pos, mask)
    batch = {"rewards": trees["leaf_reward"], "group": torch.arange(count) // leaves_per_prompt, "mask": mask, **tree}
    return batch, rollouts


def loop_spo_tree(batch: dict) -> torch.Tensor:
    """SPO-tree (rloo) by walking the tree: children lists, values by recursion from the roots, one edge per row."""
    node, parent, rewards = batch["node"].tolist(), batch["parent"].tolist(), batch["rewards"].tolist()
    children = defaultdict(list)
    for child, up in zip(node, parent):
        children[up].append(child)
    leaf_value = {child: r for child, r in zip(node, rewards) if child not in children}
    value: dict[int, float] = {}

    def visit(n: int) -> float:
        if n not in value:
            value[n] = leaf_value[n] if n in leaf_value else sum(visit(c) for c in children[n]) / len(children[n])
        return value[n]

    advantage = [visit(child) - visit(up) for child, up in zip(node, parent)]
    return torch.tensor(advantage)[:, None] * batch["mask"]


def loop_rose(batch: dict) -> torch.Tensor:
    """ROSE by walking each response's branch points: sums and counts of leaf rewards per node, then differences."""
    rewards, groups = batch["rewards"].tolist(), batch["group"].tolist()
    paths = batch["node"].tolist()
    total, count = defaultdict(float), defaultdict(int)
    group_total, group_count = defaultdict(float), defaultdict(int)
    for path, reward, group in zip(paths, rewards, groups):
        group_total[group] += reward
        group_count[group] += 1
        for n in path:
            total[n] += reward
            count[n] += 1
    segment = []
    for path, group in zip(paths, groups):
        start = group_total[group] / group_count[group]
        row = []
        for n in path:
            row.append(total[n] / count[n] - start)
            start = total[n] / count[n]
        segment.append(row)
    per_segment = torch.tensor(segment)
    return per_segment.gather(1, batch["turn_ids"].clamp_min(0)) * batch["mask"]


def run_tree_benchmark(
    *,
    sizes: tuple[int, ...] = (32, 128, 512),
    branching: tuple[int, ...] = (6, 6, 6),
    tokens: int = 16,
    repeats: int = 3,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> list[TreeRow]:
    """Every tree contender at each size (prompts), in both layouts; the loops run on the CPU copy of each batch."""
    keep_freed_memory_for_reuse()
    rows: list[TreeRow] = []
    for prompts in sizes:
        trees = full_trees(prompts, branching)
        nodes = len(trees["node"]) + prompts
        size = f"{prompts} × {'-'.join(map(str, branching))}: {nodes:,} nodes"
        if progress:
            progress(f"row per edge, {prompts} prompts")
        edge = row_per_edge(trees, tokens)
        rows += _time_layout("row per edge", size, nodes, edge, ROW_PER_EDGE, loop_spo_tree, device, repeats)
        if progress:
            progress(f"row per leaf, {prompts} prompts")
        leaf, rollouts = row_per_leaf(trees, branching, tokens)
        rollouts = _on(rollouts, device)
        build = (BUILD, lambda r=rollouts: canonrl.tree_from_branches(**r))
        rows += _time_layout("row per leaf", size, nodes, leaf, ROW_PER_LEAF, loop_rose, device, repeats, build)
    return rows


def _on(batch: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _time_layout(layout, size, nodes, batch, cases, loop, device, repeats, extra=None) -> list[TreeRow]:
    """Check the loop against the first contender (same estimator), then time the floor, the contenders, the loop."""
    on_device = _on(batch, device)
    first_label, first_name, first_params = cases[0]
    expected = canonrl.advantages(first_name, **on_device, **first_params).cpu()
    torch.testing.assert_close(loop(batch), expected, rtol=1e-5, atol=1e-5)
    steps = canonrl.make_batch(**on_device).steps
    per_step = torch.rand(steps.num_steps, device=steps.device)
    contenders: list[tuple[str, Callable[[], object]]] = [(FLOOR, lambda: steps.broadcast(per_step))]
    contenders += [extra] if extra else []
    for label, name, params in cases:
        estimator = canonrl.get_estimator(name, **params)
        contenders.append((label, lambda e=estimator: e(**on_device)))
    loop_label = f"per-node loop: {first_label}"
    contenders.append((loop_label, lambda: loop(batch)))
    times = _timed_blocks(contenders, device, repeats)
    floor = times[FLOOR]
    out = [TreeRow(layout, size, label, times[label], nodes, floor) for label in (FLOOR, *([extra[0]] if extra else []))]
    for label, _, _ in cases:
        compared = times[loop_label] if label == first_label else None
        out.append(TreeRow(layout, size, f"canonrl {label}", times[label], nodes, floor, compared))
    out.append(TreeRow(layout, size, loop_label, times[loop_label], nodes, floor))
    return out


def markdown_table(rows: list[TreeRow]) -> str:
    return markdown(COLUMNS, LEFT_COLUMNS, rows)
