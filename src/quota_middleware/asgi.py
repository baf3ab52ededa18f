"""``QuotaMiddleware``: pure ASGI middleware. It wraps ``receive`` and ``send`` (no
BaseHTTPMiddleware), so responses, SSE included, pass through chunk by chunk, untouched. What
happens to a request is :class:`~quota_middleware.exchange.Exchange`'s, and to a WebSocket
connection :class:`~quota_middleware.core._connection.Connection`'s: this module only translates
ASGI messages into their calls and runs their flows on the async backend."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Generator, MutableMapping
from typing import Any, TypeVar

from quota_middleware._asgi_websocket import Socket, refuse
from quota_middleware.alerts import in_process_delivery
from quota_middleware.backends._factory import async_backend
from quota_middleware.base._protocols import AsyncBackend
from quota_middleware.base._request import RequestInfo
from quota_middleware.base._scripts import ScriptCall
from quota_middleware.config import QuotaConfig, load_config
from quota_middleware.core._connection import (
    Connection,
    MessageRate,
    check_routes,
)
from quota_middleware.core._decision import Charge
from quota_middleware.core._engine import Engine, drive_async, drive_sync
from quota_middleware.core._exchange import METER_KEY, Exchange
from quota_middleware.core._responses import RawHeaders, Response
from quota_middleware.identity._identifier import Identifier
from quota_middleware.reports import UsageReader

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
T = TypeVar("T")

log = logging.getLogger("quota_middleware")

#: where the middleware leaves itself in ``scope["state"]`` (the WSGI one: in the environ),
#: next to the decision, so a mounted app can read usage through its store
INSTANCE_KEY = "quota_middleware"

#: seconds between background attempts to write buffered settles
DRAIN_INTERVAL = 1.0


class QuotaMiddleware:
    """Per-caller limits for any ASGI app::

        app.add_middleware(QuotaMiddleware, config=QuotaConfig.from_toml("policy.toml"))

    :param config: a :class:`QuotaConfig` or the path of a TOML policy file.
    :param redis: an existing ``redis.asyncio`` client (single or cluster) to use instead of
        ``config.storage.url``.
    :param backend: any :class:`~quota_middleware.backends.AsyncBackend` (tests, custom stores).
    :param identifier: replaces the identifier built from ``config.identity``.
    :param metrics: a :class:`~quota_middleware.metrics.PrometheusMetrics`.
    :param on_settle: called with the :class:`~quota_middleware.Charge` of every settled AI
        request, after its settle; a plain function or a coroutine function. Exceptions are
        logged, never raised into the request.
    :param websocket_message_rate: the most messages a client may send over one WebSocket
        connection, e.g. ``"20/second"`` (a burst of 20, then 20 per second), counted in
        process per connection; one over it closes the connection with 1008. None: unlimited.

    The decision is in ``scope["state"]["quota"]`` (``request.state.quota`` in Starlette/FastAPI),
    for WebSocket connections too (README, "WebSockets").
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        config: QuotaConfig | str | os.PathLike[str],
        redis: Any = None,
        backend: AsyncBackend | None = None,
        identifier: Identifier | None = None,
        clock: Callable[[], int] | None = None,
        metrics: Any = None,
        on_settle: Callable[[Charge], object] | None = None,
        websocket_message_rate: str | None = None,
    ) -> None:
        self.app = app
        self.on_settle = on_settle
        self.config = load_config(config)
        check_routes(self.config)
        if websocket_message_rate is not None:
            MessageRate(websocket_message_rate)  # a bad rate fails here, not at a connection
        self.websocket_message_rate = websocket_message_rate
        self.engine = Engine(self.config, identifier=identifier, clock=clock, metrics=metrics)
        self._observer = metrics.store if metrics is not None else None
        self._redis = redis
        self._backend = backend
        if backend is None and redis is None and self.config.storage.is_memory:
            self._backend = async_backend(self.config.storage, observer=self._observer)
        # A redis.asyncio connection belongs to the loop that opened it; a test client or a
        # server reload may run us on a new loop, so a Redis backend built here is per loop.
        self._per_loop = self._backend is None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: set[asyncio.Task[Any]] = set()
        self._drainer: asyncio.Task[Any] | None = None
        #: the in-process alert dispatcher (``config.alerts.deliver_in_process``), started by the
        #: first request; ``.stop()`` it on shutdown (it is also stopped at exit)
        self.alerts = in_process_delivery(self.config, redis, metrics)

    @property
    def stats(self) -> dict[str, int]:
        return self.engine.stats.snapshot()

    def reader(self) -> UsageReader:
        """A :class:`~quota_middleware.reports.UsageReader` on this middleware's store; call it
        from inside a request (it uses the running loop's connection)::

            records = await quota.reader().ausage(request.state.quota.caller_id)

        where ``quota`` is this middleware instance (``examples/fastapi_app`` shows how to find
        it when it was added with ``app.add_middleware``).
        """
        return UsageReader(self.config, self._get_backend())

    def _get_backend(self) -> AsyncBackend:
        if not self._per_loop:
            assert self._backend is not None
            return self._backend
        loop = asyncio.get_running_loop()
        if self._backend is None or self._loop is not loop:
            self._backend = async_backend(self.config.storage, self._redis, observer=self._observer)
            self._loop = loop
        return self._backend

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await self._websocket(scope, receive, send)
            else:  # lifespan, and whatever else a server sends
                await self.app(scope, receive, send)
            return
        backend = self._get_backend()
        if self.alerts is not None:
            self.alerts.ensure(backend)
        ex = Exchange(self.engine, RequestInfo.from_scope(scope))
        body = None
        client_receive = receive
        if ex.max_body is not None:
            body = await _read_body(scope, receive, ex.max_body)
            if body is not None:
                receive = _replay(body, client_receive)
        refusal = await self._admit(ex.admit(body), ex.release, backend)
        if ex.decision is not None:
            state = scope.setdefault("state", {})
            state["quota"] = ex.decision
            state[INSTANCE_KEY] = self  # for the self-service usage app (its reader)
        if refusal is not None:
            await _send_response(send, refusal)
            return
        if ex.app_body is not None:  # the output cap was written in: the app gets that body
            receive = _replay(ex.app_body, client_receive)
            scope["headers"] = [
                *((k, v) for k, v in scope.get("headers") or () if k.lower() != b"content-length"),
                (b"content-length", str(len(ex.app_body)).encode()),
            ]
        if not ex.tracks_response:
            await self.app(scope, receive, _with_headers(send, ex.extra) if ex.extra else send)
            return
        if ex.meter is not None:
            scope["state"][METER_KEY] = ex.meter_only
        relay = _Relay(self, ex, backend, send)
        try:
            await self.app(scope, receive, relay.send)
        except BaseException as e:
            if not (ex.stopped and _stopped(e)):
                raise
            # the hard stop ended the response: the app (and its upstream) stopped with it
        finally:
            # Shielded, hook included: a client disconnect cancels the request task, but what
            # it held must still be given back, what it used charged, and the charge reported.
            await asyncio.shield(self._spawn(self._finish(ex, backend)))

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket connection: admitted at its handshake (refused before the app sees it),
        its slots held while it is open, given back when it closes."""
        first = await receive()
        if first["type"] != "websocket.connect":
            return  # the client left before its handshake: nothing to admit, nothing for the app
        backend = self._get_backend()
        if self.alerts is not None:
            self.alerts.ensure(backend)
        conn = Connection(
            self.engine, RequestInfo.from_scope(scope), message_rate=self.websocket_message_rate
        )
        refusal = await self._admit(conn.admit(), conn.release, backend)
        if conn.decision is not None:
            scope.setdefault("state", {})["quota"] = conn.decision
        if refusal is not None:
            await refuse(scope, send, refusal)
            return
        socket = Socket(self._run, self._spawn, conn, backend, first, receive, send,
                        report=self._report, state=scope.setdefault("state", {}))  # fmt: skip
        try:
            await self.app(scope, socket.receive, socket.send)
        finally:
            # shielded: a cancelled connection task must still give its slots back
            await asyncio.shield(self._spawn(socket.finish()))

    async def _report(self, charge: Charge) -> None:
        if self.on_settle is not None:
            await _call_hook(self.on_settle, charge)

    async def _finish(self, ex: Exchange, backend: AsyncBackend) -> None:
        charge = await self._run(ex.settle(), backend)
        if ex.buffered:
            self._start_drain(backend)
        if charge is not None and self.on_settle is not None:
            await _call_hook(self.on_settle, charge)

    async def _run(self, flow: Generator[ScriptCall, Any, T], backend: AsyncBackend) -> T:
        if getattr(backend, "inline", False):
            # the embedded store answers in microseconds: no coroutine per store call
            return drive_sync(flow, backend)  # type: ignore[arg-type]
        return await drive_async(flow, backend)

    async def _admit(
        self,
        flow: Generator[ScriptCall, Any, T],
        release: Callable[[], Generator[ScriptCall, Any, Any]],
        backend: AsyncBackend,
    ) -> T:
        """Run an admit ``flow``; ``release`` is what it took, as a flow that gives it back."""
        if getattr(backend, "inline", False):
            return await self._run(flow, backend)
        # Shielded: if the client goes away while the admit call is in flight, the call still
        # completes in Redis, and what it took (a slot, a reservation) must be given back now,
        # not when its lease ends.
        task = self._spawn(drive_async(flow, backend))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(lambda t: self._release_orphan(t, release, backend))
            raise

    def _release_orphan(
        self,
        task: asyncio.Task[Any],
        release: Callable[[], Generator[ScriptCall, Any, Any]],
        backend: AsyncBackend,
    ) -> None:
        if not task.cancelled() and task.exception() is None:
            self._spawn(drive_async(release(), backend))

    def _start_drain(self, backend: AsyncBackend) -> None:
        """Writes the settle buffer in the background while it holds settles (the store was
        down), every ``DRAIN_INTERVAL`` seconds, so they land without waiting for traffic."""
        if self._drainer is not None and not self._drainer.done():
            return

        async def drain() -> None:
            buffer = self.engine.settle_buffer
            progress = False
            while len(buffer):
                if not progress:  # the store was away a moment ago: give it time
                    await asyncio.sleep(DRAIN_INTERVAL)
                before = len(buffer)
                try:
                    await drive_async(self.engine.drain(), backend)
                except Exception:  # never let the drainer die silently with settles left
                    log.exception("quota_middleware: draining the settle buffer failed")
                progress = len(buffer) < before

        self._drainer = self._spawn(drain())

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task


class _HardStop(Exception):
    """Raised into the app from ``send`` once the hard stop ended its stream, so it stops
    generating (and closes its upstream) as it would for a client that went away."""


def _stopped(e: BaseException) -> bool:
    if isinstance(e, _HardStop):
        return True
    # task groups (anyio, in Starlette's StreamingResponse) wrap it
    return isinstance(e, BaseExceptionGroup) and all(_stopped(x) for x in e.exceptions)


class _Relay:
    """Per request: the app's ``send``, through the exchange: headers added, the body metered
    as it passes, the stream ended at the hard stop."""

    __slots__ = ("mw", "ex", "backend", "_send")

    def __init__(self, mw: QuotaMiddleware, ex: Exchange, backend: AsyncBackend, send: Send):
        self.mw, self.ex, self.backend, self._send = mw, ex, backend, send

    async def send(self, message: Message) -> None:
        ex = self.ex
        if ex.stopped:
            raise _HardStop("the response was ended by the hard stop")
        kind = message["type"]
        if kind == "http.response.start":
            headers = message.get("headers") or ()
            extra = ex.response_start(message["status"], headers)
            if extra:
                message = dict(message)
                message["headers"] = [*headers, *extra]
        elif kind == "http.response.body":
            chunk = message.get("body", b"")
            ex.response_chunk(chunk)
            if not message.get("more_body"):
                ex.complete()
            elif ex.hard_stop and chunk:
                await self._send(message)
                last = await self.mw._run(ex.stop(), self.backend)
                if last is not None:
                    await self._send({"type": "http.response.body", "body": last,
                                      "more_body": False})  # fmt: skip
                    raise _HardStop("the quota or budget has no room for the rest")
                return
        await self._send(message)


async def _call_hook(hook: Callable[[Charge], object], charge: Charge) -> None:
    try:
        result = hook(charge)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("quota_middleware: on_settle hook failed for %s", charge.request_id)


def _header(headers: Any, name: bytes) -> str | None:
    for k, v in headers:
        if k.lower() == name:
            return bytes(v).decode("latin-1")
    return None


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None when it is over ``limit`` bytes."""
    declared = _header(scope.get("headers") or (), b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break  # http.disconnect: the app sees an empty body and the replayed disconnect
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """Hands the app the buffered body byte for byte, then the real ``receive`` (disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _with_headers(send: Send, extra: RawHeaders) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = dict(message)
            message["headers"] = [*message.get("headers", ()), *extra]
        await send(message)

    return wrapped


async def _send_response(send: Send, response: Response) -> None:
    await send(
        {"type": "http.response.start", "status": response.status, "headers": response.headers}
    )
    await send({"type": "http.response.body", "body": response.body})
