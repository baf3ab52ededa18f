"""Redis backends: a sync one for WSGI and an async one for ASGI, over the same scripts.

Both run each Lua script with EVALSHA and, on NOSCRIPT, load it and run it again (which is what
keeps limits working after a Redis restart or failover). Every error becomes
:class:`StorageError`; the circuit breaker turns a run of errors into instant failures.

A script call is never retried blindly: admit is not idempotent, so running it again after the
server may have run it once would charge the request twice. On a single server, a call only ever
moves to a fresh connection when not one byte of it was written before the problem was seen
(see ``AsyncRedisBackend._connection``), and the clients built here have redis-py's own retries
off. A cluster client keeps redis-py's retry after connection errors, which is how it follows a
failover, but not after timeouts (see ``_CLUSTER_RETRY_ERRORS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import redis as redis_sync
import redis.asyncio as redis_async
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from quota_middleware.backends._sentinel import is_sentinel_url, sentinel_client
from quota_middleware.base._keys import key_slot
from quota_middleware.base._protocols import CircuitBreaker, Observer
from quota_middleware.base._scripts import ScriptCall, source
from quota_middleware.errors import StorageError

log = logging.getLogger("quota_middleware")


def _cluster_url(url: str) -> str:
    parts = urlsplit(url)
    scheme = "rediss" if parts.scheme.startswith("rediss") else "redis"
    return urlunsplit((scheme, parts.netloc, parts.path, parts.query, parts.fragment))


def is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme.endswith("+cluster")


# What a cluster client may retry after re-reading the topology. redis-py also retries on
# TimeoutError, but a read timeout means the script was sent and may still be running: sending it
# again can charge the request twice (or, with the default three retries, four times). The
# errors kept here are answers from a node that did not run the command (CLUSTERDOWN, a slot not
# covered), or a connection error, which is how a node that restarted or failed over shows up on
# a pooled connection and what the topology refresh exists for. That last one is a trade: a node
# that ran the script and died before replying also shows up as a connection error, and the
# retry then runs it again elsewhere; the cluster client has no hook for the pre-send check the
# single-server backends make, and following a failover is worth more than that narrow window.
_CLUSTER_RETRY_ERRORS = (RedisConnectionError, ClusterDownError, SlotNotCoveredError)


# (redis-py types the attribute as its own 4-tuple, hence the ignores)
class _ClusterClient(RedisCluster):
    ERRORS_ALLOW_RETRY = _CLUSTER_RETRY_ERRORS  # type: ignore[assignment]


class _AsyncClusterClient(AsyncRedisCluster):
    ERRORS_ALLOW_RETRY = _CLUSTER_RETRY_ERRORS  # type: ignore[assignment]


def client_from_url(url: str, *, timeout: float, asyncio: bool) -> Any:
    """A redis-py client for ``url`` with short timeouts (``+cluster``: a cluster client;
    ``+sentinel``: a client of the service's current master, see ``backends._sentinel``)."""
    opts: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "health_check_interval": 30,
    }
    if is_sentinel_url(url):
        # the master of a sentinel-watched service; the same no-retry rule (see below)
        no_retry = AsyncRetry(NoBackoff(), 0) if asyncio else Retry(NoBackoff(), 0)
        return sentinel_client(url, timeout=timeout, asyncio=asyncio, retry=no_retry)
    if is_cluster_url(url):
        cls: Any = _AsyncClusterClient if asyncio else _ClusterClient
        # redis-py's cluster client does not take health_check_interval per node
        opts.pop("health_check_interval")
        return cls.from_url(_cluster_url(url), **opts)
    query = dict(parse_qsl(urlsplit(url).query))
    if "socket_timeout" in query:
        opts.pop("socket_timeout")
    # No retries inside redis-py: its Retry repeats a command after any ConnectionError or
    # TimeoutError, including after the command was sent (a script that timed out may have run),
    # and the backends make the one retry that is safe themselves. Explicit, because redis-py's
    # defaults have changed between releases (a Redis() built by hand retries 10 times in 8.x).
    opts["retry"] = AsyncRetry(NoBackoff(), 0) if asyncio else Retry(NoBackoff(), 0)
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

