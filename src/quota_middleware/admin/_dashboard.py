"""The dashboard: server-rendered HTML pages of the admin app, behind its authentication.

- ``GET /ui/``: spend today, this week and this month against each app budget; spend per day
  for 30 days by model (an SVG chart, a table beneath it); the top callers of a day, week or
  month by cost, tokens or requests, each linking to its drill-down; tenants; recent alerts and
  spikes (the outbox); what changed this week (this week so far against the same days of last
  week: spend, callers new in the top, the biggest growers, blocks and overrides made).
- ``GET /ui/callers/{tenant}/{caller}``: one caller's 30 days per day and per model, what is
  left of each quota and budget, the share of estimated charges, its blocks and overrides, and
  the forms that change them (``POST .../block``, ``.../unblock``, ``.../override``,
  ``.../unset``: CSRF-checked and audited by the admin app's operations, then 303 back).
- ``GET /login``: the sign-in form (it posts to the admin app's ``POST /login``).

Every page reads a fixed number of keys, whatever the number of callers: the app's rollups
(:mod:`quota_middleware.fleet`), one caller's records (``reports.UsageReader``), the newest
entries of the outbox and the audit stream. Each page is a pure function of plain values
(``render_*``), read by a ``read_*`` function; the handlers only join the two. No JavaScript:
the switches are links, the forms plain posts, the charts SVG with ``<title>`` tooltips and a
table beneath each.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from importlib import resources
from typing import Any, Protocol
from urllib.parse import quote, urlencode

from quota_middleware.admin._html import (
    Child,
    Column,
    Safe,
    h,
    join,
    money,
    num,
    page,
    pct,
    table,
    when,
)
from quota_middleware.admin._http import HTTPError, Request, Response, Router, invalid
from quota_middleware.admin._svg import Series, legend, level_bar, stacked_bars
from quota_middleware.alerts._outbox import outbox_events
from quota_middleware.base._events import AlertEvent
from quota_middleware.base._protocols import SyncBackend
from quota_middleware.config import QuotaConfig
from quota_middleware.controls import Controls, State
from quota_middleware.errors import InvalidArgument
from quota_middleware.fleet import (
    AppBudgetStatus,
    CallerTotals,
    app_budget_status,
    daily_totals,
    period_days,
    ranked,
    ranked_tenants,
    read_hashes,
)
from quota_middleware.limits import Budget, TokenQuota
from quota_middleware.reports import COUNTER_FIELDS, Counters, Remaining, UsageReader, UsageRecord

__all__ = [
    "CallerView",
    "Overview",
    "WeekChanges",
    "read_caller",
    "read_overview",
    "register",
    "render_caller",
    "render_login",
    "render_overview",
]


class AdminContext(Protocol):
    """What the dashboard uses of the admin app's context (``_app.AdminContext``)."""

    config: QuotaConfig
    backend: SyncBackend
    controls: Controls


PERIODS = ("day", "week", "month")
METRICS = ("cost", "tokens", "requests")
#: days in the spend charts
CHART_DAYS = 30
#: models drawn as their own series; the rest are summed as "other"
MAX_SERIES = 7
TOP = 20
#: outbox entries read for the alerts and spikes panels (the newest)
OUTBOX_READ = 300
#: audit entries read for "what changed this week"
AUDIT_READ = 200
#: durations offered by the block and override forms (seconds; "" = until undone)
DURATIONS = (("", "until undone"), ("900", "15 minutes"), ("3600", "1 hour"),
             ("86400", "1 day"), ("604800", "7 days"), ("2592000", "30 days"))  # fmt: skip
_CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
_ASSETS = {"dashboard.css": "text/css; charset=utf-8"}
_DONE = {
    "block": "Blocked: the caller's next request is refused, on every worker.",
    "unblock": "Unblocked.",
    "override": "Override set: it applies from the caller's next request.",
    "unset": "Override removed: the plan's limit applies again.",
}


# == reading: plain values out of the store ======================================================
@dataclass(frozen=True, slots=True)
class Spend:
    """The whole app's spend over one period so far (micro-USD)."""

    period: str  # "day" | "week" | "month"
    id: str  # "2026-12-03", "2026-W49", "2026-12"
    micros: int
    requests: int


@dataclass(frozen=True, slots=True)
class Grower:
    caller: CallerTotals
    before: int  # micro-USD over the same days of last week


@dataclass(frozen=True, slots=True)
class Change:
    """A block or override made this week, from the audit stream."""

    at: float
    who: str
    action: str
    target: str
    detail: str


@dataclass(frozen=True, slots=True)
class WeekChanges:
    """This week so far against the same days of last week."""

    days: tuple[str, ...]
    before_days: tuple[str, ...]
    spend: int
    spend_before: int
    new_in_top: tuple[CallerTotals, ...]
    growers: tuple[Grower, ...]
    changes: tuple[Change, ...]


@dataclass(frozen=True, slots=True)
class Overview:
    """Everything the overview page shows, read at ``now``."""

    now: datetime
    spend: tuple[Spend, ...]
    budgets: tuple[AppBudgetStatus, ...]
    chart_days: tuple[str, ...]
    #: day -> model -> the app's counters that day (days without usage absent)
    daily: Mapping[str, Mapping[str, Counters]]
    period: str
    by: str
    period_id: str
    top: tuple[CallerTotals, ...]
    callers_in_period: int
    tenants: tuple[tuple[str, int], ...]
    tenants_total: int
    alerts: tuple[AlertEvent, ...]
    spikes: tuple[AlertEvent, ...]
    week: WeekChanges


