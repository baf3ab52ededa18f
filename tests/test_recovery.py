"""Coming back from a Redis restart: no request fails on a connection the old server left behind,
nothing is sent twice, and the circuit breaker lets traffic through again within
``breaker_reset`` of Redis answering, however long the outage was.

The Redis here is killed with SIGKILL (no shutdown: its kernel closes the sockets, as in a
crash) and restarted on the same port by the test, with the data gone.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
import redis.asyncio as redis_async
import redis.cluster
from werkzeug.test import Client

from harness import Harness
from quota_middleware import Plan, QuotaConfig, RequestRate, StorageConfig
from quota_middleware.backends.redis import AsyncRedisBackend, SyncRedisBackend, client_from_url
from quota_middleware.base._protocols import CircuitBreaker
from quota_middleware.base._scripts import ScriptCall
from quota_middleware.errors import StorageError
from servers import RedisServer

ADAPTERS = ["asgi", "wsgi"]


def sigkill_and_restart(server: RedisServer) -> None:
    """Kill ``server`` the hard way and start it again on the same port, empty."""
    assert server.proc is not None
    server.proc.kill()
    server.proc.wait()
    server.restart()


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


def _concurrently(h: Harness, n: int) -> list[int]:
    """``n`` requests at once (a barrier releases them together); their statuses."""
    barrier = threading.Barrier(n)

    def one(_: int) -> int:
        barrier.wait()
        if h.adapter == "asgi":
            return h.request().status
        # a werkzeug Client per thread; the middleware (and its Redis pool) is shared
        r = Client(h.middleware).open(
            "/api", environ_base={"REMOTE_ADDR": "203.0.113.7"}, buffered=True
        )
        return int(r.status_code)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


# -- fail-closed requests right after a restart --------------------------------------------
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_no_503_on_connections_left_over_from_before_a_restart(
    fresh_redis_server: RedisServer, adapter: str
) -> None:
    h = Harness.build(adapter, _URLBackend(), _config(fresh_redis_server.url))
    try:
        # several pooled connections, all of which the restart will leave dead
        assert _concurrently(h, 8) == [200] * 8
        sigkill_and_restart(fresh_redis_server)
        # the server came back empty: a full bucket of 10. Every request is answered as the
        # limit says (a 503 would be a request failed on a dead socket), and exactly 10 are
        # admitted (a call sent twice would have spent two)
        assert [h.request().status for _ in range(12)] == [200] * 10 + [429] * 2

        # the bucket is empty now; these only fill the pool with fresh connections again...
        assert _concurrently(h, 6) == [429] * 6
        sigkill_and_restart(fresh_redis_server)  # ...dead ones now
        assert sorted(_concurrently(h, 12)) == [200] * 10 + [429] * 2
        assert h.middleware.stats.get("degraded_closed", 0) == 0
    finally:
        h.close()


# -- the backends: what is replaced, what is never sent twice -----------------------------------
SEC = 1_000_000


def _admit(i: int, key: str = "qm:{t:c}", burst: int = 5) -> ScriptCall:
    # a bucket of ``burst``, refilling one token a day: refill is negligible here
    interval = 86_400 * SEC
    return ScriptCall(
        "admit", (key,), ("", f"r{i}", 0, 1, "b", 1, "req", interval, interval * burst, 1, 1)
    )


def _admitted(reply: Any) -> bool:
    return int(reply[0]) == 1


def _kill_clients(url: str) -> None:
    """The server closes every client connection but this one (as after `timeout` or a kill
    by an admin): each pooled connection of the backends now has a FIN waiting."""
    with redis.Redis.from_url(url) as admin:
        assert admin.client_kill_filter(_type="normal", skipme=True) >= 1


def test_sync_backend_replaces_connections_the_server_closed(
    fresh_redis_server: RedisServer,
) -> None:
    backend = SyncRedisBackend(
        client_from_url(fresh_redis_server.url, timeout=0.5, asyncio=False),
        breaker=CircuitBreaker(failures=1),
    )
    try:
        with ThreadPoolExecutor(4) as pool:  # four connections in the pool
            barrier = threading.Barrier(4)
            list(pool.map(lambda i: (barrier.wait(), backend.run(_admit(i, burst=100))), range(4)))
        _kill_clients(fresh_redis_server.url)
        replies = [backend.run(_admit(10 + i, key="qm:{t:d}")) for i in range(6)]
        assert [_admitted(r) for r in replies] == [True] * 5 + [False]
        assert not backend.breaker.is_open
    finally:
        backend.close()


def test_async_backend_replaces_connections_the_server_closed(
    fresh_redis_server: RedisServer,
) -> None:
    async def main() -> None:
        client = client_from_url(fresh_redis_server.url, timeout=0.5, asyncio=True)
        backend = AsyncRedisBackend(client, breaker=CircuitBreaker(failures=1))
        try:
            # single calls and a batch, each on a pooled connection that the server closed
            await backend.run_async(_admit(0, burst=100))
            _kill_clients(fresh_redis_server.url)
            # Give the event loop a moment to take in the FINs, as a serving loop long has by the
            # time Redis is back. Too short, and the test fails: it cannot pass by accident.
            await asyncio.sleep(0.05)
            first = [await backend.run_async(_admit(i, key="qm:{t:d}")) for i in range(2)]
            _kill_clients(fresh_redis_server.url)
            await asyncio.sleep(0.05)
            rest = await asyncio.gather(
                *(backend.run_async(_admit(i, key="qm:{t:d}")) for i in range(2, 6))
            )
            assert [_admitted(r) for r in [*first, *rest]] == [True] * 5 + [False]
            assert not backend.breaker.is_open
        finally:
            await backend.aclose()

    asyncio.run(main())


_BUSY = b"""
local t = redis.call('TIME')
local start = t[1] * 1000000 + t[2]
repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] - start > tonumber(ARGV[1])
return 1
"""


class _Busy:
    """Keeps the server at ``port`` busy in a Lua loop for ``seconds``, from a raw socket (so
    that nothing waits for it); ``wait()`` returns once the server is free again."""

    def __init__(self, port: int, seconds: float) -> None:
        arg = str(int(seconds * SEC)).encode()
        parts = [b"EVAL", _BUSY, b"0", arg]
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self._sock.sendall(
            b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        )

    def wait(self) -> None:
        assert self._sock.recv(64).startswith(b":1")
        self._sock.close()


def _count_spent(run: Callable[[ScriptCall], Any], key: str, burst: int) -> int:
    """How many tokens of a ``burst`` bucket are gone: the admits left, counted."""
    left = 0
    while _admitted(run(_admit(100 + left, key=key, burst=burst))):
        left += 1
    return burst - left


def _timed_out_then_counted(
    port: int, run: Callable[[ScriptCall], Any], key: str
) -> tuple[type[BaseException] | None, int]:
    run(_admit(0, key=key + ":warm"))  # the script is loaded: no NOSCRIPT round in the way
    busy = _Busy(port, 0.6)
    # A head start for the busy script. Not a proof of anything: had the server not started it
    # yet, the admit would be answered at once and the caller's assertion on the error fails.
    time.sleep(0.05)
    error: type[BaseException] | None = None
    try:
        run(_admit(1, key=key))
    except StorageError as e:
        error = type(e.original or e)
    busy.wait()
    return error, _count_spent(run, key, 5)


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("client", ["from_url", "passed_in"])
def test_a_call_that_timed_out_is_not_sent_again(
    fresh_redis_server: RedisServer, kind: str, client: str
) -> None:
    """The call reached the server, which was busy: the client gave up after its timeout, and
    the server ran the script later. A retry would have charged the request twice. Also with a
    client the app built itself, which keeps redis-py's default retries (10 in redis-py 8):
    script calls do not go through them."""
    url = fresh_redis_server.url
    key = "qm:{t:timeout}"

    def make(asyncio_: bool) -> Any:
        if client == "from_url":
            return client_from_url(url, timeout=0.2, asyncio=asyncio_)
        cls: Any = redis_async.Redis if asyncio_ else redis.Redis
        return cls(host="127.0.0.1", port=fresh_redis_server.port, socket_timeout=0.2)

    if kind == "sync":
        sync = SyncRedisBackend(make(False))
        try:
            error, spent = _timed_out_then_counted(fresh_redis_server.port, sync.run, key)
        finally:
            sync.close()
    else:
        loop = asyncio.new_event_loop()
        backend = AsyncRedisBackend(make(True))
        try:
            error, spent = _timed_out_then_counted(
                fresh_redis_server.port,
                lambda c: loop.run_until_complete(backend.run_async(c)),
                key,
            )
        finally:
            loop.run_until_complete(backend.aclose())
            loop.close()
    assert spent == 1  # the one timed-out call, run by the server once it was free
    assert error is not None and issubclass(error, redis.exceptions.TimeoutError)


@pytest.mark.cluster
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_cluster_client_does_not_resend_a_call_that_timed_out(
    redis_cluster: Any, kind: str
) -> None:
    """redis-py's cluster client retries a command after a TimeoutError (three times by
    default): for a script that the node runs once it is free again, that is four charges."""
    key = f"qm:{{t:cluster-timeout-{kind}}}"
    probe: Any = redis.cluster.RedisCluster.from_url(redis_cluster.plain_url)
    try:
        probe.delete(key)
        port = int(probe.get_node_from_key(key).port)
    finally:
        probe.close()
    if kind == "sync":
        sync = SyncRedisBackend(client_from_url(redis_cluster.url, timeout=0.2, asyncio=False))
        try:
            error, spent = _timed_out_then_counted(port, sync.run, key)
        finally:
            sync.close()
    else:
        loop = asyncio.new_event_loop()
        backend = AsyncRedisBackend(client_from_url(redis_cluster.url, timeout=0.2, asyncio=True))
        try:
            error, spent = _timed_out_then_counted(
                port, lambda c: loop.run_until_complete(backend.run_async(c)), key
            )
        finally:
            loop.run_until_complete(backend.aclose())
            loop.close()
    assert spent == 1
    assert error is not None and issubclass(error, redis.exceptions.TimeoutError)


def test_clients_built_from_a_url_do_not_retry_inside_redis_py() -> None:
    # the backends decide what may be sent again; redis-py's Retry would resend after a timeout
    for asyncio_ in (False, True):
        client = client_from_url("redis://127.0.0.1:1/0", timeout=0.2, asyncio=asyncio_)
        conn = client.connection_pool.make_connection()
        assert conn.retry.get_retries() == 0


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


# -- recovery within breaker_reset of Redis returning --------------------------------------
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
