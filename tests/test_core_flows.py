"""The sans-IO core on its own, as h11 tests its state machine: the admission and settlement
flows are stepped by hand, with no backend. Each test asserts on the ScriptCalls a flow yields
(the contracts in ``lua/admit.lua`` and ``lua/settle.lua``), sends it made-up replies or throws
a :class:`StorageError` into it, and asserts on what it returns.

The clock is fixed, so ARGV[1] is ``NOW`` and every period key and end is known in advance."""

from __future__ import annotations

import json
from collections.abc import Generator
from datetime import UTC, datetime
from typing import Any

import pytest

from quota_middleware import (
    AIRoute,
    AppBudget,
    Budget,
    Charge,
    Concurrency,
    Plan,
    QuotaConfig,
    RequestRate,
    Routes,
    RouteWeight,
    TokenQuota,
    TokenRate,
)
from quota_middleware.base._keys import key_slot, tenant_controls
from quota_middleware.base._request import Headers, RequestInfo
from quota_middleware.base._scripts import ScriptCall
from quota_middleware.core._decision import Decision, Hold
from quota_middleware.core._engine import SETTLE_MARKER_MS, Engine
from quota_middleware.core._exchange import Exchange
from quota_middleware.errors import StorageError
from quota_middleware.metering._estimate import parse_request
from quota_middleware.metering._usage import Usage
from quota_middleware.metering.pricing import PriceTable, cost_micros

NOW_US = 1_700_000_000_000_000  # 2023-11-14 22:13:20 UTC
NOW = str(NOW_US)
DAY_END = int(datetime(2023, 11, 15, tzinfo=UTC).timestamp()) * 1_000_000
MONTH_END = int(datetime(2023, 12, 1, tzinfo=UTC).timestamp()) * 1_000_000
PATH = "/v1/chat/completions"
IP = "192.0.2.1"
K = f"qm:{{default:{IP}}}"  # the caller's keys
# the copy of the tenant's controls in the caller's slot (base/_keys.tenant_controls)
TENANT_X = tenant_controls("qm", "default", key_slot(K))
PRICE = PriceTable().lookup("gpt-4o-mini")
assert PRICE is not None


# -- stepping a flow by hand -------------------------------------------------------------------
class Step:
    """A flow stepped by hand: :attr:`call` is what it asks the store for now; once it has
    returned, :attr:`call` is None and :attr:`value` is what it returned."""

    def __init__(self, flow: Generator[ScriptCall, Any, Any]) -> None:
        self.flow = flow
        self.call: ScriptCall | None = None
        self.value: Any = None
        self._resume(lambda: next(flow))

    def _resume(self, step: Any) -> None:
        try:
            self.call = step()
        except StopIteration as stop:
            self.call, self.value = None, stop.value

    def reply(self, reply: Any) -> Step:
        """Send the store's reply to the call asked for."""
        assert self.call is not None, "the flow has returned"
        self._resume(lambda: self.flow.send(reply))
        return self

    def fail(self, error: StorageError | None = None) -> Step:
        """The store could not answer the call asked for: throw the error into the flow."""
        assert self.call is not None, "the flow has returned"
        self._resume(lambda: self.flow.throw(error or StorageError("down")))
        return self

    @property
    def done(self) -> bool:
        return self.call is None


def run(flow: Generator[ScriptCall, Any, Any], *replies: Any) -> tuple[list[ScriptCall], Any]:
    """Answer the flow's calls with ``replies`` in order (a StorageError is thrown in); the
    calls it made and what it returned. It must return after the last reply."""
    s, calls = Step(flow), []
    for reply in replies:
        assert s.call is not None, f"the flow returned before reply {len(calls) + 1}"
        calls.append(s.call)
        s.fail(reply) if isinstance(reply, StorageError) else s.reply(reply)
    assert s.done, f"the flow still asks for {s.call}"
    return calls, s.value


def ops(call: ScriptCall) -> list[tuple[Any, ...]]:
    """A settle call's operations (5 values each), after checking its fixed ARGV head."""
    n = int(call.args[3])
    assert call.args[0] == NOW and call.args[2] == SETTLE_MARKER_MS
    assert len(call.args) == 4 + 5 * n
    return [tuple(call.args[4 + 5 * i : 9 + 5 * i]) for i in range(n)]


