"""Redis backends: a sync one for WSGI and an async one for ASGI, over the same scripts.

Both register each Lua script once per client (redis-py ``Script``: EVALSHA, and on NOSCRIPT a
load and retry, which is what keeps limits working after a Redis restart or failover). Every error
becomes :class:`StorageError`; the circuit breaker turns a run of errors into instant failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import redis as redis_sync
import redis.asyncio as redis_async
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError

from ..errors import StorageError
from ..scripts import ScriptCall, source
from .base import CircuitBreaker

Observer = Callable[[str, float, bool], None]
log = logging.getLogger("quota_middleware")


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


_ERRORS = (RedisError, RedisClusterException, OSError)


class _Base:
    """Breaker, error mapping and the latency observer, shared by the sync and async backends."""

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

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """One store call: errors become :class:`StorageError`, outcomes feed the breaker and
        the observer (the same for the sync and the async backend)."""
        start = time.perf_counter()
        try:
            yield
        except _ERRORS as e:
            raise self._failed(what, start, e) from None
        except Exception as e:
            raise self._unexpected(what, e) from None
        except BaseException:
            self.breaker.abandon()
            raise
        self._ok(what, start)

    def _failed(self, what: str, start: float, error: BaseException) -> StorageError:
        self.breaker.failure()
        self._observe(what, start, False)
        return StorageError(f"redis {what} failed: {type(error).__name__}", error)

    def _unexpected(self, what: str, error: Exception) -> StorageError:
        # Not an outage (an argument the client could not encode, a bug): the request still
        # gets its plan's store-error policy instead of a 500, and the breaker is left alone.
        self.breaker.abandon()
        log.error("quota_middleware: redis %s failed unexpectedly: %r", what, error)
        return StorageError(f"redis {what} failed: {type(error).__name__}", error)

    def _ok(self, what: str, start: float) -> None:
        self.breaker.success()
        self._observe(what, start, True)

    def _observe(self, name: str, start: float, ok: bool) -> None:
        if self._observer is not None:
            self._observer(name, time.perf_counter() - start, ok)


class SyncRedisBackend(_Base):
    def run(self, call: ScriptCall) -> Any:
        self.breaker.before()
        with self._guard(call.name):
            return self._scripts.get(call.name)(keys=call.keys, args=call.args)

    def close(self) -> None:
        self.client.close()


class AsyncRedisBackend(_Base):
    """Async backend. With ``batch=True`` (the default on a single Redis), the calls that
    concurrent requests of one process make in the same event-loop iteration go out as one
    pipeline: one write and one read for all of them instead of one round trip each. Each call
    is still its own script, so atomicity per request is unchanged."""

    def __init__(
        self,
        client: Any,
        *,
        breaker: CircuitBreaker | None = None,
        observer: Observer | None = None,
        batch: bool | None = None,
    ) -> None:
        super().__init__(client, breaker=breaker, observer=observer)
        # Cluster pipelines split by node and retry on their own; batching targets one server.
        self._batch = not isinstance(client, AsyncRedisCluster) if batch is None else batch
        self._queue: list[tuple[ScriptCall, asyncio.Future[Any]]] = []
        self._shas: dict[str, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def run_async(self, call: ScriptCall) -> Any:
        self.breaker.before()
        if not self._batch:
            return await self._run_one(call)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((call, future))
        if len(self._queue) == 1:
            # Runs after the callbacks already scheduled for this iteration, so every request
            # that reaches its admit now joins the same pipeline.
            loop.call_soon(self._flush_soon)
        return await future

    async def _run_one(self, call: ScriptCall) -> Any:
        with self._guard(call.name):
            return await self._scripts.get(call.name)(keys=call.keys, args=call.args)

    def _flush_soon(self) -> None:
        # calls whose requests were cancelled while queued are not sent at all
        batch = [(call, f) for call, f in self._queue if not f.cancelled()]
        self._queue = []
        if not batch:
            return
        task = asyncio.get_running_loop().create_task(self._flush(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush(self, batch: list[tuple[ScriptCall, asyncio.Future[Any]]]) -> None:
        try:
            await self._flush_batch(batch)
        except BaseException as e:
            # Whatever happened, no request may be left waiting on this batch forever.
            error = e if isinstance(e, StorageError) else StorageError(f"redis batch: {e!r}", e)
            for _, future in batch:
                _settle(future, error=error)
            if isinstance(e, asyncio.CancelledError):
                raise

    async def _flush_batch(self, batch: list[tuple[ScriptCall, asyncio.Future[Any]]]) -> None:
        if len(batch) == 1:
            call, future = batch[0]
            try:
                result = await self._run_one(call)
            except StorageError as e:
                _settle(future, error=e)
            else:
                _settle(future, result)
            return
        start = time.perf_counter()
        try:
            replies = await self._pipeline(batch)
        except _ERRORS as e:
            error = self._failed("pipeline", start, e)
            for _, future in batch:
                _settle(future, error=error)
            return
        except Exception as e:
            error = self._unexpected("pipeline", e)
            for _, future in batch:
                _settle(future, error=error)
            return
        except BaseException:
            self.breaker.abandon()
            raise
        self._ok("pipeline", start)
        for (call, future), reply in zip(batch, replies, strict=True):
            if isinstance(reply, BaseException):
                _settle(future, error=StorageError(f"redis {call.name} failed: {reply}", reply))
            else:
                _settle(future, reply)

    async def _pipeline(self, batch: list[tuple[ScriptCall, asyncio.Future[Any]]]) -> list[Any]:
        calls = [call for call, _ in batch]
        replies = await self._send(calls)
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:
            # Redis restarted or failed over and lost its script cache: load and rerun only
            # the calls that did not run (the others did, and must not run twice).
            for name in {calls[i].name for i in missing}:
                await self.client.script_load(source(name))
            rerun = await self._send([calls[i] for i in missing])
            for i, reply in zip(missing, rerun, strict=True):
                replies[i] = reply
        return replies

    async def _send(self, calls: list[ScriptCall]) -> list[Any]:
        """EVALSHA each call on one connection: one write, then one read per reply. The RESP
        is packed here, from arguments that are mostly pre-encoded bytes: redis-py's general
        packing is the largest cost of a pipelined call."""
        pool = self.client.connection_pool
        conn = await _get_connection(pool)
        try:
            await conn.send_packed_command([_pack(self._sha_bytes(c.name), c) for c in calls])
            replies: list[Any] = []
            for _ in calls:
                try:
                    replies.append(await conn.read_response())
                except ResponseError as e:  # a script error or NOSCRIPT: this call only
                    replies.append(e)
        except BaseException:
            # cancelled or failed halfway: the connection's state is unknown, drop it
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)
        return replies

    def _sha_bytes(self, name: str) -> bytes:
        return self._sha(name).encode()

    def _sha(self, name: str) -> str:
        sha = self._shas.get(name)
        if sha is None:
            sha = self._shas[name] = hashlib.sha1(source(name).encode()).hexdigest()
        return sha

    async def aclose(self) -> None:
        await self.client.aclose()


async def _get_connection(pool: Any) -> Any:
    try:
        return await pool.get_connection()
    except TypeError:  # redis-py 5.x wants the command name
        return await pool.get_connection("EVALSHA")


def _arg(a: Any) -> bytes:
    if type(a) is bytes:
        return a
    # never raises: a lone surrogate from a request body must not kill the whole batch
    return (a if type(a) is str else str(a)).encode("utf-8", "surrogatepass")


def _pack(sha: bytes, call: ScriptCall) -> bytes:
    parts = [b"EVALSHA", sha, str(len(call.keys)).encode()]
    parts += [k.encode("utf-8", "surrogatepass") for k in call.keys]
    parts += [_arg(a) for a in call.args]
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        out.append(b"$%d\r\n%b\r\n" % (len(p), p))
    return b"".join(out)


def _settle(future: asyncio.Future[Any], result: Any = None, *, error: Any = None) -> None:
    if future.done():  # the waiting request was cancelled (client went away)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
