"""Every Python example of the README's "Steps, turns and critics" section runs, and the two layouts of the GiGPO
example give the same step advantages."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def section_blocks() -> list[str]:
    text = README.read_text()
    start = text.index("## Steps, turns and critics")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], re.S)


def test_the_step_examples_run_and_agree():
    blocks = section_blocks()
    assert len(blocks) == 3
    namespace: dict = {}
    exec(blocks[0], namespace)
    per_step = namespace["adv"][:, 0]
    exec(blocks[1], namespace)
    turns = namespace["adv"]
    assert torch.allclose(turns[0, [0, 3]], per_step[:2]) and torch.allclose(turns[1, [0, 2, 4]], per_step[2:])
    exec(blocks[2], namespace)
    assert namespace["returns"].tolist() == [[1.0, 1.0, 0.0, 1.0]]