def allowed(*charged: int, remaining: int = 5, reset_us: int = 1_000_000) -> list[int]:
    """An admit reply that admits, each limit charging ``charged[i]``."""
    return [1, 0, 0, NOW_US, *(v for c in charged for v in (remaining, reset_us, c))]


def denied(n: int, by: int, retry_us: int) -> list[int]:
    """An admit reply where limit ``by`` (1-based) of ``n`` says no."""
    reply = [0, by, retry_us, NOW_US]
    for i in range(1, n + 1):
        reply += [0 if i == by else 5, retry_us if i == by else 0, 0]
    return reply


# -- configurations ----------------------------------------------------------------------------
def plain_config(*limits: Any, **plan: Any) -> QuotaConfig:
    return QuotaConfig(
        plans=[Plan(name="p", limits=list(limits or [RequestRate(rate="60/minute", name="rpm")]),
                    **plan)],
        routes=Routes(weights=[RouteWeight(path="/heavy", weight=5)]),
    )  # fmt: skip


AI_LIMITS = (
    RequestRate(rate="60/minute", name="rpm"),
    TokenRate(rate="1000/minute", name="tpm"),
    Concurrency(max=2, name="inflight"),
    TokenQuota(tokens=10_000, period="day", name="tpd"),
    Budget(usd=1.0, period="month", name="usd"),
)


def ai_config(*limits: Any, plan: dict[str, Any] | None = None, **kw: Any) -> QuotaConfig:
    kw.setdefault("learn_input_margins", False)  # no margins sync call unless a test wants one
    kw.setdefault("rollups", False)  # no rollup call either (test_settle_writes_the_app_rollups)
    return QuotaConfig(
        plans=[Plan(name="p", limits=list(limits or AI_LIMITS), **(plan or {}))],
        ai_routes=[AIRoute(path=PATH, format="openai-chat", default_output_tokens=100)], **kw,
    )  # fmt: skip


def engine(cfg: QuotaConfig) -> Engine:
    return Engine(cfg, clock=lambda: NOW_US)


def plain(path: str = "/items") -> RequestInfo:
    return RequestInfo("GET", path, Headers(), client=IP)


BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 50}  # fmt: skip
RAW = json.dumps(BODY).encode()
PROMPT = parse_request("openai-chat", RAW).prompt_tokens


def ai(body: bytes = RAW) -> RequestInfo:
    return RequestInfo("POST", PATH, Headers([("content-type", "application/json")]),
                       client=IP, body=body)  # fmt: skip


def admitted_ai(e: Engine, *charged: int) -> Decision:
    _, decision = run(e.admit(ai()), allowed(*charged))
    assert decision.allowed
    return decision


# -- admission: plain requests -----------------------------------------------------------------
def test_a_plain_request_is_one_admit_call() -> None:
    e = engine(plain_config())
    s = Step(e.admit(plain()))
    call = s.call
    assert call is not None and call.name == "admit"
    assert call.keys == (K, f"{K}:x", TENANT_X)
    rid = call.args[1]
    # ARGV: now, request id, lease (none), n; then kind, key index, field, interval, tau,
    # cost, min cost; then the runtime controls: route class, the two controls keys
    assert call.args == (NOW, rid, b"0", b"1", b"b", b"1", b"rpm", b"1000000", b"60000000",
                         b"1", b"1", b"", b"2", b"3")  # fmt: skip
    s.reply(allowed(0, remaining=59))
    d = s.value
    assert d.allowed and d.limited and not d.degraded and d.request_id == rid
    assert d.caller.id == IP and d.plan == "p" and d.holds == () and d.ai is None
    [st] = d.statuses
    assert (st.name, st.kind, st.quota, st.window, st.remaining, st.reset, st.denied) == (
        "rpm", "requests", 60, 60, 59, 1, False
    )  # fmt: skip


def test_a_weighted_route_costs_its_weight() -> None:
    call = Step(engine(plain_config()).admit(plain("/heavy"))).call
    assert call is not None and call.args[-5:-3] == (b"5", b"5")