def _sum(counters: Iterable[Counters]) -> dict[str, int]:
    acc = dict.fromkeys(COUNTER_FIELDS.values(), 0)
    for c in counters:
        for attr in acc:
            acc[attr] += getattr(c, attr)
    return acc


def _day_cost(daily: Mapping[str, Mapping[str, Counters]], days: Iterable[str]) -> int:
    return sum(c.cost_micros for d in days for c in daily.get(d, {}).values())


def _day_requests(daily: Mapping[str, Mapping[str, Counters]], days: Iterable[str]) -> int:
    return sum(c.requests for d in days for c in daily.get(d, {}).values())


def _shift(days: Sequence[str], by_days: int) -> list[str]:
    return [
        (datetime.strptime(d, "%Y-%m-%d").date() + timedelta(days=by_days)).isoformat()
        for d in days
    ]


def read_overview(
    config: QuotaConfig,
    backend: SyncBackend,
    *,
    period: str = "day",
    by: str = "cost",
    now: datetime | None = None,
    audit: Sequence[Any] = (),
) -> Overview:
    """Read the overview at ``now`` (default: now). ``audit`` are the newest audit entries
    (``_audit.AuditEntry``), for the blocks and overrides made this week."""
    if period not in PERIODS:
        raise invalid("period", "period must be day, week or month")
    if by not in METRICS:
        raise invalid("by", "by must be cost, tokens or requests")
    now = now or datetime.now(UTC)
    zone = config.plan(None).timezone
    ids: dict[str, tuple[str, list[str]]] = {p: period_days(config, p, now, zone) for p in PERIODS}
    today = ids["day"][1][-1]
    chart = [_shift([today], -(CHART_DAYS - 1 - i))[0] for i in range(CHART_DAYS)]
    week_days = ids["week"][1]
    before_days = _shift(week_days, -7)
    wanted = sorted(set(chart) | set(ids["month"][1]) | set(week_days) | set(before_days))
    daily = daily_totals(backend, config, wanted)
    spend = tuple(
        Spend(p, ids[p][0], _day_cost(daily, ids[p][1]), _day_requests(daily, ids[p][1]))
        for p in PERIODS
    )
    budgets = tuple(app_budget_status(backend, config, now=now))
    days = ids[period][1]
    top, count = ranked(backend, config, days, by=by, limit=TOP)
    tenants = tuple(ranked_tenants(backend, config, days, limit=10))
    events = outbox_events(backend, config.storage.prefix, OUTBOX_READ)
    events.reverse()  # newest first
    alerts = tuple(e for e in events if e.type != "spike")[:8]
    spikes = tuple(e for e in events if e.type == "spike")[:8]
    week = _week_changes(config, backend, daily, week_days, before_days, audit,
                         top if (period, by) == ("week", "cost") else None)  # fmt: skip
    return Overview(
        now=now, spend=spend, budgets=budgets, chart_days=tuple(chart), daily=daily,
        period=period, by=by, period_id=ids[period][0], top=tuple(top),
        callers_in_period=count, tenants=tenants, tenants_total=_day_cost(daily, days),
        alerts=alerts, spikes=spikes, week=week,
    )  # fmt: skip


def _usage_key(prefix: str, row: CallerTotals, day: str) -> str:
    # the ranking's member is the caller's hash tag without its braces (``base._keys``)
    return f"{prefix}:{{{row.tenant}:{row.caller}}}:u:{day}"


def _week_changes(
    config: QuotaConfig,
    backend: SyncBackend,
    daily: Mapping[str, Mapping[str, Counters]],
    days: Sequence[str],
    before: Sequence[str],
    audit: Sequence[Any],
    top_week: Sequence[CallerTotals] | None,
) -> WeekChanges:
    if top_week is None:
        top_week, _ = ranked(backend, config, days, by="cost", limit=TOP)
    top_before, _ = ranked(backend, config, before, by="cost", limit=10)
    was_top = {(r.tenant, r.caller) for r in top_before}
    new = tuple(r for r in top_week[:10] if (r.tenant, r.caller) not in was_top)
    # the same days of last week for each of this week's top callers: one read per caller-day
    prefix = config.storage.prefix
    keys = [_usage_key(prefix, r, d) for r in top_week for d in before]
    hashes = read_hashes(backend, keys) if keys else []
    growers: list[Grower] = []
    for i, row in enumerate(top_week):
        spent = sum(
            v
            for fields in hashes[i * len(before) : (i + 1) * len(before)]
            for name, v in fields.items()
            if name.endswith("|cost")
        )
        if row.cost_micros > spent:
            growers.append(Grower(row, spent))
    growers.sort(key=lambda g: g.before - g.caller.cost_micros)
    start = datetime.strptime(days[0], "%Y-%m-%d").replace(tzinfo=UTC).timestamp()
    changes = []
    for entry in audit:
        action = str(getattr(entry, "action", ""))
        at = float(getattr(entry, "at", 0) or 0)
        if at < start or not action.startswith(("block", "unblock", "override", "budget")):
            continue
        changes.append(Change(at, str(entry.who), action, str(entry.target), _detail(entry)))
    return WeekChanges(
        days=tuple(days), before_days=tuple(before), spend=_day_cost(daily, days),
        spend_before=_day_cost(daily, before), new_in_top=new, growers=tuple(growers[:5]),
        changes=tuple(sorted(changes, key=lambda c: -c.at)[:10]),
    )  # fmt: skip


