"""An upstream that misbehaves on purpose, as an ASGI and a WSGI app with identical output.

The request body's ``x_case`` picks the misbehaviour; the provider format follows the path
(``/v1/chat/completions``: OpenAI, ``/v1/messages``: Anthropic, ``/v1beta/...``: Gemini). Every
response relays ``x_words`` words of text (``w0 w1 ...``), so the text-based estimate is known.

Cases: ``negative`` / ``string`` / ``fraction`` / ``nan`` / ``huge_float`` / ``huge_int`` usage
in a JSON 200; ``cut_json`` (the body ends mid-content) and ``bad_utf8`` (one invalid byte in
the content); ``cut`` (a stream that ends before the provider's final usage event),
``error_event`` (a stream that ends with the provider's error event); ``echo`` (the request
body as received, as the reply's text); ``slow_tail`` (the final usage event comes
``x_pause`` seconds after the text: a client may hang up first); ``status_500``. Every
stream ignores ``max_tokens``, and reports ``x_prompt`` prompt tokens (default 12); OpenAI
streams report ``x_reported`` output tokens (default: the words sent). ``x_chunk`` cuts the
body into pieces of that many bytes, anywhere.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

from asgi_parts import lifespan, read_body

SSE = "text/event-stream"
#: yielded by a stream where it waits ``x_pause`` seconds (asyncio.sleep in ASGI, time.sleep in
#: WSGI), before its final usage event
PAUSE = b""
JSON = "application/json"


def words(n: int) -> list[str]:
    return [(" " if i else "") + f"w{i}" for i in range(n)]


def text_of(n: int) -> str:
    return "".join(words(n))


def _sse(obj: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return (head + "data: " + json.dumps(obj) + "\n\n").encode()


def _bad_count(case: str) -> Any:
    return {"negative": -1_000_000, "string": "12", "fraction": 12.5, "huge_float": 1e30,
            "huge_int": 10**30}.get(case)  # fmt: skip


def _openai(req: dict[str, Any], case: str, n: int) -> tuple[int, str, Iterator[bytes]]:
    model = req.get("model", "gpt-4o-mini")
    prompt = int(req.get("x_prompt", 12))
    if case in ("negative", "string", "fraction", "huge_float", "huge_int", "nan"):
        bad = _bad_count(case)
        negative = case == "negative"
        usage: dict[str, Any] = {
            "prompt_tokens": -1_000_000 if negative else prompt,
            "completion_tokens": -5 if negative else bad,
        }
        doc = {"id": "x", "object": "chat.completion", "model": model, "usage": usage,
               "choices": [{"index": 0, "finish_reason": "stop",
                            "message": {"role": "assistant", "content": text_of(n)}}]}  # fmt: skip
        raw = json.dumps(doc)
        if case == "nan":
            raw = raw.replace('"completion_tokens": null', '"completion_tokens": NaN')
        return 200, JSON, iter([raw.encode()])
    if case == "echo":  # the request as the upstream received it, as the reply's text
        doc = {"id": "x", "object": "chat.completion", "model": model,
               "choices": [{"index": 0, "finish_reason": "stop",
                            "message": {"role": "assistant", "content": json.dumps(req)}}],
               "usage": {"prompt_tokens": prompt, "completion_tokens": 5}}  # fmt: skip
        return 200, JSON, iter([json.dumps(doc).encode()])
    if case in ("cut_json", "bad_utf8"):
        doc = {"id": "x", "object": "chat.completion", "model": model,
               "choices": [{"index": 0, "finish_reason": "stop",
                            "message": {"role": "assistant", "content": text_of(n)}}],
               "usage": {"prompt_tokens": prompt, "completion_tokens": n,
                         "total_tokens": prompt + n}}  # fmt: skip
        raw = json.dumps(doc).encode()
        if case == "cut_json":
            raw = raw[: len(raw) // 2]
        else:
            raw = raw.replace(b" w1 ", b" w\xff1 ", 1)
        return 200, JSON, iter([raw])
    # streams
    pause = float(req.get("x_pause", 0))

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return _sse({"id": "x", "object": "chat.completion.chunk", "model": model,
                     "choices": [choice]})  # fmt: skip

    def events() -> Iterator[bytes]:
        yield chunk({"role": "assistant", "content": ""})
        for w in words(n):
            yield chunk({"content": w})
        if case == "cut":
            return
        yield chunk({}, "stop")
        if pause:
            yield PAUSE
        out = int(req.get("x_reported", n))  # e.g. hidden reasoning tokens on top of the text
        yield _sse({"id": "x", "object": "chat.completion.chunk", "model": model, "choices": [],
                    "usage": {"prompt_tokens": prompt, "completion_tokens": out,
                              "total_tokens": prompt + out}})  # fmt: skip
        yield b"data: [DONE]\n\n"

    return 200, SSE, events()


def _anthropic(req: dict[str, Any], case: str, n: int) -> tuple[int, str, Iterator[bytes]]:
    model = req.get("model", "claude-sonnet-4-5")
    prompt = int(req.get("x_prompt", 12))
    pause = float(req.get("x_pause", 0))

    def events() -> Iterator[bytes]:
        yield _sse({"type": "message_start", "message": {
            "id": "msg_x", "type": "message", "role": "assistant", "model": model,
            "content": [], "usage": {"input_tokens": prompt, "output_tokens": 1,
                                     "cache_read_input_tokens": 0}}}, "message_start")  # fmt: skip
        yield _sse(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
            "content_block_start",
        )
        for w in words(n):
            yield _sse(
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": w},
                },
                "content_block_delta",
            )
        yield _sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
        if case == "cut":
            return
        if case == "error_event":
            yield _sse(
                {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
                "error",
            )
            return
        if pause:
            yield PAUSE
        yield _sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn"},
                "usage": {"output_tokens": n},
            },
            "message_delta",
        )
        yield _sse({"type": "message_stop"}, "message_stop")

    return 200, SSE, events()


def _gemini(req: dict[str, Any], case: str, n: int) -> tuple[int, str, Iterator[bytes]]:
    pause = float(req.get("x_pause", 0))

    def chunk(i: int, text: str, finish: str | None = None) -> bytes:
        cand: dict[str, Any] = {"content": {"role": "model", "parts": [{"text": text}]},
                                "index": 0}  # fmt: skip
        if finish:
            cand["finishReason"] = finish
        return _sse({"candidates": [cand], "modelVersion": "gemini-2.5-flash",
                     "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": i,
                                       "totalTokenCount": 10 + i}})  # fmt: skip

    def events() -> Iterator[bytes]:
        ws = words(n)
        for i, w in enumerate(ws[:-1]):
            # cumulative counts that lag the text, as Gemini's do
            yield chunk(i // 2, w)
        if case == "cut":
            return
        if pause:
            yield PAUSE
        yield chunk(n, ws[-1], "STOP")

    return 200, SSE, events()


def _rechunk(chunks: Iterator[bytes], size: int) -> Iterator[bytes]:
    """The same bytes in pieces of ``size``, cut anywhere (as a proxy relaying raw reads)."""
    pending = b""
    for chunk in chunks:
        if chunk is PAUSE:
            yield PAUSE
            continue
        pending += chunk
        while len(pending) >= size:
            yield pending[:size]
            pending = pending[size:]
    if pending:
        yield pending


def respond(path: str, body: bytes) -> tuple[int, list[tuple[str, str]], Iterator[bytes]]:
    status, headers, chunks = _respond(path, body)
    size = int(json.loads(body or b"{}").get("x_chunk", 0))
    return status, headers, _rechunk(chunks, size) if size else chunks


def _respond(path: str, body: bytes) -> tuple[int, list[tuple[str, str]], Iterator[bytes]]:
    req = json.loads(body or b"{}")
    case = str(req.get("x_case", ""))
    n = int(req.get("x_words", 50))
    if case == "status_500":
        err = json.dumps({"error": {"message": "upstream broke", "type": "server_error"}})
        return 500, [("content-type", JSON)], iter([err.encode()])
    if path.startswith("/v1/messages"):
        status, ctype, chunks = _anthropic(req, case, n)
    elif path.startswith("/v1beta/"):
        status, ctype, chunks = _gemini(req, case, n)
    else:
        status, ctype, chunks = _openai(req, case, n)
    return status, [("content-type", ctype)], chunks


async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    body = await read_body(receive)
    status, headers, chunks = respond(scope["path"], body)
    raw = [(k.encode(), v.encode()) for k, v in headers]
    pause = float(json.loads(body or b"{}").get("x_pause", 0))
    gone = asyncio.Event()

    async def listen() -> None:  # as Starlette's StreamingResponse: stop when the client goes
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()

    listener = asyncio.ensure_future(listen())
    try:
        await send({"type": "http.response.start", "status": status, "headers": raw})
        for chunk in chunks:
            if chunk is PAUSE:
                try:
                    await asyncio.wait_for(gone.wait(), pause)
                except TimeoutError:
                    pass
            if gone.is_set():
                return
            if chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        listener.cancel()


def wsgi_app(environ: Any, start_response: Any) -> Iterator[bytes]:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else b""
    status, headers, chunks = respond(environ.get("PATH_INFO", "/"), body)
    pause = float(json.loads(body or b"{}").get("x_pause", 0))
    start_response(f"{status} X", headers)
    for chunk in chunks:
        if chunk is PAUSE:
            time.sleep(pause)
        elif chunk:
            yield chunk