def test_an_exempt_path_and_a_plan_without_limits_make_no_call() -> None:
    cfg = QuotaConfig(plans=[Plan(name="p", limits=[RequestRate(rate="1/minute")])],
                      routes=Routes(exempt=["/health"]))  # fmt: skip
    calls, d = run(engine(cfg).admit(plain("/health")))
    assert calls == [] and d.allowed and not d.limited and d.caller is None
    calls, d = run(engine(QuotaConfig(plans=[Plan(name="p")])).admit(plain()))
    assert calls == [] and d.allowed and d.caller.id == IP and not d.limited


def test_a_concurrency_slot_is_a_key_of_its_own_and_a_hold() -> None:
    e = engine(plain_config(RequestRate(rate="60/minute", name="rpm"),
                            Concurrency(max=3, name="inflight", lease=30)))  # fmt: skip
    [call], d = run(e.admit(plain()), allowed(0, 1))
    assert call.keys == (K, f"{K}:c:inflight", f"{K}:x", TENANT_X)
    assert call.args[3:] == (b"2", b"b", b"1", b"rpm", b"1000000", b"60000000", b"1", b"1",
                             b"c", b"2", b"inflight", b"3", b"30000000", b"1", b"1",
                             b"", b"3", b"4")  # fmt: skip
    # the request limit holds nothing; the slot is held until the settle gives it back
    assert d.holds == (Hold("c", f"{K}:c:inflight", "inflight", 1),)
    assert d.statuses[1].kind == "concurrency" and d.statuses[1].quota == 3


@pytest.mark.parametrize(
    ("limit", "retry_us", "reason", "retry_after"),
    [
        (RequestRate(rate="60/minute", name="x"), 2_500_000, "rate", 3),
        (Concurrency(max=1, name="x"), 0, "concurrency", 1),
        (RequestRate(rate="6/minute", name="x"), -1, "too_large", None),
    ],
)
def test_a_denial_reply_is_a_decision_with_its_reason(
    limit: Any, retry_us: int, reason: str, retry_after: int | None
) -> None:
    e = engine(plain_config(RequestRate(rate="1000/minute", name="wide"), limit))
    _, d = run(e.admit(plain()), denied(2, 2, retry_us))
    assert not d.allowed and d.limited and not d.shadow
    assert (d.denied_by, d.reason, d.retry_after) == ("x", reason, retry_after)
    assert [st.denied for st in d.statuses] == [False, True]
    assert d.holds == ()
    assert e.stats["denied"] == 1 and e.stats[f"denied_{reason}"] == 1


def test_a_shadow_plan_lets_the_denied_request_through() -> None:
    e = engine(plain_config(shadow=True))
    _, d = run(e.admit(plain()), denied(1, 1, 4_000_000))
    assert d.allowed and d.shadow and d.reason == "rate" and d.retry_after == 4
    assert e.stats["shadow_denied"] == 1 and e.stats["denied"] == 0


@pytest.mark.parametrize("on_error", ["open", "closed"])
def test_a_plain_admit_the_store_cannot_answer_is_degraded(on_error: str) -> None:
    e = engine(plain_config(on_error=on_error))
    _, d = run(e.admit(plain()), StorageError("down"))
    assert d.degraded and d.allowed is (on_error == "open") and d.holds == ()
    if on_error == "open":
        assert d.reason is None and d.retry_after is None
        assert e.stats["degraded_open"] == 1
    else:
        # retry after the breaker's reset (StorageConfig.breaker_reset, 2 s)
        assert d.reason == "unavailable" and d.retry_after == 2
        assert e.stats["degraded_closed"] == 1


