"""The estimator tables of docs/estimators.md are the registry's (``canonrl estimators --markdown``), and the
template module of docs/adding-an-estimator.md registers and runs."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import canonrl
from canonrl import cli, registry
from canonrl.cli import app, estimator_tables, marked_estimator_tables, with_estimator_tables

ROOT = Path(__file__).resolve().parents[1]
TABLES = ROOT / "docs" / "estimators.md"
GUIDE = ROOT / "docs" / "adding-an-estimator.md"
REGENERATE = "canonrl estimators --update docs/estimators.md"


def test_the_docs_tables_are_the_registrys():
    text = TABLES.read_text()
    assert with_estimator_tables(text) == text, f"docs/estimators.md's estimator tables are stale: run `{REGENERATE}`"


def test_every_registered_estimator_has_one_row():
    tables = estimator_tables()
    for info in canonrl.estimators():
        table = tables["estimators" if info.outcome_level else "step-estimators"]
        assert table.count(f"| `{info.name}` |") == 1, info.name
    for table in tables.values():
        header, *rows = table.splitlines()
        for row in rows:  # a "|" inside a cell is escaped, or it would split the cell
            assert len(re.split(r"(?<!\\)\|", row)) == len(re.split(r"\|", header)), row


def test_cli_prints_and_updates_the_tables(tmp_path):
    printed = CliRunner().invoke(app, ["estimators", "--markdown"])
    assert printed.exit_code == 0, printed.output
    assert printed.output.strip() == marked_estimator_tables()
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- estimators:begin -->\nold\n<!-- estimators:end -->\n\ntext\n\n"
                      "<!-- step-estimators:begin -->\n<!-- step-estimators:end -->\n")  # fmt: skip
    updated = CliRunner().invoke(app, ["estimators", "--update", str(readme)])
    assert updated.exit_code == 0, updated.output
    assert readme.read_text() == with_estimator_tables(readme.read_text())
    assert "old" not in readme.read_text() and "\ntext\n" in readme.read_text()
    readme.write_text("no markers\n")
    refused = CliRunner().invoke(app, ["estimators", "--update", str(readme)])
    assert refused.exit_code != 0 and "<!-- estimators:begin -->" in refused.output


def test_estimators_needing_a_producer_say_so_in_the_tables_and_the_cli(monkeypatch):
    monkeypatch.setattr(cli, "console", Console(width=3000))  # no wrapping inside the cells
    needing = [info for info in canonrl.estimators() if info.producer]
    assert {"iapo", "oar", "spo_chain", "qrm"} <= {info.name for info in needing}
    tables = estimator_tables()
    printed = CliRunner().invoke(app, ["estimators"])
    assert printed.exit_code == 0, printed.output
    for info in canonrl.estimators():
        table = tables["estimators" if info.outcome_level else "step-estimators"]
        row = next(line for line in table.splitlines() if line.startswith(f"| `{info.name}` |"))
        assert (info.producer or "–") in row, info.name
    for info in needing:
        assert f"(needs a producer: {info.producer})" in printed.output, info.name


def template_code() -> str:
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S)
    assert len(blocks) == 1, "the guide has one template module"
    return blocks[0]


@pytest.fixture
def template():
    """The guide's template module, executed as a module and registered under a throwaway name (removed after)."""
    name = "template_estimator_under_test"
    code = template_code().replace('name = "shrunk_baseline"', f'name = "{name}"')
    assert name in code, "the template's name line changed: update this test"
    module = types.ModuleType("canonrl_adding_an_estimator_template")
    sys.modules[module.__name__] = module
    try:
        exec(compile(code, str(GUIDE), "exec"), module.__dict__)
        yield name
    finally:
        registry._REGISTRY.pop(name, None)
        sys.modules.pop(module.__name__, None)


def test_the_guides_template_registers_and_computes(template):
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5])
    group = [0, 0, 0, 1, 1, 1, 2]
    mask = torch.ones(7, 3)
    mask[6] = 0  # a fully masked row
    out = canonrl.advantages(template, rewards=rewards, group=group, mask=mask, shrink=0.5)
    assert out.dtype == torch.float32 and out.shape == (7, 3)
    valid = rewards[:6]
    group_mean = torch.tensor([1 / 3] * 3 + [1.0] * 3)
    expected = valid - 0.5 * group_mean - 0.5 * valid.mean()
    assert torch.allclose(out[:6], expected[:, None].expand(6, 3), atol=1e-6)
    assert (out[6] == 0).all()
    dr_grpo = canonrl.advantages("dr_grpo", rewards=rewards, group=group, mask=mask)
    assert torch.equal(canonrl.advantages(template, rewards=rewards, group=group, mask=mask), dr_grpo)

    # its declarations reach the registry, the estimator table and the simulator
    info = next(i for i in canonrl.estimators() if i.name == template)
    assert info.outcome_level and info.group_local and info.simulator_alignment == "centred"
    assert f"| `{template}` |" in estimator_tables()["estimators"]
    assert not canonrl.get_estimator(template, shrink=0.25).group_local
    with pytest.raises(ValueError, match="shrink"):
        canonrl.get_estimator(template, shrink=2.0)
    # the declared locality holds: group 1's rewards move group 0 only when the batch mean is mixed in
    changed = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.5])
    for shrink in (0.0, 0.25):
        before = canonrl.advantages(template, rewards=rewards, group=group, mask=mask, shrink=shrink)[:3]
        after = canonrl.advantages(template, rewards=changed, group=group, mask=mask, shrink=shrink)[:3]
        assert torch.equal(before, after) == canonrl.get_estimator(template, shrink=shrink).group_local
