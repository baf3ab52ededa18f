"""The proxy's decisions, sans-IO: what to send upstream for a client request, and what of the
upstream's stream the client gets. Both proxy apps (ASGI, WSGI) are thin drivers over these.

Request side (:func:`plan_request`): the path is checked before anything else (no ``..``, no
encoded slash or control character, no empty segment, so nothing but the configured base URL
can be reached), matched against the upstream's known API surface, and joined onto its base
URL; only an allow-list of headers goes on, every client credential is dropped and the
server's key put in. Response side (:class:`UsageStripper`): when the proxy asked an
OpenAI-format stream for its usage on the client's behalf, the usage-only final chunk and the
``"usage":null`` fields go to the meter, not to the client.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlencode

from quota_middleware.proxy._config import Endpoint, ProxyConfig, Secret, Upstream

__all__ = [
    "KeyRing",
    "Outbound",
    "Refusal",
    "UsageStripper",
    "error",
    "plan_request",
    "relay_mode",
    "response_headers",
]

#: request headers forwarded upstream; everything else (cookies, client credentials, proxy
#: and forwarding headers, hop-by-hop headers) is dropped
FORWARDED = frozenset(
    {
        "accept", "accept-encoding", "content-type", "user-agent", "idempotency-key",
        "anthropic-version", "anthropic-beta", "openai-beta", "x-goog-api-client",
    }
)  # fmt: skip
#: what goes on for a WebSocket: the handshake's own headers are the client library's business
WS_FORWARDED = frozenset({"openai-beta", "user-agent"})
#: query parameters that carry credentials (Gemini's ``?key=``, and common variants)
_CREDENTIAL_PARAMS = frozenset({"key", "api_key", "api-key", "apikey", "access_token", "token"})
#: response headers not passed back: hop-by-hop (RFC 9110 §7.6.1) and upstream cookies
_DROPPED_RESPONSE = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-connection", "te", "trailer",
        "transfer-encoding", "upgrade", "set-cookie", "alt-svc",
    }
)  # fmt: skip
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._~:!$'()*+,;=@-]+")
_ANTHROPIC_VERSION = "2023-06-01"


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request the proxy answers itself (400, 404, 413, 502, 504), in OpenAI's error shape."""

    status: int
    body: bytes

    @property
    def headers(self) -> list[tuple[str, str]]:
        return [("content-type", "application/json"), ("content-length", str(len(self.body)))]


def error(status: int, code: str, message: str) -> Refusal:
    kind = "invalid_request_error" if status < 500 else "upstream_error"
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return Refusal(status, json.dumps(body, separators=(",", ":")).encode())


@dataclass(frozen=True, slots=True)
class Outbound:
    """The upstream request to send."""

    upstream: Upstream
    endpoint: Endpoint
    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes
    #: the id of the server key used (never its value)
    key_id: str | None
    #: the proxy asked for the stream's usage: strip it from the client's view
    strip_usage: bool


class KeyRing:
    """The resolved server keys of every upstream, used in turn."""

    def __init__(self, config: ProxyConfig) -> None:
        self._keys: dict[str, list[tuple[str, Secret]]] = {
            u.name: [(k.id, k.resolve()) for k in u.keys] for u in config.upstreams
        }
        self._turn = {name: itertools.cycle(range(len(ks))) for name, ks in self._keys.items()}

    def next(self, upstream: Upstream) -> tuple[str, Secret] | None:
        keys = self._keys[upstream.name]
        if not keys:
            return None
        return keys[next(self._turn[upstream.name])]


def _segments(raw: str) -> list[str] | None:
    """The path's segments, still percent-encoded, or None when any is unsafe: empty (``//``,
    a trailing ``/``), a dot segment, or one whose decoded form holds anything but the plain
    characters of model and deployment names (an encoded ``/`` or ``\\``, CR/LF, ``%``)."""
    if not raw.startswith("/"):
        return None
    parts = raw[1:].split("/")
    for part in parts:
        decoded = unquote(part, errors="strict") if "%" in part else part
        if decoded in (".", "..") or not _SEGMENT_RE.fullmatch(decoded):
            return None
    return parts


