"""The ASGI adapter's WebSocket half: a connection's ``receive`` and ``send`` through its
:class:`~quota_middleware.core._connection.Connection`, and a refused handshake. The HTTP half
and the middleware itself are in :mod:`quota_middleware.asgi`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Generator, MutableMapping
from typing import Any

from quota_middleware.base._protocols import AsyncBackend
from quota_middleware.base._scripts import ScriptCall
from quota_middleware.core._connection import (
    POLICY_VIOLATION,
    TRY_AGAIN_LATER,
    Connection,
    Refusal,
    realtime_error,
)
from quota_middleware.core._decision import Charge
from quota_middleware.errors import QuotaError

__all__ = ["ClosedByQuota", "Socket", "refuse"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
#: runs a flow on the backend (the middleware's driver choice); spawns a tracked task
Run = Callable[[Generator[ScriptCall, Any, Any], AsyncBackend], Awaitable[Any]]
Spawn = Callable[[Awaitable[Any]], "asyncio.Task[Any]"]
#: reports a Realtime response's charge (the middleware's on_settle hook)
Report = Callable[[Charge], Awaitable[None]]
#: where a Realtime response's decision is left for the app, next to the connection's
RESPONSE_KEY = "quota_response"

log = logging.getLogger("quota_middleware")


class ClosedByQuota(QuotaError, OSError):
    """Raised into the app from ``send`` once the middleware closed its WebSocket connection
    (the message rate, a lost slot): the ``OSError`` the ASGI spec has servers raise for a send
    on a closed connection, so the app ends as it would for a client that went away (Starlette
    turns it into ``WebSocketDisconnect``)."""


class Socket:
    """Per WebSocket connection: the app's ``receive`` and ``send``, through the
    :class:`Connection`: the handshake's connect replayed, the RateLimit headers added to the
    accept, each client message held to the message rate, and the slots renewed in the
    background while the connection is open. Once the middleware closed the connection, the
    app's ``receive`` is the disconnect and its ``send`` raises :class:`ClosedByQuota`."""

    __slots__ = ("run", "spawn", "conn", "backend", "report", "state", "_first", "_receive",
                 "_send", "_open", "_code", "_stop", "_renewer")  # fmt: skip

    def __init__(
        self, run: Run, spawn: Spawn, conn: Connection, backend: AsyncBackend, first: Message,
        receive: Receive, send: Send, *, report: Report | None = None,
        state: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        self.run, self.spawn, self.conn, self.backend = run, spawn, conn, backend
        self.report = report
        self.state = state if state is not None else {}
        self._first: Message | None = first
        self._receive, self._send = receive, send
        #: until either side closes it: the slots are renewed while it is
        self._open = True
        #: the close code, once the middleware closed it
        self._code: int | None = None
        self._stop = asyncio.Event()
        self._renewer: asyncio.Task[Any] | None = None
        interval = conn.renew_interval
        if interval is not None:
            self._renewer = spawn(self._renew(interval))

    async def receive(self) -> Message:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        while self._code is None:
            message = await self._receive()
            kind = message["type"]
            if kind == "websocket.disconnect":
                self._open = False
                return message
            if kind == "websocket.receive" and self._open and not self.conn.message():
                await self._close(POLICY_VIOLATION, "message rate exceeded")
            if self._code is None and not await self._refused(message):
                return message
        # closed by the middleware (maybe while this receive waited): whatever the client sent
        # after that is not the app's
        return {"type": "websocket.disconnect", "code": self._code}

    async def _refused(self, message: Message) -> bool:
        """A Realtime client's ``response.create``: admitted as the next response, or refused
        (it never reaches the app; the client gets an ``error`` event instead)."""
        if self.conn.route is None or message["type"] != "websocket.receive":
            return False
        text = message.get("text")
        if not text or '"response.create"' not in text[:200]:
            return False
        decision = await self.run(self.conn.response_admit(), self.backend)
        self.state[RESPONSE_KEY] = decision
        if decision.allowed:
            return False
        try:
            await self._send({"type": "websocket.send", "text": realtime_error(decision).decode()})
        except (OSError, RuntimeError):
            pass
        return True

    async def send(self, message: Message) -> None:
        if self._code is not None:
            raise ClosedByQuota(f"the connection was closed by quota-middleware ({self._code})")
        kind = message["type"]
        if kind == "websocket.send" and self.conn.route is not None:
            await self._server_event(message)
            return
        if kind == "websocket.accept" and self.conn.extra:
            message = dict(message)
            message["headers"] = [*(message.get("headers") or ()), *self.conn.extra]
        elif kind == "websocket.close":
            self._open = False  # the app ended it: no more renewals (the settle is next)
        await self._send(message)

    async def _server_event(self, message: Message) -> None:
        conn = self.conn
        text = message.get("text")
        data = text.encode() if text else bytes(message.get("bytes") or b"")
        if conn.needs_admit and b'"response.created"' in data[:200]:
            # a response the server started itself (turn detection): admitted now; refused,
            # the connection ends here, before the client hears it
            decision = await self.run(conn.response_admit(), self.backend)
            self.state[RESPONSE_KEY] = decision
            if not decision.allowed:
                await self._send({"type": "websocket.send",
                                  "text": realtime_error(decision).decode()})  # fmt: skip
                await self._close(POLICY_VIOLATION, "no room for another response")
                raise ClosedByQuota("the response was refused: the connection is closed")
        done = conn.server_event(data)
        await self._send(message)
        if done:
            charge = await self.run(conn.response_settle(), self.backend)
            if charge is not None and self.report is not None:
                await self.report(charge)

    async def _close(self, code: int, reason: str) -> None:
        if not self._open:
            return
        self._open, self._code = False, code
        try:
            await self._send({"type": "websocket.close", "code": code, "reason": reason})
        except (OSError, RuntimeError):
            pass  # the client went away first: it is closed all the same

    async def _renew(self, interval: float) -> None:
        while self._open:
            try:
                async with asyncio.timeout(interval):
                    await self._stop.wait()
                return
            except TimeoutError:
                pass
            if not self._open:
                return
            try:
                held = await self.run(self.conn.renew(), self.backend)
            except Exception:  # a renewer that dies would let the slot lapse silently
                log.exception("quota_middleware: renewing a WebSocket connection's slots failed")
                continue
            if not held:
                await self._close(TRY_AGAIN_LATER, "concurrency slot lost")
                return

    async def finish(self) -> None:
        """Once the app returned: stop renewing, give the slots back."""
        self._open = False
        if self._renewer is not None:
            # Stopped, not cancelled: a renewal in flight lands before the settle. A cancelled
            # one could still reach Redis after it and take the slot again until its lease ends.
            self._stop.set()
            # (wait, not await: a renewer cancelled at shutdown must not skip the settle)
            await asyncio.wait([self._renewer])
        charges = await self.run(self.conn.settle(), self.backend)
        if self.report is not None:
            for charge in charges or ():
                await self.report(charge)


async def refuse(scope: Scope, send: Send, refusal: Refusal) -> None:
    """A denied handshake, before any accept: the HTTP denial itself where the server can send
    a response in place of the upgrade (the ``websocket.http.response`` extension), else a close,
    which servers answer with a 403 and clients that see it read as ``refusal.close_code``."""
    if "websocket.http.response" in (scope.get("extensions") or {}):
        response = refusal.response
        await send({"type": "websocket.http.response.start", "status": response.status,
                    "headers": response.headers})  # fmt: skip
        await send({"type": "websocket.http.response.body", "body": response.body})
    else:
        await send({"type": "websocket.close", "code": refusal.close_code,
                    "reason": refusal.reason})  # fmt: skip