def _detail(entry: Any) -> str:
    after = getattr(entry, "after", None)
    if isinstance(after, Mapping):
        bits = []
        for key in ("scope", "reason", "value", "name", "limit", "until"):
            value = after.get(key)
            if value not in (None, ""):
                if key == "until" and isinstance(value, int | float):
                    value = when(value)
                bits.append(f"{key} {value}")
        return ", ".join(bits)
    return "" if after is None else str(after)[:120]


@dataclass(frozen=True, slots=True)
class CallerView:
    """Everything the drill-down shows of one caller, read at ``now``."""

    tenant: str
    caller: str
    plan: str
    plans: tuple[str, ...]
    now: datetime
    days: tuple[str, ...]
    records: tuple[UsageRecord, ...]
    remaining: tuple[Remaining, ...]
    state: State
    #: the plan's limits that can be overridden: (name, kind, the plan's value as text)
    limits: tuple[tuple[str, str, str], ...]
    notice: str | None = None
    error: str | None = None
    form: Mapping[str, str] = field(default_factory=dict)


def read_caller(
    config: QuotaConfig,
    backend: SyncBackend,
    tenant: str,
    caller: str,
    *,
    plan: str | None = None,
    now: datetime | None = None,
    controls: Controls | None = None,
) -> CallerView:
    """Read one caller's drill-down; ``plan`` is the plan to judge what is left by (the store
    does not know which plan a caller has: the identity decides that per request)."""
    if plan is not None and plan not in {p.name for p in config.plans}:
        raise invalid("plan", "no plan of that name in the policy")
    p = config.plan(plan)
    now = now or datetime.now(UTC)
    reader = UsageReader(config, backend)
    records = reader.usage(caller, tenant=tenant, days=CHART_DAYS, plan=p.name, now=now)
    remaining = reader.remaining(caller, tenant=tenant, plan=p.name, now=now)
    state = (controls or Controls(config, backend)).show(caller, tenant=tenant)
    today = now.astimezone(p.zone).date()
    days = tuple(
        (today - timedelta(days=CHART_DAYS - 1 - i)).isoformat() for i in range(CHART_DAYS)
    )
    limits = tuple((str(lim.name), str(lim.kind), _limit_text(lim)) for lim in p.limits if lim.name)
    return CallerView(
        tenant=tenant, caller=caller, plan=p.name, plans=tuple(x.name for x in config.plans),
        now=now, days=days, records=tuple(records), remaining=tuple(remaining), state=state,
        limits=limits,
    )  # fmt: skip


def _limit_text(lim: Any) -> str:
    if isinstance(lim, Budget):
        return f"${lim.usd:,.2f} per {lim.period}"
    if isinstance(lim, TokenQuota):
        return f"{lim.tokens:,} tokens per {lim.period}"
    rate = getattr(lim, "rate", None)
    if rate is not None:
        return str(rate)
    most = getattr(lim, "max", None)
    return f"{most} at once" if most is not None else ""


# == rendering: pure functions of those values ===================================================
def _q(value: str) -> str:
    return quote(value, safe="")


def caller_href(root: str, tenant: str, caller: str) -> str:
    return f"{root}/ui/callers/{_q(tenant)}/{_q(caller)}"


def _nav(root: str, current: str) -> list[tuple[str, str, bool]]:
    return [("Overview", f"{root}/ui/", current == "overview")]


def _card(title: Child, *body: Child, span: int = 12, extra: Child = None, id_: str = "") -> Safe:
    head = h("div", h("h2", title), extra, class_="card-head")
    return h("section", head, *body, class_=f"card span-{span}" if span < 12 else "card",
             id=id_ or None)  # fmt: skip


def _models(per_day: Mapping[str, Mapping[str, Counters]]) -> list[str]:
    cost: dict[str, int] = {}
    for models in per_day.values():
        for model, c in models.items():
            cost[model] = cost.get(model, 0) + c.cost_micros
    return sorted(cost, key=lambda m: (-cost[m], m))


def _series(
    days: Sequence[str],
    per_day: Mapping[str, Mapping[str, Counters]],
    value: Callable[[Counters], float],
) -> list[Series]:
    models = _models({d: per_day.get(d, {}) for d in days})
    shown, rest = models[:MAX_SERIES], models[MAX_SERIES:]
    series = [
        Series(m, [value(per_day.get(d, {}).get(m, Counters())) for d in days]) for m in shown
    ]
    if rest:
        series.append(
            Series(
                f"other ({len(rest)})",
                [sum(value(per_day.get(d, {}).get(m, Counters())) for m in rest) for d in days],
                color="#9aa3b2",
            )
        )
    return series


def _usd(micros: float) -> str:
    # the axis and tooltips: dollars, cents when they matter
    usd = micros / 1_000_000
    if usd == 0:
        return "$0"
    return f"${usd:,.0f}" if abs(usd) >= 100 else f"${usd:,.2f}"


def _short_day(day: str) -> str:
    return day[5:]


