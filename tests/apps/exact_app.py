"""A tiny app behind the middleware, served by real servers in the exactness tests.

Configured by environment: ``QM_TEST_URL`` (the store) and ``QM_TEST_BURST``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asgi_parts import lifespan  # noqa: E402
from quota_middleware import (  # noqa: E402
    Plan,
    QuotaConfig,
    QuotaMiddleware,
    RequestRate,
    WSGIQuotaMiddleware,
)
from quota_middleware.config import StorageConfig  # noqa: E402


def _config() -> QuotaConfig:
    burst = int(os.environ.get("QM_TEST_BURST", "50"))
    return QuotaConfig(
        # one token a day: refill is negligible for the length of the test
        plans=[Plan(name="p", limits=[RequestRate(rate="1/day", burst=burst, name="exact")])],
        storage=StorageConfig(url=os.environ.get("QM_TEST_URL", "memory://"), timeout=5.0),
    )


async def _asgi(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _wsgi(environ: Any, start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


asgi_app = QuotaMiddleware(_asgi, config=_config())
wsgi_app = WSGIQuotaMiddleware(_wsgi, config=_config())
