"""API keys: the key format and the stored record of a key.

A key reads ``<prefix>_<key_id>_<secret><checksum>``, e.g. ``qm_3kTMd9ZxYw1Q_...``: a 12-character
public id, a 32-character secret and a 6-character CRC32 checksum, all base62. The checksum lets a
typo or a made-up key be refused without a store lookup (and lets secret scanners spot leaked keys).

The store (Redis, or the memory backend) keeps per key a hash ``{prefix}:key:{<key_id>}`` holding
the SHA-256 digest of the key, never the key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import zlib
from dataclasses import dataclass, field
from typing import Any

from quota_middleware.base._scripts import ScriptArg, ScriptCall, as_str
from quota_middleware.errors import ConfigurationError

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
KEY_ID_LEN = 12
SECRET_LEN = 32
CHECKSUM_LEN = 6
_PREFIX_RE = re.compile(r"[A-Za-z][A-Za-z0-9]{0,15}")
KEY_ID_RE = re.compile(rf"[0-9A-Za-z]{{{KEY_ID_LEN}}}")
_TAIL_RE = re.compile(rf"([0-9A-Za-z]{{{KEY_ID_LEN}}})_[0-9A-Za-z]{{{SECRET_LEN + CHECKSUM_LEN}}}")
DIGEST_RE = re.compile(r"(?:sha256:)?([0-9a-f]{64})")
NAME_RE = re.compile(r"[\x21-\x7e]{1,256}")
US = 1_000_000


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
    check_prefix(prefix, "prefix")
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


def check_prefix(prefix: Any, where: str) -> None:
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


def now_arg(now: float | None) -> ScriptArg:
    return "" if now is None else int(now * US)


def lookup_call(prefix: str, key_id: str, now: float | None = None) -> ScriptCall:
    """The ``key_lookup`` call for one key id (``now`` overrides the store clock: tests only)."""
    return ScriptCall("key_lookup", (record_key(prefix, key_id),), (now_arg(now),))


def parse_record(key_id: str, reply: Any) -> KeyRecord | None:
    """A ``key_lookup`` reply as a record; ``None`` for no record or a reply of the wrong shape."""
    if not isinstance(reply, list | tuple) or len(reply) != 8:
        return None
    caller, plan, tenant, created, expires, revoked, digest, status = (as_str(v) for v in reply)
    try:
        created_us, expires_us = int(created), int(expires)
    except ValueError:
        return None
    return KeyRecord(
        key_id=key_id,
        caller=caller,
        plan=plan or None,
        tenant=tenant or "default",
        created=created_us / US,
        expires=expires_us / US if expires_us > 0 else None,
        revoked=revoked == "1",
        status=status,
        digest=digest,
    )
