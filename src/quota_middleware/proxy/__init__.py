"""The backend proxy: forwards AI API calls to configured upstreams with server-side keys, so
the frontend never holds one. Mount :class:`AIProxy` (ASGI) or :class:`WSGIAIProxy` behind the
middleware; ``quota-middleware serve`` runs it as a standalone gateway.

Owns the proxy's policy values (``_config``, at the policy layer: the config imports them),
the sans-IO request plan and usage stripper (``_plan``), and the two drivers (``_asgi``,
``_wsgi``, at the adapters' layer; they need httpx: ``pip install 'quota-middleware[proxy]'``).
The drivers load lazily, so the policy can import the values without httpx installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quota_middleware.proxy._config import ProxyConfig, Upstream, UpstreamKey

if TYPE_CHECKING:
    from quota_middleware.proxy._asgi import AIProxy
    from quota_middleware.proxy._wsgi import WSGIAIProxy

__all__ = ["AIProxy", "ProxyConfig", "Upstream", "UpstreamKey", "WSGIAIProxy"]


def __getattr__(name: str) -> Any:
    if name == "AIProxy":
        from quota_middleware.proxy._asgi import AIProxy

        return AIProxy
    if name == "WSGIAIProxy":
        from quota_middleware.proxy._wsgi import WSGIAIProxy

        return WSGIAIProxy
    raise AttributeError(f"module 'quota_middleware.proxy' has no attribute {name!r}")
