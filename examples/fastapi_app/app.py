"""FastAPI example: an AI gateway with per-caller limits in one line.

Run from the repository root (see README.md next to this file)::

    uvicorn --app-dir examples fastapi_app.app:app --port 8000

Without ``OPENAI_BASE_URL`` the AI routes answer from the built-in fake upstream, in-process.
``QUOTA_POLICY`` names a policy file to use instead of ``policy.toml`` next to this file.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from quota_middleware import QuotaConfig, QuotaMiddleware

_EXAMPLES = str(Path(__file__).resolve().parents[1])  # examples/, for the shared modules
if _EXAMPLES not in sys.path:
    sys.path.insert(0, _EXAMPLES)
from demo_common import (  # noqa: E402
    describe,
    ensure_demo_secret,
    error_body,
    forward_headers,
    relay_plan,
    upstream_for,
    usage_days,
    usage_report,
)
from fake_upstream import FakeUpstreamTransport  # noqa: E402

POLICY_FILE = Path(__file__).with_name("policy.toml")


def load_policy() -> QuotaConfig:
    """The policy in ``QUOTA_POLICY`` if set, else ``policy.toml`` next to this file."""
    ensure_demo_secret()  # demo-only default for DEMO_JWT_SECRET; set your own in production
    return QuotaConfig.from_toml(os.environ.get("QUOTA_POLICY") or POLICY_FILE)


def create_app(config: QuotaConfig | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(60, connect=5)) as client:
            app.state.http = client
            yield

    app = FastAPI(title="quota-middleware FastAPI example", lifespan=lifespan)
    app.add_middleware(QuotaMiddleware, config=config or load_policy())

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/me")
    async def me(request: Request) -> dict[str, Any]:
        return describe(request.state.quota)

    @app.get("/v1/usage", response_model=None)
    async def usage(request: Request) -> dict[str, Any] | JSONResponse:
        """The caller's usage today (``?days=N``: the last N days) and what is left."""
        days = usage_days(request.query_params.get("days"))
        if days is None:
            return JSONResponse(error_body("days must be 1..35", "invalid_days"), 400)
        decision = request.state.quota
        if decision.caller is None:  # the store was down when the caller was identified
            return JSONResponse(error_body("usage is unavailable", "unavailable"), 503)
        caller = decision.caller
        reader = quota_middleware(request.app).reader()
        records = await reader.ausage(caller.id, tenant=caller.tenant, days=days,
                                      plan=decision.plan)  # fmt: skip
        left = await reader.aremaining(caller.id, tenant=caller.tenant, plan=decision.plan)
        return usage_report(decision, records, left)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await forward(request, "openai", "/chat/completions")

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        return await forward(request, "anthropic", "/messages")

    return app


def quota_middleware(app: FastAPI) -> QuotaMiddleware:
    """The app's :class:`QuotaMiddleware` instance, for its ``reader()``. ``add_middleware`` only
    records the class: Starlette builds the instance with the middleware stack at the first
    request, so it is looked up there (once) and kept in ``app.state.quota``."""
    found = getattr(app.state, "quota", None)
    if isinstance(found, QuotaMiddleware):
        return found
    layer: Any = app.middleware_stack
    while layer is not None and not isinstance(layer, QuotaMiddleware):
        layer = getattr(layer, "app", None)
    if layer is None:
        raise RuntimeError("no QuotaMiddleware on this app (or it has not served a request yet)")
    app.state.quota = layer
    return layer


_fake = FakeUpstreamTransport()


async def forward(request: Request, kind: str, suffix: str) -> Response:
    """Relay the raw body to the upstream with the server-side key, and stream the answer back
    chunk by chunk with the upstream's status and content type. A gzip/deflate answer is sent on
    decoded, without ``Content-Encoding`` (see :func:`demo_common.relay_plan`): the middleware
    meters what is sent, by the headers sent with it."""
    upstream = upstream_for(kind)
    if upstream.is_fake:
        client = httpx.AsyncClient(transport=_fake)
        owned = True
    elif getattr(request.app.state, "http", None) is not None:
        client, owned = request.app.state.http, False
    else:  # lifespan did not run (some test clients): one client for this request
        client, owned = httpx.AsyncClient(timeout=httpx.Timeout(60, connect=5)), True
    req = client.build_request(
        "POST",
        upstream.url(suffix),
        content=await request.body(),
        headers=forward_headers(list(request.headers.items()), upstream),
    )
    try:
        resp = await client.send(req, stream=True)
    except httpx.HTTPError as e:
        if owned:
            await client.aclose()
        body = {"error": {"message": f"upstream unreachable ({type(e).__name__})",
                          "type": "upstream_error", "code": "bad_gateway"}}  # fmt: skip
        return JSONResponse(body, status_code=502)

    plan = relay_plan(resp.headers)

    async def relay() -> AsyncIterator[bytes]:
        try:
            async for chunk in resp.aiter_bytes() if plan.decode else resp.aiter_raw():
                yield chunk
        finally:  # also when the client went away mid-stream
            await resp.aclose()
            if owned:
                await client.aclose()

    return StreamingResponse(relay(), status_code=resp.status_code, headers=plan.headers)


app = create_app()
