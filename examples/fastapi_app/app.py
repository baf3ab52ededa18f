"""FastAPI example: an AI gateway with per-caller limits in one line.

Run from the repository root (see README.md next to this file)::

    uvicorn --app-dir examples fastapi_app.app:app --port 8000

Without ``OPENAI_BASE_URL`` the AI routes answer from the built-in fake upstream, in-process.
``QUOTA_POLICY`` names a policy file to use instead of ``policy.toml`` next to this file.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request

from quota_middleware import QuotaConfig, QuotaMiddleware
from quota_middleware.proxy import AIProxy
from quota_middleware.selfservice import UsageApp

_EXAMPLES = str(Path(__file__).resolve().parents[1])  # examples/, for the shared modules
if _EXAMPLES not in sys.path:
    sys.path.insert(0, _EXAMPLES)
from demo_common import (  # noqa: E402
    describe,
    ensure_demo_secret,
    proxy_config,
)
from fake_upstream import FakeOrRealTransport  # noqa: E402

POLICY_FILE = Path(__file__).with_name("policy.toml")


def load_policy() -> QuotaConfig:
    """The policy in ``QUOTA_POLICY`` if set, else ``policy.toml`` next to this file."""
    ensure_demo_secret()  # demo-only default for DEMO_JWT_SECRET; set your own in production
    return QuotaConfig.from_toml(os.environ.get("QUOTA_POLICY") or POLICY_FILE)


def create_app(config: QuotaConfig | None = None) -> FastAPI:
    app = FastAPI(title="quota-middleware FastAPI example")
    app.add_middleware(QuotaMiddleware, config=config or load_policy())

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/me")
    async def me(request: Request) -> dict[str, Any]:
        return describe(request.state.quota)

    # the caller's own usage and what is left (?days=N), read through the middleware's store
    app.add_route("/v1/usage", UsageApp(), methods=["GET"])

    # Every other path goes to the backend proxy: /v1/chat/completions (and the rest of the
    # OpenAI API) and /v1/messages, with the server's keys, metered by the middleware above.
    app.mount("/", AIProxy(proxy_config(), transport=FakeOrRealTransport()))
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


app = create_app()
