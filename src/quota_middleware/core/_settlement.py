"""Settling: what an admitted request gives back and is charged once its response is done
(the meter's usage and its cost), the app budgets' share of it, the alert events that come out
of it, and the settles kept while the store is down. A peer of admission over one
:class:`~quota_middleware.context.Context`."""

from __future__ import annotations

import logging
from collections.abc import Generator, Sequence
from typing import TYPE_CHECKING, Any

from quota_middleware.base._events import AlertEvent, outbox_call, parse_settle_events
from quota_middleware.base._keys import (
    period_name,
    rank_member,
    tenant_member,
    tenant_tagged_period,
)
from quota_middleware.base._scripts import Op, ScriptArg, ScriptCall
from quota_middleware.core._context import Context, SharedBudget
from quota_middleware.core._decision import Charge, Decision
from quota_middleware.errors import StorageError
from quota_middleware.metering._usage import Usage, clean_model

if TYPE_CHECKING:
    from quota_middleware.core._meter import Meter

log = logging.getLogger("quota_middleware")
#: one INFO line per settled AI request (``Charge.log_text``; the record's ``quota_charge``
#: attribute holds the same as a dict, for JSON log formatters)
charge_log = logging.getLogger("quota_middleware.charges")
#: buffered settles applied after each successful settle, at most
_DRAIN_BATCH = 16
#: attempts to apply one buffered settle once the store answers again, then it is dropped
_REPLAY_ATTEMPTS = 5

#: how long a settled request's id is remembered, so a retried settle is a no-op
SETTLE_MARKER_MS = 15 * 60 * 1000


