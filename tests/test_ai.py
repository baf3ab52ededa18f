"""AI routes through both adapters on every backend: reservation, metering, settle, usage records.

The upstream is ``ai_app`` (scripted usage), so every expected number is exact.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from ai_harness import PATH, AIHarness, chat, config, prompt_estimate
from quota_middleware import Budget, QuotaConfig, TokenQuota
from quota_middleware.metering._estimate import count_tokens
from quota_middleware.metering._usage import Usage
from quota_middleware.metering.pricing import PriceTable, cost_micros
from quota_middleware.reports import UsageReader

PRICE = PriceTable().lookup("gpt-4o-mini")
assert PRICE is not None


@pytest.fixture(params=["asgi", "wsgi"])
def adapter(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make(adapter: str, backend: Any) -> Iterator[Any]:
    made: list[AIHarness] = []

    def factory(cfg: QuotaConfig | None = None, **kw: Any) -> AIHarness:
        h = AIHarness(adapter, backend, cfg or config(), **kw)
        made.append(h)
        return h

    yield factory
    for h in made:
        h.close()


def test_json_response_is_charged_exactly_what_the_upstream_reported(make: Any) -> None:
    h = make()
    body = chat(max_tokens=50, x_prompt=123, x_completion=45)
    r = h.post(body)
    assert r.status == 200
    assert r.json["x_echo"]  # the app read the replayed body
    cost = cost_micros(Usage(input_tokens=123, output_tokens=45), PRICE)
    assert h.usage() == {"requests": 1, "input": 123, "output": 45, "cost": cost, "estimated": 0}
    # the reservation was replaced by the actual usage
    assert h.remaining() == {"tpd": 1_000_000 - 168, "usd": 100_000_000 - cost}
    assert r.headers["x-ratelimit-limit-tokens"] == "100000"
    assert int(r.headers["x-ratelimit-remaining-tokens"]) == 100000 - prompt_estimate(body) - 50
    assert r.headers["x-ratelimit-remaining-requests"] == "999"
    assert '"tpd";q=1000000;w=86400;qm-unit="tokens"' in r.headers["ratelimit-policy"]


def test_body_is_replayed_byte_for_byte(make: Any) -> None:
    import hashlib

    h = make()
    raw = json.dumps(chat(x_prompt=1, x_completion=1), indent=3).encode() + b"\n  "
    r = h.post(raw)
    assert r.status == 200
    assert r.json["x_echo"] == hashlib.sha256(raw).hexdigest()


def test_stream_with_include_usage_is_charged_exactly(make: Any) -> None:
    h = make()
    body = chat(stream=True, stream_options={"include_usage": True}, x_prompt=77, x_completion=9)
    r = h.post(body)
    assert r.status == 200
    assert r.raw.count(b"data: ") == 12  # role + 9 words + usage + [DONE]
    if h.adapter == "asgi":
        assert r.chunks == 12  # passed on chunk by chunk, never buffered
    cost = cost_micros(Usage(input_tokens=77, output_tokens=9), PRICE)
    assert h.usage() == {"requests": 1, "input": 77, "output": 9, "cost": cost, "estimated": 0}
    assert h.remaining()["tpd"] == 1_000_000 - 86


def test_stream_without_usage_is_estimated_from_prompt_and_relayed_text(make: Any) -> None:
    h = make()
    body = chat(stream=True, x_prompt=500, x_completion=30)
    r = h.post(body)
    assert r.status == 200
    text = " ".join(f"w{i}" for i in range(30))
    out = count_tokens(text, "gpt-4o-mini")
    inp = prompt_estimate(body)
    cost = cost_micros(Usage(input_tokens=inp, output_tokens=out), PRICE)
    assert h.usage() == {"requests": 1, "input": inp, "output": out, "cost": cost, "estimated": 1}


def test_disconnect_mid_stream_is_charged_once_for_what_was_relayed(make: Any) -> None:
    h = make()
    body = chat(stream=True, stream_options={"include_usage": True}, x_prompt=40, x_completion=30)
    h.post(body, disconnect_after=6)  # role chunk + 5 words reached the client
    text = " ".join(f"w{i}" for i in range(5))
    out = count_tokens(text, "gpt-4o-mini")
    usage = h.usage()
    assert usage["requests"] == 1 and usage["estimated"] == 1
    assert usage["input"] == prompt_estimate(body)
    # the client saw 5 words; the server may have produced one more before it noticed
    assert out <= usage["output"] <= count_tokens(text + " w5", "gpt-4o-mini")


def test_app_error_mid_stream_settles_once(make: Any) -> None:
    h = make()
    body = chat(stream=True, x_prompt=40, x_completion=30, x_raise_after=3)
    with pytest.raises(RuntimeError):
        h.post(body)
    usage = h.usage()
    assert usage["requests"] == 1 and usage["estimated"] == 1
    assert usage["output"] == count_tokens("w0 w1 w2", "gpt-4o-mini")
    # no reservation is left behind: only the charged usage counts
    assert h.remaining()["tpd"] == 1_000_000 - usage["input"] - usage["output"]


def test_upstream_error_without_usage_releases_the_reservation(make: Any) -> None:
    h = make()
    r = h.post(chat(max_tokens=500, x_status=500))
    assert r.status == 500
    assert h.remaining() == {"tpd": 1_000_000, "usd": 100_000_000}
    assert h.usage()["requests"] == 1


def test_token_quota_runs_out_with_insufficient_quota(make: Any) -> None:
    h = make(config(limits=[TokenQuota(tokens=1000, period="day", name="tpd")]))
    body = chat(max_tokens=290, x_prompt=10, x_completion=290)
    assert [h.post(body).status for _ in range(3)] == [200, 200, 200]
    assert h.remaining()["tpd"] == 1000 - 900
    # 100 left: enough for the prompt, so it is admitted with a 100-token reservation; the
    # response is larger, so the quota overshoots by actual - reserved, and no more
    assert h.post(body).status == 200
    assert h.remaining()["tpd"] == 0
    r = h.post(body)
    assert r.status == 429
    err = r.json["error"]
    assert err["type"] == "insufficient_quota" and err["code"] == "insufficient_quota"
    assert r.headers["x-should-retry"] == "false"
    assert 1 <= int(r.headers["retry-after"]) <= 86400
    assert h.usage()["requests"] == 4  # the refused request was not charged


def test_budget_runs_out(make: Any) -> None:
    # $0.0001 = 100 micro-dollars; each request costs 1000 in + 100 out tokens of gpt-4o-mini
    h = make(config(limits=[Budget(usd=0.0001, period="day", name="usd")]))
    body = chat(max_tokens=100, x_prompt=1000, x_completion=100)
    one = cost_micros(Usage(input_tokens=1000, output_tokens=100), PRICE)
    statuses = [h.post(body).status for _ in range(6)]
    admitted = statuses.count(200)
    assert statuses == [200] * admitted + [429] * (6 - admitted)
    assert admitted * one >= 100 and (admitted - 1) * one < 100
    assert h.post(body).json["error"]["code"] == "insufficient_quota"


def test_request_over_the_body_cap_is_413(make: Any) -> None:
    h = make(config(route={"max_body": 200}))
    r = h.post(chat(padding="x" * 500))
    assert r.status == 413
    assert r.json["error"]["code"] == "body_too_large"
    assert h.usage() == {}


def test_model_allow_list(make: Any) -> None:
    h = make(config(plan={"models": ["gpt-4o-mini*"]}))
    assert h.post(chat(x_prompt=1, x_completion=1)).status == 200
    r = h.post({**chat(), "model": "gpt-4.1"})
    assert r.status == 403 and r.json["error"]["code"] == "model_not_allowed"


def test_unpriced_model_is_refused_when_budgeted(make: Any) -> None:
    h = make()
    r = h.post({**chat(), "model": "my-local-llama"})
    assert r.status == 403 and r.json["error"]["code"] == "model_not_priced"
    h2 = make(config(unpriced="tokens-only"))
    assert h2.post({**chat(), "model": "my-local-llama", "x_prompt": 3}).status == 200


def test_price_override_from_config(make: Any) -> None:
    h = make(config(prices={"gpt-4o-mini": {"input": 1.0, "output": 2.0}}))
    h.post(chat(x_prompt=1000, x_completion=500))
    assert h.usage()["cost"] == 1000 + 1000  # $1/M in, $2/M out, in micro-dollars


def test_reservation_of_a_dead_worker_is_freed_when_its_lease_ends(backend: Any) -> None:
    """A worker reserves and dies (no settle): once the lease ends the next admit gives the
    reservation back; a late settle then charges the whole actual usage, once."""
    import time

    from quota_middleware.base._request import Headers, RequestInfo
    from quota_middleware.core._engine import Engine, drive_sync

    now = [time.time_ns() // 1000]
    cfg = config(limits=[TokenQuota(tokens=1000, period="day", name="tpd")],
                 route={"lease": 30})  # fmt: skip
    engine = Engine(cfg, clock=lambda: now[0])
    sync = backend.sync()
    reader = UsageReader(cfg, sync)

    def admit(max_tokens: int) -> Any:
        body = json.dumps(chat(max_tokens=max_tokens)).encode()
        info = RequestInfo("POST", PATH, Headers([("content-type", "application/json")]),
                           client="192.0.2.99", body=body)  # fmt: skip
        return drive_sync(engine.admit(info), sync)

    dead = admit(600)
    assert dead.allowed
    reserved = dead.holds[0].charged
    assert reserved == prompt_estimate(chat(max_tokens=600)) + 600
    assert reader.remaining("192.0.2.99")[0].remaining == 1000 - reserved
    small = prompt_estimate(chat(max_tokens=300)) + 300
    # before the lease ends the reservation holds against new requests
    now[0] += 29_000_000
    assert admit(300).holds[0].charged == small
    assert reader.remaining("192.0.2.99")[0].remaining == 1000 - reserved - small
    # after it, the next admit gives the dead reservation back first
    now[0] += 2_000_000
    assert admit(300).holds[0].charged == small
    assert reader.remaining("192.0.2.99")[0].remaining == 1000 - 2 * small
    # the dead worker's late settle charges what it really used, exactly once
    call = engine.plan_settle(dead, Usage(input_tokens=10, output_tokens=20, model="gpt-4o-mini"))
    assert call is not None
    before = reader.remaining("192.0.2.99")[0].used
    assert sync.run(call)[0] == 1
    assert sync.run(call) == [0]
    assert reader.remaining("192.0.2.99")[0].used == before + 30


def test_wsgi_iterable_dropped_without_close_is_still_settled_once(backend: Any) -> None:
    """Some servers lose the iterable when the client vanishes mid-stream (werkzeug's dev server
    skips close() if reading the socket fails); the charge must not be lost."""
    import gc
    import io

    if backend.name == "fakeredis":
        pytest.skip(
            "fakeredis' Lua runtime (lupa) keeps the calling frame alive, so the "
            "iterable is never collected in this process; real Redis is tested"
        )
    h = AIHarness("wsgi", backend, config())
    try:
        raw = json.dumps(chat(stream=True, x_prompt=40, x_completion=30)).encode()
        environ = {"REQUEST_METHOD": "POST", "PATH_INFO": PATH, "REMOTE_ADDR": "192.0.2.10",
                   "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(raw)),
                   "wsgi.input": io.BytesIO(raw)}  # fmt: skip
        it = iter(h.mw(environ, lambda s, hd, e=None: None))
        for _ in range(4):  # role chunk + 3 words
            next(it)
        del it
        gc.collect()
        usage = h.usage()
        assert usage["requests"] == 1 and usage["estimated"] == 1
        assert usage["output"] == count_tokens("w0 w1 w2", "gpt-4o-mini")
    finally:
        h.close()
