"""``QuotaMiddleware``: pure ASGI middleware. It wraps ``receive`` and ``send`` (no
BaseHTTPMiddleware), so responses, SSE included, pass through chunk by chunk, untouched."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .alerts import in_process_delivery
from .backends.base import AsyncBackend
from .backends.factory import async_backend
from .backends.memory import MemoryBackend
from .config import QuotaConfig
from .decision import Charge
from .engine import Decision, Engine, drive_async, drive_sync
from .errors import IdentificationError
from .hardstop import stop_event
from .identity import Identifier
from .metering import Meter
from .reports import UsageReader
from .request import RequestInfo
from .responses import (
    RawHeaders,
    Response,
    allowed_headers,
    denied,
    too_large,
    unauthorized,
    without_request_id,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("quota_middleware")

#: seconds between background attempts to write buffered settles
DRAIN_INTERVAL = 1.0


def load_config(config: QuotaConfig | str | os.PathLike[str]) -> QuotaConfig:
    return config if isinstance(config, QuotaConfig) else QuotaConfig.from_toml(config)


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

    The decision is in ``scope["state"]["quota"]`` (``request.state.quota`` in Starlette/FastAPI).
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
    ) -> None:
        self.app = app
        self.on_settle = on_settle
        self.config = load_config(config)
        self.engine = Engine(self.config, identifier=identifier, clock=clock, metrics=metrics)
        self._observer = metrics.store if metrics is not None else None
        self._redis = redis
        self._backend = backend
        if backend is None and redis is None and self.config.storage.url.startswith("memory://"):
            self._backend = async_backend(self.config.storage, observer=self._observer)
        # A redis.asyncio connection belongs to the loop that opened it; a test client or a
        # server reload may run us on a new loop, so a Redis backend built here is per loop.
        self._per_loop = self._backend is None
        self._sync_backend = self._backend if isinstance(self._backend, MemoryBackend) else None
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
            await self.app(scope, receive, send)
            return
        backend = self._get_backend()
        if self.alerts is not None:
            self.alerts.ensure(backend)
        info = RequestInfo.from_scope(scope)
        route = self.engine.ai_route(info)
        if route is not None:
            body = await _read_body(scope, receive, route.max_body)
            if body is None:
                await _send_response(send, too_large(route.max_body))
                return
            info.body = body
            upstream_receive, receive = receive, _replay(body, receive)
        try:
            if self._sync_backend is not None:
                # the embedded store answers in microseconds: no coroutine per store call
                decision = drive_sync(self.engine.admit(info), self._sync_backend)
            else:
                decision = await self._admit(info, backend)
        except IdentificationError as e:
            await _send_response(send, unauthorized(e))
            return
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state["quota"] = decision
        if not decision.allowed:
            await _send_response(send, denied(decision))
            return
        if decision.ai is not None and decision.ai.body is not None:
            # the output cap was written into the body: the app gets that body
            receive = _replay(decision.ai.body, upstream_receive)
            scope["headers"] = [
                *((k, v) for k, v in scope.get("headers") or () if k.lower() != b"content-length"),
                (b"content-length", str(len(decision.ai.body)).encode()),
            ]
        if not decision.needs_settle:
            extra = allowed_headers(decision)
            await self.app(scope, receive, _with_headers(send, extra) if extra else send)
            return
        responder = _Responder(self, decision, backend, send)
        try:
            await self.app(scope, receive, responder.send)
        except BaseException as e:
            if not (responder.meter is not None and responder.meter.stopped and _stopped(e)):
                raise
            # the hard stop ended the response: the app (and its upstream) stopped with it
        finally:
            await responder.settle()

    async def _admit(self, info: RequestInfo, backend: AsyncBackend) -> Decision:
        # Shielded: if the client goes away while the admit call is in flight, the call still
        # completes in Redis, and what it took (a slot, a reservation) must be given back now,
        # not when its lease ends.
        task = self._spawn(drive_async(self.engine.admit(info), backend))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(lambda t: self._release_orphan(t, backend))
            raise

    def _release_orphan(self, task: asyncio.Task[Any], backend: AsyncBackend) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        decision: Decision = task.result()
        if decision.allowed and decision.needs_settle:
            self._spawn(drive_async(self.engine.settle(decision), backend))

    def _start_drain(self, backend: AsyncBackend) -> None:
        """Writes the settle buffer in the background while it holds settles (the store was
        down), every ``DRAIN_INTERVAL`` seconds, so they land without waiting for traffic."""
        if self._drainer is not None and not self._drainer.done():
            return

        async def drain() -> None:
            buffer = self.engine.settle_buffer
            while len(buffer):
                before = len(buffer)
                try:
                    await drive_async(self.engine.drain(), backend)
                except Exception:  # never let the drainer die silently with settles left
                    log.exception("quota_middleware: draining the settle buffer failed")
                if len(buffer) >= before:  # no progress: the store is still away
                    await asyncio.sleep(DRAIN_INTERVAL)

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


class _Responder:
    """Per request: adds headers, meters the body as it passes, ends it at the hard stop,
    settles exactly once."""

    __slots__ = (
        "mw", "decision", "backend", "_send", "meter", "_extra", "_settled", "_hard_stop",
        "_denied",
    )  # fmt: skip

    def __init__(
        self, mw: QuotaMiddleware, decision: Decision, backend: AsyncBackend, send: Send
    ) -> None:
        self.mw = mw
        self.decision = decision
        self.backend = backend
        self._send = send
        self.meter = Meter(decision.ai) if decision.ai is not None else None
        self._extra = allowed_headers(decision)
        self._settled = False
        self._hard_stop = self.meter is not None and mw.engine.hard_stop(decision)
        self._denied = False  # the hard stop said no: end at the next event boundary

    async def send(self, message: Message) -> None:
        kind = message["type"]
        meter = self.meter
        if meter is not None and meter.stopped:
            raise _HardStop("the response was ended by the hard stop")
        if kind == "http.response.start":
            headers = message.get("headers") or ()
            if self.meter is not None:
                self.meter.start(
                    message["status"],
                    _header(headers, b"content-type"),
                    _header(headers, b"content-encoding"),
                )
            if self._extra:
                message = dict(message)
                extra = self._extra
                if self.meter is not None:
                    extra = without_request_id(extra, headers)
                message["headers"] = [*headers, *extra]
        elif kind == "http.response.body" and meter is not None:
            meter.feed(message.get("body", b""))
            if self._hard_stop and message.get("more_body") and message.get("body"):
                await self._send(message)
                await self._check(meter)
                return
        await self._send(message)

    async def _check(self, meter: Meter) -> None:
        if not self._denied:
            if await drive_async(self.mw.engine.top_up(self.decision, meter), self.backend):
                return
            self._denied = True
        assert meter.parser is not None
        if not meter.parser.at_boundary:
            return  # end it where an event ends, never inside one
        meter.stopped = True
        event = stop_event(self.decision.ai.estimate.format if self.decision.ai else "", meter)
        await self._send({"type": "http.response.body", "body": event, "more_body": False})
        raise _HardStop("the quota or budget has no room for the rest of this response")

    async def settle(self) -> None:
        if self._settled:
            return
        self._settled = True
        usage, cost, charge = self.mw.engine.finish(self.decision, self.meter)
        if self.decision.needs_settle:
            flow = self.mw.engine.settle(self.decision, usage, cost)
            # Shielded: a client disconnect cancels the request task, but what it held must
            # still be given back and what it used charged.
            await asyncio.shield(self.mw._spawn(drive_async(flow, self.backend)))
        if len(self.mw.engine.settle_buffer):
            self.mw._start_drain(self.backend)
        if charge is not None and self.mw.on_settle is not None:
            await _call_hook(self.mw.on_settle, charge)


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
