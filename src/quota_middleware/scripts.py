"""The single registry of Lua scripts, and the plain value that asks a backend to run one.

Each operation is one file in ``lua/`` whose header states its KEYS / ARGV / return contract. The
memory backend implements the same contract in Python (``backends/memory.py``); the test suite
checks that both agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

ScriptArg = int | str | bytes


@dataclass(frozen=True, slots=True)
class ScriptCall:
    """Run script ``name`` with ``keys`` and ``args``: what the sans-IO core hands a backend."""

    name: str
    keys: tuple[str, ...]
    args: tuple[ScriptArg, ...]


def hash_pairs(flat: Any) -> dict[str, int]:
    """A flat ``HGETALL`` reply (``[field, value, ...]``) as ``{field: int}``; fields whose
    value is not an integer (markers, reservations) are left out."""
    out: dict[str, int] = {}
    for i in range(0, len(flat) - 1, 2):
        field = flat[i].decode() if isinstance(flat[i], bytes) else str(flat[i])
        try:
            out[field] = int(flat[i + 1])
        except (TypeError, ValueError):
            continue
    return out


@cache
def source(name: str) -> str:
    """The Lua source of script ``name``, read once from the package data."""
    return resources.files(__package__).joinpath("lua").joinpath(f"{name}.lua").read_text("utf-8")


SCRIPT_NAMES = (
    "admit",
    "settle",
    "extend",
    "read",
    "margins",
    "outbox_add",
    "key_lookup",
    "key_put",
    "key_revoke",
    "key_list",
)
