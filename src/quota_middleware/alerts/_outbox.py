"""The outbox's keys, and reading it (its operations on the memory backend:
``backends/memory_outbox.py``)."""

from __future__ import annotations

from typing import Any

from quota_middleware.alerts._sinks import _b
from quota_middleware.backends.memory import MemoryBackend
from quota_middleware.base._events import AlertEvent, outbox_key
from quota_middleware.base._scripts import ScriptCall, as_str


def dead_key(prefix: str) -> str:
    return f"{outbox_key(prefix)}:dead"


def _cursor_key(prefix: str) -> str:
    return f"{outbox_key(prefix)}:cursors"


# -- reading the outbox (tail, tests, admin pages) -----------------------------------------------
def read_stream(
    source: Any, key: str, *, count: int = 20, after: str | None = None
) -> list[tuple[str, dict[str, bytes]]]:
    """Entries of stream ``key`` (the outbox or the dead letters), oldest first: the newest
    ``count``, or up to ``count`` after id ``after``. ``source``: a memory backend or a sync
    Redis backend / client."""
    if isinstance(source, MemoryBackend):
        rows = source.run(ScriptCall("alerts_recent", (key,), (count, after or "")))
        return [(as_str(eid), {as_str(k): _b(v) for k, v in f.items()}) for eid, f in rows]
    client = source.client if hasattr(source, "breaker") else source
    if after:
        raw = client.xrange(key, min=f"({after}", max="+", count=count)
    else:
        raw = list(reversed(client.xrevrange(key, max="+", min="-", count=count)))
    return [(as_str(eid), {as_str(k): _b(v) for k, v in f.items()}) for eid, f in raw]


def outbox_events(source: Any, prefix: str = "qm", count: int = 1000) -> list[AlertEvent]:
    """The newest ``count`` events in the outbox, oldest first."""
    return [
        AlertEvent.from_json(f["event"])
        for _eid, f in read_stream(source, outbox_key(prefix), count=count)
        if "event" in f
    ]
