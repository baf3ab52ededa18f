"""A month of usage for N callers, written through the real admit and settle path.

Every request goes through :class:`~quota_middleware.core._engine.Engine` on a frozen clock set
to the moment the request "happened": admit (reservations, the app budgets' gate), then settle
with the usage a provider would have reported, priced by the engine's own price table. So the
store ends up with exactly what live traffic leaves behind: each caller's usage hashes and
period counters, the app's rollups (daily totals, the caller and tenant rankings), the app
budgets' spend, and the threshold and spike alerts in the outbox (dated when they fired).

The traffic is deterministic for a ``seed``: a long tail of callers (a few heavy ones, many
light ones), weekdays busier than weekends, each caller mostly on one model, a few callers that
only start in the last days (new in the top), a few that grow this week, and one burst that
fires a usage spike on the last day. The dashboard tests, its benchmark and the weekly digest
read it.

    cfg = seed_config()
    seeded = seed_month(backend, cfg, callers=50)
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from quota_middleware import AIRoute, Budget, Plan, QuotaConfig, RequestRate, TokenQuota
from quota_middleware.base._flows import drive_sync
from quota_middleware.base._protocols import SyncBackend
from quota_middleware.base._request import Headers, RequestInfo
from quota_middleware.config import AppBudget, SpikeRule
from quota_middleware.core._engine import Engine
from quota_middleware.identity import Caller, IdentityConfig
from quota_middleware.metering._usage import Usage
from quota_middleware.metering.pricing import cost_micros

__all__ = ["MODELS", "PATH", "Seeded", "resolve", "seed_config", "seed_month"]

PATH = "/v1/chat/completions"
#: the models the seeded callers use, most used first
MODELS = ("gpt-4o-mini", "gpt-4o", "claude-sonnet-4-5", "o3-mini")
TENANTS = ("acme", "globex", "initech", "umbrella", "default")


def resolve(info: RequestInfo) -> Caller | None:
    """The seeded callers (and the browser test's API client) say who they are in headers:
    ``X-Caller`` and ``X-Tenant`` (a trusted gateway in front would set them)."""
    caller = info.headers.get("x-caller")
    if not caller:
        return None
    tenant = info.headers.get("x-tenant") or "default"
    return Caller(caller, tenant=tenant, source="custom")


def seed_config(*, prefix: str = "qm", url: str = "memory://", **kw: Any) -> QuotaConfig:
    """The policy the seeded traffic runs under: one plan with a request rate, a daily token
    quota and a monthly USD budget; a daily and a monthly app budget (soft: nothing is
    refused, the dashboard shows how close they are); usage spikes on."""
    from quota_middleware.config import StorageConfig

    plan = Plan(
        name="standard",
        limits=[
            RequestRate(rate="600/minute", name="rpm"),
            TokenQuota(tokens=20_000_000, period="day", name="tokens-day"),
            Budget(usd=4.0, period="month", name="usd-month"),
        ],
    )
    return QuotaConfig(
        plans=[plan],
        ai_routes=[AIRoute(path=PATH, format="openai-chat", default_output_tokens=400)],
        identity=IdentityConfig(resolver=resolve, anonymous="reject"),
        storage=StorageConfig(url=url, prefix=prefix),
        app_budgets=[
            AppBudget(
                usd=kw.pop("app_day_usd", 5.0), period="day", name="app-day", hard_stop=False
            ),
            AppBudget(
                usd=kw.pop("app_month_usd", 100.0),
                period="month",
                name="app-month",
                hard_stop=False,
            ),
        ],  # fmt: skip
        spikes=SpikeRule(multiple=4.0, floor_tokens=200_000, window_hours=24),
        **kw,
    )


@dataclass
class Seeded:
    """What :func:`seed_month` sent (the store holds what it settled)."""

    #: (tenant, caller) of every caller that sent at least one request
    callers: list[tuple[str, str]] = field(default_factory=list)
    #: the days with traffic, oldest first (ISO dates, UTC)
    days: list[str] = field(default_factory=list)
    requests: int = 0
    refused: int = 0
    cost_micros: int = 0
    #: micro-USD settled per day
    per_day: dict[str, int] = field(default_factory=dict)
    #: the caller whose burst on the last day fires a spike
    spiker: tuple[str, str] | None = None


@dataclass(frozen=True)
class _Profile:
    tenant: str
    caller: str
    weight: float
    model: str
    #: the first day index (0 = the oldest day) the caller sends anything
    starts: int
    #: multiplier on the last 7 days (growers > 1)
    growth: float


def _profiles(n: int, days: int, rng: random.Random) -> list[_Profile]:
    out = []
    for i in range(n):
        weight = 1.0 / (i + 1) ** 0.9  # a long tail: caller 0 is the heaviest
        tenant = TENANTS[(i * 7 + i // 3) % len(TENANTS)]
        model = MODELS[min(len(MODELS) - 1, int(rng.random() ** 2.2 * len(MODELS)))]
        starts = 0
        if i % 17 == 5:  # newcomers: only in the last few days
            starts = max(0, days - 1 - rng.randint(2, 4))
            weight *= 6
        growth = 1.0
        if i % 11 == 3:
            growth = 2.5 + rng.random() * 2
        out.append(_Profile(tenant, f"user-{i:05d}", weight, model, starts, growth))
    return out


def _day_factor(day: date) -> float:
    return 0.45 if day.weekday() >= 5 else 1.0


def seed_month(
    backend: SyncBackend,
    config: QuotaConfig,
    *,
    callers: int = 50,
    days: int = 30,
    now: datetime | None = None,
    seed: int = 12,
    requests_per_day: float = 6.0,
    max_per_day: int = 12,
    min_per_day: float = 0.0,
    spike: bool = True,
    share: tuple[int, int] = (0, 1),
) -> Seeded:
    """Send ``days`` days of traffic (the last one being today, up to ``now``) from ``callers``
    callers through the engine on ``backend``. The heaviest caller sends about
    ``requests_per_day`` requests a day (at most ``max_per_day``); the tail sends fewer, down
    to one request on some days; with ``min_per_day`` every caller sends at least that many on
    average (0.3: each caller on about a third of the days).

    Each caller's traffic comes from its own random stream, so ``share=(i, n)`` seeds the
    i-th of n disjoint shares of the callers and n processes together write what one would
    (the benchmark seeds 10,000 callers that way: the seeding is bound by Python's time per
    store call, not by the store)."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    profiles = _profiles(callers, days, random.Random(seed))
    spiker = profiles[min(len(profiles) - 1, 2)] if spike and profiles else None
    index, count = share
    mine = profiles[index::count]
    out = Seeded()
    _seed_share(backend, config, mine, days, now, seed, out, spiker,
                requests_per_day, max_per_day, min_per_day)  # fmt: skip
    if spiker is not None and spiker in mine:
        out.spiker = (spiker.tenant, spiker.caller)
    today = now.date()
    out.days = [(today - timedelta(days=days - 1 - d)).isoformat() for d in range(days)]
    return out


def _seed_share(
    backend: SyncBackend, config: QuotaConfig, profiles: Sequence[_Profile], days: int,
    now: datetime, seed: int, out: Seeded, spiker: _Profile | None, requests_per_day: float,
    max_per_day: int, min_per_day: float,
) -> None:  # fmt: skip
    clock = [0]
    engine = Engine(config, clock=lambda: clock[0])
    rngs = {p.caller: random.Random(f"{seed}:{p.caller}") for p in profiles}
    seen: set[tuple[str, str]] = set()
    today = now.date()
    for d in range(days):
        day = today - timedelta(days=days - 1 - d)
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        end = min(start + timedelta(hours=23, minutes=30), now - timedelta(seconds=30))
        if end <= start:
            end = start + timedelta(seconds=1)
        span = (end - start).total_seconds()
        # (when, caller, size): each request at a moment of the day, sent in time order
        plan: list[tuple[float, _Profile, int]] = []
        for p in profiles:
            if d < p.starts:
                continue
            rng = rngs[p.caller]
            mean = max(min_per_day, requests_per_day * p.weight) * _day_factor(day)
            if d >= days - 7:
                mean *= p.growth
            n = int(mean) + (1 if rng.random() < mean - int(mean) else 0)
            plan += [(rng.random() * span, p, 1) for _ in range(min(max_per_day, n))]
            if p is spiker and d == days - 1:
                # a burst within the day's last hour: many times the caller's hourly average
                plan += [(span - 2400 + 60 * k, p, 8) for k in range(6)]
        plan.sort(key=lambda item: item[0])
        for offset, p, size in plan:
            clock[0] = int((start.timestamp() + offset) * 1_000_000)
            cost = _one_request(engine, backend, p, size, rngs[p.caller])
            if cost is None:
                out.refused += 1
                continue
            out.requests += 1
            out.cost_micros += cost
            out.per_day[day.isoformat()] = out.per_day.get(day.isoformat(), 0) + cost
            seen.add((p.tenant, p.caller))
    out.callers = sorted(seen)


def _one_request(
    engine: Engine, backend: SyncBackend, p: _Profile, size: int, rng: random.Random
) -> int | None:
    """One AI request of ``p`` through admit and settle; its cost, or None when refused."""
    model = p.model if rng.random() < 0.85 else MODELS[rng.randrange(len(MODELS))]
    out_tokens = int(rng.triangular(200, 4000, 900)) * size
    body = json.dumps({
        "model": model, "max_tokens": out_tokens,
        "messages": [{"role": "user", "content": "summarise the report " * rng.randint(2, 30)}],
    }).encode()  # fmt: skip
    headers = Headers([("content-type", "application/json"), ("x-caller", p.caller),
                       ("x-tenant", p.tenant)])  # fmt: skip
    info = RequestInfo("POST", PATH, headers, client="192.0.2.1", body=body)
    decision = drive_sync(engine.admit(info), backend)
    if not decision.allowed or decision.ai is None:
        return None
    prompt = int(rng.triangular(1000, 40_000, 6000)) * size
    cached = prompt // 3 if rng.random() < 0.3 else 0
    # about one request in twelve has no usage from the provider (a cut stream): estimated
    estimated = rng.random() < 0.08
    usage = Usage(
        input_tokens=prompt, output_tokens=out_tokens, cached_tokens=cached, model=model,
        estimated=estimated, reason="incomplete" if estimated else None,
    )  # fmt: skip
    price = decision.ai.price
    cost = cost_micros(usage, price) if price is not None else 0
    drive_sync(engine.settle(decision, usage, cost), backend)
    return cost