def _spend_chart(
    days: Sequence[str],
    per_day: Mapping[str, Mapping[str, Counters]],
    *,
    title: str,
    id_: str,
    width: int,
) -> tuple[Safe, list[Series]]:
    series = _series(days, per_day, lambda c: c.cost_micros)
    chart = stacked_bars(days, series, title=title, fmt=_usd, tick_label=_short_day, id_=id_,
                         width=width, height=250)  # fmt: skip
    return chart, series


def _daily_table(
    days: Sequence[str], per_day: Mapping[str, Mapping[str, Counters]], series: Sequence[Series],
    *, id_: str,
) -> Safe:  # fmt: skip
    columns = [Column("day"), Column("requests", True), Column("tokens", True)]
    columns += [Column(s.name, True) for s in series] + [Column("total", True)]
    rows = []
    for i, day in enumerate(reversed(days)):
        k = len(days) - 1 - i
        c = _sum(per_day.get(day, {}).values())
        rows.append([day, num(c["requests"]), num(c["input_tokens"] + c["output_tokens"]),
                     *(money(s.values[k]) for s in series), money(c["cost_micros"])])  # fmt: skip
    total = _sum(x for d in days for x in per_day.get(d, {}).values())
    foot = ["total", num(total["requests"]), num(total["input_tokens"] + total["output_tokens"]),
            *(money(sum(s.values)) for s in series), money(total["cost_micros"])]  # fmt: skip
    return h("div", table(columns, rows, foot=foot, caption="Spend per day and model (USD)",
                          id_=id_), class_="scroll")  # fmt: skip


def _switch(root: str, path: str, params: Mapping[str, str], key: str, values: Sequence[str],
            current: str) -> Safe:  # fmt: skip
    links = []
    for v in values:
        query = urlencode({**params, key: v})
        links.append(h("a", v, href=f"{root}{path}?{query}#top-callers",
                       aria_current="true" if v == current else None))  # fmt: skip
    return h("span", links, class_="switch", aria_label=key)


def _event_text(e: AlertEvent) -> Safe:
    who = None
    if e.caller is not None:
        who = h("strong", e.caller if e.tenant in (None, "default") else f"{e.tenant}/{e.caller}")
    elif e.tenant is not None:
        who = h("strong", f"tenant {e.tenant}")
    else:
        who = h("strong", "app")
    if e.type == "spike":
        what = f" used {num(e.used)} tokens in one hour"
    else:
        value = money(e.used) if e.unit == "usd_micros" else f"{num(e.used)} tokens"
        what = f" reached {e.threshold}% of {e.limit} ({value}) for {e.period}"
    tone = "bad" if (e.threshold or 0) >= 100 else "warn"
    tag = h("span", e.type.replace("_", " "), class_=f"tag {tone}")
    return join(h("time", when(e.at)), tag, " ", who, what)


def _events(events: Sequence[AlertEvent], empty: str) -> Safe:
    if not events:
        return h("p", empty, class_="muted")
    return h("ul", [h("li", _event_text(e)) for e in events], class_="events")


def _budget_block(b: AppBudgetStatus) -> Safe:
    frac = b.spent / b.limit if b.limit > 0 else 1.0
    label = f"{b.name}: {pct(b.percent)} of {money(b.limit)} used"
    tags = [h("span", "hard stop", class_="tag") if b.hard_stop else None]
    if b.override is not None:
        tags.append(h("span", "kill switch" if b.override == 0 else "overridden", class_="tag bad"))
    amount = (money(b.spent), " of ", money(b.limit)) if b.unit == "usd_micros" else (
        num(b.spent), " of ", num(b.limit), " tokens")  # fmt: skip
    return h(
        "div",
        h("div", h("span", h("strong", b.name), " ", tags), h("span", b.period, class_="muted"),
          class_="row"),
        h("div", h("span", amount, class_="num"), h("span", pct(b.percent), class_="num"),
          class_="row"),
        level_bar(frac, label=label),
        h("div", f"resets {when(b.resets_at.timestamp())}", class_="muted small"),
        class_="budget", data_budget=b.name, data_spent=b.spent, data_limit=b.limit,
    )  # fmt: skip


def _delta(now_value: int, before: int) -> Safe:
    if before == 0:
        return h("span", "new this week" if now_value else "no spend", class_="delta muted")
    change = 100.0 * (now_value - before) / before
    arrow = "▲" if change > 0 else "▼" if change < 0 else "="
    tone = "up" if change > 0 else "down" if change < 0 else "muted"
    text = f"{arrow} {abs(change):.0f}% vs last week ({money(before)})"
    return h("span", text, class_="delta " + tone)


