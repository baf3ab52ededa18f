"""The backend proxy: the request plan (paths, headers, keys, usage injection) as plain values,
then AIProxy and WSGIAIProxy served for real (uvicorn, werkzeug) behind the middleware, with
the official SDKs as clients and a fake provider on a loopback port as the upstream.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fake_provider import Provider, ServerThread, anthropic_messages, create_app, openai_chat
from quota_middleware import (
    Charge,
    ConfigurationError,
    Plan,
    QuotaConfig,
    QuotaMiddleware,
    RequestRate,
    StorageConfig,
    WSGIQuotaMiddleware,
)
from quota_middleware.proxy import AIProxy, ProxyConfig, Upstream, UpstreamKey, WSGIAIProxy
from quota_middleware.proxy._plan import (
    KeyRing,
    Outbound,
    Refusal,
    UsageStripper,
    plan_request,
)

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

SERVER_KEY = "sk-server-" + "s" * 40
ANTHROPIC_KEY = "sk-ant-server-" + "a" * 30
GEMINI_KEY = "AIza-server-" + "g" * 20
CLIENT_KEY = "sk-client-" + "c" * 40
PROMPT = [{"role": "user", "content": "Tell me something about rate limits"}]


@pytest.fixture(autouse=True)
def _keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_OPENAI_KEY", SERVER_KEY)
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", ANTHROPIC_KEY)
    monkeypatch.setenv("TEST_GEMINI_KEY", GEMINI_KEY)


def proxy_config(base: str, **kw: Any) -> ProxyConfig:
    return ProxyConfig(
        upstreams=[
            Upstream(
                name="openai",
                provider="openai",
                base_url=f"{base}/v1",
                keys=[UpstreamKey(id="primary", env="TEST_OPENAI_KEY")],
            ),
            Upstream(
                name="anthropic",
                provider="anthropic",
                base_url=base,
                keys=[UpstreamKey(id="ant", env="TEST_ANTHROPIC_KEY")],
            ),
            Upstream(
                name="gemini",
                provider="gemini",
                base_url=base,
                keys=[UpstreamKey(id="gem", env="TEST_GEMINI_KEY")],
            ),
            Upstream(
                name="slow",
                provider="openai-compatible",
                base_url=f"{base}/slow-headers/v1",
                keys=[UpstreamKey(id="slow", env="TEST_OPENAI_KEY")],
            ),
        ],  # fmt: skip
        **kw,
    )


def policy(base: str, storage: StorageConfig | None = None, **kw: Any) -> QuotaConfig:
    return QuotaConfig(
        plans=[Plan(name="free", limits=[RequestRate(rate="1000/minute")])],
        storage=storage or StorageConfig(url="memory://"),
        proxy=proxy_config(base, **kw),
        unpriced="tokens-only",
    )


# -- the plan, sans-IO ---------------------------------------------------------------------------


def plan(
    path: str,
    *,
    method: str = "POST",
    body: bytes = b"{}",
    query: str = "",
    headers: list[tuple[str, str]] | None = None,
    metered: bool = True,
) -> Outbound | Refusal:
    cfg = proxy_config("http://upstream.test")
    return plan_request(cfg, KeyRing(cfg), method=method, raw_path=path, query=query,
                        headers=headers or [], body=body, metered=metered)  # fmt: skip


@pytest.mark.parametrize(
    "path",
    [
        "/openai/..%2f..%2fadmin", "/openai/../admin", "/openai/%2e%2e/models",
        "/http://127.0.0.1:6379/", "//evil/", "/openai//models", "/openai/models/",
        "/openai/chat%0d%0aHost:%20evil/completions", "/openai/models%2fx", "/openai/a%5cb",
        "/openai/chat/completions%00", "/openai/%zz", "openai/models", "/openai/mod els",
    ],
)  # fmt: skip
def test_unsafe_paths_are_refused_with_400(path: str) -> None:
    out = plan(path)
    assert isinstance(out, Refusal) and out.status == 400, path


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/openai/files"), ("DELETE", "/openai/models/x"), ("GET", "/openai/chat/completions"),
     ("POST", "/nope/chat/completions"), ("POST", "/openai/models/a/b")],
)  # fmt: skip
def test_paths_outside_the_known_surface_are_404(method: str, path: str) -> None:
    out = plan(path, method=method)
    assert isinstance(out, Refusal) and out.status == 404
    assert json.loads(out.body)["error"]["code"] in ("unknown_endpoint", "unknown_upstream")


def test_the_allow_list_extends_the_surface() -> None:
    cfg = ProxyConfig(upstreams=[Upstream(name="o", provider="openai", allow=["POST files"])])
    out = plan_request(cfg, KeyRing(cfg), method="POST", raw_path="/o/files", query="",
                       headers=[], body=b"", metered=False)  # fmt: skip
    assert isinstance(out, Outbound) and out.url == "https://api.openai.com/v1/files"


def test_client_credentials_are_dropped_and_the_server_key_put_in() -> None:
    headers = [("authorization", f"Bearer {CLIENT_KEY}"), ("x-api-key", CLIENT_KEY),
               ("api-key", CLIENT_KEY), ("x-goog-api-key", CLIENT_KEY), ("cookie", "s=1"),
               ("x-forwarded-for", "1.2.3.4"), ("connection", "keep-alive"),
               ("content-type", "application/json"), ("openai-beta", "assistants=v2")]  # fmt: skip
    out = plan("/openai/chat/completions", headers=headers, query=f"key={CLIENT_KEY}&a=1")
    assert isinstance(out, Outbound)
    assert out.url == "http://upstream.test/v1/chat/completions?a=1"
    assert dict(out.headers) == {"content-type": "application/json",
                                 "openai-beta": "assistants=v2",
                                 "authorization": f"Bearer {SERVER_KEY}"}  # fmt: skip
    assert CLIENT_KEY not in repr(out)
    ant = plan("/anthropic/v1/messages", headers=headers)
    assert isinstance(ant, Outbound)
    assert ("x-api-key", ANTHROPIC_KEY) in ant.headers
    assert ("anthropic-version", "2023-06-01") in ant.headers
    assert not any(k == "authorization" for k, _ in ant.headers)
    gem = plan("/gemini/v1beta/models/gemini-2.0-flash:generateContent", query=f"key={CLIENT_KEY}")
    assert isinstance(gem, Outbound) and gem.url.endswith(":generateContent")
    assert ("x-goog-api-key", GEMINI_KEY) in gem.headers


def test_keys_are_never_shown_and_a_missing_key_fails_at_startup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = proxy_config("http://upstream.test")
    ring = KeyRing(cfg)
    assert SERVER_KEY not in repr(ring.next(cfg.upstreams[0]))
    monkeypatch.delenv("TEST_OPENAI_KEY")
    with pytest.raises(ConfigurationError, match="TEST_OPENAI_KEY is not set") as e:
        KeyRing(cfg)
    assert SERVER_KEY not in str(e.value)


def test_include_usage_is_added_to_metered_openai_streams_only() -> None:
    body = json.dumps({"model": "m", "messages": PROMPT, "stream": True}).encode()
    out = plan("/openai/chat/completions", body=body)
    assert isinstance(out, Outbound) and out.strip_usage
    assert json.loads(out.body)["stream_options"] == {"include_usage": True}
    assert ("accept-encoding", "identity") in out.headers
    for other in (
        plan("/openai/chat/completions", body=body, metered=False),  # no meter: nothing to hide
        plan("/openai/chat/completions", body=body.replace(b'"stream": true', b'"stream": false')),
        plan("/openai/chat/completions", body=json.dumps({"stream": True, "stream_options": {
            "include_usage": True}}).encode()),  # the client asked: it gets the chunk
        plan("/openai/responses", body=body),  # Responses streams always carry usage
    ):  # fmt: skip
        assert isinstance(other, Outbound) and not other.strip_usage


def test_the_stripper_hides_exactly_the_usage_parts_across_any_chunking() -> None:
    req = {"model": "m", "messages": PROMPT, "stream": True}
    plain = b"".join(openai_chat(req)[2])
    asked = b"".join(openai_chat({**req, "stream_options": {"include_usage": True}})[2])
    for size in (1, 7, 64, len(asked)):
        s = UsageStripper()
        pieces = [p for i in range(0, len(asked), size) for p in s.feed(asked[i : i + size])]
        pieces += s.finish()
        client = b"".join(d for d, to_client in pieces if to_client)
        meter = [d for d, to_client in pieces if not to_client]
        assert client == plain, size
        assert len(meter) == 1 and b'"choices":[]' in meter[0] and b'"prompt_tokens"' in meter[0]


# -- served for real -------------------------------------------------------------------------------


@pytest.fixture
def provider() -> Iterator[tuple[Provider, str]]:
    fake = Provider()
    with ServerThread(create_app(fake)) as server:
        yield fake, server.url


@pytest.fixture(params=["memory", "redis"])
def storage(request: pytest.FixtureRequest) -> StorageConfig:
    if request.param == "memory":
        return StorageConfig(url="memory://")
    server = request.getfixturevalue("redis_server")
    import uuid

    return StorageConfig(url=server.url, prefix=f"px{uuid.uuid4().hex[:8]}")


def asgi_gateway(config: QuotaConfig, charges: list[Charge]) -> Any:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    inner = Starlette(routes=[Mount("/ai", app=AIProxy(config))])
    return QuotaMiddleware(inner, config=config, on_settle=charges.append)


@pytest.fixture
def gateway(provider: tuple[Provider, str], storage: StorageConfig) -> Iterator[Any]:
    fake, base = provider
    charges: list[Charge] = []
    config = policy(base, storage)
    with ServerThread(asgi_gateway(config, charges)) as server:
        yield fake, server.url, charges


def settled(charges: list[Charge], n: int = 1, timeout: float = 5.0) -> list[Charge]:
    deadline = time.monotonic() + timeout
    while len(charges) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # a second settle of the same request would land now
    return charges


def test_openai_sdk_json_through_the_mounted_proxy(gateway: Any) -> None:
    fake, url, charges = gateway
    client = openai.OpenAI(base_url=f"{url}/ai/openai", api_key=CLIENT_KEY, max_retries=0)
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT)
    assert reply.usage is not None
    [charge] = settled(charges)
    assert (charge.input_tokens, charge.output_tokens) == (
        reply.usage.prompt_tokens,
        reply.usage.completion_tokens,
    )
    assert not charge.estimated
    seen = fake.seen[-1]
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["authorization"] == f"Bearer {SERVER_KEY}"
    assert CLIENT_KEY not in json.dumps(seen.headers) + seen.query


def test_an_openai_stream_without_include_usage_is_charged_exactly_and_looks_unchanged(
    gateway: Any,
) -> None:
    fake, url, charges = gateway
    req = {"model": "gpt-4o-mini", "messages": PROMPT, "stream": True}
    with httpx.stream("POST", f"{url}/ai/openai/chat/completions", json=req,
                      headers={"authorization": f"Bearer {CLIENT_KEY}"}) as r:  # fmt: skip
        assert r.status_code == 200
        body = b"".join(r.iter_bytes())
    assert body == b"".join(openai_chat(req)[2])  # byte for byte what the client asked for
    assert fake.seen[-1].json()["stream_options"] == {"include_usage": True}
    [charge] = settled(charges)
    usage = json.loads(openai_chat({**req, "stream_options": {"include_usage": True}})[2][-2][6:])
    assert not charge.estimated, charge.reason
    assert charge.input_tokens == usage["usage"]["prompt_tokens"]
    assert charge.output_tokens == usage["usage"]["completion_tokens"]
    # and through the SDK: the stream it iterates has no extra chunk
    client = openai.OpenAI(base_url=f"{url}/ai/openai", api_key=CLIENT_KEY, max_retries=0)
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT,
                                                 stream=True))  # fmt: skip
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    assert not settled(charges, 2)[1].estimated


def test_a_client_that_asks_for_usage_gets_the_usage_chunk(gateway: Any) -> None:
    _, url, charges = gateway
    client = openai.OpenAI(base_url=f"{url}/ai/openai", api_key=CLIENT_KEY, max_retries=0)
    chunks = list(client.chat.completions.create(
        model="gpt-4o-mini", messages=PROMPT, stream=True,
        stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    [charge] = settled(charges)
    assert charge.output_tokens == chunks[-1].usage.completion_tokens and not charge.estimated


def test_anthropic_sdk_json_and_stream(gateway: Any) -> None:
    fake, url, charges = gateway
    client = anthropic.Anthropic(base_url=f"{url}/ai/anthropic", api_key=CLIENT_KEY,
                                 max_retries=0)  # fmt: skip
    msg = client.messages.create(model="claude-haiku-4-5", max_tokens=5, messages=PROMPT)
    with client.messages.stream(model="claude-haiku-4-5", max_tokens=5, messages=PROMPT) as s:
        final = s.get_final_message()
    first, second = settled(charges, 2)
    for charge, m in ((first, msg), (second, final)):
        assert (charge.input_tokens, charge.output_tokens) == (m.usage.input_tokens,
                                                               m.usage.output_tokens)  # fmt: skip
        assert not charge.estimated
    for seen in fake.seen[-2:]:
        assert seen.headers["x-api-key"] == ANTHROPIC_KEY and "authorization" not in seen.headers
        assert seen.headers["anthropic-version"]


def test_gemini_stream_with_a_client_key_in_the_query(gateway: Any) -> None:
    fake, url, charges = gateway
    req = {"contents": [{"role": "user", "parts": [{"text": "hi there"}]}]}
    r = httpx.post(
        f"{url}/ai/gemini/v1beta/models/gemini-2.0-flash:streamGenerateContent",
        params={"alt": "sse", "key": CLIENT_KEY}, json=req,
        headers={"x-goog-api-key": CLIENT_KEY},
    )  # fmt: skip
    assert r.status_code == 200 and r.text.count("data:") == 2
    seen = fake.seen[-1]
    assert seen.query == "alt=sse" and seen.headers["x-goog-api-key"] == GEMINI_KEY
    [charge] = settled(charges)
    assert charge.output_tokens == 5 and not charge.estimated


def test_gzip_from_the_upstream_is_passed_through(gateway: Any) -> None:
    fake, url, charges = gateway
    fake.gzip = True
    r = httpx.post(f"{url}/ai/openai/chat/completions",
                   json={"model": "gpt-4o-mini", "messages": PROMPT})  # fmt: skip
    assert r.headers["content-encoding"] == "gzip" and r.json()["usage"]["completion_tokens"]
    [charge] = settled(charges)
    assert charge.output_tokens == r.json()["usage"]["completion_tokens"] and not charge.estimated


@pytest.mark.parametrize(
    "path",
    ["/ai/..%2f..%2fadmin", "/ai/http://127.0.0.1:6379/", "//evil/", "/ai/openai/%0d%0aX:1",
     "/ai/openai/..%2fv1/files"],
)  # fmt: skip
def test_ssrf_attempts_through_the_server_are_400_and_reach_nothing(
    gateway: Any, path: str
) -> None:
    fake, url, _ = gateway
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}".encode())
        head = s.recv(4096).decode("latin-1")
    assert head.split(" ", 2)[1] in ("400", "404"), head  # 404: the mount never matched
    assert fake.seen == []


def test_a_client_disconnect_closes_the_upstream_stream_and_settles_once(gateway: Any) -> None:
    fake, url, charges = gateway
    fake.delay = 0.2
    req = {"model": "gpt-4o-mini", "messages": PROMPT, "stream": True}
    with httpx.stream("POST", f"{url}/ai/openai/chat/completions", json=req) as r:
        it = r.iter_raw()
        next(it)
        gone = time.monotonic()
    deadline = time.monotonic() + 3
    while fake.stream_closed_at is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake.stream_closed_at is not None and fake.stream_closed_at - gone < 1.0
    assert fake.stream_chunks_sent < 12  # it did not run to the end
    charges_now = settled(charges, 1)
    time.sleep(0.3)
    assert len(charges_now) == 1 and charges_now[0].estimated


def test_upstream_timeouts_and_outages_are_504_and_502_in_openai_shape(
    provider: tuple[Provider, str],
) -> None:
    _, base = provider
    charges: list[Charge] = []
    config = policy(base, read_timeout=0.5)
    with ServerThread(asgi_gateway(config, charges)) as server:
        r = httpx.post(f"{server.url}/ai/slow/chat/completions",
                       json={"model": "m", "messages": PROMPT})  # fmt: skip
        assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
    dead = policy("http://127.0.0.1:9")
    with ServerThread(asgi_gateway(dead, charges)) as server:
        r = httpx.post(f"{server.url}/ai/openai/chat/completions",
                       json={"model": "m", "messages": PROMPT})  # fmt: skip
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unavailable"
        assert SERVER_KEY not in r.text


def test_the_policy_file_declares_the_proxy_and_its_ai_routes(tmp_path: Any) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(
        '[plans.free]\nlimits = [{ type = "requests", rate = "10/second" }]\n'
        '[proxy]\nmount = "/ai"\n'
        '[[proxy.upstreams]]\nname = "openai"\nprovider = "openai"\n'
        '[[proxy.upstreams.keys]]\nid = "primary"\nenv = "TEST_OPENAI_KEY"\n'
    )
    config = QuotaConfig.from_toml(path)
    assert config.proxy is not None
    route = config.ai_route("POST", "/ai/openai/chat/completions")
    assert route is not None and route.format == "openai-chat"
    assert config.ai_route("GET", "/ai/openai/models") is None
    assert AIProxy(path).config == config.proxy


# -- WSGI --------------------------------------------------------------------------------------


def test_wsgi_proxy_under_werkzeug(provider: tuple[Provider, str]) -> None:
    from werkzeug.middleware.dispatcher import DispatcherMiddleware
    from werkzeug.serving import make_server

    fake, base = provider
    charges: list[Charge] = []
    config = policy(base)

    def not_found(environ: Any, start_response: Any) -> list[bytes]:
        start_response("404 Not Found", [])
        return [b""]

    app = WSGIQuotaMiddleware(DispatcherMiddleware(not_found, {"/ai": WSGIAIProxy(config)}),
                              config=config, on_settle=charges.append)  # fmt: skip
    server = make_server("127.0.0.1", 0, app, threaded=True)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        client = openai.OpenAI(base_url=f"{url}/ai/openai", api_key=CLIENT_KEY, max_retries=0)
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT)
        chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT,
                                                     stream=True))  # fmt: skip
        assert all(c.choices for c in chunks)
        first, second = settled(charges, 2)
        assert first.output_tokens == reply.usage.completion_tokens and not first.estimated
        assert second.output_tokens == first.output_tokens and not second.estimated
        assert fake.seen[-1].headers["authorization"] == f"Bearer {SERVER_KEY}"
        r = httpx.post(f"{url}/ai/..%2fadmin", content=b"{}")
        assert r.status_code == 400
    finally:
        server.shutdown()
        t.join(5)


def test_anthropic_messages_fake_is_well_formed() -> None:
    # guards the fake itself: its stream ends with message_delta's final usage
    chunks = anthropic_messages({"messages": PROMPT, "stream": True, "max_tokens": 3})[2]
    assert b"message_delta" in chunks[-2] and b'"output_tokens":3' in chunks[-2]


def test_azure_and_ollama_upstreams() -> None:
    cfg = ProxyConfig(
        upstreams=[
            Upstream(name="az", provider="azure", base_url="https://res.openai.azure.com/openai",
                     api_version="2024-10-21", keys=[UpstreamKey(id="az", env="TEST_OPENAI_KEY")]),
            Upstream(name="local", provider="ollama"),
            Upstream(name="vllm", provider="openai-compatible", base_url="http://vllm:8000/v1"),
        ]
    )  # fmt: skip
    ring = KeyRing(cfg)

    def go(path: str, query: str = "") -> Outbound:
        out = plan_request(cfg, ring, method="POST", raw_path=path, query=query,
                           headers=[("api-key", CLIENT_KEY)], body=b"{}", metered=True)  # fmt: skip
        assert isinstance(out, Outbound), out
        return out

    az = go("/az/deployments/gpt4o/chat/completions")
    assert az.url == (
        "https://res.openai.azure.com/openai/deployments/gpt4o/chat/completions"
        "?api-version=2024-10-21"
    )
    assert dict(az.headers) == {"api-key": SERVER_KEY}
    assert go("/az/deployments/d/chat/completions", "api-version=2025-01-01").url.endswith(
        "?api-version=2025-01-01"
    )
    assert go("/az/v1/responses").endpoint.format == "openai-responses"
    local = go("/local/api/chat")
    assert local.url == "http://127.0.0.1:11434/api/chat" and local.headers == []
    assert local.endpoint.format == "ollama"
    assert go("/vllm/chat/completions").url == "http://vllm:8000/v1/chat/completions"
    derived = {(m, p): f for m, p, f in cfg.ai_endpoints()}
    assert derived[("POST", "/ai/az/deployments/*/chat/completions")] == "openai-chat"
    assert derived[("POST", "/ai/local/api/generate")] == "ollama"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "x", "provider": "azure"}, "base_url"),
        ({"name": "x", "provider": "openai", "base_url": "ftp://h/v1"}, "base_url"),
        ({"name": "x", "provider": "openai", "base_url": "https://u:p@h/v1"}, "base_url"),
        ({"name": "x", "provider": "nope"}, "provider"),
        ({"name": "bad name", "provider": "openai"}, "name"),
        ({"name": "x", "provider": "openai", "allow": ["FETCH x"]}, "allow"),
    ],
)
def test_bad_upstream_values_are_configuration_errors(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError, match=field):
        Upstream(**kwargs)


def test_http2_without_h2_is_a_startup_error() -> None:
    import importlib.util

    if importlib.util.find_spec("h2") is not None:
        pytest.skip("h2 is installed here")
    cfg = ProxyConfig(upstreams=[Upstream(name="o", provider="openai")], http2=True)
    with pytest.raises(ConfigurationError, match="http2"):
        AIProxy(cfg)


def test_wsgi_proxy_closes_the_upstream_when_the_client_goes_away(
    provider: tuple[Provider, str],
) -> None:
    from werkzeug.serving import make_server

    fake, base = provider
    fake.delay = 0.2
    charges: list[Charge] = []
    config = policy(base)
    app = WSGIQuotaMiddleware(WSGIAIProxy(proxy_config(base, mount="")), config=config,
                              on_settle=charges.append)  # fmt: skip
    server = make_server("127.0.0.1", 0, app, threaded=True)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        req = {"model": "gpt-4o-mini", "messages": PROMPT, "stream": True}
        url = f"http://127.0.0.1:{server.server_port}/openai/chat/completions"
        with httpx.stream("POST", url, json=req) as r:
            next(r.iter_raw())
            gone = time.monotonic()
        deadline = time.monotonic() + 5
        while fake.stream_closed_at is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fake.stream_closed_at is not None
        assert fake.stream_closed_at - gone < 2.0  # at the first write that fails
        assert fake.stream_chunks_sent < 12
    finally:
        server.shutdown()
        t.join(5)


def test_gemini_json_through_the_mounted_proxy(gateway: Any) -> None:
    fake, url, charges = gateway
    req = {"contents": [{"role": "user", "parts": [{"text": "hi there"}]}]}
    r = httpx.post(f"{url}/ai/gemini/v1beta/models/gemini-2.0-flash:generateContent", json=req,
                   headers={"authorization": f"Bearer {CLIENT_KEY}"})  # fmt: skip
    assert r.status_code == 200
    meta = r.json()["usageMetadata"]
    [charge] = settled(charges)
    assert (charge.input_tokens, charge.output_tokens) == (
        meta["promptTokenCount"], meta["candidatesTokenCount"])  # fmt: skip
    assert charge.model == "gemini-2.0-flash" and not charge.estimated
    assert fake.seen[-1].headers["x-goog-api-key"] == GEMINI_KEY
    assert "authorization" not in fake.seen[-1].headers
