"""The example apps (FastAPI and Flask) end to end through their frameworks' test clients, the
fake upstream they forward to, and ``quota-middleware demo``."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import demo_common  # noqa: E402
import fake_upstream  # noqa: E402

from quota_middleware import cli  # noqa: E402
from quota_middleware.metering._usage import Usage  # noqa: E402
from quota_middleware.metering.pricing import PriceTable, cost_micros  # noqa: E402

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Tell me a joke"}]}
STREAM = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
MESSAGES = {
    "model": "claude-3-5-haiku-latest",
    "max_tokens": 12,
    "system": "Be brief.",
    "messages": [{"role": "user", "content": "Hello"}],
}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


Send = Callable[..., Reply]


def _fastapi_client() -> Send:
    from fastapi_app.app import create_app
    from starlette.testclient import TestClient

    client = TestClient(create_app())

    def send(method: str, path: str, headers: dict[str, str] | None = None,
             body: bytes | None = None) -> Reply:  # fmt: skip
        r = client.request(method, path, headers=headers, content=body)
        return Reply(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content)

    return send


def _flask_client() -> Send:
    pytest.importorskip("flask")
    from flask_app.app import create_app

    client = create_app().test_client()

    def send(method: str, path: str, headers: dict[str, str] | None = None,
             body: bytes | None = None) -> Reply:  # fmt: skip
        r = client.open(path, method=method, headers=headers, data=body, buffered=True)
        return Reply(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.get_data())

    return send


@pytest.fixture(params=["fastapi", "flask"])
def send(request: pytest.FixtureRequest) -> Send:
    return _fastapi_client() if request.param == "fastapi" else _flask_client()


def jwt_headers(sub: str = "alice", plan: str | None = "pro", **kw: Any) -> dict[str, str]:
    return {"authorization": f"Bearer {demo_common.make_token(sub, plan, **kw)}"}


KEY_HEADERS = {"x-api-key": demo_common.DEMO_KEYS["svc-reports"]}
JSON_CT = {"content-type": "application/json"}


def raw(payload: Any) -> bytes:
    return json.dumps(payload).encode()


# -- policy at work -------------------------------------------------------------------------------
def test_health_is_exempt(send: Send) -> None:
    for _ in range(10):
        r = send("GET", "/health")
        assert r.status == 200 and r.json() == {"status": "ok"}
        assert "ratelimit" not in r.headers and "ratelimit-policy" not in r.headers


def test_jwt_user_gets_pro_plan(send: Send) -> None:
    for i in range(8):
        r = send("GET", "/v1/me", jwt_headers())
        assert r.status == 200, r.body
        me = r.json()
        assert (me["caller"], me["plan"], me["source"]) == ("alice", "pro", "jwt")
        limits = {lim["name"]: lim for lim in me["limits"]}
        assert limits["60-m"]["quota"] == 60 and limits["60-m"]["remaining"] == 59 - i
        assert limits["inflight"]["quota"] == 10
        assert '"60-m";r=' in r.headers["ratelimit"]


def test_api_key_user_gets_free_plan_and_429_after_burst(send: Send) -> None:
    for i in range(5):
        r = send("GET", "/v1/me", KEY_HEADERS)
        assert r.status == 200, r.body
        assert (r.json()["caller"], r.json()["plan"]) == ("svc-reports", "free")
        assert f'"5-m";r={4 - i};' in r.headers["ratelimit"]
    r = send("GET", "/v1/me", KEY_HEADERS)
    assert r.status == 429
    assert int(r.headers["retry-after"]) >= 1
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["limit"] == "5-m"
    assert '"5-m";q=5;w=60' in r.headers["ratelimit-policy"]
    # Other callers are not affected.
    assert send("GET", "/v1/me", jwt_headers()).status == 200


def test_anonymous_ip_caller_gets_default_plan(send: Send) -> None:
    statuses = [send("GET", "/v1/me").status for _ in range(4)]
    assert statuses == [200, 200, 200, 429]


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(jwt_headers(secret="wrong-secret-" + "x" * 32), id="bad-signature"),
        pytest.param({"authorization": "Bearer not.a.jwt"}, id="garbage"),
        pytest.param({"x-api-key": "qm_not_a_real_key"}, id="bad-api-key"),
    ],
)
def test_bad_credentials_get_401(send: Send, headers: dict[str, str]) -> None:
    r = send("GET", "/v1/me", headers)
    assert r.status == 401
    assert "www-authenticate" in r.headers
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "ratelimit" not in r.headers


# -- relaying the upstream ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "payload"),
    [
        pytest.param("/v1/chat/completions", CHAT, id="chat-json"),
        pytest.param("/v1/chat/completions", STREAM, id="chat-sse"),
        pytest.param("/v1/messages", MESSAGES, id="messages-json"),
        pytest.param("/v1/messages", {**MESSAGES, "stream": True}, id="messages-sse"),
    ],
)
def test_ai_routes_relay_the_upstream_byte_for_byte(send: Send, path: str, payload: Any) -> None:
    body = raw(payload)
    expected = fake_upstream.handle("POST", path, body)
    r = send("POST", path, {**jwt_headers(), **JSON_CT}, body)
    assert r.status == 200
    assert r.body == expected.body
    assert r.headers["content-type"] == expected.content_type
    assert '"60-m";r=' in r.headers["ratelimit"]


def test_upstream_errors_pass_through(send: Send) -> None:
    body = raw({"model": "gpt-4o-mini"})  # no "messages": the upstream refuses it
    r = send("POST", "/v1/chat/completions", {**jwt_headers(), **JSON_CT}, body)
    assert r.status == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    # an upstream error without usage is charged nothing
    usage = send("GET", "/v1/usage", jwt_headers()).json()
    assert usage["totals"]["input_tokens"] == usage["totals"]["output_tokens"] == 0


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(raw({**CHAT, "model": "my-own-model"}), id="unknown-model"),
        pytest.param(b"{not json", id="no-model"),
    ],
)
def test_budgeted_plans_refuse_unpriced_models(send: Send, body: bytes) -> None:
    """Every plan has a budget and the policy says ``unpriced = "refuse"``: a model the price
    table does not know (or a body that names none) is refused before it reaches the upstream."""
    r = send("POST", "/v1/chat/completions", {**jwt_headers(), **JSON_CT}, body)
    assert r.status == 403
    assert r.json()["error"]["code"] == "model_not_priced"
    assert r.headers["x-should-retry"] == "false"


def test_fastapi_streams_chunk_by_chunk() -> None:
    """The route relays SSE events as they come, through the middleware: many body messages."""
    from fastapi_app.app import create_app

    app = create_app()
    body = raw(STREAM)
    headers = [(k.encode(), v.encode()) for k, v in {**jwt_headers(), **JSON_CT}.items()]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
        "query_string": b"", "root_path": "", "headers": headers,
        "client": ("127.0.0.1", 5000), "server": ("testserver", 80),
    }  # fmt: skip
    messages: list[dict[str, Any]] = []
    received = False

    async def receive() -> dict[str, Any]:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    asyncio.run(app(scope, receive, send))
    assert messages[0]["status"] == 200
    parts = [m["body"] for m in messages[1:] if m.get("body")]
    expected = fake_upstream.handle("POST", "/v1/chat/completions", body)
    assert len(parts) >= len(expected.chunks) // 2  # not buffered into one
    assert b"".join(parts) == expected.body


def test_flask_streams_chunk_by_chunk() -> None:
    pytest.importorskip("flask")
    from flask_app.app import create_app
    from werkzeug.test import EnvironBuilder

    app = create_app()
    body = raw(STREAM)
    environ = EnvironBuilder(
        path="/v1/chat/completions", method="POST", data=body,
        headers={**jwt_headers(), **JSON_CT}, environ_base={"REMOTE_ADDR": "127.0.0.1"},
    ).get_environ()  # fmt: skip
    status: list[str] = []
    app_iter = app.wsgi_app(environ, lambda s, h, e=None: status.append(s))
    try:
        parts = [p for p in app_iter if p]
    finally:
        app_iter.close()  # type: ignore[attr-defined]
    assert status[0].startswith("200")
    expected = fake_upstream.handle("POST", "/v1/chat/completions", body)
    assert len(parts) >= len(expected.chunks) // 2
    assert b"".join(parts) == expected.body


def test_openai_sdk_through_the_fastapi_example() -> None:
    openai = pytest.importorskip("openai")
    from fastapi_app.app import create_app
    from starlette.testclient import TestClient

    http = TestClient(create_app(), base_url="http://testserver")
    # The SDK sends its api_key as "Authorization: Bearer": an API key of the demo policy.
    key = demo_common.DEMO_KEYS["svc-batch"]
    client = openai.OpenAI(
        api_key=key, base_url="http://testserver/v1", http_client=http, max_retries=0
    )
    text = ""
    usage = None
    for chunk in client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
        stream=True, stream_options={"include_usage": True},
    ):  # fmt: skip
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        usage = chunk.usage or usage
    assert text == "This is a fake reply"
    assert usage is not None and usage.completion_tokens == 5
    for _ in range(4):  # free plan: 5 per minute
        client.chat.completions.create(model="gpt-4o-mini", messages=[CHAT["messages"][0]])
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="gpt-4o-mini", messages=[])
    assert info.value.code == "rate_limit_exceeded"


# -- metering: GET /v1/usage ---------------------------------------------------------------------
def _fake_usage(path: str, payload: Any) -> Usage:
    """The usage the fake upstream reports for ``payload``, in our terms."""
    reply = fake_upstream.handle("POST", path, raw({**payload, "stream": False}))
    u = json.loads(reply.body)["usage"]
    if "prompt_tokens" in u:
        return Usage(input_tokens=u["prompt_tokens"], output_tokens=u["completion_tokens"])
    cache = u["cache_read_input_tokens"] + u["cache_creation_input_tokens"]
    return Usage(input_tokens=u["input_tokens"] + cache, output_tokens=u["output_tokens"])


def _cost(model: str, usage: Usage) -> int:
    price = PriceTable().lookup(model)
    assert price is not None, model
    return cost_micros(usage, price)


HAIKU = {**MESSAGES, "model": "claude-haiku-4-5"}


def test_usage_route_reports_exactly_what_was_charged(send: Send) -> None:
    h = {**jwt_headers("usage-alice"), **JSON_CT}
    empty = send("GET", "/v1/usage", h).json()
    assert (empty["caller"], empty["plan"], empty["usage"]) == ("usage-alice", "pro", [])
    before = {q["name"]: q for q in empty["remaining"]}
    assert before["tokens-day"]["remaining"] == 2_000_000 and before["tokens-day"]["used"] == 0
    assert before["usd-month"]["limit"] == 20_000_000 and before["usd-month"]["unit"] == (
        "usd_micros"
    )
    for path, payload in [
        ("/v1/chat/completions", CHAT),
        ("/v1/chat/completions", STREAM),
        ("/v1/messages", HAIKU),
        ("/v1/messages", {**HAIKU, "stream": True}),
    ]:
        assert send("POST", path, h, raw(payload)).status == 200
    report = send("GET", "/v1/usage", h).json()
    by_model = {u["model"]: u for u in report["usage"]}
    assert set(by_model) == {"gpt-4o-mini", "claude-haiku-4-5"}
    expected_total = 0
    for model, path, payload in [
        ("gpt-4o-mini", "/v1/chat/completions", CHAT),
        ("claude-haiku-4-5", "/v1/messages", HAIKU),
    ]:
        one = _fake_usage(path, payload)
        rec = by_model[model]
        # the same request once as JSON, once streamed: both charged the provider's numbers
        assert rec["requests"] == 2 and rec["estimated"] == 0
        assert (rec["input_tokens"], rec["output_tokens"]) == (
            2 * one.input_tokens,
            2 * one.output_tokens,
        )
        assert rec["cost_micros"] == 2 * _cost(model, one)
        assert rec["cost_usd"] == rec["cost_micros"] / 1_000_000
        expected_total += 2 * one.total_tokens
    totals = report["totals"]
    assert totals["requests"] == 4 and totals["estimated"] == 0
    assert totals["input_tokens"] + totals["output_tokens"] == expected_total
    left = {q["name"]: q for q in report["remaining"]}
    assert left["tokens-day"]["used"] == expected_total
    assert left["tokens-day"]["remaining"] == 2_000_000 - expected_total
    assert left["usd-month"]["used"] == totals["cost_micros"]


def test_stream_without_include_usage_is_charged_exactly(send: Send) -> None:
    """The proxy asks the upstream for the stream's usage and keeps that chunk from the client:
    the client's stream has no usage, the charge is the provider's count, not an estimate."""
    h = {**jwt_headers("usage-bob"), **JSON_CT}
    r = send("POST", "/v1/chat/completions", h, raw({**CHAT, "stream": True}))
    assert r.status == 200 and b'"usage"' not in r.body
    (rec,) = send("GET", "/v1/usage", h).json()["usage"]
    assert (rec["model"], rec["requests"], rec["estimated"]) == ("gpt-4o-mini", 1, 0)
    exact = _fake_usage("/v1/chat/completions", CHAT)
    assert (rec["input_tokens"], rec["output_tokens"]) == (exact.input_tokens, exact.output_tokens)
    assert rec["cost_micros"] == _cost("gpt-4o-mini", exact)


def test_usage_is_per_caller_and_validates_days(send: Send) -> None:
    assert send("POST", "/v1/chat/completions", {**KEY_HEADERS, **JSON_CT}, raw(CHAT)).status == 200
    mine = send("GET", "/v1/usage", KEY_HEADERS).json()
    assert (mine["caller"], mine["plan"]) == ("svc-reports", "free")
    assert [u["requests"] for u in mine["usage"]] == [1]
    assert {q["name"]: q["limit"] for q in mine["remaining"]} == {
        "tokens-day": 50_000,
        "usd-month": 500_000,
    }
    other = send("GET", "/v1/usage?days=7", jwt_headers("usage-carol")).json()
    assert other["usage"] == [] and other["caller"] == "usage-carol"
    for bad in ("0", "36", "x"):
        r = send("GET", f"/v1/usage?days={bad}", jwt_headers("usage-carol"))
        assert r.status == 400 and r.json()["error"]["code"] == "invalid_days"
    assert send("GET", "/v1/usage", {"x-api-key": "qm_not_a_real_key"}).status == 401


def test_ai_routes_send_openai_rate_limit_headers(send: Send) -> None:
    r = send("POST", "/v1/chat/completions", {**KEY_HEADERS, **JSON_CT}, raw(CHAT))
    assert r.status == 200
    assert r.headers["x-ratelimit-limit-requests"] == "5"
    assert r.headers["x-ratelimit-limit-tokens"] == "20000"
    assert '"usd-month";q=500000' in r.headers["ratelimit-policy"]


@pytest.mark.parametrize("framework", ["fastapi", "flask"])
def test_quota_policy_env_overrides_the_policy_file(
    framework: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if framework == "flask":
        pytest.importorskip("flask")
    policy = (EXAMPLES / "fastapi_app" / "policy.toml").read_text()
    policy = policy.replace('rate = "60/minute"', 'rate = "2/minute"')
    (tmp_path / "policy.toml").write_text(policy)
    monkeypatch.setenv("QUOTA_POLICY", str(tmp_path / "policy.toml"))
    send = _fastapi_client() if framework == "fastapi" else _flask_client()
    assert [send("GET", "/v1/me", jwt_headers()).status for _ in range(3)] == [200, 200, 429]


def test_example_policies_are_the_same() -> None:
    fastapi_policy = (EXAMPLES / "fastapi_app" / "policy.toml").read_text()
    assert fastapi_policy == (EXAMPLES / "flask_app" / "policy.toml").read_text()


# -- a real upstream that gzips: relayed decoded, charged exactly ----------------------------------
UPSTREAM_OPENAI_KEY = "sk-upstream-test-openai"
UPSTREAM_ANTHROPIC_KEY = "sk-ant-upstream-test"
_SDK_ENV = ("OPENAI_BASE_URL", "OPENAI_API_KEY", "ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY")


@pytest.mark.parametrize(
    ("kind", "base", "url"),
    [
        ("openai", None, "http://fake-upstream/v1/chat/completions"),
        ("openai", "https://api.openai.com/v1", "https://api.openai.com/v1/chat/completions"),
        ("openai", "https://api.openai.com/v1/", "https://api.openai.com/v1/chat/completions"),
        ("openai", "https://gw.example/openai/v1", "https://gw.example/openai/v1/chat/completions"),
        ("anthropic", None, "http://fake-upstream/v1/messages"),
        ("anthropic", "https://api.anthropic.com", "https://api.anthropic.com/v1/messages"),
        ("anthropic", "https://api.anthropic.com/", "https://api.anthropic.com/v1/messages"),
        ("anthropic", "https://api.anthropic.com/v1", "https://api.anthropic.com/v1/messages"),
        ("anthropic", "https://api.anthropic.com/v1/", "https://api.anthropic.com/v1/messages"),
        ("anthropic", "http://proxy.example/claude", "http://proxy.example/claude/v1/messages"),
    ],
)
def test_upstream_urls_follow_each_sdks_base_url_convention(
    kind: str, base: str | None, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in _SDK_ENV:
        monkeypatch.delenv(name, raising=False)
    if base is not None:
        monkeypatch.setenv(f"{kind.upper()}_BASE_URL", base)
    suffix = "/chat/completions" if kind == "openai" else "/messages"
    upstream = demo_common.upstream_for(kind)
    assert upstream.is_fake == (base is None)
    assert upstream.url(suffix) == url


@pytest.fixture(scope="module")
def gzip_upstream() -> Iterator[fake_upstream.LocalUpstream]:
    pytest.importorskip("werkzeug")
    with fake_upstream.LocalUpstream(delay=0.001, gzip=True) as upstream:
        yield upstream


@pytest.fixture
def via_gzip_upstream(
    gzip_upstream: fake_upstream.LocalUpstream, monkeypatch: pytest.MonkeyPatch
) -> fake_upstream.LocalUpstream:
    """The example apps forward to ``gzip_upstream``, given as each SDK would be configured."""
    monkeypatch.setenv("OPENAI_BASE_URL", gzip_upstream.url + "/v1")
    monkeypatch.setenv("OPENAI_API_KEY", UPSTREAM_OPENAI_KEY)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", gzip_upstream.url)
    monkeypatch.setenv("ANTHROPIC_API_KEY", UPSTREAM_ANTHROPIC_KEY)
    gzip_upstream.requests.clear()
    return gzip_upstream


def test_local_upstream_gzips_json_and_each_sse_event() -> None:
    """The fake really answers gzip (what the relay tests rely on), flushed event by event."""
    import gzip

    import httpx

    pytest.importorskip("werkzeug")
    with fake_upstream.LocalUpstream(delay=0.001, gzip=True) as upstream:
        for path, payload in [("/v1/chat/completions", STREAM), ("/v1/messages", MESSAGES)]:
            body = raw(payload)
            with httpx.stream("POST", upstream.url + path, content=body,
                              headers={"accept-encoding": "identity"}) as r:  # fmt: skip
                assert r.headers["content-encoding"] == "gzip"
                parts = list(r.iter_raw())
            data = b"".join(parts)
            assert data[:2] == b"\x1f\x8b"
            expected = fake_upstream.handle("POST", path, body)
            assert gzip.decompress(data) == expected.body
            if expected.stream:
                assert len(parts) > len(expected.chunks) // 2
        assert [r.path for r in upstream.requests] == ["/v1/chat/completions", "/v1/messages"]


GZIP_CASES = [
    pytest.param("/v1/chat/completions", CHAT, id="chat-json"),
    pytest.param("/v1/chat/completions", STREAM, id="chat-sse"),
    pytest.param("/v1/chat/completions", {**CHAT, "stream": True}, id="chat-sse-no-usage"),
    pytest.param("/v1/messages", HAIKU, id="messages-json"),
    pytest.param("/v1/messages", {**HAIKU, "stream": True}, id="messages-sse"),
]


@pytest.mark.parametrize(("path", "payload"), GZIP_CASES)
def test_gzip_upstream_is_relayed_with_its_encoding_and_charged_exactly(
    via_gzip_upstream: fake_upstream.LocalUpstream, send: Send, path: str, payload: Any
) -> None:
    import gzip

    body = raw(payload)
    h = {**jwt_headers("gzip-alice"), **JSON_CT, "accept-encoding": "gzip"}
    r = send("POST", path, h, body)
    assert r.status == 200, r.body
    # the proxy relays the upstream's bytes and their Content-Encoding as they came; only an
    # OpenAI stream it asked for usage is requested uncompressed (the usage chunk is cut out)
    asked = payload.get("stream_options", {}).get("include_usage")
    sse_usage = path == "/v1/chat/completions" and payload.get("stream") and not asked
    encoded = r.headers.get("content-encoding") == "gzip"
    data = gzip.decompress(r.body) if encoded and r.body[:2] == b"\x1f\x8b" else r.body
    assert encoded == (not sse_usage)
    expected = fake_upstream.handle("POST", path, body)
    if not sse_usage:
        assert data == expected.body
    else:
        assert b'"usage"' not in data and data.endswith(b"data: [DONE]\n\n")
    # the provider's request id is relayed; OpenAI's under another name (x-request-id is the
    # middleware's, naming the charge)
    (name, upstream_id), *_ = expected.headers
    relayed = "request-id" if name == "request-id" else "x-upstream-request-id"
    if not sse_usage:
        assert r.headers[relayed] == upstream_id
    assert r.headers.get("x-request-id") != upstream_id
    # the upstream got the SDK-convention path, the server's key and not the caller's JWT
    (seen,) = via_gzip_upstream.requests
    assert (seen.method, seen.path) == ("POST", path)
    if sse_usage:
        assert seen.headers["accept-encoding"] == "identity"
    if path == "/v1/messages":
        assert seen.headers["x-api-key"] == UPSTREAM_ANTHROPIC_KEY
        assert "authorization" not in seen.headers
    else:
        assert seen.headers["authorization"] == f"Bearer {UPSTREAM_OPENAI_KEY}"
    # charged the upstream's own usage, not an estimate
    (rec,) = send("GET", "/v1/usage", h).json()["usage"]
    one = _fake_usage(path, payload)
    assert (rec["model"], rec["requests"], rec["estimated"]) == (payload["model"], 1, 0)
    assert (rec["input_tokens"], rec["output_tokens"]) == (one.input_tokens, one.output_tokens)
    assert rec["cost_micros"] == _cost(payload["model"], one) > 0


@pytest.fixture
def lzw_upstream(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """An upstream answering in "compress" (LZW), which neither httpx nor the middleware decodes
    (unlike "br" or "zstd", which httpx decodes when brotli / zstandard happen to be installed);
    the example apps are pointed at it before they are built."""
    pytest.importorskip("werkzeug")

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Encoding", "compress"),
                                  ("Content-Length", str(len(OPAQUE)))])  # fmt: skip
        return [OPAQUE]

    with fake_upstream.LocalUpstream(app=app) as upstream:
        monkeypatch.setenv("OPENAI_BASE_URL", upstream.url + "/v1")
        yield


OPAQUE = b"\x1f\x9d\x90not-really-lzw"


@pytest.mark.usefixtures("lzw_upstream")
def test_an_encoding_the_relay_cannot_decode_is_relayed_with_its_header(send: Send) -> None:
    """Bytes nobody here can decode go out as received, labelled with their encoding (never
    unlabelled); the middleware cannot read them and charges the request from an estimate."""
    h = {**jwt_headers("lzw-alice"), **JSON_CT}
    r = send("POST", "/v1/chat/completions", h, raw(CHAT))
    assert r.status == 200
    assert r.headers["content-encoding"] == "compress"
    assert r.body == OPAQUE
    (rec,) = send("GET", "/v1/usage", h).json()["usage"]
    assert (rec["requests"], rec["estimated"]) == (1, 1)


# -- the fake upstream itself ---------------------------------------------------------------------
def test_fake_upstream_usage_agrees_between_json_and_stream() -> None:
    plain = json.loads(fake_upstream.handle("POST", "/v1/chat/completions", raw(CHAT)).body)
    events = fake_upstream.handle("POST", "/v1/chat/completions", raw(STREAM)).chunks
    data = [json.loads(c[6:]) for c in events[:-1]]
    assert events[-1] == b"data: [DONE]\n\n"
    assert data[0]["choices"][0]["delta"]["role"] == "assistant"
    assert data[-2]["choices"][0]["finish_reason"] == "stop"
    assert data[-1]["choices"] == [] and data[-1]["usage"] == plain["usage"]
    text = "".join(d["choices"][0]["delta"].get("content", "") for d in data[:-1])
    assert text == plain["choices"][0]["message"]["content"]
    usage = plain["usage"]
    assert usage["completion_tokens"] == len(text.split()) == 40
    assert usage["prompt_tokens"] == len("Tell me a joke") // 4 + 7
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    no_usage = fake_upstream.handle("POST", "/v1/chat/completions", raw({**CHAT, "stream": True}))
    assert all(b'"usage"' not in c for c in no_usage.chunks)


def test_fake_upstream_anthropic_stream_shape() -> None:
    plain = json.loads(fake_upstream.handle("POST", "/v1/messages", raw(MESSAGES)).body)
    chunks = fake_upstream.handle("POST", "/v1/messages", raw({**MESSAGES, "stream": True})).chunks
    names = [c.split(b"\n", 1)[0].removeprefix(b"event: ").decode() for c in chunks]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"} and len(names[3:-3]) == 12
    start = json.loads(chunks[0].split(b"data: ", 1)[1])["message"]["usage"]
    delta = json.loads(chunks[-2].split(b"data: ", 1)[1])
    assert (
        start["input_tokens"]
        == plain["usage"]["input_tokens"]
        == (len("Hello") // 4 + 7) + (len("Be brief.") // 4 + 7)
    )
    assert start["cache_read_input_tokens"] == 0
    assert delta["usage"]["output_tokens"] == plain["usage"]["output_tokens"] == 12
    assert delta["delta"]["stop_reason"] == plain["stop_reason"] == "max_tokens"


# -- quota-middleware demo ------------------------------------------------------------------------
@pytest.fixture
def fresh_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("QUOTA_REDIS_URL", raising=False)
    yield


@pytest.mark.usefixtures("fresh_env")
def test_demo_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    lines: dict[str, str] = {}
    for line in out.splitlines():  # the first line of each caller: its row of the table
        if line.strip():
            lines.setdefault(line.split()[0], line)
    assert "pro" in lines["alice"] and "streamed" in lines["alice"]
    assert "free" in lines["svc-reports"] and "rate 5-m" in lines["svc-reports"]
    assert "concurrency inflight" in lines["svc-batch"]
    assert "rate 3-m" in lines["anonymous"]
    assert "bad token" in lines["mallory"]
    assert "last RateLimit" in out
    # the usage section: one line per caller and model, then what is left
    assert "usage today" in out and "estimated" in out
    usage = [line.split() for line in out.splitlines() if line.startswith("alice ")]
    models = {cells[1]: cells for cells in usage if len(cells) == 7}
    assert set(models) == {"gpt-4o-mini", "claude-haiku-4-5"}
    # both streams exact: the proxy asked for the usage the one without include_usage lacked
    assert models["gpt-4o-mini"][2] == "2" and models["gpt-4o-mini"][6] == "0"
    assert models["claude-haiku-4-5"][6] == "0"
    assert "token quotas and budgets" in out
    assert any(line.split()[:3] == ["alice", "pro", "usd-month"] for line in out.splitlines())
    assert "2,000,000 tokens/day" in out


@pytest.mark.usefixtures("fresh_env")
def test_demo_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--json", "--requests", "7"]) == 0
    rows = {r["caller"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["alice"]["admitted"] == rows["alice"]["sent"] == 10
    assert (rows["svc-reports"]["admitted"], rows["svc-reports"]["limited"]) == (5, 2)
    assert (rows["svc-batch"]["admitted"], rows["svc-batch"]["limited"]) == (3, 1)
    assert (rows["anonymous"]["admitted"], rows["anonymous"]["limited"]) == (3, 4)
    assert rows["mallory"]["unauthorized"] == rows["mallory"]["sent"] == 2
    # usage as charged: alice streamed once with and once without include_usage (the proxy
    # asked for it: exact too), and sent one Anthropic message; two of svc-batch's three
    # streams were admitted
    alice = {u["model"]: u for u in rows["alice"]["usage"]}
    assert (alice["gpt-4o-mini"]["requests"], alice["gpt-4o-mini"]["estimated"]) == (2, 0)
    assert (alice["claude-haiku-4-5"]["requests"], alice["claude-haiku-4-5"]["estimated"]) == (
        1,
        0,
    )
    assert alice["claude-haiku-4-5"]["output_tokens"] == 20  # max_tokens 20: 20 words
    (batch,) = rows["svc-batch"]["usage"]
    assert (batch["requests"], batch["estimated"]) == (2, 0)
    assert batch["cost_micros"] > 0 and batch["cost_usd"] == batch["cost_micros"] / 1e6
    assert rows["svc-reports"]["usage"] == [] and rows["anonymous"]["usage"] == []
    assert rows["anonymous"]["caller_id"] == "127.0.0.1"
    assert rows["mallory"]["caller_id"] is None and rows["mallory"]["remaining"] == []
    left = {q["name"]: q for q in rows["svc-batch"]["remaining"]}
    assert left["tokens-day"]["used"] == batch["input_tokens"] + batch["output_tokens"]
    assert left["tokens-day"]["remaining"] == 50_000 - left["tokens-day"]["used"]
    assert left["usd-month"]["used"] == batch["cost_micros"]


def test_cli_requires_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
