"""Redis backends: a sync one for WSGI and an async one for ASGI, over the same scripts.

Both register each Lua script once per client (redis-py ``Script``: EVALSHA, and on NOSCRIPT a
load and retry, which is what keeps limits working after a Redis restart or failover). Every error
becomes :class:`StorageError`; the circuit breaker turns a run of errors into instant failures.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import redis as redis_sync
import redis.asyncio as redis_async
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from ..errors import StorageError
from ..scripts import ScriptCall, source
from .base import CircuitBreaker

Observer = Callable[[str, float, bool], None]


def _cluster_url(url: str) -> str:
    parts = urlsplit(url)
    scheme = "rediss" if parts.scheme.startswith("rediss") else "redis"
    return urlunsplit((scheme, parts.netloc, parts.path, parts.query, parts.fragment))


def is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme.endswith("+cluster")


def client_from_url(url: str, *, timeout: float, asyncio: bool) -> Any:
    """A redis-py client for ``url`` with short timeouts (``+cluster``: a cluster client)."""
    opts: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "health_check_interval": 30,
    }
    if is_cluster_url(url):
        cls: Any = AsyncRedisCluster if asyncio else RedisCluster
        # redis-py's cluster client does not take health_check_interval per node
        opts.pop("health_check_interval")
        return cls.from_url(_cluster_url(url), **opts)
    query = dict(parse_qsl(urlsplit(url).query))
    if "socket_timeout" in query:
        opts.pop("socket_timeout")
    mod: Any = redis_async if asyncio else redis_sync
    return mod.Redis.from_url(url, **opts)


class _ScriptCache:
    """One registered ``Script`` per name and client."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._scripts: dict[str, Any] = {}

    def get(self, name: str) -> Any:
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = self._client.register_script(source(name))
        return script


class SyncRedisBackend:
    def __init__(
        self,
        client: Any,
        *,
        breaker: CircuitBreaker | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.client = client
        self.breaker = breaker or CircuitBreaker()
        self._scripts = _ScriptCache(client)
        self._observer = observer

    def run(self, call: ScriptCall) -> Any:
        self.breaker.before()
        start = time.perf_counter()
        try:
            reply = self._scripts.get(call.name)(keys=call.keys, args=call.args)
        except (RedisError, RedisClusterException, OSError) as e:
            self.breaker.failure()
            self._observe(call.name, start, False)
            raise StorageError(f"redis {call.name} failed: {type(e).__name__}", e) from None
        self.breaker.success()
        self._observe(call.name, start, True)
        return reply

    def _observe(self, name: str, start: float, ok: bool) -> None:
        if self._observer is not None:
            self._observer(name, time.perf_counter() - start, ok)

    def close(self) -> None:
        self.client.close()


class AsyncRedisBackend:
    def __init__(
        self,
        client: Any,
        *,
        breaker: CircuitBreaker | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.client = client
        self.breaker = breaker or CircuitBreaker()
        self._scripts = _ScriptCache(client)
        self._observer = observer

    async def run_async(self, call: ScriptCall) -> Any:
        self.breaker.before()
        start = time.perf_counter()
        try:
            reply = await self._scripts.get(call.name)(keys=call.keys, args=call.args)
        except (RedisError, RedisClusterException, OSError) as e:
            self.breaker.failure()
            self._observe(call.name, start, False)
            raise StorageError(f"redis {call.name} failed: {type(e).__name__}", e) from None
        self.breaker.success()
        self._observe(call.name, start, True)
        return reply

    def _observe(self, name: str, start: float, ok: bool) -> None:
        if self._observer is not None:
            self._observer(name, time.perf_counter() - start, ok)

    async def aclose(self) -> None:
        await self.client.aclose()
