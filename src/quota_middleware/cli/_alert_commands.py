"""``quota-middleware alerts run | tail | test`` (wired in :mod:`quota_middleware.cli.alerts`)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

from quota_middleware.alerts._config import AlertsConfig
from quota_middleware.alerts._dispatcher import Dispatcher
from quota_middleware.alerts._outbox import read_stream
from quota_middleware.alerts._text import format_text
from quota_middleware.base._events import AlertEvent, outbox_key
from quota_middleware.base._scripts import as_str
from quota_middleware.config import QuotaConfig


def _need_redis(config: QuotaConfig, err: TextIO) -> bool:
    if config.storage.is_memory:
        print(
            "quota-middleware: the memory backend's alert outbox lives inside the app process; "
            "set [storage] url (or QUOTA_REDIS_URL) to a Redis URL",
            file=err,
        )
        return False
    return True


def cli_run(
    config: QuotaConfig,
    *,
    once: bool = False,
    stop: threading.Event | None = None,
    err: TextIO | None = None,
) -> int:
    """``quota-middleware alerts run``: a separate delivery worker (set ``deliver_in_process =
    false`` in the app's policy). Runs until SIGTERM/SIGINT (or ``stop``); ``once``: deliver what
    is ready and exit. Any number of workers may run: they share the consumer groups."""
    err = err or sys.stderr
    if config.alerts is None:
        print("quota-middleware: no [alerts] table in the policy: nothing to deliver to", file=err)
        return 2
    if not _need_redis(config, err):
        return 2
    dispatcher = Dispatcher(None, config)
    if once:
        try:
            n = dispatcher.run_once()
        finally:
            dispatcher.stop()
        print(f"delivered {n}", file=err)
        return 0
    stop = stop or threading.Event()
    restore: list[tuple[signal.Signals, Any]] = []
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            restore.append((sig, signal.getsignal(sig)))
            signal.signal(sig, lambda *_: stop.set())
    sinks = ", ".join(s.describe() for s in dispatcher.config.sinks)
    print(f"quota-middleware: delivering alerts as {dispatcher.consumer} to {sinks}", file=err)
    try:
        dispatcher.run_forever(stop)
    finally:
        dispatcher.stop()
        for sig, handler in restore:
            signal.signal(sig, handler)
    return 0


def _tail_line(eid: str, fields: Mapping[str, bytes], as_json: bool) -> str:
    raw = fields.get("event", b"")
    if as_json:
        return raw.decode("utf-8", "replace")
    try:
        event = AlertEvent.from_json(raw)
    except (ValueError, TypeError):
        return f"{eid}  (malformed entry)"
    when = datetime.fromtimestamp(event.at or 0, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    text = format_text(event)
    if text.startswith(":"):  # drop the Slack emoji
        text = text.split(" ", 1)[-1]
    return f"{when}  {event.type:<13}  {event.id}  {text}"


def cli_tail(
    config: QuotaConfig,
    *,
    follow: bool = False,
    count: int = 20,
    as_json: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
    stop: threading.Event | None = None,
    poll: float = 0.5,
) -> int:
    """``quota-middleware alerts tail``: the newest ``count`` outbox events, oldest first (one
    JSON object a line with ``as_json``); ``follow`` keeps printing new ones until interrupted.
    Reads only: it takes nothing from the delivery groups."""
    out = out or sys.stdout
    err = err or sys.stderr
    if not _need_redis(config, err):
        return 2
    from quota_middleware.backends.redis import client_from_url

    client = client_from_url(
        config.storage.url, timeout=max(config.storage.timeout, 5.0), asyncio=False
    )
    key = outbox_key(config.storage.prefix)
    stop = stop or threading.Event()
    try:
        rows = read_stream(client, key, count=count) if count > 0 else []
        for eid, fields in rows:
            print(_tail_line(eid, fields, as_json), file=out)
        out.flush()
        if rows:
            last = rows[-1][0]
        else:
            newest = client.xrevrange(key, count=1)
            last = as_str(newest[0][0]) if newest else "0-0"
        while follow and not stop.is_set():
            rows = read_stream(client, key, count=1000, after=last)
            for eid, fields in rows:
                print(_tail_line(eid, fields, as_json), file=out)
            if rows:
                last = rows[-1][0]
                out.flush()
            else:
                stop.wait(poll)
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
    return 0


def sample_event() -> AlertEvent:
    """The synthetic event ``alerts test`` sends (type ``"test"``)."""
    now = time.time()
    return AlertEvent(
        id=f"test:{os.urandom(6).hex()}", type="test", caller=None, tenant=None, plan=None,
        limit="test", period=datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d"),
        threshold=None, used=0, limit_value=None, unit="tokens", at=now,
    )  # fmt: skip


def cli_test(config: QuotaConfig, out: TextIO | None = None) -> int:
    """``quota-middleware alerts test``: send a test event straight to every configured sink
    (not through the outbox) and report each; exit status 1 if any failed."""
    out = out or sys.stdout
    alerts: AlertsConfig | None = config.alerts
    if alerts is None or not alerts.sinks:
        print("no alert sinks configured (add an [alerts] table)", file=out)
        return 2
    event = sample_event()
    failed = 0
    for sink in alerts.sinks:
        try:
            sink.send(event)
        except Exception as e:
            failed += 1
            print(f"FAILED  {sink.describe()}: {e}", file=out)
        else:
            print(f"OK      {sink.describe()}", file=out)
    return 1 if failed else 0
