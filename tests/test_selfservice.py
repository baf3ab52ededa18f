"""The self-service usage app (ASGI) and blueprint (Flask): each caller sees only its own usage
and what is left, through the middleware's store, on memory and a real redis-server."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from quota_middleware import (
    AIRoute,
    Caller,
    IdentityConfig,
    Plan,
    QuotaConfig,
    QuotaMiddleware,
    StorageConfig,
    TokenQuota,
    WSGIQuotaMiddleware,
)
from quota_middleware.selfservice import UsageApp, usage_blueprint

pytest.importorskip("starlette")
flask = pytest.importorskip("flask")

CHAT = {"id": "c", "object": "chat.completion", "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"content": "hi"}}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}  # fmt: skip


def config(url: str) -> QuotaConfig:
    return QuotaConfig(
        plans=[Plan(name="free", limits=[TokenQuota(tokens=100_000, period="day")])],
        ai_routes=[AIRoute(path="/v1/chat/completions", format="openai-chat")],
        storage=StorageConfig(url=url, prefix="ss"), unpriced="tokens-only",
        identity=IdentityConfig(resolver=lambda info: Caller(id=info.headers.get("x-user", "anon"),
                                                             source="custom")),
    )  # fmt: skip


@pytest.fixture(params=["memory", "redis"])
def url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    server = request.getfixturevalue("redis_server")
    import redis

    redis.Redis.from_url(server.url).flushall()
    return str(server.url)


def test_the_asgi_app_answers_each_caller_its_own_usage(url: str) -> None:
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    async def chat(request: Any) -> JSONResponse:
        return JSONResponse(CHAT)

    inner = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                              Route("/v1/usage", UsageApp(), methods=["GET"])])  # fmt: skip
    client = TestClient(QuotaMiddleware(inner, config=config(url)))
    alice = {"x-user": "alice"}
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(2):
        assert client.post("/v1/chat/completions", json=body, headers=alice).status_code == 200
    mine = client.get("/v1/usage", headers=alice).json()
    assert mine["caller"] == "alice" and mine["plan"] == "free"
    [rec] = mine["usage"]
    assert (rec["model"], rec["requests"], rec["input_tokens"], rec["output_tokens"]) == (
        "gpt-4o-mini", 2, 7 * 2, 3 * 2)  # fmt: skip
    [left] = mine["remaining"]
    assert (left["limit"], left["used"], left["remaining"]) == (100_000, 20, 99_980)
    other = client.get("/v1/usage", headers={"x-user": "bob"}).json()
    assert other["caller"] == "bob" and other["usage"] == []
    bad = client.get("/v1/usage?days=99", headers=alice)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "days"
    assert client.get("/v1/usage?days=7", headers=alice).json()["totals"]["requests"] == 2


def test_the_asgi_app_outside_the_middleware_is_a_clear_error() -> None:
    sent: list[Any] = []

    async def send(m: Any) -> None:
        sent.append(m)

    scope = {"type": "http", "method": "GET", "query_string": b"", "state": {}}
    asyncio.run(UsageApp()(scope, None, send))  # type: ignore[arg-type]
    assert sent[0]["status"] == 500
    assert json.loads(sent[1]["body"])["error"]["code"] == "not_behind_the_middleware"


def test_the_flask_blueprint(url: str) -> None:
    app = flask.Flask(__name__)

    @app.post("/v1/chat/completions")
    def chat() -> Any:
        return CHAT

    app.register_blueprint(usage_blueprint(), url_prefix="/v1/usage")
    app.wsgi_app = WSGIQuotaMiddleware(app.wsgi_app, config=config(url))  # type: ignore[method-assign]
    client = app.test_client()
    alice = {"X-User": "alice"}
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    assert client.post("/v1/chat/completions", json=body, headers=alice).status_code == 200
    mine = client.get("/v1/usage", headers=alice).get_json()
    assert mine["caller"] == "alice" and mine["totals"]["input_tokens"] == 7
    assert client.get("/v1/usage?days=0", headers=alice).status_code == 400
    assert client.post("/v1/usage", headers=alice).status_code == 405
