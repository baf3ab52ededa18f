"""The official ``openai`` and ``anthropic`` SDKs against the example apps served for real:
``examples/fastapi_app`` under uvicorn and ``examples/flask_app`` under werkzeug's threaded
server, each in a subprocess on a free loopback port, sharing a real redis-server, answering from
the in-process fake upstream.

What the SDK reports as usage is what the middleware charged, exactly (tokens and cost); a stream
without usage is charged from an estimate and marked so; a 429 surfaces as the SDK's
``RateLimitError``, is retried after ``Retry-After`` when it is about pace, and not retried when it
is ``insufficient_quota``.

The servers run the example policy plus the test-only plans in ``tests/data/sdk_plans.toml``
(``QUOTA_POLICY``), so a pace limit refills in 2 s and a token quota runs out after one request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from quota_middleware import (
    AIRoute,
    Plan,
    QuotaConfig,
    TokenQuota,
    UsageReader,
    UsageRecord,
    WSGIQuotaMiddleware,
)
from quota_middleware.backends.memory import MemoryBackend
from quota_middleware.backends.redis import SyncRedisBackend
from quota_middleware.metering._estimate import parse_request
from quota_middleware.metering._usage import Usage
from quota_middleware.metering.pricing import PriceTable, cost_micros
from servers import free_port, stop_process

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
pytest.importorskip("fastapi")
pytest.importorskip("flask")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))
import demo_common  # noqa: E402
import fake_upstream  # noqa: E402

pytestmark = pytest.mark.slow

GPT = "gpt-4o-mini"
CLAUDE = "claude-haiku-4-5"
PROMPT = [{"role": "user", "content": "Tell me something about rate limits"}]
#: environment the servers must not see: the examples would forward to a real provider
_PROVIDER_ENV = ("OPENAI_BASE_URL", "OPENAI_API_KEY", "ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY")


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    reader: UsageReader
    clients: list[Any] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def _policy_file(tmp: Path) -> Path:
    """The example policy (the same file for both apps) plus the test-only plans."""
    example = (EXAMPLES / "fastapi_app" / "policy.toml").read_text()
    extra = (Path(__file__).parent / "data" / "sdk_plans.toml").read_text()
    path = tmp / "policy.toml"
    path.write_text(example + "\n" + extra)
    return path


def _command(name: str, port: int) -> list[str]:
    if name == "fastapi":
        return [sys.executable, "-m", "uvicorn", "--app-dir", str(EXAMPLES), "fastapi_app.app:app",
                "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                "--log-level", "warning", "--no-access-log"]  # fmt: skip
    code = (
        f"import sys; sys.path.insert(0, {str(EXAMPLES)!r}); "
        "from flask_app.app import app; from werkzeug.serving import run_simple; "
        f"run_simple('127.0.0.1', {port}, app, threaded=True)"
    )
    return [sys.executable, "-c", code]


def _wait_healthy(server: Server) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=0.5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{server.name} did not start:\n{server.log_tail()}")


@contextlib.contextmanager
def _serving(
    name: str, tmp: Path, policy: Path, env: dict[str, str], client: Any
) -> Iterator[Server]:
    """Example app ``name`` served for real on a free port (log in ``tmp``), its usage read
    through ``client``; stopped and closed afterwards."""
    port = free_port()
    log = tmp / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            _command(name, port), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    reader = UsageReader(QuotaConfig.from_toml(policy), SyncRedisBackend(client))
    srv = Server(name, port, proc, log, reader)
    try:
        _wait_healthy(srv)
        yield srv
    finally:
        for c in srv.clients:
            c.close()
        stop_process(proc)
        client.close()


@pytest.fixture(scope="module", params=["fastapi", "flask"])
def server(
    request: pytest.FixtureRequest, redis_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    name: str = request.param
    tmp = tmp_path_factory.mktemp(f"sdk-{name}")
    policy = _policy_file(tmp)
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()  # the free plan's API-key callers have fixed ids: start them from full
    demo_common.ensure_demo_secret()  # the test signs the JWTs the server verifies
    env = {k: v for k, v in os.environ.items() if k not in _PROVIDER_ENV}
    env.update(
        QUOTA_POLICY=str(policy),
        QUOTA_REDIS_URL=redis_server.url,
        DEMO_JWT_SECRET=os.environ["DEMO_JWT_SECRET"],
        FAKE_UPSTREAM_DELAY_MS="1",
        PYTHONUNBUFFERED="1",
    )
    with _serving(name, tmp, policy, env, client) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _no_sdk_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The SDKs read these; the tests pass base_url and credentials explicitly.
    for name in (*_PROVIDER_ENV, "ANTHROPIC_AUTH_TOKEN", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID"):
        monkeypatch.delenv(name, raising=False)


def wsgi_settles_without_close() -> bool:
    """Whether :class:`WSGIQuotaMiddleware` charges a response once the server has iterated its
    body to the end, without waiting for ``close()``.

    Werkzeug's dev server calls ``close()`` only after draining the socket's read side
    (``werkzeug/serving.py``, ``execute``); when the client resets the connection right after the
    last byte, that read raises ``ConnectionResetError`` and ``close()`` is never called. The sync
    ``openai`` SDK does exactly that: on ``data: [DONE]`` it closes the response without reading
    the chunked terminator, so its kernel answers the terminator with RST. A middleware that
    settles only in ``close()`` then loses the charge (and holds the concurrency slot and the
    reservations until their leases end), at random, depending on timing.
    """
    body = json.dumps({"model": GPT, "messages": PROMPT, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()  # fmt: skip
    reply = fake_upstream.handle("POST", "/v1/chat/completions", body)

    def app(environ: Any, start_response: Any) -> Any:
        start_response("200 OK", [("content-type", reply.content_type)])
        return iter(reply.chunks)

    config = QuotaConfig(
        plans=[Plan(name="p", limits=[TokenQuota(tokens=1_000_000)])],
        ai_routes=[AIRoute(path="/v1/chat/completions", format="openai-chat")],
    )
    mw = WSGIQuotaMiddleware(app, config=config, backend=MemoryBackend())
    environ = {
        "REQUEST_METHOD": "POST", "PATH_INFO": "/v1/chat/completions", "QUERY_STRING": "",
        "SERVER_NAME": "test", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1", "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(body)), "wsgi.input": __import__("io").BytesIO(body),
        "wsgi.url_scheme": "http",
    }  # fmt: skip
    for _ in mw(environ, lambda status, headers, exc_info=None: None):  # never closed
        pass
    return bool(mw.reader().usage("127.0.0.1", days=1))


# -- helpers --------------------------------------------------------------------------------------
def _caller(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Attempts:
    """Every HTTP request the SDK sends and the status and time of every response it gets."""

    def __init__(self) -> None:
        self.sent: list[float] = []
        self.responses: list[tuple[float, int, dict[str, str]]] = []

    def on_request(self, request: Any) -> None:
        self.sent.append(time.monotonic())

    def on_response(self, response: Any) -> None:
        headers = {k.lower(): v for k, v in response.headers.items()}
        self.responses.append((time.monotonic(), response.status_code, headers))

    @property
    def statuses(self) -> list[int]:
        return [status for _, status, _ in self.responses]


def _openai(server: Server, api_key: str, *, max_retries: int = 0,
            attempts: Attempts | None = None) -> Any:  # fmt: skip
    http_client = None
    if attempts is not None:
        http_client = openai.DefaultHttpxClient(
            event_hooks={"request": [attempts.on_request], "response": [attempts.on_response]}
        )
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key,
                           max_retries=max_retries, http_client=http_client)  # fmt: skip
    server.clients.append(client)
    return client


def _anthropic(server: Server, api_key: str) -> Any:
    client = anthropic.Anthropic(base_url=server.url, api_key=api_key, max_retries=0)
    server.clients.append(client)
    return client


def _charged(server: Server, caller: str, plan: str, requests: int) -> UsageRecord:
    """The caller's one usage record today, once ``requests`` requests have settled (the charge
    lands right after the last byte is sent, so a fast client can read a moment before it)."""
    deadline = time.monotonic() + 5
    while True:
        records = server.reader.usage(caller, days=1, plan=plan)
        if sum(r.requests for r in records) >= requests or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert len(records) == 1, records
    assert records[0].requests == requests, records
    return records[0]


def _cost(model: str, usage: Usage) -> int:
    price = PriceTable().lookup(model)
    assert price is not None, model
    return cost_micros(usage, price)


def _usage_route(server: Server, auth: dict[str, str]) -> dict[str, Any]:
    r = httpx.get(f"{server.url}/v1/usage", headers=auth, timeout=10)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _as_route_record(rec: UsageRecord) -> dict[str, Any]:
    return {**dataclasses.asdict(rec), "cost_usd": rec.cost_usd}


def _openai_chat(client: Any, stream: bool) -> tuple[Any, str]:
    """One chat completion through the OpenAI SDK, JSON or streamed with usage: (usage, text)."""
    if not stream:
        completion = client.chat.completions.create(model=GPT, messages=PROMPT, max_tokens=25)
        return completion.usage, completion.choices[0].message.content or ""
    usage, text = None, ""
    for chunk in client.chat.completions.create(
        model=GPT, messages=PROMPT, max_tokens=25, stream=True,
        stream_options={"include_usage": True},
    ):  # fmt: skip
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        usage = chunk.usage or usage
    return usage, text


# -- openai: what the SDK sees is what was charged ------------------------------------------------
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream-include-usage"])
def test_openai_usage_is_charged_exactly(
    server: Server, stream: bool, request: pytest.FixtureRequest
) -> None:
    sub = _caller("oai")
    token = demo_common.make_token(sub, "pro")
    client = _openai(server, token)
    usage, text = _openai_chat(client, stream)
    assert usage is not None and text.startswith("This is a fake reply to: Tell me")
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    rec = _charged(server, sub, "pro", 1)
    assert (rec.model, rec.estimated) == (GPT, 0)
    assert (rec.input_tokens, rec.output_tokens, rec.cached_tokens) == (
        usage.prompt_tokens,
        usage.completion_tokens,
        cached or 0,
    )
    assert rec.output_tokens == 25  # the fake answers max_tokens words, one token each
    sdk = Usage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                cached_tokens=cached or 0)  # fmt: skip
    assert rec.cost_micros == _cost(GPT, sdk) > 0
    # the app's own route reports the same record, and the quota and budget it came out of
    report = _usage_route(server, {"authorization": f"Bearer {token}"})
    assert (report["caller"], report["plan"]) == (sub, "pro")
    assert report["usage"] == [_as_route_record(rec)]
    left = {q["name"]: q for q in report["remaining"]}
    assert left["tokens-day"]["used"] == usage.total_tokens == rec.total_tokens
    assert left["usd-month"]["used"] == rec.cost_micros


def test_openai_stream_without_usage_is_charged_exactly(
    server: Server, request: pytest.FixtureRequest
) -> None:
    """The examples' proxy asks the upstream for the usage the SDK did not ask for, and keeps
    that chunk from it: the SDK sees no usage and no extra chunk, the charge is exact."""
    sub = _caller("oai-est")
    client = _openai(server, demo_common.make_token(sub, "pro"))
    chunks = list(
        client.chat.completions.create(model=GPT, messages=PROMPT, max_tokens=25, stream=True)
    )
    assert chunks and all(c.usage is None and c.choices for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    rec = _charged(server, sub, "pro", 1)
    assert (rec.model, rec.requests, rec.estimated) == (GPT, 1, 0)
    req = {"model": GPT, "messages": PROMPT, "max_tokens": 25}
    exact = Usage(input_tokens=fake_upstream.prompt_tokens(req), output_tokens=25)
    assert (rec.input_tokens, rec.output_tokens) == (exact.input_tokens, exact.output_tokens)
    assert len(text.split()) == 25
    assert rec.cost_micros == _cost(GPT, exact)


# -- anthropic ------------------------------------------------------------------------------------
def _anthropic_charge(usage: Any) -> Usage:
    """Anthropic's ``input_tokens`` is the uncached part; ours counts every prompt token."""
    read = usage.cache_read_input_tokens or 0
    write = usage.cache_creation_input_tokens or 0
    return Usage(input_tokens=usage.input_tokens + read + write, output_tokens=usage.output_tokens,
                 cached_tokens=read, cache_write_tokens=write)  # fmt: skip


