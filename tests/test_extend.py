"""The ``extend`` script (``lua/extend.lua``) and its sans-IO helpers (``extension.py``).

Mid-stream top-ups of an AI request's token-quota and budget reservations, on every backend:
first the script through :class:`ScriptCall` with an explicit ``now`` (exact replies and
state), then through the engine (admit -> extend -> settle ends every counter at exactly the
actual usage), concurrent extends against one limit, and a hypothesis property test that the
Python twin, fakeredis' Lua and a real Redis agree step for step.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from quota_middleware import AIRoute, Budget, Plan, QuotaConfig, RequestRate, TokenQuota
from quota_middleware.backends.memory import MemoryBackend
from quota_middleware.base._request import Headers, RequestInfo
from quota_middleware.base._scripts import SCRIPT_NAMES, ScriptCall, hash_pairs, source
from quota_middleware.core._decision import Decision, Hold
from quota_middleware.core._engine import Engine, drive_sync
from quota_middleware.core._extension import apply_extend, extend_flow, plan_extend
from quota_middleware.errors import StorageError
from quota_middleware.metering._usage import Usage
from quota_middleware.metering.pricing import ModelPrice, PriceTable, cost_micros

NOW = 1_700_000_000_000_000  # unix microseconds: realistic magnitudes (Lua numbers are doubles)
SEC = 1_000_000
END = NOW + 10 * 24 * 3600 * SEC  # period end, far enough that nothing resets mid-test

TAG = "{default:alice}"
KD = f"qm:{TAG}:q:d2023-11-14"  # a day's counters
LD = f"{KD}:r"  # its reservation ledger
KM = f"qm:{TAG}:q:m2023-11"  # a month's counters
LM = f"{KM}:r"
KEYS = (KD, LD, KM, LM)  # admit and extend: KD is key 1, KM key 3 (each ledger follows)


def done_key(rid: str) -> str:
    return f"qm:{TAG}:done:{rid}"


def ints(reply: Any) -> Any:
    return [int(x) for x in reply] if isinstance(reply, list) else int(reply)


def admit_call(
    limits: list[tuple[int, str, int, int, int]],
    *,
    now: int | str,
    rid: str,
    lease: int,
    end: int = END,
) -> ScriptCall:
    """A "q"-only admit: (key index, field, limit, cost, min_cost) per limit."""
    args: list[int | str] = [now, rid, lease, len(limits)]
    for k, f, limit, cost, least in limits:
        args += ["q", k, f, limit, end, cost, least]
    return ScriptCall("admit", KEYS, tuple(args))


def extend_call(
    ops: list[tuple[int, str, int, int]], *, now: int | str, rid: str, lease: int
) -> ScriptCall:
    """(key index, field, limit, step) per op."""
    args: list[int | str] = [now, rid, lease, len(ops)]
    for op in ops:
        args += list(op)
    return ScriptCall("extend", KEYS, tuple(args))


def settle_call(
    ops: list[tuple[int, str, int, int]], *, now: int | str, rid: str, marker: str | None = None
) -> ScriptCall:
    """Settles of "q" counters: (key index in KEYS, field, reserved, actual) per op; the done
    marker comes first, so every index shifts by one."""
    args: list[int | str] = [now, rid, 60_000, len(ops)]
    for k, f, reserved, actual in ops:
        args += ["q", k + 1, f, reserved, actual]
    return ScriptCall("settle", (marker or done_key(rid), *KEYS), tuple(args))


class State:
    """Reads a backend's raw data: hash fields as text, ledger members with their scores."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def run(self, call: ScriptCall) -> Any:
        return ints(self.backend.sync().run(call))

    def hash(self, key: str) -> dict[str, str]:
        if self.backend.name == "memory":
            raw = self.backend.sync().store.hgetall(key)
            return {f: v.decode() for f, v in raw.items()}
        raw = self.backend.sync().client.hgetall(key)
        return {f.decode(): v.decode() for f, v in raw.items()}

    def ledger(self, key: str) -> dict[str, int]:
        if self.backend.name == "memory":
            pairs = self.backend.sync().store.zrangebyscore(key, float("-inf"), float("inf"))
            return {m: int(s) for m, s in pairs}
        pairs = self.backend.sync().client.zrange(key, 0, -1, withscores=True)
        return {m.decode(): int(s) for m, s in pairs}

    def snapshot(self) -> tuple[Any, ...]:
        return self.hash(KD), self.hash(KM), self.ledger(LD), self.ledger(LM)


