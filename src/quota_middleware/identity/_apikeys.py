"""API keys: the key format, static keys from the policy, and a key store that keeps only digests.

A key reads ``<prefix>_<key_id>_<secret><checksum>``, e.g. ``qm_3kTMd9ZxYw1Q_...``: a 12-character
public id, a 32-character secret and a 6-character CRC32 checksum, all base62. The checksum lets a
typo or a made-up key be refused without a store lookup (and lets secret scanners spot leaked keys).

The store (Redis, or the memory backend) keeps per key a hash ``{prefix}:key:{<key_id>}`` holding
the SHA-256 digest of the key, never the key; :meth:`KeyStore.create` shows the plain key once.

Lookups during requests are cached in-process for ``cache_ttl`` seconds (default 10), so a revoked
key keeps working for up to that long on each app server: the revocation delay is the cache TTL.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from quota_middleware.base._scripts import ScriptArg, ScriptCall
from quota_middleware.errors import (
    ApiKeyNotActive,
    ApiKeyNotFound,
    ConfigurationError,
    InvalidArgument,
    InvalidCredentials,
    KeyIdExhausted,
)

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
KEY_ID_LEN = 12
SECRET_LEN = 32
CHECKSUM_LEN = 6
_PREFIX_RE = re.compile(r"[A-Za-z][A-Za-z0-9]{0,15}")
_KEY_ID_RE = re.compile(rf"[0-9A-Za-z]{{{KEY_ID_LEN}}}")
_TAIL_RE = re.compile(rf"([0-9A-Za-z]{{{KEY_ID_LEN}}})_[0-9A-Za-z]{{{SECRET_LEN + CHECKSUM_LEN}}}")
_DIGEST_RE = re.compile(r"(?:sha256:)?([0-9a-f]{64})")
_NAME_RE = re.compile(r"[\x21-\x7e]{1,256}")
_US = 1_000_000


def _base62(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, 62)
        out.append(_ALPHABET[r])
    return "".join(reversed(out))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode("ascii")), CHECKSUM_LEN)


def generate_key(prefix: str = "qm") -> str:
    """A new random key ``<prefix>_<key_id>_<secret><checksum>`` (190 bits of randomness)."""
    _check_prefix(prefix, "prefix")
    key_id = "".join(secrets.choice(_ALPHABET) for _ in range(KEY_ID_LEN))
    secret = "".join(secrets.choice(_ALPHABET) for _ in range(SECRET_LEN))
    body = f"{prefix}_{key_id}_{secret}"
    return body + _checksum(body)


def parse_key(key: str, prefix: str = "qm") -> str | None:
    """The key id of a well-formed key with a valid checksum, else ``None``. Pure CPU."""
    expected = len(prefix) + 2 + KEY_ID_LEN + SECRET_LEN + CHECKSUM_LEN
    if len(key) != expected or not key.startswith(prefix + "_"):
        return None
    m = _TAIL_RE.fullmatch(key, len(prefix) + 1)
    if m is None:
        return None
    body, check = key[:-CHECKSUM_LEN], key[-CHECKSUM_LEN:]
    # Not a secret comparison (the checksum is public), but there is no reason to leak timing.
    if not hmac.compare_digest(_checksum(body), check):
        return None
    return m.group(1)


def key_digest(key: str) -> str:
    """Hex SHA-256 of a key: what configs and stores keep instead of the key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _check_prefix(prefix: Any, where: str) -> None:
    if not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix):
        raise ConfigurationError(where, "1-16 of [A-Za-z0-9], starting with a letter")


# -- records --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What the store knows about one key. ``status`` is as of the store's clock when read."""

    key_id: str
    caller: str
    plan: str | None
    tenant: str
    created: float  # unix seconds
    expires: float | None  # unix seconds; None: never
    revoked: bool
    status: str  # "active" | "revoked" | "expired"
    digest: str = field(repr=False)

    @property
    def active(self) -> bool:
        return self.status == "active"


@dataclass(frozen=True, slots=True)
class StaticKey:
    """A key listed in the policy: who it belongs to."""

    caller: str
    plan: str | None = None
    tenant: str = "default"