def render_overview(o: Overview, *, root: str, who: str | None, csrf: str) -> bytes:
    """The overview page (HTML bytes) of ``o``."""
    week = o.week
    labels = {"day": "Today", "week": "This week", "month": "This month"}
    stats = []
    for s in o.spend:
        extra = _delta(week.spend, week.spend_before) if s.period == "week" else None
        stats.append(
            h(
                "section",
                h("div", labels[s.period], " ", h("span", s.id, class_="muted"), class_="label"),
                h(
                    "div",
                    money(s.micros),
                    class_="value",
                    data_period=s.period,
                    data_micros=s.micros,
                ),
                h("div", f"{num(s.requests)} requests", class_="muted"),
                extra,
                class_="card span-3 stat",
            )  # fmt: skip
        )
    budgets = [_budget_block(b) for b in o.budgets] or [
        h("p", "No app budgets in the policy.", class_="muted")
    ]
    stats.append(_card("App budgets", budgets, span=3, id_="budgets"))

    chart, series = _spend_chart(o.chart_days, o.daily, title="Spend per day, last 30 days",
                                 id_="spend-chart", width=1300)  # fmt: skip
    chart_card = _card(
        "Spend per day by model",
        h("p", f"{o.chart_days[0]} to {o.chart_days[-1]}, all callers", class_="sub"),
        chart, legend(series),
        _daily_table(o.chart_days, o.daily, series, id_="spend-table"),
        id_="spend",
    )  # fmt: skip

    params = {"period": o.period, "by": o.by}
    switches = h("div", _switch(root, "/ui/", params, "period", PERIODS, o.period),
                 _switch(root, "/ui/", params, "by", METRICS, o.by), class_="switches")  # fmt: skip
    top_rows = []
    for i, r in enumerate(o.top, 1):
        name: Child = r.caller
        if not r.hashed:
            name = h("a", r.caller, href=caller_href(root, r.tenant, r.caller))
        else:
            name = join(r.caller, " ", h("span", "digest", class_="tag"))
        share = pct(100.0 * r.estimated / r.requests if r.requests else None)
        top_rows.append([num(i), r.tenant, name, num(r.requests), num(r.total_tokens),
                         money(r.cost_micros), share, ", ".join(r.models)])  # fmt: skip
    top_cols = [Column("#", True), Column("tenant"), Column("caller"), Column("requests", True),
                Column("tokens", True), Column("cost", True), Column("estimated", True),
                Column("models")]  # fmt: skip
    top_card = _card(
        "Top callers",
        h("p", f"{o.period} {o.period_id}, by {o.by}: {num(o.callers_in_period)} callers "
               f"had usage", class_="sub"),  # fmt: skip
        table(top_cols, top_rows, id_="top-table", empty="No usage in this period."),
        span=8, extra=switches, id_="top-callers",
    )  # fmt: skip
    tenant_rows = [
        [t, money(v), pct(100.0 * v / o.tenants_total if o.tenants_total else None)]
        for t, v in o.tenants
    ]
    tenants_card = _card(
        "Tenants",
        h("p", f"{o.period} {o.period_id}, by cost", class_="sub"),
        table([Column("tenant"), Column("cost", True), Column("share", True)], tenant_rows,
              id_="tenant-table", empty="No usage in this period."),
        span=4, id_="tenants",
    )  # fmt: skip
    new_rows = [
        [h("a", r.caller, href=caller_href(root, r.tenant, r.caller)) if not r.hashed
         else r.caller, r.tenant, money(r.cost_micros)]
        for r in week.new_in_top
    ]  # fmt: skip
    grow_rows = [
        [h("a", g.caller.caller, href=caller_href(root, g.caller.tenant, g.caller.caller))
         if not g.caller.hashed else g.caller.caller, money(g.before),
         money(g.caller.cost_micros), "+" + money(g.caller.cost_micros - g.before)]
        for g in week.growers
    ]  # fmt: skip
    change_rows = [[when(c.at), c.who, c.action, c.target, c.detail] for c in week.changes]
    changed = _card(
        "What changed this week",
        h("p", f"{week.days[0]} to {week.days[-1]} against {week.before_days[0]} to "
               f"{week.before_days[-1]}", class_="sub"),  # fmt: skip
        h("dl", h("dt", "spend"), h("dd", money(week.spend), " ",
                                     _delta(week.spend, week.spend_before)),
          class_="facts"),  # fmt: skip
        h("div",
          h("div", h("h3", "New in the top 10"),
            table([Column("caller"), Column("tenant"), Column("cost", True)], new_rows,
                  id_="new-table", empty="Nobody new."), class_="span-4 card-inner"),
          h("div", h("h3", "Biggest growers"),
            table([Column("caller"), Column("last week", True), Column("this week", True),
                   Column("growth", True)], grow_rows, id_="growers-table",
                  empty="Nobody spent more than last week."), class_="span-8 card-inner"),
          class_="grid inner"),
        h("h3", "Blocks and overrides"),
        table([Column("when"), Column("who"), Column("action"), Column("target"),
               Column("details")], change_rows, id_="changes-table",
              empty="None made through the admin app this week."),
        id_="changes",
    )  # fmt: skip
    alerts = _card("Recent alerts", _events(o.alerts, "No alerts."), span=6, id_="alerts")
    spikes = _card("Usage spikes", _events(o.spikes, "No spikes."), span=6, id_="spikes")
    body = join(
        h("h1", "Overview"),
        h("p", f"As of {when(o.now.timestamp())}", class_="sub"),
        h("div", stats, chart_card, top_card, tenants_card, changed, alerts, spikes,
          class_="grid"),
    )  # fmt: skip
    return page("Overview", body, root=root, who=who, csrf=csrf, nav=_nav(root, "overview"))


def _per_day(records: Iterable[UsageRecord]) -> dict[str, dict[str, Counters]]:
    out: dict[str, dict[str, Counters]] = {}
    for r in records:
        out.setdefault(r.day, {})[r.model] = r
    return out


def _hidden(csrf: str) -> Safe:
    return h("input", type="hidden", name="csrf", value=csrf)


def _select(name: str, options: Sequence[tuple[str, str]], chosen: str = "") -> Safe:
    return h("select", [h("option", label, value=v, selected=v == chosen) for v, label in options],
             name=name, id=f"f-{name}")  # fmt: skip


