"""Configuration: frozen dataclasses validated on construction, and :meth:`QuotaConfig.from_toml`.

Every error names the field it is about (:class:`~quota_middleware.errors.ConfigurationError`), so a
bad policy fails at startup, never at the first request.
"""

from __future__ import annotations

import fnmatch
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigurationError
from .identity import IdentityConfig

_UNITS = {
    "ms": 0.001, "millisecond": 0.001, "milliseconds": 0.001,
    "s": 1, "sec": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
}  # fmt: skip
_RATE_RE = re.compile(r"^\s*(\d+)\s*(?:/|per)\s*(\d+(?:\.\d+)?)?\s*([a-z]+)\s*$", re.IGNORECASE)
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


def parse_rate(text: str, *, where: str = "rate") -> tuple[int, float]:
    """Parse ``"10/second"``, ``"1000 per hour"`` or ``"5/10s"`` into ``(count, period_seconds)``."""
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


def _rate_name(count: int, period: float) -> str:
    for unit, secs in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if period >= secs and period % secs == 0:
            n = int(period // secs)
            return f"{count}-{n if n != 1 else ''}{unit}"
    return f"{count}-{int(period * 1000)}ms"


def _check_patterns(patterns: Sequence[str] | None, where: str) -> tuple[str, ...] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str) or not all(isinstance(p, str) and p for p in patterns):
        raise ConfigurationError(where, "must be a list of non-empty path patterns")
    for p in patterns:
        if not p.startswith("/") and p != "*":
            raise ConfigurationError(where, f"path pattern {p!r} must start with '/'")
    return tuple(patterns)


def path_matches(patterns: Sequence[str], path: str) -> bool:
    """Glob match: ``*`` matches within and across segments, ``/v1/*`` matches ``/v1/x/y``."""
    return any(p == path or fnmatch.fnmatchcase(path, p) for p in patterns)


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestRate:
    """A token bucket on requests: ``rate`` per period, holding up to ``burst`` (default: the count).

    ``RequestRate("10/second", burst=20)`` admits 20 at once, then 10 per second.
    """

    rate: str
    burst: int | None = None
    name: str | None = None
    paths: Sequence[str] | None = None

    def __post_init__(self) -> None:
        count, period = parse_rate(self.rate, where=f"limit {self.name or self.rate!r}.rate")
        burst = count if self.burst is None else self.burst
        if not isinstance(burst, int) or burst < 1:
            raise ConfigurationError(f"limit {self.rate!r}.burst", "must be an integer >= 1")
        interval_us = int(period * 1_000_000 // count)
        if interval_us < 1:
            raise ConfigurationError(f"limit {self.rate!r}.rate", "more than 1,000,000 per second")
        name = self.name or _rate_name(count, period)
        if not _NAME_RE.match(name):
            raise ConfigurationError(f"limit {self.rate!r}.name", f"invalid name {name!r}")
        object.__setattr__(self, "burst", burst)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "paths", _check_patterns(self.paths, f"limit {name}.paths"))

    @property
    def count(self) -> int:
        return parse_rate(self.rate)[0]

    @property
    def period(self) -> float:
        return parse_rate(self.rate)[1]

    @property
    def interval_us(self) -> int:
        count, period = parse_rate(self.rate)
        return int(period * 1_000_000 // count)


@dataclass(frozen=True, slots=True, kw_only=True)
class Concurrency:
    """At most ``max`` requests of one caller in flight. A slot is a lease of ``lease`` seconds, so
    a worker that dies without releasing it frees the slot when the lease ends."""

    max: int
    lease: float = 300.0
    name: str = "inflight"
    paths: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max, int) or self.max < 1:
            raise ConfigurationError(f"limit {self.name}.max", "must be an integer >= 1")
        if not (0 < self.lease <= 86400):
            raise ConfigurationError(f"limit {self.name}.lease", "must be in (0, 86400] seconds")
        if not _NAME_RE.match(self.name):
            raise ConfigurationError(f"limit {self.name}.name", "invalid name")
        object.__setattr__(self, "paths", _check_patterns(self.paths, f"limit {self.name}.paths"))


