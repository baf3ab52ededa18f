"""Who is calling: JWT bearer tokens, API keys, a custom resolver or the client IP -> ``Caller``.

:meth:`Identifier.identify` is a sans-IO generator, driven like an httpx auth flow: it yields a
:class:`~quota_middleware.scripts.ScriptCall` when an API key must be looked up in the store and is
sent the reply; everything else is pure CPU. Verified JWTs and key lookups are cached in-process,
so a repeat caller normally costs no store round trip. A revoked key keeps working for up to the
key cache TTL (``identity.api_keys.cache_ttl``, default 10 s).

Bad credentials are always :class:`InvalidCredentials` (401), never a fall-through to the IP: a
client that sends a token must send a good one.
"""

from __future__ import annotations

import hashlib
import importlib
import ipaddress
import re
import time
from collections.abc import Callable, Collection, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quota_middleware.base._request import RequestInfo
from quota_middleware.base._scripts import ScriptCall
from quota_middleware.errors import (
    ConfigurationError,
    IdentificationError,
    InvalidCredentials,
    MissingCredentials,
    check_keys,
)
from quota_middleware.identity._apikeys import ApiKeyConfig, ApiKeyVerifier, TTLCache
from quota_middleware.identity._client_ip import IPAddress, client_id, parse_ip, parse_networks
from quota_middleware.identity._jwt import JWTConfig, decode_token, rejection

__all__ = [
    "METHODS",
    "Caller",
    "IPAddress",
    "IdentityConfig",
    "Identifier",
    "JWTConfig",
    "Resolver",
    "parse_ip",
]

METHODS = ("jwt", "api_key", "custom", "ip")
_TABLES = ("jwt", "api_keys", "resolver")
_JWT_RE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_CLAIM_RE = re.compile(r"[^\x00-\x1f\x7f]{1,256}")


@dataclass(frozen=True, slots=True)
class Caller:
    """An identified caller. ``plan=None`` means the policy's default plan."""

    id: str
    plan: str | None = None
    tenant: str = "default"
    source: str = "ip"  # "jwt" | "api_key" | "ip" | "custom"
    key_id: str | None = None  # the API key id when source == "api_key"; never the secret


Resolver = Callable[[RequestInfo], Caller | None]


