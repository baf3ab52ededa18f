"""The Lua scripts' sources, and the plain value that asks a backend to run one.

Each operation is one file in ``lua/`` whose header states its KEYS / ARGV / return contract;
:data:`~quota_middleware.backends.registry.SCRIPTS` pairs each with its Python twin, which the
memory backend runs and the test suite checks against the Lua. Code shared by several scripts
lives in ``lua/prelude/``: a script names it with a ``-- #include prelude/<name>.lua`` line, and
:func:`source` returns the script with that line replaced (the text Redis runs and hashes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from importlib import resources
from typing import Any

ScriptArg = int | str | bytes


class Op(StrEnum):
    """The operation codes in the admit and settle scripts' argument lists. They are one letter
    each (the scripts' wire format, several per request); Python code names them, and the
    letters appear only here, in the Lua scripts and in their twins."""

    BUCKET = "b"  #: a token or request bucket
    SLOT = "c"  #: a concurrency slot
    QUOTA = "q"  #: a calendar counter (token quota, budget, app budget)
    #: in admit: a tenant's counter in the caller's slot (``hash_tag = "tenant"``), whose
    #: operator limit is the counter hash's ``<name>:limit`` field, not a caller override
    TENANT_QUOTA = "Q"
    EXPIRE = "e"  #: set a calendar key's expiry
    THRESHOLDS = "t"  #: crossing-threshold alerts of a counter
    HOURLY = "h"  #: the hourly spike counter
    USAGE = "u"  #: a usage counter field
    RANK = "r"  #: a member's score in a ranking (sorted set)


@dataclass(frozen=True, slots=True)
class ScriptCall:
    """Run script ``name`` with ``keys`` and ``args``: what the sans-IO core hands a backend."""

    name: str
    keys: tuple[str, ...]
    args: tuple[ScriptArg, ...]


def as_str(value: Any) -> str:
    """A reply value (or script argument) as text: Redis answers bytes, the memory store str."""
    if type(value) is str:
        return value
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def hash_pairs(flat: Any) -> dict[str, int]:
    """A flat ``HGETALL`` reply (``[field, value, ...]``) as ``{field: int}``; fields whose
    value is not an integer (markers, reservations) are left out."""
    out: dict[str, int] = {}
    for i in range(0, len(flat) - 1, 2):
        field = as_str(flat[i])
        try:
            out[field] = int(flat[i + 1])
        except (TypeError, ValueError):
            continue
    return out


_LUA = resources.files("quota_middleware").joinpath("lua")

# a line "-- #include prelude/<name>.lua": replaced with that prelude's code
_INCLUDE = re.compile(r"^-- #include (prelude/[a-z_]+\.lua)\n", re.MULTILINE)


def _raw(name: str) -> str:
    return _LUA.joinpath(f"{name}.lua").read_text("utf-8")


@cache
def _prelude(path: str) -> str:
    # its leading comment says what it is for; the scripts get only the code
    lines = _LUA.joinpath(path).read_text("utf-8").splitlines(keepends=True)
    while lines and lines[0].startswith("--"):
        del lines[0]
    return "".join(lines)


@cache
def source(name: str) -> str:
    """The Lua source of script ``name`` as Redis runs it (its preludes in place), read once
    from the package data."""
    return _INCLUDE.sub(lambda m: _prelude(m.group(1)), _raw(name))


#: every script in ``lua/``, sorted (their Python twins: ``backends/registry.py``)
SCRIPT_NAMES: tuple[str, ...] = tuple(
    sorted(p.name[: -len(".lua")] for p in _LUA.iterdir() if p.name.endswith(".lua"))
)