Limit = RequestRate | Concurrency
OnError = Literal["open", "closed"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """A named set of limits. ``shadow=True`` decides and reports but never blocks.
    ``on_error`` says what happens when the store is unreachable: ``"open"`` admits,
    ``"closed"`` answers 503."""

    name: str
    limits: Sequence[Limit] = ()
    shadow: bool = False
    on_error: OnError = "open"

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ConfigurationError(f"plans.{self.name}", "plan names are 1-32 of [A-Za-z0-9_.-]")
        if self.on_error not in ("open", "closed"):
            raise ConfigurationError(f"plans.{self.name}.on_error", "must be 'open' or 'closed'")
        limits = tuple(self.limits)
        seen: set[str] = set()
        for i, lim in enumerate(limits):
            if not isinstance(lim, RequestRate | Concurrency):
                raise ConfigurationError(f"plans.{self.name}.limits[{i}]", f"not a limit: {lim!r}")
            assert lim.name is not None
            if lim.name in seen:
                raise ConfigurationError(
                    f"plans.{self.name}.limits[{i}]", f"duplicate limit name {lim.name!r}"
                )
            seen.add(lim.name)
        object.__setattr__(self, "limits", limits)


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteWeight:
    """Requests matching ``path`` (and ``methods``, if given) cost ``weight`` on request buckets."""

    path: str
    weight: int
    methods: Sequence[str] | None = None

    def __post_init__(self) -> None:
        _check_patterns([self.path], "routes.weights.path")
        if not isinstance(self.weight, int) or self.weight < 0:
            raise ConfigurationError(f"routes.weights[{self.path}]", "weight must be an int >= 0")
        if self.methods is not None:
            object.__setattr__(self, "methods", tuple(m.upper() for m in self.methods))


@dataclass(frozen=True, slots=True, kw_only=True)
class Routes:
    """Which paths are limited at all: ``include`` (default every path) minus ``exempt``."""

    include: Sequence[str] = ("*",)
    exempt: Sequence[str] = ()
    weights: Sequence[RouteWeight] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "include", _check_patterns(self.include, "routes.include"))
        object.__setattr__(self, "exempt", _check_patterns(self.exempt, "routes.exempt"))
        object.__setattr__(self, "weights", tuple(self.weights))

    def is_limited(self, path: str) -> bool:
        return path_matches(self.include, path) and not path_matches(self.exempt, path)

    def weight(self, method: str, path: str) -> int:
        for w in self.weights:
            if path_matches([w.path], path) and (w.methods is None or method in w.methods):
                return w.weight
        return 1


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageConfig:
    """Where state lives. ``url``: ``memory://`` (default), ``redis://``, ``rediss://``,
    ``redis+cluster://``; the ``QUOTA_REDIS_URL`` environment variable overrides it."""

    url: str = "memory://"
    prefix: str = "qm"
    #: socket connect/read timeout; short, so an outage does not stall requests
    timeout: float = 0.25
    #: consecutive failures that open the circuit breaker
    breaker_failures: int = 3
    #: seconds the breaker stays open before one probe request is let through
    breaker_reset: float = 2.0

    def __post_init__(self) -> None:
        url = self.url
        scheme = url.split("://", 1)[0] if "://" in url else ""
        if scheme not in ("memory", "redis", "rediss", "redis+cluster", "rediss+cluster", "unix"):
            raise ConfigurationError("storage.url", f"unsupported scheme in {_mask_url(url)!r}")
        if not re.match(r"^[A-Za-z0-9_.:-]{1,32}$", self.prefix):
            raise ConfigurationError("storage.prefix", "1-32 of [A-Za-z0-9_.:-]")
        if not (0 < self.timeout <= 30):
            raise ConfigurationError("storage.timeout", "must be in (0, 30] seconds")
        if self.breaker_failures < 1 or self.breaker_reset <= 0:
            raise ConfigurationError("storage.breaker_*", "must be positive")


def _mask_url(url: str) -> str:
    return re.sub(r"://([^@/]*)@", "://***@", url)