# -- the whole identity section --------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class IdentityConfig:
    """How callers are identified. ``order`` defaults to ``jwt, api_key, custom, ip``, keeping
    only configured methods. ``anonymous="reject"`` answers 401 instead of keying by IP.

    ``trusted_proxies`` (CIDRs) are the only peers whose ``X-Forwarded-For`` is believed.
    """

    order: Sequence[str] | None = None
    anonymous: str = "ip"
    trusted_proxies: Sequence[str] = ()
    ipv6_prefix: int = 64
    jwt: JWTConfig | None = None
    api_keys: ApiKeyConfig | None = None
    resolver: Resolver | None = None
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        init=False, repr=False, compare=False, default=()
    )

    def __post_init__(self) -> None:
        w = "identity"
        if self.anonymous not in ("ip", "reject"):
            raise ConfigurationError(f"{w}.anonymous", "must be 'ip' or 'reject'")
        available = {
            "jwt": self.jwt is not None,
            "api_key": self.api_keys is not None,
            "custom": self.resolver is not None,
            "ip": self.anonymous == "ip",
        }
        if self.order is None:
            order = tuple(m for m in METHODS if available[m])
        else:
            if isinstance(self.order, str):
                raise ConfigurationError(f"{w}.order", "must be a list")
            order = tuple(self.order)
            for m in order:
                if m not in METHODS:
                    raise ConfigurationError(f"{w}.order", f"unknown method {m!r}; use {METHODS}")
                if not available[m]:
                    hint = "anonymous = 'reject'" if m == "ip" else "it is not configured"
                    raise ConfigurationError(f"{w}.order", f"{m!r} is listed but {hint}")
            if len(set(order)) != len(order):
                raise ConfigurationError(f"{w}.order", "lists a method twice")
            if "ip" in order and order[-1] != "ip":
                raise ConfigurationError(f"{w}.order", "'ip' always succeeds, so it must be last")
        if not order:
            raise ConfigurationError(f"{w}.order", "no identification method is configured")
        object.__setattr__(self, "order", order)
        nets = parse_networks(self.trusted_proxies, f"{w}.trusted_proxies")
        object.__setattr__(self, "trusted_proxies", tuple(self.trusted_proxies))
        object.__setattr__(self, "networks", nets)
        if not isinstance(self.ipv6_prefix, int) or not 8 <= self.ipv6_prefix <= 128:
            raise ConfigurationError(f"{w}.ipv6_prefix", "must be in [8, 128]")
        if self.resolver is not None and not callable(self.resolver):
            raise ConfigurationError(f"{w}.resolver", "must be callable")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, base_dir: Path | None = None) -> IdentityConfig:
        """From the TOML ``[identity]`` table; ``resolver`` may name ``"package.module:func"``."""
        check_keys(
            d, ("order", "anonymous", "trusted_proxies", "ipv6_prefix") + _TABLES, "identity"
        )
        kw: dict[str, Any] = {k: v for k, v in d.items() if k not in _TABLES}
        if "jwt" in d:
            if not isinstance(d["jwt"], Mapping):
                raise ConfigurationError("identity.jwt", "must be a table")
            kw["jwt"] = JWTConfig.from_dict(d["jwt"], base_dir=base_dir)
        if "api_keys" in d:
            if not isinstance(d["api_keys"], Mapping):
                raise ConfigurationError("identity.api_keys", "must be a table")
            kw["api_keys"] = ApiKeyConfig.from_dict(d["api_keys"])
        if "resolver" in d:
            kw["resolver"] = _import(d["resolver"])
        return cls(**kw)


def _import(spec: Any) -> Resolver:
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ConfigurationError("identity.resolver", "must be 'package.module:function'")
    mod_name, attr = spec.split(":")
    try:
        obj = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigurationError("identity.resolver", f"cannot import {spec!r}: {e}") from None
    if not callable(obj):
        raise ConfigurationError("identity.resolver", f"{spec!r} is not callable")
    resolver: Resolver = obj
    return resolver


# -- identification --------------------------------------------------------------------------