TPD = (1, "tpd", 100)  # key index, field, limit: 100 tokens a day
USD = (3, "usd", 1000)  # 1000 micro-dollars a month


def admit_both(s: State, *, rid: str = "r1", now: int = NOW, lease: int = 30 * SEC) -> None:
    reply = s.run(admit_call([(*TPD, 40, 10), (*USD, 300, 50)], now=now, rid=rid, lease=lease))
    assert reply[:3] == [1, 0, 0], reply


# -- the script ---------------------------------------------------------------------------------
def test_registered_and_documented() -> None:
    assert "extend" in SCRIPT_NAMES
    head = source("extend").split("\n\n")[0]
    assert "KEYS[i]" in head and "ARGV[4]" in head and "returns" in head


def test_grant_grows_counters_reservation_and_lease(backend: Any) -> None:
    s = State(backend)
    admit_both(s)
    assert s.hash(KD) == {"tpd": "40", "r|r1": "tpd=40,"}
    reply = s.run(extend_call([(*TPD, 30), (*USD, 200)], now=NOW + SEC, rid="r1", lease=60 * SEC))
    assert reply == [1, 0, 100 - 70, 1000 - 500]
    assert s.hash(KD) == {"tpd": "70", "r|r1": "tpd=70,"}
    assert s.hash(KM) == {"usd": "500", "r|r1": "usd=500,"}
    # the stream is alive: its reservation now holds until now + the new lease
    assert s.ledger(LD) == s.ledger(LM) == {"r1": NOW + SEC + 60 * SEC}
    # settled while live, each counter moves by actual - (the grown) reserved: exactly actual
    assert s.run(settle_call([(*TPD[:2], 70, 55), (*USD[:2], 500, 420)], now=NOW + 2 * SEC,
                             rid="r1"))[0] == 1  # fmt: skip
    assert s.hash(KD) == {"tpd": "55", "tpd#": "55"}
    assert s.hash(KM) == {"usd": "420", "usd#": "420"}
    assert s.ledger(LD) == s.ledger(LM) == {}


def test_denied_when_any_op_lacks_room_and_nothing_changes(backend: Any) -> None:
    s = State(backend)
    admit_both(s)
    before = s.snapshot()
    # tpd has 60 left: 61 does not fit, so neither does the budget's step that would
    assert s.run(extend_call([(*TPD, 61), (*USD, 1)], now=NOW, rid="r1", lease=SEC)) == [
        0, 1, 60, 700,
    ]  # fmt: skip
    # the first op that does not fit is named, whichever key it is on
    assert s.run(extend_call([(*TPD, 10), (*USD, 701)], now=NOW, rid="r1", lease=SEC)) == [
        0, 2, 60, 700,
    ]  # fmt: skip
    assert s.snapshot() == before
    # exactly what is left fits; then nothing more does
    assert s.run(extend_call([(*TPD, 60)], now=NOW, rid="r1", lease=SEC)) == [1, 0, 0]
    assert s.run(extend_call([(*TPD, 1)], now=NOW, rid="r1", lease=SEC)) == [0, 1, 0]
    assert s.hash(KD) == {"tpd": "100", "r|r1": "tpd=100,"}


def test_ops_on_one_field_count_together(backend: Any) -> None:
    s = State(backend)
    admit_both(s)
    # two steps of 31 on tpd need 62 of the 60 left: the second does not fit
    assert s.run(extend_call([(*TPD, 31), (*TPD, 31)], now=NOW, rid="r1", lease=SEC)) == [
        0, 2, 60, 60,
    ]  # fmt: skip
    assert s.run(extend_call([(*TPD, 30), (*TPD, 30)], now=NOW, rid="r1", lease=SEC)) == [
        1, 0, 30, 0,
    ]  # fmt: skip
    assert s.hash(KD) == {"tpd": "100", "r|r1": "tpd=100,"}


def test_new_name_and_zero_step_on_a_live_key(backend: Any) -> None:
    s = State(backend)
    admit_both(s)
    # a field this reservation holds nothing of yet is added to it; a step of 0 writes nothing
    ops = [(1, "tpd2", 50, 5), (*USD, 0)]
    assert s.run(extend_call(ops, now=NOW, rid="r1", lease=SEC)) == [1, 0, 45, 700]
    assert s.hash(KD) == {"tpd": "40", "tpd2": "5", "r|r1": "tpd=40,tpd2=5,"}
    assert s.hash(KM) == {"usd": "300", "r|r1": "usd=300,"}


