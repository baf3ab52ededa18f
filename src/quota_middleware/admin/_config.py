"""``[admin]``: :class:`AdminConfig`, who may use the admin API and dashboard, and how long what
they leave behind (the audit stream, browser sessions) is kept.

It sits below the policy (``config``), which holds it as ``QuotaConfig.admin``; it names the
policy's ``[identity.jwt]`` settings by reference only (a JWT admin is verified with them), so
that cross-table check is made when the admin app is built.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from quota_middleware.errors import ConfigurationError, check_keys

__all__ = ["AdminConfig"]

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CLAIM = re.compile(r"^[A-Za-z0-9_.:/-]{1,64}$")


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminConfig:
    """Credentials and settings of the admin app (:mod:`quota_middleware.admin`).

    :param token_sha256: the hex SHA-256 digest of each admin token (``printf %s "$TOKEN" |
        sha256sum``), one string or a list. Never the token itself: the policy can then be
        read by anyone who deploys it. ``Authorization: Bearer <token>`` is accepted when the
        token's digest equals one of these (compared in constant time).
    :param jwt_claim: a JWT claim that makes its bearer an admin, e.g. ``"quota_admin"`` or
        ``"roles"``; None (the default): JWTs are not accepted. The token is verified with the
        policy's ``[identity.jwt]`` settings (keys, algorithms, audience, issuer, ``exp``); it is
        an admin token when the claim is JSON ``true``, or a string whose space-separated words
        include :attr:`jwt_value` (an OAuth ``scope``), or a list with :attr:`jwt_value` among
        its strings. Anything else (``1``, ``"true"``, a missing claim) is not.
    :param jwt_value: the role or scope :attr:`jwt_claim` must contain (default ``"admin"``).
    :param audit_max: audit entries kept in the audit stream (approximately; older ones are
        trimmed).
    :param session_ttl: seconds a dashboard login lasts (a JWT login: never past its ``exp``).
    :param session_secret_env: an environment variable holding the key browser sessions are
        signed with; None (the default): a random key created once in the store and shared by
        every worker and process on it (deleting it logs every browser out).
    :param cookie_secure: mark the session cookie ``Secure``; None (the default): when the
        request came over https (set True behind a proxy that terminates TLS).
    """

    token_sha256: Sequence[str] | str = ()
    jwt_claim: str | None = None
    jwt_value: str = "admin"
    audit_max: int = 10_000
    session_ttl: float = 8 * 3600.0
    session_secret_env: str | None = None
    cookie_secure: bool | None = None

    def __post_init__(self) -> None:
        raw = self.token_sha256
        digests = (raw,) if isinstance(raw, str) else tuple(raw)
        for i, d in enumerate(digests):
            where = "admin.token_sha256" + ("" if isinstance(raw, str) else f"[{i}]")
            if not isinstance(d, str) or not _HEX64.fullmatch(d.strip().lower()):
                # the message must not echo the value: it may be a pasted token
                raise ConfigurationError(
                    where,
                    "must be the 64-hex-digit SHA-256 digest of an admin token "
                    '(printf %s "$TOKEN" | sha256sum), never the token itself',
                )
        object.__setattr__(self, "token_sha256", tuple(d.strip().lower() for d in digests))
        if self.jwt_claim is not None and (
            not isinstance(self.jwt_claim, str) or not _CLAIM.fullmatch(self.jwt_claim)
        ):
            raise ConfigurationError("admin.jwt_claim", "must be a claim name")
        if not isinstance(self.jwt_value, str) or not self.jwt_value.strip():
            raise ConfigurationError("admin.jwt_value", "must be a non-empty string")
        if not self.token_sha256 and self.jwt_claim is None:
            raise ConfigurationError(
                "admin", "give token_sha256 or jwt_claim: otherwise nobody can sign in"
            )
        if not _int(self.audit_max) or not 100 <= self.audit_max <= 10_000_000:
            raise ConfigurationError("admin.audit_max", "must be an integer in [100, 10000000]")
        if not _num(self.session_ttl) or not 60 <= self.session_ttl <= 30 * 86400:
            raise ConfigurationError("admin.session_ttl", "must be in [60, 2592000] seconds")
        env = self.session_secret_env
        if env is not None and (not isinstance(env, str) or not env):
            raise ConfigurationError("admin.session_secret_env", "must be a variable name")
        if self.cookie_secure is not None and not isinstance(self.cookie_secure, bool):
            raise ConfigurationError("admin.cookie_secure", "must be true or false")

    @property
    def digests(self) -> tuple[str, ...]:
        """The admin tokens' digests, lower-case hex."""
        raw = self.token_sha256
        return (raw,) if isinstance(raw, str) else tuple(raw)

    def __repr__(self) -> str:
        # digests are not secrets, but a short form keeps logs readable
        shown = [d[:8] + "…" for d in self.digests]
        return (
            f"AdminConfig(token_sha256={shown!r}, jwt_claim={self.jwt_claim!r}, "
            f"audit_max={self.audit_max!r}, session_ttl={self.session_ttl!r})"
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AdminConfig:
        """From the policy's ``[admin]`` table; an unknown key is an error naming
        ``admin.<key>``."""
        check_keys(d, set(cls.__dataclass_fields__), "admin")
        try:
            return cls(**d)
        except TypeError as e:  # pragma: no cover - check_keys leaves only bad values
            raise ConfigurationError("admin", str(e)) from None


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)