def plan_request(
    config: ProxyConfig,
    keys: KeyRing,
    *,
    method: str,
    raw_path: str,
    query: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    metered: bool,
) -> Outbound | Refusal:
    """The upstream request for a client request, or the refusal to answer with.

    ``raw_path`` is the path under the mount, exactly as the client sent it (percent-encoded);
    ``metered``: the middleware meters this response (the proxy may then ask for usage).
    """
    try:
        segments = _segments(raw_path)
    except UnicodeDecodeError:
        segments = None
    if segments is None:
        return error(400, "invalid_path", "the request path is not a valid API path")
    method = method.upper()
    found = _route(config.upstreams, segments, method)
    if isinstance(found, Refusal):
        return found
    upstream, endpoint, path = found
    allowed = WS_FORWARDED if method == "WEBSOCKET" else FORWARDED
    out_headers = [(k, v) for k, v in headers if k in allowed]
    strip = False
    if (
        endpoint.stream_usage_flag and upstream.inject_usage and metered
    ):  # ask for the usage the client did not ask for, and hide it from the client
        body, strip = _with_include_usage(body)
    if strip:
        # the usage chunk is cut out of the stream, which cannot be done inside a compressed one
        out_headers = [(k, v) for k, v in out_headers if k != "accept-encoding"]
        out_headers.append(("accept-encoding", "identity"))
    key = keys.next(upstream)
    out_headers += _auth(upstream, key[1] if key else None, out_headers)
    out_headers += list(upstream.headers.items())
    url = f"{upstream.base_url}/{path}{_query(upstream, path, query)}"
    if method == "WEBSOCKET":  # the same host and path, on its WebSocket scheme
        url = "ws" + url[4:] if url.startswith("http:") else "wss" + url[5:]
    return Outbound(
        upstream=upstream,
        endpoint=endpoint,
        method=method,
        url=url,
        headers=out_headers,
        body=body,
        key_id=key[0] if key else None,
        strip_usage=strip,
    )


def _route(
    upstreams: Sequence[Upstream], segments: list[str], method: str
) -> tuple[Upstream, Endpoint, str] | Refusal:
    """The first upstream (in the policy's order) whose prefix starts the path and whose
    surface has the operation: upstreams may share a prefix when their surfaces differ (an
    OpenAI and an Anthropic upstream both under ``/v1``, as the SDKs' paths are)."""
    prefixed = False
    for u in upstreams:
        assert u.prefix is not None
        want = u.prefix.split("/")[1:] if u.prefix else []
        if segments[: len(want)] != want or len(segments) <= len(want):
            continue
        prefixed = True
        path = "/".join(segments[len(want) :])
        plain = unquote(path)
        endpoint = next((e for e in u.endpoints if e.matches(method, plain)), None)
        if endpoint is not None:
            return u, endpoint, path
    if not prefixed:
        return error(404, "unknown_upstream", "no upstream is configured at this path")
    return error(404, "unknown_endpoint", "this method and path are not forwarded")


def _query(upstream: Upstream, path: str, query: str) -> str:
    pairs = [
        (k, v)
        for k, v in parse_qsl(query, keep_blank_values=True)
        if k.lower() not in _CREDENTIAL_PARAMS
    ]
    if (
        upstream.provider == "azure"
        and upstream.api_version
        and path.startswith("deployments/")
        and not any(k == "api-version" for k, _ in pairs)
    ):
        pairs.append(("api-version", upstream.api_version))
    return "?" + urlencode(pairs) if pairs else ""


def _auth(
    upstream: Upstream, key: Secret | None, sent: Sequence[tuple[str, str]]
) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    provider = upstream.provider
    if provider == "anthropic" and not any(k == "anthropic-version" for k, _ in sent):
        out.append(("anthropic-version", _ANTHROPIC_VERSION))
    if key is None:
        return out
    if provider == "azure":
        out.append(("api-key", key.reveal()))
    elif provider == "anthropic":
        out.append(("x-api-key", key.reveal()))
    elif provider == "gemini":
        out.append(("x-goog-api-key", key.reveal()))
    else:
        out.append(("authorization", f"Bearer {key.reveal()}"))
    return out