def test_anthropic_message_with_a_demo_api_key(server: Server) -> None:
    # anthropic 2.x sends api_key as "Authorization: Bearer"; the demo policy accepts its API keys
    # there as well as in X-API-Key.
    key = demo_common.DEMO_KEYS["svc-batch"]
    before = server.reader.usage("svc-batch", days=1, plan="free")
    assert before == []  # the fixture flushed the store
    client = _anthropic(server, key)
    msg = client.messages.create(model=CLAUDE, max_tokens=30, system="Be brief.", messages=PROMPT)
    assert msg.content[0].text.startswith("This is a fake reply")
    rec = _charged(server, "svc-batch", "free", 1)
    charge = _anthropic_charge(msg.usage)
    assert (rec.model, rec.estimated) == (CLAUDE, 0)
    assert (rec.input_tokens, rec.output_tokens) == (charge.input_tokens, charge.output_tokens)
    assert (rec.cached_tokens, rec.cache_write_tokens) == (0, 0)
    assert rec.cost_micros == _cost(CLAUDE, charge) > 0
    report = _usage_route(server, {"x-api-key": key})
    assert (report["caller"], report["plan"]) == ("svc-batch", "free")
    assert report["usage"] == [_as_route_record(rec)]


def test_anthropic_stream_with_a_jwt(server: Server, request: pytest.FixtureRequest) -> None:
    sub = _caller("claude")
    client = _anthropic(server, demo_common.make_token(sub, "pro"))
    with client.messages.stream(
        model=CLAUDE, max_tokens=30, system="Be brief.", messages=PROMPT
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text and final.usage.output_tokens == 30
    rec = _charged(server, sub, "pro", 1)
    charge = _anthropic_charge(final.usage)
    assert (rec.model, rec.estimated) == (CLAUDE, 0)
    assert (rec.input_tokens, rec.output_tokens) == (charge.input_tokens, charge.output_tokens)
    assert rec.cost_micros == _cost(CLAUDE, charge)


# -- 429s as the openai SDK sees them -------------------------------------------------------------
def test_rate_limit_error_then_retry_after_is_honoured(server: Server) -> None:
    token = demo_common.make_token(_caller("tight"), "tight")  # 1 request per 2 s
    no_retry = _openai(server, token)
    no_retry.chat.completions.create(model=GPT, messages=PROMPT, max_tokens=5)
    with pytest.raises(openai.RateLimitError) as info:
        no_retry.chat.completions.create(model=GPT, messages=PROMPT, max_tokens=5)
    error = info.value
    assert error.code == "rate_limit_exceeded" and error.status_code == 429
    assert isinstance(error.body, dict) and error.body["limit"] == "1-2s"
    retry_after = int(error.response.headers["retry-after"])
    assert 1 <= retry_after <= 2
    assert error.response.headers.get("x-should-retry") is None

    attempts = Attempts()
    retrying = _openai(server, token, max_retries=2, attempts=attempts)
    completion = retrying.chat.completions.create(model=GPT, messages=PROMPT, max_tokens=5)
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    assert attempts.statuses == [429, 200]
    (refused_at, _, refused), _ = attempts.responses
    waited = attempts.sent[1] - refused_at
    assert waited >= int(refused["retry-after"]) - 0.05, (waited, refused)
    assert waited < int(refused["retry-after"]) + 1.5


def test_insufficient_quota_is_not_retried(server: Server) -> None:
    sub = _caller("quota")
    token = demo_common.make_token(sub, "quota")  # 100 tokens a day
    attempts = Attempts()
    client = _openai(server, token, max_retries=2, attempts=attempts)
    first = client.chat.completions.create(model=GPT, messages=PROMPT, max_tokens=10)
    assert first.usage is not None
    used = first.usage.total_tokens
    # a prompt bigger than what is left, but not than the whole quota (that would be a 413)
    long_prompt = [{"role": "user", "content": "please count " + "one two three " * 26}]
    asks = parse_request(
        "openai-chat", json.dumps({"model": GPT, "messages": long_prompt}).encode()
    ).prompt_tokens
    assert 100 - used < asks and asks + 10 <= 100, (used, asks)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model=GPT, messages=long_prompt, max_tokens=10)
    error = info.value
    assert error.code == "insufficient_quota"
    assert isinstance(error.body, dict) and error.body["limit"] == "tokens-day"
    assert error.response.headers["x-should-retry"] == "false"
    assert int(error.response.headers["retry-after"]) >= 1
    # max_retries=2, yet the refused request was sent once
    assert attempts.statuses == [200, 429] and len(attempts.sent) == 2
    rec = _charged(server, sub, "quota", 1)  # only the first request was charged
    assert rec.total_tokens == used
    (left,) = server.reader.remaining(sub, plan="quota")
    assert (left.name, left.used, left.remaining) == ("tokens-day", used, 100 - used)


