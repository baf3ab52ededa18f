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
does not price them by accident, and no AI route (POST by default) matches one. An AI route that
lists WEBSOCKET is refused at startup (:func:`check_routes`): messages are not metered yet.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from quota_middleware.base._request import RequestInfo
from quota_middleware.base._scripts import Op, ScriptArg, ScriptCall
from quota_middleware.config import QuotaConfig
from quota_middleware.core._decision import Decision
from quota_middleware.core._engine import Engine
from quota_middleware.core._responses import (
    RawHeaders,
    Response,
    allowed_headers,
    denied,
    unauthorized,
)
from quota_middleware.errors import ConfigurationError, IdentificationError, StorageError
from quota_middleware.limits import Concurrency, parse_rate

__all__ = [
    "CLOSE_CODES", "POLICY_VIOLATION", "TRY_AGAIN_LATER", "WEBSOCKET", "Connection",
    "MessageRate", "Refusal", "check_routes",
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


def check_routes(config: QuotaConfig) -> None:
    """A :class:`ConfigurationError` for an AI route a WebSocket connection would match: its
    messages are not metered, so a connection there would be admitted as if it were free."""
    for route in config.ai_routes:
        if WEBSOCKET in route.methods:
            raise ConfigurationError(
                f"ai_routes[{route.path}].methods",
                "WebSocket connections are not metered as AI requests; remove WEBSOCKET",
            )


Flow = Generator[ScriptCall, Any, Any]


class Connection:
    """The middleware's side of one WebSocket connection (the module docstring has the order)."""

    __slots__ = ("engine", "info", "decision", "extra", "_slots", "_rate", "_settled")

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

    # -- the close ----------------------------------------------------------------------------
    def settle(self) -> Flow:
        """Once, whatever happened: gives back the slots the connection held."""
        if self._settled or self.decision is None:
            return
        self._settled = True
        if self.decision.needs_settle:
            yield from self.engine.settle(self.decision)