def test_not_live_after_settle_or_when_the_lease_ran_out(backend: Any) -> None:
    s = State(backend)
    admit_both(s, rid="r1", lease=SEC)
    admit_both(s, rid="r2", lease=SEC)
    assert s.run(settle_call([(*TPD[:2], 40, 40), (*USD[:2], 300, 300)], now=NOW, rid="r1"))[0]
    before = s.snapshot()
    # settled: not live (index 0); the counters are reported as they stand
    assert s.run(extend_call([(*TPD, 1), (*USD, 1)], now=NOW, rid="r1", lease=SEC)) == [
        0, 0, 20, 400,
    ]  # fmt: skip
    assert s.snapshot() == before
    # r2's lease ends and the next admit gives its reservation back: not live either
    assert s.run(admit_call([(*TPD, 0, 0)], now=NOW + SEC, rid="r3", lease=SEC))[4] == 60
    assert s.run(extend_call([(*TPD, 1)], now=NOW + SEC, rid="r2", lease=SEC)) == [0, 0, 60]
    # a request that never had a reservation (or one on the other key only) is not live
    assert s.run(extend_call([(*USD, 1)], now=NOW + SEC, rid="nobody", lease=SEC))[:2] == [0, 0]


def test_an_extension_keeps_the_reservation_past_its_first_lease(backend: Any) -> None:
    s = State(backend)
    admit_both(s, lease=SEC)
    assert s.run(extend_call([(*TPD, 10)], now=NOW + SEC // 2, rid="r1", lease=10 * SEC))[0] == 1
    # The first lease has ended. The day key's ledger was refreshed, so nothing is swept there;
    # the month key was not named by any op, so its reservation ran out and is given back.
    peek = admit_call([(*TPD, 0, 0), (*USD, 0, 0)], now=NOW + 2 * SEC, rid="peek", lease=SEC)
    assert s.run(peek)[4::3] == [100 - 50, 1000]
    assert s.run(extend_call([(*USD, 1)], now=NOW + 2 * SEC, rid="r1", lease=SEC))[:2] == [0, 0]
    # once the new lease ends, the sweep gives back the grown reservation, all of it
    peek = admit_call([(*TPD, 0, 0), (*USD, 0, 0)], now=NOW + 11 * SEC, rid="peek", lease=SEC)
    assert s.run(peek)[4::3] == [100, 1000]
    assert s.hash(KD).get("tpd") == "0"


def test_server_time_and_exact_integers(backend: Any) -> None:
    s = State(backend)
    big = 2**53 - 1  # the largest integer a Lua double holds exactly
    end = time.time_ns() // 1000 + 24 * 3600 * SEC  # server time: a period that has not ended
    admit = admit_call([(1, "tpd", big, big - 7, 1)], now="", rid="r1", lease=SEC, end=end)
    assert s.run(admit)[0] == 1
    reply = s.run(extend_call([(1, "tpd", big, 7)], now="", rid="r1", lease=3600 * SEC))
    assert reply == [1, 0, 0]
    assert s.hash(KD) == {"tpd": str(big), "r|r1": f"tpd={big},"}
    score = s.ledger(LD)["r1"]
    assert abs(score - 3600 * SEC - time.time_ns() // 1000) < 60 * SEC  # server clock


def test_a_negative_step_is_refused(backend: Any) -> None:
    s = State(backend)
    admit_both(s)
    before = s.snapshot()
    with pytest.raises((StorageError, ValueError)):
        backend.sync().run(extend_call([(*TPD, 5), (*USD, -1)], now=NOW, rid="r1", lease=SEC))
    assert s.snapshot() == before


# -- through the engine -------------------------------------------------------------------------
PATH = "/v1/chat/completions"
_PRICE = PriceTable().lookup("gpt-4o-mini")
assert _PRICE is not None
PRICE: ModelPrice = _PRICE
LEASE = 30  # seconds


def config(tokens: int = 100_000, usd: float = 100.0, **route: Any) -> QuotaConfig:
    limits: list[RequestRate | TokenQuota | Budget] = [
        RequestRate(rate="1000/minute", name="rpm"),
        TokenQuota(tokens=tokens, period="day", name="tpd"),
        Budget(usd=usd, period="month", name="usd"),
    ]
    return QuotaConfig(
        plans=[Plan(name="p", limits=limits)],
        ai_routes=[AIRoute(path=PATH, format="openai-chat", default_output_tokens=100,
                           lease=LEASE, **route)],
    )  # fmt: skip


@dataclass
class AI:
    """An engine with a settable clock (near real time, so periods are today's) on a backend."""

    engine: Engine
    sync: Any
    now: list[int]

    @classmethod
    def make(cls, backend: Any, cfg: QuotaConfig | None = None) -> AI:
        now = [time.time_ns() // 1000]
        return cls(Engine(cfg or config(), clock=lambda: now[0]), backend.sync(), now)

    def admit(self, max_tokens: int = 50, ip: str = "192.0.2.7") -> Decision:
        body = {"model": "gpt-4o-mini", "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": "hello"}]}  # fmt: skip
        info = RequestInfo("POST", PATH, Headers([("content-type", "application/json")]),
                           client=ip, body=json.dumps(body).encode())  # fmt: skip
        decision = drive_sync(self.engine.admit(info), self.sync)
        assert decision.allowed, decision
        return decision

    def extend(self, decision: Decision, tokens: int, cost: int) -> bool | None:
        flow = extend_flow(decision, tokens, cost, LEASE * SEC, str(self.now[0]))
        return drive_sync(flow, self.sync)

    def settle(self, decision: Decision, usage: Usage) -> None:
        drive_sync(self.engine.settle(decision, usage, cost_micros(usage, PRICE)), self.sync)

    def counters(self, decision: Decision) -> dict[str, int]:
        """Each quota's and budget's counter (used + reserved), read from its own key."""
        holds = [h for h in decision.holds if h.kind == "q"]
        keys = tuple(sorted({h.key for h in holds}))
        values = dict(zip(keys, self.sync.run(ScriptCall("read", keys, ())), strict=True))
        return {h.name: hash_pairs(values[h.key]).get(h.name, 0) for h in holds}

    def reserved(self, decision: Decision) -> dict[str, int]:
        return {h.name: h.charged for h in decision.holds if h.kind == "q"}


def hold(decision: Decision, name: str) -> Hold:
    (h,) = (h for h in decision.holds if h.kind == "q" and h.name == name)
    return h


def out_cost(tokens: int) -> int:
    return cost_micros(Usage(output_tokens=tokens), PRICE)


def test_engine_grant_grows_holds_and_counters(backend: Any) -> None:
    ai = AI.make(backend)
    d = ai.admit()
    held = ai.reserved(d)
    assert held["tpd"] > 50 and held["usd"] > 0
    assert ai.counters(d) == held
    assert ai.extend(d, 64, out_cost(64)) is True
    grown = {"tpd": held["tpd"] + 64, "usd": held["usd"] + out_cost(64)}
    assert ai.reserved(d) == grown
    assert ai.counters(d) == grown


def test_engine_denied_when_the_quota_lacks_room(backend: Any) -> None:
    probe = AI.make(backend).admit()
    reserved = hold(probe, "tpd").charged  # what one such request reserves on tpd
    backend.flush()
    ai = AI.make(backend, config(tokens=reserved + 20))
    d = ai.admit()
    before = (ai.reserved(d), ai.counters(d))
    assert ai.extend(d, 21, out_cost(21)) is False
    # all or nothing: the budget, on another key, was not extended either
    assert (ai.reserved(d), ai.counters(d)) == before
    assert ai.extend(d, 20, out_cost(20)) is True
    assert ai.counters(d)["tpd"] == reserved + 20
    assert ai.extend(d, 1, out_cost(1)) is False


def test_engine_denied_when_the_budget_lacks_room(backend: Any) -> None:
    probe = AI.make(backend).admit()
    reserved = hold(probe, "usd").charged  # micro-dollars one such request reserves
    backend.flush()
    ai = AI.make(backend, config(usd=(reserved + out_cost(10)) / 1_000_000))
    d = ai.admit()
    before = (ai.reserved(d), ai.counters(d))
    assert ai.extend(d, 11, out_cost(11)) is False
    assert (ai.reserved(d), ai.counters(d)) == before
    # tokens alone need no budget room (an unpriced step of 0 is left out)
    assert ai.extend(d, 11, 0) is True
    assert ai.counters(d)["usd"] == reserved


def test_engine_denied_after_settle(backend: Any) -> None:
    ai = AI.make(backend)
    d = ai.admit()
    usage = Usage(input_tokens=9, output_tokens=30, model="gpt-4o-mini")
    ai.settle(d, usage)
    assert ai.counters(d) == {"tpd": 39, "usd": cost_micros(usage, PRICE)}
    assert ai.extend(d, 10, out_cost(10)) is False
    assert ai.counters(d) == {"tpd": 39, "usd": cost_micros(usage, PRICE)}


def test_engine_settle_after_extensions_charges_exactly_actual(backend: Any) -> None:
    ai = AI.make(backend)
    d = ai.admit(max_tokens=20)
    other = ai.admit(max_tokens=20)  # in flight on the same counters throughout
    for _ in range(3):
        ai.now[0] += SEC
        assert ai.extend(d, 25, out_cost(25)) is True
    usage = Usage(input_tokens=11, output_tokens=92, model="gpt-4o-mini")
    ai.settle(d, usage)
    # only the other request's reservation is left besides d's actual usage
    assert ai.counters(d) == {
        "tpd": 11 + 92 + hold(other, "tpd").charged,
        "usd": cost_micros(usage, PRICE) + hold(other, "usd").charged,
    }
    ai.settle(other, Usage(input_tokens=5, output_tokens=5, model="gpt-4o-mini"))
    assert ai.counters(d)["tpd"] == 11 + 92 + 10


def test_engine_extension_of_a_dead_worker_is_given_back_with_its_lease(backend: Any) -> None:
    ai = AI.make(backend)
    dead = ai.admit()
    assert ai.extend(dead, 40, out_cost(40)) is True
    ai.now[0] += (LEASE + 1) * SEC  # no settle: the worker died mid-stream
    fresh = ai.admit()
    assert ai.counters(fresh) == ai.reserved(fresh)  # the whole grown reservation came back
    assert ai.extend(dead, 1, out_cost(1)) is False


class FailingExtend(MemoryBackend):
    def run(self, call: ScriptCall) -> Any:
        if call.name == "extend":
            raise StorageError("extend: store down")
        return super().run(call)


def test_a_store_error_is_unknown_not_denied() -> None:
    backend = FailingExtend()
    engine = Engine(config())
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})
    info = RequestInfo("POST", PATH, Headers([("content-type", "application/json")]),
                       client="192.0.2.8", body=body.encode())  # fmt: skip
    d = drive_sync(engine.admit(info), backend)
    held = [h.charged for h in d.holds]
    assert drive_sync(extend_flow(d, 10, 10, SEC, ""), backend) is None
    assert [h.charged for h in d.holds] == held


