"""The audit trail of the admin app: every state change, who made it, and the state before and
after, in a stream of the store and one log line.

The stream is ``<prefix>:{@app}:audit``, one ``event`` field of JSON per entry, trimmed to about
``admin.audit_max`` entries. It is written through the outbox's script (``outbox_add``: an
``XADD MAXLEN ~`` on Redis, its twin on the memory backend), which appends JSON entries to any
stream, so the memory backend's store holds the same stream. The log line goes to the
``quota_middleware.audit`` logger at INFO with the same fields (``extra={"audit": entry}`` for
structured handlers). Entries never hold a secret: a created API key's plain text is answered to
its creator once and written nowhere.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from quota_middleware.alerts._outbox import read_stream
from quota_middleware.base._keys import app_tag
from quota_middleware.base._protocols import SyncBackend
from quota_middleware.base._scripts import ScriptCall

__all__ = ["AuditEntry", "AuditLog", "audit_key", "log"]

#: the audit logger's name is documented (README): operators route it to their SIEM
log = logging.getLogger("quota_middleware.audit")


def audit_key(prefix: str) -> str:
    """The audit stream: an app-wide key (the ``{@app}`` tag: one cluster slot)."""
    return f"{app_tag(prefix)}:audit"


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One state change made through the admin app."""

    #: who made it: ``token:<first 8 hex of the token's digest>``, or a JWT's subject
    who: str
    #: ``block``, ``unblock``, ``override.set``, ``override.unset``, ``key.create``,
    #: ``key.revoke``, ``key.rotate``, ``budget.set``, ``budget.restore``
    action: str
    #: what it was made to: ``caller:<tenant>/<caller>``, ``tenant:<tenant>``, ``key:<id>``,
    #: ``budget:<name>`` (``budget:<tenant>/<name>`` for a tenant's)
    target: str
    before: Any
    after: Any
    #: unix seconds
    at: float
    #: the request's ``X-Request-Id`` (or one made up), and its ``Idempotency-Key`` if any
    request_id: str
    idempotency_key: str | None = None
    #: the stream entry's id, when read back
    id: str | None = None

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("id")
        return json.dumps(data, separators=(",", ":"), sort_keys=True, default=str)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class AuditLog:
    """Writes and reads the audit stream of ``prefix`` on ``backend``."""

    def __init__(self, backend: SyncBackend, prefix: str, maxlen: int) -> None:
        self.backend = backend
        self.key = audit_key(prefix)
        self.maxlen = maxlen

    def write(
        self,
        who: str,
        action: str,
        target: str,
        before: Any,
        after: Any,
        *,
        request_id: str,
        idempotency_key: str | None = None,
    ) -> AuditEntry:
        """Append an entry, then log it. Called after the change: the change and its entry are
        two calls to the same store, so one can only be missing when the store failed between
        them, and the request then answers 503 (the log line is written either way)."""
        entry = AuditEntry(
            who, action, target, before, after, time.time(), request_id, idempotency_key
        )
        text = entry.to_json()
        try:
            self.backend.run(ScriptCall("outbox_add", (self.key,), (self.maxlen, text)))
        finally:
            log.info("audit %s", text, extra={"audit": entry.as_dict()})
        return entry

    def recent(self, limit: int = 50) -> list[AuditEntry]:
        """The newest ``limit`` entries, newest first."""
        rows = read_stream(self.backend, self.key, count=limit)
        out: list[AuditEntry] = []
        for eid, fields in reversed(rows):
            try:
                data = json.loads(fields.get("event", b""))
                out.append(AuditEntry(**{k: data.get(k) for k in _FIELDS}, id=eid))
            except (ValueError, TypeError):
                continue  # a malformed entry (written by hand): skipped, not a 500
        return out


_FIELDS = [f for f in AuditEntry.__dataclass_fields__ if f != "id"]
