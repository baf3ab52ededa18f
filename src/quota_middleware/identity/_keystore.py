"""The admin key store: create, list, revoke and rotate API keys (``quota-middleware keys``).

Only digests are stored; :meth:`KeyStore.create` shows the plain key once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from quota_middleware.base._scripts import ScriptArg, ScriptCall, as_str
from quota_middleware.errors import ApiKeyNotActive, ApiKeyNotFound, InvalidArgument, KeyIdExhausted
from quota_middleware.identity._keyformat import (
    KEY_ID_LEN,
    KEY_ID_RE,
    NAME_RE,
    US,
    KeyRecord,
    check_prefix,
    generate_key,
    index_key,
    key_digest,
    lookup_call,
    now_arg,
    parse_record,
    record_key,
)


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
        check_prefix(key_prefix, "key_prefix")
        self.backend = backend
        self.prefix = prefix
        self.key_prefix = key_prefix
        self.retention_ms = int(retention * 1000)
        self._clock = clock

    def _now(self) -> ScriptArg:
        return now_arg(None if self._clock is None else self._clock())

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
            if not isinstance(value, str) or not NAME_RE.fullmatch(value):
                raise InvalidArgument(f"{name} must be 1-256 printable ASCII characters")
        if plan is not None and (not isinstance(plan, str) or not NAME_RE.fullmatch(plan)):
            raise InvalidArgument("plan must be 1-256 printable ASCII characters")
        if expires_in is not None and not expires_in > 0:
            raise InvalidArgument("expires_in must be positive seconds")
        ttl_us = 0 if expires_in is None else max(1, int(expires_in * US))
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
                    created=created / US,
                    expires=expires / US if expires else None,
                    revoked=False,
                    status="active",
                    digest=key_digest(key),
                )
        raise KeyIdExhausted("could not allocate a unique key id")  # pragma: no cover

    def get(self, key_id: str) -> KeyRecord | None:
        """The record of ``key_id`` (any status), or ``None``."""
        if not isinstance(key_id, str) or not KEY_ID_RE.fullmatch(key_id):
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
        for key_id in sorted(as_str(i) for i in ids):
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
        if not isinstance(key_id, str) or not KEY_ID_RE.fullmatch(key_id):
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
            (self._now(), int(grace * US), self.retention_ms),
        )
        reply = self.backend.run(call)
        if int(reply[0]) != 1:
            # Revoked or expired in the meantime: the new key must not outlive the old one.
            self.revoke(rec.key_id)
            raise ApiKeyNotActive(
                f"API key {key_id} is {as_str(reply[1])}: only active keys can be rotated"
            )
        return key, rec
