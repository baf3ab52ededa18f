"""Whatever an upstream sends back, the middleware relays it untouched, never raises, never
stalls, and still settles the request (estimated) — through both adapters."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quota_middleware import (
    AIRoute,
    Plan,
    QuotaConfig,
    QuotaMiddleware,
    TokenQuota,
    WSGIQuotaMiddleware,
)
from quota_middleware.backends.memory import MemoryBackend
from quota_middleware.reports import UsageReader

PATH = "/v1/chat/completions"
BODY = json.dumps(
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
).encode()
CONFIG = QuotaConfig(
    plans=[Plan(name="p", limits=[TokenQuota(tokens=10**9, name="tpd")])],
    ai_routes=[AIRoute(path=PATH, format="auto")],
)

content_types = st.sampled_from(
    ["text/event-stream", "application/json", "application/x-ndjson", "text/plain", "", "a/b;;"]
)
encodings = st.sampled_from([None, "gzip", "deflate", "br", "identity", "x-garbage"])
chunks = st.lists(st.binary(max_size=300), max_size=12)


def _headers(ctype: str, enc: str | None) -> list[tuple[bytes, bytes]]:
    h = [(b"content-type", ctype.encode())]
    if enc:
        h.append((b"content-encoding", enc.encode()))
    return h


def _asgi(parts: list[bytes], ctype: str, enc: str | None, status: int) -> tuple[bytes, int]:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": status,
                    "headers": _headers(ctype, enc)})  # fmt: skip
        for p in parts:
            await send({"type": "http.response.body", "body": p, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    backend = MemoryBackend()
    mw = QuotaMiddleware(app, config=CONFIG, backend=backend)
    out: list[bytes] = []

    async def main() -> None:
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                await asyncio.sleep(10)
            sent = True
            return {"type": "http.request", "body": BODY}

        async def send(m: dict[str, Any]) -> None:
            if m["type"] == "http.response.body":
                out.append(m.get("body", b""))

        scope = {"type": "http", "method": "POST", "path": PATH, "query_string": b"",
                 "headers": [(b"content-type", b"application/json")],
                 "client": ("192.0.2.1", 1)}  # fmt: skip
        await asyncio.wait_for(mw(scope, receive, send), 5)

    asyncio.run(main())
    return b"".join(out), _requests(backend)


def _wsgi(parts: list[bytes], ctype: str, enc: str | None, status: int) -> tuple[bytes, int]:
    def app(environ: Any, start_response: Any) -> Any:
        environ["wsgi.input"].read()
        start_response(f"{status} X", [(k.decode(), v.decode()) for k, v in _headers(ctype, enc)])
        return iter(parts)

    backend = MemoryBackend()
    mw = WSGIQuotaMiddleware(app, config=CONFIG, backend=backend)
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": PATH, "REMOTE_ADDR": "192.0.2.1",
               "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(BODY)),
               "wsgi.input": io.BytesIO(BODY)}  # fmt: skip
    result = mw(environ, lambda s, h, e=None: None)
    try:
        body = b"".join(result)
    finally:
        result.close()  # type: ignore[attr-defined]
    return body, _requests(backend)


def _requests(backend: MemoryBackend) -> int:
    records = UsageReader(CONFIG, backend).usage("192.0.2.1", days=1)
    return sum(r.requests for r in records)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks, content_types, encodings, st.sampled_from([200, 200, 500, 204]))
def test_garbage_responses_pass_through_and_settle(
    parts: list[bytes], ctype: str, enc: str | None, status: int
) -> None:
    for run in (_asgi, _wsgi):
        body, requests = run(parts, ctype, enc, status)
        assert body == b"".join(parts)  # relayed byte for byte
        assert requests == 1  # settled exactly once
