"""The admin app as a WSGI application: :class:`WSGIAdminApp`, the same routes, handlers and
rules as the ASGI one (``_app.handle``), for Flask, Django or any WSGI server. Mounted under a
prefix, paths are taken relative to ``SCRIPT_NAME``."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote, unquote

from quota_middleware.admin._app import AdminContext, build_router, handle, open_backend
from quota_middleware.admin._http import MAX_BODY, HTTPError, Request, Response
from quota_middleware.config import QuotaConfig

__all__ = ["WSGIAdminApp"]

StartResponse = Callable[..., Any]

_REASONS = {
    200: "OK", 201: "Created", 204: "No Content", 303: "See Other", 400: "Bad Request",
    401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    409: "Conflict", 413: "Content Too Large", 422: "Unprocessable Content",
    500: "Internal Server Error", 503: "Service Unavailable",
}  # fmt: skip


class WSGIAdminApp:
    """The admin API and dashboard as a WSGI app (the arguments of
    :class:`~quota_middleware.admin.AdminApp`)::

        admin = WSGIAdminApp("policy.toml")
        app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/admin": admin})   # Flask
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

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        try:
            body = _read_body(environ)
        except HTTPError as e:
            return _respond(start_response, e.response())
        response = handle(self.context, self.router, _request(environ, body))
        return _respond(start_response, response)

    def close(self) -> None:
        """Close the backend if this app built it."""
        if self._owned:
            self.context.backend.close()


def _read_body(environ: dict[str, Any]) -> bytes:
    raw = str(environ.get("CONTENT_LENGTH") or "").strip()
    stream = environ.get("wsgi.input")
    if stream is None:
        return b""
    if raw.isdigit():
        length = int(raw)
        if length > MAX_BODY:
            raise HTTPError(413, "too_large", f"the request body is over {MAX_BODY} bytes")
        data = bytes(stream.read(length)) if length else b""
        if len(data) != length:  # the client went away mid-body: change nothing
            raise HTTPError(400, "invalid", "the request body ended before its Content-Length",
                            field="body")  # fmt: skip
        return data
    # no length (chunked): read one byte past the cap to tell "too large" from "exactly"
    data = bytes(stream.read(MAX_BODY + 1)) if environ.get("wsgi.input_terminated") else b""
    if len(data) > MAX_BODY:
        raise HTTPError(413, "too_large", f"the request body is over {MAX_BODY} bytes")
    return data


def _wsgi_str(value: str) -> str:
    """A WSGI "native string" (bytes as latin-1) as the text the client sent (UTF-8)."""
    return value.encode("latin-1").decode("utf-8", "replace")


def _request(environ: dict[str, Any], body: bytes) -> Request:
    root = _wsgi_str(environ.get("SCRIPT_NAME", "") or "")
    rel = _wsgi_str(environ.get("PATH_INFO", "") or "/")
    raw_rel = quote(rel, safe="/")
    # the request line's path keeps an encoded "/" inside one id (werkzeug: REQUEST_URI,
    # gunicorn: RAW_URI); used when it is the same path
    uri = environ.get("REQUEST_URI") or environ.get("RAW_URI")
    if isinstance(uri, str):
        text = uri.split("?", 1)[0]
        if "://" in text:  # an absolute request target
            text = "/" + text.split("://", 1)[1].partition("/")[2]
        encoded_root = quote(root, safe="/")
        if root and text.startswith(encoded_root):
            text = text[len(encoded_root) :]
        if _wsgi_str(unquote(text, encoding="latin-1")) == rel:
            raw_rel = text
    headers = [
        (k[5:].replace("_", "-"), _wsgi_str(v)) for k, v in environ.items() if k.startswith("HTTP_")
    ]
    if environ.get("CONTENT_TYPE"):
        headers.append(("content-type", environ["CONTENT_TYPE"]))
    return Request.build(
        environ.get("REQUEST_METHOD", "GET"),
        raw_rel or "/",
        environ.get("QUERY_STRING", ""),
        headers,
        body,
        root=root,
        scheme=environ.get("wsgi.url_scheme", "http"),
        client=environ.get("REMOTE_ADDR"),
    )


def _respond(start_response: StartResponse, response: Response) -> list[bytes]:
    status = f"{response.status} {_REASONS.get(response.status, 'Unknown')}"
    start_response(status, response.header_list())
    return [response.body]
