"""Backends from configuration: a URL, or a client the app already has."""

from __future__ import annotations

from typing import Any

from quota_middleware.backends.memory import MemoryBackend
from quota_middleware.base._protocols import AsyncBackend, CircuitBreaker, Observer, SyncBackend
from quota_middleware.config import StorageConfig
from quota_middleware.errors import ConfigurationError


def _breaker(storage: StorageConfig) -> CircuitBreaker:
    return CircuitBreaker(storage.breaker_failures, storage.breaker_reset)


def _is_async_client(client: Any) -> bool:
    import redis.asyncio as redis_async
    from redis.asyncio.cluster import RedisCluster

    return isinstance(client, redis_async.Redis | RedisCluster)


def sync_backend(
    storage: StorageConfig, client: Any = None, *, observer: Observer | None = None
) -> SyncBackend:
    """A sync backend for ``storage.url``, or over ``client`` (``redis.Redis``/``RedisCluster``)."""
    if client is None and storage.is_memory:
        return MemoryBackend()
    from quota_middleware.backends.redis import SyncRedisBackend, client_from_url

    if client is not None and _is_async_client(client):
        raise ConfigurationError("redis", "the WSGI middleware needs a sync redis client")
    client = client or client_from_url(storage.url, timeout=storage.timeout, asyncio=False)
    return SyncRedisBackend(client, breaker=_breaker(storage), observer=observer)


def async_backend(
    storage: StorageConfig, client: Any = None, *, observer: Observer | None = None
) -> AsyncBackend:
    """An async backend for ``storage.url``, or over a ``redis.asyncio`` client."""
    if client is None and storage.is_memory:
        return MemoryBackend()
    from quota_middleware.backends.redis import AsyncRedisBackend, client_from_url

    if client is not None and not _is_async_client(client):
        raise ConfigurationError("redis", "the ASGI middleware needs a redis.asyncio client")
    client = client or client_from_url(storage.url, timeout=storage.timeout, asyncio=True)
    return AsyncRedisBackend(client, breaker=_breaker(storage), observer=observer)
