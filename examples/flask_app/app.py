"""Flask example: the same gateway as the FastAPI one, on WSGI.

Run from the repository root (see README.md next to this file)::

    flask --app examples/flask_app/app.py run --port 8001

Without ``OPENAI_BASE_URL`` the AI routes answer from the built-in fake upstream, in-process.
``QUOTA_POLICY`` names a policy file to use instead of ``policy.toml`` next to this file.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from flask import Flask, jsonify, request

from quota_middleware import QuotaConfig, WSGIQuotaMiddleware
from quota_middleware.proxy import WSGIAIProxy
from quota_middleware.selfservice import usage_blueprint
from quota_middleware.wsgi import ENVIRON_KEY

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


def create_app(config: QuotaConfig | None = None) -> Flask:
    app = Flask(__name__)
    flask_app = app.wsgi_app
    proxy = WSGIAIProxy(proxy_config(), transport=FakeOrRealTransport())

    def dispatch(environ: dict[str, Any], start_response: Any) -> Any:
        # Flask's own routes first; every other path goes to the backend proxy
        # (/v1/chat/completions, /v1/messages, ...), with the server's keys
        urls = app.url_map.bind_to_environ(environ)
        if urls.test(environ.get("PATH_INFO") or "/", environ.get("REQUEST_METHOD")):
            return flask_app(environ, start_response)
        return proxy(environ, start_response)

    quota = WSGIQuotaMiddleware(dispatch, config=config or load_policy())
    app.wsgi_app = quota  # type: ignore[method-assign]
    app.extensions["quota"] = quota  # for quota.reader() and quota.stats

    @app.get("/health")
    def health() -> Any:
        return {"status": "ok"}

    @app.get("/v1/me")
    def me() -> Any:
        return jsonify(describe(request.environ[ENVIRON_KEY]))

    # the caller's own usage and what is left (?days=N), read through the middleware's store
    app.register_blueprint(usage_blueprint(), url_prefix="/v1/usage")

    return app


app = create_app()
