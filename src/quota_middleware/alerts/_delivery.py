"""The middleware hook: a dispatcher in each app worker process (``deliver_in_process``)."""

from __future__ import annotations

import atexit
import logging
import os
import threading
from typing import Any

from quota_middleware.alerts._dispatcher import Dispatcher
from quota_middleware.backends.memory import MemoryBackend
from quota_middleware.config import QuotaConfig

# one logger for the whole package: its name is documented (README, LogSink)
log = logging.getLogger("quota_middleware.alerts")


# -- the middleware hook -------------------------------------------------------------------------
class InProcessDelivery:
    """One dispatcher per middleware instance and process, started lazily by the first request
    (after a pre-fork server forked its workers) in a daemon thread; stopped at exit."""

    def __init__(self, config: QuotaConfig, redis: Any = None, metrics: Any = None) -> None:
        self.config = config
        self._redis = redis
        self._metrics = metrics
        self._lock = threading.Lock()
        self._pid: int | None = None
        self.dispatcher: Dispatcher | None = None
        self._registered = False

    def ensure(self, backend: Any) -> None:
        """Start the dispatcher in this process if it is not running (cheap when it is)."""
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            source = backend if isinstance(backend, MemoryBackend) else (self._redis or backend)
            try:
                self.dispatcher = Dispatcher(source, self.config, metrics=self._metrics)
                self.dispatcher.start()
            except Exception as e:
                self.dispatcher = None
                log.warning("quota_middleware: alert delivery not started: %s", e)
                return
            if not self._registered:
                self._registered = True
                atexit.register(self.stop)

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            d, self.dispatcher = self.dispatcher, None
            self._pid = None
        if d is not None:
            d.stop(timeout)


def in_process_delivery(
    config: QuotaConfig, redis: Any = None, metrics: Any = None
) -> InProcessDelivery | None:
    """The adapters' hook: None unless ``config.alerts.deliver_in_process``."""
    alerts = config.alerts
    if alerts is None or not getattr(alerts, "deliver_in_process", False):
        return None
    return InProcessDelivery(config, redis, metrics)
