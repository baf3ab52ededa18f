"""A local fake of an OpenAI-compatible (and Anthropic Messages) upstream, for examples and tests.

No network and no key needed. Routes:

- ``POST /v1/chat/completions``: OpenAI ``chat.completion`` JSON, or with ``"stream": true`` an SSE
  stream of ``chat.completion.chunk`` events (first chunk carries the role, one chunk per word, a
  final chunk with ``finish_reason``, a usage chunk with ``"choices": []`` only when
  ``stream_options.include_usage`` is true, then ``data: [DONE]``).
- ``POST /v1/messages``: Anthropic Messages JSON, or with ``"stream": true`` the SSE sequence
  ``message_start``, ``content_block_start``, ``ping``, ``content_block_delta``...,
  ``content_block_stop``, ``message_delta`` (cumulative ``output_tokens``), ``message_stop``.
- ``GET /v1/models``: a short model list.

Any ``Authorization`` / ``x-api-key`` header is accepted and ignored. Replies carry the request id
header of their provider (``x-request-id`` for OpenAI, ``request-id`` for Anthropic). Served on a
port, it is the upstream of both SDK conventions at once: ``OPENAI_BASE_URL=<host>/v1`` and
``ANTHROPIC_BASE_URL=<host>`` (the host; the Anthropic SDK adds ``/v1/messages``), e.g.
``http://127.0.0.1:9000/v1`` and ``http://127.0.0.1:9000``.

Replies are a pure function of the request body (ids and ``created`` are derived from its hash), so
the same request always gives the same bytes, streamed or not. The reply text is
``"This is a fake reply to: <last user message words> ..."`` padded with filler words, cut to
``N = min(max_tokens or 40, 40)`` words. Token counts:

- ``prompt_tokens`` (``input_tokens``) = sum over messages (an Anthropic ``system`` prompt counts as
  one message) of ``len(text) // 4 + 7``, where ``text`` is the message's text content;
- ``completion_tokens`` (``output_tokens``) = the number of words in the reply (one per chunk).

The same request has the same usage in JSON and in the stream.

Four ways to use it, all sharing one framework-free core (:func:`handle`):

- ``app``: a Starlette ASGI app (``uvicorn fake_upstream:app --app-dir examples --port 9000``);
- ``wsgi_app``: a plain WSGI callable;
- ``FakeUpstreamTransport``: an httpx transport (sync and async) that answers in-process and
  streams chunk by chunk (``httpx.ASGITransport`` would buffer a whole streamed response);
- ``LocalUpstream``: the WSGI app served by werkzeug on a free loopback port in a background
  thread, recording every request it gets (for tests that point a served app at it).

Chunk delay: ``FAKE_UPSTREAM_DELAY_MS`` (default 5 ms), or ``delay=`` on the transport/app makers.

``FAKE_UPSTREAM_GZIP=1`` (or ``gzip=True`` on the ASGI/WSGI app makers) gzips every reply
(``Content-Encoding: gzip``) whatever the request's ``Accept-Encoding`` says, as some upstreams
and proxies do: JSON as one gzip body, SSE as one gzip stream flushed after each event, so events
still arrive one by one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
import time
import zlib
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

MAX_WORDS = 40
DEFAULT_DELAY = float(os.environ.get("FAKE_UPSTREAM_DELAY_MS", "5")) / 1000
DEFAULT_GZIP = os.environ.get("FAKE_UPSTREAM_GZIP", "") not in ("", "0")
MODELS = ("gpt-4o-mini", "gpt-4o", "claude-3-5-haiku-latest")
_FILLER = (
    "and here are some more words so that the reply has a realistic length for metering "
    "tests that count tokens in streamed and buffered responses alike"
).split()
SSE = "text/event-stream; charset=utf-8"
JSON = "application/json"


@dataclass(frozen=True, slots=True)
class FakeResponse:
    """What the core answers: status, content type, and the body as a list of chunks (one chunk
    for JSON; one SSE event per chunk when ``stream`` is true); ``headers``: any others."""

    status: int
    content_type: str
    chunks: tuple[bytes, ...]
    stream: bool = False
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


# -- the core ------------------------------------------------------------------------------------
def handle(method: str, path: str, body: bytes = b"") -> FakeResponse:
    """Answer one request; no I/O, no clock."""
    path = path.rstrip("/") or "/"
    if path.endswith("/models") and method == "GET":
        return _json(200, models_body())
    routes = {"/v1/chat/completions": chat_completion, "/v1/messages": anthropic_message}
    if path not in routes:
        return _json(404, _error(f"Unknown path {path}", "invalid_request_error", "not_found"))
    if method != "POST":
        return _json(405, _error("Method not allowed", "invalid_request_error", None))
    try:
        req = json.loads(body or b"null")
    except ValueError:
        return _json(400, _error("Request body is not valid JSON", "invalid_request_error", None))
    if not isinstance(req, dict) or not isinstance(req.get("messages"), list):
        return _json(400, _error("'messages' is required", "invalid_request_error", None))
    return routes[path](req, _digest(body))


def prompt_tokens(req: Mapping[str, Any]) -> int:
    """``len(text) // 4 + 7`` per message (and per Anthropic ``system`` prompt)."""
    texts = [_text(m.get("content")) for m in req["messages"] if isinstance(m, dict)]
    if req.get("system"):
        texts.append(_text(req["system"]))
    return sum(len(t) // 4 + 7 for t in texts)


def reply_words(req: Mapping[str, Any]) -> tuple[list[str], bool]:
    """The reply's words and whether ``max_tokens`` cut it short."""
    user = [m for m in req["messages"] if isinstance(m, dict) and m.get("role") == "user"]
    asked = _text(user[-1].get("content")).split() if user else []
    words = ["This", "is", "a", "fake", "reply", "to:", *asked[:20]]
    while len(words) < MAX_WORDS:
        words.append(_FILLER[(len(words) - 6) % len(_FILLER)])
    limit = req.get("max_completion_tokens") or req.get("max_tokens")
    n = min(int(limit), MAX_WORDS) if isinstance(limit, int) and limit > 0 else MAX_WORDS
    return words[:n], n < MAX_WORDS


def models_body() -> dict[str, Any]:
    data = [{"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "fake-upstream"}
            for m in MODELS]  # fmt: skip
    return {"object": "list", "data": data}


def chat_completion(req: Mapping[str, Any], digest: str) -> FakeResponse:
    words, cut = reply_words(req)
    pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
    usage = {
        "prompt_tokens": prompt_tokens(req),
        "completion_tokens": len(words),
        "total_tokens": prompt_tokens(req) + len(words),
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
    head = {
        "id": f"chatcmpl-{digest[:24]}",
        "created": _created(digest),
        "model": str(req.get("model") or MODELS[0]),
        "system_fingerprint": f"fp_{digest[24:34]}",
        "service_tier": "default",
    }
    finish = "length" if cut else "stop"
    ids = (("x-request-id", f"req_{digest[:32]}"),)
    if not req.get("stream"):
        message: dict[str, Any] = {"role": "assistant", "content": "".join(pieces), "refusal": None,
                   "annotations": []}  # fmt: skip
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        reply = _json(200, {**head, "object": "chat.completion", "choices": [choice],
                            "usage": usage})  # fmt: skip
        return FakeResponse(reply.status, reply.content_type, reply.chunks, headers=ids)
    opts = req.get("stream_options")
    include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
    base = {"id": head["id"], "object": "chat.completion.chunk", "created": head["created"],
            "model": head["model"], "service_tier": "default",
            "system_fingerprint": head["system_fingerprint"]}  # fmt: skip

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        c = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        extra = {"usage": None} if include_usage else {}
        return _data({**base, "choices": [c], **extra})

    chunks = [chunk({"role": "assistant", "content": "", "refusal": None})]
    chunks += [chunk({"content": p}) for p in pieces]
    chunks.append(chunk({}, finish))
    if include_usage:
        chunks.append(_data({**base, "choices": [], "usage": usage}))
    chunks.append(b"data: [DONE]\n\n")
    return FakeResponse(200, SSE, tuple(chunks), stream=True, headers=ids)


def anthropic_message(req: Mapping[str, Any], digest: str) -> FakeResponse:
    words, cut = reply_words(req)
    pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
    input_tokens = prompt_tokens(req)
    usage = {"input_tokens": input_tokens, "cache_creation_input_tokens": 0,
             "cache_read_input_tokens": 0, "output_tokens": len(words),
             "service_tier": "standard"}  # fmt: skip
    message: dict[str, Any] = {
        "id": f"msg_{digest[:24]}",
        "type": "message",
        "role": "assistant",
        "model": str(req.get("model") or MODELS[2]),
        "content": [{"type": "text", "text": "".join(pieces)}],
        "stop_reason": "max_tokens" if cut else "end_turn",
        "stop_sequence": None,
        "usage": usage,
    }
    ids = (("request-id", f"req_{digest[:24]}"),)
    if not req.get("stream"):
        return FakeResponse(200, JSON, (_dumps(message),), headers=ids)
    start = {**message, "content": [], "stop_reason": None,
             "usage": {**usage, "output_tokens": 1}}  # fmt: skip
    chunks = [
        _event("message_start", {"type": "message_start", "message": start}),
        _event("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}}),
        _event("ping", {"type": "ping"}),
    ]  # fmt: skip
    for p in pieces:
        delta = {"type": "content_block_delta", "index": 0,
                 "delta": {"type": "text_delta", "text": p}}  # fmt: skip
        chunks.append(_event("content_block_delta", delta))
    chunks.append(_event("content_block_stop", {"type": "content_block_stop", "index": 0}))
    chunks.append(
        _event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                "usage": {"output_tokens": len(words)},
            },
        )  # fmt: skip
    )
    chunks.append(_event("message_stop", {"type": "message_stop"}))
    return FakeResponse(200, SSE, tuple(chunks), stream=True, headers=ids)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _created(digest: str) -> int:
    return 1_750_000_000 + int(digest[:6], 16) % 10_000_000


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _data(obj: Any) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


def _event(name: str, obj: Any) -> bytes:
    return f"event: {name}\n".encode() + _data(obj)


def _json(status: int, obj: Any) -> FakeResponse:
    return FakeResponse(status, JSON, (_dumps(obj),))


def _error(message: str, type_: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


# -- pacing: the same chunks, with a small delay between SSE events -------------------------------
def iter_chunks(resp: FakeResponse, delay: float = DEFAULT_DELAY) -> Iterator[bytes]:
    for i, chunk in enumerate(resp.chunks):
        if i and resp.stream and delay > 0:
            time.sleep(delay)
        yield chunk


async def aiter_chunks(resp: FakeResponse, delay: float = DEFAULT_DELAY) -> AsyncIterator[bytes]:
    for i, chunk in enumerate(resp.chunks):
        if i and resp.stream and delay > 0:
            await asyncio.sleep(delay)
        yield chunk


# -- gzip: one gzip stream per reply, flushed after each chunk ------------------------------------
class Gzipper:
    """``encode(chunk)`` for each chunk, then ``finish()``: together, one gzip member whose prefix
    after each ``encode`` decompresses to the chunks so far (``Z_SYNC_FLUSH``)."""

    def __init__(self) -> None:
        self._z = zlib.compressobj(wbits=31)  # 16 + 15: a gzip header and trailer

    def encode(self, chunk: bytes) -> bytes:
        return self._z.compress(chunk) + self._z.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self._z.flush()


def gzip_body(data: bytes) -> bytes:
    """The whole body as one gzip member (what :class:`Gzipper` gives for a single chunk)."""
    z = Gzipper()
    return z.encode(data) + z.finish()


def _gzip_iter(chunks: Iterable[bytes]) -> Iterator[bytes]:
    z = Gzipper()
    for chunk in chunks:
        yield z.encode(chunk)
    yield z.finish()


async def _agzip_iter(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    z = Gzipper()
    async for chunk in chunks:
        yield z.encode(chunk)
    yield z.finish()


# -- ASGI (Starlette) ----------------------------------------------------------------------------
def create_app(delay: float = DEFAULT_DELAY, *, gzip: bool = DEFAULT_GZIP) -> Starlette:
    async def endpoint(request: Request) -> Response:
        resp = handle(request.method, request.url.path, await request.body())
        headers = dict(resp.headers)
        if gzip:
            headers["content-encoding"] = "gzip"
        if resp.stream:
            chunks = aiter_chunks(resp, delay)
            return StreamingResponse(
                _agzip_iter(chunks) if gzip else chunks,
                status_code=resp.status,
                media_type=resp.content_type,
                headers=headers,
            )
        body = gzip_body(resp.body) if gzip else resp.body
        return Response(body, resp.status, headers=headers, media_type=resp.content_type)

    paths = ("/v1/chat/completions", "/v1/messages", "/v1/models")
    return Starlette(routes=[Route(p, endpoint, methods=["GET", "POST"]) for p in paths])


app = create_app()


# -- WSGI ----------------------------------------------------------------------------------------
def make_wsgi_app(delay: float = DEFAULT_DELAY, *, gzip: bool = DEFAULT_GZIP) -> Any:
    def wsgi_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        resp = handle(environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/"), body)
        headers = [("Content-Type", resp.content_type), *resp.headers]
        if gzip:
            headers.append(("Content-Encoding", "gzip"))
        status = f"{resp.status} {_REASONS.get(resp.status, 'OK')}"
        if resp.stream:
            start_response(status, headers)
            chunks = iter_chunks(resp, delay)
            return _gzip_iter(chunks) if gzip else chunks
        data = gzip_body(resp.body) if gzip else resp.body
        start_response(status, [*headers, ("Content-Length", str(len(data)))])
        return [data]

    return wsgi_app


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
wsgi_app = make_wsgi_app()


# -- httpx transport: in-process and streaming, for both httpx.Client and httpx.AsyncClient -------
class _SyncStream(httpx.SyncByteStream):
    def __init__(self, resp: FakeResponse, delay: float) -> None:
        self._resp, self._delay = resp, delay

    def __iter__(self) -> Iterator[bytes]:
        return iter_chunks(self._resp, self._delay)


class _AsyncStream(httpx.AsyncByteStream):
    def __init__(self, resp: FakeResponse, delay: float) -> None:
        self._resp, self._delay = resp, delay

    def __aiter__(self) -> AsyncIterator[bytes]:
        return aiter_chunks(self._resp, self._delay)


class FakeUpstreamTransport(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """``httpx.Client(transport=FakeUpstreamTransport(), base_url="http://fake-upstream/v1")``.

    Every request is answered by :func:`handle` in-process; SSE events arrive one by one."""

    def __init__(self, delay: float = DEFAULT_DELAY) -> None:
        self.delay = delay

    def _answer(self, request: httpx.Request, body: bytes) -> tuple[FakeResponse, list[Any]]:
        resp = handle(request.method, request.url.path, body)
        headers: list[Any] = [("content-type", resp.content_type), *resp.headers]
        if not resp.stream:
            headers.append(("content-length", str(len(resp.body))))
        return resp, headers

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        resp, headers = self._answer(request, request.read())
        stream = _SyncStream(resp, self.delay)
        return httpx.Response(resp.status, headers=headers, stream=stream, request=request)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        resp, headers = self._answer(request, await request.aread())
        stream = _AsyncStream(resp, self.delay)
        return httpx.Response(resp.status, headers=headers, stream=stream, request=request)


class FakeOrRealTransport(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """The examples' proxy transport: requests to ``http://fake-upstream`` are answered by the
    in-process fake, every other one goes out on a real connection pool."""

    def __init__(self, delay: float = DEFAULT_DELAY) -> None:
        self.fake = FakeUpstreamTransport(delay)
        self._sync: httpx.HTTPTransport | None = None
        self._async: httpx.AsyncHTTPTransport | None = None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == FAKE_HOST:
            return self.fake.handle_request(request)
        self._sync = self._sync or httpx.HTTPTransport()
        return self._sync.handle_request(request)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == FAKE_HOST:
            return await self.fake.handle_async_request(request)
        self._async = self._async or httpx.AsyncHTTPTransport()
        return await self._async.handle_async_request(request)

    def close(self) -> None:
        if self._sync is not None:
            self._sync.close()

    async def aclose(self) -> None:
        if self._async is not None:
            await self._async.aclose()


FAKE_HOST = "fake-upstream"


# -- served on a loopback port, in a thread --------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SeenRequest:
    """One request as :class:`LocalUpstream` received it (header names lowercased)."""

    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)


class LocalUpstream:
    """The fake on ``127.0.0.1:<free port>`` (werkzeug, threaded), until :meth:`stop` or the end
    of the ``with`` block. ``app`` replaces the fake's own WSGI app. Every request is appended to
    ``requests`` before it is answered."""

    def __init__(
        self, *, delay: float = DEFAULT_DELAY, gzip: bool = DEFAULT_GZIP, app: Any = None
    ) -> None:
        from werkzeug.serving import WSGIRequestHandler, make_server

        class Quiet(WSGIRequestHandler):
            def log(self, type: str, message: str, *args: Any) -> None:
                pass

        inner = app or make_wsgi_app(delay, gzip=gzip)
        self.requests: list[SeenRequest] = []

        def recording(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            headers = {k[5:].lower().replace("_", "-"): v for k, v in environ.items()
                       if k.startswith("HTTP_")}  # fmt: skip
            for k in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                if environ.get(k):
                    headers[k.lower().replace("_", "-")] = environ[k]
            seen = SeenRequest(environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), headers)
            self.requests.append(seen)
            result: Iterable[bytes] = inner(environ, start_response)
            return result

        self._server = make_server("127.0.0.1", 0, recording, threaded=True, request_handler=Quiet)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fake-upstream", daemon=True
        )

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``: ``ANTHROPIC_BASE_URL``; ``OPENAI_BASE_URL`` is it + /v1."""
        return f"http://127.0.0.1:{self._server.server_port}"

    def start(self) -> LocalUpstream:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> LocalUpstream:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
