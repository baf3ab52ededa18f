"""``quota-middleware usage``: top callers, one caller's usage, app budgets."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from quota_middleware.cli._common import (
    Col,
    CommandError,
    _iso,
    _n,
    _output_options,
    _store_options,
    _ts,
    _usd,
    emit,
    load_config,
    open_store,
)


# -- usage ---------------------------------------------------------------------------------------
def _usd_fmt(v: Any) -> str:
    return _usd(int(v or 0))


TOP_COLUMNS = (
    Col("tenant", "tenant"),
    Col("caller", "caller"),
    Col("requests", "requests", _n, True),
    Col("input_tokens", "input tok", _n, True),
    Col("output_tokens", "output tok", _n, True),
    Col("total_tokens", "tokens", _n, True),
    Col("cost_micros", "cost USD", _usd_fmt, True),
    Col("estimated", "estimated", _n, True),
    Col("models", "models", lambda v: ",".join(v)),
)
DAY_COLUMNS = (
    Col("day", "day"),
    Col("model", "model"),
    Col("requests", "requests", _n, True),
    Col("input_tokens", "input tok", _n, True),
    Col("cached_tokens", "cached", _n, True),
    Col("output_tokens", "output tok", _n, True),
    Col("reasoning_tokens", "reasoning", _n, True),
    Col("cost_micros", "cost USD", _usd_fmt, True),
    Col("estimated", "estimated", _n, True),
)
APP_COLUMNS = (
    Col("name", "budget"),
    Col("period", "period"),
    Col("spent_micros", "spent", _usd_fmt, True),
    Col("limit_micros", "limit", _usd_fmt, True),
    Col("override_micros", "override", lambda v: "-" if v is None else _usd(v), True),
    Col("percent", "used", lambda v: f"{v:.1f}%", True),
    Col("remaining_micros", "left", _usd_fmt, True),
    Col("hard_stop", "hard stop", lambda v: "yes" if v else "no"),
    Col("resets_at", "resets (UTC)", lambda v: v[:16].replace("T", " ")),
)


def run_usage(args: argparse.Namespace) -> int:
    if args.app:
        return _usage_app(args)
    if args.caller is not None:
        return _usage_caller(args)
    return _usage_top(args)


def _usage_top(args: argparse.Namespace) -> int:
    from quota_middleware.fleet import top_callers

    config = load_config(args)
    if args.timezone is not None:
        _zone_or_error(args.timezone)
    zone = args.timezone or config.plan(None).timezone
    if args.limit < 0:
        raise CommandError("--limit must be >= 0 (0: every caller)")
    limit = args.limit or None
    with open_store(config) as backend:
        rows = top_callers(
            backend,
            config,
            period=args.period,
            by=args.by,
            limit=limit,
            tenant=args.tenant,
            zone=zone,
        )
    records = [
        {
            **dataclasses.asdict(r),
            "total_tokens": r.total_tokens,
            "cost_usd": r.cost_usd,
            "models": list(r.models),
            "days": list(r.days),
            "hashed": r.hashed,
        }
        for r in rows
    ]
    when = "today" if args.period == "day" else "this month"
    if not (args.json or args.csv):
        print(f"top callers {when} by {args.by} ({zone}; prefix {config.storage.prefix})\n")
    emit(args, TOP_COLUMNS, records, empty=f"no usage recorded {when}")
    if records and not (args.json or args.csv):
        cost = sum(r.cost_micros for r in rows)
        tokens = sum(r.total_tokens for r in rows)
        shown = "these callers" if limit is not None and len(rows) == limit else "all"
        print(
            f"\ntotal ({shown}): {sum(r.requests for r in rows):,} requests, "
            f"{tokens:,} tokens, {_usd(cost)}"
        )
        if any(r.hashed for r in rows):
            print("(h-... ids are digests of long or unusual caller ids, as stored in the keys)")
    return 0


def _zone_or_error(name: str) -> None:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise CommandError(f"unknown time zone {name!r}") from None


def _usage_caller(args: argparse.Namespace) -> int:
    from quota_middleware.reports import UsageReader

    config = load_config(args)
    if args.days < 1 or args.days > 366:
        raise CommandError("--days must be between 1 and 366")
    if args.plan is not None and not config.has_plan(args.plan):
        names = ", ".join(p.name for p in config.plans)
        raise CommandError(f"the policy has no plan {args.plan!r} (plans: {names})")
    plan = config.plan(args.plan)
    tenant = args.tenant or "default"
    with open_store(config) as backend:
        reader = UsageReader(config, backend)
        records = reader.usage(args.caller, tenant=tenant, days=args.days, plan=plan.name)
        left = reader.remaining(args.caller, tenant=tenant, plan=plan.name)
    usage = [{**dataclasses.asdict(r), "cost_usd": r.cost_usd} for r in records]
    remaining: list[dict[str, Any]] = [
        {
            "name": q.name,
            "kind": q.kind,
            "period": q.period,
            "unit": q.unit,
            "limit": q.limit,
            "used": q.used,
            "remaining": q.remaining,
            "resets_at": _iso(q.resets_at),
        }
        for q in left
    ]
    if args.json:
        print(
            json.dumps(
                {
                    "caller": args.caller,
                    "tenant": tenant,
                    "plan": plan.name,
                    "days": args.days,
                    "usage": usage,
                    "remaining": remaining,
                },
                indent=2,
            )
        )
        return 0
    if args.csv:
        emit(args, DAY_COLUMNS, usage)
        return 0
    print(
        f"usage of {args.caller} (tenant {tenant}), last {args.days} day(s), "
        f"days in {plan.timezone}\n"
    )
    emit(args, DAY_COLUMNS, usage, empty="no usage recorded")
    if usage:
        print(
            f"\ntotal: {sum(u['requests'] for u in usage):,} requests, "
            f"{sum(u['input_tokens'] + u['output_tokens'] for u in usage):,} tokens, "
            f"{_usd(sum(u['cost_micros'] for u in usage))}"
        )
    if remaining:
        print(
            f"\nwhat is left this period on plan {plan.name} "
            "(pass --plan if the caller is on another plan)\n"
        )
        cols = (
            Col("name", "limit"),
            Col("period", "period"),
            Col("used", "used", str, True),
            Col("remaining", "left", str, True),
            Col("limit", "of", str, True),
            Col("resets_at", "resets (UTC)"),
        )
        shown = [
            {
                **q,
                **{
                    k: (_usd(q[k]) if q["kind"] == "budget" else f"{q[k]:,}")
                    for k in ("used", "remaining", "limit")
                },
                "resets_at": (q["resets_at"] or "")[:16].replace("T", " "),
            }
            for q in remaining
        ]
        emit(args, cols, shown)
    return 0


def _usage_app(args: argparse.Namespace) -> int:
    from quota_middleware.fleet import app_budget_status

    config = load_config(args)
    if not config.app_budgets:
        raise CommandError("the policy has no app budgets ([[app_budgets]]); pass --policy PATH")
    with open_store(config) as backend:
        rows = app_budget_status(backend, config)
    records = [
        {
            "name": s.name,
            "period": s.period,
            "spent_micros": s.spent,
            "limit_micros": s.limit,
            "configured_micros": s.configured,
            "override_micros": s.override,
            "remaining_micros": s.remaining,
            "percent": round(s.percent, 2),
            "spent_out": s.spent_out,
            "hard_stop": s.hard_stop,
            "resets_at": _iso(s.resets_at),
        }
        for s in rows
    ]
    if not (args.json or args.csv):
        print(f"app budgets (every caller; prefix {config.storage.prefix})\n")
    emit(args, APP_COLUMNS, records)
    if not (args.json or args.csv):
        for s in rows:
            if s.spent_out:
                stop = "AI routes answer 429" if s.hard_stop else "alerts only (no hard stop)"
                print(f"\n{s.name} is spent: {stop} until {_ts(s.resets_at)}")
    return 0


def _usage_arguments(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--caller", metavar="ID", help="one caller's usage per day and model, and what is left"
    )
    what.add_argument(
        "--app", action="store_true", help="the app budgets: spent against limit this period"
    )
    p.add_argument(
        "--period",
        choices=("day", "month"),
        default="day",
        help="top callers: today (default) or this calendar month",
    )
    p.add_argument(
        "--by",
        choices=("cost", "tokens", "requests"),
        default="cost",
        help="top callers: rank by (default cost)",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=20,
        metavar="N",
        help="top callers: how many (default 20; 0: all)",
    )
    p.add_argument(
        "--timezone",
        metavar="ZONE",
        help="top callers: the zone of 'today' (default: the default plan's)",
    )
    p.add_argument("--tenant", help="only this tenant (with --caller: the caller's tenant)")
    p.add_argument(
        "--days",
        type=int,
        default=7,
        metavar="N",
        help="with --caller: days back, today included (default 7)",
    )
    p.add_argument("--plan", help="with --caller: the caller's plan (default: the default plan)")
    _output_options(p)
    _store_options(p)
