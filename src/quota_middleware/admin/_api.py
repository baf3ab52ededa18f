"""The admin app's JSON API, under ``/api``: reports over the fleet's rollups
(:mod:`quota_middleware.fleet`), one caller's usage (:mod:`quota_middleware.reports`), the
runtime controls, API keys, the shared budgets' limits (the kill switch), the alert outbox and
the audit stream. State changes go through ``_ops`` (checked, audited). Money is micro-USD
(``*_micros``, with ``cost_usd`` beside), times ISO 8601 UTC.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from quota_middleware.admin import _ops as ops
from quota_middleware.admin._http import HTTPError, Request, Response, Router, invalid
from quota_middleware.admin._http import json_response as ok
from quota_middleware.alerts._outbox import dead_key, read_stream
from quota_middleware.base._events import AlertEvent, outbox_key
from quota_middleware.fleet import (
    CallerTotals,
    app_budget_status,
    daily_totals,
    period_days,
    ranked,
    ranked_tenants,
    top_callers,
)
from quota_middleware.reports import COUNTER_FIELDS, Counters, UsageReader

if TYPE_CHECKING:
    from quota_middleware.admin._app import AdminContext

__all__ = ["register"]

PERIODS = ("day", "week", "month")
METRICS = ("cost", "tokens", "requests")
#: the newest outbox entries searched for spikes
_SPIKE_WINDOW = 2000


# -- query parameters -----------------------------------------------------------------------------
def _int_arg(req: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = req.query.get(name)
    if raw is None or raw == "":
        return default
    # ASCII digits only: str.isdigit() also accepts "²", which int() then refuses (a 500)
    if not (raw.isascii() and raw.isdigit()) or not lo <= int(raw) <= hi:
        raise invalid(name, f"{name} must be a whole number from {lo} to {hi}")
    return int(raw)


def _choice(req: Request, name: str, choices: tuple[str, ...], default: str) -> str:
    value = req.query.get(name) or default
    if value not in choices:
        raise invalid(name, f"{name} must be one of {', '.join(choices)}")
    return value


def _opt_tenant(req: Request) -> str | None:
    raw = req.query.get("tenant")
    return None if raw is None or raw == "" else ops.ident(raw, "tenant")


def _counters(c: Counters) -> dict[str, Any]:
    data = {attr: getattr(c, attr) for attr in COUNTER_FIELDS.values()}
    return {**data, "total_tokens": c.total_tokens, "cost_usd": c.cost_usd}


def _caller_totals(r: CallerTotals) -> dict[str, Any]:
    return {"tenant": r.tenant, "caller": r.caller, **_counters(r), "models": list(r.models),
            "days": list(r.days), "hashed": r.hashed}  # fmt: skip


def _sum(rows: Any) -> Counters:
    acc = {attr: 0 for attr in COUNTER_FIELDS.values()}
    for r in rows:
        for attr in acc:
            acc[attr] += getattr(r, attr)
    return Counters(**acc)


# -- reports -------------------------------------------------------------------------------------
def whoami(req: Request, ctx: AdminContext) -> Response:
    admin = req.admin
    assert admin is not None
    return ok({"who": admin.who, "via": admin.via, "csrf": admin.csrf or None,
               "expires": ops.iso(admin.expires)})  # fmt: skip


def usage(req: Request, ctx: AdminContext) -> Response:
    """Top callers of a day / ISO week / month so far, by cost, tokens or requests."""
    period = _choice(req, "period", PERIODS, "day")
    by = _choice(req, "by", METRICS, "cost")
    limit = _int_arg(req, "limit", 20, 1, 1000)
    tenant = _opt_tenant(req)
    pid, days = period_days(ctx.config, period)
    if ctx.config.rollups:
        rows, count = ranked(ctx.backend, ctx.config, days, by=by, limit=limit, tenant=tenant)
    elif period == "week":
        raise invalid("period", "a week's ranking needs the rollups (rollups = true)")
    else:  # no rollups: the SCAN over every caller's usage keys
        every = top_callers(ctx.backend, ctx.config, period=period, by=by, limit=None,
                            tenant=tenant)  # fmt: skip
        rows, count = every[:limit], len(every)
    return ok({"period": period, "id": pid, "days": days, "by": by, "count": count,
               "callers": [_caller_totals(r) for r in rows],
               "shown_total": _counters(_sum(rows))})  # fmt: skip


def _last_days(ctx: AdminContext, n: int) -> list[str]:
    today = datetime.now(UTC).astimezone(ctx.config.plan(None).zone).date()
    return [(today - timedelta(days=i)).isoformat() for i in range(n - 1, -1, -1)]


def _need_rollups(ctx: AdminContext, what: str) -> None:
    """409 ``rollups_off`` where only the rollups hold the answer: with ``rollups = false``
    they are empty, and an answer of zeros would read as "no traffic"."""
    if not ctx.config.rollups:
        raise HTTPError(409, "rollups_off",
                        f"{what}: read from the app-wide rollups, which this policy turns "
                        "off (rollups = false)")  # fmt: skip


def usage_daily(req: Request, ctx: AdminContext) -> Response:
    """The whole app's usage per day (oldest first) and model, from the rollups."""
    n = _int_arg(req, "days", 30, 1, 400)
    _need_rollups(ctx, "the app's daily totals")
    days = _last_days(ctx, n)
    totals = daily_totals(ctx.backend, ctx.config, days)
    out = []
    for day in days:
        models = totals.get(day, {})
        out.append({"day": day, "models": {m: _counters(c) for m, c in models.items()},
                    "total": _counters(_sum(models.values()))})  # fmt: skip
    return ok({"days": out, "total": _counters(_sum(
        c for models in totals.values() for c in models.values()))})  # fmt: skip


