"""A scripted OpenAI-compatible upstream, as an ASGI and a WSGI app with identical output.

The request body says what to answer: ``x_prompt`` / ``x_completion`` set the usage the
"provider" reports, ``stream`` / ``stream_options.include_usage`` pick SSE with or without a usage
chunk, ``x_raise_after`` makes the app fail mid-stream, ``x_status`` answers an error.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

from asgi_parts import read_body

#: a streamed chat request reporting 40 prompt + 260 completion tokens, with include_usage: the
#: load of the overspend and threshold tests
STREAM_BODY = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "count to thirty please"}],
    "max_tokens": 300,
    "stream": True,
    "stream_options": {"include_usage": True},
    "x_prompt": 40,
    "x_completion": 260,
}


def _chunk(model: str, delta: dict[str, Any], usage: dict[str, Any] | None = None) -> bytes:
    obj: dict[str, Any] = {
        "id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 1, "model": model,
        "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": None}],
    }  # fmt: skip
    if usage:
        obj["usage"] = usage
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def respond(body: bytes) -> tuple[int, list[tuple[str, str]], Iterator[bytes]]:
    req = json.loads(body or b"{}")
    model = req.get("model", "gpt-4o-mini")
    prompt, completion = int(req.get("x_prompt", 20)), int(req.get("x_completion", 5))
    words = [f"w{i}" for i in range(completion)]
    usage = {"prompt_tokens": prompt, "completion_tokens": completion,
             "total_tokens": prompt + completion}  # fmt: skip
    raise_after = req.get("x_raise_after")
    echo = hashlib.sha256(body).hexdigest()
    if "x_status" in req:
        err = json.dumps({"error": {"message": "upstream broke", "type": "server_error"}})
        return int(req["x_status"]), [("content-type", "application/json")], iter([err.encode()])
    if not req.get("stream"):
        doc = {
            "id": "chatcmpl-test", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": " ".join(words)}}],
            "usage": usage, "x_echo": echo,
        }  # fmt: skip
        return 200, [("content-type", "application/json")], iter([json.dumps(doc).encode()])

    def events() -> Iterator[bytes]:
        yield _chunk(model, {"role": "assistant", "content": ""})
        for i, w in enumerate(words):
            if raise_after is not None and i >= int(raise_after):
                raise RuntimeError("upstream died mid-stream")
            yield _chunk(model, {"content": (" " if i else "") + w})
        if (req.get("stream_options") or {}).get("include_usage"):
            yield _chunk(model, {}, usage)
        yield b"data: [DONE]\n\n"

    return 200, [("content-type", "text/event-stream"), ("x-echo", echo)], events()


async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = await read_body(receive)
    status, headers, chunks = respond(body)
    raw = [(k.encode(), v.encode()) for k, v in headers]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    for chunk in chunks:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def wsgi_app(environ: Any, start_response: Any) -> Iterator[bytes]:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else b""
    status, headers, chunks = respond(body)
    start_response(f"{status} X", headers)
    return chunks