def _with_include_usage(body: bytes) -> tuple[bytes, bool]:
    """``body`` with ``stream_options.include_usage`` set, and whether it was added (a streamed
    request that did not ask for it); other bodies are sent as they came."""
    if b'"stream"' not in body:
        return body, False
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return body, False
    if not isinstance(obj, dict) or obj.get("stream") is not True:
        return body, False
    options = obj.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return body, False  # the client asked for it and gets it
    if options is not None and not isinstance(options, dict):
        return body, False  # the upstream will say what is wrong with it
    obj["stream_options"] = {**(options or {}), "include_usage": True}
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode(), True


def relay_mode(strip: bool, content_encoding: str | None) -> tuple[bool, bool]:
    """``(decode, strip)`` for a response: the usage chunk can only be cut out of plain bytes.
    We asked for ``identity``; an upstream that compresses anyway is decoded (gzip, deflate:
    httpx reads them) and relayed plain, so the client still gets the stream it asked for;
    one we cannot decode is relayed as it came, usage chunk included (the charge stays exact)."""
    if not strip:
        return False, False
    codings = [c.strip().lower() for c in (content_encoding or "").split(",") if c.strip()]
    if all(c == "identity" for c in codings):
        return False, True
    if all(c in ("gzip", "x-gzip", "deflate", "identity") for c in codings):
        return True, True
    return False, False


def response_headers(
    headers: Iterable[tuple[str, str]], *, stripped: bool, decoded: bool = False
) -> list[tuple[str, str]]:
    """The upstream's response headers the client gets: hop-by-hop headers and cookies
    dropped, the length too when the body was changed, ``x-request-id`` renamed
    ``x-upstream-request-id``."""
    out = []
    for k, v in headers:
        name = k.lower()
        if name in _DROPPED_RESPONSE or (stripped and name == "content-length"):
            continue
        if decoded and name == "content-encoding":
            continue
        # the middleware's x-request-id names the charge; the provider's keeps its value
        out.append(("x-upstream-request-id" if name == "x-request-id" else k, v))
    return out


# -- the response side ---------------------------------------------------------------------------

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_USAGE_NULL = re.compile(rb',\s*"usage"\s*:\s*null(?=\s*[,}])|"usage"\s*:\s*null\s*,')


class UsageStripper:
    """Splits an OpenAI-format SSE stream the proxy asked for usage into what the client gets
    and what only the meter sees: the usage-only final chunk (``"choices": []``) and the
    ``"usage": null`` field OpenAI then adds to every other chunk.

    :meth:`feed` returns ``(bytes, to_client)`` pieces in stream order, cut only where an event
    ends (the part of an event not yet complete waits for its end, which is usually in the same
    chunk); :meth:`finish` returns what is left.
    """

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list[tuple[bytes, bool]]:
        buf = self._pending + data if self._pending else data
        end = 0
        for sep in (b"\n\n", b"\r\n\r\n", b"\r\r"):
            i = buf.rfind(sep)
            if i >= 0:
                end = max(end, i + len(sep))
        self._pending = buf[end:]
        return self._split(buf[:end]) if end else []

    def finish(self) -> list[tuple[bytes, bool]]:
        rest, self._pending = self._pending, b""
        return [(rest, True)] if rest else []

    def _split(self, events: bytes) -> list[tuple[bytes, bool]]:
        if b'"usage"' not in events:
            return [(events, True)]
        out: list[tuple[bytes, bool]] = []
        client: list[bytes] = []
        start = 0
        for m in _EVENT_END.finditer(events):
            event = events[start : m.end()]
            start = m.end()
            if b'"usage"' not in event:
                client.append(event)
            elif _usage_only(event):
                if client:
                    out.append((b"".join(client), True))
                    client = []
                out.append((event, False))
            else:
                client.append(_USAGE_NULL.sub(b"", event))
        if client:
            out.append((b"".join(client), True))
        return out


def _usage_only(event: bytes) -> bool:
    """Whether an SSE event is the usage chunk ``include_usage`` adds (no choices, a usage)."""
    data = [
        line[5:].lstrip(b" ")
        for line in re.split(rb"\r\n|\n|\r", event)
        if line.startswith(b"data:")
    ]
    if not data:
        return False
    try:
        obj = json.loads(b"\n".join(data))
    except (ValueError, RecursionError):
        return False
    return (
        isinstance(obj, Mapping) and obj.get("choices") == [] and isinstance(obj.get("usage"), dict)
    )
