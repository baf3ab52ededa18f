"""Shared fixtures: throwaway Redis servers and the ``backend`` fixture run over every backend.

``backend`` is parametrized over ``memory``, ``fakeredis`` (with Lua), ``redis`` (a real
``redis-server`` on a free port) and ``cluster`` (a real 3-master cluster on loopback); select
with ``-m memory`` / ``-m "not cluster"`` etc. Servers start lazily, once per session, only when a
test needs them. Without ``redis-server`` those tests are skipped locally and fail under ``CI``.
``--redis-url`` / ``--redis-cluster-url`` use external servers instead (they get FLUSHALLed!).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from quota_middleware.backends._memstore import MemoryStore
from quota_middleware.backends.memory import MemoryBackend
from servers import RedisClusterServer, RedisServer, ServerError, redis_server_binary

BACKENDS = ("memory", "fakeredis", "redis", "cluster")
MARKERS = {
    "memory": "runs on the in-process memory backend",
    "fakeredis": "runs on fakeredis with Lua",
    "redis": "runs on a real redis-server (started on a free port)",
    "cluster": "runs on a real 3-master Redis Cluster (started on loopback)",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("quota-middleware")
    group.addoption(
        "--redis-url",
        default=os.environ.get("QM_TEST_REDIS_URL"),
        help="use this Redis (redis://host:port/db) instead of starting one; it is FLUSHALLed",
    )
    group.addoption(
        "--redis-cluster-url",
        default=os.environ.get("QM_TEST_REDIS_CLUSTER_URL"),
        help="use this cluster (redis+cluster://host:port) instead of starting one; FLUSHALLed",
    )


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def missing_redis(what: str = "redis-server") -> None:
    """Skip (locally) or fail (under CI) a test that needs a Redis binary that is not installed."""
    msg = f"{what} not installed: apt-get install redis-server"
    if in_ci():
        pytest.fail(msg + " (CI=true: missing Redis is an error, not a skip)", pytrace=False)
    pytest.skip(msg)


@dataclass
class ExternalRedis:
    """A server the test run did not start (``--redis-url``); same read-only surface."""

    url: str
    startup_nodes: list[tuple[str, int]] = field(default_factory=list)

    @property
    def plain_url(self) -> str:
        return self.url.replace("+cluster", "", 1)

    def stop(self) -> None:
        pass


def _start(server: Any) -> Any:
    try:
        return server.start()
    except ServerError as e:
        if in_ci():
            pytest.fail(f"could not start {server!r}: {e}", pytrace=False)
        pytest.skip(f"could not start {server!r}: {e}")


@pytest.fixture(scope="session")
def redis_server(request: pytest.FixtureRequest) -> Iterator[RedisServer | ExternalRedis]:
    """A real redis-server for the whole session (``.url``, ``.port``), or ``--redis-url``."""
    url = request.config.getoption("--redis-url")
    if url:
        yield ExternalRedis(url)
        return
    if redis_server_binary() is None:
        missing_redis()
    server = _start(RedisServer())
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster(
    request: pytest.FixtureRequest,
) -> Iterator[RedisClusterServer | ExternalRedis]:
    """A real 3-master cluster for the session (``.url`` is ``redis+cluster://...``)."""
    url = request.config.getoption("--redis-cluster-url")
    if url:
        yield ExternalRedis(url)
        return
    if redis_server_binary() is None:
        missing_redis()
    cluster = _start(RedisClusterServer())
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def fresh_redis_server() -> Iterator[RedisServer]:
    """A redis-server of this test's own, free to stop/restart; stopped at teardown."""
    if redis_server_binary() is None:
        missing_redis()
    server = _start(RedisServer())
    try:
        yield server
    finally:
        server.stop()


# -- the backend fixture ------------------------------------------------------------------------
class BackendFactory:
    """Sync and async backends of one kind over the same data, flushed before the test.

    ``sync()`` returns one shared sync backend; ``async_()`` returns a NEW async backend each
    call (async clients bind to the loop that first uses them), to be closed in that loop with
    ``await b.aclose()`` (the factory drops unclosed ones quietly at teardown).
    """

    def __init__(self, name: str, request: pytest.FixtureRequest) -> None:
        self.name = name
        self.url: str | None = None
        self._request = request
        self._sync: Any = None
        self._asyncs: list[Any] = []
        self._memory: MemoryBackend | None = None
        self._fake_server: Any = None
        self._server: Any = None
        if name == "memory":
            self.url = "memory://"
            self._memory = MemoryBackend()
        elif name == "fakeredis":
            import fakeredis

            self._fake_server = fakeredis.FakeServer()
        elif name == "redis":
            self._server = request.getfixturevalue("redis_server")
            self.url = self._server.url
        elif name == "cluster":
            self._server = request.getfixturevalue("redis_cluster")
            self.url = self._server.url
        else:  # pragma: no cover
            raise ValueError(name)

    @property
    def is_redis(self) -> bool:
        """True for the kinds that speak the Redis protocol (fakeredis, redis, cluster)."""
        return self.name != "memory"

    def sync_client(self) -> Any:
        """A new sync redis-py client on this backend's data (caller closes); None for memory."""
        if self.name == "memory":
            return None
        if self.name == "fakeredis":
            import fakeredis

            return fakeredis.FakeRedis(server=self._fake_server)
        if self.name == "redis":
            import redis

            return redis.Redis.from_url(self.url)
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(self._server.plain_url)

    def async_client(self) -> Any:
        """A new async redis-py client (bind it to one loop; ``await c.aclose()``)."""
        if self.name == "memory":
            return None
        if self.name == "fakeredis":
            import fakeredis

            return fakeredis.FakeAsyncRedis(server=self._fake_server)
        if self.name == "redis":
            import redis.asyncio

            return redis.asyncio.Redis.from_url(self.url)
        from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

        return AsyncRedisCluster.from_url(self._server.plain_url)

    def sync(self) -> Any:
        """The test's sync backend (the same object on every call)."""
        if self._sync is None:
            if self._memory is not None:
                self._sync = self._memory
            else:
                from quota_middleware.backends.redis import SyncRedisBackend

                self._sync = SyncRedisBackend(self.sync_client())
        return self._sync

    def async_(self) -> Any:
        """A new async backend over the same data as ``sync()``; memory: the same instance."""
        if self._memory is not None:
            return self._memory
        from quota_middleware.backends.redis import AsyncRedisBackend

        b = AsyncRedisBackend(self.async_client())
        self._asyncs.append(b)
        return b

    def flush(self) -> None:
        """Delete all data (FLUSHALL; every primary on the cluster; a new store for memory)."""
        if self._memory is not None:
            self._memory.store = MemoryStore()
            return
        client = self.sync_client()
        try:
            if self.name == "cluster":
                client.flushall(target_nodes=client.PRIMARIES)
            else:
                client.flushall()
        finally:
            client.close()

    def close(self) -> None:
        if self._sync is not None and self._memory is None:
            self._sync.close()
        self._sync = None
        # Async clients were bound to a loop that is gone by now: closing them here would touch
        # a closed loop. Drop them; their sockets are closed by GC without touching the loop.
        self._asyncs.clear()

    def __repr__(self) -> str:
        return f"<BackendFactory {self.name} {self.url}>"


@pytest.fixture(
    params=[pytest.param(n, marks=getattr(pytest.mark, n), id=n) for n in BACKENDS],
)
def backend_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def backend(backend_name: str, request: pytest.FixtureRequest) -> Iterator[BackendFactory]:
    """A :class:`BackendFactory` of each kind, its data flushed before the test."""
    factory = BackendFactory(backend_name, request)
    factory.flush()
    try:
        yield factory
    finally:
        factory.close()


# -- per-backend test counts in the terminal summary --------------------------------------------
@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "backend_name" in callspec.params:
        report.user_properties.append(("backend_name", callspec.params["backend_name"]))
    return report


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    counts: dict[str, Counter[str]] = {n: Counter() for n in BACKENDS}
    seen: set[tuple[str, str]] = set()
    for outcome in ("failed", "error", "skipped", "xfailed", "xpassed", "passed"):
        for rep in terminalreporter.stats.get(outcome, []):
            props = dict(getattr(rep, "user_properties", ()) or ())
            name = props.get("backend_name")
            nodeid = getattr(rep, "nodeid", None)
            if name is None or nodeid is None or (nodeid, name) in seen:
                continue
            if outcome == "passed" and getattr(rep, "when", "call") != "call":
                continue
            seen.add((nodeid, name))
            counts.setdefault(name, Counter())[outcome] += 1
    if not any(counts.values()):
        return
    terminalreporter.section("test counts per backend")
    for name, c in counts.items():
        parts = ", ".join(f"{v} {k}" for k, v in sorted(c.items())) or "0 run"
        terminalreporter.write_line(f"{name:>10}: {parts}")


@pytest.fixture(scope="module")
def twin_backends(redis_server: Any) -> Any:
    """``reset()`` -> the memory backend, fakeredis and a real Redis, all empty: the Lua scripts
    and their Python twins run side by side (the property tests compare them)."""
    import fakeredis
    import redis

    from quota_middleware.backends.redis import SyncRedisBackend

    real = SyncRedisBackend(redis.Redis.from_url(redis_server.url))
    state: dict[str, Any] = {"real": real}

    def reset() -> dict[str, Any]:
        real.client.flushall()
        state["memory"] = MemoryBackend()
        state["fakeredis"] = SyncRedisBackend(fakeredis.FakeRedis(server=fakeredis.FakeServer()))
        return state

    yield reset
    real.close()
