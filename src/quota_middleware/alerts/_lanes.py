"""A dispatcher's per-sink delivery state: a consumer group on Redis, a cursor on the memory
backend; with the retry, backoff and dead-letter rules of the package docs."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from quota_middleware.alerts._outbox import _cursor_key
from quota_middleware.alerts._sinks import Sink
from quota_middleware.base._scripts import ScriptCall, as_str

if TYPE_CHECKING:
    from quota_middleware.alerts._dispatcher import Dispatcher

# Tunables, read at run time (tests set ``quota_middleware.alerts.lanes.PRUNE_EVERY``)
#: entries kept in the dead-letter stream (approximately)
DEAD_MAXLEN = 10_000
#: how often (s) a dispatcher removes consumers that hold nothing and were idle PRUNE_IDLE_MS
PRUNE_EVERY = 600.0
PRUNE_IDLE_MS = 3_600_000

# one logger for the whole package: its name is documented (README, LogSink)
log = logging.getLogger("quota_middleware.alerts")


def _is_malformed(error: str) -> bool:
    return error.startswith("malformed outbox entry")


class _RedisLane:
    """One sink's consumer group on the outbox stream."""

    def __init__(self, d: Dispatcher, sink: Sink) -> None:
        self.d = d
        self.sink = sink
        self.group = f"{d.config.group}:{sink.name}"
        self.ready = False
        self.errors: dict[str, str] = {}
        self.pruned = time.monotonic()

    def _ensure_group(self) -> None:
        if self.ready:
            return
        try:
            start = self.d.config.start_id()
            self.d.client.xgroup_create(self.d.stream, self.group, id=start, mkstream=True)
        except Exception as e:
            if "BUSYGROUP" not in str(e):
                raise
        self.ready = True

    def step(self) -> int:
        self._ensure_group()
        try:
            n = self._retry_pending()
            n += self._read_new()
            if time.monotonic() - self.pruned > PRUNE_EVERY:
                self.pruned = time.monotonic()
                self._prune()
        except Exception as e:
            if "NOGROUP" in str(e):  # the stream or the group was deleted: create it again
                self.ready = False
                return 0
            raise
        return n

    def _read_new(self) -> int:
        c, d = self.d.client, self.d
        reply = c.xreadgroup(self.group, d.consumer, {d.stream: ">"}, count=d.config.batch)
        n = 0
        for _stream, entries in reply or ():
            for eid, fields in entries:
                n += self._deliver(as_str(eid), _field(fields), attempts=1)
        return n

    def _retry_pending(self) -> int:
        c, d, cfg = self.d.client, self.d, self.d.config
        rows = c.xpending_range(
            d.stream, self.group, min="-", max="+", count=cfg.batch,
            idle=max(1, int(cfg.backoff * 1000)),
        )  # fmt: skip
        n = 0
        for row in rows:
            eid = as_str(row["message_id"])
            tries = int(row["times_delivered"])
            need = cfg.delay(tries)
            if as_str(row["consumer"]) != d.consumer:
                need = max(need, cfg.claim_idle)  # a silent consumer: maybe dead, maybe slow
            need_ms = int(need * 1000)
            if int(row["time_since_delivered"]) < need_ms:
                continue
            # atomic take-over: if another consumer claimed it meanwhile, its idle time was
            # reset and this claim returns nothing
            claimed = c.xclaim(d.stream, self.group, d.consumer, need_ms, [eid])
            if not claimed or claimed[0] is None:
                continue
            fields = _field(claimed[0][1])
            if tries >= cfg.max_attempts:  # its last attempt failed, then its consumer died
                error = self.errors.pop(eid, "delivery failed (consumer gone)")
                self._dead(eid, fields, error, tries)
                continue
            n += self._deliver(eid, fields, attempts=tries + 1)
        return n

    def _deliver(self, eid: str, raw: Any, attempts: int) -> int:
        c, d = self.d.client, self.d
        error = d.attempt(self.sink, raw)
        if error is None:
            c.xack(d.stream, self.group, eid)
            self.errors.pop(eid, None)
            return 1
        if attempts >= d.config.max_attempts or _is_malformed(error):
            self._dead(eid, raw, error, attempts)
            return 0
        self.errors[eid] = error
        log.info("quota_middleware: alert %s to %s failed (attempt %d): %s",
                 eid, self.sink.describe(), attempts, error)  # fmt: skip
        # restart the entry's idle clock without counting a delivery: the backoff runs from now
        c.xclaim(d.stream, self.group, d.consumer, 0, [eid], justid=True)
        return 0

    def _dead(self, eid: str, raw: Any, error: str, attempts: int) -> None:
        c, d = self.d.client, self.d
        fields = d.dead_fields(self.sink, self.group, eid, raw, error, attempts)
        c.xadd(d.dead_stream, fields, maxlen=DEAD_MAXLEN, approximate=True)
        c.xack(d.stream, self.group, eid)
        self.errors.pop(eid, None)

    def _prune(self) -> None:
        """Remove consumers that hold nothing and have not been seen for a long time (workers
        that were killed): a live consumer reads every ``poll_interval``, so it is never idle
        that long, and one that holds entries is kept until they are taken over."""
        c, d = self.d.client, self.d
        for info in c.xinfo_consumers(d.stream, self.group):
            name = as_str(info["name"])
            if int(info["pending"]) == 0 and int(info["idle"]) > PRUNE_IDLE_MS:
                if name != d.consumer:
                    c.xgroup_delconsumer(d.stream, self.group, name)

    def forget_consumer(self) -> None:
        """Remove this consumer from the group if it holds nothing (a tidy shutdown)."""
        if not self.ready:
            return
        c, d = self.d.client, self.d
        mine = c.xpending_range(d.stream, self.group, min="-", max="+", count=1,
                                consumername=d.consumer)  # fmt: skip
        if not mine:
            c.xgroup_delconsumer(d.stream, self.group, d.consumer)