# -- the WSGI adapter and servers that skip close() -----------------------------------------------
def test_wsgi_settles_once_the_body_is_exhausted() -> None:
    assert wsgi_settles_without_close()


# -- a real upstream that gzips, configured the way each SDK is -----------------------------------
UPSTREAM_OPENAI_KEY = "sk-upstream-e2e-openai"
UPSTREAM_ANTHROPIC_KEY = "sk-ant-upstream-e2e"


@pytest.fixture(scope="module")
def gzip_upstream() -> Iterator[fake_upstream.LocalUpstream]:
    """The fake on a loopback port, gzipping every reply although asked for ``identity``."""
    with fake_upstream.LocalUpstream(delay=0.001, gzip=True) as upstream:
        yield upstream


@pytest.fixture(scope="module", params=["fastapi", "flask"])
def gzip_server(
    request: pytest.FixtureRequest,
    redis_server: Any,
    gzip_upstream: fake_upstream.LocalUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Server]:
    """An example app served for real, forwarding to ``gzip_upstream`` with
    ``OPENAI_BASE_URL=<host>/v1`` and ``ANTHROPIC_BASE_URL=<host>`` (the SDKs' conventions)."""
    name: str = request.param
    tmp = tmp_path_factory.mktemp(f"gzip-{name}")
    policy = _policy_file(tmp)
    demo_common.ensure_demo_secret()
    env = {k: v for k, v in os.environ.items() if k not in _PROVIDER_ENV}
    env.update(
        QUOTA_POLICY=str(policy),
        QUOTA_REDIS_URL=redis_server.url,
        DEMO_JWT_SECRET=os.environ["DEMO_JWT_SECRET"],
        OPENAI_BASE_URL=f"{gzip_upstream.url}/v1",
        OPENAI_API_KEY=UPSTREAM_OPENAI_KEY,
        ANTHROPIC_BASE_URL=gzip_upstream.url,
        ANTHROPIC_API_KEY=UPSTREAM_ANTHROPIC_KEY,
        PYTHONUNBUFFERED="1",
    )
    with _serving(name, tmp, policy, env, redis.Redis.from_url(redis_server.url)) as srv:
        yield srv