def _controls_card(v: CallerView, action: str, csrf: str) -> Safe:
    st = v.state
    parts: list[Child] = []
    for b, whose in ((st.block, "This caller"), (st.tenant_block, f"Tenant {v.tenant}")):
        if b is None:
            continue
        until = f"until {when(b.until)}" if b.until else "until unblocked"
        scope = "every route" if b.scope == "all" else "AI routes"
        parts.append(h("div", h("strong", f"{whose} is blocked"), f" on {scope}, {until}.",
                       h("br"), "Reason: ", b.reason or "(none given)", class_="blocked",
                       id="block-state" if b is st.block else "tenant-block-state"))  # fmt: skip
    if st.block is not None:
        parts.append(h("form", _hidden(csrf), h("button", "Unblock", type="submit",
                                                 class_="primary", id="unblock"),
                       method="post", action=f"{action}/unblock", class_="stack"))  # fmt: skip
    else:
        form = v.form
        parts.append(h(
            "form", _hidden(csrf),
            h("label", "Reason", h("input", type="text", name="reason", maxlength=500,
                                   value=form.get("reason", ""), id="f-reason",
                                   placeholder="shown to the caller in the 403")),
            h("div", h("label", "Scope", _select("scope", [("all", "every route"),
                                                        ("ai", "AI routes only")],
                                              form.get("scope", "all"))),
              h("label", "For", _select("duration", DURATIONS, form.get("duration", ""))),
              class_="row2"),
            h("button", "Block", type="submit", class_="danger", id="block"),
            method="post", action=f"{action}/block", class_="stack", id="block-form",
        ))  # fmt: skip
    over_rows = [
        [o.name, o.kind, _override_value(o.kind, o.value, o.burst),
         when(o.until) if o.until else "until removed",
         h("form", _hidden(csrf), h("input", type="hidden", name="name", value=o.name),
           h("button", "Remove", type="submit", class_="plain"),
           method="post", action=f"{action}/unset", class_="inline")]
        for o in st.overrides
    ]  # fmt: skip
    cols = [Column("limit"), Column("kind"), Column("value", True), Column("ends"), Column("")]
    choices = [(name, f"{name} ({text})") for name, _kind, text in v.limits]
    form = v.form
    override_form = h(
        "form", _hidden(csrf),
        h("div", h("label", "Limit", _select("name", choices, form.get("name", ""))),
          h("label", "New value", h("input", type="text", name="value", required=True,
                                    value=form.get("value", ""), id="f-value",
                                    placeholder="USD, tokens, or a rate like 5/second")),
          class_="row2"),
        h("label", "For", _select("expires", DURATIONS, form.get("expires", ""))),
        h("button", "Set override", type="submit", class_="primary", id="override"),
        method="post", action=f"{action}/override", class_="stack", id="override-form",
    )  # fmt: skip
    return _card(
        "Controls", parts, h("h3", "Overrides"),
        table(cols, over_rows, id_="overrides-table", empty="No overrides: the plan applies."),
        override_form if choices else h("p", "The plan has no named limits.", class_="muted"),
        span=5, id_="controls",
    )  # fmt: skip


def _override_value(kind: str, value: float, burst: int | None) -> str:
    if kind == "budget":
        return f"${value:,.2f}"
    if kind in ("requests", "tokens"):
        per = f"{value:,.3g}/second"
        return per + (f", burst {burst}" if burst else "")
    return num(value)


def _remaining_block(rem: Remaining) -> Safe:
    frac = rem.used / rem.limit if rem.limit > 0 else 1.0
    amount = money if rem.unit == "usd_micros" else num
    return h(
        "div",
        h("div", h("strong", rem.name), h("span", rem.period, class_="muted"), class_="row"),
        h("div", h("span", amount(rem.used), " of ", amount(rem.limit), class_="num"),
          h("span", amount(rem.remaining), " left", class_="num"), class_="row"),
        level_bar(frac, label=f"{rem.name}: {pct(100 * frac)} used"),
        h("div", f"{pct(100 * frac)} used · resets {when(rem.resets_at.timestamp())}",
          class_="muted small"),
        class_="budget", data_limit=rem.name, data_used=rem.used, data_allowed=rem.limit,
    )  # fmt: skip


