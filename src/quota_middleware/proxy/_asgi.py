"""``AIProxy``: the backend proxy as an ASGI app, on one pooled httpx client per event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import weakref
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import httpx

# the middleware's own bounded body reader: the same rules (a declared length over the limit is
# refused before anything is read)
from quota_middleware.asgi import _read_body as read_body
from quota_middleware.config import QuotaConfig, load_config
from quota_middleware.core._exchange import METER_KEY
from quota_middleware.errors import ConfigurationError
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

__all__ = ["AIProxy", "client_options", "policy_path", "proxy_config"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger("quota_middleware.proxy")

#: the key in ``scope["state"]`` (ASGI) or the environ (WSGI) where the proxy leaves the id of
#: the server key it used (never the key)
KEY_ID = "quota_middleware.upstream_key"


def proxy_config(config: QuotaConfig | ProxyConfig | str | os.PathLike[str]) -> ProxyConfig:
    """The :class:`ProxyConfig` of a policy (a value, or the path of a TOML file)."""
    if isinstance(config, ProxyConfig):
        return config
    policy = load_config(config)
    if policy.proxy is None:
        raise ConfigurationError(
            "proxy", "the policy has no [proxy] table with [[proxy.upstreams]]"
        )
    return policy.proxy


def check_http2(config: ProxyConfig) -> None:
    """``http2 = true`` needs the ``h2`` package: say so at startup, not at the first call."""
    if config.http2:
        import importlib.util

        if importlib.util.find_spec("h2") is None:
            raise ConfigurationError("proxy.http2", "needs: pip install 'httpx[http2]'")


def client_options(config: ProxyConfig, transport: Any) -> dict[str, Any]:
    """What the pooled httpx client of either driver is built with."""
    return {
        "timeout": httpx.Timeout(
            connect=config.connect_timeout,
            read=config.read_timeout,
            write=config.write_timeout,
            pool=config.connect_timeout,
        ),
        "limits": httpx.Limits(max_keepalive_connections=config.max_connections),
        "http2": config.http2,
        "transport": transport,
        "follow_redirects": False,  # a redirect could lead anywhere: never followed
        "trust_env": False,  # no .netrc credentials or environment proxies
    }


def policy_path() -> str:
    """The policy file named by ``QUOTA_POLICY`` (``from_env``, the gateway's factory)."""
    path = os.environ.get("QUOTA_POLICY")
    if not path:
        raise ConfigurationError("QUOTA_POLICY", "set it to the policy file's path")
    return path


def transport_error(e: Exception) -> Refusal:
    """The answer to an upstream that could not be reached or did not answer in time. The
    message is ours: httpx's text can name hosts and ports, never a key, but says nothing
    useful to a client either."""
    if isinstance(e, httpx.TimeoutException):
        return error(504, "upstream_timeout", "the upstream did not answer in time")
    return error(502, "upstream_unavailable", "the upstream could not be reached")


class AIProxy:
    """Forwards AI API calls to the configured upstreams with server-side keys::

        app.mount("/ai", AIProxy(config))            # config: QuotaConfig with a [proxy] table

    Mount it behind :class:`~quota_middleware.QuotaMiddleware`, with the same policy: the
    proxy's AI routes are derived from ``config.proxy``, so they are limited and metered
    without being declared twice.

    :param transport: an httpx transport for the upstream calls (tests, a fake upstream).
    """

    def __init__(
        self,
        config: QuotaConfig | ProxyConfig | str | os.PathLike[str],
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = proxy_config(config)
        check_http2(self.config)
        self.keys = KeyRing(self.config)  # resolved now: a missing key fails at startup
        self._transport = transport
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
            weakref.WeakKeyDictionary()
        )

    @classmethod
    def from_env(cls, **kwargs: Any) -> AIProxy:
        """The proxy of the policy file named by ``QUOTA_POLICY``."""
        return cls(policy_path(), **kwargs)

    def client(self) -> httpx.AsyncClient:
        """This event loop's pooled client (a connection belongs to the loop that opened it)."""
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None or client.is_closed:
            client = httpx.AsyncClient(**client_options(self.config, self._transport))
            self._clients[loop] = client
        return client

    async def aclose(self) -> None:
        """Close this loop's pooled client (the standalone gateway does it at shutdown)."""
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        body = await read_body(scope, receive, self.config.max_body)
        if body is None:
            await _answer(send, error(413, "request_too_large", "the request body is too large"))
            return
        state = scope.get("state") or {}
        meter = state.get(METER_KEY)
        plan = self._plan(scope, scope["method"], body, metered=meter is not None)
        if isinstance(plan, Refusal):
            await _answer(send, plan)
            return
        if "state" in scope:
            scope["state"][KEY_ID] = plan.key_id
        relay = asyncio.ensure_future(self._forward(plan, send, meter))
        watcher = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({relay, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            relay.cancel()
            raise
        finally:
            watcher.cancel()
        if not relay.done():
            # the client went away: stop reading the upstream now (closing its connection
            # ends the generation there) rather than at the next chunk we fail to send
            relay.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await relay

    def _plan(self, scope: Scope, method: str, body: bytes, *, metered: bool) -> Outbound | Refusal:
        return plan_request(
            self.config,
            self.keys,
            method=method,
            raw_path=_path_under_mount(scope),
            query=bytes(scope.get("query_string") or b"").decode("latin-1"),
            headers=[
                (bytes(k).decode("latin-1").lower(), bytes(v).decode("latin-1"))
                for k, v in scope.get("headers") or ()
            ],
            body=body,
            metered=metered,
        )

    async def _forward(
        self, plan: Outbound, send: Send, meter: Callable[[bytes], None] | None
    ) -> None:
        client = self.client()
        request = client.build_request(plan.method, plan.url, headers=plan.headers,
                                       content=plan.body)  # fmt: skip
        try:
            response = await client.send(request, stream=True)
        except httpx.HTTPError as e:
            log.warning("quota_middleware.proxy: %s %s: %s", plan.upstream.name,
                        plan.endpoint.pattern, type(e).__name__)  # fmt: skip
            await _answer(send, transport_error(e))
            return
        try:
            decode, strip = relay_mode(plan.strip_usage, response.headers.get("content-encoding"))
            stripper = UsageStripper() if strip else None
            headers = response_headers(
                response.headers.multi_items(), stripped=strip, decoded=decode
            )
            await send({
                "type": "http.response.start", "status": response.status_code,
                "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            })  # fmt: skip
            try:
                chunks = response.aiter_bytes() if decode else response.aiter_raw()
                async for chunk in chunks:
                    if stripper is None:
                        await send({"type": "http.response.body", "body": chunk,
                                    "more_body": True})  # fmt: skip
                        continue
                    await _send_pieces(send, stripper.feed(chunk), meter)
            except httpx.HTTPError as e:
                # the stream was cut (idle timeout, upstream gone): the client gets what came,
                # the meter charges it by estimate
                log.warning("quota_middleware.proxy: %s stream cut: %s", plan.upstream.name,
                            type(e).__name__)  # fmt: skip
            if stripper is not None:
                await _send_pieces(send, stripper.finish(), meter)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket (OpenAI Realtime) forwarded to the upstream with the server's key, both
        ways, until either side closes; the middleware in front meters what the app sends."""
        if (await receive())["type"] != "websocket.connect":
            return
        plan = self._plan(scope, "WEBSOCKET", b"", metered=False)
        if isinstance(plan, Refusal):
            await send({"type": "websocket.close", "code": 1008, "reason": str(plan.status)})
            return
        try:
            from websockets.asyncio.client import connect
        except ImportError:
            log.error("quota_middleware.proxy: WebSocket forwarding needs the websockets package")
            await send({"type": "websocket.close", "code": 1011, "reason": "unavailable"})
            return
        # a browser's credential can ride in a subprotocol ("openai-insecure-api-key.<key>"):
        # only plain protocol names go on
        protocols = [p for p in scope.get("subprotocols") or () if "key" not in p.lower()]
        try:
            upstream = await connect(
                plan.url, additional_headers=plan.headers, open_timeout=self.config.connect_timeout,
                subprotocols=protocols or None, max_size=None, user_agent_header=None,
            )  # fmt: skip
        except Exception as e:
            log.warning("quota_middleware.proxy: %s WebSocket: %s", plan.upstream.name,
                        type(e).__name__)  # fmt: skip
            await send({"type": "websocket.close", "code": 1011, "reason": "upstream unavailable"})
            return
        await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})

        async def from_client() -> None:
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message["type"] == "websocket.receive":
                    text = message.get("text")
                    await upstream.send(text if text is not None else message.get("bytes") or b"")

        async def from_upstream() -> None:
            async for data in upstream:
                key = "text" if isinstance(data, str) else "bytes"
                await send({"type": "websocket.send", key: data})

        up = asyncio.ensure_future(from_upstream())
        down = asyncio.ensure_future(from_client())
        try:
            done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (up, down):
                task.cancel()
            await upstream.close()
        if up in done:  # the upstream ended it: so does the client's side, with its code
            code = upstream.close_code or 1000
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": code})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _send_pieces(
    send: Send, pieces: list[tuple[bytes, bool]], meter: Callable[[bytes], None] | None
) -> None:
    for data, to_client in pieces:
        if to_client:
            await send({"type": "http.response.body", "body": data, "more_body": True})
        elif meter is not None:
            meter(data)


def _path_under_mount(scope: Scope) -> str:
    """The request path below the mount point, percent-encoded as the client sent it."""
    raw = scope.get("raw_path")
    path = bytes(raw).decode("latin-1") if raw else str(scope.get("path", ""))
    path = path.split("?", 1)[0]
    root = str(scope.get("root_path") or "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _answer(send: Send, refusal: Refusal) -> None:
    await send({
        "type": "http.response.start", "status": refusal.status,
        "headers": [(k.encode(), v.encode()) for k, v in refusal.headers],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": refusal.body})
