"""WebSocket connections through ``QuotaMiddleware`` on a real uvicorn server (on a free loopback
port, in a thread; a subprocess for the killed worker), with the ``websockets`` client, on the
memory store and a real redis-server:

- the caller is identified at the handshake (JWT, API key, client IP) and the app reads the
  decision from the scope's state;
- a connection counts once on request-rate limits: the one over the limit is refused with the
  429 (status, headers, body) an HTTP request gets, before the app is called;
- a connection holds its concurrency slot for as long as it is open (renewed past its lease),
  gives it back when it closes, loses it to nobody while it lives, and a killed worker's slot
  comes back when its lease ends;
- the per-connection message rate closes the connection with 1008;
- without the server's ``websocket.http.response`` extension a refusal is a close code.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from quota_middleware import IdentityConfig, Plan, QuotaConfig, RequestRate
from quota_middleware.asgi import QuotaMiddleware
from quota_middleware.base._scripts import ScriptCall
from quota_middleware.config import AIRoute
from quota_middleware.core._decision import Decision
from quota_middleware.errors import ConfigurationError, QuotaError, StorageError
from quota_middleware.identity._apikeys import ApiKeyConfig
from quota_middleware.identity._identifier import JWTConfig
from quota_middleware.identity._keyformat import generate_key
from quota_middleware.limits import Concurrency
from servers import free_port, stop_process, wait_port

try:
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import ClientConnection, connect
except ImportError:  # pragma: no cover - the test extra installs it
    if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
        raise  # as conftest does for redis-server: under CI a missing client is an error
    pytest.skip("websockets not installed: pip install -e '.[test]'", allow_module_level=True)

pytestmark = pytest.mark.timeout(60)

KINDS = [
    pytest.param("memory", marks=pytest.mark.memory),
    pytest.param("redis", marks=pytest.mark.redis),
]
SECRET = "ws-test-secret-0123456789abcdef0123456789"
API_KEY = generate_key("qm")
#: short leases keep the tests fast; renewals run every third of one
LEASE = 0.6


# -- the app and the servers ----------------------------------------------------------------------
class EchoApp:
    """A Starlette app: ``/ws`` greets with the caller the middleware decided on, then echoes;
    ``/plain`` is an HTTP route under the same limits. It records every connection that reached
    it (its decision) and how each ended (the disconnect code)."""

    def __init__(self) -> None:
        self.calls: list[Decision] = []
        self.ended: list[int] = []
        self.app = Starlette(routes=[WebSocketRoute("/ws", self.echo), Route("/plain", self.plain)])

    async def echo(self, ws: WebSocket) -> None:
        decision: Decision = ws.state.quota
        self.calls.append(decision)
        await ws.accept()
        caller = decision.caller
        await ws.send_json({"caller": decision.caller_id, "plan": decision.plan,
                            "source": caller.source if caller else None})  # fmt: skip
        try:
            while True:
                await ws.send_text(await ws.receive_text())
        except WebSocketDisconnect as e:
            self.ended.append(e.code)

    async def plain(self, request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")


@contextmanager
def serve(asgi: Any) -> Iterator[str]:
    """``asgi`` on a real uvicorn server in a thread (its own loop); yields its ws:// base."""
    port = free_port()
    config = uvicorn.Config(asgi, host="127.0.0.1", port=port, ws="websockets-sansio",
                            lifespan="off", log_level="warning")  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"ws://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def policy(*limits: Any, identity: IdentityConfig | None = None, **plan: Any) -> QuotaConfig:
    kw: dict[str, Any] = {} if identity is None else {"identity": identity}
    return QuotaConfig(plans=[Plan(name="free", limits=list(limits), **plan)], **kw)


@pytest.fixture
def served(backend: Any) -> Iterator[Callable[..., tuple[EchoApp, QuotaMiddleware, str]]]:
    """``served(config, **middleware_kw)`` -> (the app, the middleware, the server's ws:// base),
    on the test's backend; every server is stopped at teardown."""
    stack: list[Any] = []

    def make(config: QuotaConfig, **kw: Any) -> tuple[EchoApp, QuotaMiddleware, str]:
        app = EchoApp()
        mw = QuotaMiddleware(app.app, config=config, backend=backend.async_(), **kw)
        cm = serve(mw)
        base = cm.__enter__()
        stack.append(cm)
        return app, mw, base

    yield make
    for cm in reversed(stack):
        cm.__exit__(None, None, None)


