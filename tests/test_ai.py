"""AI routes through both adapters on every backend: reservation, metering, settle, usage records.

The upstream is ``ai_app`` (scripted usage), so every expected number is exact.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from werkzeug.test import Client

import ai_app
from quota_middleware import (
    AIRoute,
    Budget,
    Plan,
    QuotaConfig,
    QuotaMiddleware,
    RequestRate,
    TokenQuota,
    TokenRate,
    WSGIQuotaMiddleware,
)
from quota_middleware.estimate import count_tokens, parse_request
from quota_middleware.pricing import PriceTable, cost_micros
from quota_middleware.reports import UsageReader
from quota_middleware.usage import Usage

PATH = "/v1/chat/completions"
PRICE = PriceTable().lookup("gpt-4o-mini")
assert PRICE is not None


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}], **extra}


def prompt_estimate(body: dict[str, Any]) -> int:
    return parse_request("openai-chat", json.dumps(body).encode()).prompt_tokens


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes, chunks: int) -> None:
        self.status, self.headers, self.raw, self.chunks = status, headers, body, chunks

    @property
    def json(self) -> Any:
        return json.loads(self.raw)


class AIHarness:
    """Sends one AI request through the ASGI (raw scope/receive/send) or the WSGI adapter."""

    def __init__(
        self, adapter: str, backend: Any, config: QuotaConfig, *, upstream: Any = ai_app,
        **kw: Any,
    ) -> None:  # fmt: skip
        self.adapter = adapter
        self.config = config
        if adapter == "asgi":
            self.mw: Any = QuotaMiddleware(upstream.asgi_app, config=config,
                                           backend=backend.async_(), **kw)  # fmt: skip
        else:
            self.mw = WSGIQuotaMiddleware(upstream.wsgi_app, config=config,
                                          backend=backend.sync(), **kw)  # fmt: skip
        self.reader = UsageReader(config, backend.sync())
        self.loop = asyncio.new_event_loop()

    def close(self) -> None:
        self.loop.close()

    def post(
        self, body: dict[str, Any] | bytes, *, ip: str = "192.0.2.10", disconnect_after: int = 0,
        path: str = PATH, headers: dict[str, str] | None = None,
    ) -> Reply:  # fmt: skip
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        extra = headers or {}
        if self.adapter == "asgi":
            return self.loop.run_until_complete(self._asgi(raw, ip, disconnect_after, path, extra))
        if disconnect_after:
            return self._wsgi_partial(raw, ip, disconnect_after, path)
        r = Client(self.mw).post(path, data=raw, content_type="application/json", buffered=True,
                                 environ_base={"REMOTE_ADDR": ip}, headers=extra)  # fmt: skip
        return Reply(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.data, 1)

    async def _asgi(
        self, raw: bytes, ip: str, disconnect_after: int, path: str = PATH,
        extra: dict[str, str] | None = None,
    ) -> Reply:  # fmt: skip
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "scheme": "http", "client": (ip, 5000), "server": ("127.0.0.1", 80),
            "headers": [(b"content-type", b"application/json"),
                        (b"content-length", str(len(raw)).encode()),
                        *((k.lower().encode(), v.encode()) for k, v in (extra or {}).items())],
        }  # fmt: skip
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                # split the body in two messages: the middleware must reassemble it
                half = len(raw) // 2
                return {"type": "http.request", "body": raw[:half], "more_body": True}
            if sent is True:
                sent = 2  # type: ignore[assignment]
                return {"type": "http.request", "body": raw[len(raw) // 2 :], "more_body": False}
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        status, headers, body, chunks = 0, {}, b"", 0

        async def send(message: dict[str, Any]) -> None:
            nonlocal status, headers, body, chunks
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = {k.decode(): v.decode() for k, v in message["headers"]}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    chunks += 1
                    if disconnect_after and chunks > disconnect_after:
                        raise OSError("client went away")
                body += message.get("body", b"")

        try:
            await self.mw(scope, receive, send)
        except OSError:
            pass
        return Reply(status, headers, body, chunks)

    def _wsgi_partial(self, raw: bytes, ip: str, n: int, path: str = PATH) -> Reply:
        import io

        environ = {
            "REQUEST_METHOD": "POST", "PATH_INFO": path, "REMOTE_ADDR": ip,
            "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(raw)),
            "wsgi.input": io.BytesIO(raw),
        }  # fmt: skip
        got: dict[str, Any] = {}

        def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
            got["status"], got["headers"] = int(status[:3]), dict(headers)
            return lambda data: None

        it = self.mw(environ, start_response)
        body, chunks = b"", 0
        for chunk in it:
            body += chunk
            chunks += 1
            if chunks >= n:
                break  # the client went away; the server closes the iterable
        it.close()
        return Reply(got["status"], {k.lower(): v for k, v in got["headers"].items()}, body, chunks)

    def usage(self, ip: str = "192.0.2.10") -> dict[str, int]:
        records = self.reader.usage(ip, days=1)
        assert len(records) <= 1
        if not records:
            return {}
        r = records[0]
        return {"requests": r.requests, "input": r.input_tokens, "output": r.output_tokens,
                "cost": r.cost_micros, "estimated": r.estimated,
                **({"errors": r.errors} if r.errors else {})}  # fmt: skip

    def remaining(self, ip: str = "192.0.2.10") -> dict[str, int]:
        return {r.name: r.remaining for r in self.reader.remaining(ip)}


def config(**kw: Any) -> QuotaConfig:
    limits = kw.pop("limits", None) or [
        RequestRate(rate="1000/minute", name="rpm"),
        TokenRate(rate="100000/minute", name="tpm"),
        TokenQuota(tokens=1_000_000, period="day", name="tpd"),
        Budget(usd=100.0, period="month", name="usd"),
    ]
    route = AIRoute(path=PATH, format="openai-chat", default_output_tokens=100,
                    **kw.pop("route", {}))  # fmt: skip
    return QuotaConfig(plans=[Plan(name="p", limits=limits, **kw.pop("plan", {}))],
                       ai_routes=[route], **kw)  # fmt: skip


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

    from quota_middleware.engine import Engine, drive_sync
    from quota_middleware.request import Headers, RequestInfo

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