def _decision(*holds: Hold) -> Decision:
    return Decision(allowed=True, request_id="r1", holds=holds)


def test_plan_extend_ops_and_nothing_to_extend() -> None:
    tokens_hold = Hold("q", KD, "tpd", 40, 0, LD, 100)
    other_tokens = Hold("q", KD, "tpd2", 5, 0, LD, 50)
    budget_hold = Hold("q", KM, "usd", 300, 1, LM, 1000)
    bucket = Hold("b", "qm:{default:alice}", "tpm", 40, 600)
    slot = Hold("c", "qm:{default:alice}:c:inflight", "inflight", 1)
    no_ledger = Hold("q", KD, "legacy", 1, 0, None, 10)
    d = _decision(bucket, tokens_hold, slot, budget_hold, no_ledger, other_tokens)
    call = plan_extend(d, 7, 300, 5 * SEC, "")
    assert call == ScriptCall(
        "extend", (KD, LD, KM, LM),
        ("", "r1", 5 * SEC, 3, 1, "tpd", 100, 7, 3, "usd", 1000, 300, 1, "tpd2", 50, 7),
    )  # fmt: skip
    # steps of 0 are left out: an unpriced model extends the token quotas only
    only_tokens = plan_extend(d, 7, 0, SEC, "123")
    assert only_tokens is not None and only_tokens.keys == (KD, LD)
    assert only_tokens.args[:4] == ("123", "r1", SEC, 2)
    assert plan_extend(d, 0, 0, SEC, "") is None
    assert plan_extend(_decision(bucket, slot, no_ledger), 7, 7, SEC, "") is None
    assert drive_sync(extend_flow(_decision(), 7, 7, SEC, ""), FailingExtend()) is True
    with pytest.raises(ValueError):
        plan_extend(d, -1, 0, SEC, "")


