"""Reading usage back: a caller's usage per day and model, and what is left of each quota and
budget, for the app to show its own users (and for the CLI). Reports over every caller (SCANs
of the whole keyspace) are admin tooling and live in :mod:`quota_middleware.fleet`.

The same flows serve sync and async code: :class:`UsageReader` methods run them on a sync
backend, the ``a``-prefixed ones on an async backend.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from quota_middleware.base._flows import drive_async, drive_sync
from quota_middleware.base._keys import CallerKeys
from quota_middleware.base._periods import period_of
from quota_middleware.base._protocols import AsyncBackend, SyncBackend
from quota_middleware.base._scripts import ScriptCall, as_str, hash_pairs
from quota_middleware.config import Plan, QuotaConfig
from quota_middleware.errors import BackendMismatch
from quota_middleware.limits import Budget, TokenQuota

#: the usage hash's counter names (``<model>|<counter>``) -> the attributes of :class:`Counters`
COUNTER_FIELDS = {
    "requests": "requests",
    "input": "input_tokens",
    "cached": "cached_tokens",
    "cache_write": "cache_write_tokens",
    "output": "output_tokens",
    "reasoning": "reasoning_tokens",
    "cost": "cost_micros",
    "estimated": "estimated",
    "errors": "errors",
}


@dataclass(frozen=True, slots=True)
class Counters:
    """The usage counters of one caller over some days and models (one usage hash's fields)."""

    requests: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cost_micros: int = 0
    #: how many of the requests were charged from tiktoken estimates, not provider numbers
    estimated: int = 0
    #: how many were upstream errors without usage, charged nothing
    errors: int = 0

    @property
    def cost_usd(self) -> float:
        return self.cost_micros / 1_000_000

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True, kw_only=True)
class UsageRecord(Counters):
    """One caller's usage of one model on one day (in the plan's time zone)."""

    day: str
    model: str


@dataclass(frozen=True, slots=True)
class Remaining:
    """What is left of one token quota or budget in the current period. ``used`` includes the
    reservations of requests still in flight."""

    name: str
    kind: str
    period: str
    limit: int
    used: int
    resets_at: datetime

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)

    @property
    def unit(self) -> str:
        return "usd_micros" if self.kind == "budget" else "tokens"


def _overrides(flat: Any, now_us: int) -> dict[str, int]:
    """``o|<name>`` fields of a controls hash (``"until_us|p1|p2"``) still in force: name -> p1."""
    out: dict[str, int] = {}
    for i in range(0, len(flat) - 1, 2):
        field = as_str(flat[i])
        if not field.startswith("o|"):
            continue
        parts = as_str(flat[i + 1]).split("|")
        try:
            until, p1 = int(parts[0]), int(parts[1])
        except (IndexError, ValueError):
            continue
        if until == 0 or until > now_us:
            out[field[2:]] = p1
    return out


class UsageReader:
    """Reads usage records and remaining quotas for callers of ``config``."""

    def __init__(self, config: QuotaConfig, backend: SyncBackend | AsyncBackend) -> None:
        self.config = config
        self.backend = backend
        self._prefix = config.storage.prefix
        self._by_tenant = config.storage.hash_tag == "tenant"

    # -- flows ----------------------------------------------------------------------------
    def usage_flow(
        self, caller: str, *, tenant: str = "default", days: int = 7, plan: str | None = None,
        now: datetime | None = None,
    ) -> Generator[ScriptCall, Any, list[UsageRecord]]:  # fmt: skip
        zone = self.config.plan(plan).zone
        today = (now or datetime.now(UTC)).astimezone(zone).date()
        day_ids = [(today - timedelta(days=i)).isoformat() for i in range(max(1, days))]
        keys = CallerKeys(self._prefix, tenant, caller, self._by_tenant)
        reply = yield ScriptCall("read", tuple(keys.usage(d) for d in day_ids), ())
        records: list[UsageRecord] = []
        for day, flat in zip(day_ids, reply, strict=False):
            per_model: dict[str, dict[str, int]] = {}
            for field, value in hash_pairs(flat).items():
                model, _, counter = field.rpartition("|")
                if counter in COUNTER_FIELDS:
                    per_model.setdefault(model, {})[COUNTER_FIELDS[counter]] = value
            for model, values in sorted(per_model.items()):
                records.append(UsageRecord(day=day, model=model, **values))
        return records

    def remaining_flow(
        self, caller: str, *, tenant: str = "default", plan: str | None = None,
        now: datetime | None = None,
    ) -> Generator[ScriptCall, Any, list[Remaining]]:  # fmt: skip
        p: Plan = self.config.plan(plan)
        now_us = int((now or datetime.now(UTC)).timestamp() * 1_000_000)
        keys = CallerKeys(self._prefix, tenant, caller, self._by_tenant)
        limits = [lim for lim in p.limits if isinstance(lim, TokenQuota | Budget)]
        periods = [period_of(lim.period, now_us, p.zone) for lim in limits]
        key_names = sorted({keys.period(pid) for pid, _ in periods})
        if not key_names:
            return []
        # the operator's overrides (controls.py) in the same read, so the limit shown is the
        # one admit uses (their expiry judged on this machine's clock, not the store's)
        reply = yield ScriptCall("read", (*key_names, keys.controls), ())
        values = {k: hash_pairs(flat) for k, flat in zip(key_names, reply, strict=False)}
        over = _overrides(reply[-1] if len(reply) > len(key_names) else [], now_us)
        out = []
        for lim, (pid, end_us) in zip(limits, periods, strict=True):
            assert lim.name is not None
            used = values.get(keys.period(pid), {}).get(lim.name, 0)
            out.append(
                Remaining(
                    name=lim.name,
                    kind=lim.kind,
                    period=pid[1:],
                    limit=over.get(lim.name, lim.amount),
                    used=used,
                    resets_at=datetime.fromtimestamp(end_us / 1_000_000, UTC),
                )
            )
        return out

    # -- sync -----------------------------------------------------------------------------
    def usage(self, caller: str, **kwargs: Any) -> list[UsageRecord]:
        """Usage records of ``caller`` for the last ``days`` days (default 7), newest first."""
        return drive_sync(self.usage_flow(caller, **kwargs), self._sync())

    def remaining(self, caller: str, **kwargs: Any) -> list[Remaining]:
        """What is left of each token quota and budget of ``caller``'s plan this period."""
        return drive_sync(self.remaining_flow(caller, **kwargs), self._sync())

    # -- async ----------------------------------------------------------------------------
    async def ausage(self, caller: str, **kwargs: Any) -> list[UsageRecord]:
        return await drive_async(self.usage_flow(caller, **kwargs), self._async())

    async def aremaining(self, caller: str, **kwargs: Any) -> list[Remaining]:
        return await drive_async(self.remaining_flow(caller, **kwargs), self._async())

    def _sync(self) -> SyncBackend:
        if not hasattr(self.backend, "run"):
            raise BackendMismatch(
                "this UsageReader has an async backend: use ausage()/aremaining()"
            )
        return self.backend  # type: ignore[return-value]

    def _async(self) -> AsyncBackend:
        if not hasattr(self.backend, "run_async"):
            raise BackendMismatch("this UsageReader has a sync backend: use usage()/remaining()")
        return self.backend  # type: ignore[return-value]
