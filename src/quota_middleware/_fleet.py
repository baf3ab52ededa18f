"""Reports over every caller, for admin tools: SCANs of the whole keyspace, never on the
request path. ``quota-middleware usage top`` and ``usage budgets`` read through these."""

from __future__ import annotations

import re
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase
from typing import Any
from zoneinfo import ZoneInfo

from quota_middleware.backends._memstore import MemoryStore
from quota_middleware.base._flows import drive_sync
from quota_middleware.base._keys import caller_tag, period_name
from quota_middleware.base._protocols import SyncBackend
from quota_middleware.base._scripts import ScriptCall, hash_pairs
from quota_middleware.config import QuotaConfig
from quota_middleware.errors import BackendMismatch, InvalidArgument
from quota_middleware.reports import COUNTER_FIELDS, Counters

__all__ = [
    "AppBudgetStatus",
    "CallerTotals",
    "app_budget_status",
    "read_hashes",
    "scan_keys",
    "top_callers",
]

_TAG_RE = re.compile(r"\{(?P<tag>[^{}]*)\}:u:(?P<day>\d{4}-\d{2}-\d{2})$")
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
    """One app budget in its current period: what was spent against what limit."""

    name: str
    period: str  # the period id: "2026-11-28" or "2026-11"
    spent: int  # micro-USD
    configured: int  # micro-USD, from the policy
    override: int | None  # micro-USD, set by an operator in the store (``<name>:limit``)
    hard_stop: bool
    resets_at: datetime

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


def _period_days(
    config: QuotaConfig, period: str, now: datetime | None, zone: str | None
) -> tuple[str, list[str]]:
    tz = ZoneInfo(zone) if zone is not None else config.plan(None).zone
    today = (now or datetime.now(UTC)).astimezone(tz).date()
    if period == "day":
        return today.isoformat(), [today.isoformat()]
    first = today.replace(day=1)
    days = [(first + timedelta(days=i)).isoformat() for i in range((today - first).days + 1)]
    return f"{today:%Y-%m}", days


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
    pid, days = _period_days(config, period, now, zone)
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
    backend: SyncBackend, config: QuotaConfig, *, now: datetime | None = None
) -> list[AppBudgetStatus]:
    """Each app budget of ``config`` in its current period: spent, the configured limit and any
    operator override (``<name>:limit`` on the period key), in one ``read`` per period key."""
    from quota_middleware.core._engine import Engine

    if not config.app_budgets:
        return []
    engine = Engine(config)
    now_us = int((now or datetime.now(UTC)).timestamp() * 1_000_000)
    where = [(b, *engine.app_period_key(b, now_us)) for b in config.app_budgets]
    key_names = tuple(sorted({key for _, key, _ in where}))
    reply = drive_sync(_read_flow(key_names), backend)
    values = {k: hash_pairs(flat) for k, flat in zip(key_names, reply, strict=False)}
    out = []
    for b, key, end_us in where:
        assert b.name is not None
        fields = values.get(key, {})
        out.append(
            AppBudgetStatus(
                name=b.name,
                period=period_name(key),
                spent=fields.get(b.name, 0),
                configured=b.micros,
                override=fields.get(f"{b.name}:limit"),
                hard_stop=b.hard_stop,
                resets_at=datetime.fromtimestamp(end_us / 1_000_000, UTC),
            )
        )
    return out


def _read_flow(keys: tuple[str, ...]) -> Generator[ScriptCall, Any, Any]:
    reply = yield ScriptCall("read", keys, ())
    return reply
