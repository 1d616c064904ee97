"""``key=value`` overrides, parsed one way for every command that takes them (`canonrl train`, `canonrl simulate`).

A value is YAML (``0.5``, ``1e-3``, ``true``, ``null``, ``[1, 2]``, ``{a: 1}``; a bare word is a string); a dotted
key (``estimator_params.mu=0.5``, ``model.length_corr=-0.5``) sets one entry of a mapping.
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class OverrideError(ValueError):
    """A malformed override; the message is one line."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` as a string (a float needs a dot there); users mean a number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str) -> Any:
    """YAML with `1e-3` read as a number."""
    return yaml.load(text, Loader=_Loader)


def parse_override(item: str, example: str = "key=value") -> tuple[str, str, Any]:
    """(head, rest, value) of ``head[.rest]=value``: the key's first part, the rest after its first dot ("" when
    there is none) and the parsed value (None for an empty one)."""
    if "=" not in item:
        raise OverrideError(f"override {item!r} is not key=value (e.g. {example})")
    key, raw = item.split("=", 1)
    try:
        value = parse_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise OverrideError(f"override {item!r}: value is not valid YAML") from None
    head, _, rest = key.strip().lstrip("+").partition(".")
    return head, rest, value
