"""A tiny in-process store with the Redis commands the scripts use, and nothing else.

It exists so that the Python twins of the Lua scripts (``memory_scripts.py``) read like the Lua,
line for line, which is what makes the memory backend "the same semantics" and a reference model
the Lua can be tested against.
"""

from __future__ import annotations

import math
import time
from typing import Any

Value = dict[str, Any] | bytes


class MemoryStore:
    """Keys map to hashes (``dict[str, bytes|int]``), sorted sets (``dict[str, float]``) or bytes.

    Not thread-safe by itself: the backend holds one lock around each script, as Redis runs one
    script at a time.
    """

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.types: dict[str, str] = {}
        self.expires: dict[str, int] = {}  # key -> unix ms
        self._last_us = 0
        #: set while a script runs: like Redis, one script sees one instant
        self.frozen_us: int | None = None
        self._cursor: list[str] = []

    # -- time -----------------------------------------------------------------------------
    def time_us(self) -> int:
        if self.frozen_us is not None:
            return self.frozen_us
        # Like the scripts' clamp: never let time run backwards, whatever the wall clock does.
        now = time.time_ns() // 1000
        if now < self._last_us:
            now = self._last_us
        self._last_us = now
        return now

    def _alive(self, key: str) -> bool:
        if key not in self.data:
            return False
        exp = self.expires.get(key)
        if exp is not None and exp <= self.time_us() // 1000:
            self.delete(key)
            return False
        return True

    def _get(self, key: str, kind: str) -> Any:
        # _alive inlined: the scripts' twins call this a few dozen times per request
        value = self.data.get(key)
        if value is None:
            return None
        exp = self.expires.get(key)
        if exp is not None and exp <= self.time_us() // 1000:
            self.delete(key)
            return None
        if self.types[key] != kind:
            raise TypeError(f"WRONGTYPE {key} holds a {self.types[key]}")
        return value

    def _get_or_create(self, key: str, kind: str) -> Any:
        v = self._get(key, kind)
        if v is None:
            v = {}
            self.data[key] = v
            self.types[key] = kind
        return v

    def sweep_some(self, budget: int = 20) -> int:
        """Check ``budget`` keys for expiry, round-robin over every key with a TTL, and drop the
        expired ones. Like Redis' active expiry: keys of callers who never come back must not
        stay in memory forever. Amortised O(budget) per call."""
        if not self._cursor:
            if not self.expires:
                return 0
            self._cursor = list(self.expires)  # one snapshot per full pass
        now_ms = self.time_us() // 1000
        dropped = 0
        for _ in range(min(budget, len(self._cursor))):
            key = self._cursor.pop()
            exp = self.expires.get(key)
            if exp is not None and exp <= now_ms:
                self.delete(key)
                dropped += 1
        return dropped

    def sweep(self) -> int:
        """Drop every expired key; returns how many."""
        now_ms = self.time_us() // 1000
        dead = [k for k, e in self.expires.items() if e <= now_ms]
        for k in dead:
            self.delete(k)
        return len(dead)

    # -- keys -----------------------------------------------------------------------------
    def delete(self, *keys: str) -> int:
        n = 0
        for key in keys:
            if self.data.pop(key, None) is not None:
                n += 1
            self.types.pop(key, None)
            self.expires.pop(key, None)
        return n

    def exists(self, key: str) -> bool:
        return self._alive(key)

    def pttl(self, key: str) -> int:
        if not self._alive(key):
            return -2
        exp = self.expires.get(key)
        return -1 if exp is None else exp - self.time_us() // 1000

    def pexpire(self, key: str, ms: int) -> None:
        if self._alive(key):
            self.expires[key] = self.time_us() // 1000 + int(ms)

    def pexpireat(self, key: str, at_ms: int) -> None:
        if self._alive(key):
            self.expires[key] = int(at_ms)

    def persist(self, key: str) -> None:
        if self._alive(key):
            self.expires.pop(key, None)

    # -- strings --------------------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        v: bytes | None = self._get(key, "string")
        return v

    def set(self, key: str, value: bytes | str, *, nx: bool = False, px: int | None = None) -> bool:
        if nx and self._alive(key):
            return False
        self.data[key] = value.encode() if isinstance(value, str) else value
        self.types[key] = "string"
        self.expires.pop(key, None)
        if px is not None:
            self.expires[key] = self.time_us() // 1000 + int(px)
        return True

    # -- hashes ---------------------------------------------------------------------------
    def hget(self, key: str, field: str) -> bytes | None:
        h = self._get(key, "hash")
        if h is None or field not in h:
            return None
        return _to_bytes(h[field])

    def hgetall(self, key: str) -> dict[str, bytes]:
        h = self._get(key, "hash")
        return {} if h is None else {f: _to_bytes(v) for f, v in h.items()}

    def hset(self, key: str, mapping: dict[str, Any]) -> None:
        h = self._get_or_create(key, "hash")
        for f, v in mapping.items():
            h[f] = v if isinstance(v, bytes) else _to_bytes(v)

    def hdel(self, key: str, *fields: str) -> int:
        h = self._get(key, "hash")
        if h is None:
            return 0
        n = sum(1 for f in fields if h.pop(f, None) is not None)
        if not h:
            self.delete(key)
        return n

    def hincrby(self, key: str, field: str, delta: int) -> int:
        h = self._get_or_create(key, "hash")
        v = int(h.get(field, b"0")) + int(delta)
        h[field] = str(v).encode()
        return v

    # -- sorted sets ----------------------------------------------------------------------
    def zadd(self, key: str, score: float, member: str) -> None:
        self._get_or_create(key, "zset")[member] = float(score)

    def zrem(self, key: str, member: str) -> int:
        z = self._get(key, "zset")
        if z is None or member not in z:
            return 0
        del z[member]
        if not z:
            self.delete(key)
        return 1

    def zscore(self, key: str, member: str) -> float | None:
        z = self._get(key, "zset")
        return None if z is None else z.get(member)

    def zcard(self, key: str) -> int:
        z = self._get(key, "zset")
        return 0 if z is None else len(z)

    def zremrangebyscore(self, key: str, lo: float, hi: float) -> int:
        z = self._get(key, "zset")
        if z is None:
            return 0
        dead = [m for m, s in z.items() if lo <= s <= hi]
        for m in dead:
            del z[m]
        if not z:
            self.delete(key)
        return len(dead)

    def zrangebyscore(self, key: str, lo: float, hi: float) -> list[tuple[str, float]]:
        z = self._get(key, "zset")
        if z is None:
            return []
        return sorted(((m, s) for m, s in z.items() if lo <= s <= hi), key=lambda t: (t[1], t[0]))

    # -- streams (the alert outbox) -------------------------------------------------------
    def xadd(self, key: str, fields: dict[str, bytes], maxlen: int | None = None) -> str:
        entries = self._get(key, "stream")
        if entries is None:
            entries = self.data[key] = []
            self.types[key] = "stream"
        ms = self.time_us() // 1000
        last_ms, last_seq = (0, -1)
        if entries:
            a, b = entries[-1][0].split("-")
            last_ms, last_seq = int(a), int(b)
        seq = last_seq + 1 if ms <= last_ms else 0
        entry_id = f"{max(ms, last_ms)}-{seq}"
        entries.append((entry_id, dict(fields)))
        if maxlen is not None and len(entries) > maxlen:
            del entries[: len(entries) - maxlen]
        return entry_id

    def xrange(self, key: str, after: str | None = None) -> list[tuple[str, dict[str, bytes]]]:
        """Entries with an id greater than ``after`` (all when None), oldest first."""
        entries = self._get(key, "stream") or []
        if after is None:
            return list(entries)

        def order(entry_id: str) -> tuple[int, int]:
            a, b = entry_id.split("-")
            return int(a), int(b)

        floor = order(after)
        return [e for e in entries if order(e[0]) > floor]

    def xlen(self, key: str) -> int:
        return len(self._get(key, "stream") or [])

    # -- sets -----------------------------------------------------------------------------
    def sadd(self, key: str, member: str) -> int:
        s = self._get_or_create(key, "set")
        if member in s:
            return 0
        s[member] = None
        return 1

    def srem(self, key: str, member: str) -> int:
        s = self._get(key, "set")
        if s is None or member not in s:
            return 0
        del s[member]
        if not s:
            self.delete(key)
        return 1

    def smembers(self, key: str) -> list[str]:
        s = self._get(key, "set")
        return [] if s is None else list(s)


def _to_bytes(v: Any) -> bytes:
    if isinstance(v, bytes):
        return v
    if isinstance(v, float):
        if v.is_integer():
            return str(int(v)).encode()
        return repr(v).encode()
    return str(v).encode()


def lua_number(raw: bytes | None) -> int | None:
    """Lua's ``tonumber`` on a stored value, integers only (the scripts store nothing else)."""
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        f = float(raw)
        return None if math.isnan(f) else int(f)