def _remaining(r: Any) -> dict[str, Any]:
    return {"name": r.name, "kind": r.kind, "period": r.period, "unit": r.unit,
            "limit": r.limit, "used": r.used, "remaining": r.remaining,
            "resets_at": ops.iso(r.resets_at)}  # fmt: skip


def caller(req: Request, ctx: AdminContext) -> Response:
    """One caller: usage per day and model, what is left, its controls."""
    tenant = ops.ident(req.params["tenant"], "tenant")
    who = ops.ident(req.params["caller"], "caller")
    days = _int_arg(req, "days", 30, 1, 366)
    plan = ops.plan_arg(ctx, req.query.get("plan")) or ctx.config.plan(None).name
    reader = UsageReader(ctx.config, ctx.backend)
    records = reader.usage(who, tenant=tenant, days=days, plan=plan)
    left = reader.remaining(who, tenant=tenant, plan=plan)
    state = ctx.controls.show(who, tenant=tenant)
    total = _sum(records)
    share = total.estimated / total.requests if total.requests else 0.0
    return ok({
        "caller": who, "tenant": tenant, "plan": plan, "days": days,
        "usage": [{"day": r.day, "model": r.model, **_counters(r)} for r in records],
        "totals": _counters(total), "estimated_share": round(share, 4),
        "remaining": [_remaining(q) for q in left],
        "controls": ops.state_record(state),
    })  # fmt: skip


def tenants(req: Request, ctx: AdminContext) -> Response:
    """Tenants by spend over a period, with their shared budgets."""
    period = _choice(req, "period", PERIODS, "day")
    limit = _int_arg(req, "limit", 20, 1, 1000)
    _need_rollups(ctx, "the tenants' ranking")
    pid, days = period_days(ctx.config, period)
    top = ranked_tenants(ctx.backend, ctx.config, days, limit=limit)
    names = [t for t, _ in top]
    budgets: dict[str, list[dict[str, Any]]] = {t: [] for t in names}
    if ctx.config.tenant_budgets and names:
        for s in app_budget_status(ctx.backend, ctx.config, tenants=names):
            if s.tenant in budgets:
                budgets[s.tenant].append(ops.budget_record(s))
    return ok({"period": period, "id": pid, "days": days, "tenants": [
        {"tenant": t, "cost_micros": v, "cost_usd": v / 1_000_000, "budgets": budgets[t]}
        for t, v in top]})  # fmt: skip


def tenant(req: Request, ctx: AdminContext) -> Response:
    """One tenant: its block and its shared budgets."""
    name = ops.ident(req.params["tenant"], "tenant")
    block = ops.tenant_block_of(ctx, name)
    rows = app_budget_status(ctx.backend, ctx.config, tenants=[name])
    return ok({"tenant": name, "block": ops.block_record(block),
               "budgets": [ops.budget_record(s) for s in rows if s.tenant == name]})  # fmt: skip


# -- controls ------------------------------------------------------------------------------------
def controls_show(req: Request, ctx: AdminContext) -> Response:
    tenant = ops.ident(req.params["tenant"], "tenant")
    who = ops.ident(req.params["caller"], "caller")
    return ok(ops.state_record(ctx.controls.show(who, tenant=tenant)))


