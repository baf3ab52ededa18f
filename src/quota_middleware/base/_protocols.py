"""What every backend shares: the protocols the adapters drive, and the circuit breaker."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from quota_middleware.base._scripts import ScriptCall
from quota_middleware.errors import StorageError

#: ``(call name, seconds, ok)`` after each store call, e.g. ``PrometheusMetrics.store``
Observer = Callable[[str, float, bool], None]

log = logging.getLogger("quota_middleware")


class SyncBackend(Protocol):
    def run(self, call: ScriptCall) -> Any: ...
    def close(self) -> None: ...


class AsyncBackend(Protocol):
    async def run_async(self, call: ScriptCall) -> Any: ...
    async def aclose(self) -> None: ...


class CircuitBreaker:
    """Closed -> open after ``failures`` consecutive errors. While open, one probe call is let
    through every ``reset`` seconds (half-open): success closes the circuit, failure keeps it
    open for another ``reset`` seconds.

    While open, calls fail at once instead of each waiting for a socket timeout, so an outage adds
    no latency to requests. Thread-safe; cheap enough for every call (a closed circuit costs one
    attribute read, no lock).

    The probe interval is constant on purpose. A wait that doubles after each failed probe makes
    recovery take about as long as the outage did (after 30 s down, the next probe could be 30 s
    after Redis is back), and a probe is only one connection attempt per process per ``reset``
    seconds, nothing a recovering server notices. So once the store answers again, calls succeed
    within ``reset`` seconds plus the probe's own duration (at most the socket timeout), given
    traffic to carry the probe.
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

    def failure(self) -> None:
        with self._lock:
            self._count += 1
            if self._count >= self.failures:
                if self._count == self.failures:
                    log.warning(
                        "quota_middleware: store failing, circuit open, probing every %.1fs",
                        self.reset,
                    )
                # A failed probe, or a call that was already in flight when the circuit
                # opened: either way the store just failed, so the next probe is one full
                # interval from now (never later: the interval does not grow).
                self._open_until = self._clock() + self.reset
                self._probing = False
