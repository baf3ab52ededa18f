"""The outbox's keys, its operations on the memory backend (registered in
:data:`~quota_middleware.backends.memory.SCRIPTS` on import), and reading it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..backends.memory import SCRIPTS, MemoryBackend
from ..backends.memstore import MemoryStore
from ..events import AlertEvent, outbox_key
from ..scripts import ScriptCall
from .sinks import _b


def dead_key(prefix: str) -> str:
    return f"{outbox_key(prefix)}:dead"


def _cursor_key(prefix: str) -> str:
    return f"{outbox_key(prefix)}:cursors"


# -- memory backend: the outbox operations as scripts (run under the backend's lock) -------------
def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _mem_claim(store: MemoryStore, keys: Sequence[str], argv: Sequence[Any]) -> list[Any]:
    """KEYS: outbox, cursors hash. ARGV: lane, count, start id (for a new lane). The next
    entries after the lane's cursor, and the cursor moved past them (a group's ``>`` read)."""
    lane, count = _s(argv[0]), int(argv[1])
    cursor = store.hget(keys[1], lane)
    after = cursor.decode() if cursor is not None else _s(argv[2])
    entries = store.xrange(keys[0], after)[:count]
    if entries:
        store.hset(keys[1], {lane: entries[-1][0].encode()})
    return [[eid, fields.get("event")] for eid, fields in entries]


def _mem_dead(store: MemoryStore, keys: Sequence[str], argv: Sequence[Any]) -> str:
    """KEYS: dead-letter stream. ARGV: maxlen, then field, value pairs."""
    fields = {_s(argv[i]): _b(argv[i + 1]) for i in range(1, len(argv) - 1, 2)}
    return store.xadd(keys[0], fields, maxlen=int(argv[0]))


def _mem_recent(store: MemoryStore, keys: Sequence[str], argv: Sequence[Any]) -> list[Any]:
    """KEYS: a stream. ARGV: count, after id ("" for the newest ``count``)."""
    count, after = int(argv[0]), _s(argv[1])
    if after:
        entries = store.xrange(keys[0], after)[:count]
    else:
        entries = store.xrange(keys[0])[-count:]
    return [[eid, fields] for eid, fields in entries]


SCRIPTS.setdefault("alerts_claim", _mem_claim)
SCRIPTS.setdefault("alerts_dead", _mem_dead)
SCRIPTS.setdefault("alerts_recent", _mem_recent)


# -- reading the outbox (tail, tests, admin pages) -----------------------------------------------
def read_stream(
    source: Any, key: str, *, count: int = 20, after: str | None = None
) -> list[tuple[str, dict[str, bytes]]]:
    """Entries of stream ``key`` (the outbox or the dead letters), oldest first: the newest
    ``count``, or up to ``count`` after id ``after``. ``source``: a memory backend or a sync
    Redis backend / client."""
    if isinstance(source, MemoryBackend):
        rows = source.run(ScriptCall("alerts_recent", (key,), (count, after or "")))
        return [(_s(eid), {_s(k): _b(v) for k, v in f.items()}) for eid, f in rows]
    client = source.client if hasattr(source, "breaker") else source
    if after:
        raw = client.xrange(key, min=f"({after}", max="+", count=count)
    else:
        raw = list(reversed(client.xrevrange(key, max="+", min="-", count=count)))
    return [(_s(eid), {_s(k): _b(v) for k, v in f.items()}) for eid, f in raw]


def outbox_events(source: Any, prefix: str = "qm", count: int = 1000) -> list[AlertEvent]:
    """The newest ``count`` events in the outbox, oldest first."""
    return [
        AlertEvent.from_json(f["event"])
        for _eid, f in read_stream(source, outbox_key(prefix), count=count)
        if "event" in f
    ]
