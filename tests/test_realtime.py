"""OpenAI Realtime metering through ``QuotaMiddleware`` on a real uvicorn server, with the
``websockets`` client, on the memory store and a real redis-server.

The app plays the Realtime server: it greets with ``session.created``, answers each client
``response.create`` with ``response.created``, transcript and audio deltas and a
``response.done`` carrying usage (text and audio apart, cached tokens), and on ``"speak"``
starts a response by itself (as server-side turn detection does). Each response is charged as
it completes, at the model's text and audio prices; a response cut short is charged from its
estimate; when the quota is spent the next response is refused (an ``error`` event for the
client, the app never sees the request) and a new connection is refused at its handshake.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from quota_middleware import AIRoute, Charge, Plan, QuotaConfig, TokenQuota, UsageReader
from quota_middleware.asgi import QuotaMiddleware
from quota_middleware.metering import Usage
from quota_middleware.metering.pricing import DEFAULT_PRICES, cost_micros
from test_websockets import serve, wait_for

try:
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect
except ImportError:  # pragma: no cover - test_websockets already fails under CI without it
    pytest.skip("websockets not installed", allow_module_level=True)

pytestmark = pytest.mark.timeout(60)
KINDS = [pytest.param("memory", marks=pytest.mark.memory),
         pytest.param("redis", marks=pytest.mark.redis)]  # fmt: skip
MODEL = "gpt-realtime"
USAGE = {
    "total_tokens": 1000, "input_tokens": 400, "output_tokens": 600,
    "input_token_details": {"text_tokens": 100, "audio_tokens": 300, "cached_tokens": 200,
                            "cached_tokens_details": {"text_tokens": 50, "audio_tokens": 150}},
    "output_token_details": {"text_tokens": 100, "audio_tokens": 500},
}  # fmt: skip


class RealtimeApp:
    """The app: what it received from clients, how its connections ended."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.app = Starlette(routes=[WebSocketRoute("/v1/realtime", self.endpoint)])
        self.n = 0

    async def respond(self, ws: WebSocket, *, done: bool = True) -> None:
        self.n += 1
        rid = f"resp_{self.n}"
        await ws.send_json({"type": "response.created", "response": {"id": rid}})
        for word in ("hello", " there", " friend"):
            await ws.send_json({"type": "response.output_audio_transcript.delta",
                                "response_id": rid, "delta": word})  # fmt: skip
            await ws.send_json({"type": "response.output_audio.delta", "response_id": rid,
                                "delta": "UklGRiQAAABXQVZFZm10IBAAAAABAAEA" * 20})  # fmt: skip
        if done:
            await ws.send_json({"type": "response.done", "response": {
                "id": rid, "object": "realtime.response", "status": "completed",
                "usage": USAGE}})  # fmt: skip

    async def endpoint(self, ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_json({"type": "session.created", "session": {"model": MODEL}})
        try:
            while True:
                text = await ws.receive_text()
                self.received.append(text)
                kind = json.loads(text).get("type")
                if kind == "response.create":
                    await self.respond(ws)
                elif kind == "speak":  # the server starts a response itself
                    await self.respond(ws)
                elif kind == "cut":  # a response the client will leave in the middle of
                    await self.respond(ws, done=False)
        except (WebSocketDisconnect, OSError):
            pass


def policy(tokens: int = 1_000_000) -> QuotaConfig:
    return QuotaConfig(
        plans=[Plan(name="free", limits=[TokenQuota(tokens=tokens, period="day")])],
        ai_routes=[
            AIRoute(
                path="/v1/realtime",
                format="openai-realtime",
                methods=["WEBSOCKET"],
                default_output_tokens=500,
            )
        ],  # fmt: skip
    )


@pytest.fixture
def served(backend: Any) -> Iterator[Callable[..., tuple[RealtimeApp, list[Charge], str, Any]]]:
    stack: list[Any] = []

    def make(config: QuotaConfig) -> tuple[RealtimeApp, list[Charge], str, Any]:
        app = RealtimeApp()
        charges: list[Charge] = []
        mw = QuotaMiddleware(app.app, config=config, backend=backend.async_(),
                             on_settle=charges.append)  # fmt: skip
        cm = serve(mw)
        base = cm.__enter__()
        stack.append(cm)
        return (
            app,
            charges,
            f"{base}/v1/realtime?model={MODEL}",
            UsageReader(config, backend.sync()),
        )

    yield make
    for cm in reversed(stack):
        cm.__exit__(None, None, None)


def events_until(ws: Any, kind: str) -> list[dict[str, Any]]:
    out = []
    while True:
        event = json.loads(ws.recv(timeout=5))
        out.append(event)
        if event["type"] == kind:
            return out


def used(reader: UsageReader) -> int:
    [quota] = reader.remaining("127.0.0.1")
    return quota.used


@pytest.mark.parametrize("backend_name", KINDS)
def test_each_response_is_charged_exactly_at_its_text_and_audio_prices(served: Any) -> None:
    app, charges, url, reader = served(policy())
    with connect(url, open_timeout=5) as ws:
        assert json.loads(ws.recv(timeout=5))["type"] == "session.created"
        for _ in range(2):
            ws.send(json.dumps({"type": "response.create"}))
            events_until(ws, "response.done")
        wait_for(lambda: len(charges) == 2)
    wait_for(lambda: used(reader) == 2000)
    usage = Usage(input_tokens=400, output_tokens=600, cached_tokens=200, audio_input_tokens=300,
                  cached_audio_tokens=150, audio_output_tokens=500)  # fmt: skip
    price = DEFAULT_PRICES[MODEL]
    for charge in charges:
        assert (charge.input_tokens, charge.output_tokens, charge.cached_tokens) == (400, 600, 200)
        assert charge.model == MODEL and not charge.estimated
        assert charge.cost_micros == cost_micros(usage, price)
    # audio is priced on its own: far above the same tokens as text
    text_only = cost_micros(Usage(input_tokens=400, output_tokens=600, cached_tokens=200), price)
    assert charges[0].cost_micros > 3 * text_only
    time.sleep(0.2)
    assert used(reader) == 2000  # the handshake's reservation was given back at the close
    assert len(charges) == 2 and len({c.request_id for c in charges}) == 2


@pytest.mark.parametrize("backend_name", KINDS)
def test_a_spent_quota_refuses_the_next_response_and_the_next_connection(served: Any) -> None:
    app, charges, url, reader = served(policy(tokens=2000))
    with connect(url, open_timeout=5) as ws:
        ws.recv(timeout=5)
        for _ in range(2):  # the second is admitted with what is left, and charged in full
            ws.send(json.dumps({"type": "response.create"}))
            events_until(ws, "response.done")
        ws.send(json.dumps({"type": "response.create"}))
        [error] = events_until(ws, "error")
        assert error["error"]["code"] == "insufficient_quota"
    wait_for(lambda: len(charges) == 2)
    assert [json.loads(t)["type"] for t in app.received] == ["response.create"] * 2
    with pytest.raises(InvalidStatus) as refused:
        with connect(url, open_timeout=5):
            pass
    assert refused.value.response.status_code in (403, 429)


@pytest.mark.parametrize("backend_name", KINDS)
def test_a_server_started_response_is_metered_and_refused_when_spent(served: Any) -> None:
    app, charges, url, reader = served(policy(tokens=1500))
    with connect(url, open_timeout=5) as ws:
        ws.recv(timeout=5)
        ws.send(json.dumps({"type": "speak"}))
        events_until(ws, "response.done")
        wait_for(lambda: len(charges) == 1)
        ws.send(json.dumps({"type": "speak"}))  # 1000 used + 501 held: no room for another
        [error] = events_until(ws, "error")
        assert error["error"]["code"] == "insufficient_quota"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert charges[0].output_tokens == 600 and not charges[0].estimated


@pytest.mark.parametrize("backend_name", KINDS)
def test_a_response_cut_short_by_a_disconnect_is_charged_an_estimate_once(served: Any) -> None:
    app, charges, url, reader = served(policy())
    with connect(url, open_timeout=5) as ws:
        ws.recv(timeout=5)
        ws.send(json.dumps({"type": "response.create"}))
        events_until(ws, "response.done")
        ws.send(json.dumps({"type": "cut"}))
        events_until(ws, "response.output_audio.delta")
    wait_for(lambda: len(charges) == 2)
    time.sleep(0.2)
    assert len(charges) == 2
    cut = charges[1]
    assert cut.estimated and cut.reason == "incomplete"
    assert cut.output_tokens >= 3  # at least the transcript it sent
    wait_for(lambda: used(reader) == 1000 + cut.input_tokens + cut.output_tokens)


def test_realtime_usage_parsing_and_audio_prices() -> None:
    from quota_middleware.metering._usage import UsageParser

    parser = UsageParser("openai-realtime", content_type="application/x-ndjson")
    parser.feed(json.dumps({"type": "session.created", "session": {"model": MODEL}}).encode())
    parser.feed(
        b"\n" + json.dumps({"type": "response.done", "response": {"usage": USAGE}}).encode()
    )
    usage = parser.finish()
    assert usage is not None and parser.complete
    assert (usage.input_tokens, usage.output_tokens, usage.cached_tokens) == (400, 600, 200)
    assert (usage.audio_input_tokens, usage.cached_audio_tokens, usage.audio_output_tokens) == (
        300, 150, 500)  # fmt: skip
    assert usage.model == MODEL
    # 50 text cached at 0.40, 50 plain text at 4, 150 audio at 32, 150 cached audio at 0.40,
    # 100 text out at 16, 500 audio out at 64 (USD per 1M)
    expected = 50 * 0.40 + 50 * 4 + 150 * 32 + 150 * 0.40 + 100 * 16 + 500 * 64
    assert cost_micros(usage, DEFAULT_PRICES[MODEL]) == round(expected)


# -- the proxy forwards a Realtime socket -----------------------------------------------------
class FakeRealtimeUpstream:
    """An OpenAI Realtime server (the ``websockets`` library) on a loopback port, in a thread:
    it records each handshake's path and headers, and answers ``response.create`` with a
    response and its usage."""

    def __init__(self) -> None:
        import asyncio

        from servers import free_port

        self.port = free_port()
        self.seen: list[tuple[str, dict[str, str], list[str]]] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import asyncio

        from websockets.asyncio.server import serve

        async def handler(ws: Any) -> None:
            req = ws.request
            self.seen.append((req.path, {k.lower(): v for k, v in req.headers.raw_items()},
                              list(req.headers.get_all("sec-websocket-protocol"))))  # fmt: skip
            await ws.send(json.dumps({"type": "session.created", "session": {"model": MODEL}}))
            async for text in ws:
                if json.loads(text).get("type") == "response.create":
                    await ws.send(json.dumps({"type": "response.created", "response": {}}))
                    await ws.send(json.dumps({"type": "response.done", "response": {
                        "status": "completed", "usage": USAGE}}))  # fmt: skip

        async def main() -> None:
            self.stop = asyncio.Event()
            async with serve(handler, "127.0.0.1", self.port, subprotocols=["realtime"]):
                self.ready.set()
                await self.stop.wait()

        self.loop.run_until_complete(main())
        self.loop.close()

    def __enter__(self) -> FakeRealtimeUpstream:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(10)


@pytest.mark.parametrize("backend_name", KINDS)
def test_the_proxy_forwards_a_realtime_socket_with_the_server_key_and_meters_it(
    backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from starlette.routing import Mount

    from quota_middleware.proxy import AIProxy, ProxyConfig, Upstream, UpstreamKey

    monkeypatch.setenv("RT_KEY", "sk-server-realtime-key")
    with FakeRealtimeUpstream() as upstream:
        proxy = ProxyConfig(upstreams=[Upstream(
            name="openai", provider="openai", base_url=f"http://127.0.0.1:{upstream.port}/v1",
            keys=[UpstreamKey(id="rt", env="RT_KEY")])])  # fmt: skip
        config = QuotaConfig(plans=[Plan(name="free", limits=[TokenQuota(tokens=10**6)])],
                             proxy=proxy)  # fmt: skip
        route = config.ai_route("WEBSOCKET", "/ai/openai/realtime")
        assert route is not None and route.format == "openai-realtime"
        charges: list[Charge] = []
        app = Starlette(routes=[Mount("/ai", app=AIProxy(config))])
        mw = QuotaMiddleware(app, config=config, backend=backend.async_(),
                             on_settle=charges.append)  # fmt: skip
        with serve(mw) as base:
            url = f"{base}/ai/openai/realtime?model={MODEL}"
            with connect(
                url,
                open_timeout=5,
                subprotocols=[
                    "realtime",  # type: ignore[list-item]
                    "openai-insecure-api-key.sk-client-secret",
                ],  # fmt: skip
                additional_headers={"Authorization": "Bearer sk-client-secret"},
            ) as ws:
                assert json.loads(ws.recv(timeout=5))["type"] == "session.created"
                ws.send(json.dumps({"type": "response.create"}))
                events_until(ws, "response.done")
                wait_for(lambda: len(charges) == 1)
        [(path, headers, protocols)] = upstream.seen
        assert path == f"/v1/realtime?model={MODEL}"
        assert headers["authorization"] == "Bearer sk-server-realtime-key"
        assert "sk-client-secret" not in json.dumps([headers, protocols])
        [charge] = charges
        assert (charge.input_tokens, charge.output_tokens) == (400, 600) and not charge.estimated
