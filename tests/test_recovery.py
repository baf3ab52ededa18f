"""Coming back from a Redis outage: the circuit breaker lets traffic through again within
``breaker_reset`` of Redis answering, however long the outage was.

The Redis here is killed with SIGKILL (no shutdown: its kernel closes the sockets, as in a
crash) and restarted on the same port by the test, with the data gone.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness import Harness
from quota_middleware import Plan, QuotaConfig, RequestRate, StorageConfig
from quota_middleware.backends.base import CircuitBreaker
from quota_middleware.errors import StorageError
from servers import RedisServer

ADAPTERS = ["asgi", "wsgi"]


class _URLBackend:
    """No backend passed: the middleware builds its clients from ``storage.url``, with the real
    timeouts, retry settings and circuit breaker."""

    def sync(self) -> None:
        return None

    def async_(self) -> None:
        return None


def _config(url: str, *, rate: str = "10/hour", reset: float = 0.3) -> QuotaConfig:
    return QuotaConfig(
        plans=[Plan(name="p", on_error="closed", limits=[RequestRate(rate=rate, name="r")])],
        storage=StorageConfig(url=url, timeout=0.2, breaker_failures=2, breaker_reset=reset),
    )


# -- the circuit breaker: a bounded probe interval ----------------------------------------------
def test_breaker_probes_at_a_constant_interval_however_long_the_outage() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failures=2, reset=1.0, clock=lambda: now[0])
    breaker.failure()
    breaker.failure()
    assert breaker.is_open
    probes: list[float] = []
    while now[0] < 120:  # two minutes down, a call every 50 ms
        try:
            breaker.before()
        except StorageError:
            pass
        else:
            probes.append(now[0])
            breaker.failure()  # the probe failed too
        now[0] = round(now[0] + 0.05, 2)
    gaps = {round(b - a, 2) for a, b in zip(probes, probes[1:], strict=False)}
    assert gaps == {1.0}, gaps  # a doubling wait would have reached 64 s
    # Redis is back just after a failed probe: the next call a full interval later is the probe
    back = now[0]
    while True:
        try:
            breaker.before()
            break
        except StorageError:
            now[0] = round(now[0] + 0.05, 2)
    breaker.success()
    assert now[0] - back <= breaker.reset
    assert not breaker.is_open
    breaker.before()


def test_breaker_failure_of_a_call_in_flight_does_not_postpone_the_probe_further() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failures=1, reset=1.0, clock=lambda: now[0])
    breaker.failure()
    now[0] = 0.9
    breaker.failure()  # a call that was already in flight when the circuit opened
    now[0] = 1.95
    breaker.before()  # one interval after the last failure: the probe


def test_breaker_lets_exactly_one_probe_through_under_contention() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failures=1, reset=1.0, clock=lambda: now[0])
    breaker.failure()
    now[0] = 1.0
    threads = 16
    barrier = threading.Barrier(threads)
    passed: list[int] = []

    def call(i: int) -> None:
        barrier.wait()
        for _ in range(200):
            try:
                breaker.before()
            except StorageError:
                continue
            passed.append(i)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(call, range(threads)))
    assert len(passed) == 1


# -- item: recovery within breaker_reset of Redis returning --------------------------------------
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_fail_closed_serves_again_within_breaker_reset_of_redis_returning(
    fresh_redis_server: RedisServer, adapter: str
) -> None:
    reset, timeout = 0.1, 0.2
    h = Harness.build(adapter, _URLBackend(), _config(fresh_redis_server.url, reset=reset))
    try:
        assert h.request().status == 200
        assert fresh_redis_server.proc is not None
        fresh_redis_server.proc.kill()
        fresh_redis_server.proc.wait()
        # 1.6 s down with traffic: a wait doubling after each failed probe (0.1, 0.3, 0.7,
        # 1.5 s) would next probe at 3.1 s, 1.5 s after Redis is back
        end = time.monotonic() + 1.6
        while time.monotonic() < end:
            assert h.request().status == 503
            time.sleep(0.02)
        fresh_redis_server.restart()  # returns once the server answers PING
        back = time.monotonic()
        while (status := h.request().status) != 200:
            assert status == 503
            assert time.monotonic() - back < 5, "never recovered"
            time.sleep(0.01)
        elapsed = time.monotonic() - back
        # the README's worst case, breaker_reset + storage.timeout, and a scheduling margin
        assert elapsed <= reset + timeout + 0.5, elapsed
    finally:
        h.close()
