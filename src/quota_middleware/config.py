"""Configuration: frozen dataclasses validated on construction, and :meth:`QuotaConfig.from_toml`.

Every error names the field it is about (:class:`~quota_middleware.errors.ConfigurationError`), so a
bad policy fails at startup, never at the first request.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args
from urllib.parse import parse_qsl, urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from quota_middleware.errors import ConfigurationError, check_keys, construct
from quota_middleware.identity._identifier import IdentityConfig
from quota_middleware.limits import (
    _NAME_RE,
    LIMIT_TYPES,
    AppBudget,
    Budget,
    Concurrency,
    Limit,
    RequestRate,
    SpikeRule,
    TenantBudget,
    TokenQuota,
    TokenRate,
    _check_patterns,
    path_matches,
)
from quota_middleware.metering._usage import Format
from quota_middleware.proxy._config import ProxyConfig

OnError = Literal["open", "closed"]
T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """A named set of limits. ``shadow=True`` decides and reports but never blocks.
    ``on_error`` says what happens when the store is unreachable: ``"open"`` admits,
    ``"closed"`` answers 503."""

    name: str
    limits: Sequence[Limit] = ()
    shadow: bool = False
    on_error: OnError = "open"
    #: model allow-list on AI routes (glob patterns); None allows every model
    models: Sequence[str] | None = None
    #: IANA time zone in which daily and monthly quotas and budgets roll over
    timezone: str = "UTC"
    #: end a streamed AI response when its relayed output outgrows what was reserved and a
    #: token quota or budget has no room for more (a final error event in the provider's own
    #: format); without it, an upstream that ignores the output cap is charged in full
    hard_stop: bool = False
    _zone: ZoneInfo | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ConfigurationError(f"plans.{self.name}", "plan names are 1-32 of [A-Za-z0-9_.-]")
        if self.on_error not in ("open", "closed"):
            raise ConfigurationError(f"plans.{self.name}.on_error", "must be 'open' or 'closed'")
        limits = tuple(self.limits)
        seen: set[str] = set()
        for i, lim in enumerate(limits):
            if not isinstance(lim, RequestRate | TokenRate | Concurrency | TokenQuota | Budget):
                raise ConfigurationError(f"plans.{self.name}.limits[{i}]", f"not a limit: {lim!r}")
            assert lim.name is not None
            if lim.name in seen:
                raise ConfigurationError(
                    f"plans.{self.name}.limits[{i}]", f"duplicate limit name {lim.name!r}"
                )
            seen.add(lim.name)
        object.__setattr__(self, "limits", limits)
        if self.models is not None:
            if not isinstance(self.models, list | tuple) or not all(
                isinstance(m, str) for m in self.models
            ):
                raise ConfigurationError(f"plans.{self.name}.models", "must be a list of patterns")
            object.__setattr__(self, "models", tuple(self.models))
        try:
            object.__setattr__(self, "_zone", ZoneInfo(self.timezone))
        except (ZoneInfoNotFoundError, ValueError, TypeError):
            raise ConfigurationError(
                f"plans.{self.name}.timezone", f"unknown time zone {self.timezone!r}"
            ) from None

    @property
    def zone(self) -> ZoneInfo:
        assert self._zone is not None
        return self._zone


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


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class StorageConfig:
    """Where state lives. ``url``: ``memory://`` (default), ``redis://``, ``rediss://``,
    ``redis+cluster://``, ``redis+sentinel://`` (``backends._sentinel``); the ``QUOTA_REDIS_URL``
    environment variable overrides it in a policy loaded with :meth:`QuotaConfig.from_toml` and
    in the middlewares and the command line (:meth:`QuotaConfig.with_env`)."""

    url: str = "memory://"
    prefix: str = "qm"
    #: socket connect/read timeout; short, so an outage does not stall requests
    timeout: float = 0.25
    #: consecutive failures that open the circuit breaker
    breaker_failures: int = 3
    #: seconds the breaker stays open before one probe request is let through
    breaker_reset: float = 2.0
    #: settles kept per process while the store is down, applied once it answers (oldest
    #: dropped first beyond this; 0 keeps none)
    settle_buffer: int = 10_000
    #: which hash tag a caller's keys carry (a Redis Cluster slot each): ``"caller"`` spreads
    #: callers over the cluster, and tenant budgets live on their own key, charged after the
    #: request; ``"tenant"`` puts a tenant's callers in its slot, so tenant budgets are
    #: reserved in the admit call, exactly, but a big tenant lives on one shard. Changing it
    #: moves every caller's keys: their counters start over (README, "Tenant budgets").
    hash_tag: Literal["caller", "tenant"] = "caller"

    def __post_init__(self) -> None:
        url = self.url
        scheme = url.split("://", 1)[0] if "://" in url else ""
        if scheme not in (
            "memory", "redis", "rediss", "redis+cluster", "rediss+cluster", "unix",
            "redis+sentinel", "rediss+sentinel",
        ):  # fmt: skip
            raise ConfigurationError("storage.url", f"unsupported scheme in {_mask_url(url)!r}")
        if scheme.endswith("+sentinel"):
            from quota_middleware.backends._sentinel import parse_sentinel_url

            parse_sentinel_url(url)  # a bad sentinel URL fails here, not at the first request
        if not re.match(r"^[A-Za-z0-9_.:-]{1,32}$", self.prefix):
            raise ConfigurationError("storage.prefix", "1-32 of [A-Za-z0-9_.:-]")
        if not (0 < self.timeout <= 30):
            raise ConfigurationError("storage.timeout", "must be in (0, 30] seconds")
        if self.breaker_failures < 1 or self.breaker_reset <= 0:
            raise ConfigurationError("storage.breaker_*", "must be positive")
        if (
            not isinstance(self.settle_buffer, int) or isinstance(self.settle_buffer, bool)
            or not 0 <= self.settle_buffer <= 10_000_000
        ):  # fmt: skip
            raise ConfigurationError("storage.settle_buffer", "an integer in [0, 10000000]")
        if self.hash_tag not in ("caller", "tenant"):
            raise ConfigurationError("storage.hash_tag", '"caller" or "tenant"')

    @property
    def is_memory(self) -> bool:
        """The embedded in-process store (``memory://``), not a Redis."""
        return self.url.startswith("memory://")

    def __repr__(self) -> str:
        # a Redis URL may carry a password
        return (
            f"StorageConfig(url={_mask_url(self.url)!r}, prefix={self.prefix!r}, "
            f"timeout={self.timeout}, breaker_failures={self.breaker_failures}, "
            f"breaker_reset={self.breaker_reset}, hash_tag={self.hash_tag!r})"
        )


_AI_FORMATS: tuple[str, ...] = get_args(Format)


@dataclass(frozen=True, slots=True, kw_only=True)
class AIRoute:
    """A route whose requests and responses are AI API calls, metered in tokens and cost.

    :param path: glob pattern, e.g. ``/v1/chat/completions`` or ``/v1beta/models/*``.
    :param format: the provider API format, or ``"auto"`` to detect it from the path, the request
        body and the response content type.
    :param max_body: request bodies over this many bytes are refused with 413.
    :param default_output_tokens: the output allowance reserved when the request sets no cap.
    :param max_output_reserve: the most output tokens ever reserved up front, whatever the cap.
    :param lease: seconds a reservation holds if its worker dies before settling it.
    :param write_output_cap: write the reserved output cap into requests that set none, or one
        above ``max_output_reserve`` (``max_completion_tokens``, ``max_tokens``,
        ``max_output_tokens``, ``generationConfig.maxOutputTokens``, ``options.num_predict``),
        so the upstream is bound by what was reserved.
    :param max_usage_tokens: a response that reports more input or output tokens than this is
        not believed: it is charged from the estimate and logged as ``usage_invalid``. The
        default is far above every current model's context window plus its output.
    """

    path: str
    format: Format = "auto"
    methods: Sequence[str] = ("POST",)
    max_body: int = 1 << 20
    default_output_tokens: int = 1024
    max_output_reserve: int = 16384
    lease: float = 600.0
    write_output_cap: bool = False
    max_usage_tokens: int = 4_000_000

    def __post_init__(self) -> None:
        where = f"ai_routes[{self.path}]"
        _check_patterns([self.path], f"{where}.path")
        if self.format not in _AI_FORMATS:
            raise ConfigurationError(f"{where}.format", f"one of {', '.join(_AI_FORMATS)}")
        for name in ("max_body", "default_output_tokens", "max_output_reserve", "max_usage_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigurationError(f"{where}.{name}", "must be an integer >= 1")
        if not (1 <= self.lease <= 86400):
            raise ConfigurationError(f"{where}.lease", "must be in [1, 86400] seconds")
        object.__setattr__(self, "methods", tuple(m.upper() for m in self.methods))

    def matches(self, method: str, path: str) -> bool:
        return method in self.methods and path_matches([self.path], path)


Unpriced = Literal["refuse", "default", "tokens-only"]


def mask_url(url: str) -> str:
    """``url`` with its credentials (user info, even with '@' in the password, and a
    ``password`` query parameter) replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    if "@" not in parts.netloc and "pass" not in parts.query.lower() and "pwd" not in parts.query:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = (f"{user}:***" if colon else "***") + "@" + host
    query = "&".join(
        f"{k}=***"
        if k.lower() in ("password", "pass", "pwd") or k.lower().endswith("password")
        else f"{k}={v}"
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


_mask_url = mask_url


@dataclass(frozen=True, slots=True, kw_only=True)
class QuotaConfig:
    """The whole policy. Build it in Python or load it with :meth:`from_toml`."""

    plans: Sequence[Plan]
    default_plan: str | None = None
    routes: Routes = field(default_factory=Routes)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ai_routes: Sequence[AIRoute] = ()
    #: price overrides and additions, USD per 1M tokens:
    #: ``{"my-model": {"input": 1.0, "output": 4.0, "cached_input": 0.1, "cache_write": 1.25}}``
    prices: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    #: a price file in LiteLLM's published JSON format (``model_prices_and_context_window
    #: .json``, USD per token), over the bundled table and under ``prices``; read at startup
    prices_file: str | os.PathLike[str] | None = None
    #: what a budgeted request for a model without a price does: ``"refuse"`` it (403),
    #: charge ``default_price``, or count ``"tokens-only"`` (cost 0)
    unpriced: Unpriced = "refuse"
    default_price: Mapping[str, float] | None = None
    #: days the per-caller, per-day usage records are kept
    usage_retention_days: int = 35
    #: prompt-estimate margins by model glob (``{"claude-*": 1.3}``); models without one use
    #: the margin learned from settles (when ``learn_input_margins``), see :mod:`.margins`
    input_margins: Mapping[str, float] = field(default_factory=dict)
    learn_input_margins: bool = True
    #: spend of the whole app per day / month (the provider bill), with an optional hard stop
    app_budgets: Sequence[AppBudget] = ()
    #: budgets and token quotas shared by the callers of a tenant (one counter per tenant)
    tenant_budgets: Sequence[TenantBudget] = ()
    #: flag callers whose hourly usage jumps far above their own average
    spikes: SpikeRule | None = None
    #: keep the app-wide rollups (each day's usage per model, the rankings of callers and
    #: tenants) that the dashboard, the digest and the admin API read; off saves the settle's
    #: second call when there are no app budgets, and those reports then SCAN every caller
    rollups: bool = True
    #: where alert events go (:class:`quota_middleware.alerts.AlertsConfig`); None: the outbox
    #: only, for a separate ``quota-middleware alerts run`` worker or ``alerts tail``
    alerts: Any = None
    #: the backend proxy's upstreams (:class:`quota_middleware.proxy.ProxyConfig`); its AI
    #: operations become AI routes here (after any declared in ``ai_routes``, which win)
    proxy: ProxyConfig | None = None
    #: the admin API and dashboard's credentials and settings
    #: (:class:`quota_middleware.admin.AdminConfig`); None: no admin app can be built
    admin: Any = None

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
                if isinstance(lim, RequestRate) and lim.capacity < max_weight:
                    raise ConfigurationError(
                        f"plans.{p.name}.limits.{lim.name}.burst",
                        f"burst {lim.burst} is below the largest route weight {max_weight}: "
                        "such requests could never be admitted",
                    )
        object.__setattr__(self, "plans", plans)
        object.__setattr__(self, "default_plan", default)
        object.__setattr__(self, "ai_routes", (*self.ai_routes, *_proxy_routes(self)))
        object.__setattr__(self, "app_budgets", tuple(self.app_budgets))
        object.__setattr__(self, "tenant_budgets", tuple(self.tenant_budgets))
        tenant_names = [b.name for b in self.tenant_budgets]
        if len(set(tenant_names)) != len(tenant_names):
            raise ConfigurationError("tenant_budgets", "names must be unique")
        if clash := {str(n) for n in tenant_names} & {str(b.name) for b in self.app_budgets}:
            # one settle call charges both: its events name the counter by its field alone
            raise ConfigurationError(
                f"tenant_budgets.{sorted(clash)[0]}.name", "an app budget has this name"
            )
        for tb in self.tenant_budgets:
            try:
                ZoneInfo(tb.timezone)
            except (ZoneInfoNotFoundError, ValueError):
                raise ConfigurationError(
                    f"tenant_budgets.{tb.name}.timezone", f"unknown time zone {tb.timezone!r}"
                ) from None
        budget_names = [b.name for b in self.app_budgets]
        if len(set(budget_names)) != len(budget_names):
            raise ConfigurationError("app_budgets", "names must be unique")
        for b in self.app_budgets:
            try:
                ZoneInfo(b.timezone)
            except (ZoneInfoNotFoundError, ValueError):
                raise ConfigurationError(
                    f"app_budgets.{b.name}.timezone", f"unknown time zone {b.timezone!r}"
                ) from None
        if self.unpriced not in ("refuse", "default", "tokens-only"):
            raise ConfigurationError("unpriced", "one of 'refuse', 'default', 'tokens-only'")
        if self.unpriced == "default" and not self.default_price:
            raise ConfigurationError("default_price", "required when unpriced = 'default'")
        if not isinstance(self.prices, Mapping):
            raise ConfigurationError("prices", "must be a table of models")
        if not isinstance(self.input_margins, Mapping):
            raise ConfigurationError("input_margins", "must be a table of model patterns")
        for pattern, value in self.input_margins.items():
            if (
                not isinstance(value, int | float) or isinstance(value, bool)
                or not 1.0 <= value <= 10.0
            ):  # fmt: skip
                raise ConfigurationError(f"input_margins.{pattern}", "a number in [1, 10]")
        # priced now, so a bad price is a startup error like every other one
        from quota_middleware.metering.pricing import ModelPrice, PriceTable

        if self.prices_file is not None:
            from quota_middleware.metering.pricing import load_litellm_prices

            load_litellm_prices(self.prices_file)
        PriceTable().with_overrides(self.prices)
        if self.default_price is not None:
            if not isinstance(self.default_price, Mapping):
                raise ConfigurationError("default_price", "must be a table")
            ModelPrice.from_usd(
                self.default_price.get("input"), self.default_price.get("output"),
                self.default_price.get("cached_input"), self.default_price.get("cache_write"),
                where="default_price",
            )  # fmt: skip
        if not isinstance(self.usage_retention_days, int) or not (
            1 <= self.usage_retention_days <= 3660
        ):
            raise ConfigurationError("usage_retention_days", "must be 1..3660")

    def with_env(self) -> QuotaConfig:
        """This config with the environment's overrides: ``QUOTA_REDIS_URL``, when set, replaces
        ``storage.url`` (every other storage field carried over). :meth:`from_toml`, the
        middlewares and the command line apply it; a ``QuotaConfig(...)`` built in code does
        not read the environment until then."""
        env_url = os.environ.get("QUOTA_REDIS_URL")
        if not env_url or env_url == self.storage.url:
            return self
        storage = dataclasses.replace(self.storage, url=env_url)
        return dataclasses.replace(self, storage=storage)

    def plan(self, name: str | None) -> Plan:
        """The plan called ``name``, or the default plan for unknown or missing names."""
        for p in self.plans:
            if p.name == name:
                return p
        for p in self.plans:
            if p.name == self.default_plan:
                return p
        raise AssertionError("unreachable: default plan validated")

    def ai_route(self, method: str, path: str) -> AIRoute | None:
        for route in self.ai_routes:
            if route.matches(method, path):
                return route
        return None

    def has_plan(self, name: str) -> bool:
        return any(p.name == name for p in self.plans)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> QuotaConfig:
        """Load a policy file; see the README's configuration reference for its keys.
        ``QUOTA_REDIS_URL``, when set, overrides its ``storage.url`` (:meth:`with_env`)."""
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigurationError("policy", f"cannot read {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigurationError("policy", f"{path} is not valid TOML: {e}") from None
        return cls.from_dict(data, base_dir=Path(path).parent).with_env()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base_dir: Path | None = None) -> QuotaConfig:
        check_keys(data, set(cls.__dataclass_fields__), "")
        plans_d = data.get("plans")
        if not isinstance(plans_d, Mapping) or not plans_d:
            raise ConfigurationError("plans", "a [plans.NAME] table is required")
        plans = [_plan_from_dict(name, p) for name, p in plans_d.items()]
        routes_d = _table(data, "routes")
        check_keys(routes_d, {"include", "exempt", "weights"}, "routes")
        weights = _tables(routes_d, "weights", "routes", RouteWeight)
        routes = Routes(
            include=routes_d.get("include", ("*",)),
            exempt=routes_d.get("exempt", ()),
            weights=weights,
        )
        storage_d = _table(data, "storage")
        check_keys(storage_d, set(StorageConfig.__dataclass_fields__), "storage")
        identity = IdentityConfig.from_dict(_table(data, "identity"), base_dir=base_dir)
        ai_routes = _tables(data, "ai_routes", "", AIRoute)
        extra: dict[str, Any] = {
            k: data[k]
            for k in (
                "prices",
                "unpriced",
                "default_price",
                "usage_retention_days",
                "input_margins",
                "learn_input_margins",
                "rollups",
            )  # fmt: skip
            if k in data
        }
        if "prices_file" in data:
            pf = data["prices_file"]
            if not isinstance(pf, str) or not pf:
                raise ConfigurationError("prices_file", "a path to a JSON price file")
            extra["prices_file"] = str(base_dir / pf) if base_dir is not None else pf
        app_budgets = _tables(data, "app_budgets", "", AppBudget)
        if app_budgets:
            extra["app_budgets"] = app_budgets
        tenant_budgets = _tables(data, "tenant_budgets", "", TenantBudget)
        if tenant_budgets:
            extra["tenant_budgets"] = tenant_budgets
        if "spikes" in data:
            spikes = _table(data, "spikes")
            check_keys(spikes, set(SpikeRule.__dataclass_fields__), "spikes")
            extra["spikes"] = SpikeRule(**spikes)
        if "proxy" in data:
            extra["proxy"] = ProxyConfig.from_dict(_table(data, "proxy"))
        if "alerts" in data:
            from quota_middleware.alerts._config import AlertsConfig

            extra["alerts"] = AlertsConfig.from_dict(_table(data, "alerts"), base_dir=base_dir)
        if "admin" in data:
            from quota_middleware.admin._config import AdminConfig

            extra["admin"] = AdminConfig.from_dict(_table(data, "admin"))
        return cls(
            plans=plans,
            default_plan=data.get("default_plan"),
            routes=routes,
            identity=identity,
            storage=StorageConfig(**storage_d),
            ai_routes=ai_routes,
            **extra,
        )


def _proxy_routes(config: QuotaConfig) -> list[AIRoute]:
    """The AI routes of the proxy's metered operations that ``ai_routes`` does not declare."""
    if config.proxy is None:
        return []
    declared = {(m, r.path) for r in config.ai_routes for m in r.methods}
    return [
        AIRoute(path=path, format=fmt, methods=(method,))  # type: ignore[arg-type]
        for method, path, fmt in config.proxy.ai_endpoints()
        if (method, path) not in declared
    ]


def _table(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigurationError(key, "must be a table")
    return value


def _init_fields(cls: Any) -> set[str]:
    """The fields a user may set (derived ones, like a bucket's interval, are not)."""
    return {name for name, f in cls.__dataclass_fields__.items() if f.init}


def _list(data: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise ConfigurationError(f"{where}.{key}" if where else key, "must be a list")
    return value


def _tables(data: Mapping[str, Any], key: str, where: str, cls: type[T]) -> list[T]:
    """The array of tables ``data[key]`` (``[[key]]``), each checked for unknown keys and built
    as ``cls``; errors name ``{where}.{key}[i]``."""
    base = f"{where}.{key}" if where else key
    items = []
    for i, item in enumerate(_list(data, key, where)):
        at = f"{base}[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigurationError(at, "must be a table")
        check_keys(item, _init_fields(cls), at)
        try:
            items.append(cls(**item))
        except TypeError as e:  # a required key left out: the class's own errors name theirs
            raise ConfigurationError(at, str(e).split(".__init__() ", 1)[-1]) from None
    return items


def _plan_from_dict(name: str, d: Any) -> Plan:
    where = f"plans.{name}"
    if not isinstance(d, Mapping):
        raise ConfigurationError(where, "must be a table")
    check_keys(d, {"limits", "shadow", "on_error", "models", "timezone", "hard_stop"}, where)
    limits: list[Limit] = []
    for i, lim in enumerate(_list(d, "limits", where)):
        lw = f"{where}.limits[{i}]"
        if not isinstance(lim, Mapping) or "type" not in lim:
            raise ConfigurationError(lw, f"needs a 'type' ({', '.join(LIMIT_TYPES)})")
        kind: Callable[..., Limit] | None = LIMIT_TYPES.get(lim["type"])
        if kind is None:
            raise ConfigurationError(f"{lw}.type", f"unknown limit type {lim['type']!r}")
        params = {k: v for k, v in lim.items() if k != "type"}
        check_keys(params, _init_fields(kind), lw)
        limits.append(construct(kind, params, lw))
    shadow, hard_stop = d.get("shadow", False), d.get("hard_stop", False)
    for flag, value in (("shadow", shadow), ("hard_stop", hard_stop)):
        if not isinstance(value, bool):
            raise ConfigurationError(f"{where}.{flag}", "must be true or false")
    return Plan(
        name=name,
        limits=limits,
        shadow=shadow,
        on_error=d.get("on_error", "open"),
        models=d.get("models"),
        timezone=d.get("timezone", "UTC"),
        hard_stop=hard_stop,
    )


def load_config(config: QuotaConfig | str | os.PathLike[str]) -> QuotaConfig:
    """The middlewares' policy: a TOML file or a value, with the environment's overrides
    (``QUOTA_REDIS_URL``) applied here, at construction, not by the value itself."""
    if isinstance(config, QuotaConfig):
        return config.with_env()
    return QuotaConfig.from_toml(config)
