"""Request-time API key checks: the policy's key table (:class:`ApiKeyConfig`) and the verifier.

Lookups during requests are cached in-process for ``cache_ttl`` seconds (default 10), so a revoked
key keeps working for up to that long on each app server: the revocation delay is the cache TTL.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from quota_middleware.base._scripts import ScriptCall
from quota_middleware.errors import ConfigurationError, InvalidCredentials
from quota_middleware.identity._keyformat import (
    DIGEST_RE,
    KEY_ID_LEN,
    NAME_RE,
    StaticKey,
    check_prefix,
    key_digest,
    lookup_call,
    parse_key,
    parse_record,
)

K = TypeVar("K")
V = TypeVar("V")


class TTLCache(Generic[K, V]):
    """A bounded, thread-safe LRU whose entries each carry their own expiry time."""

    def __init__(self, maxsize: int, clock: Callable[[], float]) -> None:
        self.maxsize = maxsize
        self._clock = clock
        self._data: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> tuple[V] | None:
        """``(value,)`` on a live hit, else ``None``."""
        with self._lock:
            entry = self._data.get(key)
            if entry is None:
                return None
            if entry[0] <= self._clock():
                del self._data[key]
                return None
            self._data.move_to_end(key)
            return (entry[1],)

    def put(self, key: K, value: V, until: float) -> None:
        if self.maxsize <= 0 or until <= self._clock():
            return
        with self._lock:
            self._data[key] = (until, value)
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiKeyConfig:
    """Where keys come from: the ``header`` (and ``Authorization: Bearer <prefix>_...``).

    ``store``: ``"redis"`` looks keys up in the configured storage (Redis or memory) after the
    ``static`` ones; ``"static"`` accepts only ``static`` keys. ``static`` maps plain keys or their
    digests (``"sha256:<hex>"``) to ``{caller, plan, tenant}``; only digests are kept.
    ``cache_ttl`` is also the longest a revoked key keeps working on each server.
    """

    header: str | None = "X-API-Key"
    bearer: bool = True
    prefix: str = "qm"
    store: str | None = None  # default: "static" when static keys are given, else "redis"
    static: Mapping[str, Any] = field(default_factory=dict)
    cache_ttl: float = 10.0
    negative_cache_ttl: float = 2.0
    cache_size: int = 10_000

    def __post_init__(self) -> None:
        w = "identity.api_keys"
        if self.header is not None and (
            not isinstance(self.header, str) or not re.fullmatch(r"[A-Za-z0-9-]{1,64}", self.header)
        ):
            raise ConfigurationError(f"{w}.header", "must be an HTTP header name")
        check_prefix(self.prefix, f"{w}.prefix")
        if not isinstance(self.static, Mapping):
            raise ConfigurationError(f"{w}.static", "must be a table of key -> {caller, plan}")
        static = {
            _static_digest(k, self.prefix): _static_entry(k, v) for k, v in self.static.items()
        }
        store = self.store or ("static" if static else "redis")
        if store not in ("redis", "static"):
            raise ConfigurationError(f"{w}.store", "must be 'redis' or 'static'")
        if self.header is None and not self.bearer:
            raise ConfigurationError(f"{w}.header", "no header and bearer = false: keys unusable")
        for name in ("cache_ttl", "negative_cache_ttl"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 <= value <= 3600:
                raise ConfigurationError(f"{w}.{name}", "must be in [0, 3600] seconds")
        if not isinstance(self.cache_size, int) or self.cache_size < 0:
            raise ConfigurationError(f"{w}.cache_size", "must be an integer >= 0")
        object.__setattr__(self, "static", {f"sha256:{d}": e for d, e in static.items()})
        object.__setattr__(self, "store", store)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ApiKeyConfig:
        allowed = set(cls.__dataclass_fields__)
        for k in d:
            if k not in allowed:
                raise ConfigurationError(
                    f"identity.api_keys.{k}", f"unknown key; expected one of {sorted(allowed)}"
                )
        return cls(**d)


def _static_digest(key: Any, prefix: str) -> str:
    m = DIGEST_RE.fullmatch(key) if isinstance(key, str) else None
    if m:
        return m.group(1)
    if not isinstance(key, str) or parse_key(key, prefix) is None:
        # Never echo what might be a real key into an error message or log.
        shown = key[: len(prefix) + 1 + KEY_ID_LEN] + "..." if isinstance(key, str) else "?"
        raise ConfigurationError(
            f"identity.api_keys.static[{shown!r}]",
            f"not a valid {prefix!r} key (bad format or checksum) nor 'sha256:<64 hex>'",
        )
    return key_digest(key)


def _static_entry(key: Any, value: Any) -> StaticKey:
    where = "identity.api_keys.static[...]"
    if isinstance(value, StaticKey):
        return value
    if isinstance(value, str):
        value = {"caller": value}
    if not isinstance(value, Mapping):
        raise ConfigurationError(where, "must be a table {caller, plan, tenant}")
    for k in value:
        if k not in ("caller", "plan", "tenant"):
            raise ConfigurationError(f"{where}.{k}", "unknown key; expected caller, plan, tenant")
    caller, plan, tenant = value.get("caller"), value.get("plan"), value.get("tenant", "default")
    for name, v in (("caller", caller), ("tenant", tenant)):
        if not isinstance(v, str) or not NAME_RE.fullmatch(v):
            raise ConfigurationError(f"{where}.{name}", "must be 1-256 printable ASCII characters")
    if plan is not None and not isinstance(plan, str):
        raise ConfigurationError(f"{where}.plan", "must be a plan name")
    assert isinstance(caller, str) and isinstance(tenant, str)
    return StaticKey(caller=caller, plan=plan, tenant=tenant)


@dataclass(frozen=True, slots=True)
class KeyMatch:
    """A verified key: its id and owner."""

    key_id: str
    caller: str
    plan: str | None
    tenant: str


class ApiKeyVerifier:
    """Checks presented keys: format and checksum, static keys, then the store through a cache."""

    def __init__(
        self, config: ApiKeyConfig, *, prefix: str = "qm", clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config
        self.prefix = prefix
        self._clock = clock
        self._static = {bytes.fromhex(d[7:]): e for d, e in config.static.items()}
        self._cache: TTLCache[bytes, KeyMatch | None] = TTLCache(config.cache_size, clock)

    def verify(self, key: str, *, scheme: str = "ApiKey") -> Generator[ScriptCall, Any, KeyMatch]:
        """Yields at most one ``key_lookup`` call; raises :class:`InvalidCredentials`."""
        cfg = self.config
        key_id = parse_key(key, cfg.prefix)
        if key_id is None:
            raise InvalidCredentials("malformed API key", scheme=scheme)
        digest = hashlib.sha256(key.encode("ascii")).digest()
        entry = self._static.get(digest)
        if entry is not None:
            return KeyMatch(key_id, entry.caller, entry.plan, entry.tenant)
        if cfg.store == "static":
            raise InvalidCredentials("unknown API key", scheme=scheme)
        hit = self._cache.get(digest)
        if hit is not None:
            if hit[0] is None:
                raise InvalidCredentials("unknown, expired or revoked API key", scheme=scheme)
            return hit[0]
        # A StorageError thrown in here propagates untouched, and nothing is cached for it.
        reply = yield lookup_call(self.prefix, key_id)
        rec = parse_record(key_id, reply)
        now = self._clock()
        if (
            rec is None
            or not rec.active
            or not hmac.compare_digest(rec.digest.encode("ascii", "replace"), digest.hex().encode())
        ):
            self._cache.put(digest, None, now + cfg.negative_cache_ttl)
            raise InvalidCredentials("unknown, expired or revoked API key", scheme=scheme)
        match = KeyMatch(key_id, rec.caller, rec.plan, rec.tenant)
        until = now + cfg.cache_ttl
        if rec.expires is not None:
            until = min(until, rec.expires)
        self._cache.put(digest, match, until)
        return match
