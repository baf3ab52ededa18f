"""The backend fixture and the Lua scripts (``lua/admit.lua``, ``lua/settle.lua``).

Every scenario runs on all four backends (memory twin, fakeredis with Lua, a real redis-server, a
real 3-master cluster) through :class:`ScriptCall` with an explicit ``now`` (ARGV[1]), so the
replies are exact. A hypothesis property test checks that the Python twins, fakeredis' Lua and the
real server give identical replies for random sequences of admits and settles.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quota_middleware import Concurrency, Plan, QuotaConfig, QuotaMiddleware
from quota_middleware.backends.memory import MemoryBackend
from quota_middleware.base._keys import app_tag, caller_tag
from quota_middleware.base._protocols import CircuitBreaker
from quota_middleware.base._scripts import ScriptCall
from quota_middleware.errors import StorageError

NOW = 1_700_000_000_000_000  # unix microseconds: realistic magnitudes (Lua numbers are doubles)
SEC = 1_000_000

TAG = "{default:alice}"
KB = f"qm:{TAG}"  # bucket hash
KC = f"qm:{TAG}:c:inflight"  # concurrency zset
KQ = f"qm:{TAG}:q:day"  # calendar counter hash (a "q" limit on key k uses KEYS[k + 1] too)
KL = f"qm:{TAG}:q:day:ledger"  # its reservation ledger (zset of request ids by lease end)
KU = f"qm:{TAG}:u:day"  # usage record hash
KEYS = (KB, KC, KQ, KL, KU)
# settle: KEYS[1] is the done marker, then the same keys (indexes shift by one)


def done_key(rid: str) -> str:
    return f"qm:{TAG}:done:{rid}"


Limit = tuple[str, int, str, int, int, int, int]  # kind, key index, field, p1, p2, cost, min_cost
Op = tuple[str, int, str, int, int]  # kind, key index, field, p1, p2


def bucket(per_sec: float, burst: int, cost: int = 1, min_cost: int | None = None) -> Limit:
    interval = int(SEC / per_sec)
    return ("b", 1, "rpm", interval, interval * burst, cost, cost if min_cost is None else min_cost)


def admit_call(
    limits: Sequence[Limit],
    *,
    now: int | str,
    rid: str = "r1",
    lease: int = 0,
    keys: Sequence[str] = KEYS,
) -> ScriptCall:
    args: list[int | str] = [now, rid, lease, len(limits)]
    for lim in limits:
        args.extend(lim)
    return ScriptCall("admit", tuple(keys), tuple(args))


def settle_call(
    ops: Sequence[Op],
    *,
    now: int | str,
    rid: str = "r1",
    keys: Sequence[str] = KEYS,
    done_ttl_ms: int = 60_000,
    marker: str | None = None,
) -> ScriptCall:
    args: list[int | str] = [now, rid, done_ttl_ms, len(ops)]
    for op in ops:
        args.extend(op)
    return ScriptCall("settle", (marker or done_key(rid), *keys), tuple(args))


def ints(reply: Any) -> Any:
    return [int(x) for x in reply] if isinstance(reply, list) else int(reply)


def run(backend: Any, call: ScriptCall) -> Any:
    return ints(backend.sync().run(call))


def run_async(backend: Any, *calls: ScriptCall) -> list[Any]:
    """Run ``calls`` in order on a new async backend in a new loop; close it in that loop."""

    async def go() -> list[Any]:
        b = backend.async_()
        try:
            return [ints(await b.run_async(c)) for c in calls]
        finally:
            await b.aclose()

    return asyncio.run(go())


def pttl(backend: Any, key: str) -> int:
    if backend.name == "memory":
        return int(backend.sync().store.pttl(key))
    return int(backend.sync().client.pttl(key))


# -- GCRA bucket --------------------------------------------------------------------------------
def test_bucket_admits_exactly_burst_then_denies(backend: Any) -> None:
    lim = bucket(1, 5)  # 1/s, burst 5
    replies = [run(backend, admit_call([lim], now=NOW)) for _ in range(3)]
    # the async backend sees the same data
    replies += run_async(backend, *(admit_call([lim], now=NOW) for _ in range(2)))
    for i, r in enumerate(replies):
        assert r == [1, 0, 0, NOW, 4 - i, (i + 1) * SEC, 1], r
    denied = run(backend, admit_call([lim], now=NOW))
    # denied at limit 1, retry in exactly one interval, nothing charged
    assert denied == [0, 1, SEC, NOW, 0, 5 * SEC, 0]
    assert run_async(backend, admit_call([lim], now=NOW))[0] == denied


def test_bucket_refills_with_time(backend: Any) -> None:
    lim = bucket(10, 3)  # one unit every 100 ms, burst 3
    for _ in range(3):
        assert run(backend, admit_call([lim], now=NOW))[0] == 1
    r = run(backend, admit_call([lim], now=NOW))
    assert r[:3] == [0, 1, SEC // 10]
    # one microsecond early: still denied, retry 1 us
    assert run(backend, admit_call([lim], now=NOW + SEC // 10 - 1))[:3] == [0, 1, 1]
    # exactly at retry: one unit back
    r = run(backend, admit_call([lim], now=NOW + SEC // 10))
    assert r == [1, 0, 0, NOW + SEC // 10, 0, 3 * SEC // 10, 1]
    # long after: full again (remaining = burst - 1), and never more than burst
    later = NOW + 3600 * SEC
    assert run(backend, admit_call([lim], now=later)) == [1, 0, 0, later, 2, SEC // 10, 1]


def test_missing_key_is_a_full_bucket(backend: Any) -> None:
    lim = bucket(1, 7, cost=2)
    assert run(backend, admit_call([lim], now=NOW)) == [1, 0, 0, NOW, 5, 2 * SEC, 2]
    backend.flush()
    assert run(backend, admit_call([lim], now=NOW)) == [1, 0, 0, NOW, 5, 2 * SEC, 2]


def test_all_or_nothing(backend: Any) -> None:
    rpm = ("b", 1, "rpm", SEC, 10 * SEC, 1, 1)  # 10 requests
    tpm = ("b", 1, "tpm", SEC, 3 * SEC, 2, 2)  # 3 tokens, 2 per request
    assert run(backend, admit_call([rpm, tpm], now=NOW)) == [
        *(1, 0, 0, NOW),
        *(9, SEC, 1),
        *(1, 2 * SEC, 2),
    ]
    r = run(backend, admit_call([rpm, tpm], now=NOW))
    # limit 2 denies (1 token left, 2 needed: retry after one interval); limit 1 is reported as
    # it stands (9 left), uncharged
    assert r == [0, 2, SEC, NOW, *(9, SEC, 0), *(1, 2 * SEC, 0)]
    assert run(backend, admit_call([rpm], now=NOW)) == [1, 0, 0, NOW, 8, 2 * SEC, 1]


def test_slowest_denial_wins_and_never_wins(backend: Any) -> None:
    a = ("b", 1, "a", SEC, SEC, 1, 1)
    b = ("b", 1, "b", 5 * SEC, 5 * SEC, 1, 1)
    run(backend, admit_call([a, b], now=NOW))
    r = run(backend, admit_call([a, b], now=NOW))
    assert r[:3] == [0, 1, 5 * SEC]  # first denying index, the longest wait
    never = ("b", 1, "c", SEC, SEC, 2, 2)
    assert run(backend, admit_call([a, never], now=NOW))[:3] == [0, 1, -1]


def test_cost_above_burst_can_never_fit(backend: Any) -> None:
    lim = bucket(1, 10, cost=11)
    assert run(backend, admit_call([lim], now=NOW)) == [0, 1, -1, NOW, 10, 0, 0]
    # a reservation (min_cost 1) charges what is left instead
    res = bucket(1, 10, cost=15, min_cost=1)
    assert run(backend, admit_call([res], now=NOW)) == [1, 0, 0, NOW, 0, 10 * SEC, 10]


# -- concurrency and settle ---------------------------------------------------------------------
def test_concurrency_slots_and_release(backend: Any) -> None:
    lease = 60 * SEC
    slot = ("c", 2, "", 2, lease, 1, 1)
    assert run(backend, admit_call([slot], now=NOW, rid="r1")) == [1, 0, 0, NOW, 1, 0, 1]
    assert run(backend, admit_call([slot], now=NOW, rid="r2")) == [1, 0, 0, NOW, 0, 0, 1]
    assert run(backend, admit_call([slot], now=NOW, rid="r3")) == [0, 1, SEC, NOW, 0, 0, 0]
    # a request that already holds a slot is admitted again (retries of the same request)
    assert run(backend, admit_call([slot], now=NOW, rid="r1")) == [1, 0, 0, NOW, 0, 0, 1]
    # release r1: r3 fits
    rel = ("c", 3, "", 0, 0)  # settle key indexes are shifted by the done marker
    assert run(backend, settle_call([rel], now=NOW + 1, rid="r1"))[0] == 1
    assert run(backend, admit_call([slot], now=NOW + 2, rid="r3"))[:3] == [1, 0, 0]
    # settle is idempotent: a second settle of r1 changes nothing and says so
    assert run(backend, settle_call([rel], now=NOW + 3, rid="r1")) == [0]
    assert run(backend, admit_call([slot], now=NOW + 4, rid="r4"))[:3] == [0, 1, SEC]
    # leases expire: after lease_us every slot is free again
    assert run(backend, admit_call([slot], now=NOW + lease + 10, rid="r5"))[:5] == [
        *(1, 0, 0, NOW + lease + 10),
        1,
    ]


def test_settle_refund_and_surcharge(backend: Any) -> None:
    tok = ("b", 1, "tpm", SEC // 100, SEC, 80, 1)  # 100 tokens/s, burst 100; reserve 80
    assert run(backend, admit_call([tok], now=NOW)) == [1, 0, 0, NOW, 20, 80 * SEC // 100, 80]
    # the response used 30: refund 50
    refund = ("b", 2, "tpm", SEC // 100, -50)
    assert run(backend, settle_call([refund], now=NOW, rid="r1"))[0] == 1
    check = ("b", 1, "tpm", SEC // 100, SEC, 0, 0)
    assert run(backend, admit_call([check], now=NOW))[4] == 70
    # idempotent
    assert run(backend, settle_call([refund], now=NOW, rid="r1")) == [0]
    assert run(backend, admit_call([check], now=NOW))[4] == 70
    # a refund never fills beyond full; a surcharge may run into debt
    big = ("b", 2, "tpm", SEC // 100, -1000)
    assert run(backend, settle_call([big], now=NOW, rid="r2"))[0] == 1
    assert run(backend, admit_call([check], now=NOW))[4:6] == [100, 0]
    debt = ("b", 2, "tpm", SEC // 100, 150)
    assert run(backend, settle_call([debt], now=NOW, rid="r3"))[0] == 1
    one = ("b", 1, "tpm", SEC // 100, SEC, 1, 1)
    assert run(backend, admit_call([one], now=NOW)) == [
        0,
        1,
        51 * SEC // 100,
        NOW,
        0,
        150 * SEC // 100,
        0,
    ]


def test_calendar_quota(backend: Any) -> None:
    end = NOW + 3600 * SEC
    q = ("q", 3, "tokens", 100, end, 60, 60)
    assert run(backend, admit_call([q], now=NOW)) == [1, 0, 0, NOW, 40, end - NOW, 60]
    assert run(backend, admit_call([q], now=NOW)) == [0, 1, end - NOW, NOW, 40, end - NOW, 0]
    res = ("q", 3, "tokens", 100, end, 60, 1)
    assert run(backend, admit_call([res], now=NOW)) == [1, 0, 0, NOW, 0, end - NOW, 40]
    too_big = ("q", 3, "tokens", 100, end, 101, 101)
    assert run(backend, admit_call([too_big], now=NOW))[:3] == [0, 1, -1]
    # settle without a live reservation charges the actual (never below 0)
    give = ("q", 4, "tokens", 0, -500)
    assert run(backend, settle_call([give], now=NOW, rid="r9"))[0] == 1
    assert run(backend, admit_call([q], now=NOW))[4] == 40


def test_quota_reservation_lease(backend: Any) -> None:
    end = NOW + 3600 * SEC
    res = ("q", 3, "tokens", 100, end, 60, 1)
    peek = ("q", 3, "tokens", 100, end, 0, 0)
    assert run(backend, admit_call([res], now=NOW, rid="r1", lease=30 * SEC))[4:] == [
        *(40, end - NOW, 60)
    ]
    # settled while live: the counter moves by actual - reserved
    used = ("q", 4, "tokens", 60, 20)
    assert run(backend, settle_call([used], now=NOW + 1, rid="r1"))[0] == 1
    assert run(backend, admit_call([peek], now=NOW + 2))[4] == 80
    assert run(backend, settle_call([used], now=NOW + 3, rid="r1")) == [0]
    assert run(backend, admit_call([peek], now=NOW + 4))[4] == 80
    # a dead worker's reservation frees itself when its lease ends
    assert run(backend, admit_call([res], now=NOW, rid="r2", lease=SEC))[4:] == [
        *(20, end - NOW, 60)
    ]
    assert run(backend, admit_call([peek], now=NOW + SEC - 1))[4] == 20
    assert run(backend, admit_call([peek], now=NOW + SEC))[4] == 80
    # ... and a late settle then charges the whole actual
    late = ("q", 4, "tokens", 60, 10)
    assert run(backend, settle_call([late], now=NOW + 2 * SEC, rid="r2"))[0] == 1
    assert run(backend, admit_call([peek], now=NOW + 2 * SEC))[4] == 70


def test_usage_record(backend: Any) -> None:
    u = ("u", 6, "gpt-4o", 5000, 123)
    assert run(backend, settle_call([u], now=NOW, rid="r1"))[0] == 1
    assert run(backend, settle_call([u], now=NOW, rid="r1")) == [0]
    assert run(backend, settle_call([u], now=NOW, rid="r2"))[0] == 1
    assert 0 < pttl(backend, KU) <= 5000
    if backend.name == "memory":
        assert backend.sync().store.hget(KU, "gpt-4o") == b"246"
    else:
        assert backend.sync().client.hget(KU, "gpt-4o") == b"246"


def test_keys_have_ttls(backend: Any) -> None:
    end = NOW + 3600 * SEC
    limits = [bucket(1, 5), ("c", 2, "", 3, 30 * SEC, 1, 1), ("q", 3, "t", 10, end, 1, 1)]
    assert run(backend, admit_call(limits, now=NOW, lease=30 * SEC))[0] == 1
    assert run(backend, settle_call([("c", 3, "", 0, 0)], now=NOW, rid="r2"))[0] == 1
    b, c, q, ledger, d = (pttl(backend, k) for k in (KB, KC, KQ, KL, done_key("r2")))
    # bucket: until full again (1 s) + 1 s slack; zset: lease + 1 s; quota: period + 1 h + 1 s;
    # the reservation ledger: period + 1 h
    assert 1000 < b <= 2000, b
    assert 30_000 < c <= 31_000, c
    assert 3600_000 * 2 < q <= 3600_000 * 2 + 1000, q
    assert 3600_000 * 2 - 1000 < ledger <= 3600_000 * 2, ledger
    assert 0 < d <= 60_000, d
    assert pttl(backend, f"qm:{TAG}:nothing") == -2


def test_empty_now_reads_server_time(backend: Any) -> None:
    r = run(backend, admit_call([bucket(1, 5)], now=""))
    assert r[0] == 1
    import time

    assert abs(r[3] - time.time_ns() // 1000) < 60 * SEC  # server clock, close to ours


def test_hash_tagged_keys_share_a_slot(backend: Any) -> None:
    from redis.crc import key_slot

    assert len({key_slot(k.encode()) for k in (*KEYS, done_key("r1"))}) == 1
    limits = [bucket(1, 5), ("c", 2, "", 3, 30 * SEC, 1, 1)]
    assert run(backend, admit_call(limits, now=NOW))[:3] == [1, 0, 0]
    assert run(backend, settle_call([("c", 3, "", 0, 0)], now=NOW))[0] == 1
    # keys of different callers in one script: fine on one node, CROSSSLOT on the cluster
    mixed = ("qm:{default:alice}", "qm:{default:bob}")
    two = [("b", 1, "rpm", SEC, 5 * SEC, 1, 1), ("b", 2, "rpm", SEC, 5 * SEC, 1, 1)]
    assert key_slot(mixed[0].encode()) != key_slot(mixed[1].encode())
    if backend.name == "cluster":
        from redis.exceptions import RedisClusterException

        # redis-py refuses before sending (RedisClusterException, which is NOT a RedisError, so
        # the backend does not wrap it in StorageError); a server would answer CROSSSLOT
        with pytest.raises((StorageError, RedisClusterException)):
            backend.sync().run(admit_call(two, now=NOW, keys=mixed))
    else:
        assert run(backend, admit_call(two, now=NOW, keys=mixed))[:3] == [1, 0, 0]


# -- NOSCRIPT and restarts (own server) ---------------------------------------------------------
def _retry(fn: Any, tries: int = 5) -> Any:
    last: Exception | None = None
    for _ in range(tries):
        try:
            return fn()
        except StorageError as e:  # the first call after a restart may hit the dead socket
            last = e
    raise AssertionError(f"still failing after {tries} tries: {last!r}")


@pytest.mark.redis
def test_noscript_and_restart_sync(fresh_redis_server: Any) -> None:
    import redis

    from quota_middleware.backends.redis import SyncRedisBackend

    client = redis.Redis.from_url(fresh_redis_server.url, socket_timeout=2)
    b = SyncRedisBackend(client, breaker=CircuitBreaker(failures=100))
    try:
        lim = bucket(1, 5)
        assert ints(b.run(admit_call([lim], now=NOW)))[4] == 4
        client.script_flush()
        assert ints(b.run(admit_call([lim], now=NOW)))[4] == 3  # reloaded, data kept
        fresh_redis_server.restart()  # data and scripts gone
        r = _retry(lambda: ints(b.run(admit_call([lim], now=NOW))))
        assert r[4] == 4
        assert ints(b.run(admit_call([lim], now=NOW)))[4] == 3
    finally:
        b.close()


@pytest.mark.redis
def test_noscript_and_restart_async(fresh_redis_server: Any) -> None:
    import redis.asyncio

    from quota_middleware.backends.redis import AsyncRedisBackend

    async def go() -> None:
        client = redis.asyncio.Redis.from_url(fresh_redis_server.url, socket_timeout=2)
        b = AsyncRedisBackend(client, breaker=CircuitBreaker(failures=100))
        try:
            lim = bucket(1, 5)
            assert ints(await b.run_async(admit_call([lim], now=NOW)))[4] == 4
            await client.script_flush()
            assert ints(await b.run_async(admit_call([lim], now=NOW)))[4] == 3
            fresh_redis_server.restart()
            r = None
            for _ in range(5):
                try:
                    r = ints(await b.run_async(admit_call([lim], now=NOW)))
                    break
                except StorageError:
                    pass
            assert r is not None and r[4] == 4
        finally:
            await b.aclose()

    asyncio.run(go())


@pytest.mark.redis
def test_storage_error_when_down(fresh_redis_server: Any) -> None:
    import redis

    from quota_middleware.backends.redis import SyncRedisBackend

    b = SyncRedisBackend(
        redis.Redis.from_url(fresh_redis_server.url, socket_timeout=1, socket_connect_timeout=1)
    )
    try:
        fresh_redis_server.stop()
        for _ in range(3):
            with pytest.raises(StorageError):
                b.run(admit_call([bucket(1, 5)], now=NOW))
        assert b.breaker.is_open
    finally:
        b.close()


# -- property test: Python twin == fakeredis Lua == real Redis ----------------------------------
RIDS = ("r0", "r1", "r2", "r3")
KINDS = st.lists(st.sampled_from("bcq"), min_size=1, max_size=3, unique=True)

admit_op = st.fixed_dictionaries(
    {
        "op": st.just("admit"),
        "dt": st.integers(0, 3 * SEC),  # time step
        "cost": st.integers(0, 25),
        "min_pct": st.integers(0, 100),  # min_cost as a percentage of cost
        "lease": st.sampled_from((0, 0, SEC // 2, 2 * SEC)),  # "q" reservation lease
        "rid": st.sampled_from(RIDS),
        "kinds": KINDS,
    }
)
settle_op = st.fixed_dictionaries(
    {
        "op": st.just("settle"),
        "dt": st.integers(0, 3 * SEC),
        "delta": st.integers(-30, 30),  # "b": units moved; "q"/"u": actual
        "reserved": st.integers(0, 25),  # "q": what admit reserved
        "marker": st.integers(0, 2),  # repeats exercise idempotency
        "rid": st.sampled_from(RIDS),
        "kinds": st.lists(st.sampled_from("bcqu"), min_size=1, max_size=4, unique=True),
    }
)
params = st.fixed_dictionaries(
    {
        "interval": st.integers(1, 2 * SEC),
        "burst": st.integers(1, 20),
        "slack": st.integers(0, 100),  # tau not a multiple of the interval (percent of one)
        "slots": st.integers(1, 3),
        "lease": st.integers(1, 5 * SEC),
        "quota": st.integers(1, 60),
    }
)


def _build(step: dict[str, Any], p: dict[str, int], now: int) -> ScriptCall:
    tau = p["interval"] * p["burst"] + p["interval"] * p["slack"] // 100
    end = NOW + 10 * 24 * 3600 * SEC
    if step["op"] == "admit":
        cost = step["cost"]
        min_cost = cost * step["min_pct"] // 100
        limits: list[Limit] = []
        for k in step["kinds"]:
            if k == "b":
                limits.append(("b", 1, "f", p["interval"], tau, cost, min_cost))
            elif k == "c":
                limits.append(("c", 2, "", p["slots"], p["lease"], 1, 1))
            else:
                limits.append(("q", 3, "f", p["quota"], end, cost, min_cost))
        return admit_call(limits, now=now, rid=step["rid"], lease=step["lease"])
    ops: list[Op] = []
    for k in step["kinds"]:
        if k == "b":
            ops.append(("b", 2, "f", p["interval"], step["delta"]))
        elif k == "c":
            ops.append(("c", 3, "", 0, 0))
        elif k == "q":
            ops.append(("q", 4, "f", step["reserved"], step["delta"]))
        else:
            ops.append(("u", 6, "f", 60_000, step["delta"]))
    marker = f"qm:{TAG}:done:{step['marker']}"
    return settle_call(ops, now=now, rid=step["rid"], marker=marker)


@pytest.mark.redis
@pytest.mark.fakeredis
@pytest.mark.memory
@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(p=params, steps=st.lists(st.one_of(admit_op, settle_op), min_size=1, max_size=25))
def test_lua_matches_python_twin(twin_backends: Any, p: dict[str, int], steps: list[Any]) -> None:
    b = twin_backends()
    now = NOW
    for i, step in enumerate(steps):
        now += step["dt"]
        call = _build(step, p, now)
        replies = {name: ints(b[name].run(call)) for name in ("memory", "fakeredis", "real")}
        assert replies["memory"] == replies["fakeredis"] == replies["real"], (i, call, replies)


def test_memory_store_expires_keys_of_callers_that_never_come_back() -> None:
    """Like Redis' active expiry: keys nobody reads again are dropped as the store is used."""
    import time

    backend = MemoryBackend()
    # 2,000 one-off callers, each with a bucket that is full again (key expires) ~1 s later
    for i in range(2000):
        lim = ("b", 1, "req", 1_000, 1_000_000, 1, 1)
        backend.run(ScriptCall("admit", (f"qm:{{default:c{i}}}",), ("", f"r{i}", 0, 1, *lim)))
    assert len(backend.store.data) == 2000
    time.sleep(1.2)
    # one caller keeps using the store; the others' keys go away without being touched
    for i in range(300):
        lim = ("b", 1, "req", 1, 1_000_000, 1, 1)
        backend.run(ScriptCall("admit", ("qm:{default:steady}",), ("", f"s{i}", 0, 1, *lim)))
    assert len(backend.store.data) <= 2


