"""The misbehaving upstream (``tests/bad_upstream.py``) behind the middleware, for real servers
(uvicorn, gunicorn, werkzeug), with every settled charge appended to a JSON-lines file, so a
test reads what each request was charged across worker processes.

Environment: ``QM_TEST_URL`` (store), ``QM_TEST_TOKENS`` (daily token quota), ``QM_TEST_CHARGES``
(the charges file), ``QM_TEST_HARD_STOP=1``, ``QM_TEST_ON_ERROR`` (``open``/``closed``),
``QM_TEST_TIMEOUT`` and ``QM_TEST_BREAKER_RESET`` (seconds).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bad_upstream  # noqa: E402
from quota_middleware import (  # noqa: E402
    AIRoute,
    Charge,
    Plan,
    QuotaConfig,
    QuotaMiddleware,
    StorageConfig,
    TokenQuota,
    WSGIQuotaMiddleware,
)

_lock = threading.Lock()


def record(charge: Charge) -> None:
    path = os.environ.get("QM_TEST_CHARGES")
    if not path:
        return
    line = json.dumps({**charge.as_dict(), "pid": os.getpid()}) + "\n"
    with _lock, open(path, "a") as f:  # one write per line: whole lines across processes
        f.write(line)


def config() -> QuotaConfig:
    tokens = int(os.environ.get("QM_TEST_TOKENS", "100000000"))
    return QuotaConfig(
        plans=[
            Plan(
                name="p",
                limits=[TokenQuota(tokens=tokens, period="day", name="tpd")],
                hard_stop=os.environ.get("QM_TEST_HARD_STOP") == "1",
                on_error=os.environ.get("QM_TEST_ON_ERROR", "open"),  # type: ignore[arg-type]
            )
        ],
        ai_routes=[
            AIRoute(path="/v1/chat/completions", format="openai-chat"),
            AIRoute(path="/v1/messages", format="anthropic-messages"),
            AIRoute(path="/v1beta/models/*", format="gemini"),
        ],
        storage=StorageConfig(
            url=os.environ.get("QM_TEST_URL", "memory://"),
            timeout=float(os.environ.get("QM_TEST_TIMEOUT", "5.0")),
            breaker_reset=float(os.environ.get("QM_TEST_BREAKER_RESET", "2.0")),
        ),
    )


asgi_app = QuotaMiddleware(bad_upstream.asgi_app, config=config(), on_settle=record)
wsgi_app = WSGIQuotaMiddleware(bad_upstream.wsgi_app, config=config(), on_settle=record)