def _upstream_saw(upstream: fake_upstream.LocalUpstream, n: int) -> list[Any]:
    """The last ``n`` requests the upstream got, checked for the server's own credentials."""
    seen = upstream.requests[-n:]
    assert len(seen) == n
    for s in seen:
        if s.path == "/v1/messages":
            assert s.headers["x-api-key"] == UPSTREAM_ANTHROPIC_KEY
            assert "authorization" not in s.headers
        else:
            assert s.headers["authorization"] == f"Bearer {UPSTREAM_OPENAI_KEY}"
    return seen


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream-include-usage"])
def test_gzip_upstream_openai_sdk_gets_the_text_and_the_usage_is_charged_exactly(
    gzip_server: Server, gzip_upstream: fake_upstream.LocalUpstream, stream: bool
) -> None:
    sub = _caller("gz-oai")
    client = _openai(gzip_server, demo_common.make_token(sub, "pro"))
    usage, text = _openai_chat(client, stream)
    (seen,) = _upstream_saw(gzip_upstream, 1)
    assert seen.path == "/v1/chat/completions"
    body = json.dumps({"model": GPT, "messages": PROMPT, "max_tokens": 25}).encode()
    plain = json.loads(fake_upstream.handle("POST", "/v1/chat/completions", body).body)
    assert text == plain["choices"][0]["message"]["content"]
    assert usage is not None and usage.completion_tokens == 25
    assert usage.prompt_tokens == plain["usage"]["prompt_tokens"]
    rec = _charged(gzip_server, sub, "pro", 1)
    assert (rec.model, rec.estimated) == (GPT, 0)
    assert (rec.input_tokens, rec.output_tokens) == (usage.prompt_tokens, usage.completion_tokens)
    sdk = Usage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens)
    assert rec.cost_micros == _cost(GPT, sdk) > 0


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_gzip_upstream_anthropic_sdk_on_v1_messages_charged_exactly(
    gzip_server: Server, gzip_upstream: fake_upstream.LocalUpstream, stream: bool
) -> None:
    sub = _caller("gz-claude")
    client = _anthropic(gzip_server, demo_common.make_token(sub, "pro"))
    args: dict[str, Any] = {"model": CLAUDE, "max_tokens": 30, "system": "Be brief.",
                            "messages": PROMPT}  # fmt: skip
    if stream:
        with client.messages.stream(**args) as events:
            text = "".join(events.text_stream)
            msg = events.get_final_message()
    else:
        msg = client.messages.create(**args)
        text = msg.content[0].text
    # ANTHROPIC_BASE_URL is the host: the app asked for exactly /v1/messages
    (seen,) = _upstream_saw(gzip_upstream, 1)
    assert seen.path == "/v1/messages"
    plain = json.loads(fake_upstream.handle("POST", "/v1/messages", json.dumps(args).encode()).body)
    assert text == msg.content[0].text == plain["content"][0]["text"]
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (
        plain["usage"]["input_tokens"],
        30,
    )
    rec = _charged(gzip_server, sub, "pro", 1)
    charge = _anthropic_charge(msg.usage)
    assert (rec.model, rec.estimated) == (CLAUDE, 0)
    assert (rec.input_tokens, rec.output_tokens) == (charge.input_tokens, charge.output_tokens)
    assert rec.cost_micros == _cost(CLAUDE, charge) > 0