# A pooled connection that fails its pre-send checks with one of these is replaced, not reported:
# at that point nothing of the call has been written.
_STALE = (RedisConnectionError, RedisTimeoutError, OSError)


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
        # Cluster clients route by slot and follow MOVED/ASK themselves: calls go through
        # redis-py's Script there. On a single server the backends write the RESP themselves.
        self._cluster = isinstance(client, RedisCluster | AsyncRedisCluster)
        self._shas: dict[str, bytes] = {}

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

    def _packed(self, call: ScriptCall) -> bytes:
        sha = self._shas.get(call.name)
        if sha is None:
            digest = hashlib.sha1(source(call.name).encode()).hexdigest()
            sha = self._shas[call.name] = digest.encode()
        return _pack(sha, call)

    def _packed_calls(self, calls: list[ScriptCall]) -> list[bytes]:
        return [self._packed(c) for c in calls]

    @staticmethod
    def _reload(calls: list[ScriptCall], replies: list[Any]) -> tuple[list[int], list[bytes]]:
        """The calls that met NOSCRIPT (the server restarted or failed over and lost its script
        cache: they did not run), and what to send for them: SCRIPT LOAD of each script they
        need, then those calls again. The others ran and must not run twice."""
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        names = sorted({calls[i].name for i in missing})
        loads = [_pack_parts([b"SCRIPT", b"LOAD", source(n).encode()]) for n in names]
        return missing, loads

    @staticmethod
    def _results(calls: list[ScriptCall], replies: list[Any]) -> list[Any]:
        """Replies, with each call's own error (a script error, NOSCRIPT after a reload)
        as a :class:`StorageError` in its place."""
        return [
            StorageError(f"redis {call.name} failed: {reply}", reply)
            if isinstance(reply, BaseException)
            else reply
            for call, reply in zip(calls, replies, strict=True)
        ]


def _one(result: Any) -> Any:
    if isinstance(result, StorageError):
        raise result
    return result


class SyncRedisBackend(_Base):
    def run(self, call: ScriptCall) -> Any:
        self.breaker.before()
        if self._cluster:
            with self._guard(call.name):
                return self._scripts.get(call.name)(keys=call.keys, args=call.args)
        with self._guard(call.name):
            replies = self._pipeline([call])
        return _one(self._results([call], replies)[0])

    def run_many(self, calls: Sequence[ScriptCall], *, chunk: int = 2048) -> list[Any]:
        """Independent calls in as few round trips as the topology allows (an operator's write
        to every slot, e.g. a tenant's block copies): pipelined per connection on one server,
        per node on a cluster (each primary gets its own slots' calls in one write).
        Each reply, or that call's :class:`StorageError`, in order."""
        out: list[Any] = []
        for i in range(0, len(calls), chunk):
            batch = list(calls[i : i + chunk])
            self.breaker.before()
            with self._guard(batch[0].name if batch else "run_many"):
                if self._cluster:
                    replies = self._per_node(batch)
                else:
                    replies = self._pipeline(batch)
            out += self._results(batch, replies)
        return out

    def _per_node(self, calls: list[ScriptCall]) -> list[Any]:
        """``calls`` on a cluster: grouped by the primary that owns each call's slot, written
        to it in one go as on a single server (redis-py's cluster pipeline costs ~0.2 ms of
        Python per command). A slot that moved meanwhile answers MOVED: that call's error."""
        nodes = self.client.nodes_manager
        groups: dict[str, tuple[Any, list[int]]] = {}
        for i, c in enumerate(calls):
            node = nodes.get_node_from_slot(key_slot(c.keys[0]))
            groups.setdefault(node.name, (node, []))[1].append(i)
        replies: list[Any] = [None] * len(calls)
        for node, idx in groups.values():
            client = node.redis_connection or self.client.get_redis_connection(node)
            part = [calls[i] for i in idx]
            got = self._send_to(client.connection_pool, self._packed_calls(part))
            missing, loads = self._reload(part, got)
            if missing:
                rerun = self._send_to(
                    client.connection_pool, loads + self._packed_calls([part[i] for i in missing])
                )
                for j, reply in zip(missing, rerun[len(loads) :], strict=True):
                    got[j] = reply
            for i, reply in zip(idx, got, strict=True):
                replies[i] = reply
        return replies

    def _pipeline(self, calls: list[ScriptCall]) -> list[Any]:
        replies = self._send(self._packed_calls(calls))
        missing, loads = self._reload(calls, replies)
        if missing:
            rerun = self._send(loads + self._packed_calls([calls[i] for i in missing]))
            for i, reply in zip(missing, rerun[len(loads) :], strict=True):
                replies[i] = reply
        return replies

    def _send(self, commands: list[bytes]) -> list[Any]:
        return self._send_to(self.client.connection_pool, commands)

    def _send_to(self, pool: Any, commands: list[bytes]) -> list[Any]:
        """Write ``commands`` on one connection of ``pool``, then read one reply each (a
        ResponseError reply is that command's, returned in its place)."""
        conn = self._connection(pool)
        try:
            conn.send_packed_command(commands, check_health=False)
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except ResponseError as e:
                    replies.append(e)
        except BaseException:
            # failed or interrupted halfway: unread replies may be on the wire, drop it
            conn.disconnect()
            raise
        finally:
            pool.release(conn)
        return replies

    @staticmethod
    def _connection(pool: Any) -> Any:
        """A connection from ``pool`` that the server has not closed: see
        ``AsyncRedisBackend._connection`` (the same checks, blocking)."""
        conn = _get_connection_sync(pool)
        try:
            if not _fresh_enough_sync(conn):
                conn.disconnect()
                conn.connect()
        except BaseException:
            pool.release(conn)
            raise
        return conn

    def close(self) -> None:
        self.client.close()


