"""What the FastAPI and Flask examples share: demo credentials and the choice of upstream.

Everything named ``DEMO_*`` is public and for local demos only.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import jwt

from quota_middleware import Decision
from quota_middleware.proxy import ProxyConfig, UpstreamKey
from quota_middleware.proxy import Upstream as ProxyUpstream

#: Used only when ``DEMO_JWT_SECRET`` is unset. Public: never use it outside a local demo.
DEMO_JWT_SECRET = "demo-only-jwt-secret-not-for-production-use"
#: The demo API keys whose digests are in policy.toml (public, demo-only).
DEMO_KEYS = {
    "svc-reports": "qm_DemoReports0_demoOnlyNotARealSecret00000000012s7AJH",
    "svc-batch": "qm_DemoBatchJob_demoOnlyNotARealSecret00000000021TdN3C",
}


def ensure_demo_secret() -> None:
    """Set ``DEMO_JWT_SECRET`` to the public demo default unless the environment has one."""
    os.environ.setdefault("DEMO_JWT_SECRET", DEMO_JWT_SECRET)


def make_token(sub: str, plan: str | None = "pro", *, secret: str | None = None) -> str:
    """An HS256 demo JWT for ``sub`` with a ``plan`` claim, valid for one hour."""
    now = int(time.time())
    claims: dict[str, object] = {"sub": sub, "iat": now, "exp": now + 3600}
    if plan is not None:
        claims["plan"] = plan
    key = secret or os.environ.get("DEMO_JWT_SECRET") or DEMO_JWT_SECRET
    return jwt.encode(claims, key, algorithm="HS256")


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where the proxy forwards one provider's calls. ``base_url`` None means the built-in
    fake, in-process.

    ``base_url`` follows each SDK's convention: for ``"openai"`` the API root, version included
    (``https://api.openai.com/v1``; the route appends ``/chat/completions``); for ``"anthropic"``
    the host (``https://api.anthropic.com``; ``/v1`` and then ``/messages`` are appended). A
    trailing slash is ignored, and so is a trailing ``/v1`` on an Anthropic base URL (the SDK
    itself would request ``/v1/v1/messages`` with it; here it means what was meant)."""

    kind: str
    base_url: str | None

    @property
    def is_fake(self) -> bool:
        return self.base_url is None

    @property
    def api_root(self) -> str:
        """The URL the routes' suffixes (``/chat/completions``, ``/messages``) are appended to."""
        if self.base_url is None:
            return "http://fake-upstream/v1"
        root = self.base_url.rstrip("/")
        if self.kind == "anthropic" and not root.endswith("/v1"):
            root += "/v1"
        return root

    def url(self, suffix: str) -> str:
        return self.api_root + suffix


def upstream_for(kind: str) -> Upstream:
    """``kind`` is ``"openai"`` (``OPENAI_BASE_URL``) or ``"anthropic"``
    (``ANTHROPIC_BASE_URL``); their keys are read by the proxy (:func:`proxy_config`)."""
    if kind not in ("openai", "anthropic"):
        raise ValueError(f"unknown upstream kind {kind!r}")
    return Upstream(kind=kind, base_url=os.environ.get(f"{kind.upper()}_BASE_URL") or None)


def proxy_config() -> ProxyConfig:
    """The examples' backend proxy: OpenAI under ``/v1`` (``/v1/chat/completions``, ...) and
    Anthropic at the root (``/v1/messages``), as each SDK requests them, at the base URLs and
    with the keys of ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY`` and ``ANTHROPIC_BASE_URL`` /
    ``ANTHROPIC_API_KEY``; without a base URL, the built-in fake (``http://fake-upstream``)."""
    openai, claude = upstream_for("openai"), upstream_for("anthropic")

    def keys(env: str) -> list[UpstreamKey]:
        return [UpstreamKey(id=env.lower(), env=env)] if os.environ.get(env) else []

    return ProxyConfig(
        mount="",
        upstreams=[
            ProxyUpstream(name="openai", provider="openai", base_url=openai.api_root, prefix="/v1",
                     keys=keys("OPENAI_API_KEY")),
            ProxyUpstream(name="anthropic", provider="anthropic",
                     base_url=claude.api_root.removesuffix("/v1"), prefix="",
                     keys=keys("ANTHROPIC_API_KEY")),
        ],
    )  # fmt: skip


def describe(decision: Decision) -> dict[str, Any]:
    """``GET /v1/me``: the caller, its plan and what is left of each limit, as the middleware
    decided them for this very request."""
    caller = decision.caller
    return {
        "caller": caller.id if caller else None,
        "source": caller.source if caller else None,
        "plan": decision.plan,
        "limits": [
            {"name": s.name, "kind": s.kind, "quota": s.quota, "remaining": s.remaining,
             "reset": s.reset}
            for s in decision.statuses
        ],
    }  # fmt: skip
