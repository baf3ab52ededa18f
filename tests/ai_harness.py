"""What the AI-route tests share: a request body (:func:`chat`), its prompt estimate, a policy
(:func:`config`) and :class:`AIHarness`, which sends one AI request through the ASGI or the WSGI
adapter; and a memory backend that fails for some keys (:class:`FailingKeys`)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

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
from quota_middleware.backends.memory import MemoryBackend
from quota_middleware.base._request import Headers, RequestInfo
from quota_middleware.base._scripts import ScriptCall
from quota_middleware.errors import StorageError
from quota_middleware.metering._estimate import parse_request
from quota_middleware.reports import UsageReader

PATH = "/v1/chat/completions"


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


class FailingKeys(MemoryBackend):
    """A memory backend whose calls touching keys containing ``marker`` fail."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def run(self, call: ScriptCall) -> Any:
        if any(self.marker in k for k in call.keys) or call.name == self.marker:
            raise StorageError("down for this slot")
        return super().run(call)


def ai_info(body: bytes) -> RequestInfo:
    """An AI request on :data:`PATH` from 10.9.8.7, as an adapter hands it to the engine."""
    return RequestInfo("POST", PATH, Headers([("content-type", "application/json")]),
                       client="10.9.8.7", body=body)  # fmt: skip