def render_caller(v: CallerView, *, root: str, who: str | None, csrf: str) -> bytes:
    """The drill-down page (HTML bytes) of ``v``."""
    href = caller_href(root, v.tenant, v.caller)
    per_day = _per_day(v.records)
    chart, series = _spend_chart(v.days, per_day, title=f"{v.caller}: spend per day",
                                 id_="caller-chart", width=860)  # fmt: skip
    total = _sum(v.records)
    requests = total["requests"]
    share = 100.0 * total["estimated"] / requests if requests else None
    facts = h(
        "dl",
        h("dt", "tenant"), h("dd", v.tenant),
        h("dt", "requests"), h("dd", num(requests), id="caller-requests"),
        h("dt", "tokens"), h("dd", num(total["input_tokens"] + total["output_tokens"])),
        h("dt", "spend"), h("dd", money(total["cost_micros"]), id="caller-cost",
                            data_micros=total["cost_micros"]),
        h("dt", "estimated"), h("dd", f"{num(total['estimated'])} of {num(requests)} requests ",
                                f"({pct(share)})", id="caller-estimated"),
        h("dt", "errors"), h("dd", num(total["errors"])),
        class_="facts",
    )  # fmt: skip
    models: dict[str, list[UsageRecord]] = {}
    for r in v.records:
        models.setdefault(r.model, []).append(r)
    model_rows = []
    for model, recs in sorted(models.items(), key=lambda kv: -sum(r.cost_micros for r in kv[1])):
        c = _sum(recs)
        est = pct(100.0 * c["estimated"] / c["requests"] if c["requests"] else None)
        model_rows.append([model, num(c["requests"]), num(c["input_tokens"]),
                           num(c["cached_tokens"]), num(c["output_tokens"]),
                           num(c["reasoning_tokens"]), money(c["cost_micros"]), est])  # fmt: skip
    model_cols = [Column("model"), Column("requests", True), Column("input", True),
                  Column("cached", True), Column("output", True), Column("reasoning", True),
                  Column("cost", True), Column("estimated", True)]  # fmt: skip
    left = [_remaining_block(rem) for rem in v.remaining] or [
        h("p", "The plan has no token quotas or budgets.", class_="muted")
    ]
    plan_links = None
    if len(v.plans) > 1:
        plan_links = h("span", [h("a", p, href=f"{href}?{urlencode({'plan': p})}",
                                  aria_current="true" if p == v.plan else None)
                                for p in v.plans], class_="switch", aria_label="plan")  # fmt: skip
    notices = []
    if v.notice:
        notices.append(h("div", v.notice, class_="notice ok", role="status", id="notice"))
    if v.error:
        notices.append(h("div", v.error, class_="notice error", role="alert", id="error"))
    body = join(
        h("p", h("a", "← Overview", href=f"{root}/ui/"), class_="muted"),
        h("h1", v.caller),
        h("p", f"tenant {v.tenant} · plan {v.plan} · last {CHART_DAYS} days to {v.days[-1]}",
          class_="sub"),  # fmt: skip
        notices,
        h("div",
          _card("Spend per day", chart, legend(series),
                _daily_table(v.days, per_day, series, id_="caller-table"), span=8,
                id_="caller-spend"),
          _card("Summary", facts, h("div", h("h3", "What is left"), plan_links,
                                    class_="card-head"),
                h("div", left, id="remaining"), span=4, id_="summary"),
          _card("Per model", table(model_cols, model_rows, id_="models-table",
                                   empty="No usage in the last 30 days."), span=7, id_="models"),
          _controls_card(v, href, csrf),
          class_="grid"),
    )  # fmt: skip
    return page(v.caller, body, root=root, who=who, csrf=csrf, nav=_nav(root, "caller"))


def render_login(root: str, *, next_: str, failed: bool) -> bytes:
    """The sign-in page: a form posting the admin token to the admin app's ``POST /login``."""
    body = h(
        "section",
        h("h1", "Sign in"),
        h("p", "Paste an admin token (or an admin JWT). It is sent once; the browser keeps a "
               "signed session cookie, not the token.", class_="muted"),  # fmt: skip
        h("div", "That token was not accepted.", class_="notice error", role="alert")
        if failed else None,
        h("form",
          h("label", "Admin token", h("input", type="password", name="token", required=True,
                                      autocomplete="current-password", id="f-token",
                                      autofocus=True)),
          h("input", type="hidden", name="next", value=next_),
          h("button", "Sign in", type="submit", class_="primary", id="sign-in"),
          method="post", action=f"{root}/login", class_="stack"),
        class_="card login",
    )  # fmt: skip
    return page("Sign in", body, root=root)


# == the routes ==================================================================================
def _html(body: bytes, status: int = 200) -> Response:
    headers = [("content-security-policy", _CSP), ("referrer-policy", "same-origin")]
    return Response(status, "text/html; charset=utf-8", body, headers)


def _redirect(location: str) -> Response:
    return Response(303, "text/plain; charset=utf-8", b"", [("location", location)])


def _who(req: Request) -> tuple[str | None, str]:
    admin = req.admin
    if admin is None:
        return None, ""
    return admin.who, admin.csrf


def _to_login(req: Request, ctx: AdminContext) -> Response:
    """An unauthenticated browser is sent to the sign-in page, and back here after it."""
    target = req.root + req.path
    if req.method == "GET" and req.query:
        target += "?" + urlencode(dict(req.query))
    if req.method != "GET":
        target = req.root + "/ui/"
    return _redirect(f"{req.root}/login?{urlencode({'next': target})}")


def login_page(req: Request, ctx: AdminContext) -> Response:
    nxt = req.query.get("next", "")
    root = req.root
    if not nxt.startswith((root + "/ui/", root + "/ui")) or nxt.startswith("//"):
        nxt = f"{root}/ui/"
    return _html(render_login(root, next_=nxt, failed=req.query.get("failed") == "1"))


def overview(req: Request, ctx: AdminContext) -> Response:
    period = req.query.get("period", "day")
    by = req.query.get("by", "cost")
    log = getattr(ctx, "audit", None)
    audit = log.recent(AUDIT_READ) if log is not None else ()
    o = read_overview(ctx.config, ctx.backend, period=period, by=by, audit=audit)
    who, csrf = _who(req)
    return _html(render_overview(o, root=req.root, who=who, csrf=csrf))