# -- admission: AI requests --------------------------------------------------------------------
def test_an_ai_request_reserves_its_estimate_on_every_limit() -> None:
    e = engine(ai_config())
    call = Step(e.admit(ai())).call
    assert call is not None and call.name == "admit"
    day, month = f"{K}:q:d2023-11-14", f"{K}:q:m2023-11"
    # the bucket hash, the slot, then each period's counters and their reservation ledger
    assert call.keys == (K, f"{K}:c:inflight", day, f"{day}:r", month, f"{month}:r", f"{K}:x",
                         TENANT_X)  # fmt: skip
    reserve, least = PROMPT + 50, PROMPT  # the prompt and the request's own max_tokens
    cost = cost_micros(Usage(input_tokens=PROMPT, output_tokens=50), PRICE)
    min_cost = max(1, cost_micros(Usage(input_tokens=PROMPT), PRICE))
    assert call.args == (
        NOW, call.args[1], 600_000_000, 5,  # lease: AIRoute.lease, 600 s
        "b", 1, "rpm", 1_000_000, 60_000_000, 1, 1,
        "b", 1, "tpm", 60_000, 60_000_000, reserve, least,
        "c", 2, "inflight", 2, 300_000_000, 1, 1,
        "q", 3, "tpd", 10_000, DAY_END, reserve, least,
        "q", 5, "usd", 1_000_000, MONTH_END, cost, min_cost,
        "a", 7, 8,  # an AI route; the caller's and the tenant's controls
    )  # fmt: skip


def test_an_admitted_ai_request_holds_what_each_limit_charged() -> None:
    e = engine(ai_config())
    d = admitted_ai(e, 1, 58, 1, 57, 32)
    day, month = f"{K}:q:d2023-11-14", f"{K}:q:m2023-11"
    assert d.holds == (
        Hold("b", K, "tpm", 58, 60_000),
        Hold("c", f"{K}:c:inflight", "inflight", 1),
        Hold("q", day, "tpd", 57, 0, f"{day}:r", 10_000, (50, 80, 100), "2023-11-14", DAY_END),
        Hold("q", month, "usd", 32, 1, f"{month}:r", 1_000_000, (50, 80, 100), "2023-11",
             MONTH_END),
    )  # fmt: skip
    assert d.ai is not None and d.ai.reserve_tokens == PROMPT + 50 and d.ai.model == "gpt-4o-mini"
    assert d.day == "2023-11-14" and d.path == PATH
    assert [st.kind for st in d.statuses] == [
        "requests", "tokens", "concurrency", "token_quota", "budget"
    ]  # fmt: skip


@pytest.mark.parametrize(("by", "reason"), [(4, "quota"), (5, "budget"), (2, "rate")])
def test_an_ai_denial_names_the_limit_and_keeps_nothing(by: int, reason: str) -> None:
    e = engine(ai_config())
    _, d = run(e.admit(ai()), denied(5, by, 3_600_000_000))
    assert not d.allowed and d.reason == reason and d.denied_by == AI_LIMITS[by - 1].name
    assert d.retry_after == 3600 and d.holds == () and d.ai is None and not d.needs_settle


def test_fail_open_on_an_ai_request_still_owes_every_token_limit() -> None:
    e = engine(ai_config())
    _, d = run(e.admit(ai()), StorageError("down"))
    assert d.allowed and d.degraded and d.ai is not None and d.needs_settle
    # nothing was reserved: a hold of 0 on each token limit, charged in full at settle
    assert [(h.kind, h.name, h.charged) for h in d.holds] == [
        ("b", "tpm", 0), ("q", "tpd", 0), ("q", "usd", 0)
    ]  # fmt: skip


def test_fail_closed_on_an_ai_request_is_a_503_that_owes_nothing() -> None:
    e = engine(ai_config(plan={"on_error": "closed"}))
    _, d = run(e.admit(ai()), StorageError("down"))
    assert not d.allowed and d.degraded and d.reason == "unavailable" and d.retry_after == 2
    assert d.ai is None and d.holds == () and not d.needs_settle


def test_a_model_outside_the_plan_is_refused_without_a_call() -> None:
    e = engine(ai_config(plan={"models": ["claude-*"]}))
    calls, d = run(e.admit(ai()))
    assert calls == [] and not d.allowed and d.reason == "model"


def test_the_margins_are_read_before_the_first_reservation_of_a_model() -> None:
    e = engine(ai_config(learn_input_margins=True))
    s = Step(e.admit(ai()))
    assert s.call == ScriptCall("margins", ("qm:{@margins}",), (0,))
    s.fail()  # an optimisation: the admit goes on without it
    assert s.call is not None and s.call.name == "admit"


