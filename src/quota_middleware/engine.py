"""The sans-IO core: from a request to a :class:`Decision`, and from a finished response to the
settle call that charges it.

Nothing here does I/O. A phase that needs the store is a generator that ``yield``\\ s a
:class:`~quota_middleware.scripts.ScriptCall` and is sent the reply (the httpx auth-flow pattern);
``drive_sync`` and ``drive_async`` are the two ~10-line drivers the WSGI and ASGI adapters use.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from .backends.base import AsyncBackend, SyncBackend
from .config import AIRoute, Plan, QuotaConfig
from .errors import IdentificationError, StorageError
from .events import AlertEvent, outbox_call, parse_settle_events
from .identity import Caller, Identifier
from .keys import CallerKeys, app_tag
from .limits import AppBudget, Budget, Concurrency, Limit, RequestRate, TokenQuota, TokenRate
from .metering import AIRequest, ModelNotAllowed, UnpricedModel, prepare, price_table
from .periods import day_id, period_of
from .request import RequestInfo
from .scripts import ScriptArg, ScriptCall, hash_pairs
from .usage import Usage, clean_model

log = logging.getLogger("quota_middleware")

Flow = Generator[ScriptCall, Any, "Decision"]
Reason = Literal[
    "rate", "concurrency", "quota", "budget", "unavailable", "model", "unpriced", "too_large"
]  # fmt: skip
#: how long a settled request's id is remembered, so a retried settle is a no-op
SETTLE_MARKER_MS = 15 * 60 * 1000
_KINDS = {
    RequestRate: "requests",
    TokenRate: "tokens",
    Concurrency: "concurrency",
    TokenQuota: "token_quota",
    Budget: "budget",
}


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
    """What an admitted request holds until it is settled: a concurrency slot (``c``), tokens
    reserved in a bucket (``b``) or on a calendar counter (``q``, with its ledger)."""

    kind: str
    key: str
    name: str
    charged: int
    #: bucket refill interval (``b``), or the counter's unit: 0 tokens, 1 micro-dollars (``q``)
    param: int = 0
    ledger: str | None = None
    #: ``q``: the counter's size and alert thresholds (percent), its period id and end
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

    @property
    def caller_id(self) -> str | None:
        return self.caller.id if self.caller else None

    @property
    def needs_settle(self) -> bool:
        return self.caller is not None and (bool(self.holds) or self.ai is not None)


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


#: what a request-rate limit holds: nothing to give back at settle
_NO_HOLD = Hold("b", "", "", 0)


class _RequestIds:
    """Unique request ids without a syscall per request: a random per-process prefix and a
    counter. Re-seeded after fork, so workers of a pre-fork server never share ids."""

    def __init__(self) -> None:
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        self.prefix = os.urandom(6).hex()
        self.counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter):x}"


new_request_id = _RequestIds()


def _ceil_s(us: int) -> int:
    return max(0, -(-int(us) // 1_000_000))


class Engine:
    """Decides requests for one :class:`QuotaConfig`. Shared by the ASGI and WSGI adapters."""

    def __init__(
        self,
        config: QuotaConfig,
        *,
        identifier: Identifier | None = None,
        clock: Callable[[], int] | None = None,
        metrics: Any = None,
    ) -> None:
        self.config = config
        #: a :class:`~quota_middleware.metrics.PrometheusMetrics` (or anything with its hooks)
        self.metrics = metrics
        self.identifier = identifier or Identifier(config.identity, prefix=config.storage.prefix)
        #: microseconds override for deterministic tests; None means Redis server time
        self.clock = clock
        self.stats = Stats()
        self._prefix = config.storage.prefix
        self._prices, self._default_price = price_table(config)
        self._retention_ms = config.usage_retention_days * 86_400_000
        self._app_tag = app_tag(self._prefix)
        self._routes_seen: dict[tuple[str, str], tuple[bool, AIRoute | None, int]] = {}
        self._limits_seen: dict[tuple[str, str], tuple[Limit, ...]] = {}
        self._plain_seen: dict[
            tuple[int, int], tuple[Sequence[Limit], tuple[bytes, ...], tuple[str, ...]]
        ] = {}
        # app budget name -> (period key, spent micros, limit micros, fetched at monotonic s)
        self._app_seen: dict[str, tuple[str, int, int, float]] = {}

    def ai_route(self, info: RequestInfo) -> AIRoute | None:
        """The AI route this request is on, if any: the adapter then buffers its body first."""
        if not self.config.ai_routes:
            return None
        return self._route_facts(info.method, info.path)[1]

    def _now_us(self) -> int:
        return self.clock() if self.clock is not None else time.time_ns() // 1000

    # -- admit ----------------------------------------------------------------------------
    def admit(self, info: RequestInfo) -> Flow:
        """The admission flow. Raises :class:`IdentificationError` for a 401."""
        if self.metrics is None:
            return self._admit(info)  # one generator less per request
        return self._admit_observed(info)

    def _admit_observed(self, info: RequestInfo) -> Flow:
        assert self.metrics is not None
        try:
            decision = yield from self._admit(info)
        except IdentificationError:
            self.metrics.decisions.labels("denied", "unauthenticated", "").inc()
            raise
        if decision.limited or decision.degraded or not decision.allowed:
            self.metrics.decision(decision)
        return decision

    def _route_facts(self, method: str, path: str) -> tuple[bool, AIRoute | None, int]:
        """(limited?, AI route, weight) of a path: pure functions of the configuration,
        memoised, since glob matching every request is a visible share of the hot path."""
        key = (method, path)
        facts = self._routes_seen.get(key)
        if facts is None:
            routes = self.config.routes
            limited = routes.is_limited(path)
            route = self.config.ai_route(method, path) if limited else None
            facts = (limited, route, routes.weight(method, path))
            if len(self._routes_seen) >= 4096:  # paths are client-chosen: stay bounded
                self._routes_seen.clear()
            self._routes_seen[key] = facts
        return facts

    def _plain_limits(self, plan: Plan, path: str) -> tuple[Limit, ...]:
        """The request and concurrency limits of ``plan`` that apply to ``path`` (memoised)."""
        key = (plan.name, path)
        limits = self._limits_seen.get(key)
        if limits is None:
            limits = tuple(
                lim for lim in plan.limits
                if isinstance(lim, RequestRate | Concurrency) and lim.applies(path, None)
            )  # fmt: skip
            if len(self._limits_seen) >= 4096:
                self._limits_seen.clear()
            self._limits_seen[key] = limits
        return limits

    def _admit(self, info: RequestInfo) -> Flow:
        rid = new_request_id()
        limited, route, weight = self._route_facts(info.method, info.path)
        if not limited:
            self.stats.incr("exempt")
            return Decision(allowed=True, request_id=rid)
        try:
            caller = yield from self.identifier.identify(info)
        except StorageError as e:
            return self._degraded(rid, None, self.config.plan(None), None, e)
        except IdentificationError:
            self.stats.incr("unauthenticated")
            raise
        plan = self.config.plan(caller.plan)
        ai: AIRequest | None = None
        limits: Sequence[Limit]
        if route is not None:
            try:
                ai = self._prepare(route, info, plan)
            except ModelNotAllowed as e:
                return self._refuse(rid, caller, plan, "model", f"model {e.model!r}")
            except UnpricedModel as e:
                return self._refuse(rid, caller, plan, "unpriced", f"model {e.model!r}")
            limits = [lim for lim in plan.limits if lim.applies(info.path, ai.model)]
            stopped = yield from self._app_gate()
            if stopped is not None:
                budget, end_us = stopped
                return self._refuse(rid, caller, plan, "budget", budget.name or "app",
                                    retry_us=end_us - self._now_us())  # fmt: skip
        else:
            limits = self._plain_limits(plan, info.path)
        now_us = self._now_us() if ai is not None else None
        day = day_id(now_us, plan.zone) if now_us is not None else None
        if not limits:
            self.stats.incr("allowed")
            return Decision(
                allowed=True, request_id=rid, caller=caller, plan=plan.name, ai=ai, day=day
            )
        call, holds = self.plan_admit(caller, plan, limits, weight, rid, ai, now_us)
        try:
            reply = yield call
        except StorageError as e:
            return self._degraded(rid, caller, plan, ai, e, day)
        return self.decide(caller, plan, limits, rid, reply, holds, ai, day)

    def _prepare(self, route: AIRoute, info: RequestInfo, plan: Plan) -> AIRequest:
        budgeted = any(isinstance(lim, Budget) for lim in plan.limits)
        return prepare(
            route, info.path, info.body or b"", plan, self.config, self._prices,
            self._default_price, budgeted=budgeted,
        )  # fmt: skip

    def plan_admit(
        self,
        caller: Caller,
        plan: Plan,
        limits: Sequence[Limit],
        weight: int,
        rid: str,
        ai: AIRequest | None = None,
        now_us: int | None = None,
    ) -> tuple[ScriptCall, tuple[Hold, ...]]:
        """The admit call, and for each limit what it would hold if admitted (charged amounts
        come from the reply)."""
        keys = CallerKeys(self._prefix, caller.tenant, caller.id)
        if ai is None:
            return self._plan_plain(keys, limits, weight, rid)
        key_list: list[str] = [keys.buckets]
        index: dict[str, int] = {}
        lease_us = int(ai.route.lease * 1_000_000)
        args: list[ScriptArg] = [self._now_arg(), rid, lease_us, len(limits)]
        holds: list[Hold] = []
        now = now_us if now_us is not None else self._now_us()
        for lim in limits:
            if isinstance(lim, RequestRate | TokenRate):
                assert lim.name is not None
                interval = lim.interval_us
                if isinstance(lim, RequestRate):
                    cost, least = weight, weight
                else:
                    assert ai is not None
                    cost, least = ai.reserve_tokens, ai.min_tokens
                args += ["b", 1, lim.name, interval, interval * lim.capacity, cost, least]
                holds.append(Hold("b", keys.buckets, lim.name, 0, interval))
            elif isinstance(lim, Concurrency):
                assert lim.name is not None
                key_list.append(keys.concurrency(lim.name))
                args += ["c", len(key_list), "", lim.max, int(lim.lease * 1_000_000), 1, 1]
                holds.append(Hold("c", key_list[-1], lim.name, 0))
            else:
                assert lim.name is not None and ai is not None
                pid, end_us = period_of(lim.period, now, plan.zone)
                pkey = keys.period(pid)
                if pkey not in index:
                    key_list += [pkey, keys.ledger(pkey)]
                    index[pkey] = len(key_list) - 1
                if isinstance(lim, Budget):
                    cost, least, unit = ai.reserve_cost, ai.min_cost, 1
                else:
                    cost, least, unit = ai.reserve_tokens, ai.min_tokens, 0
                args += ["q", index[pkey], lim.name, lim.amount, end_us, cost, least]
                holds.append(Hold("q", pkey, lim.name, 0, unit, keys.ledger(pkey),
                                  lim.amount, tuple(lim.thresholds), pid[1:], end_us))  # fmt: skip
        return ScriptCall("admit", tuple(key_list), tuple(args)), tuple(holds)

    def _plan_plain(
        self, keys: CallerKeys, limits: Sequence[Limit], weight: int, rid: str
    ) -> tuple[ScriptCall, tuple[Hold, ...]]:
        """``plan_admit`` for request and concurrency limits: everything but the time, the
        request id and the caller's key names is fixed by the configuration, so it is built
        once per limit set and weight (as bytes, which the Redis client sends as they are)."""
        shape = (id(limits), weight)
        cached = self._plain_seen.get(shape)
        if cached is None or cached[0] is not limits:
            tail: list[ScriptArg] = []
            slots: list[str] = []
            for lim in limits:
                assert lim.name is not None
                if isinstance(lim, RequestRate):
                    interval = lim.interval_us
                    tail += ["b", 1, lim.name, interval, interval * lim.capacity, weight, weight]
                elif isinstance(lim, Concurrency):
                    slots.append(lim.name)
                    tail += ["c", len(slots) + 1, "", lim.max, int(lim.lease * 1_000_000), 1, 1]
            encoded = tuple(str(a).encode() if not isinstance(a, bytes) else a for a in tail)
            cached = (limits, (b"0", str(len(limits)).encode(), *encoded), tuple(slots))
            if len(self._plain_seen) >= 1024:
                self._plain_seen.clear()
            self._plain_seen[shape] = cached
        _, tail_bytes, slot_names = cached
        key_list = (keys.buckets, *(keys.concurrency(name) for name in slot_names))
        if slot_names:
            # aligned with ``limits``, as ``decide`` reads them by position
            slot_keys = iter(key_list[1:])
            holds = tuple(
                Hold("c", next(slot_keys), lim.name or "", 0) if isinstance(lim, Concurrency)
                else _NO_HOLD
                for lim in limits
            )  # fmt: skip
        else:
            holds = ()
        return ScriptCall("admit", key_list, (self._now_arg(), rid, *tail_bytes)), holds

    def decide(
        self,
        caller: Caller,
        plan: Plan,
        limits: Sequence[Limit],
        rid: str,
        reply: Sequence[Any],
        holds: Sequence[Hold] = (),
        ai: AIRequest | None = None,
        day: str | None = None,
    ) -> Decision:
        allowed, denied_idx, retry_us = int(reply[0]), int(reply[1]), int(reply[2])
        now_us = int(reply[3])
        statuses = []
        held: list[Hold] = []
        for i, lim in enumerate(limits):
            remaining, reset_us, charged = (int(v) for v in reply[4 + 3 * i : 7 + 3 * i])
            denied = denied_idx == i + 1
            assert lim.name is not None
            if isinstance(lim, RequestRate | TokenRate):
                quota, window = lim.capacity, _ceil_s(lim.interval_us * lim.capacity)
                reset = _ceil_s(retry_us if denied and retry_us > 0 else reset_us)
            elif isinstance(lim, Concurrency):
                quota, window, reset = lim.max, 0, 1 if denied else 0
            else:
                quota, reset = lim.amount, _ceil_s(reset_us)
                window = 86400 if lim.period == "day" else 86400 * 30
            statuses.append(
                LimitStatus(lim.name, _KINDS[type(lim)], quota, window, max(0, remaining), reset,
                            denied)
            )  # fmt: skip
            if holds and charged > 0 and not isinstance(lim, RequestRate):
                h = holds[i]
                held.append(Hold(h.kind, h.key, h.name, charged, h.param, h.ledger, h.amount,
                                 h.thresholds, h.period, h.until_us))  # fmt: skip
            elif holds and isinstance(lim, TokenQuota | Budget):
                held.append(holds[i])  # nothing reserved (tokens-only), still charged at settle
        del now_us
        if allowed:
            self.stats.incr("allowed")
            return Decision(
                allowed=True, request_id=rid, caller=caller, plan=plan.name, limited=True,
                statuses=tuple(statuses), ai=ai, holds=tuple(held), day=day,
            )  # fmt: skip
        denier = limits[denied_idx - 1]
        reason: Reason
        if retry_us < 0:
            reason = "too_large"
        elif isinstance(denier, Concurrency):
            reason = "concurrency"
        elif isinstance(denier, TokenQuota):
            reason = "quota"
        elif isinstance(denier, Budget):
            reason = "budget"
        else:
            reason = "rate"
        retry_after = max(1, _ceil_s(retry_us)) if retry_us >= 0 else None
        self.stats.incr("shadow_denied" if plan.shadow else "denied")
        self.stats.incr(f"denied_{reason}")
        if plan.shadow:
            log.info(
                "quota_middleware: shadow plan %s would deny caller %s (%s)",
                plan.name, caller.id, denier.name,
            )  # fmt: skip
        return Decision(
            allowed=plan.shadow, request_id=rid, caller=caller, plan=plan.name, limited=True,
            denied_by=denier.name, reason=reason, retry_after=retry_after, shadow=plan.shadow,
            statuses=tuple(statuses), ai=ai if plan.shadow else None, day=day,
        )  # fmt: skip

    def _refuse(
        self, rid: str, caller: Caller, plan: Plan, reason: Reason, what: str,
        retry_us: int | None = None,
    ) -> Decision:  # fmt: skip
        self.stats.incr(f"denied_{reason}")
        if plan.shadow:
            log.info("quota_middleware: shadow plan %s would refuse %s", plan.name, what)
        retry_after = None if retry_us is None else max(1, _ceil_s(retry_us))
        return Decision(
            allowed=plan.shadow, request_id=rid, caller=caller, plan=plan.name,
            denied_by=what, reason=reason, shadow=plan.shadow, retry_after=retry_after,
        )  # fmt: skip

    # -- the app-wide budgets (their own key, so not in the caller's admit call) ------------
    def app_period_key(self, budget: AppBudget, now_us: int | None = None) -> tuple[str, int]:
        from zoneinfo import ZoneInfo

        pid, end_us = period_of(budget.period, now_us or self._now_us(), ZoneInfo(budget.timezone))
        return f"{self._app_tag}:q:{pid}", end_us

    def _app_gate(self) -> Generator[ScriptCall, Any, tuple[AppBudget, int] | None]:
        """The hard-stopped app budget that is spent, if any, from a copy of the app counters
        at most ``check_interval`` old (one read per interval per process, not per request)."""
        stops = [b for b in self.config.app_budgets if b.hard_stop]
        if not stops:
            return None
        now = time.monotonic()
        stale = []
        for b in stops:
            assert b.name is not None
            key, _ = self.app_period_key(b)
            seen = self._app_seen.get(b.name)
            if seen is None or seen[0] != key or now - seen[3] > b.check_interval:
                stale.append((b, key))
        if stale:
            keys = tuple(sorted({key for _, key in stale}))
            try:
                reply = yield ScriptCall("read", keys, ())
            except StorageError:
                return None  # the caller's own admit decides how an outage is handled
            values = dict(zip(keys, reply, strict=False))
            for b, key in stale:
                assert b.name is not None
                fields = hash_pairs(values.get(key, []))
                limit = fields.get(f"{b.name}:limit", b.micros)
                self._app_seen[b.name] = (key, fields.get(b.name, 0), limit, now)
        for b in stops:
            assert b.name is not None
            key, spent, limit, _ = self._app_seen[b.name]
            if spent >= limit:
                return b, self.app_period_key(b)[1]
        return None

    def _degraded(
        self,
        rid: str,
        caller: Caller | None,
        plan: Plan,
        ai: AIRequest | None,
        error: StorageError,
        day: str | None = None,
    ) -> Decision:
        fail_open = plan.on_error == "open"
        self.stats.incr("degraded_open" if fail_open else "degraded_closed")
        log.warning(
            "quota_middleware: store unavailable (%s); plan %s fails %s for caller %s",
            error, plan.name, plan.on_error, caller.id if caller else "-",
        )  # fmt: skip
        return Decision(
            allowed=fail_open,
            request_id=rid,
            caller=caller,
            plan=plan.name,
            degraded=True,
            reason=None if fail_open else "unavailable",
            retry_after=None if fail_open else max(1, int(self.config.storage.breaker_reset)),
            # a fail-open AI request is still metered: if the store is back by the time it
            # ends, the full usage is charged
            ai=ai if fail_open else None,
            day=day,
        )

    # -- settle ---------------------------------------------------------------------------
    def plan_settle(
        self, decision: Decision, usage: Usage | None = None, cost: int = 0
    ) -> ScriptCall | None:
        """The call that gives back what an admitted request held and charges its usage;
        None when there is nothing to do."""
        if not decision.needs_settle:
            return None
        caller = decision.caller
        assert caller is not None
        keys = CallerKeys(self._prefix, caller.tenant, caller.id)
        key_list = [keys.settled(decision.request_id)]
        index: dict[str, int] = {}

        def key(name: str, ledger: str | None = None) -> int:
            if name not in index:
                key_list.append(name)
                index[name] = len(key_list)
                if ledger is not None:
                    key_list.append(ledger)
            return index[name]

        ops: list[ScriptArg] = []
        tokens = usage.input_tokens + usage.output_tokens if usage is not None else 0
        for h in decision.holds:
            if h.kind == "c":
                ops += ["c", key(h.key), "", 0, 0]
            elif h.kind == "b":
                ops += ["b", key(h.key), h.name, h.param, tokens - h.charged]
            else:
                actual = cost if h.param == 1 else tokens
                ops += ["q", key(h.key, h.ledger), h.name, h.charged, actual]
        now_us = self._now_us()
        kept: set[str] = set()
        for h in decision.holds:
            if h.kind == "q" and h.key not in kept:
                kept.add(h.key)
                ops += ["e", key(h.key), "", _period_ttl_ms(h.until_us, now_us), 0]
        for h in decision.holds:
            if h.kind == "q" and h.thresholds and (cost if h.param == 1 else tokens):
                pcts = ",".join(str(t) for t in h.thresholds)
                ops += ["t", key(h.key), h.name, h.amount, pcts]
        spikes = self.config.spikes
        if spikes is not None and tokens > 0:
            params = f"{int(spikes.multiple * 1000)},{spikes.floor_tokens},{spikes.window_hours}"
            ops += ["h", key(keys.hourly), "", tokens, params]
        if usage is not None and decision.day is not None:
            ukey = key(keys.usage(decision.day))
            model = (clean_model(usage.model) or "unknown").replace("|", "_")[:100]
            for field, value in (
                ("requests", 1),
                ("input", usage.input_tokens),
                ("cached", usage.cached_tokens),
                ("cache_write", usage.cache_write_tokens),
                ("output", usage.output_tokens),
                ("reasoning", usage.reasoning_tokens),
                ("cost", cost),
                ("estimated", int(usage.estimated)),
            ):
                if value:
                    ops += ["u", ukey, f"{model}|{field}", self._retention_ms, value]
        if not ops:
            return None
        args: list[ScriptArg] = [
            self._now_arg(), decision.request_id, SETTLE_MARKER_MS, len(ops) // 5
        ]  # fmt: skip
        return ScriptCall("settle", tuple(key_list), tuple(args + ops))

    def plan_app_settle(self, decision: Decision, cost: int) -> ScriptCall | None:
        """The second settle call: the request's cost on every app budget (their own keys,
        another cluster slot) and their thresholds. No reservation there: it is a kill switch
        on actual spend."""
        if not self.config.app_budgets or cost <= 0:
            return None
        key_list = [f"{self._app_tag}:s:{decision.request_id}"]
        ops: list[ScriptArg] = []
        index: dict[str, int] = {}
        budgets = self._app_budget_ops()
        ends: dict[str, int] = {}
        for b in budgets:
            key, end_us = self.app_period_key(b)
            if key not in index:
                key_list += [key, key + ":r"]
                index[key] = len(key_list) - 1
                ends[key] = end_us
            ops += ["q", index[key], b.name or "", 0, cost]
        now_us = self._now_us()
        for key, end_us in ends.items():
            ops += ["e", index[key], "", _period_ttl_ms(end_us, now_us), 0]
        for b in budgets:
            if b.thresholds:
                key, _ = self.app_period_key(b)
                ops += ["t", index[key], b.name or "", b.micros, ",".join(map(str, b.thresholds))]
        args: list[ScriptArg] = [self._now_arg(), decision.request_id, SETTLE_MARKER_MS,
                                 len(ops) // 5]  # fmt: skip
        return ScriptCall("settle", tuple(key_list), tuple(args + ops))

    def _app_budget_ops(self) -> tuple[AppBudget, ...]:
        """The app budgets, in the order their "q" operations open the app settle call."""
        return tuple(self.config.app_budgets)

    def settle(
        self, decision: Decision, usage: Usage | None = None, cost: int = 0
    ) -> Generator[ScriptCall, Any, list[AlertEvent]]:
        """The settle flow: the caller's settle, the app budgets', then any alert events to the
        outbox. Each step runs even if an earlier one failed: the app's spend is charged when
        the caller's keys are unreachable, and events already decided (their markers are set,
        they will not fire again) still reach the outbox, or at least the log."""
        events: list[AlertEvent] = []
        if self.metrics is not None and usage is not None:
            self.metrics.usage(usage, cost)
        call = self.plan_settle(decision, usage, cost)
        if call is not None:
            try:
                reply = yield call
            except StorageError as e:
                self._settle_failed("caller", e)
            else:
                events += self._events(decision, parse_settle_events(reply), app=False)
        app_call = self.plan_app_settle(decision, cost) if decision.ai is not None else None
        if app_call is not None:
            try:
                reply = yield app_call
            except StorageError as e:
                self._settle_failed("app budget", e)
            else:
                # each budget's period is the one it was charged in, read off the call's keys
                periods = {
                    b.name or "": app_call.keys[int(app_call.args[5 + 5 * i])
                                                - 1].rsplit(":q:", 1)[-1][1:]
                    for i, b in enumerate(self._app_budget_ops())
                }  # fmt: skip
                events += self._events(
                    decision, parse_settle_events(reply), app=True, periods=periods
                )
        if events:
            for event in events:
                self.stats.incr(f"alerts_{event.type}")
                if self.metrics is not None:
                    self.metrics.alert(event, "fired")
            try:
                yield outbox_call(self._prefix, events)
            except StorageError as e:
                self._settle_failed("outbox", e)
                for event in events:
                    # the last place these events exist: never drop them silently
                    log.warning("quota_middleware: alert not queued: %s", event.to_json())
        return events

    def _settle_failed(self, what: str, error: StorageError) -> None:
        self.stats.incr("settle_failed")
        log.warning(
            "quota_middleware: %s settle failed (%s); slots and reservations free themselves "
            "when their leases end", what, error,
        )  # fmt: skip

    def _events(
        self,
        decision: Decision,
        raw: Sequence[tuple[str, str, int, int]],
        *,
        app: bool,
        periods: dict[str, str] | None = None,
    ) -> list[AlertEvent]:
        caller = decision.caller
        out = []
        at = self._now_us() / 1_000_000
        budgets = {b.name: b for b in self.config.app_budgets}
        holds = {h.name: h for h in decision.holds if h.kind == "q"}
        for kind, name, level, used in raw:
            if kind == "h":
                assert caller is not None
                out.append(AlertEvent(
                    id=f"spike:{caller.tenant}:{caller.id}:{level}", type="spike",
                    caller=caller.id, tenant=caller.tenant, plan=decision.plan, limit="spike",
                    period=str(level), threshold=None, used=used, limit_value=None,
                    unit="tokens", at=at,
                ))  # fmt: skip
            elif app:
                b = budgets.get(name)
                pid = (periods or {}).get(name, "")
                out.append(AlertEvent(
                    id=f"app:{name}:{pid}:{level}", type="app_threshold", caller=None,
                    tenant=None, plan=None, limit=name, period=pid, threshold=level, used=used,
                    limit_value=b.micros if b else None, unit="usd_micros", at=at,
                ))  # fmt: skip
            else:
                assert caller is not None
                h = holds.get(name)
                unit = "usd_micros" if h is not None and h.param == 1 else "tokens"
                period = h.period if h is not None else ""
                out.append(AlertEvent(
                    id=f"threshold:{caller.tenant}:{caller.id}:{name}:{period}:{level}",
                    type="threshold", caller=caller.id, tenant=caller.tenant,
                    plan=decision.plan, limit=name, period=period, threshold=level, used=used,
                    limit_value=h.amount if h is not None else None, unit=unit, at=at,
                ))  # fmt: skip
        return out

    def _now_arg(self) -> str:
        return "" if self.clock is None else str(self.clock())


def _period_ttl_ms(until_us: int, now_us: int) -> int:
    """How long a period's counters are kept: until the period ends, plus an hour."""
    return max(0, until_us - now_us) // 1000 + 3_600_000


# -- drivers -------------------------------------------------------------------------------
T = TypeVar("T")


def drive_sync(flow: Generator[ScriptCall, Any, T], backend: SyncBackend) -> T:
    """Run a flow against a sync backend; store errors are thrown into the flow to handle."""
    try:
        call = next(flow)
        while True:
            try:
                reply = backend.run(call)
            except StorageError as e:
                call = flow.throw(e)
            else:
                call = flow.send(reply)
    except StopIteration as stop:
        result: T = stop.value
        return result


async def drive_async(flow: Generator[ScriptCall, Any, T], backend: AsyncBackend) -> T:
    try:
        call = next(flow)
        while True:
            try:
                reply = await backend.run_async(call)
            except StorageError as e:
                call = flow.throw(e)
            else:
                call = flow.send(reply)
    except StopIteration as stop:
        result: T = stop.value
        return result