def _block_fields(req: Request) -> dict[str, Any]:
    data = req.data()
    unknown = set(data) - {"scope", "reason", "duration", "csrf"}
    if unknown:
        raise invalid(sorted(unknown)[0], "unknown field; expected scope, reason, duration")
    return {"scope": data.get("scope", "all"), "reason": data.get("reason", ""),
            "duration": data.get("duration")}  # fmt: skip


def caller_block(req: Request, ctx: AdminContext) -> Response:
    p = req.params
    return ok(ops.block(ctx, req, tenant=p["tenant"], caller=p["caller"], **_block_fields(req)))


def caller_unblock(req: Request, ctx: AdminContext) -> Response:
    p = req.params
    return ok(ops.unblock(ctx, req, tenant=p["tenant"], caller=p["caller"]))


def tenant_block(req: Request, ctx: AdminContext) -> Response:
    return ok(ops.block(ctx, req, tenant=req.params["tenant"], caller=None,
                        **_block_fields(req)))  # fmt: skip


def tenant_unblock(req: Request, ctx: AdminContext) -> Response:
    return ok(ops.unblock(ctx, req, tenant=req.params["tenant"], caller=None))


def override_set(req: Request, ctx: AdminContext) -> Response:
    p = req.params
    data = req.data()
    unknown = set(data) - {"value", "burst", "expires", "plan", "csrf"}
    if unknown:
        raise invalid(sorted(unknown)[0], "unknown field; expected value, burst, expires, plan")
    if "value" not in data:
        raise invalid("value", "value is required")
    return ok(ops.set_override(
        ctx, req, tenant=p["tenant"], caller=p["caller"], name=p["name"], value=data["value"],
        burst=data.get("burst"), expires=data.get("expires"), plan=data.get("plan"),
    ))  # fmt: skip


def override_unset(req: Request, ctx: AdminContext) -> Response:
    p = req.params
    return ok(ops.unset_override(ctx, req, tenant=p["tenant"], caller=p["caller"],
                                 name=p["name"]))  # fmt: skip


# -- API keys ------------------------------------------------------------------------------------
def keys_list(req: Request, ctx: AdminContext) -> Response:
    raw = req.query.get("caller")
    who = ops.ident(raw, "caller") if raw else None
    return ok({"keys": [ops.key_record(r) for r in ctx.keys.list(who)]})


def key_show(req: Request, ctx: AdminContext) -> Response:
    key_id = req.params["key_id"]
    rec = ctx.keys.get(key_id)
    if rec is None:
        raise HTTPError(404, "not_found", "no such API key")
    return ok(ops.key_record(rec))


def key_create(req: Request, ctx: AdminContext) -> Response:
    """201 with the plain ``key`` (shown this once) and its record; an idempotent replay 200
    with the record and ``"replayed": true``, no key."""
    data = req.data()
    unknown = set(data) - {"caller", "tenant", "plan", "expires_in", "csrf"}
    if unknown:
        raise invalid(sorted(unknown)[0], "unknown field; expected caller, tenant, plan, "
                      "expires_in")  # fmt: skip
    if "caller" not in data:
        raise invalid("caller", "caller is required")
    record, plain = ops.create_key(ctx, req, caller=data["caller"],
                                   tenant=data.get("tenant", "default"), plan=data.get("plan"),
                                   expires_in=data.get("expires_in"))  # fmt: skip
    if plain is None:
        return ok(record)
    return ok({"key": plain, **record}, 201)


def key_revoke(req: Request, ctx: AdminContext) -> Response:
    return ok(ops.revoke_key(ctx, req, req.params["key_id"]))


def key_rotate(req: Request, ctx: AdminContext) -> Response:
    data = req.data()
    unknown = set(data) - {"grace", "csrf"}
    if unknown:
        raise invalid(sorted(unknown)[0], "unknown field; expected grace")
    answer, plain = ops.rotate_key(ctx, req, req.params["key_id"], grace=data.get("grace"))
    if plain is None:
        return ok(answer)
    return ok({"key": plain, **answer}, 201)


# -- shared budgets ------------------------------------------------------------------------------
def budgets(req: Request, ctx: AdminContext) -> Response:
    """The app budgets (and with ``?tenant=``, that tenant's) in their current period."""
    name = _opt_tenant(req)
    rows = app_budget_status(ctx.backend, ctx.config, tenants=[name] if name else [])
    return ok({"budgets": [ops.budget_record(s) for s in rows]})


