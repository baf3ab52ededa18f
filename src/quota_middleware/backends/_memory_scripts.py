"""Python twins of ``lua/admit.lua``, ``lua/settle.lua`` and the other scripts, written to read
like the Lua (``registry.py`` pairs each script with its twin).

They are the memory backend and the reference model the Lua scripts are property-tested against.
Any change to a Lua script changes its twin in the same commit.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from quota_middleware.backends._memstore import MemoryStore, lua_number
from quota_middleware.base._scripts import as_str

Arg = int | str | bytes


def _i(a: Arg) -> int:
    # ints arrive as ints from the engine; Redis would see their decimal text, same value
    return a if type(a) is int else int(a)  # int() reads str and bytes alike


def _now(store: MemoryStore, arg: Arg) -> int:
    text = as_str(arg)
    return int(text) if text != "" else store.time_us()


_BLOCK = re.compile(r"([0-9]+)\|([A-Za-z]*)\|(.*)", re.DOTALL)
_OVERRIDE = re.compile(r"([0-9]+)\|([0-9]+)\|([0-9]*)")


def _blocked(value: bytes | None, now: int, ai: bool, who: bytes) -> list[Any] | None:
    m = _BLOCK.fullmatch(value.decode()) if value is not None else None
    if m is None:
        return None
    until, scope = int(m.group(1)), m.group(2)
    if (until > 0 and until <= now) or (scope == "ai" and not ai):
        return None
    return [0, -1, until - now if until > 0 else -1, now, m.group(3).encode(), who]


def admit(store: MemoryStore, keys: Sequence[str], argv: Sequence[Arg]) -> list[Any]:
    now = _now(store, argv[0])
    rid = as_str(argv[1])
    lease = _i(argv[2])
    n = _i(argv[3])

    ctl: dict[str, bytes] = {}
    c0 = 4 + n * 7
    if len(argv) > c0 + 1:
        ai = as_str(argv[c0]) == "a"
        ctl = store.hgetall(keys[_i(argv[c0 + 1]) - 1])
        b = _blocked(ctl.get("block"), now, ai, b"caller")
        if b is not None:
            return b
        t = _i(argv[c0 + 2])
        if t > 0:
            b = _blocked(store.hget(keys[t - 1], "block"), now, ai, b"tenant")
            if b is not None:
                return b
    overridden: list[int] = []

    swept: set[int] = set()
    for i in range(n):
        base = 4 + i * 7
        k = _i(argv[base + 1])
        if as_str(argv[base]) in ("q", "Q") and k not in swept:
            swept.add(k)
            key, ledger = keys[k - 1], keys[k]
            for r, _score in store.zrangebyscore(ledger, float("-inf"), now)[:100]:
                payload = store.hget(key, "r|" + r)
                if payload is not None:
                    for item in payload.decode().split(","):
                        if "=" in item:
                            name, amount = item.split("=", 1)
                            if store.hincrby(key, name, -int(amount)) < 0:
                                store.hset(key, {name: 0})
                    store.hdel(key, "r|" + r)
                store.zrem(ledger, r)

    out = [1, 0, 0, now]
    writes: list[tuple[str, str, str, int, int, str]] = []
    undo: list[tuple[int, int]] = []
    denied = 0
    retry = 0
    for i in range(n):
        base = 4 + i * 7
        kind = as_str(argv[base])
        kidx = _i(argv[base + 1])
        key = keys[kidx - 1]
        f = as_str(argv[base + 2])
        p1, p2 = _i(argv[base + 3]), _i(argv[base + 4])
        cost, min_cost = _i(argv[base + 5]), _i(argv[base + 6])
        tlimit = False
        om = None
        if kind == "Q":
            kind = "q"
            v = lua_number(store.hget(key, f + ":limit"))
            if v is not None:
                p1, tlimit = int(v), True
                overridden += [i + 1, p1, p2]
        elif (ov := ctl.get("o|" + f)) is not None:
            om = _OVERRIDE.fullmatch(ov.decode())
        if om is not None and (int(om.group(1)) == 0 or int(om.group(1)) > now):
            p1 = int(om.group(2))
            if om.group(3) != "":
                p2 = int(om.group(3))
            overridden += [i + 1, p1, p2]
        remaining = reset = charged = wait = 0
        if kind == "b":
            tat = lua_number(store.hget(key, f))
            tat = now if tat is None or tat < now else tat
            available = math.floor((p2 - (tat - now)) / p1)
            before = (max(0, available), tat - now)
            if min_cost * p1 > p2:
                wait = -1
            elif available < min_cost:
                wait = tat + min_cost * p1 - p2 - now
            else:
                charged = min(cost, available)
                new_tat = tat + charged * p1
                writes.append(("b", key, f, new_tat, new_tat - now, ""))
                tat = new_tat
            remaining = max(0, math.floor((p2 - (tat - now)) / p1))
            reset = tat - now
        elif kind == "c":
            store.zremrangebyscore(key, float("-inf"), now)
            held = store.zscore(key, rid)
            count = store.zcard(key)
            before = (max(0, p1 - count), 0)
            if held is not None:
                charged = 1
                remaining = p1 - count
            elif count >= p1:
                wait = 1_000_000
            else:
                charged = 1
                remaining = p1 - count - 1
                writes.append(("c", key, rid, now + p2, p2, ""))
        elif kind == "q":
            used = lua_number(store.hget(key, f)) or 0
            available = p1 - used
            if min_cost < cost and store.hget(key, f + "!") is not None:
                min_cost = cost
            before = (max(0, available), p2 - now)
            if min_cost > p1 and tlimit:
                wait = p2 - now
            elif min_cost > p1:
                wait = -1
            elif available < min_cost:
                wait = p2 - now
            else:
                charged = min(cost, available)
                used += charged
                writes.append(("q", key, f, charged, p2 - now + 3_600_000_000, keys[kidx]))
                if charged < cost:
                    writes.append(("q", key, f + "!", 1, 0, ""))
            remaining = max(0, p1 - used)
            reset = p2 - now
        else:
            raise ValueError(f"admit: unknown limit kind {kind}")
        if wait != 0:
            if denied == 0:
                denied = i + 1
            retry = -1 if wait < 0 or retry < 0 else max(retry, wait)
        out += [remaining, reset, charged]
        undo.append(before)

    if denied:
        out[0], out[1], out[2] = 0, denied, retry
        for i in range(n):
            o = 4 + i * 3
            if out[o + 2] > 0:
                out[o], out[o + 1], out[o + 2] = undo[i][0], undo[i][1], 0
        return out + overridden

    ttl: dict[str, int] = {}
    reserved: dict[str, list[str]] = {}
    for kind, key, f, value, life_us, ledger in writes:
        if kind == "b":
            store.hset(key, {f: value})
        elif kind == "c":
            store.zadd(key, value, f)
        elif ledger == "":
            store.hset(key, {f: value})
        else:
            store.hincrby(key, f, value)
            if lease > 0 and value > 0:
                if key not in reserved:
                    reserved[key] = [ledger, ""]
                    ttl[ledger] = max(ttl.get(ledger, 0), math.ceil(life_us / 1000))
                reserved[key][1] += f"{f}={value},"
        ms = math.ceil(life_us / 1000) + 1000
        ttl[key] = max(ttl.get(key, 0), ms)
    for key, (ledger, entries) in reserved.items():
        store.hset(key, {"r|" + rid: entries.encode()})
        store.zadd(ledger, now + lease, rid)
    for key, ms in ttl.items():
        if store.pttl(key) < ms:
            store.pexpire(key, ms)
    return out + overridden


_UNTIL = re.compile(r"([0-9]+)\|")


def control(store: MemoryStore, keys: Sequence[str], argv: Sequence[Arg]) -> list[Any]:
    now = _now(store, argv[0])
    key, op, field = keys[0], as_str(argv[1]), as_str(argv[2])

    def live(v: bytes) -> tuple[bool, int]:
        m = _UNTIL.match(v.decode())
        if m is None:
            return False, 0
        u = int(m.group(1))
        return u == 0 or u > now, u

    def expire_with_last() -> None:
        last = -1
        for f, v in store.hgetall(key).items():
            ok, u = live(v)
            if not ok:
                store.hdel(key, f)
            elif u == 0:
                last = 0
            elif last != 0 and u > last:
                last = u
        if last == 0:
            store.persist(key)
        elif last > 0:
            store.pexpireat(key, math.ceil(last / 1000) + 1000)

    if op == "set":
        life, at = _i(argv[4]), _i(argv[5])
        u = at if at > 0 else now + life if life > 0 else 0
        store.hset(key, {field: f"{u}|{as_str(argv[3])}".encode()})
        expire_with_last()
        return [now, u]
    if op == "del":
        removed = store.hdel(key, field)
        expire_with_last()
        return [now, removed]
    if op == "get":
        out: list[Any] = [now]
        for f, v in store.hgetall(key).items():
            if live(v)[0]:
                out += [f.encode(), v]
        return out
    raise ValueError(f"control: unknown operation {op}")


def settle(store: MemoryStore, keys: Sequence[str], argv: Sequence[Arg]) -> list[Any]:
    now = _now(store, argv[0])
    if not store.set(keys[0], b"1", nx=True, px=_i(argv[2])):
        return [0]
    out: list[Any] = [1]
    rid = as_str(argv[1])
    n = _i(argv[3])
    live: dict[str, dict[str, int] | None] = {}
    for i in range(n):
        base = 4 + i * 5
        kind = as_str(argv[base])
        kidx = _i(argv[base + 1])
        key = keys[kidx - 1]
        f = as_str(argv[base + 2])
        p1 = _i(argv[base + 3])
        p2 = _i(argv[base + 4]) if kind not in ("t", "h") else 0
        if kind == "c":
            store.zrem(key, rid)
        elif kind == "b":
            tat = lua_number(store.hget(key, f))
            tat = now if tat is None or tat < now else tat
            tat += p2 * p1
            if tat <= now:
                store.hdel(key, f)
            else:
                store.hset(key, {f: tat})
                ms = math.ceil((tat - now) / 1000) + 1000
                if store.pttl(key) < ms:
                    store.pexpire(key, ms)
        elif kind == "q":
            if key not in live:
                payload = store.hget(key, "r|" + rid)
                live[key] = None
                if payload is not None:
                    live[key] = {
                        m.group(1): int(m.group(2))
                        for m in _PAYLOAD_ITEM.finditer(payload.decode())
                    }
                    store.hdel(key, "r|" + rid)
                    store.zrem(keys[kidx], rid)
            held = live[key]
            delta = p2 - held.get(f, p1) if held is not None else p2
            if delta != 0 and store.hincrby(key, f, delta) < 0:
                store.hset(key, {f: 0})
            if p2 > 0:
                store.hincrby(key, f + "#", p2)
            if store.pttl(key) < 0:
                store.pexpire(key, 86_400_000)
        elif kind == "u":
            store.hincrby(key, f, p2)
            store.pexpire(key, p1)
        elif kind == "r":
            store.zadd(key, (store.zscore(key, f) or 0.0) + p2, f)
            store.pexpire(key, p1)
        elif kind == "e":
            if store.exists(key) and store.pttl(key) < p1:
                store.pexpire(key, p1)
        elif kind == "t":
            used = lua_number(store.hget(key, f + "#")) or 0
            for pct in as_str(argv[base + 4]).split(","):
                if not pct.isdigit():
                    continue
                marker = f"{f}@{pct}"
                if used * 100 >= int(pct) * p1 and store.hget(key, marker) is None:
                    store.hset(key, {marker: 1})
                    out += [b"t", f.encode(), int(pct), used]
        elif kind == "h":
            hour = now // 3_600_000_000
            multiple, floor, window = (int(x) for x in as_str(argv[base + 4]).split(","))
            current = store.hincrby(key, str(hour), p1)
            past = 0
            for field, value in list(store.hgetall(key).items()):
                if field.lstrip("-").isdigit():
                    h = int(field)
                    if h < hour - window:
                        store.hdel(key, field)
                    elif h < hour:
                        past += int(value)
                elif field != f"spike@{hour}":
                    store.hdel(key, field)
            marker = f"spike@{hour}"
            if (
                current >= floor
                and current * window * 1000 > multiple * past
                and store.hget(key, marker) is None
            ):
                store.hset(key, {marker: 1})
                out += [b"h", b"spike", hour, current]
            store.pexpire(key, (window + 2) * 3_600_000)
        else:
            raise ValueError(f"settle: unknown operation {kind}")
    return out


# Lua's '([^=,]+)=(%d+)' (%d is 0-9 in Redis' C locale, unlike Python's \d)
_PAYLOAD_ITEM = re.compile(r"([^=,]+)=([0-9]+)")


def extend(store: MemoryStore, keys: Sequence[str], argv: Sequence[Arg]) -> list[int]:
    now = _now(store, argv[0])
    rid = as_str(argv[1])
    lease = _i(argv[2])
    n = _i(argv[3])
    rfield = "r|" + rid

    payloads: dict[int, bytes] = {}
    order: list[int] = []
    live = True
    for i in range(n):
        k = _i(argv[4 + i * 4])
        if k not in payloads:
            p = store.hget(keys[k - 1], rfield)
            if p is None:
                live = False
                break
            payloads[k] = p
            order.append(k)

    out = [1, 0]
    stored: dict[tuple[int, str], int] = {}
    pending: dict[tuple[int, str], int] = {}
    fits = live
    for i in range(n):
        base = 4 + i * 4
        k, f = _i(argv[base]), as_str(argv[base + 1])
        limit, step = _i(argv[base + 2]), _i(argv[base + 3])
        if step < 0:
            raise ValueError(f"extend: negative step {step}")
        ident = (k, f)
        if ident not in stored:
            stored[ident] = lua_number(store.hget(keys[k - 1], f)) or 0
            pending[ident] = 0
        if fits and limit - stored[ident] - pending[ident] < step:
            fits = False
            out[1] = i + 1
        pending[ident] += step
        out.append(max(0, limit - stored[ident]))
    if not fits:
        out[0] = 0
        return out

    adds: dict[int, dict[str, int]] = {}  # insertion order is the Lua's first-use order
    for i in range(n):
        base = 4 + i * 4
        k, f = _i(argv[base]), as_str(argv[base + 1])
        limit, step = _i(argv[base + 2]), _i(argv[base + 3])
        ident = (k, f)
        if step > 0:
            stored[ident] = store.hincrby(keys[k - 1], f, step)
            sums = adds.setdefault(k, {})
            sums[f] = sums.get(f, 0) + step
        out[2 + i] = limit - stored[ident]

    for k in order:
        key = keys[k - 1]
        if k in adds:
            sums = adds[k]
            text, seen = "", set()
            for m in _PAYLOAD_ITEM.finditer(payloads[k].decode()):
                name, amount = m.group(1), m.group(2)
                if name in sums and name not in seen:
                    seen.add(name)
                    amount = str(int(amount) + sums[name])
                text += f"{name}={amount},"
            for name, added in sums.items():
                if name not in seen:
                    text += f"{name}={added},"
            store.hset(key, {rfield: text.encode()})
        if store.zscore(keys[k], rid) is not None:  # ZADD XX
            store.zadd(keys[k], now + lease, rid)
    return out


def renew(store: MemoryStore, keys: Sequence[str], argv: Sequence[Arg]) -> list[int]:
    now = _now(store, argv[0])
    rid = as_str(argv[1])
    n = _i(argv[2])

    for i in range(n):
        key, most = keys[i], _i(argv[3 + i * 2])
        store.zremrangebyscore(key, float("-inf"), now)
        if store.zscore(key, rid) is None and store.zcard(key) >= most:
            return [0, i + 1]

    for i in range(n):
        key, lease = keys[i], _i(argv[3 + i * 2 + 1])
        store.zadd(key, now + lease, rid)
        ms = math.ceil(lease / 1000) + 1000
        if store.pttl(key) < ms:
            store.pexpire(key, ms)
    return [1, 0]


def read(store: MemoryStore, keys: Sequence[str], argv: Sequence[Arg]) -> list[list[bytes]]:
    out: list[list[bytes]] = []
    for key in keys:
        flat: list[bytes] = []
        for f, v in store.hgetall(key).items():
            flat += [f.encode(), v]
        out.append(flat)
    return out


def budget_limit(store: MemoryStore, keys: Sequence[str], argv: Sequence[Arg]) -> list[Any]:
    key, field = keys[0], as_str(argv[0]) + ":limit"
    before = store.hget(key, field) or b""
    if as_str(argv[1]) == "":
        store.hdel(key, field)
    else:
        store.hset(key, {field: as_str(argv[1]).encode()})
        if store.pttl(key) < 0:
            store.pexpire(key, _i(argv[2]))
    return [before, lua_number(store.hget(key, as_str(argv[0]))) or 0]


def rank(store: MemoryStore, keys: Sequence[str], argv: Sequence[Arg]) -> list[Any]:
    total: dict[str, float] = {}
    for key in keys[1:]:
        for member, score in store.zrangebyscore(key, float("-inf"), float("inf")):
            total[member] = total.get(member, 0.0) + score
    # ZREVRANGE: by score, then by member, both descending
    top = sorted(total.items(), key=lambda t: (t[1], t[0]), reverse=True)[: _i(argv[0])]
    out: list[Any] = [len(total)]
    for member, score in top:
        out += [member.encode(), str(int(score)).encode()]
    return out


def outbox_add(store: MemoryStore, keys: Sequence[str], argv: Sequence[Arg]) -> int:
    maxlen = _i(argv[0])
    for event in argv[1:]:
        data = event if isinstance(event, bytes) else str(event).encode()
        store.xadd(keys[0], {"event": data}, maxlen=maxlen)
    return len(argv) - 1


def margins(store: MemoryStore, keys: Sequence[str], argv: Sequence[Arg]) -> list[bytes]:
    key = keys[0]
    for i in range(1, 2 * _i(argv[0]), 2):
        f, ours = as_str(argv[i]), _i(argv[i + 1])
        raw = store.hget(key, f)
        stored = None if raw is None else int(raw)
        if stored is None:
            if len(store.hgetall(key)) < 1024:
                store.hset(key, {f: ours})
        elif ours > stored:
            store.hset(key, {f: ours})
        elif ours < stored:
            store.hset(key, {f: stored - math.ceil((stored - ours) / 8)})
    flat: list[bytes] = []
    for f, v in store.hgetall(key).items():
        flat += [f.encode(), v]
    if flat:
        store.pexpire(key, 7 * 86_400_000)
    return flat


# -- API keys: lua/key_*.lua ------------------------------------------------------------------


def key_lookup(store: MemoryStore, keys: Sequence[str], argv: Sequence[Arg]) -> list[bytes]:
    now = _now(store, argv[0])
    h = store.hgetall(keys[0])
    if "caller" not in h:
        return []
    expires = int(h.get("expires", b"0"))
    state = b"active"
    if h.get("revoked") == b"1":
        state = b"revoked"
    elif 0 < expires <= now:
        state = b"expired"
    return [
        h["caller"],
        h.get("plan", b""),
        h.get("tenant", b"default"),
        h.get("created", b"0"),
        h.get("expires", b"0"),
        h.get("revoked", b"0"),
        h.get("digest", b""),
        state,
    ]


def key_put(store: MemoryStore, keys: Sequence[str], argv: Sequence[Arg]) -> list[int]:
    now = _now(store, argv[0])
    if store.exists(keys[0]):
        return [0]
    ttl_us, retention_ms = int(as_str(argv[4])), int(as_str(argv[6]))
    expires = now + ttl_us if ttl_us > 0 else 0
    store.hset(
        keys[0],
        {
            "caller": as_str(argv[1]),
            "plan": as_str(argv[2]),
            "tenant": as_str(argv[3]),
            "created": now,
            "expires": expires,
            "revoked": 0,
            "digest": as_str(argv[5]),
        },
    )
    if expires > 0:
        store.pexpireat(keys[0], expires // 1000 + retention_ms)
    return [1, now, expires]


def key_revoke(store: MemoryStore, keys: Sequence[str], argv: Sequence[Arg]) -> int:
    now = _now(store, argv[0])
    h = store.hgetall(keys[0])
    if "caller" not in h or h.get("revoked") == b"1":
        return 0
    store.hset(keys[0], {"revoked": 1, "revoked_at": now})
    retention_ms = int(as_str(argv[1]))
    if store.pttl(keys[0]) < 0 or store.pttl(keys[0]) > retention_ms:
        store.pexpire(keys[0], retention_ms)
    return 1


def key_expire(store: MemoryStore, keys: Sequence[str], argv: Sequence[Arg]) -> list[Any]:
    now = _now(store, argv[0])
    h = store.hgetall(keys[0])
    if "caller" not in h:
        return [0, b"missing"]
    if h.get("revoked") == b"1":
        return [0, b"revoked"]
    expires = int(h.get("expires", b"0"))
    if 0 < expires <= now:
        return [0, b"expired"]
    at = now + int(as_str(argv[1]))
    if expires == 0 or at < expires:
        expires = at
        store.hset(keys[0], {"expires": expires})
        store.pexpireat(keys[0], expires // 1000 + int(as_str(argv[2])))
    return [1, expires]


def key_list(store: MemoryStore, keys: Sequence[str], argv: Sequence[Arg]) -> Any:
    op = as_str(argv[0])
    if op == "add":
        return sum(store.sadd(keys[0], as_str(m)) for m in argv[1:])
    if op == "remove":
        return sum(store.srem(keys[0], as_str(m)) for m in argv[1:])
    if op == "list":
        return [m.encode() for m in sorted(store.smembers(keys[0]))]
    raise ValueError(f"key_list: unknown operation {op}")
