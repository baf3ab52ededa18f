"""The async Redis backend pipelines the calls of concurrent requests: same answers, fewer
round trips, and NOSCRIPT and outages handled for the whole batch."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
import redis.asyncio as redis_async

from quota_middleware.backends.redis import AsyncRedisBackend
from quota_middleware.base._scripts import ScriptCall
from quota_middleware.errors import StorageError


def admit(i: int, burst: int = 50) -> ScriptCall:
    # one caller, a bucket of ``burst`` with a day per token: refill is negligible
    return ScriptCall("admit", ("qm:{default:batch}",),
                      ("", f"r{i}", 0, 1, "b", 1, "req", 86_400_000_000 // burst * burst,
                       86_400_000_000 // burst * burst * burst, 1, 1))  # fmt: skip


async def _gather(backend: AsyncRedisBackend, n: int) -> list[Any]:
    return await asyncio.gather(*(backend.run_async(admit(i)) for i in range(n)),
                                return_exceptions=True)  # fmt: skip


def test_concurrent_admits_are_pipelined_and_exact(redis_server: Any) -> None:
    calls: Counter[str] = Counter()

    async def main() -> list[Any]:
        client = redis_async.Redis.from_url(redis_server.url)
        await client.flushall()
        backend = AsyncRedisBackend(client, observer=lambda name, s, ok: calls.update([name]))
        try:
            return await _gather(backend, 200)
        finally:
            await client.aclose()

    replies = asyncio.run(main())
    assert sum(int(r[0]) for r in replies) == 50
    # 200 requests went out in a handful of pipelines, not 200 round trips
    assert calls["pipeline"] >= 1 and calls["pipeline"] + calls["admit"] < 20


def test_batch_recovers_from_a_flushed_script_cache(redis_server: Any) -> None:
    async def main() -> list[Any]:
        client = redis_async.Redis.from_url(redis_server.url)
        await client.flushall()
        backend = AsyncRedisBackend(client)
        try:
            await _gather(backend, 5)
            await client.script_flush()
            return await _gather(backend, 30)
        finally:
            await client.aclose()

    replies = asyncio.run(main())
    assert all(not isinstance(r, BaseException) for r in replies), replies
    assert sum(int(r[0]) for r in replies) == 30


def test_batch_fails_as_storage_error_when_redis_is_down(fresh_redis_server: Any) -> None:
    async def main() -> list[Any]:
        client = redis_async.Redis.from_url(fresh_redis_server.url, socket_timeout=0.5,
                                            socket_connect_timeout=0.5)  # fmt: skip
        backend = AsyncRedisBackend(client)
        try:
            await _gather(backend, 3)
            fresh_redis_server.stop()
            return await _gather(backend, 20)
        finally:
            await client.aclose()

    replies = asyncio.run(main())
    assert all(isinstance(r, StorageError) for r in replies), replies


@pytest.mark.parametrize("batch", [True, False])
def test_batching_can_be_turned_off(redis_server: Any, batch: bool) -> None:
    calls: Counter[str] = Counter()

    async def main() -> None:
        client = redis_async.Redis.from_url(redis_server.url)
        backend = AsyncRedisBackend(client, batch=batch,
                                    observer=lambda name, s, ok: calls.update([name]))  # fmt: skip
        try:
            await _gather(backend, 10)
        finally:
            await client.aclose()

    asyncio.run(main())
    assert (calls["pipeline"] > 0) is batch
