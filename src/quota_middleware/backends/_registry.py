"""Every operation a backend runs, in one static table: its Lua script and its Python twin.

A script is ``lua/<name>.lua`` (:func:`quota_middleware.scripts.source` gives the text Redis
runs); its twin implements the same KEYS / ARGV / return contract on the memory backend's store
and is the reference the Lua is property-tested against. A row without Lua is an operation only
the memory backend runs: on Redis its callers use plain commands. ``tests/test_scripts_registry.py``
checks that the table and ``lua/`` agree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from quota_middleware.backends import _memory_outbox as outbox
from quota_middleware.backends import _memory_scripts as twins
from quota_middleware.backends._memstore import MemoryStore

ScriptImpl = Callable[[MemoryStore, Sequence[str], Sequence[Any]], Any]


@dataclass(frozen=True, slots=True)
class Script:
    """One operation: its Lua file (``None``: the memory backend only) and its Python twin."""

    lua: str | None
    twin: ScriptImpl


#: script name -> (Lua file, Python twin)
SCRIPTS: Mapping[str, Script] = MappingProxyType(
    {
        "admit": Script("admit.lua", twins.admit),
        "settle": Script("settle.lua", twins.settle),
        "extend": Script("extend.lua", twins.extend),
        "renew": Script("renew.lua", twins.renew),
        "read": Script("read.lua", twins.read),
        "rank": Script("rank.lua", twins.rank),
        "budget_limit": Script("budget_limit.lua", twins.budget_limit),
        "control": Script("control.lua", twins.control),
        "margins": Script("margins.lua", twins.margins),
        "outbox_add": Script("outbox_add.lua", twins.outbox_add),
        "key_lookup": Script("key_lookup.lua", twins.key_lookup),
        "key_put": Script("key_put.lua", twins.key_put),
        "key_revoke": Script("key_revoke.lua", twins.key_revoke),
        "key_expire": Script("key_expire.lua", twins.key_expire),
        "key_list": Script("key_list.lua", twins.key_list),
        # the alert lanes' reads and dead letters: on Redis, stream commands (alerts/lanes.py)
        "alerts_claim": Script(None, outbox.alerts_claim),
        "alerts_dead": Script(None, outbox.alerts_dead),
        "alerts_recent": Script(None, outbox.alerts_recent),
    }
)
