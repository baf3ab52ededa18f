"""One request's exchange with the middleware, sans-IO: what both adapters drive.

The adapters only translate their protocol (ASGI messages, a WSGI environ and iterable) into
these calls, in this order, and write out what they return:

1. :attr:`Exchange.max_body`: on an AI route, buffer at most this much of the request body
   (more: pass ``None`` on, a 413).
2. :meth:`Exchange.admit` (a flow): identification, estimate, the admit call. Returns the
   :class:`~quota_middleware.responses.Response` to answer with (401, 403, 413, 429, 503), or
   None: the request goes to the app, with :attr:`Exchange.app_body` when the body was
   rewritten (the output cap written in).
3. :meth:`Exchange.response_start` with the app's status and headers: the headers to add.
4. :meth:`Exchange.response_chunk` for every body chunk as it is relayed; on a hard-stopped
   stream, :meth:`Exchange.stop` (a flow) after each: bytes mean "send these last and end the
   response" (the app is then stopped).
5. :meth:`Exchange.settle` (a flow), exactly once, whatever happened: gives back what the
   request held, charges what it used, and returns its :class:`~quota_middleware.Charge`.

Flows are generators that yield :class:`~quota_middleware.scripts.ScriptCall` values (see
``flows.py``); the adapter runs them on its backend.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

from quota_middleware.base._events import AlertEvent
from quota_middleware.base._request import RequestInfo
from quota_middleware.base._scripts import ScriptCall
from quota_middleware.core._decision import Charge, Decision
from quota_middleware.core._engine import Engine
from quota_middleware.core._hardstop import stop_event
from quota_middleware.core._meter import Meter
from quota_middleware.core._responses import (
    REQUEST_ID,
    RawHeaders,
    Response,
    allowed_headers,
    denied,
    too_large,
    unauthorized,
)
from quota_middleware.errors import IdentificationError
from quota_middleware.metering._usage import Usage

__all__ = ["METER_KEY", "Exchange"]

#: where the adapters publish :meth:`Exchange.meter_only` to the app: in ASGI
#: ``scope["state"]``, in WSGI the environ. Only present while the response is metered.
METER_KEY = "quota_middleware.meter"

Flow = Generator[ScriptCall, Any, Any]


class Exchange:
    """The middleware's side of one HTTP request (see the module docstring for the order)."""

    __slots__ = (
        "engine", "info", "route", "decision", "meter", "extra", "_hard_stop", "_denied",
        "_settled", "_finished",
    )  # fmt: skip

    def __init__(self, engine: Engine, info: RequestInfo) -> None:
        self.engine = engine
        self.info = info
        self.route = engine.ai_route(info)
        self.decision: Decision | None = None
        #: the response's meter (AI requests that will be settled)
        self.meter: Meter | None = None
        #: headers added to the app's response
        self.extra: RawHeaders = []
        self._hard_stop = False
        self._denied = False  # the hard stop said no: end at the next event boundary
        self._settled = False
        self._finished: tuple[Usage | None, int, Charge | None] | None = None

    @property
    def max_body(self) -> int | None:
        """Bytes of request body to buffer before admission (AI routes), else None."""
        return self.route.max_body if self.route is not None else None

    # -- admission ----------------------------------------------------------------------------
    def admit(self, body: bytes | None = None) -> Generator[ScriptCall, Any, Response | None]:
        """Decide the request. ``body``: the buffered body on an AI route, None when it was
        over :attr:`max_body`. Returns the response to answer with, or None for the app."""
        if self.route is not None:
            if body is None:
                return too_large(self.route.max_body)
            self.info.body = body
        try:
            decision = yield from self.engine.admit(self.info)
        except IdentificationError as e:
            return unauthorized(e)
        self.decision = decision
        if not decision.allowed:
            return denied(decision)
        self.extra = allowed_headers(decision)
        if decision.ai is not None and decision.needs_settle:
            self.meter = Meter(decision.ai)
            self._hard_stop = self.engine.hard_stop(decision)
        return None

    def release(self) -> Flow:
        """What an admitted request whose client went away before the app ran must give back
        (its slot, its reservation): the settle, with nothing used."""
        if self.decision is not None and self.decision.allowed and self.decision.needs_settle:
            yield from self.engine.settle(self.decision)

    @property
    def app_body(self) -> bytes | None:
        """The body the app gets instead of the client's (the output cap was written in)."""
        ai = self.decision.ai if self.decision is not None else None
        return ai.body if ai is not None else None

    @property
    def tracks_response(self) -> bool:
        """Whether the response must go through :meth:`response_chunk` and :meth:`settle`
        (else only the headers are added)."""
        return self.decision is not None and self.decision.needs_settle

    # -- the response -------------------------------------------------------------------------
    def response_start(self, status: int, headers: Sequence[tuple[bytes, bytes]]) -> RawHeaders:
        """The headers to add to the app's response (the app's own ``x-request-id`` wins)."""
        meter = self.meter
        if meter is None:
            return self.extra
        content_type = content_encoding = None
        has_id = False
        for k, v in headers:
            name = k.lower()
            if name == b"content-type":
                content_type = bytes(v).decode("latin-1")
            elif name == b"content-encoding":
                content_encoding = bytes(v).decode("latin-1")
            elif name == REQUEST_ID:
                has_id = True
        meter.start(status, content_type, content_encoding)
        if has_id:
            return [(k, v) for k, v in self.extra if k != REQUEST_ID]
        return self.extra

    def response_chunk(self, chunk: bytes) -> None:
        if self.meter is not None and chunk:
            self.meter.feed(chunk)

    def meter_only(self, chunk: bytes) -> None:
        """Bytes of the response the app metered but did not send: the AI proxy's usage-only
        final chunk, which it asked the upstream for and strips from what the client receives.
        They go to the meter in stream order, between the relayed chunks, never to the client.
        The adapters publish this as :data:`METER_KEY` while the response is metered."""
        self.response_chunk(chunk)

    @property
    def hard_stop(self) -> bool:
        """Whether :meth:`stop` must be asked after each relayed chunk."""
        return self._hard_stop

    @property
    def stopped(self) -> bool:
        return self.meter is not None and self.meter.stopped

    def stop(self) -> Generator[ScriptCall, Any, bytes | None]:
        """After a relayed chunk of a hard-stopped stream: None to go on, or the last bytes to
        send (the provider's own error event; may be empty) when the stream must end here."""
        meter, decision = self.meter, self.decision
        assert meter is not None and decision is not None and decision.ai is not None
        if not self._denied:
            if (yield from self.engine.top_up(decision, meter)):
                return None
            self._denied = True
        assert meter.parser is not None
        if not meter.parser.at_boundary:
            return None  # end it where an event ends, never inside one
        meter.stopped = True
        return stop_event(decision.ai.estimate.format, meter)

    def complete(self) -> None:
        """The response's last bytes are in: its usage and charge are known now, before they
        reach the client, so observers (OpenTelemetry) record them inside the request's span,
        which ASGI servers' instrumentation ends with the last send. :meth:`settle` uses them."""
        if self._finished is None and not self._settled and self.decision is not None:
            self._finished = self.engine.finish(self.decision, self.meter)

    # -- settle -------------------------------------------------------------------------------
    def settle(self) -> Generator[ScriptCall, Any, Charge | None]:
        """Once, whatever happened: the usage metered, its cost, the settle calls. Returns the
        request's charge (AI requests), for the ``on_settle`` hook."""
        if self._settled or self.decision is None:
            return None
        self._settled = True
        decision = self.decision
        usage, cost, charge = self._finished or self.engine.finish(decision, self.meter)
        if decision.needs_settle:
            events: list[AlertEvent] = yield from self.engine.settle(decision, usage, cost)
            del events
        return charge

    @property
    def buffered(self) -> bool:
        """Settles wait in the engine's buffer (the store was down): drain in the background."""
        return len(self.engine.settle_buffer) > 0