def budget_set(req: Request, ctx: AdminContext) -> Response:
    data = req.data()
    unknown = set(data) - {"limit", "tenant", "csrf"}
    if unknown:
        raise invalid(sorted(unknown)[0], "unknown field; expected limit, tenant")
    if data.get("limit") is None:
        raise invalid("limit", "limit is required (0: the kill switch; DELETE restores)")
    t = data.get("tenant")
    return ok(ops.set_budget(ctx, req, req.params["name"], limit=data["limit"],
                             tenant=t if t not in (None, "") else None))  # fmt: skip


def budget_restore(req: Request, ctx: AdminContext) -> Response:
    return ok(ops.set_budget(ctx, req, req.params["name"], limit=None, tenant=_opt_tenant(req)))


# -- the outbox and the audit stream -------------------------------------------------------------
def _event(eid: str, raw: bytes) -> dict[str, Any] | None:
    try:
        event = AlertEvent.from_json(raw)
    except (ValueError, TypeError):
        return None
    return {"entry_id": eid, **dataclasses.asdict(event), "at_iso": ops.iso(event.at or 0)}


def alerts(req: Request, ctx: AdminContext) -> Response:
    """The newest alert events, newest first."""
    limit = _int_arg(req, "limit", 50, 1, 1000)
    rows = read_stream(ctx.backend, outbox_key(ctx.config.storage.prefix), count=limit)
    events = [e for eid, f in reversed(rows) if (e := _event(eid, f.get("event", b"")))]
    return ok({"events": events})


def alerts_dead(req: Request, ctx: AdminContext) -> Response:
    """Dead letters (events no sink took after every attempt), newest first."""
    limit = _int_arg(req, "limit", 50, 1, 1000)
    rows = read_stream(ctx.backend, dead_key(ctx.config.storage.prefix), count=limit)
    out = []
    for eid, f in reversed(rows):
        text = {k: v.decode("utf-8", "replace") for k, v in f.items() if k != "event"}
        out.append({"entry_id": eid, **text, "event": _event(text.get("entry", ""),
                                                             f.get("event", b""))})  # fmt: skip
    return ok({"dead": out})


def spikes(req: Request, ctx: AdminContext) -> Response:
    """The newest spike events (callers whose hourly usage jumped), newest first."""
    limit = _int_arg(req, "limit", 50, 1, 1000)
    rows = read_stream(ctx.backend, outbox_key(ctx.config.storage.prefix), count=_SPIKE_WINDOW)
    found = [e for eid, f in reversed(rows) if (e := _event(eid, f.get("event", b"")))
             and e["type"] == "spike"]  # fmt: skip
    return ok({"spikes": found[:limit]})


def audit(req: Request, ctx: AdminContext) -> Response:
    """The newest audit entries, newest first."""
    limit = _int_arg(req, "limit", 50, 1, 1000)
    return ok({"entries": [e.as_dict() for e in ctx.audit.recent(limit)]})


def register(router: Router) -> None:
    """Add the JSON API's routes to ``router``."""
    add = router.add
    add("GET", "/api/whoami", whoami)
    add("GET", "/api/usage", usage)
    add("GET", "/api/usage/daily", usage_daily)
    add("GET", "/api/callers/{tenant}/{caller}", caller)
    add("GET", "/api/tenants", tenants)
    add("GET", "/api/tenants/{tenant}", tenant)
    add("PUT", "/api/tenants/{tenant}/block", tenant_block)
    add("DELETE", "/api/tenants/{tenant}/block", tenant_unblock)
    add("GET", "/api/controls/{tenant}/{caller}", controls_show)
    add("PUT", "/api/controls/{tenant}/{caller}/block", caller_block)
    add("DELETE", "/api/controls/{tenant}/{caller}/block", caller_unblock)
    add("PUT", "/api/controls/{tenant}/{caller}/limits/{name}", override_set)
    add("DELETE", "/api/controls/{tenant}/{caller}/limits/{name}", override_unset)
    add("GET", "/api/keys", keys_list)
    add("POST", "/api/keys", key_create)
    add("GET", "/api/keys/{key_id}", key_show)
    add("DELETE", "/api/keys/{key_id}", key_revoke)
    add("POST", "/api/keys/{key_id}/rotate", key_rotate)
    add("GET", "/api/budgets", budgets)
    add("PUT", "/api/budgets/{name}", budget_set)
    add("DELETE", "/api/budgets/{name}", budget_restore)
    add("GET", "/api/alerts", alerts)
    add("GET", "/api/alerts/dead", alerts_dead)
    add("GET", "/api/spikes", spikes)
    add("GET", "/api/audit", audit)