def _field(fields: Any) -> Any:
    if not isinstance(fields, Mapping):
        return None
    return fields.get(b"event", fields.get("event"))


class _MemoryLane:
    """One sink's cursor on the memory backend's outbox, with its failed entries."""

    def __init__(self, d: Dispatcher, sink: Sink) -> None:
        self.d = d
        self.sink = sink
        self.group = f"{d.config.group}:{sink.name}"
        # entry id -> [failed attempts, due (monotonic), raw event, last error]
        self.pending: dict[str, list[Any]] = {}

    def _run(self, name: str, keys: tuple[str, ...], args: tuple[Any, ...]) -> Any:
        assert self.d.memory is not None
        return self.d.memory.run(ScriptCall(name, keys, args))

    def step(self) -> int:
        d = self.d
        n = 0
        now = time.monotonic()
        for eid, (failures, due, raw, _err) in list(self.pending.items()):
            if due <= now:
                n += self._deliver(eid, raw, failures + 1)
        got = self._run("alerts_claim", (d.stream, _cursor_key(d.prefix)),
                        (self.group, d.config.batch, d.config.start_id()))  # fmt: skip
        for eid, raw in got:
            n += self._deliver(eid, raw, 1)
        return n

    def _deliver(self, eid: str, raw: Any, attempts: int) -> int:
        d = self.d
        error = d.attempt(self.sink, raw)
        if error is None:
            self.pending.pop(eid, None)
            return 1
        if attempts >= d.config.max_attempts or _is_malformed(error):
            self.pending.pop(eid, None)
            fields = d.dead_fields(self.sink, self.group, eid, raw, error, attempts)
            flat: list[Any] = [DEAD_MAXLEN]
            for k, v in fields.items():
                flat += [k, v]
            self._run("alerts_dead", (d.dead_stream,), tuple(flat))
            return 0
        log.info("quota_middleware: alert %s to %s failed (attempt %d): %s",
                 eid, self.sink.describe(), attempts, error)  # fmt: skip
        self.pending[eid] = [attempts, time.monotonic() + d.config.delay(attempts), raw, error]
        return 0
