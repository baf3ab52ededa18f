"""``QuotaMiddleware``: pure ASGI middleware (it wraps ``receive``/``send``; no BaseHTTPMiddleware,
so streaming responses pass through chunk by chunk and background tasks are untouched)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .backends.base import AsyncBackend
from .backends.factory import async_backend
from .config import QuotaConfig
from .engine import Decision, Engine, drive_async
from .errors import IdentificationError, StorageError
from .identity import Identifier
from .request import RequestInfo
from .responses import RawHeaders, Response, denied, rate_limit_headers, unauthorized

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("quota_middleware")


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
    ) -> None:
        self.app = app
        self.config = load_config(config)
        self.engine = Engine(self.config, identifier=identifier, clock=clock)
        self._redis = redis
        self._backend = backend
        if backend is None and redis is None and self.config.storage.url.startswith("memory://"):
            self._backend = async_backend(self.config.storage)
        # A redis.asyncio connection belongs to the loop that opened it; a test client or a
        # server reload may run us on a new loop, so a Redis backend built here is per loop.
        self._per_loop = self._backend is None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: set[asyncio.Task[None]] = set()

    @property
    def stats(self) -> dict[str, int]:
        return self.engine.stats.snapshot()

    def _get_backend(self) -> AsyncBackend:
        if not self._per_loop:
            assert self._backend is not None
            return self._backend
        loop = asyncio.get_running_loop()
        if self._backend is None or self._loop is not loop:
            self._backend = async_backend(self.config.storage, self._redis)
            self._loop = loop
        return self._backend

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        backend = self._get_backend()
        try:
            decision = await drive_async(self.engine.admit(RequestInfo.from_scope(scope)), backend)
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
        extra = rate_limit_headers(decision.statuses)
        app_send = send if not extra else _with_headers(send, extra)
        try:
            await self.app(scope, receive, app_send)
        finally:
            await self._settle(decision, backend)

    async def _settle(self, decision: Decision, backend: AsyncBackend) -> None:
        call = self.engine.plan_settle(decision)
        if call is None:
            return

        async def run() -> None:
            try:
                await backend.run_async(call)
            except StorageError as e:
                # The lease frees what this request held when it ends.
                log.warning("quota_middleware: settle failed (%s); lease will expire", e)

        # Shielded: a client disconnect cancels the request task, but what it held must still be
        # given back.
        task = asyncio.ensure_future(run())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        await asyncio.shield(task)


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
