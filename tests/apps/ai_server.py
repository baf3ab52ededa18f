"""The scripted AI upstream behind the middleware, for real servers (uvicorn / werkzeug).

Environment: ``QM_TEST_URL`` (store), ``QM_TEST_TOKENS`` (daily token quota) or
``QM_TEST_USD`` (daily budget), ``QM_TEST_LEASE`` (reservation lease, seconds).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ai_app  # noqa: E402
from quota_middleware import (  # noqa: E402
    AIRoute,
    Budget,
    Plan,
    QuotaConfig,
    QuotaMiddleware,
    StorageConfig,
    TokenQuota,
    WSGIQuotaMiddleware,
)


def config() -> QuotaConfig:
    limits: list[TokenQuota | Budget] = []
    if os.environ.get("QM_TEST_TOKENS"):
        limits.append(TokenQuota(tokens=int(os.environ["QM_TEST_TOKENS"]), name="tpd"))
    if os.environ.get("QM_TEST_USD"):
        limits.append(Budget(usd=float(os.environ["QM_TEST_USD"]), period="day", name="usd"))
    lease = float(os.environ.get("QM_TEST_LEASE", "600"))
    return QuotaConfig(
        plans=[Plan(name="p", limits=limits)],
        ai_routes=[AIRoute(path="/v1/chat/completions", format="openai-chat", lease=lease)],
        storage=StorageConfig(url=os.environ.get("QM_TEST_URL", "memory://"), timeout=5.0),
    )


asgi_app = QuotaMiddleware(ai_app.asgi_app, config=config())
wsgi_app = WSGIQuotaMiddleware(ai_app.wsgi_app, config=config())
