"""Reports over every caller, for admin tools, never on the request path: the app's rollups
(:func:`ranked`, :func:`daily_totals`, :func:`ranked_tenants`: a few keys whatever the number of
callers), the shared budgets (:func:`app_budget_status`: the app's and the tenants'), and SCANs
of the whole keyspace (:func:`top_callers`, :func:`scan_keys`) for what the rollups do not keep.
``quota-middleware usage top`` and ``usage budgets`` read through these."""

from __future__ import annotations

import re
import uuid
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase
from typing import Any
from zoneinfo import ZoneInfo

from quota_middleware.backends._memstore import MemoryStore
from quota_middleware.base._flows import drive_sync
from quota_middleware.base._keys import (
    AppKeys,
    caller_base,
    caller_tag,
    period_name,
    tenant_member,
)
from quota_middleware.base._protocols import SyncBackend
from quota_middleware.base._scripts import ScriptCall, as_str, hash_pairs
from quota_middleware.config import QuotaConfig
from quota_middleware.errors import BackendMismatch, InvalidArgument
from quota_middleware.reports import COUNTER_FIELDS, Counters

__all__ = [
    "AppBudgetStatus",
    "CallerTotals",
    "app_budget_status",
    "daily_totals",
    "period_days",
    "ranked",
    "ranked_tenants",
    "read_hashes",
    "scan_keys",
    "top_callers",
]

# a usage key's caller tag, after the tenant's tag when keys are tagged by tenant
_TAG_RE = re.compile(r"(?:\{[^{}:]*\})?\{(?P<tag>[^{}]*)\}:u:(?P<day>\d{4}-\d{2}-\d{2})$")
_HASHED_RE = re.compile(r"h-[0-9a-f]{32}")
_SCAN_COUNT = 1000
_READ_BATCH = 500


@dataclass(frozen=True, slots=True, kw_only=True)
class CallerTotals(Counters):
    """One caller's usage summed over the days of a period and every model.

    ``tenant`` and ``caller`` are read back from the key's hash tag: ids that were too long or
    unusual are stored as a digest (``h-<32 hex>``, see :attr:`hashed`); a tenant never contains
    ``:`` (such tenants are stored as digests), so the tag splits at its first ``:``.
    """

    tenant: str
    caller: str
    models: tuple[str, ...] = ()
    days: tuple[str, ...] = ()

    @property
    def hashed(self) -> bool:
        """True when the tenant or caller id is a digest of the real id, not the id itself."""
        return bool(_HASHED_RE.fullmatch(self.caller) or _HASHED_RE.fullmatch(self.tenant))


@dataclass(frozen=True, slots=True)
class AppBudgetStatus:
    """One shared budget (an app budget, or a tenant's budget or token quota) in its current
    period: what was spent against what limit (micro-USD, or tokens when ``unit`` says so)."""

    name: str
    period: str  # the period id: "2026-11-28" or "2026-11"
    spent: int  # micro-USD
    configured: int  # micro-USD, from the policy
    override: int | None  # micro-USD, set by an operator in the store (``<name>:limit``)
    hard_stop: bool
    resets_at: datetime
    #: the tenant whose counter this is (None: the app's)
    tenant: str | None = None
    unit: str = "usd_micros"

    @property
    def limit(self) -> int:
        return self.configured if self.override is None else self.override

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.spent)

    @property
    def percent(self) -> float:
        return 100.0 * self.spent / self.limit if self.limit > 0 else 100.0

    @property
    def spent_out(self) -> bool:
        return self.spent >= self.limit


def _redis_client(source: Any) -> Any:
    """The sync redis-py client of ``source`` (a client or a ``SyncRedisBackend``)."""
    client = source if hasattr(source, "scan_iter") else getattr(source, "client", None)
    if not hasattr(client, "scan_iter") or not hasattr(client, "pipeline"):
        raise BackendMismatch(f"need a sync redis client or backend, got {type(source).__name__}")
    from redis.asyncio import Redis as AsyncRedis
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

    if isinstance(client, AsyncRedis | AsyncRedisCluster):
        raise BackendMismatch("need a sync redis client, not a redis.asyncio one")
    return client


