"""Each fine-grained estimator's ``works_in`` (what docs/estimators.md and the README say) agrees with what the verl
and TRL integrations accept: registered with verl or not, refused by canonrl's TRL GRPOTrainer or not. (Outcome-level
estimators are all registered with verl, whose call then names an input verl lacks.)"""

from __future__ import annotations

import re

import pytest

pytest.importorskip("verl")
pytest.importorskip("trl")

from canonrl.integrations import trl as ct  # noqa: E402
from canonrl.integrations import verl as cv  # noqa: E402
from canonrl.registry import estimators  # noqa: E402


def says_no(works_in: str, framework: str) -> bool:
    """'verl, TRL: no' and 'TRL: no' say no; a framework left out says no too."""
    if framework not in works_in:
        return True
    return re.search(rf"{framework}(, \w+)*: no\b|(\w+, )+{framework}: no\b", works_in) is not None


@pytest.fixture(scope="module")
def in_verl() -> set[str]:
    return set(cv.register_all().values())


def trl_accepts(name: str) -> bool:
    try:
        ct._build_estimator(name, {}, ct.HOOK_INPUTS)  # with every per-turn input a subclass could supply
    except ValueError:
        return False
    return True


FINE_GRAINED = [info.name for info in estimators() if not info.outcome_level]


@pytest.mark.parametrize("name", FINE_GRAINED)
def test_works_in_says_what_the_integrations_do(name, in_verl):
    info = next(i for i in estimators() if i.name == name)
    assert (name in in_verl) != says_no(info.works_in, "verl"), f"{name}: verl in {info.works_in!r}"
    assert trl_accepts(name) != says_no(info.works_in, "TRL"), f"{name}: TRL in {info.works_in!r}"


def test_says_no_reads_the_registry_phrases():
    assert says_no("library, lab (branching); verl, TRL: no", "verl") and says_no("lab; verl, TRL: no", "TRL")
    assert not says_no("library, lab, verl (agent-loop layout), TRL (tool turns)", "TRL")
    assert says_no("library, lab, verl: no, TRL: no", "verl") and not says_no("verl (with the patch), TRL: no", "verl")
