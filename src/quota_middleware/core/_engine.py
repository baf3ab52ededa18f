"""The sans-IO core: from a request to a :class:`Decision`, and from a finished response to the
settle call that charges it.

Nothing here does I/O. A phase that needs the store is a generator that ``yield``\\ s a
:class:`~quota_middleware.scripts.ScriptCall` and is sent the reply (the httpx auth-flow pattern);
``drive_sync`` and ``drive_async`` (in ``flows.py``) are the two drivers the adapters use.
Admission lives here; settling in ``settlement.py``; the values both hand out in
``decision.py``.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any

from quota_middleware.base._flows import drive_async, drive_sync
from quota_middleware.base._keys import CallerKeys, key_slot, slot_tags, tenant_controls
from quota_middleware.base._periods import day_id, period_of
from quota_middleware.base._request import RequestInfo
from quota_middleware.base._scripts import Op, ScriptArg, ScriptCall, hash_pairs
from quota_middleware.config import AIRoute, Plan, QuotaConfig
from quota_middleware.core._context import Context, SharedBudget
from quota_middleware.core._decision import Decision, Hold, LimitStatus, Reason, Stats
from quota_middleware.core._hardstop import top_up
from quota_middleware.core._meter import (
    AIRequest,
    Meter,
    ModelNotAllowed,
    UnpricedModel,
    prepare,
    price_table,
)
from quota_middleware.core._settlement import SETTLE_MARKER_MS, Settlement
from quota_middleware.errors import IdentificationError, StorageError
from quota_middleware.identity._identifier import Caller, Identifier
from quota_middleware.limits import (
    AppBudget,
    Budget,
    Concurrency,
    Limit,
    RequestRate,
    TenantBudget,
    TokenQuota,
    TokenRate,
)

log = logging.getLogger("quota_middleware")

Flow = Generator[ScriptCall, Any, Decision]
#: what a request-rate limit holds: nothing to give back at settle
_NO_HOLD = Hold(Op.BUCKET, "", "", 0)
#: shared-budget copies kept per process (one per tenant and budget) before the copy is reset
_SEEN_MAX = 10_000


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


_TRACE_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


def _trace_id(value: str | None) -> str | None:
    """The client's ``x-request-id`` when it is a plain token (it goes into log lines and a
    response header: no spaces, control characters or megabytes)."""
    if value is not None and _TRACE_ID.fullmatch(value):
        return value
    return None


def _ceil_s(us: int) -> int:
    return max(0, -(-int(us) // 1_000_000))


class Engine:
    """Decides and settles requests for one :class:`QuotaConfig`; what both adapters drive
    (through :class:`~quota_middleware.exchange.Exchange`). Two peers over one
    :class:`~quota_middleware.context.Context`: :class:`Admission` (this module) and
    :class:`~quota_middleware.settlement.Settlement`."""

    def __init__(
        self,
        config: QuotaConfig,
        *,
        identifier: Identifier | None = None,
        clock: Callable[[], int] | None = None,
        metrics: Any = None,
    ) -> None:
        self.ctx = ctx = Context(config, clock=clock, metrics=metrics)
        self.admission = Admission(ctx, identifier)
        self.settlement = Settlement(ctx)
        # the surface the adapters, the exchange, the reports and the tests use
        self.config = ctx.config
        self.stats = ctx.stats
        self.margins = ctx.margins
        self.settle_buffer = ctx.settle_buffer
        self.app_period_key = ctx.app_period_key
        adm, stl = self.admission, self.settlement
        self.identifier = adm.identifier
        self.ai_route, self.admit, self.plan_admit, self.decide = (
            adm.ai_route, adm.admit, adm.plan_admit, adm.decide)  # fmt: skip
        self.hard_stop, self.top_up = adm.hard_stop, adm.top_up
        self.finish, self.settle, self.drain = stl.finish, stl.settle, stl.drain
        self.plan_settle, self.plan_app_settle = stl.plan_settle, stl.plan_app_settle

    @property
    def metrics(self) -> Any:
        return self.ctx.metrics

    @property
    def clock(self) -> Callable[[], int] | None:
        return self.ctx.clock


class Admission:
    """From a request to a :class:`Decision`: identification, the estimate and the admit call
    (the hot path), the app budgets' kill switch, the hard stop's top-ups."""

    def __init__(self, ctx: Context, identifier: Identifier | None = None) -> None:
        self.ctx = ctx
        config = ctx.config
        self.identifier = identifier or Identifier(config.identity, prefix=ctx.prefix)
        self._prices, self._default_price = price_table(config)
        self._routes_seen: dict[tuple[str, str], tuple[bool, AIRoute | None, int]] = {}
        self._limits_seen: dict[tuple[str, str], tuple[Limit, ...]] = {}
        self._plain_seen: dict[
            tuple[int, int], tuple[Sequence[Limit], tuple[bytes, ...], tuple[str, ...]]
        ] = {}
        # (tenant or None for the app's, budget name) -> (period key, spent, limit, fetched at
        # monotonic s)
        self._app_seen: dict[tuple[str | None, str], tuple[str, int, int, float]] = {}
        # A tenant's block has one copy per cluster slot (base/_keys.py); the one a caller's
        # admit reads is a pure function of its keys, so memoised. The slot table is built now,
        # once per process, not on a first request.
        self._tenant_keys: dict[str, str] = {}
        # tenant budgets reserved in the admit call, as limits (hash_tag = "tenant")
        self._tenant_limits: dict[int, Limit] = {}
        slot_tags()

    def ai_route(self, info: RequestInfo) -> AIRoute | None:
        """The AI route this request is on, if any: the adapter then buffers its body first."""
        if not self.ctx.config.ai_routes:
            return None
        return self._route_facts(info.method, info.path)[1]

    # -- admit ----------------------------------------------------------------------------
    def admit(self, info: RequestInfo) -> Flow:
        """The admission flow. Raises :class:`IdentificationError` for a 401."""
        if self.ctx.metrics is None:
            return self._admit(info)  # one generator less per request
        return self._admit_observed(info)

    def _admit_observed(self, info: RequestInfo) -> Flow:
        assert self.ctx.metrics is not None
        try:
            decision = yield from self._admit(info)
        except IdentificationError:
            self.ctx.metrics.decisions.labels("denied", "unauthenticated", "").inc()
            raise
        if decision.limited or decision.degraded or not decision.allowed:
            self.ctx.metrics.decision(decision)
        return decision

    def _route_facts(self, method: str, path: str) -> tuple[bool, AIRoute | None, int]:
        """(limited?, AI route, weight) of a path: pure functions of the configuration,
        memoised, since glob matching every request is a visible share of the hot path."""
        key = (method, path)
        facts = self._routes_seen.get(key)
        if facts is None:
            routes = self.ctx.config.routes
            limited = routes.is_limited(path)
            route = self.ctx.config.ai_route(method, path) if limited else None
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
            self.ctx.stats.incr("exempt")
            return Decision(allowed=True, request_id=rid)
        try:
            caller = yield from self.identifier.identify(info)
        except StorageError as e:
            return self._degraded(rid, None, self.ctx.config.plan(None), None, e)
        except IdentificationError:
            self.ctx.stats.incr("unauthenticated")
            raise
        plan = self.ctx.config.plan(caller.plan)
        ai: AIRequest | None = None
        limits: Sequence[Limit]
        tagged: list[SharedBudget] = []
        trace = path = None
        if route is not None:
            trace, path = _trace_id(info.headers.get("x-request-id")), info.path
            try:
                ai = self._prepare(route, info, plan)
            except ModelNotAllowed as e:
                return self._refuse(rid, caller, plan, "model", f"model {e.model!r}")
            except UnpricedModel as e:
                return self._refuse(rid, caller, plan, "unpriced", f"model {e.model!r}")
            limits = [lim for lim in plan.limits if lim.applies(info.path, ai.model)]
            if self.ctx.by_tenant and caller is not None:
                tagged = [b for b in self.ctx.shared_budgets(caller.tenant) if b.in_admit]
            margins = self.ctx.margins
            est = ai.estimate
            if not margins.known(est.format, est.model) and (load := margins.sync_call()):
                # a model this worker has no margin for yet: what the other workers learned,
                # before reserving (at most once per sync interval, so a model nobody learns
                # costs one read per interval, not one per request)
                try:
                    margins.apply((yield load))
                except StorageError:
                    pass
                else:
                    if margins.known(est.format, est.model):
                        ai = self._prepare(route, info, plan)  # now with the margin
            stopped = yield from self._app_gate(caller.tenant if caller is not None else None)
            if stopped is not None:
                budget, end_us = stopped
                return self._refuse(rid, caller, plan, "budget", budget.name,
                                    retry_us=end_us - self.ctx.now_us())  # fmt: skip
        else:
            limits = self._plain_limits(plan, info.path)
        now_us = self.ctx.now_us() if ai is not None else None
        day = day_id(now_us, plan.zone) if now_us is not None else None
        if not limits:
            # No store call at all, so no block read either (controls.py): a plan without limits
            # stays free of round trips; give it a wide limit to make its callers blockable.
            self.ctx.stats.incr("allowed")
            return Decision(
                allowed=True, request_id=rid, caller=caller, plan=plan.name, ai=ai, day=day,
                trace_id=trace, path=path,
            )  # fmt: skip
        call, holds = self.plan_admit(caller, plan, limits, weight, rid, ai, now_us, tagged)
        if tagged:
            limits = [*limits, *(self._tenant_limit(b.budget) for b in tagged)]
        try:
            reply = yield call
        except StorageError as e:
            decision = self._degraded(rid, caller, plan, ai, e, day)
            if decision.allowed and ai is not None:
                # Fail-open: nothing was reserved, but the usage is still owed to every token
                # limit. Settle charges a hold of 0 in full (no live reservation), once the
                # store answers (the settle buffer keeps it until then).
                decision.holds = tuple(
                    h for lim, h in zip(limits, holds, strict=True)
                    if isinstance(lim, TokenRate | TokenQuota | Budget)
                )  # fmt: skip
        else:
            decision = self.decide(caller, plan, limits, rid, reply, holds, ai, day)
        if trace is not None or path is not None:
            decision.trace_id, decision.path = trace, path
        return decision

    def _prepare(self, route: AIRoute, info: RequestInfo, plan: Plan) -> AIRequest:
        budgeted = any(isinstance(lim, Budget) for lim in plan.limits)
        return prepare(
            route, info.path, info.body or b"", plan, self.ctx.config, self._prices,
            self._default_price, budgeted=budgeted, margins=self.ctx.margins,
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
        tagged: Sequence[SharedBudget] = (),
    ) -> tuple[ScriptCall, tuple[Hold, ...]]:
        """The admit call, and for each limit (then each of ``tagged``, the tenant budgets in
        the caller's slot) what it would hold if admitted (charged amounts come from the
        reply)."""
        keys = self.ctx.caller_keys(caller.tenant, caller.id)
        tenant_key = self._tenant_key(keys, caller.tenant)
        if ai is None:
            return self._plan_plain(keys, tenant_key, limits, weight, rid)
        key_list: list[str] = [keys.buckets]
        index: dict[str, int] = {}
        lease_us = int(ai.route.lease * 1_000_000)
        args: list[ScriptArg] = [self.ctx.now_arg(), rid, lease_us, len(limits) + len(tagged)]
        holds: list[Hold] = []
        now = now_us if now_us is not None else self.ctx.now_us()
        for lim in limits:
            if isinstance(lim, RequestRate | TokenRate):
                assert lim.name is not None
                interval = lim.interval_us
                if isinstance(lim, RequestRate):
                    cost, least = weight, weight
                else:
                    assert ai is not None
                    cost, least = ai.reserve_tokens, ai.min_tokens
                args += [Op.BUCKET, 1, lim.name, interval, interval * lim.capacity, cost, least]
                holds.append(Hold(Op.BUCKET, keys.buckets, lim.name, 0, interval))
            elif isinstance(lim, Concurrency):
                assert lim.name is not None
                key_list.append(keys.concurrency(lim.name))
                args += [Op.SLOT, len(key_list), lim.name, lim.max, int(lim.lease * 1_000_000),
                         1, 1]  # fmt: skip
                holds.append(Hold(Op.SLOT, key_list[-1], lim.name, 0))
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
                args += [Op.QUOTA, index[pkey], lim.name, lim.amount, end_us, cost, least]
                holds.append(Hold(Op.QUOTA, pkey, lim.name, 0, unit, keys.ledger(pkey),
                                  lim.amount, tuple(lim.thresholds), pid[1:], end_us))  # fmt: skip
        for b in tagged:
            tb = b.budget
            assert isinstance(tb, TenantBudget)
            if b.key not in index:
                key_list += [b.key, keys.ledger(b.key)]
                index[b.key] = len(key_list) - 1
            if tb.is_budget:
                cost, least, unit = ai.reserve_cost, ai.min_cost, 1
            else:
                cost, least, unit = ai.reserve_tokens, ai.min_tokens, 0
            args += [Op.TENANT_QUOTA, index[b.key], b.name, tb.amount, b.end_us, cost, least]
            holds.append(Hold(Op.QUOTA, b.key, b.name, 0, unit, keys.ledger(b.key), tb.amount,
                              tuple(tb.thresholds), b.period_id[1:], b.end_us))  # fmt: skip
        # the runtime controls (controls.py), read in this same call
        key_list += [keys.controls, tenant_key]
        args += ["a", len(key_list) - 1, len(key_list)]
        return ScriptCall("admit", tuple(key_list), tuple(args)), tuple(holds)

    def _tenant_limit(self, budget: AppBudget | TenantBudget) -> Limit:
        """A tenant budget reserved in the admit call as the calendar limit ``decide`` reads:
        its reply slot, status, refusal reason and hold are a caller quota's."""
        limit = self._tenant_limits.get(id(budget))
        if limit is None:
            assert isinstance(budget, TenantBudget)
            common: dict[str, Any] = {
                "period": budget.period, "name": budget.name, "thresholds": budget.thresholds,
            }  # fmt: skip
            limit = (
                Budget(usd=budget.usd, **common) if budget.usd is not None
                else TokenQuota(tokens=budget.amount, **common)
            )  # fmt: skip
            self._tenant_limits[id(budget)] = limit
        return limit

    def _tenant_key(self, keys: CallerKeys, tenant: str) -> str:
        """The copy of the tenant's controls this caller's admit reads: the one in the
        caller's own cluster slot (a script touches one slot)."""
        key = self._tenant_keys.get(keys.base)
        if key is None:
            key = tenant_controls(self.ctx.prefix, tenant, key_slot(keys.base))
            if len(self._tenant_keys) >= 4096:
                self._tenant_keys.clear()
            self._tenant_keys[keys.base] = key
        return key

    def _plan_plain(
        self,
        keys: CallerKeys,
        tenant_key: str,
        limits: Sequence[Limit],
        weight: int,
        rid: str,
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
                    tail += [
                        Op.BUCKET,
                        1,
                        lim.name,
                        interval,
                        interval * lim.capacity,
                        weight,
                        weight,
                    ]
                elif isinstance(lim, Concurrency):
                    slots.append(lim.name)
                    tail += [Op.SLOT, len(slots) + 1, lim.name, lim.max,
                             int(lim.lease * 1_000_000), 1, 1]  # fmt: skip
            # the runtime controls: the two keys after the slots' (controls.py)
            tail += ["", len(slots) + 2, len(slots) + 3]
            encoded = tuple(str(a).encode() if not isinstance(a, bytes) else a for a in tail)
            cached = (limits, (b"0", str(len(limits)).encode(), *encoded), tuple(slots))
            if len(self._plain_seen) >= 1024:
                self._plain_seen.clear()
            self._plain_seen[shape] = cached
        _, tail_bytes, slot_names = cached
        key_list = (
            keys.buckets, *(keys.concurrency(name) for name in slot_names), keys.controls,
            tenant_key,
        )  # fmt: skip
        if slot_names:
            # aligned with ``limits``, as ``decide`` reads them by position
            slot_keys = iter(key_list[1:-2])
            holds = tuple(
                Hold(Op.SLOT, next(slot_keys), lim.name or "", 0) if isinstance(lim, Concurrency)
                else _NO_HOLD
                for lim in limits
            )  # fmt: skip
        else:
            holds = ()
        return ScriptCall("admit", key_list, (self.ctx.now_arg(), rid, *tail_bytes)), holds

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
        if denied_idx < 0:
            return self._blocked(rid, caller, plan, reply)
        now_us = int(reply[3])
        statuses = []
        held: list[Hold] = []
        n = len(limits)
        # the operator's overrides the script applied: limit index -> (p1, p2)
        over: dict[int, tuple[int, int]] = {}
        for j in range(4 + 3 * n, len(reply) - 2, 3):
            over[int(reply[j]) - 1] = (int(reply[j + 1]), int(reply[j + 2]))
        for i, lim in enumerate(limits):
            remaining, reset_us, charged = (int(v) for v in reply[4 + 3 * i : 7 + 3 * i])
            denied = denied_idx == i + 1
            assert lim.name is not None
            o = over.get(i) if over else None
            if isinstance(lim, RequestRate | TokenRate):
                interval, tau = o or (lim.interval_us, lim.interval_us * lim.capacity)
                quota, window = tau // interval, _ceil_s(tau)
                reset = _ceil_s(retry_us if denied and retry_us > 0 else reset_us)
            elif isinstance(lim, Concurrency):
                quota, window, reset = o[0] if o else lim.max, 0, 1 if denied else 0
            else:
                quota, reset = o[0] if o else lim.amount, _ceil_s(reset_us)
                window = 86400 if lim.period == "day" else 86400 * 30
            statuses.append(
                LimitStatus(lim.name, lim.kind, quota, window, max(0, remaining), reset,
                            denied)
            )  # fmt: skip
            if holds and charged > 0 and not isinstance(lim, RequestRate):
                h = holds[i]
                param, amount = h.param, h.amount
                if o is not None:  # settle and the hard stop count against the operator's number
                    param, amount = (o[0], amount) if h.kind == Op.BUCKET else (param, o[0])
                held.append(Hold(h.kind, h.key, h.name, charged, param, h.ledger, amount,
                                 h.thresholds, h.period, h.until_us))  # fmt: skip
            elif holds and isinstance(lim, TokenQuota | Budget):
                h = holds[i]
                if o is not None:
                    h = Hold(h.kind, h.key, h.name, h.charged, h.param, h.ledger, o[0],
                             h.thresholds, h.period, h.until_us)  # fmt: skip
                held.append(h)  # nothing reserved (tokens-only), still charged at settle
        del now_us
        if allowed:
            self.ctx.stats.incr("allowed")
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
        self.ctx.stats.incr("shadow_denied" if plan.shadow else "denied")
        self.ctx.stats.incr(f"denied_{reason}")
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

    def _blocked(self, rid: str, caller: Caller, plan: Plan, reply: Sequence[Any]) -> Decision:
        """An operator's block (controls.py): refused even on a shadow plan, since it is no
        limit of the plan but an order."""
        retry_us = int(reply[2])
        why, who = (v.decode() if isinstance(v, bytes) else str(v) for v in reply[4:6])
        self.ctx.stats.incr("denied")
        self.ctx.stats.incr("denied_blocked")
        return Decision(
            allowed=False, request_id=rid, caller=caller, plan=plan.name, limited=True,
            denied_by=who, reason="blocked", block_reason=why,
            retry_after=max(1, _ceil_s(retry_us)) if retry_us > 0 else None,
        )  # fmt: skip

    def _refuse(
        self, rid: str, caller: Caller, plan: Plan, reason: Reason, what: str,
        retry_us: int | None = None,
    ) -> Decision:  # fmt: skip
        self.ctx.stats.incr(f"denied_{reason}")
        if plan.shadow:
            log.info("quota_middleware: shadow plan %s would refuse %s", plan.name, what)
        retry_after = None if retry_us is None else max(1, _ceil_s(retry_us))
        return Decision(
            allowed=plan.shadow, request_id=rid, caller=caller, plan=plan.name,
            denied_by=what, reason=reason, shadow=plan.shadow, retry_after=retry_after,
        )  # fmt: skip

    # -- the shared budgets: the app's and the tenant's (their own keys, not in the admit call) -
    def _app_gate(
        self, tenant: str | None = None
    ) -> Generator[ScriptCall, Any, tuple[SharedBudget, int] | None]:
        """The hard-stopped shared budget (the app's, or ``tenant``'s) that is spent, if any,
        from a copy of its counters at most ``check_interval`` old (one read per interval per
        process and tenant, not per request)."""
        stops = [
            b for b in self.ctx.shared_budgets(tenant) if b.budget.hard_stop and not b.in_admit
        ]
        if not stops:
            return None
        now = time.monotonic()
        stale = []
        for b in stops:
            seen = self._app_seen.get((b.tenant, b.name))
            if seen is None or seen[0] != b.key or now - seen[3] > b.budget.check_interval:
                stale.append(b)
        if stale:
            keys = tuple(sorted({b.key for b in stale}))
            try:
                reply = yield ScriptCall("read", keys, ())
            except StorageError:
                return None  # the caller's own admit decides how an outage is handled
            values = dict(zip(keys, reply, strict=False))
            if len(self._app_seen) > _SEEN_MAX:
                self._app_seen.clear()  # many tenants: a bounded copy, re-read as they come
            for b in stale:
                fields = hash_pairs(values.get(b.key, []))
                limit = fields.get(f"{b.name}:limit", b.amount)
                self._app_seen[(b.tenant, b.name)] = (b.key, fields.get(b.name, 0), limit, now)
        for b in stops:
            seen = self._app_seen.get((b.tenant, b.name))
            if seen is not None and seen[1] >= seen[2]:
                return b, b.end_us
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
        self.ctx.stats.incr("degraded_open" if fail_open else "degraded_closed")
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
            retry_after=None if fail_open else max(1, int(self.ctx.config.storage.breaker_reset)),
            # a fail-open AI request is still metered: if the store is back by the time it
            # ends, the full usage is charged
            ai=ai if fail_open else None,
            day=day,
        )

    # -- the hard stop (see hardstop.py) ---------------------------------------------------
    def hard_stop(self, decision: Decision) -> bool:
        """Whether this request's stream is ended when its quota or budget runs out."""
        if decision.ai is None or decision.degraded or decision.shadow:
            return False
        return self.ctx.config.plan(decision.plan).hard_stop

    def top_up(self, decision: Decision, meter: Meter) -> Generator[ScriptCall, Any, bool]:
        """Whether the stream may go on; grows its reservation when it outgrew it."""
        fail_open = self.ctx.config.plan(decision.plan).on_error == "open"
        granted = yield from top_up(
            decision, meter, now_arg=self.ctx.now_arg(), fail_open=fail_open
        )
        if not granted:
            self.ctx.stats.incr("hard_stops")
        return granted


__all__ = [
    "SETTLE_MARKER_MS", "Decision", "Engine", "Flow", "Hold", "LimitStatus", "Reason", "Stats",
    "drive_async", "drive_sync", "new_request_id",
]  # fmt: skip