def scan_keys(source: Any, match: str) -> list[str]:
    """Every key matching the glob ``match``: SCAN on Redis (every primary of a cluster), or the
    memory backend's store. Admin tools only: a scan walks the whole keyspace."""
    store = getattr(source, "store", None)
    if isinstance(store, MemoryStore):
        return sorted(k for k in list(store.data) if fnmatchcase(k, match) and store.exists(k))
    client = _redis_client(source)
    from redis.cluster import RedisCluster

    if isinstance(client, RedisCluster):
        it = client.scan_iter(match=match, count=_SCAN_COUNT, target_nodes=RedisCluster.PRIMARIES)
    else:
        it = client.scan_iter(match=match, count=_SCAN_COUNT)
    return sorted({k.decode() if isinstance(k, bytes) else str(k) for k in it})


def read_hashes(source: Any, keys: Sequence[str]) -> list[dict[str, int]]:
    """HGETALL of each key (integer fields only), in batches: pipelined on Redis (keys may be in
    different cluster slots), through the ``read`` script on the memory backend."""
    out: list[dict[str, int]] = []
    store = getattr(source, "store", None)
    for i in range(0, len(keys), _READ_BATCH):
        batch = list(keys[i : i + _READ_BATCH])
        if isinstance(store, MemoryStore):
            replies = source.run(ScriptCall("read", tuple(batch), ()))
            out += [hash_pairs(flat) for flat in replies]
            continue
        pipe = _redis_client(source).pipeline(transaction=False)
        for key in batch:
            pipe.hgetall(key)
        for h in pipe.execute():
            flat: list[Any] = []
            for f, v in h.items():
                flat += [f, v]
            out.append(hash_pairs(flat))
    return out


def period_days(
    config: QuotaConfig,
    period: str = "day",
    now: datetime | None = None,
    zone: str | None = None,
) -> tuple[str, list[str]]:
    """The id of the ``day``, ISO ``week`` (Monday first) or calendar ``month`` that holds
    ``now`` (default: now) in ``zone`` (default: the default plan's time zone), and its days so
    far: ``("2026-12-03", [...])``, ``("2026-W49", [...])``, ``("2026-12", [...])``."""
    tz = ZoneInfo(zone) if zone is not None else config.plan(None).zone
    today = (now or datetime.now(UTC)).astimezone(tz).date()
    if period == "day":
        return today.isoformat(), [today.isoformat()]
    if period == "week":
        first = today - timedelta(days=today.weekday())
        year, week, _ = today.isocalendar()
        pid = f"{year}-W{week:02d}"
    elif period == "month":
        first = today.replace(day=1)
        pid = f"{today:%Y-%m}"
    else:
        raise InvalidArgument("period must be 'day', 'week' or 'month'")
    days = [(first + timedelta(days=i)).isoformat() for i in range((today - first).days + 1)]
    return pid, days


def top_callers(
    source: Any,
    config: QuotaConfig,
    *,
    period: str = "day",
    by: str = "cost",
    limit: int | None = 20,
    tenant: str | None = None,
    now: datetime | None = None,
    zone: str | None = None,
) -> list[CallerTotals]:
    """The callers with the most usage today (``period="day"``) or this calendar month so far
    (``"month"``), by ``cost``, ``tokens`` (input + output) or ``requests``; ``limit`` None for
    all of them. Days are those of ``zone`` (default: the default plan's time zone).

    ``source`` is a sync redis-py client (``Redis`` or ``RedisCluster``), a ``SyncRedisBackend``
    or a ``MemoryBackend``. It SCANs for the usage keys (``{prefix}:{*}:u:<day>``) on every
    primary: meant for admin tools and reports, never for the request path.
    """
    if period not in ("day", "month"):
        raise InvalidArgument("period must be 'day' or 'month'")
    if by not in ("cost", "tokens", "requests"):
        raise InvalidArgument("by must be 'cost', 'tokens' or 'requests'")
    if limit is not None and limit < 1:
        raise InvalidArgument("limit must be >= 1 (or None for every caller)")
    prefix = config.storage.prefix
    pid, days = period_days(config, period, now, zone)
    wanted = set(days)
    tenant_part = caller_tag(tenant, "x")[1:-3] if tenant is not None else None
    keys: list[str] = []
    for key in scan_keys(source, f"{prefix}:{{*}}:u:{pid}{'-*' if period == 'month' else ''}"):
        m = _TAG_RE.match(key, len(prefix) + 1)
        if m is None or m.group("day") not in wanted:
            continue
        if tenant_part is not None and m.group("tag").split(":", 1)[0] != tenant_part:
            continue
        keys.append(key)
    totals: dict[tuple[str, str], dict[str, Any]] = {}
    for key, fields in zip(keys, read_hashes(source, keys), strict=True):
        m = _TAG_RE.match(key, len(prefix) + 1)
        assert m is not None
        t, _, c = m.group("tag").partition(":")
        acc = totals.setdefault((t, c), {"models": set(), "days": set()})
        for name, value in fields.items():
            model, _, counter = name.rpartition("|")
            attr = COUNTER_FIELDS.get(counter)
            if attr is None:
                continue
            acc[attr] = acc.get(attr, 0) + value
            acc["models"].add(model)
        acc["days"].add(m.group("day"))
    rows = [
        CallerTotals(
            tenant=t,
            caller=c,
            models=tuple(sorted(acc.pop("models"))),
            days=tuple(sorted(acc.pop("days"))),
            **acc,
        )
        for (t, c), acc in totals.items()
    ]

    def score(r: CallerTotals) -> int:
        return {"cost": r.cost_micros, "tokens": r.total_tokens, "requests": r.requests}[by]

    rows.sort(key=lambda r: (-score(r), -r.cost_micros, -r.total_tokens, r.tenant, r.caller))
    return rows if limit is None else rows[:limit]


