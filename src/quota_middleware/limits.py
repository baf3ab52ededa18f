"""Limit types. Each is a frozen value validated on construction; the engine turns them into the
admit script's arguments.

Every limit may be narrowed to ``paths`` (glob patterns) and, on AI routes, to ``models``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar, Literal

from quota_middleware.errors import ConfigurationError

_UNITS = {
    "ms": 0.001, "millisecond": 0.001, "milliseconds": 0.001,
    "s": 1, "sec": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
}  # fmt: skip
_RATE_RE = re.compile(r"^\s*(\d+)\s*(?:/|per)\s*(\d+(?:\.\d+)?)?\s*([a-z]+)\s*$", re.IGNORECASE)
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
#: state stays below 2**53 microseconds / units so Lua's doubles hold it exactly
_MAX_US = 1 << 52

Period = Literal["day", "month"]


class LimitKind(StrEnum):
    """The kinds of limit: a policy table's ``type`` and :attr:`LimitStatus.kind
    <quota_middleware.decision.LimitStatus.kind>`. Each member equals (and formats as) its
    name string; the scripts' one-letter codes for them stay inside the scripts."""

    REQUESTS = "requests"
    TOKENS = "tokens"
    CONCURRENCY = "concurrency"
    TOKEN_QUOTA = "token_quota"
    BUDGET = "budget"


def parse_rate(text: str, *, where: str = "rate") -> tuple[int, float]:
    """Parse ``"10/second"``, ``"1000 per hour"`` or ``"5/10s"`` into ``(count, seconds)``."""
    m = _RATE_RE.match(text) if isinstance(text, str) else None
    if not m:
        raise ConfigurationError(where, f"cannot parse rate {text!r}; expected e.g. '10/second'")
    count, mult, unit = int(m.group(1)), float(m.group(2) or 1), m.group(3).lower()
    if unit not in _UNITS:
        raise ConfigurationError(where, f"unknown time unit {unit!r} in {text!r}")
    period = mult * _UNITS[unit]
    if count <= 0 or period <= 0:
        raise ConfigurationError(where, f"rate {text!r} must be positive")
    return count, period


def _rate_name(prefix: str, count: int, period: float) -> str:
    for unit, secs in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if period >= secs and period % secs == 0:
            n = int(period // secs)
            return f"{prefix}{count}-{n if n != 1 else ''}{unit}"
    return f"{prefix}{count}-{int(period * 1000)}ms"


def _check_patterns(patterns: Sequence[str] | None, where: str) -> tuple[str, ...] | None:
    if patterns is None:
        return None
    if not isinstance(patterns, list | tuple) or not all(
        isinstance(p, str) and p for p in patterns
    ):
        raise ConfigurationError(where, "must be a list of non-empty path patterns")
    for p in patterns:
        if not p.startswith("/") and p != "*":
            raise ConfigurationError(where, f"path pattern {p!r} must start with '/'")
    return tuple(patterns)


def _check_models(models: Sequence[str] | None, where: str) -> tuple[str, ...] | None:
    if models is None:
        return None
    if not isinstance(models, list | tuple) or not all(isinstance(m, str) and m for m in models):
        raise ConfigurationError(where, "must be a list of model name patterns")
    return tuple(models)


def path_matches(patterns: Sequence[str], path: str) -> bool:
    """Glob match: ``*`` matches within and across segments, ``/v1/*`` matches ``/v1/x/y``."""
    for p in patterns:
        if p == "*" or p == path or fnmatch.fnmatchcase(path, p):
            return True
    return False


def model_matches(patterns: Sequence[str], model: str | None) -> bool:
    return model is not None and any(fnmatch.fnmatchcase(model, p) for p in patterns)


def _check_name(name: str, where: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigurationError(where, f"invalid name {name!r}: 1-32 of [A-Za-z0-9_.-]")


class _Scoped:
    """Fields and checks every limit shares."""

    __slots__ = ()
    name: str | None
    paths: Sequence[str] | None
    models: Sequence[str] | None

    def _scope(self, default_name: str) -> None:
        name = self.name or default_name
        _check_name(name, f"limit {name}.name")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "paths", _check_patterns(self.paths, f"limit {name}.paths"))
        object.__setattr__(self, "models", _check_models(self.models, f"limit {name}.models"))

    def applies(self, path: str, model: str | None) -> bool:
        if self.paths is not None and not path_matches(self.paths, path):
            return False
        return self.models is None or model_matches(self.models, model)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Bucket(_Scoped):
    """The fields of a token bucket, on requests or on AI tokens."""

    rate: str
    burst: int | None = None
    name: str | None = None
    paths: Sequence[str] | None = None
    models: Sequence[str] | None = None

    #: microseconds to refill one unit (derived from ``rate``)
    interval_us: int = field(default=0, init=False, repr=False, compare=False)

    def _bucket(self, prefix: str) -> None:
        count, period = parse_rate(self.rate, where=f"limit {self.name or self.rate!r}.rate")
        burst = count if self.burst is None else self.burst
        if not isinstance(burst, int) or isinstance(burst, bool) or burst < 1:
            raise ConfigurationError(f"limit {self.name or self.rate!r}.burst", "must be >= 1")
        interval = int(period * 1_000_000 // count)
        if interval < 1:
            raise ConfigurationError(f"limit {self.rate!r}.rate", "more than 1,000,000 per second")
        if interval * burst >= _MAX_US:
            raise ConfigurationError(f"limit {self.rate!r}.burst", "burst * period is too large")
        object.__setattr__(self, "burst", burst)
        object.__setattr__(self, "interval_us", interval)
        self._scope(_rate_name(prefix, count, period))

    @property
    def capacity(self) -> int:
        assert self.burst is not None
        return self.burst


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestRate(_Bucket):
    """A token bucket on requests: ``rate`` per period, holding up to ``burst`` (default: count).

    ``RequestRate(rate="10/second", burst=20)`` admits 20 at once, then 10 per second.
    """

    kind: ClassVar[LimitKind] = LimitKind.REQUESTS

    def __post_init__(self) -> None:
        self._bucket("")


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenRate(_Bucket):
    """A token bucket on AI tokens (input + output): ``TokenRate(rate="100000/minute")``.

    Reserves the prompt estimate plus the output allowance at admission and is corrected to the
    real usage when the response ends; a response larger than the reservation runs it into debt.
    """

    kind: ClassVar[LimitKind] = LimitKind.TOKENS

    def __post_init__(self) -> None:
        self._bucket("tok")


@dataclass(frozen=True, slots=True, kw_only=True)
class Concurrency(_Scoped):
    """At most ``max`` requests of one caller in flight. A slot is a lease of ``lease`` seconds, so
    a worker that dies without releasing it frees the slot when the lease ends."""

    kind: ClassVar[LimitKind] = LimitKind.CONCURRENCY

    max: int
    lease: float = 300.0
    name: str | None = "inflight"
    paths: Sequence[str] | None = None
    models: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max, int) or self.max < 1:
            raise ConfigurationError(f"limit {self.name}.max", "must be an integer >= 1")
        if not (0 < self.lease <= 86400):
            raise ConfigurationError(f"limit {self.name}.lease", "must be in (0, 86400] seconds")
        self._scope("inflight")


DEFAULT_THRESHOLDS = (50, 80, 100)


def _check_thresholds(values: Sequence[int], where: str) -> tuple[int, ...]:
    if not isinstance(values, list | tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1000 for v in values
    ):
        raise ConfigurationError(where, "thresholds are whole percentages from 1 to 1000")
    return tuple(sorted(set(values)))


class _Calendar(_Scoped):
    __slots__ = ()
    period: Period
    thresholds: Sequence[int]

    def _calendar(self, default_name: str, amount: int) -> None:
        if self.period not in ("day", "month"):
            raise ConfigurationError(f"limit {self.name or default_name}.period", "day or month")
        if amount < 1 or amount >= _MAX_US:
            raise ConfigurationError(f"limit {self.name or default_name}", "amount out of range")
        self._scope(default_name)
        object.__setattr__(
            self, "thresholds", _check_thresholds(self.thresholds, f"limit {self.name}.thresholds")
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenQuota(_Calendar):
    """At most ``tokens`` AI tokens per calendar ``period`` in the plan's time zone."""

    kind: ClassVar[LimitKind] = LimitKind.TOKEN_QUOTA

    tokens: int
    period: Period = "day"
    name: str | None = None
    paths: Sequence[str] | None = None
    models: Sequence[str] | None = None
    #: percentages of the quota at which an alert fires, once per caller and period
    thresholds: Sequence[int] = DEFAULT_THRESHOLDS

    def __post_init__(self) -> None:
        if not isinstance(self.tokens, int) or isinstance(self.tokens, bool):
            raise ConfigurationError(f"limit {self.name}.tokens", "must be an integer")
        self._calendar(f"tokens-{self.period}", self.tokens)

    @property
    def amount(self) -> int:
        return self.tokens


@dataclass(frozen=True, slots=True, kw_only=True)
class Budget(_Calendar):
    """At most ``usd`` of AI spend per calendar ``period``, priced from the price table."""

    kind: ClassVar[LimitKind] = LimitKind.BUDGET

    usd: float
    period: Period = "month"
    name: str | None = None
    paths: Sequence[str] | None = None
    models: Sequence[str] | None = None
    #: percentages of the budget at which an alert fires, once per caller and period
    thresholds: Sequence[int] = DEFAULT_THRESHOLDS

    def __post_init__(self) -> None:
        if not isinstance(self.usd, int | float) or self.usd <= 0:
            raise ConfigurationError(f"limit {self.name}.usd", "must be a positive number")
        self._calendar(f"usd-{self.period}", self.micros)

    @property
    def micros(self) -> int:
        """The budget in integer micro-dollars, the unit the scripts count in."""
        return round(self.usd * 1_000_000)

    @property
    def amount(self) -> int:
        return self.micros


@dataclass(frozen=True, slots=True, kw_only=True)
class AppBudget:
    """Spend of the whole app (every caller) per calendar ``period``: the provider bill.

    Thresholds fire alerts once per period; with ``hard_stop`` AI routes answer 429
    ``insufficient_quota`` once it is spent, until the period ends or an operator raises it.
    It lives on its own key, so it is charged by a second call after the caller's settle and
    checked from a copy at most ``check_interval`` seconds old (see the README).
    """

    usd: float
    period: Period = "day"
    name: str | None = None
    thresholds: Sequence[int] = DEFAULT_THRESHOLDS
    hard_stop: bool = True
    timezone: str = "UTC"
    check_interval: float = 1.0

    def __post_init__(self) -> None:
        name = self.name or f"app-usd-{self.period}"
        _check_name(name, f"app_budgets.{name}.name")
        object.__setattr__(self, "name", name)
        if not isinstance(self.usd, int | float) or self.usd <= 0:
            raise ConfigurationError(f"app_budgets.{name}.usd", "must be a positive number")
        if self.period not in ("day", "month"):
            raise ConfigurationError(f"app_budgets.{name}.period", "day or month")
        if not (0 < self.check_interval <= 60):
            raise ConfigurationError(f"app_budgets.{name}.check_interval", "(0, 60] seconds")
        object.__setattr__(
            self, "thresholds", _check_thresholds(self.thresholds, f"app_budgets.{name}.thresholds")
        )

    @property
    def micros(self) -> int:
        return round(self.usd * 1_000_000)


@dataclass(frozen=True, slots=True, kw_only=True)
class TenantBudget:
    """A USD budget (``usd``) or a token quota (``tokens``) shared by every caller of a tenant
    (an org, a team) per calendar ``period``; each tenant matching ``tenants`` (globs, default
    every tenant) has its own counter.

    Thresholds fire ``tenant_threshold`` alerts once per tenant and period; with ``hard_stop``
    the tenant's AI requests answer 429 ``insufficient_quota`` once it is spent, until the
    period ends or an operator raises it (``Controls.set_budget(name, limit, tenant=...)``).
    Where it lives follows ``[storage] hash_tag``: by default on its own key beside the app's,
    charged in the settle's second call and checked from a copy at most ``check_interval``
    seconds old (the tenant may overshoot by what its requests in flight spend and by
    ``check_interval`` of its spending); with ``hash_tag = "tenant"`` in its tenant's slot,
    reserved in each caller's admit call, exactly (see the README, "Tenant budgets").
    """

    usd: float | None = None
    tokens: int | None = None
    period: Period = "day"
    name: str | None = None
    tenants: Sequence[str] = ("*",)
    thresholds: Sequence[int] = DEFAULT_THRESHOLDS
    hard_stop: bool = True
    timezone: str = "UTC"
    check_interval: float = 1.0

    def __post_init__(self) -> None:
        kind = "usd" if self.tokens is None else "tokens"
        name = self.name or f"tenant-{kind}-{self.period}"
        where = f"tenant_budgets.{name}"
        _check_name(name, f"{where}.name")
        object.__setattr__(self, "name", name)
        if (self.usd is None) == (self.tokens is None):
            raise ConfigurationError(where, "give exactly one of usd and tokens")
        if self.usd is not None and (not isinstance(self.usd, int | float) or self.usd <= 0):
            raise ConfigurationError(f"{where}.usd", "must be a positive number")
        if self.tokens is not None and (
            not isinstance(self.tokens, int) or isinstance(self.tokens, bool) or self.tokens <= 0
        ):
            raise ConfigurationError(f"{where}.tokens", "must be a positive whole number")
        if self.period not in ("day", "month"):
            raise ConfigurationError(f"{where}.period", "day or month")
        if not (0 < self.check_interval <= 60):
            raise ConfigurationError(f"{where}.check_interval", "(0, 60] seconds")
        if isinstance(self.tenants, str):
            object.__setattr__(self, "tenants", (self.tenants,))
        tenants = tuple(self.tenants)
        if not tenants or not all(isinstance(t, str) and t for t in tenants):
            raise ConfigurationError(f"{where}.tenants", "a list of tenant ids or globs")
        object.__setattr__(self, "tenants", tenants)
        object.__setattr__(
            self, "thresholds", _check_thresholds(self.thresholds, f"{where}.thresholds")
        )

    @property
    def is_budget(self) -> bool:
        """A USD budget (counted in micro-USD), not a token quota."""
        return self.usd is not None

    @property
    def amount(self) -> int:
        """The limit in its unit: micro-USD for a budget, tokens for a quota."""
        return round(self.usd * 1_000_000) if self.usd is not None else int(self.tokens or 0)

    @property
    def unit(self) -> str:
        return "usd_micros" if self.is_budget else "tokens"

    def applies(self, tenant: str) -> bool:
        return any(fnmatch.fnmatchcase(tenant, glob) for glob in self.tenants)


@dataclass(frozen=True, slots=True, kw_only=True)
class SpikeRule:
    """Flag a caller whose tokens in the current hour exceed ``multiple`` times its average hour
    over the trailing ``window_hours``, and at least ``floor_tokens`` (so new callers, whose
    average is 0, are not flagged for ordinary use). One event per caller and hour."""

    multiple: float = 5.0
    floor_tokens: int = 10_000
    window_hours: int = 24

    def __post_init__(self) -> None:
        if not (1 < self.multiple <= 1000):
            raise ConfigurationError("spikes.multiple", "must be in (1, 1000]")
        if not isinstance(self.floor_tokens, int) or self.floor_tokens < 1:
            raise ConfigurationError("spikes.floor_tokens", "must be an integer >= 1")
        if not isinstance(self.window_hours, int) or not (1 <= self.window_hours <= 168):
            raise ConfigurationError("spikes.window_hours", "must be 1..168")


Limit = RequestRate | TokenRate | Concurrency | TokenQuota | Budget
#: the limit class of each kind, in :class:`LimitKind` order
LIMIT_TYPES: dict[LimitKind, type[Limit]] = {
    cls.kind: cls for cls in (RequestRate, TokenRate, Concurrency, TokenQuota, Budget)
}
