"""Seeds derived from names: every random draw of the lab comes from a generator seeded by (run seed, purpose, step,
...), never from global RNG state, so a resumed run repeats the uninterrupted one exactly."""

from __future__ import annotations

import hashlib


def seed_of(*parts: object) -> int:
    """A 62-bit seed from the parts' text (stable across processes and Python versions, unlike ``hash``)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 62) - 1)
