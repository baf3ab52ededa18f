"""The admin app as an ASGI 3 application: :class:`AdminApp`.

It only translates: an HTTP scope and its body into a ``_http.Request``, the ``Response`` back.
Handlers are sync (the store's sync backend, the library's sync readers), so each runs in a
worker thread (``asyncio.to_thread``) and never blocks the event loop. Mounted under a prefix
(Starlette's ``Mount``, uvicorn's ``--root-path``), paths are taken relative to ``root_path``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import quote, unquote

from quota_middleware.admin._app import AdminContext, build_router, handle, open_backend
from quota_middleware.admin._http import MAX_BODY, HTTPError, Request, Response
from quota_middleware.config import QuotaConfig

__all__ = ["AdminApp"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class AdminApp:
    """The admin API and dashboard, for any ASGI server or router::

        admin = AdminApp("policy.toml")                 # the store of [storage]
        app = Starlette(routes=[Mount("/admin", app=admin)])

    :param config: the policy (a :class:`QuotaConfig` or a path); it needs an ``[admin]`` table.
    :param backend: a sync backend (``MemoryBackend``, ``SyncRedisBackend``) or a sync
        ``redis.Redis`` / ``RedisCluster`` client; by default one is built from ``url`` or the
        policy's ``[storage]`` (and closed at shutdown). A memory store lives in one process:
        pass the middleware's own ``MemoryBackend`` to see its data.
    """

    def __init__(
        self,
        config: QuotaConfig | str | os.PathLike[str],
        backend: Any = None,
        *,
        url: str | None = None,
    ) -> None:
        cfg, store, self._owned = open_backend(config, backend, url)
        self.context = AdminContext(cfg, store)
        #: routes: ``app.router.add("GET", "/ui/x/{id}", handler)`` adds one
        self.router = build_router()

    @property
    def config(self) -> QuotaConfig:
        return self.context.config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind != "http":  # a websocket: refuse the handshake
            await send({"type": "websocket.close", "code": 1008})
            return
        try:
            body = await _read_body(scope, receive)
        except _Disconnected:
            return  # nobody to answer, and a cut body must change nothing
        except HTTPError as e:
            await _send(send, e.response())
            return
        req = _request(scope, body)
        response = await asyncio.to_thread(handle, self.context, self.router, req)
        await _send(send, response)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def close(self) -> None:
        """Close the backend if this app built it."""
        if self._owned:
            self.context.backend.close()


def _header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope.get("headers") or ():
        if k.lower() == name:
            return bytes(v)
    return None


class _Disconnected(Exception):
    """The client went away before the whole body arrived."""


async def _read_body(scope: Scope, receive: Receive) -> bytes:
    length = _header(scope, b"content-length")
    if length is not None and length.strip().isdigit() and int(length) > MAX_BODY:
        raise HTTPError(413, "too_large", f"the request body is over {MAX_BODY} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            # a cut body must not be handled as if it were whole: a form cut after
            # "reason=abuse" and before "&duration=3600" would block for ever
            raise _Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise HTTPError(413, "too_large", f"the request body is over {MAX_BODY} bytes")
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    if length is not None and length.strip().isdigit() and size != int(length):
        raise HTTPError(400, "invalid", "the request body does not match its Content-Length",
                        field="body")  # fmt: skip
    return b"".join(chunks)


def _request(scope: Scope, body: bytes) -> Request:
    root = scope.get("root_path", "") or ""
    path: str = scope.get("path", "/") or "/"
    # below the mount: ASGI 3 servers and Starlette's Mount keep the full path in ``path``
    rel = path[len(root) :] if root and path.startswith(root) else path
    # the raw path keeps an encoded "/" inside one id as one segment: used when it is the
    # same path (some servers leave the mount point out of it, some do not)
    raw = scope.get("raw_path")
    raw_rel = quote(rel, safe="/")
    if isinstance(raw, bytes | bytearray):
        text = bytes(raw).decode("latin-1").split("?", 1)[0]
        encoded_root = quote(root, safe="/")
        if root and text.startswith(encoded_root):
            text = text[len(encoded_root) :]
        if unquote(text) == rel:
            raw_rel = text
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers") or ()]
    client = scope.get("client")
    return Request.build(
        scope.get("method", "GET"),
        raw_rel or "/",
        (scope.get("query_string") or b"").decode("latin-1"),
        headers,
        body,
        root=root,
        scheme=scope.get("scheme", "http"),
        client=client[0] if client else None,
    )


async def _send(send: Send, response: Response) -> None:
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.header_list()]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})