def _ids(req: Request) -> tuple[str, str]:
    tenant, caller = req.params["tenant"], req.params["caller"]
    if not caller or len(caller) > 512:
        raise invalid("caller", "a caller id of 1 to 512 characters")
    if not tenant or len(tenant) > 512:
        raise invalid("tenant", "a tenant id of 1 to 512 characters")
    return tenant, caller


def _caller_page(
    req: Request,
    ctx: AdminContext,
    *,
    status: int = 200,
    notice: str | None = None,
    error: str | None = None,
    form: Mapping[str, str] | None = None,
) -> Response:
    tenant, caller = _ids(req)
    plan = req.query.get("plan") or None
    v = read_caller(ctx.config, ctx.backend, tenant, caller, plan=plan, controls=ctx.controls)
    if notice or error or form:
        v = CallerView(**{**{f: getattr(v, f) for f in CallerView.__dataclass_fields__},
                          "notice": notice, "error": error, "form": dict(form or {})})  # fmt: skip
    who, csrf = _who(req)
    return _html(render_caller(v, root=req.root, who=who, csrf=csrf), status)


def caller_page(req: Request, ctx: AdminContext) -> Response:
    done = req.query.get("done")
    return _caller_page(req, ctx, notice=_DONE.get(done or ""))


def _seconds(form: Mapping[str, str], name: str) -> float | None:
    raw = form.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise invalid(name, f"{name} must be a number of seconds") from None
    if not 0 < value <= 10 * 365 * 86400:
        raise invalid(name, f"{name} must be a positive number of seconds (at most 10 years)")
    return value


def _form_action(
    name: str, act: Callable[[Request, AdminContext, str, str, Mapping[str, str]], None]
) -> Callable[[Request, AdminContext], Response]:
    """A form's POST handler: the admin app has checked the session and CSRF token; ``act``
    makes the change through the audited operations; then 303 to the caller's page (a reload
    does not post again). Bad input renders the page again with the error, as a 400."""

    def handler(req: Request, ctx: AdminContext) -> Response:
        tenant, caller = _ids(req)
        form = req.form()
        try:
            act(req, ctx, tenant, caller, form)
        except HTTPError as e:
            if e.status != 400:
                raise
            return _caller_page(req, ctx, status=400, error=e.message or "invalid input",
                                form=form)  # fmt: skip
        except InvalidArgument as e:
            return _caller_page(req, ctx, status=400, error=str(e), form=form)
        return _redirect(f"{caller_href(req.root, tenant, caller)}?done={name}")

    handler.__name__ = f"form_{name}"
    return handler


def _ops() -> Any:
    import importlib

    return importlib.import_module("quota_middleware.admin._ops")


def _block(
    req: Request, ctx: AdminContext, tenant: str, caller: str, form: Mapping[str, str]
) -> None:
    scope = form.get("scope", "all")
    if scope not in ("all", "ai"):
        raise invalid("scope", "scope must be all or ai")
    reason = form.get("reason", "")
    if len(reason) > 500:
        raise invalid("reason", "the reason is at most 500 characters")
    _ops().block(ctx, req, tenant=tenant, caller=caller, reason=reason, scope=scope,
                 duration=_seconds(form, "duration"))  # fmt: skip


def _unblock(
    req: Request, ctx: AdminContext, tenant: str, caller: str, form: Mapping[str, str]
) -> None:
    _ops().unblock(ctx, req, tenant=tenant, caller=caller)


def _override(
    req: Request, ctx: AdminContext, tenant: str, caller: str, form: Mapping[str, str]
) -> None:
    name, value = form.get("name", ""), form.get("value", "").strip()
    if not name:
        raise invalid("name", "choose a limit")
    if not value:
        raise invalid("value", "give the limit's new value")
    _ops().set_override(ctx, req, tenant=tenant, caller=caller, name=name, value=value,
                        expires=_seconds(form, "expires"))  # fmt: skip


def _unset(
    req: Request, ctx: AdminContext, tenant: str, caller: str, form: Mapping[str, str]
) -> None:
    name = form.get("name", "")
    if not name:
        raise invalid("name", "which override to remove")
    _ops().unset_override(ctx, req, tenant=tenant, caller=caller, name=name)


@cache
def _asset(name: str) -> bytes:
    return resources.files("quota_middleware.admin").joinpath("assets", name).read_bytes()


def asset(req: Request, ctx: AdminContext) -> Response:
    name = req.params["name"]
    kind = _ASSETS.get(name)
    if kind is None:
        raise HTTPError(404, "not_found")
    # shipped with the package: the same bytes until the next release
    return Response(200, kind, _asset(name), [("cache-control", "public, max-age=3600")])


def home(req: Request, ctx: AdminContext) -> Response:
    return _redirect(f"{req.root}/ui/")


def register(router: Router) -> None:
    """Add the dashboard's routes to the admin app's ``router``."""
    router.add("GET", "/login", login_page, public=True)
    router.add("GET", "/ui/assets/{name}", asset, public=True)
    router.add("GET", "/ui", home, unauthorized=_to_login)
    router.add("GET", "/ui/", overview, unauthorized=_to_login)
    base = "/ui/callers/{tenant}/{caller}"
    router.add("GET", base, caller_page, unauthorized=_to_login)
    for name, act in (("block", _block), ("unblock", _unblock), ("override", _override),
                      ("unset", _unset)):  # fmt: skip
        router.add("POST", f"{base}/{name}", _form_action(name, act), unauthorized=_to_login)