def test_batch_of_many_is_never_left_hanging(redis_server: Any) -> None:
    from quota_middleware.backends.redis import AsyncRedisBackend

    async def main() -> list[Any]:
        client = redis.asyncio.Redis.from_url(redis_server.url)
        backend = AsyncRedisBackend(client)
        good = ScriptCall("read", ("qm:{default:a}",), ())
        bad = ScriptCall("read", ("qm:{default:\ud800}",), ())
        try:
            return await asyncio.wait_for(
                asyncio.gather(*(backend.run_async(c) for c in (good, bad, good)),
                               return_exceptions=True), 5)  # fmt: skip
        finally:
            await client.aclose()

    replies = asyncio.run(main())
    assert replies[0] == [[]] and replies[2] == [[]]  # the good calls answered


def test_request_cancelled_during_admit_gives_its_slot_back(redis_server: Any) -> None:
    """The admit call still runs in Redis after the client is gone; its slot is released at
    once instead of when the 300 s lease ends."""
    from quota_middleware.backends.redis import AsyncRedisBackend

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    cfg = QuotaConfig(plans=[Plan(name="p", limits=[Concurrency(max=1)])])

    class Slow(AsyncRedisBackend):
        """The admit is already queued for Redis when the client goes away."""

        async def _flush_batch(self, batch: Any) -> None:
            if any(call.name == "admit" for call, _ in batch):
                await asyncio.sleep(0.2)
            await super()._flush_batch(batch)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main() -> None:
        aclient = redis.asyncio.Redis.from_url(redis_server.url)
        mw = QuotaMiddleware(app, config=cfg, backend=Slow(aclient))
        scope = {"type": "http", "method": "GET", "path": "/", "headers": [],
                 "client": ("10.1.1.1", 1), "query_string": b""}  # fmt: skip

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        async def send(message: Any) -> None:
            pass

        task = asyncio.ensure_future(mw(scope, receive, send))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.5)  # the admit completes, then the orphan is released
        await aclient.aclose()

    asyncio.run(main())
    assert client.zcard("qm:{default:10.1.1.1}:c:inflight") == 0


def test_caller_tags_are_unambiguous() -> None:
    assert caller_tag("a:b", "c") != caller_tag("a", "b:c")
    assert caller_tag("default", "2001:db8::/64") == "{default:2001:db8::/64}"
    hashed = caller_tag("t", "x{y}")[3:-1]
    assert caller_tag("t", hashed) != caller_tag("t", "x{y}")  # a raw id can't pose as a digest
    assert all(app_tag("qm") != f"qm:{caller_tag(t, c)}" for t in ("app", "@app")
               for c in ("*", "@app", ""))  # fmt: skip