def test_apply_extend_matches_holds_by_key_and_name() -> None:
    # the same name on two keys (a day and a month quota both called "tpd") and one key twice
    day = Hold("q", KD, "tpd", 40, 0, LD, 100)
    month = Hold("q", KM, "tpd", 400, 0, LM, 1000)
    d = _decision(month, day)
    call = ScriptCall("extend", (KD, LD, KM, LM),
                      ("", "r1", SEC, 2, 1, "tpd", 100, 5, 3, "tpd", 1000, 9))  # fmt: skip
    assert apply_extend(d, call, [0, 1, 60, 600]) is False
    assert (day.charged, month.charged) == (40, 400)
    assert apply_extend(d, call, [1, 0, 55, 591]) is True
    assert (day.charged, month.charged) == (45, 409)
    with pytest.raises(ValueError):  # another request's call
        apply_extend(_decision(day), ScriptCall("extend", call.keys, ("", "r2", *call.args[2:])),
                     [1, 0])  # fmt: skip
    with pytest.raises(ValueError):  # an op no hold matches: nothing is changed
        apply_extend(_decision(day), call, [1, 0, 50, 582])
    assert day.charged == 45


def test_concurrent_extends_never_pass_the_limit(backend: Any) -> None:
    threads_n, step, limit = 8, 7, 3000
    ai = AI.make(backend, config(tokens=limit))
    decisions = [ai.admit(max_tokens=20) for _ in range(threads_n)]
    granted = [0] * threads_n
    barrier = threading.Barrier(threads_n)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            barrier.wait()
            while ai.extend(decisions[i], step, out_cost(step)):
                granted[i] += step
                time.sleep(0)  # let the others in: the memory backend is faster than a switch
        except BaseException as e:  # noqa: B036 (reported below, a thread cannot raise)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    used = ai.counters(decisions[0])["tpd"]
    # never over the limit, and every thread stopped only when one more step did not fit
    assert limit - step < used <= limit
    # and the holds agree with Redis to the unit: what each thread was granted is what it holds
    assert used == sum(hold(d, "tpd").charged for d in decisions)
    assert sum(g > 0 for g in granted) > 1, granted  # they did race for the last room
    for i, d in enumerate(decisions):
        ai.settle(d, Usage(input_tokens=3, output_tokens=i, model="gpt-4o-mini"))
    assert ai.counters(decisions[0])["tpd"] == sum(3 + i for i in range(threads_n))


