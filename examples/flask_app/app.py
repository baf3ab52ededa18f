"""Flask example: the same gateway as the FastAPI one, on WSGI.

Run from the repository root (see README.md next to this file)::

    flask --app examples/flask_app/app.py run --port 8001

Without ``OPENAI_BASE_URL`` the AI routes answer from the built-in fake upstream, in-process.
``QUOTA_POLICY`` names a policy file to use instead of ``policy.toml`` next to this file.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from flask import Flask, Response, jsonify, request, stream_with_context

from quota_middleware import QuotaConfig, WSGIQuotaMiddleware
from quota_middleware.wsgi import ENVIRON_KEY

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
_fake = FakeUpstreamTransport()


def load_policy() -> QuotaConfig:
    """The policy in ``QUOTA_POLICY`` if set, else ``policy.toml`` next to this file."""
    ensure_demo_secret()  # demo-only default for DEMO_JWT_SECRET; set your own in production
    return QuotaConfig.from_toml(os.environ.get("QUOTA_POLICY") or POLICY_FILE)


def create_app(config: QuotaConfig | None = None) -> Flask:
    app = Flask(__name__)
    quota = WSGIQuotaMiddleware(app.wsgi_app, config=config or load_policy())
    app.wsgi_app = quota  # type: ignore[method-assign]
    app.extensions["quota"] = quota  # for quota.reader() and quota.stats

    @app.get("/health")
    def health() -> Any:
        return {"status": "ok"}

    @app.get("/v1/me")
    def me() -> Any:
        return jsonify(describe(request.environ[ENVIRON_KEY]))

    @app.get("/v1/usage")
    def usage() -> Any:
        """The caller's usage today (``?days=N``: the last N days) and what is left."""
        days = usage_days(request.args.get("days"))
        if days is None:
            return jsonify(error_body("days must be 1..35", "invalid_days")), 400
        decision = request.environ[ENVIRON_KEY]
        if decision.caller is None:  # the store was down when the caller was identified
            return jsonify(error_body("usage is unavailable", "unavailable")), 503
        caller = decision.caller
        reader = quota.reader()
        records = reader.usage(caller.id, tenant=caller.tenant, days=days, plan=decision.plan)
        left = reader.remaining(caller.id, tenant=caller.tenant, plan=decision.plan)
        return jsonify(usage_report(decision, records, left))

    @app.post("/v1/chat/completions")
    def chat_completions() -> Response:
        return forward("openai", "/chat/completions")

    @app.post("/v1/messages")
    def messages() -> Response:
        return forward("anthropic", "/messages")

    return app


def forward(kind: str, suffix: str) -> Response:
    """Relay the raw body with the server-side key; stream the answer back chunk by chunk,
    decoded when the upstream gzipped it anyway (see :func:`demo_common.relay_plan`)."""
    upstream = upstream_for(kind)
    transport = _fake if upstream.is_fake else None
    client = httpx.Client(transport=transport, timeout=httpx.Timeout(60, connect=5))
    req = client.build_request(
        "POST",
        upstream.url(suffix),
        content=request.get_data(),
        headers=forward_headers(list(request.headers.items()), upstream),
    )
    try:
        resp = client.send(req, stream=True)
    except httpx.HTTPError as e:
        client.close()
        body = {"error": {"message": f"upstream unreachable ({type(e).__name__})",
                          "type": "upstream_error", "code": "bad_gateway"}}  # fmt: skip
        return Response(jsonify(body).get_data(), status=502, content_type="application/json")

    plan = relay_plan(resp.headers)

    def relay() -> Iterator[bytes]:
        try:
            yield from resp.iter_bytes() if plan.decode else resp.iter_raw()
        finally:  # also when the client went away mid-stream (the server closes the iterator)
            resp.close()
            client.close()

    return Response(stream_with_context(relay()), status=resp.status_code, headers=plan.headers)


app = create_app()
