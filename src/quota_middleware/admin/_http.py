"""The admin app's sans-IO HTTP core: a :class:`Request` value, a :class:`Response` value, and a
:class:`Router` from (method, path pattern) to a sync handler ``(req, ctx) -> Response``.

The two drivers (``_asgi.AdminApp``, ``_wsgi.WSGIAdminApp``) only translate their protocol into
a :class:`Request` and a :class:`Response` back; everything else (routing, authentication,
CSRF, errors) is decided here and in ``_app``, once for both.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote

if TYPE_CHECKING:
    from quota_middleware.admin._app import AdminContext
    from quota_middleware.admin._auth import Admin

__all__ = [
    "MAX_BODY",
    "HTTPError",
    "Handler",
    "Request",
    "Response",
    "Route",
    "Router",
    "json_response",
]

#: the largest request body the admin app reads (bytes); more is answered 413
MAX_BODY = 64 * 1024

Handler = Callable[["Request", "AdminContext"], "Response"]


class HTTPError(Exception):
    """An answer other than success, raised anywhere below a handler: ``status``, a machine
    ``code`` (the JSON body's ``error``), and for a 400 the ``field`` at fault."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str = "",
        *,
        field: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = tuple(headers)
        super().__init__(f"{status} {code}: {message}")

    def response(self) -> Response:
        body: dict[str, Any] = {"error": self.code}
        if self.field is not None:
            body["field"] = self.field
        if self.message:
            body["message"] = self.message
        return json_response(body, self.status, headers=self.headers)


def invalid(field: str, message: str) -> HTTPError:
    """The 400 for bad input: ``{"error": "invalid", "field": ..., "message": ...}``."""
    return HTTPError(400, "invalid", message, field=field)


@dataclass(slots=True)
class Request:
    """One request to the admin app, the path relative to where it is mounted.

    :param path: the decoded path below the mount, starting with ``/`` (``/api/keys``).
    :param segments: the path's segments, each percent-decoded on its own, so an id holding an
        encoded ``/`` stays one segment.
    :param root: the mount point (``""`` at the root, ``/admin`` under a prefix): links and the
        session cookie's ``Path`` are built on it.
    :param headers: lower-cased names; repeated headers joined with ``", "``.
    """

    method: str
    path: str
    query: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    root: str = ""
    scheme: str = "http"
    segments: tuple[str, ...] = ()
    client: str | None = None
    #: the ``{name}`` parts of the matched route, decoded
    params: dict[str, str] = field(default_factory=dict)
    #: who made the request, once authenticated (``_auth.authenticate``)
    admin: Admin | None = None
    _form: dict[str, str] | None = None

    @classmethod
    def build(
        cls,
        method: str,
        raw_path: str,
        query_string: str = "",
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        *,
        root: str = "",
        scheme: str = "http",
        client: str | None = None,
    ) -> Request:
        """From what a driver has: ``raw_path`` still percent-encoded, below the mount."""
        joined: dict[str, str] = {}
        for name, value in headers:
            key = name.lower()
            # HTTP/2 sends each cookie in a header of its own: they are joined with "; "
            sep = "; " if key == "cookie" else ", "
            joined[key] = f"{joined[key]}{sep}{value}" if key in joined else value
        raw = raw_path if raw_path.startswith("/") else "/" + raw_path
        segments = tuple(unquote(s, errors="replace") for s in raw.split("/")[1:])
        query: dict[str, str] = {}
        for k, v in parse_qsl(query_string, keep_blank_values=True):
            query.setdefault(k, v)  # the first of repeated parameters
        return cls(
            method=method.upper(),
            path=unquote(raw, errors="replace"),
            query=query,
            headers=joined,
            body=body,
            root=root.rstrip("/"),
            scheme=scheme,
            segments=segments,
            client=client,
        )

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()

    def json(self) -> Any:
        """The body as JSON (an empty body is ``{}``); 400 ``invalid`` naming ``body`` when it
        is not JSON."""
        if not self.body.strip():
            return {}
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            raise invalid("body", "the request body is not valid JSON") from None

    def form(self) -> dict[str, str]:
        """An ``application/x-www-form-urlencoded`` body as a dict (first value of each field);
        ``{}`` for any other content type."""
        if self._form is None:
            form: dict[str, str] = {}
            if self.content_type == "application/x-www-form-urlencoded":
                text = self.body.decode("utf-8", "replace")
                for k, v in parse_qsl(text, keep_blank_values=True):
                    form.setdefault(k, v)
            self._form = form
        return self._form

    def data(self) -> dict[str, Any]:
        """The body's fields, from JSON or a form, whichever the content type says; 400 naming
        ``body`` when a JSON body is not an object."""
        if self.content_type == "application/x-www-form-urlencoded":
            return dict(self.form())
        value = self.json()
        if not isinstance(value, dict):
            raise invalid("body", "the request body must be a JSON object")
        return value

    @property
    def host_url(self) -> str:
        """``scheme://host`` as the client addressed it (the ``Host`` header)."""
        return f"{self.scheme}://{self.headers.get('host', '')}"


@dataclass(slots=True)
class Response:
    """What a handler returns: status, content type, the body, and extra headers."""

    status: int = 200
    content_type: str = "application/json"
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)

    def header_list(self) -> list[tuple[str, str]]:
        """Every header to send, the content type and length first."""
        out = [("content-type", self.content_type), ("content-length", str(len(self.body)))]
        names = {n.lower() for n, _ in self.headers}
        # admin answers hold operational data: never cached, never sniffed as something else
        if "cache-control" not in names:
            out.append(("cache-control", "no-store"))
        out.append(("x-content-type-options", "nosniff"))
        return out + list(self.headers)


