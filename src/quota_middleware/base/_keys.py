"""Key names. Every key of one caller carries the hash tag ``{<tenant>:<caller>}``, so every
script touches one Redis Cluster slot and runs unchanged on a cluster.

With ``[storage] hash_tag = "tenant"`` a caller's keys start with its tenant's tag instead,
``qm:{acme}{acme:bob}:…``: Redis hashes only the first ``{…}``, so every caller of a tenant and
the tenant's own counters (``qm:{acme}:tq:…``) share one slot, and the admit call can decide a
tenant budget atomically with the caller's limits. The ``{tenant:caller}`` group stays in the
name, so readers that find a caller by it (rankings, SCANs) work with either layout."""

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


def caller_base(prefix: str, member: str, by_tenant: bool = False) -> str:
    """A caller's key base from its ranking member (``tenant:caller``, see :func:`rank_member`),
    in the layout ``by_tenant`` (``[storage] hash_tag``) picks."""
    if by_tenant:
        return f"{prefix}:{{{member.split(':', 1)[0]}}}{{{member}}}"
    return f"{prefix}:{{{member}}}"


def tenant_tagged_period(prefix: str, tenant: str, period_id: str) -> str:
    """A tenant budget's counters of one period under ``hash_tag = "tenant"``: in the slot of
    every caller of the tenant, so their admit calls reserve against it."""
    return f"{prefix}:{{{_part(tenant, _SAFE_TENANT)}}}:tq:q:{period_id}"


class CallerKeys:
    """The keys of one caller under ``prefix``; ``by_tenant``: the tenant-tagged layout."""

    __slots__ = ("base",)

    def __init__(self, prefix: str, tenant: str, caller: str, by_tenant: bool = False) -> None:
        tag = caller_tag(tenant, caller)
        if by_tenant:
            self.base = f"{prefix}:{{{_part(tenant, _SAFE_TENANT)}}}{tag}"
        else:
            self.base = f"{prefix}:{tag}"

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

    @property
    def controls(self) -> str:
        """The operator's runtime controls of this caller (``controls.py``): one hash, field
        ``block`` and one ``o|<limit>`` per override, read by every admit call."""
        return f"{self.base}:x"


# -- tenant controls --------------------------------------------------------------------------
# A tenant's block must be read by the admit call of every caller of the tenant, and on a
# cluster a script may only touch its own slot. So the block is stored once per slot: the copy
# for slot s is tagged with a short tag that hashes to s, and a caller's admit reads the copy in
# its own slot. The same layout is used off a cluster, since the core cannot tell which store
# it runs on (the backend is the adapter's).
_CRC = []
for _i in range(256):
    _c = _i << 8
    for _ in range(8):
        _c = ((_c << 1) ^ 0x1021) if _c & 0x8000 else (_c << 1)
    _CRC.append(_c & 0xFFFF)
SLOTS = 16384


def key_slot(key: str) -> int:
    """The Redis Cluster slot of ``key`` (CRC16/XMODEM of its hash tag, mod 16384)."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    c = 0
    for b in key.encode():
        c = ((c << 8) & 0xFFFF) ^ _CRC[(c >> 8) ^ b]
    return c & (SLOTS - 1)


_SLOT_TAGS: list[str] = []
_TAG_CHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_-"


def slot_tags() -> list[str]:
    """For each slot, a tag ``@s<3 chars>`` that hashes to it (no ':', so never a caller's
    tag). Computed once per process (about 0.1 s, when an engine is built): the CRC is extended
    a byte at a time and the first tag to reach a slot is kept, so the table is the same in
    every process."""
    if not _SLOT_TAGS:
        tags: list[str | None] = [None] * SLOTS
        left = SLOTS
        crc, mask, chars = _CRC, SLOTS - 1, [(ch, ord(ch)) for ch in _TAG_CHARS]
        c0 = 0
        for b in b"@s":
            c0 = ((c0 << 8) & 0xFFFF) ^ crc[(c0 >> 8) ^ b]
        for a, oa in chars:
            c1 = ((c0 << 8) & 0xFFFF) ^ crc[(c0 >> 8) ^ oa]
            for b2, ob in chars:
                c2 = ((c1 << 8) & 0xFFFF) ^ crc[(c1 >> 8) ^ ob]
                hi, lo = (c2 << 8) & mask, c2 >> 8
                for ch, oc in chars:
                    slot = (hi ^ crc[lo ^ oc]) & mask
                    if tags[slot] is None:
                        tags[slot] = "@s" + a + b2 + ch
                        left -= 1
                if not left:
                    break
            if not left:
                break
        assert left == 0, "every slot has a tag"
        _SLOT_TAGS.extend(t for t in tags if t is not None)
    return _SLOT_TAGS


def tenant_controls(prefix: str, tenant: str, slot: int) -> str:
    """The copy in ``slot`` of the tenant's controls hash."""
    return f"{prefix}:{{{slot_tags()[slot]}}}:t:{_part(tenant, _SAFE_TENANT)}"


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

    def tenant_period(self, tenant: str, period_id: str) -> str:
        """A tenant's shared budgets' counters of one period: beside the app's, so the same
        second settle call charges both."""
        return f"{self.base}:tq:{_part(tenant, _SAFE_TENANT)}:q:{period_id}"

    def settled(self, request_id: str) -> str:
        return f"{self.base}:s:{request_id}"

    def rollup(self, day: str) -> str:
        """The whole app's usage of one day, per model: the caller usage hash's fields summed."""
        return f"{self.base}:r:{day}"

    def ranking(self, period: str, metric: str) -> str:
        """Who used the most in a day (or, for ``cost``, a month ``2026-12``): a sorted set of
        caller tags (``tenant:caller``, as in their keys) by ``cost``, ``tokens`` or
        ``requests``, and of tenants by cost (``tenants``)."""
        return f"{self.base}:r:{period}:{metric}"


def rank_member(tenant: str, caller: str) -> str:
    """A caller as the rankings name it: its keys' hash tag without the braces."""
    return caller_tag(tenant, caller)[1:-1]


def tenant_member(tenant: str) -> str:
    """A tenant as the tenant ranking names it (the tenant part of its callers' tags)."""
    return _part(tenant, _SAFE_TENANT)


def period_name(period_key: str) -> str:
    """The period a counter key (caller's or app's) counts, as events and reports name it:
    ``…:q:d2026-11-28`` -> ``2026-11-28``, ``…:q:m2026-11`` -> ``2026-11``."""
    return period_key.rsplit(":q:", 1)[-1][1:]