def app_budget_status(
    backend: SyncBackend,
    config: QuotaConfig,
    *,
    now: datetime | None = None,
    tenants: Sequence[str] = (),
) -> list[AppBudgetStatus]:
    """Each app budget of ``config`` in its current period, then the budgets of each of
    ``tenants``: spent, the configured limit and any operator override (``<name>:limit`` on
    the period key, :meth:`Controls.set_budget`), in one ``read`` of the period keys."""
    from quota_middleware.core._context import Context

    ctx = Context(config)
    now_us = int((now or datetime.now(UTC)).timestamp() * 1_000_000)
    shared = [b for b in ctx.shared_budgets(None, now_us)]
    for tenant in tenants:
        shared += [b for b in ctx.shared_budgets(tenant, now_us) if b.tenant is not None]
    if not shared:
        return []
    key_names = tuple(sorted({b.key for b in shared}))
    reply = drive_sync(_read_flow(key_names), backend)
    values = {k: hash_pairs(flat) for k, flat in zip(key_names, reply, strict=False)}
    out = []
    for b in shared:
        fields = values.get(b.key, {})
        out.append(
            AppBudgetStatus(
                name=b.name,
                period=period_name(b.key),
                spent=fields.get(b.name, 0),
                configured=b.amount,
                override=fields.get(f"{b.name}:limit"),
                hard_stop=b.budget.hard_stop,
                resets_at=datetime.fromtimestamp(b.end_us / 1_000_000, UTC),
                tenant=b.tenant,
                unit="usd_micros" if b.in_usd else "tokens",
            )
        )
    return out


def _read_flow(keys: tuple[str, ...]) -> Generator[ScriptCall, Any, Any]:
    reply = yield ScriptCall("read", keys, ())
    return reply


# -- the app's rollups: written by every settle (``core._settlement``), read without a SCAN ------
_METRICS = ("cost", "tokens", "requests")


def daily_totals(
    backend: SyncBackend, config: QuotaConfig, days: Sequence[str]
) -> dict[str, dict[str, Counters]]:
    """The whole app's usage on each of ``days``, per model (days without usage are absent):
    one read of the app's rollup keys, whatever the number of callers."""
    keys = AppKeys(config.storage.prefix)
    names = tuple(keys.rollup(day) for day in days)
    reply = drive_sync(_read_flow(names), backend) if names else []
    out: dict[str, dict[str, Counters]] = {}
    for day, flat in zip(days, reply, strict=False):
        models = _by_model(hash_pairs(flat))
        if models:
            out[day] = models
    return out


