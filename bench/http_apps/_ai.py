"""The AI route: a pure ASGI app answering ``POST /v1/chat/completions`` with the fake OpenAI
upstream (``examples/fake_upstream.handle``, no delay): one JSON body, or one SSE event per
``http.response.body`` message when the request says ``"stream": true``."""

from __future__ import annotations

import os
import sys
from typing import Any

os.environ.setdefault("FAKE_UPSTREAM_DELAY_MS", "0")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))

from fake_upstream import handle  # noqa: E402


async def ai_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":  # lifespan
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})
        return
    body = b""
    more = True
    while more:
        msg = await receive()
        body += msg.get("body", b"")
        more = msg.get("more_body", False)
    resp = handle(scope["method"], scope["path"], body)
    headers = [(b"content-type", resp.content_type.encode())]
    if not resp.stream:
        headers.append((b"content-length", str(len(resp.body)).encode()))
    await send({"type": "http.response.start", "status": resp.status, "headers": headers})
    last = len(resp.chunks) - 1
    for i, chunk in enumerate(resp.chunks):
        await send({"type": "http.response.body", "body": chunk, "more_body": i < last})
