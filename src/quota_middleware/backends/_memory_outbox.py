"""The alert lanes' operations on the memory backend's outbox (``alerts/lanes.py``,
``alerts/outbox.py``), run under the backend's lock like the scripts' twins.

They have no Lua: on Redis the lanes use the stream commands themselves (a consumer group per
sink, XRANGE to read), and these give the memory backend's streams the same shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from quota_middleware.backends._memstore import MemoryStore
from quota_middleware.base._scripts import as_str


def _b(v: str | bytes) -> bytes:
    return v.encode() if isinstance(v, str) else v


def alerts_claim(store: MemoryStore, keys: Sequence[str], argv: Sequence[Any]) -> list[Any]:
    """KEYS: outbox, cursors hash. ARGV: lane, count, start id (for a new lane). The next
    entries after the lane's cursor, and the cursor moved past them (a group's ``>`` read)."""
    lane, count = as_str(argv[0]), int(argv[1])
    cursor = store.hget(keys[1], lane)
    after = cursor.decode() if cursor is not None else as_str(argv[2])
    entries = store.xrange(keys[0], after)[:count]
    if entries:
        store.hset(keys[1], {lane: entries[-1][0].encode()})
    return [[eid, fields.get("event")] for eid, fields in entries]


def alerts_dead(store: MemoryStore, keys: Sequence[str], argv: Sequence[Any]) -> str:
    """KEYS: dead-letter stream. ARGV: maxlen, then field, value pairs."""
    fields = {as_str(argv[i]): _b(argv[i + 1]) for i in range(1, len(argv) - 1, 2)}
    return store.xadd(keys[0], fields, maxlen=int(argv[0]))


def alerts_recent(store: MemoryStore, keys: Sequence[str], argv: Sequence[Any]) -> list[Any]:
    """KEYS: a stream. ARGV: count, after id ("" for the newest ``count``)."""
    count, after = int(argv[0]), as_str(argv[1])
    if after:
        entries = store.xrange(keys[0], after)[:count]
    else:
        entries = store.xrange(keys[0])[-count:]
    return [[eid, fields] for eid, fields in entries]