class Identifier:
    """Turns a request into a :class:`Caller`; one per middleware, safe to share across threads.

    ``prefix`` is the storage key prefix (``storage.prefix``). ``plans``: the policy's plan names;
    a token or key naming any other plan gets the default plan (``plan=None``). ``clock`` (unix
    seconds) drives the caches; inject one in tests.
    """

    def __init__(
        self,
        config: IdentityConfig,
        *,
        prefix: str = "qm",
        plans: Collection[str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.prefix = prefix
        self._plans = frozenset(plans) if plans is not None else None
        self._peer_ids: dict[str, str] = {}
        self._ip_callers: dict[str, Caller] = {}
        self._wants_bearer = config.jwt is not None or (
            config.api_keys is not None and config.api_keys.bearer
        )
        self._clock = clock
        jc = config.jwt
        self._jwt_cache: TTLCache[bytes, Caller] = TTLCache(jc.cache_size if jc else 0, clock)
        ak = config.api_keys
        self._keys = ApiKeyVerifier(ak, prefix=prefix, clock=clock) if ak else None
        self._key_marker = f"{ak.prefix}_" if ak and ak.bearer else None
        self._scheme = "Bearer" if jc is not None or (ak and ak.bearer) else "ApiKey"

    def identify(self, info: RequestInfo) -> Generator[ScriptCall, Any, Caller]:
        """Yield store calls (API key lookups), return the Caller; raise IdentificationError."""
        bearer = self._bearer(info) if self._wants_bearer else None
        for method in self.config.order or ():
            if method == "jwt":
                if bearer is not None and not self._is_key(bearer):
                    return self._verify_jwt(bearer)
            elif method == "api_key":
                assert self._keys is not None
                key, scheme = self._api_key(info, bearer)
                if key is not None:
                    m = yield from self._keys.verify(key, scheme=scheme)
                    plan = self._plan(m.plan)
                    return Caller(m.caller, plan, m.tenant, source="api_key", key_id=m.key_id)
            elif method == "custom":
                assert self.config.resolver is not None
                caller = self.config.resolver(info)
                if caller is not None:
                    return caller
            else:
                return self._ip_caller(info)
        raise MissingCredentials("credentials required", scheme=self._scheme)

    # -- credentials -----------------------------------------------------------------------

    @staticmethod
    def _bearer(info: RequestInfo) -> str | None:
        value = info.headers.get("authorization")
        if value is None:
            return None
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer":
            return None
        return token.strip()

    def _is_key(self, token: str) -> bool:
        return self._key_marker is not None and token.startswith(self._key_marker)

    def _api_key(self, info: RequestInfo, bearer: str | None) -> tuple[str | None, str]:
        ak = self.config.api_keys
        assert ak is not None
        if ak.header is not None:
            value = info.headers.get(ak.header)
            if value is not None and value.strip():
                return value.strip(), "ApiKey"
        if bearer is not None and self._is_key(bearer):
            return bearer, "Bearer"
        return None, "ApiKey"

    def _plan(self, plan: Any) -> str | None:
        if not isinstance(plan, str) or (self._plans is not None and plan not in self._plans):
            return None
        return plan

    def _verify_jwt(self, token: str) -> Caller:
        jc = self.config.jwt
        assert jc is not None
        if len(token) > jc.max_token_bytes:
            raise InvalidCredentials("token too long")
        if not _JWT_RE.fullmatch(token):
            raise InvalidCredentials("malformed token")
        cache_key = hashlib.sha256(token.encode("ascii")).digest()
        hit = self._jwt_cache.get(cache_key)
        if hit is not None:
            return hit[0]
        try:
            claims = self._decode(jc, token)
        except IdentificationError:
            raise
        except Exception as e:
            raise rejection(e) from None
        caller = self._caller_from(jc, claims)
        now = self._clock()
        until = now + jc.cache_ttl
        exp = claims.get("exp")
        if isinstance(exp, int | float) and not isinstance(exp, bool):
            until = min(until, float(exp))
        self._jwt_cache.put(cache_key, caller, until)
        return caller

    # An attribute, not a call to decode_token, so tests can count decodes.
    _decode = staticmethod(decode_token)

    def _caller_from(self, jc: JWTConfig, claims: Mapping[str, Any]) -> Caller:
        sub = claims.get(jc.subject_claim)
        if not isinstance(sub, str) or not _CLAIM_RE.fullmatch(sub):
            raise InvalidCredentials(f"token has no usable {jc.subject_claim!r} claim")
        tenant = "default"
        if jc.tenant_claim is not None and jc.tenant_claim in claims:
            t = claims[jc.tenant_claim]
            if not isinstance(t, str) or not _CLAIM_RE.fullmatch(t):
                raise InvalidCredentials(f"token has an unusable {jc.tenant_claim!r} claim")
            tenant = t
        plan = self._plan(claims.get(jc.plan_claim)) if jc.plan_claim else None
        return Caller(sub, plan, tenant, source="jwt")

    # -- client address ---------------------------------------------------------------------

    def _ip_caller(self, info: RequestInfo) -> Caller:
        client = info.client
        caller = self._ip_callers.get(client) if client else None
        if caller is None:
            caller = Caller(self.client_id(info), source="ip")
            # only peers whose id does not depend on X-Forwarded-For are cached (client_id
            # cached them in _peer_ids)
            if client and client in self._peer_ids:
                if len(self._ip_callers) >= 10_000:
                    self._ip_callers.clear()
                self._ip_callers[client] = caller
        return caller

    def client_id(self, info: RequestInfo) -> str:
        """The client's IP (or IPv6 network), walking X-Forwarded-For through trusted proxies."""
        return client_id(info, self.config.networks, self.config.ipv6_prefix, self._peer_ids)