def ranked(
    backend: SyncBackend,
    config: QuotaConfig,
    days: Sequence[str],
    *,
    by: str = "cost",
    limit: int = 20,
    tenant: str | None = None,
) -> tuple[list[CallerTotals], int]:
    """The ``limit`` callers with the most ``cost``, ``tokens`` (input + output) or
    ``requests`` over ``days`` (their full counters summed over those days and every model),
    and how many distinct callers had usage then. Reads the app's rankings (a month's by
    cost is kept whole; other spans are summed by Redis in the same call), then each top
    caller's own usage records: no SCAN. With ``tenant``, only that tenant's callers (the
    ranking is read whole then: meant for tenants of a modest number of callers)."""
    if by not in _METRICS:
        raise InvalidArgument("by must be 'cost', 'tokens' or 'requests'")
    if limit < 1:
        raise InvalidArgument("limit must be >= 1")
    if not days:
        return [], 0
    prefix = config.storage.prefix
    keys = AppKeys(prefix)
    sources = [keys.ranking(day, by) for day in days]
    if by == "cost" and len(days) > 1 and _is_month_so_far(days):
        sources = [keys.ranking(days[0][:7], "cost")]
    want = limit if tenant is None else 1_000_000
    count, top = _rank(backend, keys, sources, want)
    if tenant is not None:
        part = tenant_member(tenant)
        top = [(m, v) for m, v in top if m.split(":", 1)[0] == part]
        count = len(top)
        top = top[:limit]
    members = [m for m, _ in top]
    by_tenant = config.storage.hash_tag == "tenant"
    usage_keys = [f"{caller_base(prefix, m, by_tenant)}:u:{day}" for m in members for day in days]
    hashes = read_hashes(backend, usage_keys)
    rows: list[CallerTotals] = []
    for i, member in enumerate(members):
        acc: dict[str, int] = {}
        models: set[str] = set()
        seen: list[str] = []
        for j, day in enumerate(days):
            fields = hashes[i * len(days) + j]
            if fields:
                seen.append(day)
            for model, counters in _by_model(fields).items():
                models.add(model)
                for attr in COUNTER_FIELDS.values():
                    acc[attr] = acc.get(attr, 0) + getattr(counters, attr)
        t, _, c = member.partition(":")
        rows.append(
            CallerTotals(tenant=t, caller=c, models=tuple(sorted(models)), days=tuple(seen), **acc)
        )
    return rows, count


def ranked_tenants(
    backend: SyncBackend, config: QuotaConfig, days: Sequence[str], *, limit: int = 20
) -> list[tuple[str, int]]:
    """The ``limit`` tenants that spent the most over ``days``: (tenant, micro-USD)."""
    if limit < 1:
        raise InvalidArgument("limit must be >= 1")
    if not days:
        return []
    keys = AppKeys(config.storage.prefix)
    _, top = _rank(backend, keys, [keys.ranking(day, "tenants") for day in days], limit)
    return top


def _month_days(month: str) -> list[str]:
    first = datetime.strptime(month + "-01", "%Y-%m-%d").date()
    out, day = [], first
    while day.month == first.month:
        out.append(day.isoformat())
        day += timedelta(days=1)
    return out


def _is_month_so_far(days: Sequence[str]) -> bool:
    """``days`` are a month's first days, in order, up to today: the month's ranking then
    holds their sum (it has nothing of later days yet). "Today" is the UTC date less one day,
    so a month so far in any zone qualifies; a plan whose zone is ahead of the one the days
    were counted in can have added a few minutes of the next day."""
    month = days[0][:7]
    whole = _month_days(month)
    yesterday = (datetime.now(UTC).date() - timedelta(days=1)).isoformat()
    return list(days) == whole[: len(days)] and days[-1] >= yesterday


def _rank(
    backend: SyncBackend, keys: AppKeys, sources: Sequence[str], limit: int
) -> tuple[int, list[tuple[str, int]]]:
    scratch = f"{keys.base}:r:sum:{uuid.uuid4().hex}"
    reply = drive_sync(_rank_flow((scratch, *sources), limit), backend)
    count, flat = int(reply[0]), reply[1:]
    pairs = [(as_str(flat[i]), int(float(as_str(flat[i + 1])))) for i in range(0, len(flat), 2)]
    return count, pairs


def _rank_flow(keys: tuple[str, ...], limit: int) -> Generator[ScriptCall, Any, Any]:
    reply = yield ScriptCall("rank", keys, (limit,))
    return reply


def _by_model(fields: dict[str, int]) -> dict[str, Counters]:
    acc: dict[str, dict[str, int]] = {}
    for name, value in fields.items():
        model, _, counter = name.rpartition("|")
        attr = COUNTER_FIELDS.get(counter)
        if attr is not None and model:
            acc.setdefault(model, {})[attr] = value
    return {model: Counters(**values) for model, values in sorted(acc.items())}
