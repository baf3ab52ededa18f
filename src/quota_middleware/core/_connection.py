"""One WebSocket connection's side of the middleware, sans-IO: the peer of
:class:`~quota_middleware.core._exchange.Exchange` (one HTTP request) that the ASGI adapter
drives for a ``websocket`` scope, in this order:

1. :meth:`Connection.admit` (a flow), when the client's handshake arrives: identification (the
   same :class:`~quota_middleware.identity.Identifier` as HTTP: JWT, API key or client IP) and
   the one admit call. A connection counts once on the plan's request-rate limits and takes a
   slot of each of its concurrency limits. Returns a :class:`Refusal` (the handshake is denied
   before the app sees it), or None: the connection goes to the app, with :attr:`Connection.extra`
   added to its accept.
2. While it is open: :meth:`Connection.renew` (a flow) every :attr:`Connection.renew_interval`
   seconds keeps its slots held; False means a slot was lost and the connection must close with
   :data:`TRY_AGAIN_LATER`. :meth:`Connection.message` for each message the client sends: False
   when it is over the per-connection message rate (close with :data:`POLICY_VIOLATION`).
3. :meth:`Connection.settle` (a flow), exactly once, whatever happened: gives its slots back.

For route matching a connection's method is :data:`WEBSOCKET`, not the handshake's ``GET``: a
route weight names it to weigh connections (``methods = ["WEBSOCKET"]``), a weight rule on GET
does not price them by accident, and no AI route (POST by default) matches one. Only an
``openai-realtime`` AI route may list WEBSOCKET (:func:`check_routes`).

On such a route (OpenAI Realtime) the connection is also metered, one response at a time:

- the handshake is an AI admission (the model from ``?model=``), reserving one response's
  allowance, so a caller with no room left cannot open a connection;
- :meth:`Connection.response_admit` (a flow) when a response starts (the client's
  ``response.create`` or, for server-side turn detection, the server's ``response.created``)
  reserves that response on the caller's token rates, quotas and budgets in one admit call; a
  refusal is the decision the app is told about (the adapter drops the client's request and
  answers the client with an ``error`` event, or closes on a server-started response);
- :meth:`Connection.server_event` for each server event the app sends: the response's meter
  reads it; ``response.done`` returns the response's usage, and :meth:`Connection.response_settle`
  (a flow) charges it, text and audio tokens at their own prices;
- at close, a response cut short is charged from its estimate, and the handshake's reservation
  is given back with the connection's slots.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qs

from quota_middleware.base._periods import day_id
from quota_middleware.base._request import RequestInfo
from quota_middleware.base._scripts import Op, ScriptArg, ScriptCall
from quota_middleware.config import AIRoute, QuotaConfig
from quota_middleware.core._decision import Charge, Decision, Reason
from quota_middleware.core._engine import Engine
from quota_middleware.core._meter import Meter
from quota_middleware.core._responses import (
    RawHeaders,
    Response,
    allowed_headers,
    denied,
    unauthorized,
)
from quota_middleware.errors import (
    ConfigurationError,
    IdentificationError,
    ModelNotAllowed,
    StorageError,
)
from quota_middleware.limits import Budget, Concurrency, TokenQuota, TokenRate, parse_rate
from quota_middleware.metering.pricing import UnpricedModel

__all__ = [
    "CLOSE_CODES", "POLICY_VIOLATION", "REALTIME", "TRY_AGAIN_LATER", "WEBSOCKET",
    "Connection", "MessageRate", "Refusal", "check_routes", "realtime_error",
]  # fmt: skip

log = logging.getLogger("quota_middleware")

#: the method a WebSocket connection has for route matching (weights, AI routes)
WEBSOCKET = "WEBSOCKET"

#: RFC 6455 1008: the client broke the policy (sent messages over the message rate)
POLICY_VIOLATION = 1008
#: RFC 6455 1013 "Try Again Later": the store was down at the handshake (a 503), or the
#: connection lost its concurrency slot
TRY_AGAIN_LATER = 1013
#: the close code of a refused handshake, by the status the HTTP refusal has, for a server
#: without the ``websocket.http.response`` extension: 4000 + the status (4000-4999 is RFC
#: 6455's private-use range), so a client reads the number it knows from HTTP; a 503 is 1013
CLOSE_CODES = {401: 4401, 403: 4403, 413: 4413, 429: 4429, 503: TRY_AGAIN_LATER}


@dataclass(frozen=True, slots=True)
class Refusal:
    """A denied handshake: the HTTP response the HTTP middleware would answer with, and the
    close code and reason for a server that cannot send a response in place of the upgrade."""

    response: Response

    @property
    def close_code(self) -> int:
        return CLOSE_CODES.get(self.response.status, POLICY_VIOLATION)

    @property
    def reason(self) -> str:
        # a close reason is at most 123 bytes: the status line, never the body
        return self.response.status_line


class MessageRate:
    """A token bucket on the messages one client sends over one connection (``"20/second"``:
    20 at once, then 20 per second), kept in process: a connection lives on one worker, so a
    message costs no store call. ``clock`` is seconds, monotonic."""

    __slots__ = ("interval", "tau", "_tat", "_clock")

    def __init__(self, rate: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        count, period = parse_rate(rate, where="websocket_message_rate")
        self.interval = period / count
        self.tau = period  # the burst is the count: a full bucket holds one period's messages
        self._clock = clock
        self._tat = clock()

    def allow(self) -> bool:
        now = self._clock()
        tat = max(self._tat, now)
        # GCRA, as admit.lua's buckets: one more message fits while the theoretical arrival
        # time is at most one burst ahead (a small epsilon absorbs float rounding)
        if tat + self.interval - now > self.tau + 1e-9:
            return False
        self._tat = tat + self.interval
        return True


REALTIME = "openai-realtime"


def check_routes(config: QuotaConfig) -> None:
    """A :class:`ConfigurationError` for an AI route a WebSocket connection would match but
    could not meter (only Realtime's server events are read), or a Realtime route no
    connection could match."""
    for route in config.ai_routes:
        if WEBSOCKET in route.methods and route.format != REALTIME:
            raise ConfigurationError(
                f"ai_routes[{route.path}].methods",
                f"only {REALTIME} routes meter WebSocket connections; remove WEBSOCKET",
            )
        if route.format == REALTIME and WEBSOCKET not in route.methods:
            raise ConfigurationError(
                f"ai_routes[{route.path}].methods",
                f'{REALTIME} routes need methods = ["WEBSOCKET"]',
            )


Flow = Generator[ScriptCall, Any, Any]


class Connection:
    """The middleware's side of one WebSocket connection (the module docstring has the order)."""

    __slots__ = ("engine", "info", "decision", "extra", "route", "model", "_slots", "_rate",
                 "_settled", "_pending", "_active", "_turns")  # fmt: skip

    def __init__(
        self, engine: Engine, info: RequestInfo, *, message_rate: str | None = None
    ) -> None:
        self.engine = engine
        info.method = WEBSOCKET
        self.info = info
        self.decision: Decision | None = None
        #: headers added to the app's accept (the RateLimit headers)
        self.extra: RawHeaders = []
        # (slot key, max in flight, lease µs) of each concurrency slot held
        self._slots: tuple[tuple[str, int, int], ...] = ()
        self._rate = MessageRate(message_rate) if message_rate is not None else None
        self._settled = False
        #: the Realtime route this connection is metered on, if any
        self.route: AIRoute | None = engine.ai_route(info)
        self.model: str | None = None
        if self.route is not None:
            model = parse_qs(info.query).get("model", [None])[0]
            self.model = model
            # the handshake reserves one response of this model (what a caller without room
            # for one cannot open a connection for)
            info.body = json.dumps({"model": model} if model else {}).encode()
        #: responses admitted and not yet started (the client asked), and the one running
        self._pending: deque[Decision] = deque()
        self._active: tuple[Decision, Meter] | None = None
        self._turns = 0

    # -- the handshake ------------------------------------------------------------------------
    def admit(self) -> Generator[ScriptCall, Any, Refusal | None]:
        """Decide the connection: None to hand it to the app, else the :class:`Refusal`."""
        try:
            decision = yield from self.engine.admit(self.info)
        except IdentificationError as e:
            return Refusal(unauthorized(e))
        self.decision = decision
        if not decision.allowed:
            return Refusal(denied(decision))
        self.extra = allowed_headers(decision)
        self._slots = self._held_slots(decision)
        return None

    def _held_slots(self, decision: Decision) -> tuple[tuple[str, int, int], ...]:
        slots = [h for h in decision.holds if h.kind == Op.SLOT]
        if not slots:
            return ()
        plan = self.engine.config.plan(decision.plan)
        limits = {lim.name: lim for lim in plan.limits if isinstance(lim, Concurrency)}
        return tuple(
            (h.key, limits[h.name].max, int(limits[h.name].lease * 1_000_000)) for h in slots
        )

    def release(self) -> Flow:
        """What an admitted connection whose client went away before the app ran gives back."""
        yield from self.settle()

    # -- while it is open ---------------------------------------------------------------------
    @property
    def renew_interval(self) -> float | None:
        """Seconds between :meth:`renew` calls (a third of the shortest lease, so one late or
        failed renewal never loses the slot); None when the connection holds no slot."""
        if not self._slots:
            return None
        return min(lease for _, _, lease in self._slots) / 3_000_000

    def renew(self) -> Generator[ScriptCall, Any, bool]:
        """Keep the connection's slots held another lease (``lua/renew.lua``). False: a slot was
        lost (the lease ran out before a renewal and another connection took the room); the
        connection must close. A store that does not answer is not a loss: True, and the next
        renewal tries again; if it stays away past the lease, the slots free themselves there,
        as a dead worker's do."""
        decision = self.decision
        if not self._slots or decision is None or self._settled:
            return True
        args: list[ScriptArg] = [self.engine.ctx.now_arg(), decision.request_id, len(self._slots)]
        for _, most, lease in self._slots:
            args += [most, lease]
        call = ScriptCall("renew", tuple(key for key, _, _ in self._slots), tuple(args))
        try:
            reply = yield call
        except StorageError as e:
            self.engine.stats.incr("renew_failed")
            log.warning("quota_middleware: renewing the slots of caller %s failed (%s)",
                        decision.caller_id, e)  # fmt: skip
            return True
        if int(reply[0]) == 1:
            return True
        self.engine.stats.incr("slot_lost")
        log.warning("quota_middleware: caller %s lost a concurrency slot of an open connection",
                    decision.caller_id)  # fmt: skip
        return False

    def message(self) -> bool:
        """Whether one more message from the client fits the per-connection message rate."""
        if self._rate is None or self._rate.allow():
            return True
        self.engine.stats.incr("message_rate_closed")
        return False

    # -- Realtime responses ---------------------------------------------------------------
    def response_admit(self) -> Generator[ScriptCall, Any, Decision]:
        """Reserve the next response on the caller's token rates, quotas and budgets (one admit
        call). Returns its decision; an allowed one waits for the response to start."""
        conn, route = self.decision, self.route
        assert conn is not None and conn.caller is not None and route is not None
        engine, caller = self.engine, conn.caller
        plan = engine.config.plan(conn.plan)
        self._turns += 1
        rid = f"{conn.request_id}.{self._turns}"
        body = json.dumps({"model": self.model} if self.model else {}).encode()
        try:
            # the admission's own estimate and price (its price table and learned margins),
            # as for an HTTP request with this body
            ai = engine.admission._prepare(route, replace(self.info, body=body), plan)
        except (UnpricedModel, ModelNotAllowed) as e:
            reason: Reason = "unpriced" if isinstance(e, UnpricedModel) else "model"
            return Decision(allowed=False, request_id=rid, caller=caller, plan=plan.name,
                            reason=reason)  # fmt: skip
        limits = [
            lim for lim in plan.limits
            if isinstance(lim, TokenRate | TokenQuota | Budget)
            and lim.applies(self.info.path, ai.model)
        ]  # fmt: skip
        now_us = engine.ctx.now_us()
        day = day_id(now_us, plan.zone)
        if not limits:
            decision = Decision(allowed=True, request_id=rid, caller=caller, plan=plan.name,
                                ai=ai, day=day)  # fmt: skip
        else:
            call, holds = engine.plan_admit(caller, plan, limits, 1, rid, ai, now_us)
            try:
                reply = yield call
            except StorageError as e:
                decision = engine.admission._degraded(rid, caller, plan, ai, e, day)
            else:
                decision = engine.decide(caller, plan, limits, rid, reply, holds, ai, day)
        decision.path = self.info.path
        if decision.allowed:
            self._pending.append(decision)
        return decision

    @property
    def needs_admit(self) -> bool:
        """A response is starting with nothing admitted for it (server-side turn detection)."""
        return self.route is not None and not self._pending and self._active is None

    def server_event(self, data: bytes) -> bool:
        """One server event the app sends (a Realtime JSON text message). True when it ends
        the running response (``response.done``): :meth:`response_settle` is next."""
        if self.route is None or b'"type"' not in data:
            return False
        head = data[:200]
        if b'"response.created"' in head and self._active is None and self._pending:
            decision = self._pending.popleft()
            assert decision.ai is not None
            meter = Meter(decision.ai)
            meter.start(200, "application/x-ndjson", None)
            self._active = (decision, meter)
        if self._active is None or b'audio.delta"' in head:
            return False  # base64 audio: nothing to count in it, the usage says it all
        self._active[1].feed(data + b"\n")
        return b'"response.done"' in head

    def response_settle(self) -> Generator[ScriptCall, Any, Charge | None]:
        """Charge the running response (its ``response.done`` usage, or its estimate when the
        connection ended before it): its own settle, with its own request id."""
        if self._active is None:
            return None
        decision, meter = self._active
        self._active = None
        usage, cost, charge = self.engine.finish(decision, meter)
        if decision.needs_settle:
            yield from self.engine.settle(decision, usage, cost)
        return charge

    # -- the close ----------------------------------------------------------------------------
    def settle(self) -> Generator[ScriptCall, Any, list[Charge]]:
        """Once, whatever happened: charges a response cut short, gives back what admitted
        responses that never started reserved, then the connection's own holds (its slots and
        the handshake's reservation). Returns the charges of the responses."""
        charges: list[Charge] = []
        if self._settled or self.decision is None:
            return charges
        self._settled = True
        charge = yield from self.response_settle()
        if charge is not None:
            charges.append(charge)
        while self._pending:
            yield from self.engine.settle(self._pending.popleft())
        if self.decision.needs_settle:
            yield from self.engine.settle(self.decision)
        return charges


def realtime_error(decision: Decision) -> bytes:
    """The Realtime ``error`` server event a client gets for a response the middleware refused
    (its ``response.create`` never reaches the app): OpenAI's codes, as for HTTP."""
    if decision.reason in ("quota", "budget"):
        code = "insufficient_quota"
    elif decision.reason == "rate":
        code = "rate_limit_exceeded"
    else:
        code = decision.reason or "refused"
    message = {
        "insufficient_quota": "the token quota or budget has no room for another response",
        "rate_limit_exceeded": "over the token rate: retry after a moment",
    }.get(code, "the response was refused")
    event = {"type": "error", "event_id": f"evt_{decision.request_id}",
             "error": {"type": "invalid_request_error", "code": code, "message": message,
                       "param": None, "event_id": None}}  # fmt: skip
    return json.dumps(event, separators=(",", ":")).encode()