def record_key(prefix: str, key_id: str) -> str:
    # Hash-tagged per key id, so each record is one cluster slot of its own.
    return f"{prefix}:key:{{{key_id}}}"


def index_key(prefix: str) -> str:
    return f"{prefix}:keys"


def _now_arg(now: float | None) -> ScriptArg:
    return "" if now is None else int(now * _US)


def lookup_call(prefix: str, key_id: str, now: float | None = None) -> ScriptCall:
    """The ``key_lookup`` call for one key id (``now`` overrides the store clock: tests only)."""
    return ScriptCall("key_lookup", (record_key(prefix, key_id),), (_now_arg(now),))


def _str(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def parse_record(key_id: str, reply: Any) -> KeyRecord | None:
    """A ``key_lookup`` reply as a record; ``None`` for no record or a reply of the wrong shape."""
    if not isinstance(reply, list | tuple) or len(reply) != 8:
        return None
    caller, plan, tenant, created, expires, revoked, digest, status = (_str(v) for v in reply)
    try:
        created_us, expires_us = int(created), int(expires)
    except ValueError:
        return None
    return KeyRecord(
        key_id=key_id,
        caller=caller,
        plan=plan or None,
        tenant=tenant or "default",
        created=created_us / _US,
        expires=expires_us / _US if expires_us > 0 else None,
        revoked=revoked == "1",
        status=status,
        digest=digest,
    )


# -- the store ------------------------------------------------------------------------------


class KeyStore:
    """Create, list, revoke, rotate and read API keys in a store, through the ``key_*`` scripts.

    ``backend`` is any sync backend (``.run(ScriptCall)``): ``MemoryBackend()`` or
    ``SyncRedisBackend(redis.Redis(...))``. ``prefix`` is the storage key prefix and must match
    the middleware's ``storage.prefix``; ``key_prefix`` is the text keys start with. ``clock``
    (unix seconds) overrides the store's clock, for tests. Records of expired or revoked keys are
    kept ``retention`` seconds for listing, then the store drops them.
    """

    def __init__(
        self,
        backend: Any,
        *,
        prefix: str = "qm",
        key_prefix: str = "qm",
        retention: float = 30 * 86400,
        clock: Callable[[], float] | None = None,
    ) -> None:
        _check_prefix(key_prefix, "key_prefix")
        self.backend = backend
        self.prefix = prefix
        self.key_prefix = key_prefix
        self.retention_ms = int(retention * 1000)
        self._clock = clock

    def _now(self) -> ScriptArg:
        return _now_arg(None if self._clock is None else self._clock())

    def create(
        self,
        caller: str,
        plan: str | None = None,
        *,
        tenant: str = "default",
        expires_in: float | None = None,
    ) -> tuple[str, KeyRecord]:
        """A new key for ``caller``: returns the plain key (shown this once) and its record."""
        for name, value in (("caller", caller), ("tenant", tenant)):
            if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
                raise InvalidArgument(f"{name} must be 1-256 printable ASCII characters")
        if plan is not None and (not isinstance(plan, str) or not _NAME_RE.fullmatch(plan)):
            raise InvalidArgument("plan must be 1-256 printable ASCII characters")
        if expires_in is not None and not expires_in > 0:
            raise InvalidArgument("expires_in must be positive seconds")
        ttl_us = 0 if expires_in is None else max(1, int(expires_in * _US))
        for _ in range(3):
            key = generate_key(self.key_prefix)
            key_id = key[len(self.key_prefix) + 1 : len(self.key_prefix) + 1 + KEY_ID_LEN]
            # Index first: a crash between the two calls leaves a dangling id that list() prunes,
            # never a live key that cannot be listed.
            self.backend.run(ScriptCall("key_list", (index_key(self.prefix),), ("add", key_id)))
            args: tuple[ScriptArg, ...] = (
                self._now(), caller, plan or "", tenant, ttl_us, key_digest(key), self.retention_ms
            )  # fmt: skip
            reply = self.backend.run(
                ScriptCall("key_put", (record_key(self.prefix, key_id),), args)
            )
            if int(reply[0]) == 1:
                created, expires = int(reply[1]), int(reply[2])
                return key, KeyRecord(
                    key_id=key_id,
                    caller=caller,
                    plan=plan,
                    tenant=tenant,
                    created=created / _US,
                    expires=expires / _US if expires else None,
                    revoked=False,
                    status="active",
                    digest=key_digest(key),
                )
        raise KeyIdExhausted("could not allocate a unique key id")  # pragma: no cover

    def get(self, key_id: str) -> KeyRecord | None:
        """The record of ``key_id`` (any status), or ``None``."""
        if not isinstance(key_id, str) or not _KEY_ID_RE.fullmatch(key_id):
            return None
        now = None if self._clock is None else self._clock()
        return parse_record(key_id, self.backend.run(lookup_call(self.prefix, key_id, now)))

    def list(self, caller: str | None = None) -> list[KeyRecord]:
        """Every key (of ``caller``), oldest first, including revoked and expired ones.

        One store call per key (records live in different cluster slots): meant for admin tools.
        """
        ids = self.backend.run(ScriptCall("key_list", (index_key(self.prefix),), ("list",)))
        records: list[KeyRecord] = []
        gone: list[str] = []
        for key_id in sorted(_str(i) for i in ids):
            rec = self.get(key_id)
            if rec is None:
                gone.append(key_id)
            elif caller is None or rec.caller == caller:
                records.append(rec)
        if gone:
            self.backend.run(ScriptCall("key_list", (index_key(self.prefix),), ("remove", *gone)))
        return sorted(records, key=lambda r: (r.created, r.key_id))

    def revoke(self, key_id: str) -> bool:
        """Revoke ``key_id``; False if there is no such key or it was revoked already.

        App servers may accept the key for up to their cache TTL (default 10 s) afterwards.
        """
        if not isinstance(key_id, str) or not _KEY_ID_RE.fullmatch(key_id):
            return False
        call = ScriptCall(
            "key_revoke", (record_key(self.prefix, key_id),), (self._now(), self.retention_ms)
        )
        return int(self.backend.run(call)) == 1

    def rotate(self, key_id: str, *, grace: float) -> tuple[str, KeyRecord]:
        """Replace ``key_id`` with a new key for the same caller, plan and tenant (and the same
        remaining lifetime, if it has one); the old key keeps working for ``grace`` more seconds
        (never longer than it would have), then expires. Returns the new plain key (shown this
        once) and its record. Raises :class:`~quota_middleware.errors.ApiKeyNotFound` when
        ``key_id`` is unknown and :class:`~quota_middleware.errors.ApiKeyNotActive` when it is
        revoked or expired (both ``ValueError``). App servers may accept the old key for up to
        their cache TTL after the grace.
        """
        if not isinstance(grace, int | float) or not 0 <= grace <= 366 * 86400:
            raise InvalidArgument("grace must be between 0 seconds and 366 days")
        old = self.get(key_id)
        if old is None:
            raise ApiKeyNotFound(f"no API key {key_id!r}")
        if not old.active:
            raise ApiKeyNotActive(
                f"API key {key_id} is {old.status}: only active keys can be rotated"
            )
        expires_in = None
        if old.expires is not None:
            now = self._clock() if self._clock is not None else time.time()
            expires_in = old.expires - now
            if expires_in <= 0:
                raise ApiKeyNotActive(
                    f"API key {key_id} is expired: only active keys can be rotated"
                )
        key, rec = self.create(old.caller, old.plan, tenant=old.tenant, expires_in=expires_in)
        call = ScriptCall(
            "key_expire",
            (record_key(self.prefix, old.key_id),),
            (self._now(), int(grace * _US), self.retention_ms),
        )
        reply = self.backend.run(call)
        if int(reply[0]) != 1:
            # Revoked or expired in the meantime: the new key must not outlive the old one.
            self.revoke(rec.key_id)
            raise ApiKeyNotActive(
                f"API key {key_id} is {_str(reply[1])}: only active keys can be rotated"
            )
        return key, rec


# -- request-time verification ----------------------------------------------------------------

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
        _check_prefix(self.prefix, f"{w}.prefix")
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
    m = _DIGEST_RE.fullmatch(key) if isinstance(key, str) else None
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
        if not isinstance(v, str) or not _NAME_RE.fullmatch(v):
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
