"""``WSGIAIProxy``: the backend proxy as a WSGI app (Flask, Django, gunicorn), on one pooled,
thread-safe httpx client."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httpx

from quota_middleware.config import QuotaConfig
from quota_middleware.core._exchange import METER_KEY
from quota_middleware.proxy._asgi import (
    KEY_ID,
    check_http2,
    client_options,
    policy_path,
    proxy_config,
    transport_error,
)
from quota_middleware.proxy._config import ProxyConfig
from quota_middleware.proxy._plan import (
    KeyRing,
    Outbound,
    Refusal,
    UsageStripper,
    error,
    plan_request,
    relay_mode,
    response_headers,
)

__all__ = ["WSGIAIProxy"]

log = logging.getLogger("quota_middleware.proxy")

StartResponse = Callable[..., Any]


class WSGIAIProxy:
    """The WSGI twin of :class:`~quota_middleware.proxy.AIProxy`, e.g. for Flask::

        app.wsgi_app = WSGIQuotaMiddleware(
            DispatcherMiddleware(app.wsgi_app, {"/ai": WSGIAIProxy(config)}), config=config)

    The response is relayed chunk by chunk as the upstream sends it; when the server closes the
    response early (the client went away), the upstream request is closed with it.
    """

    def __init__(
        self,
        config: QuotaConfig | ProxyConfig | str | os.PathLike[str],
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.config = proxy_config(config)
        check_http2(self.config)
        self.keys = KeyRing(self.config)
        self.client = httpx.Client(**client_options(self.config, transport))

    @classmethod
    def from_env(cls, **kwargs: Any) -> WSGIAIProxy:
        """The proxy of the policy file named by ``QUOTA_POLICY``."""
        return cls(policy_path(), **kwargs)

    def close(self) -> None:
        self.client.close()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        body = _read_body(environ, self.config.max_body)
        if body is None:
            return _answer(start_response, error(413, "request_too_large", "too large"))
        meter = environ.get(METER_KEY)
        raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
        path = str(raw).split("?", 1)[0] if raw else _quoted(environ.get("PATH_INFO", ""))
        script = str(environ.get("SCRIPT_NAME") or "")
        if raw and script and path.startswith(script):
            path = path[len(script) :]
        plan = plan_request(
            self.config,
            self.keys,
            method=str(environ.get("REQUEST_METHOD", "GET")),
            raw_path=path,
            query=str(environ.get("QUERY_STRING") or ""),
            headers=_headers(environ),
            body=body,
            metered=meter is not None,
        )
        if isinstance(plan, Refusal):
            return _answer(start_response, plan)
        environ[KEY_ID] = plan.key_id
        request = self.client.build_request(plan.method, plan.url, headers=plan.headers,
                                            content=plan.body)  # fmt: skip
        try:
            response = self.client.send(request, stream=True)
        except httpx.HTTPError as e:
            log.warning("quota_middleware.proxy: %s: %s", plan.upstream.name, type(e).__name__)
            return _answer(start_response, transport_error(e))
        decode, strip = relay_mode(plan.strip_usage, response.headers.get("content-encoding"))
        headers = response_headers(response.headers.multi_items(), stripped=strip, decoded=decode)
        start_response(f"{response.status_code} {response.reason_phrase}", headers)
        return _Body(plan, response, UsageStripper() if strip else None, meter, decode)


class _Body:
    """The relayed body; ``close()`` (the server calls it, also on a client disconnect)
    closes the upstream response."""

    def __init__(
        self,
        plan: Outbound,
        response: httpx.Response,
        stripper: UsageStripper | None,
        meter: Callable[[bytes], None] | None,
        decode: bool = False,
    ) -> None:
        self.plan, self.response, self.stripper, self.meter = plan, response, stripper, meter
        self.decode = decode

    def __iter__(self) -> Iterator[bytes]:
        stripper = self.stripper
        try:
            chunks = self.response.iter_bytes() if self.decode else self.response.iter_raw()
            for chunk in chunks:
                if stripper is None:
                    yield chunk
                    continue
                yield from self._pieces(stripper.feed(chunk))
        except httpx.HTTPError as e:
            log.warning("quota_middleware.proxy: %s stream cut: %s", self.plan.upstream.name,
                        type(e).__name__)  # fmt: skip
        if stripper is not None:
            yield from self._pieces(stripper.finish())

    def _pieces(self, pieces: list[tuple[bytes, bool]]) -> Iterator[bytes]:
        for data, to_client in pieces:
            if to_client:
                yield data
            elif self.meter is not None:
                self.meter(data)

    def close(self) -> None:
        self.response.close()


def _quoted(path: str) -> str:
    # PATH_INFO is decoded (as latin-1 per PEP 3333); quote it back so encoded slashes and
    # the like are judged as the client sent them where the server gives no raw URI
    from urllib.parse import quote

    return quote(path.encode("latin-1").decode("utf-8", "replace"), safe="/:@!$'()*+,;=-._~")


def _headers(environ: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for k, v in environ.items():
        if k.startswith("HTTP_"):
            out.append((k[5:].replace("_", "-").lower(), str(v)))
    if environ.get("CONTENT_TYPE"):
        out.append(("content-type", str(environ["CONTENT_TYPE"])))
    return out


def _read_body(environ: dict[str, Any], limit: int) -> bytes | None:
    length = str(environ.get("CONTENT_LENGTH") or "")
    stream = environ.get("wsgi.input")
    if stream is None:
        return b""
    if length.isdigit():
        if int(length) > limit:
            return None
        return bytes(stream.read(int(length)))
    data = stream.read(limit + 1)  # chunked: the server ends the stream
    return None if len(data) > limit else bytes(data)


def _answer(start_response: StartResponse, refusal: Refusal) -> list[bytes]:
    start_response(f"{refusal.status} {_REASONS.get(refusal.status, '')}".strip(), refusal.headers)
    return [refusal.body]


_REASONS = {
    400: "Bad Request", 404: "Not Found", 413: "Content Too Large", 502: "Bad Gateway",
    504: "Gateway Timeout",
}  # fmt: skip
