"""What every backend shares: the protocols the adapters drive, and the circuit breaker."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from ..errors import StorageError
from ..scripts import ScriptCall

log = logging.getLogger("quota_middleware")


class SyncBackend(Protocol):
    def run(self, call: ScriptCall) -> Any: ...
    def close(self) -> None: ...


class AsyncBackend(Protocol):
    async def run_async(self, call: ScriptCall) -> Any: ...
    async def aclose(self) -> None: ...


class CircuitBreaker:
    """Closed -> open after ``failures`` consecutive errors; after ``reset`` seconds one probe is
    let through (half-open); success closes it, failure re-opens it with a doubled wait (capped).

    While open, calls fail at once instead of each waiting for a socket timeout, so an outage adds
    no latency to requests. Thread-safe; cheap enough for every call.
    """

    def __init__(
        self, failures: int = 3, reset: float = 2.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.failures = failures
        self.reset = reset
        self._clock = clock
        self._lock = threading.Lock()
        self._count = 0
        self._open_until = 0.0
        self._wait = reset
        self._probing = False

    @property
    def is_open(self) -> bool:
        return self._count >= self.failures

    def before(self) -> None:
        """Raise :class:`StorageError` when the circuit is open and this call is not the probe."""
        if self._count < self.failures:
            return
        with self._lock:
            if self._count < self.failures:
                return
            if self._probing or self._clock() < self._open_until:
                raise StorageError("store unavailable (circuit open)")
            self._probing = True

    def abandon(self) -> None:
        """The call was cancelled, or failed for a reason that says nothing about the store:
        record neither outcome, but never leave the circuit waiting for a probe that will not
        report (it would stay open forever)."""
        if self._probing:
            with self._lock:
                self._probing = False

    def success(self) -> None:
        if self._count or self._probing:
            with self._lock:
                if self._count >= self.failures:
                    log.warning("quota_middleware: store reachable again, circuit closed")
                self._count = 0
                self._probing = False
                self._wait = self.reset

    def failure(self) -> None:
        with self._lock:
            self._count += 1
            if self._count >= self.failures:
                if self._probing:
                    self._wait = min(self._wait * 2, 60.0)
                elif self._count == self.failures:
                    log.warning(
                        "quota_middleware: store failing, circuit open for %.1fs", self._wait
                    )
                self._open_until = self._clock() + self._wait
                self._probing = False