class Settlement:
    """The settle half of a request's life, a peer of admission over one :class:`Context`."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def plan_settle(
        self, decision: Decision, usage: Usage | None = None, cost: int = 0
    ) -> ScriptCall | None:
        """The call that gives back what an admitted request held and charges its usage;
        None when there is nothing to do."""
        if not decision.needs_settle:
            return None
        caller = decision.caller
        assert caller is not None
        keys = self.ctx.caller_keys(caller.tenant, caller.id)
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
            if h.kind == Op.SLOT:
                ops += [Op.SLOT, key(h.key), "", 0, 0]
            elif h.kind == Op.BUCKET:
                ops += [Op.BUCKET, key(h.key), h.name, h.param, tokens - h.charged]
            else:
                actual = cost if h.param == 1 else tokens
                ops += [Op.QUOTA, key(h.key, h.ledger), h.name, h.charged, actual]
        now_us = self.ctx.now_us()
        kept: set[str] = set()
        for h in decision.holds:
            if h.kind == Op.QUOTA and h.key not in kept:
                kept.add(h.key)
                ops += [Op.EXPIRE, key(h.key), "", _period_ttl_ms(h.until_us, now_us), 0]
        for h in decision.holds:
            if h.kind == Op.QUOTA and h.thresholds and (cost if h.param == 1 else tokens):
                pcts = ",".join(str(t) for t in h.thresholds)
                ops += [Op.THRESHOLDS, key(h.key), h.name, h.amount, pcts]
        spikes = self.ctx.config.spikes
        if spikes is not None and tokens > 0:
            params = f"{int(spikes.multiple * 1000)},{spikes.floor_tokens},{spikes.window_hours}"
            ops += [Op.HOURLY, key(keys.hourly), "", tokens, params]
        if usage is not None and decision.day is not None:
            ukey = key(keys.usage(decision.day))
            for field, value in _usage_fields(usage, cost):
                ops += [Op.USAGE, ukey, field, self.ctx.retention_ms, value]
        if not ops:
            return None
        args: list[ScriptArg] = [
            self.ctx.now_arg(), decision.request_id, SETTLE_MARKER_MS, len(ops) // 5
        ]  # fmt: skip
        return ScriptCall("settle", tuple(key_list), tuple(args + ops))

    def plan_app_settle(
        self,
        decision: Decision,
        cost: int,
        at_us: int | None = None,
        usage: Usage | None = None,
    ) -> ScriptCall | None:
        """The second settle call, on the app-wide keys (their own cluster slot): the request's
        cost on every app budget and their thresholds (no reservation there: a kill switch on
        actual spend), then the app's rollups of ``usage`` (its day's totals per model and the
        rankings of callers and tenants), which let reports over every caller read a few keys
        instead of SCANning each caller's."""
        rollup = usage is not None and decision.day is not None and self.ctx.config.rollups
        shared = self._shared_charges(decision, usage, cost, at_us)
        if not shared and not rollup:
            return None
        app_keys = self.ctx.app_keys
        key_list = [app_keys.settled(decision.request_id)]
        ops: list[ScriptArg] = []
        index: dict[str, int] = {}
        for b, value in shared:
            if b.key not in index:
                key_list += [b.key, app_keys.ledger(b.key)]
                index[b.key] = len(key_list) - 1
            ops += [Op.QUOTA, index[b.key], b.name, 0, value]
        now_us = self.ctx.now_us()
        for key, end_us in {b.key: b.end_us for b, _ in shared}.items():
            ops += [Op.EXPIRE, index[key], "", _period_ttl_ms(end_us, now_us), 0]
        for b, _ in shared:
            if b.budget.thresholds:
                pcts = ",".join(map(str, b.budget.thresholds))
                ops += [Op.THRESHOLDS, index[b.key], b.name, b.amount, pcts]
        if rollup:
            assert usage is not None and decision.day is not None and decision.caller is not None
            ops += self._rollup_ops(key_list, decision.day, decision.caller, usage, cost)
        args: list[ScriptArg] = [self.ctx.now_arg(), decision.request_id, SETTLE_MARKER_MS,
                                 len(ops) // 5]  # fmt: skip
        return ScriptCall("settle", tuple(key_list), tuple(args + ops))

    def _rollup_ops(
        self, key_list: list[str], day: str, caller: Any, usage: Usage, cost: int
    ) -> list[ScriptArg]:
        """The rollup operations of one settled request (keys appended to ``key_list``)."""
        app_keys, keep = self.ctx.app_keys, self.ctx.retention_ms
        key_list.append(app_keys.rollup(day))
        total = len(key_list)
        ops: list[ScriptArg] = []
        for field, value in _usage_fields(usage, cost):
            ops += [Op.USAGE, total, field, keep, value]
        member = rank_member(caller.tenant, caller.id)
        tokens = usage.input_tokens + usage.output_tokens
        for period, metric, who, value in (
            (day, "cost", member, cost),
            (day, "tokens", member, tokens),
            (day, "requests", member, 1),
            (day, "tenants", tenant_member(caller.tenant), cost),
            (day[:7], "cost", member, cost),  # the month's ranking, the dashboard's default
        ):
            if value:
                key_list.append(app_keys.ranking(period, metric))
                ops += [Op.RANK, len(key_list), who, keep, value]
        return ops

    def _shared_charges(
        self, decision: Decision, usage: Usage | None, cost: int, at_us: int | None
    ) -> list[tuple[SharedBudget, int]]:
        """The shared counters this request is charged on, in the order of their operations in
        the second call, and by how much: its cost, or its tokens on a tenant token quota."""
        tenant = decision.caller.tenant if decision.caller is not None else None
        tokens = usage.input_tokens + usage.output_tokens if usage is not None else 0
        out = []
        for b in self.ctx.shared_budgets(tenant, at_us):
            if b.in_admit:
                continue  # held by the admit call, settled with the caller's own limits
            value = cost if b.in_usd else tokens
            if value > 0:
                out.append((b, value))
        return out

    def finish(
        self, decision: Decision, meter: Meter | None
    ) -> tuple[Usage | None, int, Charge | None]:
        """The usage and cost to settle for a finished response, and its charge record (AI
        requests). Logs the charge line, and a ``usage_invalid`` warning when the upstream's
        numbers could not be believed."""
        if meter is None:
            return None, 0, None
        usage = meter.finish()
        cost = meter.cost(usage)
        ai = meter.ai
        if meter.invalid is not None:
            self.ctx.stats.incr("usage_invalid")
            log.warning(
                "quota_middleware: usage_invalid route=%s model=%s status=%d (%s); charged "
                "from the estimate", ai.route.path, usage.model or "-", meter.status,
                meter.invalid,
            )  # fmt: skip
        if usage.error is not None and not usage.estimated and not usage.total_tokens:
            self.ctx.stats.incr("upstream_errors")
        elif usage.estimated:
            self.ctx.stats.incr("estimated")
        est = ai.estimate
        if not (usage.estimated or usage.error or est.opaque or est.estimated_from_bytes):
            # an exact count: how far this model's tokenizer runs above our estimate
            self.ctx.margins.observe(est.format, est.model, est.prompt_tokens, usage.input_tokens)
        caller = decision.caller
        if caller is None:
            return usage, cost, None
        charge = Charge(
            request_id=decision.public_id, caller=caller.id, tenant=caller.tenant,
            plan=decision.plan, route=ai.route.path, path=decision.path or ai.route.path,
            provider=ai.estimate.format, model=usage.model, status=meter.status,
            input_tokens=usage.input_tokens, cached_tokens=usage.cached_tokens,
            cache_write_tokens=usage.cache_write_tokens, output_tokens=usage.output_tokens,
            reasoning_tokens=usage.reasoning_tokens, cost_micros=cost,
            estimated=usage.estimated, reason=usage.reason, error=usage.error,
            degraded=decision.degraded, stopped=meter.stopped,
        )  # fmt: skip
        hook = getattr(self.ctx.metrics, "charged", None)
        if hook is not None:  # OpenTelemetry: the charge on the request's span
            hook(decision, charge)
        if charge_log.isEnabledFor(logging.INFO):
            extra = {"quota_charge": charge.as_dict()}
            charge_log.info("charge %s", charge.log_text(), extra=extra)
        return usage, cost, charge

    def settle(
        self, decision: Decision, usage: Usage | None = None, cost: int = 0
    ) -> Generator[ScriptCall, Any, list[AlertEvent]]:
        """The settle flow: the caller's settle, the app budgets', then any alert events to the
        outbox. Each step runs even if an earlier one failed: the app's spend is charged when
        the caller's keys are unreachable, and events already decided (their markers are set,
        they will not fire again) still reach the outbox, or at least the log. A settle that
        could not be written goes to the settle buffer; once a settle succeeds again, the
        buffered ones are applied after it."""
        if self.ctx.metrics is not None and usage is not None:
            self.ctx.metrics.usage(usage, cost)
        at_us = self.ctx.now_us()
        events, error = yield from self._settle_once(decision, usage, cost, at_us)
        if error is not None:
            # only an AI request's usage is owed: a slot or reservation frees itself when its
            # lease ends, and must not take a charge's place in the buffer
            if decision.ai is not None:
                self._buffer(decision, usage, cost, 0, at_us)
        elif len(self.ctx.settle_buffer):
            events += yield from self.drain(answered=True)
        if decision.ai is not None:
            margins = self.ctx.margins.sync_call()
            if margins is not None:
                try:
                    self.ctx.margins.apply((yield margins))
                except StorageError:
                    self.ctx.margins.unsent(margins)  # an optimisation: the next sync carries it
        # (a metrics object of the user's own may not have this hook)
        if self.ctx.metrics is not None and hasattr(self.ctx.metrics, "settle_buffer"):
            self.ctx.metrics.settle_buffer(
                len(self.ctx.settle_buffer), self.ctx.settle_buffer.dropped
            )
        return events

    def drain(self, *, answered: bool = False) -> Generator[ScriptCall, Any, list[AlertEvent]]:
        """Apply up to a batch of buffered settles, oldest first, stopping at the first that
        fails. One that fails because the store is unreachable goes back to the front, as it
        was: an outage never costs a charge. One the store refused (it answered with an error,
        just after answering another call: ``answered``) counts an attempt and goes to the back;
        after ``_REPLAY_ATTEMPTS`` it is dropped and logged. The adapters also run this in the
        background while the buffer is not empty, so a worker with no more traffic writes them.
        """
        events: list[AlertEvent] = []
        for _ in range(_DRAIN_BATCH):
            item = self.ctx.settle_buffer.pop()
            if item is None:
                break
            d, u, c, attempts, at_us = item
            more, error = yield from self._settle_once(d, u, c, at_us)
            events += more
            if error is None:
                self.ctx.stats.incr("settle_replayed")
                answered = True
                continue
            if error.outage or not answered:
                self.ctx.settle_buffer.push(d, u, c, attempts, at_us, front=True)
            elif attempts + 1 < _REPLAY_ATTEMPTS:
                self.ctx.settle_buffer.push(d, u, c, attempts + 1, at_us)
            else:
                self.ctx.settle_buffer.drop()
                self.ctx.stats.incr("settle_dropped")
                log.error("quota_middleware: buffered settle %s dropped after %d attempts (%s)",
                          d.public_id, _REPLAY_ATTEMPTS, error)  # fmt: skip
            break
        return events

    def _buffer(
        self, decision: Decision, usage: Usage | None, cost: int, attempts: int, at_us: int
    ) -> None:
        self.ctx.stats.incr("settle_buffered")
        if not self.ctx.settle_buffer.push(decision, usage, cost, attempts, at_us):
            self.ctx.stats.incr("settle_dropped")
            log.error(
                "quota_middleware: settle buffer full (%d); the oldest unwritten settle was "
                "dropped", self.ctx.settle_buffer.size,
            )  # fmt: skip

    def _settle_once(
        self, decision: Decision, usage: Usage | None, cost: int, at_us: int
    ) -> Generator[ScriptCall, Any, tuple[list[AlertEvent], StorageError | None]]:
        """One request's settle calls (app budgets in the period of ``at_us``, when the request
        ended); the error of the first that could not be written, if any (what was written is
        not written twice when the whole settle is replayed: each call has its done marker)."""
        events: list[AlertEvent] = []
        failed: StorageError | None = None
        call = self.plan_settle(decision, usage, cost)
        if call is not None:
            try:
                reply = yield call
            except StorageError as e:
                self._settle_failed("caller", e)
                failed = e
            else:
                events += self._events(decision, parse_settle_events(reply))
        app_call = (
            self.plan_app_settle(decision, cost, at_us, usage) if decision.ai is not None else None
        )
        if app_call is not None:
            try:
                reply = yield app_call
            except StorageError as e:
                self._settle_failed("app budget", e)
                failed = failed or e
            else:
                # each budget's period is the one it was charged in, read off the call's keys
                shared = {b.name: b for b, _ in self._shared_charges(decision, usage, cost, at_us)}
                events += self._events(decision, parse_settle_events(reply), shared=shared)
        if events:
            for event in events:
                self.ctx.stats.incr(f"alerts_{event.type}")
                if self.ctx.metrics is not None:
                    self.ctx.metrics.alert(event, "fired")
            try:
                yield outbox_call(self.ctx.prefix, events)
            except StorageError as e:
                self._settle_failed("outbox", e)
                for event in events:
                    # the last place these events exist: never drop them silently
                    log.warning("quota_middleware: alert not queued: %s", event.to_json())
        return events, failed

    def _settle_failed(self, what: str, error: StorageError) -> None:
        self.ctx.stats.incr("settle_failed")
        log.warning(
            "quota_middleware: %s settle failed (%s); kept in the settle buffer until the "
            "store answers", what, error,
        )  # fmt: skip

    def _events(
        self,
        decision: Decision,
        raw: Sequence[tuple[str, str, int, int]],
        *,
        shared: dict[str, SharedBudget] | None = None,
    ) -> list[AlertEvent]:
        """The alert events of a settle reply: the caller's (``shared`` None) or those of the
        second call's shared budgets (by name)."""
        caller = decision.caller
        out = []
        at = self.ctx.now_us() / 1_000_000
        holds = {h.name: h for h in decision.holds if h.kind == Op.QUOTA}
        # a tenant budget held by the admit call (hash_tag = "tenant"): its threshold is the
        # tenant's, named as the second call names it, so it fires once whichever placement
        tagged = (
            {n for n, h in holds.items() if h.key.startswith(tenant_tagged_period(
                self.ctx.prefix, caller.tenant, ""))}
            if self.ctx.by_tenant and caller is not None and shared is None else set()
        )  # fmt: skip
        for kind, name, level, used in raw:
            if kind == Op.HOURLY:
                assert caller is not None
                out.append(AlertEvent(
                    id=f"spike:{caller.tenant}:{caller.id}:{level}", type="spike",
                    caller=caller.id, tenant=caller.tenant, plan=decision.plan, limit="spike",
                    period=str(level), threshold=None, used=used, limit_value=None,
                    unit="tokens", at=at,
                ))  # fmt: skip
            elif shared is not None:
                b = shared.get(name)
                pid = period_name(b.key) if b is not None else ""
                unit = "usd_micros" if b is None or b.in_usd else "tokens"
                limit_value = b.amount if b is not None else None
                if b is not None and b.tenant is not None:
                    out.append(AlertEvent(
                        id=f"tenant:{b.tenant}:{name}:{pid}:{level}", type="tenant_threshold",
                        caller=None, tenant=b.tenant, plan=None, limit=name, period=pid,
                        threshold=level, used=used, limit_value=limit_value, unit=unit, at=at,
                    ))  # fmt: skip
                else:
                    out.append(AlertEvent(
                        id=f"app:{name}:{pid}:{level}", type="app_threshold", caller=None,
                        tenant=None, plan=None, limit=name, period=pid, threshold=level,
                        used=used, limit_value=limit_value, unit=unit, at=at,
                    ))  # fmt: skip
            elif name in tagged:
                assert caller is not None
                th = holds[name]
                out.append(AlertEvent(
                    id=f"tenant:{caller.tenant}:{name}:{th.period}:{level}",
                    type="tenant_threshold", caller=None, tenant=caller.tenant, plan=None,
                    limit=name, period=th.period, threshold=level, used=used,
                    limit_value=th.amount, unit="usd_micros" if th.param == 1 else "tokens", at=at,
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


def _period_ttl_ms(until_us: int, now_us: int) -> int:
    """How long a period's counters are kept: until the period ends, plus an hour."""
    return max(0, until_us - now_us) // 1000 + 3_600_000


def _usage_fields(usage: Usage, cost: int) -> list[tuple[str, int]]:
    """The usage hash fields (``<model>|<counter>``) one settled request adds to, and by how
    much: the caller's usage record and the app's rollup count the same."""
    model = (clean_model(usage.model) or "unknown").replace("|", "_")[:100]
    return [
        (f"{model}|{field}", value)
        for field, value in (
            ("requests", 1),
            ("input", usage.input_tokens),
            ("cached", usage.cached_tokens),
            ("cache_write", usage.cache_write_tokens),
            ("output", usage.output_tokens),
            ("reasoning", usage.reasoning_tokens),
            ("cost", cost),
            ("estimated", int(usage.estimated)),
            # upstream errors charged nothing: counted apart from the estimates
            (
                "errors",
                int(usage.error is not None and not usage.estimated and not usage.total_tokens),
            ),
        )  # fmt: skip
        if value
    ]