def json_response(
    data: Any, status: int = 200, *, headers: Sequence[tuple[str, str]] = ()
) -> Response:
    body = json.dumps(data, separators=(",", ":"), default=_default).encode()
    return Response(status, "application/json", body, list(headers))


def _default(value: Any) -> Any:
    if isinstance(value, set | frozenset | tuple):
        return sorted(value) if isinstance(value, set | frozenset) else list(value)
    return str(value)


# -- routing --------------------------------------------------------------------------------------
_PARAM = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")


@dataclass(frozen=True, slots=True)
class Route:
    """One route. ``public`` routes run without credentials (the login page and form, static
    assets); ``unauthorized`` answers an unauthenticated request instead of the 401 (the
    dashboard redirects a browser to its login page)."""

    method: str
    pattern: str
    parts: tuple[str, ...]
    handler: Handler
    public: bool = False
    unauthorized: Handler | None = None


class Router:
    """Routes by method and path pattern: ``/api/callers/{tenant}/{caller}`` (one segment per
    ``{name}``; a trailing ``/`` in a pattern is part of it). Literal segments beat
    parameters, so ``/api/keys/{key_id}`` never shadows a more specific route."""

    def __init__(self) -> None:
        self.routes: list[Route] = []

    def add(
        self,
        method: str,
        pattern: str,
        handler: Handler,
        *,
        public: bool = False,
        unauthorized: Handler | None = None,
    ) -> None:
        """Register ``handler`` for ``method`` (GET, POST, PUT, PATCH, DELETE) on ``pattern``;
        a second handler for the same method and pattern is an error."""
        method = method.upper()
        if not pattern.startswith("/"):
            raise ValueError(f"route pattern must start with '/': {pattern!r}")
        parts = tuple(pattern.split("/")[1:])
        for r in self.routes:
            if r.method == method and r.parts == parts:
                raise ValueError(f"route {method} {pattern} is registered already")
        self.routes.append(Route(method, pattern, parts, handler, public, unauthorized))

    def match(self, method: str, segments: Sequence[str]) -> tuple[Route, dict[str, str]]:
        """The route for ``method`` and the path's ``segments`` and its parameters; raises
        :class:`HTTPError` 404 (no route has this path) or 405 (none for this method)."""
        best: tuple[int, Route, dict[str, str]] | None = None
        allowed: set[str] = set()
        for route in self.routes:
            params = _match(route.parts, segments)
            if params is None:
                continue
            if route.method != method and not (method == "HEAD" and route.method == "GET"):
                allowed.add(route.method)
                continue
            score = sum(1 for p in route.parts if not _PARAM.match(p))
            if best is None or score > best[0]:
                best = (score, route, params)
        if best is not None:
            return best[1], best[2]
        if allowed:
            raise HTTPError(
                405, "method_not_allowed", headers=[("allow", ", ".join(sorted(allowed)))]
            )
        raise HTTPError(404, "not_found")


def _match(parts: Sequence[str], segments: Sequence[str]) -> dict[str, str] | None:
    if len(parts) != len(segments):
        return None
    params: dict[str, str] = {}
    for part, seg in zip(parts, segments, strict=True):
        m = _PARAM.match(part)
        if m is not None:
            if not seg:
                return None
            params[m.group(1)] = seg
        elif part != seg:
            return None
    return params