@contextmanager
def greet(url: str, **headers: str) -> Iterator[tuple[ClientConnection, dict[str, Any]]]:
    """A connection to ``url`` and the app's greeting (what it was told about the caller)."""
    with connect(url, additional_headers=headers, open_timeout=5) as ws:
        yield ws, json.loads(ws.recv(timeout=5))


def refused(url: str, **headers: str) -> Any:
    """The HTTP response a refused handshake got (fails if the connection was accepted)."""
    with pytest.raises(InvalidStatus) as info:
        with connect(url, additional_headers=headers, open_timeout=5):
            pass
    return info.value.response


def admitted_within(url: str, seconds: float) -> float:
    """Seconds until a connection to ``url`` is admitted (tried every 50 ms), closing it."""
    start = time.monotonic()
    while True:
        try:
            with greet(url):
                return time.monotonic() - start
        except InvalidStatus:
            assert time.monotonic() - start < seconds, f"still refused after {seconds} s"
            time.sleep(0.05)


def wait_for(check: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# -- identification at the handshake --------------------------------------------------------------
@pytest.mark.parametrize("backend_name", KINDS)
def test_the_caller_is_identified_at_the_handshake(served: Any) -> None:
    identity = IdentityConfig(
        jwt=JWTConfig(algorithms=["HS256"], secret=SECRET),
        api_keys=ApiKeyConfig(static={API_KEY: {"caller": "bob", "plan": "pro"}}),
    )
    config = QuotaConfig(
        plans=[Plan(name="free", limits=[RequestRate(rate="50/minute", name="rpm")]),
               Plan(name="pro", limits=[RequestRate(rate="100/minute", name="rpm")])],
        identity=identity,
    )  # fmt: skip
    app, _, base = served(config)
    token = jwt.encode({"sub": "alice", "plan": "pro", "exp": int(time.time()) + 60}, SECRET)
    seen = []
    for headers in ({"Authorization": f"Bearer {token}"}, {"X-API-Key": API_KEY}, {}):
        with greet(base + "/ws", **headers) as (ws, hello):
            # the accept carries the RateLimit headers, as an admitted HTTP response does
            assert ws.response is not None and '"rpm";r=' in ws.response.headers["ratelimit"]
            seen.append(hello)
    assert seen == [
        {"caller": "alice", "plan": "pro", "source": "jwt"},
        {"caller": "bob", "plan": "pro", "source": "api_key"},
        {"caller": "127.0.0.1", "plan": "free", "source": "ip"},
    ]
    # the decision the app read is the middleware's (scope["state"]["quota"])
    assert [d.caller_id for d in app.calls] == ["alice", "bob", "127.0.0.1"]
    assert all(d.allowed and d.limited for d in app.calls)


@pytest.mark.parametrize("backend_name", KINDS)
def test_a_denied_handshake_never_reaches_the_app(served: Any) -> None:
    identity = IdentityConfig(jwt=JWTConfig(algorithms=["HS256"], secret=SECRET),
                              anonymous="reject")  # fmt: skip
    app, mw, base = served(policy(RequestRate(rate="5/minute", name="rpm"), identity=identity))
    missing = refused(base + "/ws")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == 'Bearer realm="api"'
    bad = jwt.encode({"sub": "mallory", "exp": int(time.time()) + 60}, "another-secret-" * 3)
    invalid = refused(base + "/ws", Authorization=f"Bearer {bad}")
    assert invalid.status_code == 401
    assert json.loads(invalid.body)["error"]["code"] == "invalid_credentials"
    assert app.calls == [] and mw.stats["unauthenticated"] == 2


# -- request-rate limits count connections ------------------------------------------------------
@pytest.mark.parametrize("backend_name", KINDS)
def test_the_connection_over_the_request_rate_is_refused_with_the_http_429(served: Any) -> None:
    app, mw, base = served(policy(RequestRate(rate="3/minute", name="rpm")))
    for _ in range(3):
        with greet(base + "/ws") as (ws, _):
            ws.send("ping")
            # messages are not requests: the limit counts connections alone
            assert ws.recv(timeout=5) == "ping"
    denial = refused(base + "/ws")
    assert denial.status_code == 429
    assert len(app.calls) == 3, "the refused connection reached the app"
    assert mw.stats["denied_rate"] == 1
    # the very denial an HTTP request gets now: same status, headers and body
    http = httpx.get(base.replace("ws://", "http://") + "/plain")
    assert http.status_code == 429
    assert json.loads(denial.body) == http.json()
    assert json.loads(denial.body)["error"]["code"] == "rate_limit_exceeded"
    for name in ("ratelimit-policy", "ratelimit", "retry-after", "content-type"):
        assert denial.headers[name] == http.headers[name], name


# -- concurrency: a slot for the whole connection ------------------------------------------------
@pytest.mark.parametrize("backend_name", KINDS)
def test_a_slot_is_held_while_connected_past_its_lease(served: Any) -> None:
    app, mw, base = served(policy(Concurrency(max=1, lease=LEASE)))
    url = base + "/ws"
    with greet(url) as (first, _):
        # three leases later the slot is still held: the open connection renewed it
        time.sleep(3 * LEASE)
        denial = refused(url)
        assert denial.status_code == 429
        assert json.loads(denial.body)["error"]["limit"] == "inflight"
        first.send("still here")
        assert first.recv(timeout=5) == "still here"
    assert len(app.calls) == 1 and mw.stats["denied_concurrency"] == 1


@pytest.mark.parametrize("backend_name", KINDS)
def test_a_slot_is_freed_when_the_connection_closes(served: Any) -> None:
    # a lease far longer than the test: only the close (the settle) can give the slot back
    app, mw, base = served(policy(Concurrency(max=1, lease=60)))
    url = base + "/ws"
    with greet(url):
        assert refused(url).status_code == 429
    admitted_within(url, 5)
    with greet(url):  # and the one admitted holds it in turn
        assert refused(url).status_code == 429
    assert len(app.calls) == 3 and app.ended[0] == 1000


@pytest.mark.parametrize("backend_name", KINDS)
def test_a_lost_slot_closes_the_connection_with_1013(served: Any, backend: Any) -> None:
    app, mw, base = served(policy(Concurrency(max=1, lease=LEASE)))
    with greet(base + "/ws") as (ws, _):
        (hold,) = app.calls[0].holds
        rid = app.calls[0].request_id
        # as if the connection's lease had lapsed (a stalled worker) and another connection
        # took the room: the next renewal finds no slot and no room for one
        far = int(time.time() * 1e6) + 60_000_000
        if backend.name == "memory":
            store = backend.sync().store
            store.zrem(hold.key, rid)
            store.zadd(hold.key, far, "someone-else")
        else:
            client = backend.sync_client()
            client.zrem(hold.key, rid)
            client.zadd(hold.key, {"someone-else": far})
            client.close()
        with pytest.raises(ConnectionClosed) as info:
            while True:
                ws.recv(timeout=5)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1013
    wait_for(lambda: app.ended == [1013])
    assert mw.stats["slot_lost"] == 1


@pytest.mark.parametrize("backend_name", [pytest.param("redis", marks=pytest.mark.redis)])
def test_a_killed_workers_slot_comes_back_after_its_lease(
    served: Any, backend: Any, tmp_path: Path
) -> None:
    """A worker SIGKILLed with a connection open never settles it: its slot stays leased until
    the lease ends (renewals stopped with the process), then the next admit sweeps it."""
    lease = 1.5
    (tmp_path / "ws_worker.py").write_text(textwrap.dedent(f"""
        import os

        from starlette.applications import Starlette
        from starlette.routing import WebSocketRoute
        from quota_middleware import Plan, QuotaConfig
        from quota_middleware.asgi import QuotaMiddleware
        from quota_middleware.config import StorageConfig
        from quota_middleware.limits import Concurrency

        async def echo(ws):
            await ws.accept()
            await ws.send_json({{"caller": ws.state.quota.caller_id, "pid": os.getpid()}})
            while True:
                await ws.send_text(await ws.receive_text())

        config = QuotaConfig(plans=[Plan(name="free", limits=[Concurrency(max=1, lease={lease})])],
                             storage=StorageConfig(url={backend.url!r}))
        app = QuotaMiddleware(Starlette(routes=[WebSocketRoute("/ws", echo)]), config=config)
    """))  # fmt: skip
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    env.pop("QUOTA_REDIS_URL", None)
    cmd = [sys.executable, "-m", "uvicorn", "ws_worker:app", "--host", "127.0.0.1",
           "--port", str(port), "--ws", "websockets-sansio", "--lifespan", "off",
           "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(port, proc)
        # the other "worker": this process, on the same Redis and policy
        _, _, base = served(policy(Concurrency(max=1, lease=lease)))
        with greet(f"ws://127.0.0.1:{port}/ws") as (worker_ws, hello):
            assert hello["pid"] == proc.pid
            time.sleep(lease * 1.5)  # renewed by the worker: still held after its first lease
            assert refused(base + "/ws").status_code == 429
            proc.kill()
            proc.wait(10)
            killed = time.monotonic()
            # nobody gave it back: still leased (the last renewal was at most a third of a
            # lease ago)
            assert refused(base + "/ws").status_code == 429
            admitted_within(base + "/ws", lease + 2)
            back = time.monotonic() - killed
            assert back <= lease + 0.5, back
            worker_ws.close_socket()  # its server is gone: no closing handshake
    finally:
        if proc.poll() is None:
            stop_process(proc)
        if proc.stderr is not None:
            proc.stderr.close()


# -- the message rate ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend_name", KINDS)
def test_the_message_rate_closes_the_connection_with_1008(served: Any) -> None:
    app, mw, base = served(policy(Concurrency(max=1, lease=LEASE)),
                           websocket_message_rate="5/minute")  # fmt: skip
    with greet(base + "/ws") as (ws, _):
        for i in range(5):  # the burst
            ws.send(f"m{i}")
            assert ws.recv(timeout=5) == f"m{i}"
        ws.send("one too many")
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=5)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1008
    assert info.value.rcvd.reason == "message rate exceeded"
    wait_for(lambda: app.ended == [1008])  # the app saw the disconnect, not the message
    assert mw.stats["message_rate_closed"] == 1
    # per connection: the next one (admitted, the slot given back) has its own burst
    with greet(base + "/ws") as (ws, _):
        for i in range(5):
            ws.send(f"n{i}")
            assert ws.recv(timeout=5) == f"n{i}"


# -- without the websocket.http.response extension: close codes -----------------------------------
class DownBackend:
    """A store that never answers."""

    inline = False

    async def run_async(self, call: ScriptCall) -> Any:
        raise StorageError("connection refused")

    async def aclose(self) -> None:
        pass


def handshake(mw: QuotaMiddleware, *texts: str) -> list[Any]:
    """One connection driven by hand, as a server without the extension would: the connect,
    a message per text, the disconnect. Returns the messages the middleware sent."""
    scope = {"type": "websocket", "path": "/ws", "headers": [],
             "query_string": b"", "client": ("127.0.0.1", 50000), "subprotocols": [],
             "asgi": {"version": "3.0"}}  # fmt: skip
    inbox = [
        {"type": "websocket.connect"},
        *({"type": "websocket.receive", "text": t} for t in texts),
        {"type": "websocket.disconnect", "code": 1000},
    ]
    sent: list[Any] = []

    async def receive() -> Any:
        return inbox.pop(0)

    async def send(message: Any) -> None:
        sent.append(message)

    asyncio.run(mw(scope, receive, send))
    return sent


def test_without_the_extension_a_refusal_is_a_close_code_before_the_app() -> None:
    called: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        called.append(scope["path"])
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        await receive()

    mw = QuotaMiddleware(app, config=policy(RequestRate(rate="1/minute", name="rpm")))
    assert handshake(mw)[0]["type"] == "websocket.accept"
    assert handshake(mw) == [
        {"type": "websocket.close", "code": 4429, "reason": "429 Too Many Requests"}
    ]
    reject = IdentityConfig(jwt=JWTConfig(algorithms=["HS256"], secret=SECRET), anonymous="reject")
    mw = QuotaMiddleware(app, config=policy(identity=reject))
    assert handshake(mw) == [
        {"type": "websocket.close", "code": 4401, "reason": "401 Unauthorized"}
    ]
    closed = policy(RequestRate(rate="1/minute", name="rpm"), on_error="closed")
    mw = QuotaMiddleware(app, config=closed, backend=DownBackend())
    assert handshake(mw) == [
        {"type": "websocket.close", "code": 1013, "reason": "503 Service Unavailable"}
    ]
    assert called == ["/ws"]  # the one admitted connection


def test_after_the_middleware_closed_the_app_receives_the_disconnect_and_cannot_send() -> None:
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        while (message := await receive())["type"] == "websocket.receive":
            seen.append(message["text"])
        seen.append(message)
        try:
            await send({"type": "websocket.send", "text": "anyone there?"})
        except OSError as e:  # what a server raises for a send on a closed connection
            seen.append(type(e).__mro__[1:3])

    mw = QuotaMiddleware(app, config=policy(), websocket_message_rate="2/minute")
    sent = handshake(mw, "one", "two", "three", "four")
    assert seen == ["one", "two", {"type": "websocket.disconnect", "code": 1008},
                    (QuotaError, OSError)]  # fmt: skip
    closed = {"type": "websocket.close", "code": 1008, "reason": "message rate exceeded"}
    assert sent == [{"type": "websocket.accept"}, closed]  # "four" never reached the app


def test_websocket_settings_are_checked_at_construction() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover
        pass

    with pytest.raises(ConfigurationError, match="websocket_message_rate"):
        QuotaMiddleware(app, config=policy(), websocket_message_rate="fast")
    # a WebSocket AI route must be a Realtime one (only its server events are metered), and a
    # Realtime route must be a WebSocket one
    route = AIRoute(path="/v1/realtime", methods=["WEBSOCKET"])
    realtime = QuotaConfig(plans=[Plan(name="free")], ai_routes=[route])
    with pytest.raises(ConfigurationError, match="only openai-realtime routes"):
        QuotaMiddleware(app, config=realtime)
    route = AIRoute(path="/v1/realtime", format="openai-realtime")
    realtime = QuotaConfig(plans=[Plan(name="free")], ai_routes=[route])
    with pytest.raises(ConfigurationError, match="routes need methods"):
        QuotaMiddleware(app, config=realtime)


# -- the renew script and its twin ----------------------------------------------------------------
def _admit_slot(rid: str, now: int, key: str = "qm:{t:a}:c:inflight") -> ScriptCall:
    return ScriptCall("admit", ("qm:{t:a}", key), (now, rid, 0, 1, "c", 2, "", 1, 10_000_000, 1, 1))


def _renew(rid: str, now: int, *keys: str) -> ScriptCall:
    keys = keys or ("qm:{t:a}:c:inflight",)
    args: list[Any] = [now, rid, len(keys)]
    for _ in keys:
        args += [1, 10_000_000]
    return ScriptCall("renew", keys, tuple(args))


def test_the_renew_script_matches_its_twin(twin_backends: Any) -> None:
    s = 1_000_000
    t0 = 1_700_000_000 * s
    other = "qm:{t:a}:c:other"
    steps = [
        (_admit_slot("A", t0), 1),
        (_renew("A", t0 + 5 * s), [1, 0]),  # A's slot now holds until t0 + 15 s
        (_admit_slot("B", t0 + 12 * s), 0),  # without the renewal A's lease ended at t0 + 10 s
        (_admit_slot("B", t0 + 16 * s), 1),  # A's lease ran out: swept, B takes the room
        (_renew("A", t0 + 17 * s), [0, 1]),  # A lost it and there is no room
        (_renew("B", t0 + 30 * s), [1, 0]),  # B's lapsed, but the room is free: taken again
        (_admit_slot("C", t0 + 31 * s, other), 1),
        (_renew("B", t0 + 32 * s, "qm:{t:a}:c:inflight", other), [0, 2]),  # all or nothing:
        (_admit_slot("D", t0 + 41 * s + 1), 1),  # B's first slot was not renewed at t0 + 32 s
        (_renew("D", t0 + 42 * s), [1, 0]),
    ]
    backends = twin_backends()
    for name in ("memory", "fakeredis", "real"):
        b = backends[name]
        for i, (call, expect) in enumerate(steps):
            reply = [int(v) for v in b.run(call)]
            got = reply[0] if call.name == "admit" else reply
            assert got == expect, (name, i, call, reply)
