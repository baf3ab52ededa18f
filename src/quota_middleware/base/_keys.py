"""Key names. Every key of one caller carries the hash tag ``{<tenant>:<caller>}``, so every
script touches one Redis Cluster slot and runs unchanged on a cluster."""

from __future__ import annotations

import hashlib
import re

_SAFE = re.compile(r"^[A-Za-z0-9_.@:/=+-]{1,80}$")
# A tenant never contains ':', so "{tenant:caller}" splits at its first ':' unambiguously.
_SAFE_TENANT = re.compile(r"^[A-Za-z0-9_.@/=+-]{1,80}$")
_HASHED = re.compile(r"^h-[0-9a-f]{32}$")


def _part(value: str, safe: re.Pattern[str] = _SAFE) -> str:
    # Braces would break the hash tag and odd bytes make keys hard to read in redis-cli; long or
    # unusual ids become a digest (stable, so the caller still maps to one key). An id that
    # already looks like a digest is hashed too, so no raw id can collide with a hashed one.
    if safe.match(value) and not _HASHED.match(value):
        return value
    return "h-" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def caller_tag(tenant: str, caller: str) -> str:
    return "{" + _part(tenant, _SAFE_TENANT) + ":" + _part(caller) + "}"


def app_tag(prefix: str) -> str:
    """The app-wide keys' tag: ``{@app}`` has no ':', so no caller's tag can ever equal it."""
    return f"{prefix}:{{@app}}"


class CallerKeys:
    """The keys of one caller under ``prefix``."""

    __slots__ = ("base",)

    def __init__(self, prefix: str, tenant: str, caller: str) -> None:
        self.base = f"{prefix}:{caller_tag(tenant, caller)}"

    @property
    def buckets(self) -> str:
        """One hash: a field per token bucket holding its TAT in microseconds."""
        return self.base

    def concurrency(self, name: str) -> str:
        return f"{self.base}:c:{name}"

    def period(self, period_id: str) -> str:
        """Calendar counters of one period (``d2026-11-28``, ``m2026-11``): no reset job."""
        return f"{self.base}:q:{period_id}"

    def ledger(self, period_key: str) -> str:
        """The reservations held against ``period_key``'s counters, scored by lease end."""
        return f"{period_key}:r"

    @property
    def hourly(self) -> str:
        """Tokens per hour over the trailing window, for spike detection."""
        return f"{self.base}:h"

    def usage(self, day: str) -> str:
        """Per-day usage records: fields ``<model>|<counter>``."""
        return f"{self.base}:u:{day}"

    def settled(self, request_id: str) -> str:
        return f"{self.base}:s:{request_id}"


class AppKeys:
    """The app-wide keys under ``prefix`` (the app budgets): their own hash tag, so one cluster
    slot of their own, apart from every caller's."""

    __slots__ = ("base",)

    def __init__(self, prefix: str) -> None:
        self.base = app_tag(prefix)

    def period(self, period_id: str) -> str:
        """The app budgets' counters of one period (``d2026-11-28``, ``m2026-11``)."""
        return f"{self.base}:q:{period_id}"

    def ledger(self, period_key: str) -> str:
        return f"{period_key}:r"

    def settled(self, request_id: str) -> str:
        return f"{self.base}:s:{request_id}"


def period_name(period_key: str) -> str:
    """The period a counter key (caller's or app's) counts, as events and reports name it:
    ``…:q:d2026-11-28`` -> ``2026-11-28``, ``…:q:m2026-11`` -> ``2026-11``."""
    return period_key.rsplit(":q:", 1)[-1][1:]
