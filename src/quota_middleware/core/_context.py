"""What admission and settlement share for one :class:`~quota_middleware.QuotaConfig`: the
configuration, the clock, the counters, the learned input margins and the settle buffer. Both
are peers over one :class:`Context` (see :class:`~quota_middleware.engine.Engine`)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from quota_middleware.base._keys import AppKeys, CallerKeys, tenant_tagged_period
from quota_middleware.base._periods import period_of
from quota_middleware.config import QuotaConfig
from quota_middleware.core._decision import Decision, Stats
from quota_middleware.core._margins import InputMargins
from quota_middleware.limits import AppBudget, TenantBudget
from quota_middleware.metering._usage import Usage

__all__ = ["Context", "SettleBuffer", "SharedBudget"]


@dataclass(frozen=True, slots=True)
class SharedBudget:
    """An app budget, or a tenant's budget or token quota, in one period: a counter that many
    callers share, on its own key beside the app's (charged by the settle's second call)."""

    budget: AppBudget | TenantBudget
    #: the tenant whose counter this is; None for the app's
    tenant: str | None
    key: str
    end_us: int
    #: the period's id as period_of gives it (``d2026-12-03``)
    period_id: str = ""
    #: reserved in the caller's admit call (a hard-stopped tenant budget under
    #: ``hash_tag = "tenant"``: its key is in the caller's slot), not in the second call
    in_admit: bool = False

    @property
    def name(self) -> str:
        assert self.budget.name is not None
        return self.budget.name

    @property
    def amount(self) -> int:
        """The limit: micro-USD, or tokens for a tenant's token quota."""
        b = self.budget
        return b.micros if isinstance(b, AppBudget) else b.amount

    @property
    def in_usd(self) -> bool:
        return isinstance(self.budget, AppBudget) or self.budget.is_budget


class SettleBuffer:
    """Settles that could not be written (the store was down), kept per process until it
    answers again, oldest dropped first when full. Each entry is replayed through the same
    settle calls, which are idempotent per request id (their done markers), so a settle that
    did reach Redis before its reply was lost is not applied twice."""

    def __init__(self, size: int) -> None:
        self.size = size
        # (decision, usage, cost, attempts, ended at µs)
        self._items: deque[tuple[Decision, Usage | None, int, int, int]] = deque()
        self._lock = threading.Lock()
        #: settles dropped because the buffer was full or they kept failing
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._items)

    def push(
        self, decision: Decision, usage: Usage | None, cost: int, attempts: int = 0,
        at_us: int = 0, *, front: bool = False,
    ) -> bool:  # fmt: skip
        """Keep one settle; False when that dropped the oldest (or this one: size 0).
        ``front``: put back one that could not be written yet, to keep the order."""
        with self._lock:
            if self.size <= 0:
                self.dropped += 1
                return False
            dropped = len(self._items) >= self.size
            if dropped:
                self._items.popleft()
                self.dropped += 1
            item = (decision, usage, cost, attempts, at_us)
            if front:
                self._items.appendleft(item)
            else:
                self._items.append(item)
            return not dropped

    def pop(self) -> tuple[Decision, Usage | None, int, int, int] | None:
        with self._lock:
            return self._items.popleft() if self._items else None

    def drop(self) -> None:
        with self._lock:
            self.dropped += 1


class Context:
    """The state one engine's admission and settlement share."""

    def __init__(
        self,
        config: QuotaConfig,
        *,
        clock: Callable[[], int] | None = None,
        metrics: Any = None,
    ) -> None:
        self.config = config
        #: a :class:`~quota_middleware.metrics.PrometheusMetrics` (or anything with its hooks)
        self.metrics = metrics
        #: microseconds override for deterministic tests; None means Redis server time
        self.clock = clock
        self.stats = Stats()
        self.prefix = config.storage.prefix
        self.app_keys = AppKeys(self.prefix)
        #: ``[storage] hash_tag = "tenant"``: callers' keys in their tenant's slot
        self.by_tenant = config.storage.hash_tag == "tenant"
        self.retention_ms = config.usage_retention_days * 86_400_000
        #: settles not yet written because the store was down (see :class:`SettleBuffer`)
        self.settle_buffer = SettleBuffer(config.storage.settle_buffer)
        #: prompt-estimate margins per model, configured or learned from settles
        self.margins = InputMargins(
            config.input_margins, key=f"{self.prefix}:{{@margins}}",
            learn=config.learn_input_margins,
        )  # fmt: skip

    def now_us(self) -> int:
        return self.clock() if self.clock is not None else time.time_ns() // 1000

    def now_arg(self) -> str:
        """A script's ARGV[1]: "" for Redis server time, or the test clock."""
        return "" if self.clock is None else str(self.clock())

    def app_period_key(self, budget: AppBudget, now_us: int | None = None) -> tuple[str, int]:
        """The app budget's counter key for the period of ``now_us`` (default: now), and its end."""
        pid, end_us = period_of(budget.period, now_us or self.now_us(), ZoneInfo(budget.timezone))
        return self.app_keys.period(pid), end_us

    def caller_keys(self, tenant: str, caller: str) -> CallerKeys:
        return CallerKeys(self.prefix, tenant, caller, self.by_tenant)

    def shared_budgets(self, tenant: str | None, now_us: int | None = None) -> list[SharedBudget]:
        """The app budgets, then the budgets of ``tenant`` (those whose globs match it), each
        in the period of ``now_us``: the order of their operations in the settle's second call
        (but for those ``in_admit``)."""
        at = now_us or self.now_us()
        out = []
        for b in self.config.app_budgets:
            key, end_us = self.app_period_key(b, at)
            out.append(SharedBudget(b, None, key, end_us))
        if tenant is not None:
            for tb in self.config.tenant_budgets:
                if tb.applies(tenant):
                    pid, end_us = period_of(tb.period, at, ZoneInfo(tb.timezone))
                    # only a hard stop needs the admit call; a soft budget (alerts only) is
                    # charged after the request either way, and stays off the caller's slot
                    tagged = self.by_tenant and tb.hard_stop
                    key = (
                        tenant_tagged_period(self.prefix, tenant, pid) if tagged
                        else self.app_keys.tenant_period(tenant, pid)
                    )  # fmt: skip
                    out.append(SharedBudget(tb, tenant, key, end_us, pid, tagged))
        return out
