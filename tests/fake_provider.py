"""A fake AI provider for the proxy tests: OpenAI (chat, JSON and SSE with ``include_usage``
exactly as OpenAI sends it), Anthropic messages, Gemini generateContent / streamGenerateContent
(``alt=sse``), a slow stream and a slow first byte. It records every request it receives
(method, path, query, headers, body), so tests can assert on what reached the upstream.

Replies are deterministic functions of the request's messages (not of the whole body), so a
stream asked with ``include_usage`` differs from one asked without only by the usage parts.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from servers import free_port

WORDS = "the quick brown fox jumps over the lazy dog again and again".split()


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Provider:
    """What the fake saw, and knobs the tests turn."""

    seen: list[Seen] = field(default_factory=list)
    #: gzip every response (JSON and SSE) when the client accepts it
    gzip: bool = False
    #: seconds between streamed chunks
    delay: float = 0.0
    #: monotonic time the last stream's generator was closed (the proxy hung up)
    stream_closed_at: float | None = None
    stream_chunks_sent: int = 0


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _data(obj: Any) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


def _prompt_tokens(req: dict[str, Any]) -> int:
    text = json.dumps(req.get("messages") or req.get("contents") or "")
    return max(1, len(text) // 4)


def _n_words(req: dict[str, Any]) -> int:
    cap = req.get("max_tokens") or req.get("max_completion_tokens") or len(WORDS)
    return max(1, min(int(cap), len(WORDS)))


def openai_chat(req: dict[str, Any]) -> tuple[int, str, list[bytes]]:
    n = _n_words(req)
    words = [w if i == 0 else " " + w for i, w in enumerate(WORDS[:n])]
    p = _prompt_tokens(req)
    usage = {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n,
             "prompt_tokens_details": {"cached_tokens": 0}}  # fmt: skip
    base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1_800_000_000,
            "model": req.get("model", "gpt-4o-mini"), "system_fingerprint": "fp_fake"}  # fmt: skip
    if not req.get("stream"):
        message = {"role": "assistant", "content": "".join(words)}
        body = {**base, "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": usage}  # fmt: skip
        return 200, "application/json", [_dumps(body)]
    opts = req.get("stream_options")
    include = isinstance(opts, dict) and opts.get("include_usage") is True
    extra = {"usage": None} if include else {}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _data({**base, "choices": [choice], **extra})

    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": w}) for w in words]
    chunks.append(chunk({}, "stop"))
    if include:
        chunks.append(_data({**base, "choices": [], "usage": usage}))
    chunks.append(b"data: [DONE]\n\n")
    return 200, "text/event-stream; charset=utf-8", chunks


def anthropic_messages(req: dict[str, Any]) -> tuple[int, str, list[bytes]]:
    n = _n_words(req)
    text = " ".join(WORDS[:n])
    p = _prompt_tokens(req)
    usage = {"input_tokens": p, "output_tokens": n, "cache_read_input_tokens": 0,
             "cache_creation_input_tokens": 0}  # fmt: skip
    content = [{"type": "text", "text": text}]
    msg = {"id": "msg_fake", "type": "message", "role": "assistant",
           "model": req.get("model", "claude-haiku-4-5"), "content": content,
           "stop_reason": "end_turn", "stop_sequence": None, "usage": usage}  # fmt: skip
    if not req.get("stream"):
        return 200, "application/json", [_dumps(msg)]

    def ev(name: str, obj: Any) -> bytes:
        return b"event: " + name.encode() + b"\n" + _data(obj)

    start = {**msg, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
    chunks = [
        ev("message_start", {"type": "message_start", "message": start}),
        ev(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
    ]
    for w in WORDS[:n]:
        chunks.append(
            ev(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": w},
                },
            )
        )
    chunks.append(ev("content_block_stop", {"type": "content_block_stop", "index": 0}))
    chunks.append(ev("message_delta", {"type": "message_delta", "usage": {"output_tokens": n},
                                       "delta": {"stop_reason": "end_turn"}}))  # fmt: skip
    chunks.append(ev("message_stop", {"type": "message_stop"}))
    return 200, "text/event-stream", chunks


def gemini(req: dict[str, Any], model: str, stream: bool) -> tuple[int, str, list[bytes]]:
    n = 5
    p = _prompt_tokens(req)

    def piece(words: list[str], last: bool) -> dict[str, Any]:
        cand: dict[str, Any] = {"content": {"parts": [{"text": " ".join(words)}], "role": "model"}}
        if last:
            cand["finishReason"] = "STOP"
        meta = {"promptTokenCount": p, "candidatesTokenCount": n if last else len(words),
                "totalTokenCount": p + (n if last else len(words))}  # fmt: skip
        return {"candidates": [cand], "usageMetadata": meta, "modelVersion": model}

    if not stream:
        return 200, "application/json", [_dumps(piece(WORDS[:n], True))]
    chunks = [_data(piece(WORDS[:2], False)), _data(piece(WORDS[2:n], True))]
    return 200, "text/event-stream", chunks


def create_app(provider: Provider) -> Starlette:
    async def endpoint(request: Request) -> Response:
        body = await request.body()
        provider.seen.append(
            Seen(
                request.method,
                request.url.path,
                request.url.query,
                {k.lower(): v for k, v in request.headers.items()},
                body,
            )  # fmt: skip
        )
        path = request.url.path
        if path.endswith("/models") and request.method == "GET":
            return Response(_dumps({"object": "list", "data": [{"id": "gpt-4o-mini"}]}),
                            media_type="application/json")  # fmt: skip
        if path == "/slow-headers/v1/chat/completions":
            await asyncio.sleep(5)
        try:
            req = json.loads(body or b"{}")
        except ValueError:
            return Response(b'{"error":{"message":"bad json"}}', 400)
        if path.endswith("/chat/completions"):
            status, ctype, chunks = openai_chat(req)
        elif path.endswith("/v1/messages"):
            status, ctype, chunks = anthropic_messages(req)
        elif ":generateContent" in path or ":streamGenerateContent" in path:
            model = path.rsplit("/", 1)[-1].split(":", 1)[0]
            status, ctype, chunks = gemini(req, model, "stream" in path)
        else:
            return Response(b'{"error":{"message":"not found"}}', 404)
        zipped = provider.gzip and "gzip" in request.headers.get("accept-encoding", "")
        headers = {"content-encoding": "gzip"} if zipped else {}
        if not ctype.startswith("text/event-stream"):
            data = b"".join(chunks)
            return Response(gzip.compress(data) if zipped else data, status, headers=headers,
                            media_type=ctype)  # fmt: skip

        async def stream() -> Any:
            z = _Gzip() if zipped else None
            try:
                for c in chunks:
                    provider.stream_chunks_sent += 1
                    yield z.encode(c) if z else c
                    if provider.delay:
                        await asyncio.sleep(provider.delay)
                if z:
                    yield z.finish()
            finally:
                provider.stream_closed_at = time.monotonic()

        return StreamingResponse(stream(), status, headers=headers, media_type=ctype)

    return Starlette(routes=[Route("/{path:path}", endpoint, methods=["GET", "POST"])])


class _Gzip:
    def __init__(self) -> None:
        import zlib

        self._z = zlib.compressobj(wbits=31)

    def encode(self, data: bytes) -> bytes:
        import zlib

        return self._z.compress(data) + self._z.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self._z.flush()


class ServerThread:
    """A real uvicorn server for ``app`` on a free loopback port, in a thread."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="off")  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