def test_a_spent_hard_stopped_app_budget_refuses_before_the_admit() -> None:
    e = engine(ai_config(app_budgets=[AppBudget(usd=10, period="day", name="app")]))
    s = Step(e.admit(ai()))
    assert s.call == ScriptCall("read", ("qm:{@app}:q:d2023-11-14",), ())
    s.reply([[b"app", b"10000000"]])  # 10 USD spent of 10
    d = s.value
    assert s.done and not d.allowed and d.reason == "budget" and d.denied_by == "app"
    assert d.retry_after == (DAY_END - NOW_US) // 1_000_000  # when the day ends
    # under the limit: the admit call follows
    e2 = engine(ai_config(app_budgets=[AppBudget(usd=10, period="day", name="app")]))
    s = Step(e2.admit(ai())).reply([[b"app", b"9999999"]])
    assert s.call is not None and s.call.name == "admit"


# -- settlement --------------------------------------------------------------------------------
def test_settle_gives_back_each_hold_and_charges_the_usage() -> None:
    cfg = ai_config()
    e = engine(cfg)
    d = admitted_ai(e, 1, 58, 1, 57, 32)
    usage = Usage(input_tokens=10, output_tokens=20, model="gpt-4o-mini")
    [call], events = run(e.settle(d, usage, 77), [1])
    assert events == []
    day, month = f"{K}:q:d2023-11-14", f"{K}:q:m2023-11"
    assert call.name == "settle" and call.args[1] == d.request_id
    assert call.keys == (f"{K}:s:{d.request_id}", K, f"{K}:c:inflight", day, f"{day}:r", month,
                         f"{month}:r", f"{K}:u:2023-11-14")  # fmt: skip
    keep = cfg.usage_retention_days * 86_400_000
    assert ops(call) == [
        ("b", 2, "tpm", 60_000, 30 - 58),  # the bucket moves by actual - reserved
        ("c", 3, "", 0, 0),  # the slot is released
        ("q", 4, "tpd", 57, 30),  # reserved, actual (tokens)
        ("q", 6, "usd", 32, 77),  # reserved, actual (micro-dollars)
        ("e", 4, "", (DAY_END - NOW_US) // 1000 + 3_600_000, 0),  # kept until the period ends
        ("e", 6, "", (MONTH_END - NOW_US) // 1000 + 3_600_000, 0),
        ("t", 4, "tpd", 10_000, "50,80,100"),
        ("t", 6, "usd", 1_000_000, "50,80,100"),
        # the day's usage record: one field per counter of the model
        ("u", 8, "gpt-4o-mini|requests", keep, 1),
        ("u", 8, "gpt-4o-mini|input", keep, 10),
        ("u", 8, "gpt-4o-mini|output", keep, 20),
        ("u", 8, "gpt-4o-mini|cost", keep, 77),
    ]
    assert len(e.settle_buffer) == 0


def test_a_plain_settle_only_releases_the_slot() -> None:
    e = engine(plain_config(Concurrency(max=3, name="inflight")))
    _, d = run(e.admit(plain()), allowed(1))
    [call], _ = run(e.settle(d), [1])
    assert call.keys == (f"{K}:s:{d.request_id}", f"{K}:c:inflight")
    assert ops(call) == [("c", 2, "", 0, 0)]
    # nothing held: nothing to settle
    _, d = run(engine(plain_config()).admit(plain()), allowed(0))
    assert not d.needs_settle and e.plan_settle(d) is None


def test_app_budgets_are_charged_in_a_second_call_on_their_own_keys() -> None:
    cfg = ai_config(TokenQuota(tokens=10_000, name="tpd"),
                    app_budgets=[AppBudget(usd=10, period="day", name="app", hard_stop=False),
                                 AppBudget(usd=100, period="month", name="mo", thresholds=[],
                                           hard_stop=False)])  # fmt: skip
    e = engine(cfg)
    d = admitted_ai(e, 40)
    caller, app = run(e.settle(d, Usage(input_tokens=10, output_tokens=20), 77), [1], [1])[0]
    assert caller.keys[0] == f"{K}:s:{d.request_id}"
    day, month = "qm:{@app}:q:d2023-11-14", "qm:{@app}:q:m2023-11"
    assert app.name == "settle" and app.args[1] == d.request_id
    assert app.keys == (f"qm:{{@app}}:s:{d.request_id}", day, f"{day}:r", month, f"{month}:r")
    assert ops(app) == [
        ("q", 2, "app", 0, 77),  # nothing reserved: a kill switch on the actual spend
        ("q", 4, "mo", 0, 77),
        ("e", 2, "", (DAY_END - NOW_US) // 1000 + 3_600_000, 0),
        ("e", 4, "", (MONTH_END - NOW_US) // 1000 + 3_600_000, 0),
        ("t", 2, "app", 10_000_000, "50,80,100"),
    ]
    # nothing spent: no app call
    assert e.plan_app_settle(d, 0) is None


def test_settle_writes_the_app_rollups_in_the_app_call() -> None:
    cfg = ai_config(TokenQuota(tokens=10_000, name="tpd"), rollups=True,
                    app_budgets=[AppBudget(usd=10, period="day", name="app", thresholds=[],
                                           hard_stop=False)])  # fmt: skip
    e = engine(cfg)
    d = admitted_ai(e, 40)
    usage = Usage(input_tokens=10, output_tokens=20, model="gpt-4o-mini", estimated=True)
    _, app = run(e.settle(d, usage, 77), [1], [1])[0]
    r = "qm:{@app}:r:2023-11-14"
    assert app.keys[3:] == (r, f"{r}:cost", f"{r}:tokens", f"{r}:requests", f"{r}:tenants",
                            "qm:{@app}:r:2023-11:cost")  # fmt: skip
    keep = cfg.usage_retention_days * 86_400_000
    member = "default:" + IP
    assert ops(app)[2:] == [
        # the same fields as the caller's usage record, summed over the app
        ("u", 4, "gpt-4o-mini|requests", keep, 1),
        ("u", 4, "gpt-4o-mini|input", keep, 10),
        ("u", 4, "gpt-4o-mini|output", keep, 20),
        ("u", 4, "gpt-4o-mini|cost", keep, 77),
        ("u", 4, "gpt-4o-mini|estimated", keep, 1),
        ("r", 5, member, keep, 77),
        ("r", 6, member, keep, 30),
        ("r", 7, member, keep, 1),
        ("r", 8, "default", keep, 77),
        ("r", 9, member, keep, 77),
    ]
    # a free request still counts (requests, tokens) but ranks nothing by cost, charges no budget
    _, app = run(e.settle(admitted_ai(e, 40), usage, 0), [1], [1])[0]
    assert [op[0] for op in ops(app)] == ["u"] * 4 + ["r", "r"]
    assert e.plan_app_settle(d, 0) is None  # no usage to roll up, nothing spent


def test_a_threshold_in_the_settle_reply_is_an_event_sent_to_the_outbox() -> None:
    e = engine(ai_config(TokenQuota(tokens=10_000, name="tpd")))
    d = admitted_ai(e, 40)
    s = Step(e.settle(d, Usage(input_tokens=3000, output_tokens=2000), 0))
    s.reply([1, "t", "tpd", 50, 5000])
    assert s.call is not None and s.call.name == "outbox_add"
    s.reply(1)
    [event] = s.value
    assert (event.type, event.limit, event.threshold, event.used) == ("threshold", "tpd", 50, 5000)
    assert event.caller == IP and event.period == "2023-11-14" and event.limit_value == 10_000


def test_a_settle_the_store_cannot_take_is_buffered_then_replayed_by_drain() -> None:
    e = engine(ai_config(app_budgets=[AppBudget(usd=10, name="app", hard_stop=False)]))
    d = admitted_ai(e, 1, 58, 1, 57, 32)
    usage = Usage(input_tokens=10, output_tokens=20, model="gpt-4o-mini")
    # the caller's settle fails; the app budget's is still made
    (first, app), _ = run(e.settle(d, usage, 77), StorageError("down"), [1])
    assert first.keys[0] == f"{K}:s:{d.request_id}" and app.keys[0].startswith("qm:{@app}:s:")
    assert len(e.settle_buffer) == 1
    assert e.stats["settle_failed"] == 1 and e.stats["settle_buffered"] == 1
    # still down: the replay goes back to the front of the buffer, as it was
    calls, _ = run(e.drain(), StorageError("down"), [1])
    assert calls == [first, app] and len(e.settle_buffer) == 1
    # the store answers: the same calls again (their done markers make a repeat a no-op)
    calls, events = run(e.drain(), [1], [0])
    assert calls == [first, app] and events == []
    assert len(e.settle_buffer) == 0 and e.stats["settle_replayed"] == 1
    assert run(e.drain()) == ([], [])


def test_the_next_successful_settle_drains_the_buffer_after_itself() -> None:
    e = engine(ai_config(TokenQuota(tokens=10_000, name="tpd")))
    lost, later = admitted_ai(e, 40), admitted_ai(e, 40)
    usage = Usage(input_tokens=10, output_tokens=20)
    run(e.settle(lost, usage), StorageError("down"))
    assert len(e.settle_buffer) == 1
    calls, _ = run(e.settle(later, usage), [1], [1])
    assert [c.args[1] for c in calls] == [later.request_id, lost.request_id]
    assert len(e.settle_buffer) == 0


def test_a_plain_settle_that_fails_is_not_buffered() -> None:
    """A slot frees itself when its lease ends: only an AI request's usage is owed."""
    e = engine(plain_config(Concurrency(max=3, name="inflight")))
    _, d = run(e.admit(plain()), allowed(1))
    run(e.settle(d), StorageError("down"))
    assert len(e.settle_buffer) == 0 and e.stats["settle_failed"] == 1


# -- one exchange, end to end ------------------------------------------------------------------
def test_an_exchange_from_admit_to_its_charge() -> None:
    e = engine(ai_config(TokenQuota(tokens=10_000, name="tpd")))
    ex = Exchange(e, ai())
    assert ex.max_body == 1024 * 1024
    s = Step(ex.admit(RAW))
    assert s.call is not None and s.call.name == "admit"
    s.reply(allowed(PROMPT + 50))
    assert s.done and s.value is None  # None: the request goes on to the app
    assert ex.tracks_response and not ex.hard_stop
    d = ex.decision
    assert d is not None and d.allowed and ex.meter is not None
    headers = dict(ex.response_start(200, [(b"content-type", b"application/json")]))
    assert headers[b"x-request-id"] == d.request_id.encode()
    reply = json.dumps(
        {
            "id": "c1",
            "object": "chat.completion",
            "model": "gpt-4o-mini-2024",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi there"}}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 5},
        }
    ).encode()
    ex.response_chunk(reply[:40])
    ex.response_chunk(reply[40:])
    [call], charge = run(ex.settle(), [1])
    assert ("q", 2, "tpd", PROMPT + 50, 17) in ops(call)
    cost = cost_micros(Usage(input_tokens=12, output_tokens=5), PRICE)
    assert charge == Charge(
        request_id=d.request_id, caller=IP, tenant="default", plan="p",
        route=PATH, path=PATH, provider="openai-chat", model="gpt-4o-mini-2024", status=200,
        input_tokens=12, cached_tokens=0, cache_write_tokens=0, output_tokens=5,
        reasoning_tokens=0, cost_micros=cost, estimated=False,
    )  # fmt: skip
    # once only
    assert run(ex.settle()) == ([], None)


def test_an_exchange_denied_is_answered_and_settles_nothing() -> None:
    e = engine(ai_config())
    ex = Exchange(e, ai())
    _, response = run(ex.admit(RAW), denied(5, 4, 60_000_000))
    assert response.status == 429
    assert not ex.tracks_response
    assert run(ex.settle()) == ([], None)


def test_an_exchange_over_the_body_cap_is_a_413_without_a_call() -> None:
    ex = Exchange(engine(ai_config()), ai())
    calls, response = run(ex.admit(None))
    assert calls == [] and response.status == 413