# -- property test: Python twin == fakeredis Lua == real Redis ----------------------------------
RIDS = ("r0", "r1")
FIELDS = ((1, "t"), (1, "u"), (3, "t"))  # two fields on one key, and the same name on another
# mostly short steps, so reservations are still live when they are extended; some outlast leases
DT = st.one_of(st.just(0), st.integers(0, SEC // 10), st.integers(0, 3 * SEC))

admit_step = st.fixed_dictionaries(
    {
        "op": st.just("admit"),
        "dt": DT,
        "rid": st.sampled_from(RIDS),
        "lease": st.sampled_from((0, SEC // 2, 2 * SEC, 5 * SEC)),
        "limits": st.lists(
            st.tuples(st.sampled_from(FIELDS), st.integers(1, 30), st.integers(0, 100)),
            min_size=1,
            max_size=3,
            unique_by=lambda t: t[0],
        ),
    }
)
extend_step = st.fixed_dictionaries(
    {
        "op": st.just("extend"),
        "dt": DT,
        "rid": st.sampled_from(RIDS),
        "lease": st.sampled_from((SEC // 2, 2 * SEC)),
        # "held": the request admitted last, on the fields it asked for, with these steps;
        # "last": that request on any fields, repeats allowed (they must count together);
        # "any": any request, any fields
        "mode": st.sampled_from(("held", "held", "last", "last", "any")),
        "ops": st.lists(
            st.tuples(st.sampled_from(FIELDS), st.integers(0, 20)), min_size=1, max_size=4
        ),
    }
)
settle_step = st.fixed_dictionaries(
    {
        "op": st.just("settle"),
        "dt": DT,
        "rid": st.sampled_from(RIDS),
        "marker": st.integers(0, 5),
        "ops": st.lists(
            st.tuples(st.sampled_from(FIELDS), st.integers(0, 40), st.integers(0, 20)),
            min_size=1,
            max_size=3,
            unique_by=lambda t: t[0],
        ),
    }
)


def _build(
    step: dict[str, Any],
    limits: dict[tuple[int, str], int],
    asked: dict[str, list[tuple[int, str]]],
    now: int,
) -> ScriptCall:
    rid = step["rid"]
    if step["op"] == "admit":
        # dicts keep insertion order: the last key is the request admitted last
        asked.pop(rid, None)
        asked[rid] = [field for field, _, _ in step["limits"]]
        lims = [(k, f, limits[(k, f)], cost, cost * pct // 100)
                for (k, f), cost, pct in step["limits"]]  # fmt: skip
        return admit_call(lims, now=now, rid=rid, lease=step["lease"])
    if step["op"] == "extend":
        pairs = step["ops"]
        if step["mode"] != "any" and asked:
            rid = next(reversed(asked))
        if step["mode"] == "held" and asked:
            # what the engine does: extend the request admitted last, on each field it holds
            steps = [n for _, n in pairs] or [1]
            pairs = [(field, steps[i % len(steps)]) for i, field in enumerate(asked[rid])]
        ops = [(k, f, limits[(k, f)], n) for (k, f), n in pairs]
        return extend_call(ops, now=now, rid=rid, lease=step["lease"])
    ops = [(k, f, reserved, actual) for (k, f), reserved, actual in step["ops"]]
    return settle_call(ops, now=now, rid=rid, marker=f"qm:{TAG}:done:{step['marker']}")


def _snapshot(name: str, b: Any) -> tuple[Any, ...]:
    class View:  # State reads a backend factory; give it the one backend it needs
        def __init__(self) -> None:
            self.name = "memory" if name == "memory" else "redis"

        def sync(self) -> Any:
            return b

    return State(View()).snapshot()


def _outcome(call: ScriptCall, reply: list[int]) -> str:
    if call.args[3] == 0:
        return "empty"
    if reply[0] == 1:
        return "granted, filled" if 0 in reply[2:] else "granted"
    return "not live" if reply[1] == 0 else "no room"


@pytest.mark.redis
@pytest.mark.fakeredis
@pytest.mark.memory
@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    quota=st.tuples(st.integers(1, 120), st.integers(1, 120), st.integers(1, 120)),
    # opens with an admit: an extend of a request never admitted is only the trivial "not live"
    steps=st.tuples(
        admit_step,
        st.lists(
            st.one_of(admit_step, admit_step, extend_step, extend_step, extend_step, settle_step),
            min_size=2,
            max_size=30,
        ),
    ).map(lambda t: [t[0], *t[1]]),
)
def test_lua_matches_python_twin(
    twin_backends: Callable[[], dict[str, Any]], quota: tuple[int, int, int], steps: list[Any]
) -> None:
    b = twin_backends()
    limits = dict(zip(FIELDS, quota, strict=True))
    asked: dict[str, list[tuple[int, str]]] = {}
    now = NOW
    names = ("memory", "fakeredis", "real")
    for i, step in enumerate(steps):
        now += step["dt"]
        call = _build(step, limits, asked, now)
        replies = {name: ints(b[name].run(call)) for name in names}
        assert replies["memory"] == replies["fakeredis"] == replies["real"], (i, call, replies)
        if call.name == "extend":
            event(f"extend: {_outcome(call, replies['memory'])}")
        # the state too: a reservation's payload and its ledger score are only read later
        states = {name: _snapshot(name, b[name]) for name in names}
        assert states["memory"] == states["fakeredis"] == states["real"], (i, call, states)


def test_engine_settle_after_an_extension_whose_reply_was_lost_charges_exactly_actual(
    backend: Any,
) -> None:
    """The script ran but its reply never came back: the holds were not grown, the reservation
    was. Settle takes what is reserved from the reservation's own record, so the counters still
    end at exactly the actual usage (they used to end one step above it)."""
    from quota_middleware.core._extension import plan_extend

    ai = AI.make(backend)
    d = ai.admit(max_tokens=20)
    call = plan_extend(d, 40, out_cost(40), LEASE * SEC, str(ai.now[0]))
    assert call is not None
    assert ai.sync.run(call)[0] == 1  # granted in the store; apply_extend never ran
    usage = Usage(input_tokens=11, output_tokens=55, model="gpt-4o-mini")
    ai.settle(d, usage)
    assert ai.counters(d) == {"tpd": 66, "usd": cost_micros(usage, PRICE)}
