"""One scenario, two adapters: drive the ASGI and the WSGI middleware with the same calls.

``Harness.request`` returns a plain ``Reply`` whatever the adapter, so each limiter scenario is
written once and parametrized over ``adapter`` and ``backend``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from werkzeug.test import Client
from werkzeug.wrappers import Request as WRequest
from werkzeug.wrappers import Response as WResponse

from quota_middleware import QuotaConfig, QuotaMiddleware, WSGIQuotaMiddleware
from quota_middleware.core._engine import Decision
from quota_middleware.wsgi import ENVIRON_KEY


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: Any
    decision: Decision | None = None

    @property
    def retry_after(self) -> int | None:
        v = self.headers.get("retry-after")
        return None if v is None else int(v)


def _asgi_app(seen: list[Decision | None]) -> Starlette:
    async def echo(request: Request) -> JSONResponse:
        decision = request.state.quota
        seen.append(decision)
        return JSONResponse({"caller": decision.caller_id, "path": request.url.path})

    return Starlette(routes=[Route("/{path:path}", echo, methods=["GET", "POST"])])


def _wsgi_app(seen: list[Decision | None]) -> Callable[..., Any]:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        decision = environ.get(ENVIRON_KEY)
        seen.append(decision)
        req = WRequest(environ)
        body = json.dumps({"caller": decision.caller_id if decision else None, "path": req.path})
        return WResponse(body, content_type="application/json")(environ, start_response)

    return app


@dataclass
class Harness:
    adapter: str
    middleware: Any
    client: Any
    seen: list[Decision | None] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        adapter: str,
        backend: Any,
        config: QuotaConfig,
        clock: Callable[[], int] | None = None,
        **kwargs: Any,
    ) -> Harness:
        seen: list[Decision | None] = []
        if adapter == "asgi":
            mw = QuotaMiddleware(
                _asgi_app(seen), config=config, backend=backend.async_(), clock=clock, **kwargs
            )
            client: Any = TestClient(mw, client=("203.0.113.7", 50000))
            client.__enter__()
        else:
            mw = WSGIQuotaMiddleware(
                _wsgi_app(seen), config=config, backend=backend.sync(), clock=clock, **kwargs
            )
            client = Client(mw)
        return cls(adapter, mw, client, seen)

    def request(
        self, path: str = "/api", *, method: str = "GET", headers: dict[str, str] | None = None,
        client_ip: str = "203.0.113.7",
    ) -> Reply:  # fmt: skip
        headers = dict(headers or {})
        self.seen.clear()
        if self.adapter == "asgi":
            self.client._transport.client = (client_ip, 50000)
            r = self.client.request(method, path, headers=headers)
            raw = r.content
        else:
            r = self.client.open(
                path, method=method, headers=headers, buffered=True,
                environ_base={"REMOTE_ADDR": client_ip},
            )  # fmt: skip
            raw = r.data
        status, hdrs = r.status_code, {k.lower(): v for k, v in r.headers.items()}
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw
        return Reply(status, hdrs, body, self.seen[0] if self.seen else None)

    def close(self) -> None:
        if self.adapter == "asgi":
            self.client.__exit__(None, None, None)
