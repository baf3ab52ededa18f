"""The :class:`Dispatcher`: reads the outbox and delivers every event to every sink."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from typing import Any, Protocol

from quota_middleware.alerts._config import AlertsConfig
from quota_middleware.alerts._lanes import _MemoryLane, _RedisLane
from quota_middleware.alerts._outbox import dead_key
from quota_middleware.alerts._sinks import Sink
from quota_middleware.backends.memory import MemoryBackend
from quota_middleware.base._events import AlertEvent, outbox_key
from quota_middleware.config import QuotaConfig, StorageConfig
from quota_middleware.errors import ConfigurationError, DeliveryError

# one logger for the whole package: its name is documented (README, LogSink)
log = logging.getLogger("quota_middleware.alerts")


# -- the dispatcher ------------------------------------------------------------------------------
def _consumer_name() -> str:
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{os.urandom(3).hex()}"


def _is_async_client(client: Any) -> bool:
    import redis.asyncio as redis_async
    from redis.asyncio.cluster import RedisCluster

    return isinstance(client, redis_async.Redis | RedisCluster)


def _sync_client(source: Any, storage: StorageConfig | None) -> tuple[Any, bool]:
    """A sync redis client for ``source`` (a backend, a client, or None), and whether we own it."""
    from quota_middleware.backends.redis import client_from_url

    # a backend (it has run()/run_async()) wraps its client
    client = source.client if hasattr(source, "breaker") else source
    if client is not None and not _is_async_client(client):
        return client, False
    timeout = max(storage.timeout, 5.0) if storage is not None else 5.0
    if storage is not None and not storage.is_memory:
        return client_from_url(storage.url, timeout=timeout, asyncio=False), True
    pool = getattr(client, "connection_pool", None)
    kwargs = dict(getattr(pool, "connection_kwargs", {}) or {})
    if kwargs:
        import redis

        keep = ("host", "port", "db", "username", "password", "path")
        opts = {k: kwargs[k] for k in keep if kwargs.get(k) is not None}
        if "path" in opts:
            opts["unix_socket_path"] = opts.pop("path")
        return redis.Redis(socket_timeout=timeout, socket_connect_timeout=timeout, **opts), True
    raise ConfigurationError(
        "storage.url", "alert delivery needs a Redis URL (or a sync redis client) to connect to"
    )


class _Lane(Protocol):
    sink: Sink

    def step(self) -> int: ...


class Dispatcher:
    """Reads the outbox and delivers every event to every sink of ``config``.

    :param source: a :class:`MemoryBackend`, a sync Redis backend or client (``redis.Redis`` /
        ``RedisCluster``), an async one (a sync client is then built from ``storage.url`` or the
        async client's connection settings: the dispatcher runs in a thread), or None for
        ``config.storage.url``.
    :param config: a :class:`QuotaConfig` (its ``alerts``, ``storage`` and prefix) or an
        :class:`AlertsConfig`.
    :param prefix: the key prefix (default: ``config.storage.prefix``, or ``"qm"``).
    :param consumer: this consumer's name in the groups (default ``host-pid-random``).
    """

    def __init__(
        self,
        source: Any,
        config: QuotaConfig | AlertsConfig,
        *,
        prefix: str | None = None,
        consumer: str | None = None,
        storage: StorageConfig | None = None,
        metrics: Any = None,
    ) -> None:
        #: a :class:`~quota_middleware.metrics.PrometheusMetrics`: deliveries and failures
        self.metrics = metrics
        if isinstance(config, QuotaConfig):
            if config.alerts is None:
                raise ConfigurationError("alerts", "no [alerts] sinks configured")
            storage = storage or config.storage
            alerts: AlertsConfig = config.alerts
        else:
            alerts = config
        self.config = alerts
        self.prefix = prefix or (storage.prefix if storage is not None else "qm")
        self.consumer = consumer or _consumer_name()
        self.stream = outbox_key(self.prefix)
        self.dead_stream = dead_key(self.prefix)
        self._owned = False
        self.memory: MemoryBackend | None = None
        self.client: Any = None
        if source is None and storage is not None and storage.is_memory:
            raise ConfigurationError(
                "storage.url",
                "the memory backend's outbox lives inside the app process: pass its backend, "
                "or use Redis for a separate alert worker",
            )
        if isinstance(source, MemoryBackend):
            self.memory = source
        else:
            self.client, self._owned = _sync_client(source, storage)
        self.lanes: list[_Lane] = [
            _MemoryLane(self, s) if self.memory is not None else _RedisLane(self, s)
            for s in alerts.sinks
        ]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._errors_logged: dict[str, float] = {}

    # -- running ------------------------------------------------------------------------------
    def run_once(self) -> int:
        """Deliver whatever is ready on every sink (new entries, retries that are due); the
        number of successful deliveries."""
        return sum(self._step(lane) for lane in self.lanes)

    def _step(self, lane: _Lane) -> int:
        try:
            return lane.step()
        except Exception as e:  # the store is down, or a bug: keep the thread alive
            self._warn(lane.sink.name, f"alert delivery to {lane.sink.describe()} failed: {e!r}")
            return 0

    def _warn(self, key: str, message: str) -> None:
        now = time.monotonic()
        if now - self._errors_logged.get(key, -1e9) >= 60:
            self._errors_logged[key] = now
            log.warning("quota_middleware: %s", message)

    def _lane_loop(self, lane: _Lane, stop: threading.Event) -> None:
        while not stop.is_set():
            if self._step(lane) == 0:
                stop.wait(self.config.poll_interval)

    def run_forever(self, stop: threading.Event | None = None) -> None:
        """Deliver until ``stop`` is set (one thread per sink, so a slow sink delays no other)."""
        stop = stop or self._stop
        threads = [
            threading.Thread(target=self._lane_loop, args=(lane, stop), daemon=True,
                             name=f"quota-alerts-{lane.sink.name}")
            for lane in self.lanes[1:]
        ]  # fmt: skip
        for t in threads:
            t.start()
        try:
            if self.lanes:
                self._lane_loop(self.lanes[0], stop)
            else:
                stop.wait()
        finally:
            stop.set()
            for t in threads:
                t.join()

    def start(self) -> None:
        """Deliver in a daemon thread until :meth:`stop`."""
        if self._threads and self._threads[0].is_alive():
            return
        self._stop.clear()
        t = threading.Thread(target=self.run_forever, args=(self._stop,), daemon=True,
                             name="quota-alerts")  # fmt: skip
        self._threads = [t]
        t.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (after the delivery in flight) and release what this consumer holds."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        self._threads = []
        if self.client is not None:
            for lane in self.lanes:
                if isinstance(lane, _RedisLane):
                    with contextlib.suppress(Exception):
                        lane.forget_consumer()
            if self._owned:
                with contextlib.suppress(Exception):
                    self.client.close()

    # -- shared by the lanes ------------------------------------------------------------------
    def attempt(self, sink: Sink, raw: Any) -> str | None:
        """Deliver one entry's JSON to ``sink``: None on success, else the error."""
        if raw is None:
            return "malformed outbox entry: no event field"
        try:
            event = AlertEvent.from_json(raw)
        except (ValueError, TypeError) as e:
            return f"malformed outbox entry: {e}"
        try:
            sink.send(event)
        except Exception as e:
            if self.metrics is not None:
                self.metrics.alert(event, "failed")
            return str(e) if isinstance(e, DeliveryError) else f"{type(e).__name__}: {e}"
        if self.metrics is not None:
            self.metrics.alert(event, "delivered")
        return None

    def dead_fields(
        self, sink: Sink, group: str, eid: str, raw: Any, error: str, attempts: int
    ) -> dict[str, Any]:
        log.warning(
            "quota_middleware: alert %s to %s dead-lettered after %d attempts: %s",
            eid, sink.describe(), attempts, error,
        )  # fmt: skip
        return {
            "event": raw if raw is not None else b"",
            "sink": sink.name,
            "group": group,
            "entry": eid,
            "error": error[:500],
            "attempts": str(attempts),
            "at": f"{time.time():.3f}",
        }
