"""Every Python example of docs/steps.md ("Steps, turns and critics") runs, the two layouts of the GiGPO example give
the same step advantages, and the README's GiGPO example is the first of them."""

from __future__ import annotations

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = ROOT / "docs" / "steps.md"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_the_step_examples_run_and_agree():
    blocks = python_blocks(STEPS)
    assert len(blocks) == 3
    namespace: dict = {}
    exec(blocks[0], namespace)
    per_step = namespace["adv"][:, 0]
    exec(blocks[1], namespace)
    turns = namespace["adv"]
    assert torch.allclose(turns[0, [0, 3]], per_step[:2]) and torch.allclose(turns[1, [0, 2, 4]], per_step[2:])
    exec(blocks[2], namespace)
    assert namespace["returns"].tolist() == [[1.0, 1.0, 0.0, 1.0]]


def test_the_readme_shows_the_first_step_example():
    assert python_blocks(STEPS)[0] in python_blocks(ROOT / "README.md")