@dataclass(frozen=True, slots=True, kw_only=True)
class QuotaConfig:
    """The whole policy. Build it in Python or load it with :meth:`from_toml`."""

    plans: Sequence[Plan]
    default_plan: str | None = None
    routes: Routes = field(default_factory=Routes)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        plans = tuple(self.plans)
        if not plans:
            raise ConfigurationError("plans", "at least one plan is required")
        names = [p.name for p in plans]
        if len(set(names)) != len(names):
            raise ConfigurationError("plans", "plan names must be unique")
        default = self.default_plan or plans[0].name
        if default not in names:
            raise ConfigurationError("default_plan", f"no plan named {default!r}")
        max_weight = max((w.weight for w in self.routes.weights), default=1)
        for p in plans:
            for lim in p.limits:
                if isinstance(lim, RequestRate) and lim.burst is not None and lim.burst < max_weight:
                    raise ConfigurationError(
                        f"plans.{p.name}.limits.{lim.name}.burst",
                        f"burst {lim.burst} is below the largest route weight {max_weight}: "
                        "such requests could never be admitted",
                    )
        object.__setattr__(self, "plans", plans)
        object.__setattr__(self, "default_plan", default)
        env_url = os.environ.get("QUOTA_REDIS_URL")
        if env_url and env_url != self.storage.url:
            object.__setattr__(
                self, "storage", _replace_storage(self.storage, env_url)
            )

    def plan(self, name: str | None) -> Plan:
        """The plan called ``name``, or the default plan for unknown or missing names."""
        for p in self.plans:
            if p.name == name:
                return p
        for p in self.plans:
            if p.name == self.default_plan:
                return p
        raise AssertionError("unreachable: default plan validated")

    def has_plan(self, name: str) -> bool:
        return any(p.name == name for p in self.plans)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> QuotaConfig:
        """Load a policy file; see the README's configuration reference for its keys."""
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigurationError("policy", f"cannot read {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigurationError("policy", f"{path} is not valid TOML: {e}") from None
        return cls.from_dict(data, base_dir=Path(path).parent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base_dir: Path | None = None) -> QuotaConfig:
        _known(data, {"plans", "default_plan", "routes", "identity", "storage"}, "")
        plans_d = data.get("plans")
        if not isinstance(plans_d, Mapping) or not plans_d:
            raise ConfigurationError("plans", "a [plans.NAME] table is required")
        plans = [_plan_from_dict(name, p) for name, p in plans_d.items()]
        routes_d = _table(data, "routes")
        _known(routes_d, {"include", "exempt", "weights"}, "routes")
        weights = []
        for i, w in enumerate(routes_d.get("weights", [])):
            _known(w, {"path", "weight", "methods"}, f"routes.weights[{i}]")
            weights.append(RouteWeight(**w))
        routes = Routes(
            include=routes_d.get("include", ("*",)),
            exempt=routes_d.get("exempt", ()),
            weights=weights,
        )
        storage_d = _table(data, "storage")
        _known(storage_d, set(StorageConfig.__dataclass_fields__), "storage")
        identity = IdentityConfig.from_dict(_table(data, "identity"), base_dir=base_dir)
        return cls(
            plans=plans,
            default_plan=data.get("default_plan"),
            routes=routes,
            identity=identity,
            storage=StorageConfig(**storage_d),
        )


def _replace_storage(s: StorageConfig, url: str) -> StorageConfig:
    return StorageConfig(
        url=url,
        prefix=s.prefix,
        timeout=s.timeout,
        breaker_failures=s.breaker_failures,
        breaker_reset=s.breaker_reset,
    )


def _table(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigurationError(key, "must be a table")
    return value


def _known(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            dotted = f"{where}.{key}" if where else key
            raise ConfigurationError(dotted, f"unknown key; expected one of {sorted(allowed)}")


_LIMIT_TYPES: dict[str, type[RequestRate] | type[Concurrency]] = {
    "requests": RequestRate,
    "concurrency": Concurrency,
}


def _plan_from_dict(name: str, d: Any) -> Plan:
    where = f"plans.{name}"
    if not isinstance(d, Mapping):
        raise ConfigurationError(where, "must be a table")
    _known(d, {"limits", "shadow", "on_error"}, where)
    limits: list[Limit] = []
    for i, lim in enumerate(d.get("limits", [])):
        lw = f"{where}.limits[{i}]"
        if not isinstance(lim, Mapping) or "type" not in lim:
            raise ConfigurationError(lw, f"needs a 'type' ({', '.join(_LIMIT_TYPES)})")
        kind = _LIMIT_TYPES.get(lim["type"])
        if kind is None:
            raise ConfigurationError(f"{lw}.type", f"unknown limit type {lim['type']!r}")
        params = {k: v for k, v in lim.items() if k != "type"}
        _known(params, set(kind.__dataclass_fields__), lw)
        try:
            limits.append(kind(**params))
        except ConfigurationError as e:
            raise ConfigurationError(f"{lw}.{e.field.split('.')[-1]}", str(e).split(": ", 1)[-1])
        except TypeError as e:
            raise ConfigurationError(lw, str(e)) from None
    shadow = d.get("shadow", False)
    if not isinstance(shadow, bool):
        raise ConfigurationError(f"{where}.shadow", "must be true or false")
    return Plan(name=name, limits=limits, shadow=shadow, on_error=d.get("on_error", "open"))
