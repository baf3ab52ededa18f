"""The standalone gateway (``quota-middleware serve``): the proxy behind the middleware, with
``/health`` and ``/metrics`` beside them, as one ASGI app for uvicorn.

``/health`` and ``/metrics`` are answered before the middleware (no caller, no limit); every
other path goes through :class:`~quota_middleware.QuotaMiddleware` to :class:`AIProxy`. With
several workers each process has its own pooled connections and shares the limits through
Redis; set ``PROMETHEUS_MULTIPROC_DIR`` for one ``/metrics`` over all of them.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from quota_middleware.asgi import QuotaMiddleware, Receive, Scope, Send
from quota_middleware.config import load_config
from quota_middleware.errors import ConfigurationError
from quota_middleware.proxy._asgi import AIProxy, policy_path
from quota_middleware.proxy._plan import error

__all__ = ["Gateway", "create_app"]

log = logging.getLogger("quota_middleware.gateway")


class Gateway:
    """``/health``, ``/metrics``, then the middleware and the proxy."""

    def __init__(self, policy: str | os.PathLike[str]) -> None:
        config = load_config(policy)
        if config.proxy is None:
            raise ConfigurationError("proxy", "serve needs [[proxy.upstreams]] in the policy")
        self.metrics, self.registry = _metrics()
        self.proxy = AIProxy(config)
        self.app = QuotaMiddleware(self.proxy, config=config, metrics=self.metrics)
        self.mount = config.proxy.mount

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        path = scope.get("path", "")
        if kind == "http" and path == "/health":
            await _reply(send, 200, b'{"status":"ok"}', "application/json")
            return
        if kind == "http" and path == "/metrics" and self.registry is not None:
            await _reply(send, 200, *self._exposition())
            return
        if self.mount:
            # the proxy is mounted at the policy's proxy.mount, as an app would mount it
            if path != self.mount and not path.startswith(self.mount + "/"):
                refusal = error(404, "not_found", "no route at this path")
                await _reply(send, 404, refusal.body, "application/json")
                return
            scope = {**scope, "root_path": str(scope.get("root_path") or "") + self.mount}
        await self.app(scope, receive, send)

    def _exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        registry = self.registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                # uvicorn has let in-flight requests (and their settles) finish by now
                await self.proxy.aclose()
                if self.app.alerts is not None:
                    self.app.alerts.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _metrics() -> tuple[Any, Any]:
    try:
        from prometheus_client import CollectorRegistry
    except ImportError:
        log.warning("quota_middleware: /metrics is off: pip install 'quota-middleware[metrics]'")
        return None, None
    from quota_middleware.metrics import PrometheusMetrics

    # the gateway's own registry: a second Gateway in one process (serve checks the policy
    # before uvicorn builds the app) must not collide with the first one's series
    registry = CollectorRegistry()
    return PrometheusMetrics(registry), registry


async def _reply(send: Send, status: int, body: bytes, content_type: str) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app() -> Gateway:
    """The gateway of the policy named by ``QUOTA_POLICY`` (uvicorn's ``--factory`` entry)."""
    return Gateway(policy_path())
