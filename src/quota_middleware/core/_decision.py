"""The values the core hands out: a request's :class:`Decision`, the :class:`LimitStatus` of
each limit it met, and the :class:`Hold` values an admitted request keeps until it is settled."""

from __future__ import annotations

import json
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Literal

from quota_middleware.base._scripts import Op
from quota_middleware.core._meter import AIRequest
from quota_middleware.identity._identifier import Caller

Reason = Literal[
    "rate", "concurrency", "quota", "budget", "unavailable", "model", "unpriced", "too_large",
    "blocked",
]  # fmt: skip


# Plain slotted classes rather than frozen ones: a frozen dataclass sets each field through
# object.__setattr__, which the hot path pays for every request. Treat them as read-only.
@dataclass(slots=True)
class LimitStatus:
    """One limit as this request left it, for the ``RateLimit`` headers and the app."""

    name: str
    #: ``"requests"``, ``"tokens"``, ``"concurrency"``, ``"token_quota"`` or ``"budget"``
    kind: str
    #: capacity (burst), concurrency maximum, or the quota / budget (micro-dollars) per period
    quota: int
    #: seconds for an empty bucket to refill, or the period's length; 0 for concurrency
    window: int
    remaining: int
    #: seconds until fully replenished (for a denying limit: until the request fits)
    reset: int
    denied: bool = False


@dataclass(slots=True)
class Hold:
    """What an admitted request holds until it is settled: a concurrency slot (``SLOT``), tokens
    reserved in a bucket (``BUCKET``) or on a calendar counter (``QUOTA``, with its ledger)."""

    kind: Op
    key: str
    name: str
    charged: int
    #: bucket refill interval (``BUCKET``), or the counter's unit: 0 tokens, 1 micro-dollars
    param: int = 0
    ledger: str | None = None
    #: ``QUOTA``: the counter's size and alert thresholds (percent), its period id and end
    amount: int = 0
    thresholds: tuple[int, ...] = ()
    period: str = ""
    until_us: int = 0


@dataclass(slots=True)
class Decision:
    """What the middleware decided for one request. The app reads it from ``scope["state"]``
    (ASGI) or ``environ["quota_middleware.decision"]`` (WSGI)."""

    #: whether the request goes on to the app (True for shadow-mode denials)
    allowed: bool
    request_id: str
    caller: Caller | None = None
    plan: str | None = None
    #: whether any limit applied (exempt and unlimited routes carry no headers)
    limited: bool = False
    #: the first limit that said no (also set in shadow mode)
    denied_by: str | None = None
    reason: Reason | None = None
    #: seconds, >= 1, when denied for a reason that passes
    retry_after: int | None = None
    #: the limits would have denied, but the plan is in shadow mode
    shadow: bool = False
    #: decided without the store (fail-open admit or fail-closed 503)
    degraded: bool = False
    statuses: tuple[LimitStatus, ...] = ()
    #: the AI request, on AI routes: model, prompt estimate, reservation
    ai: AIRequest | None = None
    holds: tuple[Hold, ...] = ()
    #: the day (plan time zone) the usage record goes to
    day: str | None = None
    #: the client's own ``x-request-id`` (AI routes), shown in logs, hooks and the response;
    #: never used as a key: ``request_id`` stays unique, so a repeated id cannot skip a charge
    trace_id: str | None = None
    #: the request path (AI routes), for the charge record
    path: str | None = None
    #: ``reason == "blocked"``: the operator's reason (``denied_by`` is "caller" or "tenant")
    block_reason: str | None = None

    @property
    def caller_id(self) -> str | None:
        return self.caller.id if self.caller else None

    @property
    def public_id(self) -> str:
        """The request id the client sees (``x-request-id``) and the logs name."""
        return self.trace_id or self.request_id

    @property
    def needs_settle(self) -> bool:
        return self.caller is not None and (bool(self.holds) or self.ai is not None)


@dataclass(frozen=True, slots=True)
class Charge:
    """What one settled AI request was charged: what ``on_settle`` hooks receive and the
    ``quota_middleware.charges`` log line says. ``estimated`` is set only for real estimates
    (with ``reason``); an upstream error charged nothing has ``error`` set instead."""

    request_id: str
    caller: str
    tenant: str
    plan: str | None
    route: str
    path: str
    provider: str
    model: str | None
    status: int
    input_tokens: int
    cached_tokens: int
    cache_write_tokens: int
    output_tokens: int
    reasoning_tokens: int
    cost_micros: int
    estimated: bool
    reason: str | None = None
    error: str | None = None
    #: admitted without the store (fail-open): charged once the store answers
    degraded: bool = False
    #: the stream was ended by the hard stop (the quota or budget had no room for more)
    stopped: bool = False

    @property
    def cost_usd(self) -> float:
        return self.cost_micros / 1_000_000

    def as_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def log_text(self) -> str:
        """One ``key=value`` line (values without spaces; the error text is quoted)."""
        parts = [f"{k}={v}" for k, v in self.as_dict().items() if k != "error" and v is not None]
        if self.error:
            parts.append("error=" + json.dumps(self.error[:200]))
        return " ".join(parts)


class Stats:
    """Thread-safe counters of decisions, for logs, tests and the metrics exporter."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def incr(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    def __getitem__(self, name: str) -> int:
        return self.counts[name]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)