RAW_CHAT_SSE = {"model": GPT, "messages": PROMPT, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
RAW_MESSAGES = {"model": CLAUDE, "max_tokens": 20, "messages": PROMPT}


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        pytest.param("/v1/chat/completions", RAW_CHAT_SSE, id="chat-sse"),
        pytest.param("/v1/messages", RAW_MESSAGES, id="messages-json"),
    ],
)
def test_gzip_upstream_raw_httpx_gets_the_upstream_bytes_with_their_encoding(
    gzip_server: Server, gzip_upstream: fake_upstream.LocalUpstream, path: str, payload: Any
) -> None:
    """On the wire (no client-side decoding): the upstream's gzip bytes with their
    Content-Encoding (the proxy relays them as they came), and a Content-Length, if any, that
    is theirs; the middleware decodes them only to meter."""
    sub = _caller("gz-raw")
    auth = {"authorization": f"Bearer {demo_common.make_token(sub, 'pro')}"}
    body = json.dumps(payload).encode()
    headers = {**auth, "content-type": "application/json", "accept-encoding": "gzip"}
    with httpx.stream(
        "POST", f"{gzip_server.url}{path}", content=body, headers=headers, timeout=10
    ) as r:
        data = b"".join(r.iter_raw())
    assert r.status_code == 200, data
    assert r.headers["content-encoding"] == "gzip"
    assert r.headers.get("content-length", str(len(data))) == str(len(data))
    expected = fake_upstream.handle("POST", path, body)
    assert gzip.decompress(data) == expected.body
    assert r.headers["content-type"] == expected.content_type
    (seen,) = _upstream_saw(gzip_upstream, 1)
    assert seen.path == path
    # what the upstream reports for this request (the same in JSON and in the stream)
    plain = fake_upstream.handle("POST", path, json.dumps({**payload, "stream": False}).encode())
    u = json.loads(plain.body)["usage"]
    reported = (u["prompt_tokens"], u["completion_tokens"]) if "prompt_tokens" in u else (
        u["input_tokens"], u["output_tokens"])  # fmt: skip
    (rec,) = _usage_route(gzip_server, auth)["usage"]
    assert (rec["requests"], rec["estimated"]) == (1, 0)
    assert (rec["input_tokens"], rec["output_tokens"]) == reported