def _fresh_enough_sync(conn: Any) -> bool:
    try:
        # redis-py's sync can_read polls the socket itself: EOF raises ConnectionError
        if conn.can_read():
            return False
        conn.check_health()
    except _STALE:
        return False
    return True


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
        self._batch = not self._cluster if batch is None else batch
        self._queue: list[tuple[ScriptCall, asyncio.Future[Any]]] = []
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
        if self._cluster:
            with self._guard(call.name):
                return await self._scripts.get(call.name)(keys=call.keys, args=call.args)
        return _one((await self._run_calls([call], call.name))[0])

    async def _run_calls(self, calls: list[ScriptCall], what: str) -> list[Any]:
        """Run ``calls`` in one exchange; a failed exchange raises :class:`StorageError` (and
        counts for the breaker), a call's own error is returned in its place."""
        with self._guard(what):
            replies = await self._pipeline(calls)
        return self._results(calls, replies)

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
        calls = [call for call, _ in batch]
        # a batch of one is observed under its own name, like an unbatched call
        results = await self._run_calls(calls, calls[0].name if len(calls) == 1 else "pipeline")
        for (_, future), result in zip(batch, results, strict=True):
            if isinstance(result, StorageError):
                _settle(future, error=result)
            else:
                _settle(future, result)

    async def _pipeline(self, calls: list[ScriptCall]) -> list[Any]:
        replies = await self._send(self._packed_calls(calls))
        missing, loads = self._reload(calls, replies)
        if missing:
            # one exchange on one connection: the loads, then the reruns
            rerun = await self._send(loads + self._packed_calls([calls[i] for i in missing]))
            for i, reply in zip(missing, rerun[len(loads) :], strict=True):
                replies[i] = reply
        return replies

    async def _send(self, commands: list[bytes]) -> list[Any]:
        """Write ``commands`` on one connection: one write, then one read per reply (a
        ResponseError reply is that command's, returned in its place). The RESP is packed by
        the caller, from arguments that are mostly pre-encoded bytes: redis-py's general
        packing is the largest cost of a pipelined call."""
        pool = self.client.connection_pool
        conn = await self._connection(pool)
        try:
            await conn.send_packed_command(commands, check_health=False)
            replies: list[Any] = []
            for _ in commands:
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

    @staticmethod
    async def _connection(pool: Any) -> Any:
        """A connection from ``pool`` that the server has not closed.

        After a Redis restart every pooled socket is dead: the old server's kernel closed them
        (a FIN is waiting on each), and writing a script call on one would fail the call. A
        pooled connection is therefore checked before anything is written on it: at EOF, with
        unread bytes, or failing the PING that redis-py sends after ``health_check_interval``
        idle seconds (a NAT or load balancer that dropped it quietly), it is replaced by a
        fresh connection. This is the one retry the backends make, and it is safe because not
        one byte of the call has been written yet: the script cannot run twice.

        redis-py's pool does the same EOF check itself, except that redis-py 8 skips it when
        RESP3 maintenance notifications are on (the default, "auto"); done here, it does not
        depend on that.

        What is NOT retried: a failure after the call was written (a write error, a read
        timeout, EOF instead of a reply). The server may have run the script, admit is not
        idempotent, and a retry could charge the request twice. Those fail the call: the plan's
        store-error policy and the breaker take over. Nor is a failed connect retried: a fresh
        connection that cannot connect means the server is down, and a second attempt would
        only double the wait.
        """
        conn = await _get_connection(pool)
        try:
            if not await _fresh_enough(conn):
                await conn.disconnect()
                await conn.connect()
        except BaseException:
            await pool.release(conn)
            raise
        return conn

    async def aclose(self) -> None:
        await self.client.aclose()


async def _fresh_enough(conn: Any) -> bool:
    """False when ``conn`` must not be written on: the server closed it (EOF), it holds bytes
    nobody asked for (a reply left over would be read as the next call's), or its health-check
    PING failed."""
    try:
        # asyncio's reader sees the FIN as soon as the event loop has run after it arrived
        can_read = getattr(conn, "can_read", None) or conn.can_read_destructive  # redis-py 5
        if await can_read():
            return False
        await conn.check_health()  # a PING only after health_check_interval idle seconds
    except _STALE:
        return False
    return True


async def _get_connection(pool: Any) -> Any:
    try:
        return await pool.get_connection()
    except TypeError:  # redis-py 5.x wants the command name
        return await pool.get_connection("EVALSHA")


def _get_connection_sync(pool: Any) -> Any:
    try:
        return pool.get_connection()
    except TypeError:  # redis-py 5.x wants the command name
        return pool.get_connection("EVALSHA")


def _arg(a: Any) -> bytes:
    if type(a) is bytes:
        return a
    # never raises: a lone surrogate from a request body must not kill the whole batch
    return (a if type(a) is str else str(a)).encode("utf-8", "surrogatepass")


def _pack(sha: bytes, call: ScriptCall) -> bytes:
    parts = [b"EVALSHA", sha, str(len(call.keys)).encode()]
    parts += [k.encode("utf-8", "surrogatepass") for k in call.keys]
    parts += [_arg(a) for a in call.args]
    return _pack_parts(parts)


def _pack_parts(parts: list[bytes]) -> bytes:
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
