"""What the FastAPI and Flask examples share: demo credentials and the choice of upstream.

Everything named ``DEMO_*`` is public and for local demos only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import httpx
import jwt

from quota_middleware import Decision, Remaining, UsageRecord

#: Used only when ``DEMO_JWT_SECRET`` is unset. Public: never use it outside a local demo.
DEMO_JWT_SECRET = "demo-only-jwt-secret-not-for-production-use"
#: The demo API keys whose digests are in policy.toml (public, demo-only).
DEMO_KEYS = {
    "svc-reports": "qm_DemoReports0_demoOnlyNotARealSecret00000000012s7AJH",
    "svc-batch": "qm_DemoBatchJob_demoOnlyNotARealSecret00000000021TdN3C",
}
#: ``GET /v1/usage?days=N`` accepts 1..USAGE_MAX_DAYS (the policy keeps records 35 days by default)
USAGE_MAX_DAYS = 35
#: Request headers of the caller that are never forwarded upstream (their credentials for us).
_HOP_BY_HOP = frozenset(
    {"host", "connection", "content-length", "transfer-encoding", "authorization", "x-api-key",
     "cookie", "accept-encoding", "keep-alive", "upgrade", "te", "trailer"}
)  # fmt: skip
#: Response headers of the upstream that are relayed to the caller; every other one is dropped.
#: Not relayed: ``content-length`` and ``content-encoding`` (the body is sent decoded, re-chunked),
#: hop-by-hop headers, ``set-cookie`` (the upstream's or its CDN's cookies belong to this server's
#: session with the upstream, shared by all callers, not to any one caller), and the upstream's
#: rate-limit headers (``x-ratelimit-*``, ``anthropic-ratelimit-*``: they describe the server's
#: provider key, not the caller, and would contradict the middleware's own ``x-ratelimit-*``).
_RELAYED = frozenset(
    {"content-type", "request-id", "retry-after", "x-should-retry", "openai-processing-ms"}
)
#: Relayed under another name: the middleware sends ``x-request-id`` (the id the charge is logged
#: under) unless the app's response has one, so the upstream's own would replace it.
_RENAMED = {"x-request-id": "x-upstream-request-id"}
#: Content codings the relay decodes (httpx decodes these without optional packages).
_DECODED = frozenset({"gzip", "deflate", "identity"})


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
    """Where a route forwards to. ``base_url`` None means the built-in fake, in-process.

    ``base_url`` follows each SDK's convention: for ``"openai"`` the API root, version included
    (``https://api.openai.com/v1``; the route appends ``/chat/completions``); for ``"anthropic"``
    the host (``https://api.anthropic.com``; ``/v1`` and then ``/messages`` are appended). A
    trailing slash is ignored, and so is a trailing ``/v1`` on an Anthropic base URL (the SDK
    itself would request ``/v1/v1/messages`` with it; here it means what was meant)."""

    kind: str
    base_url: str | None
    headers: dict[str, str]

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
    """``kind`` is ``"openai"`` (``OPENAI_BASE_URL``, ``OPENAI_API_KEY``) or ``"anthropic"``
    (``ANTHROPIC_BASE_URL``, ``ANTHROPIC_API_KEY``). The server-side key goes only into the
    upstream request headers; it is never logged or returned."""
    if kind == "openai":
        base, key = os.environ.get("OPENAI_BASE_URL"), os.environ.get("OPENAI_API_KEY", "")
        auth = {"authorization": f"Bearer {key}"} if key else {}
    elif kind == "anthropic":
        base, key = os.environ.get("ANTHROPIC_BASE_URL"), os.environ.get("ANTHROPIC_API_KEY", "")
        auth = {"x-api-key": key, "anthropic-version": "2023-06-01"} if key else {}
    else:
        raise ValueError(f"unknown upstream kind {kind!r}")
    return Upstream(kind=kind, base_url=base or None, headers=auth)


def forward_headers(incoming: list[tuple[str, str]], upstream: Upstream) -> dict[str, str]:
    """The caller's headers minus its credentials and hop-by-hop ones, plus the server's key.
    ``accept-encoding: identity`` keeps the relayed bytes exactly what the upstream sent."""
    headers = {k.lower(): v for k, v in incoming if k.lower() not in _HOP_BY_HOP}
    headers["accept-encoding"] = "identity"
    headers.update(upstream.headers)
    return headers


@dataclass(frozen=True, slots=True)
class Relay:
    """How to send an upstream response on: ``decode`` True means relay the decoded body
    (httpx ``iter_bytes``), False the bytes as received (``iter_raw``); ``headers`` are the
    response headers to send with it, ``content-type`` always among them."""

    decode: bool
    headers: dict[str, str]


def relay_plan(upstream: httpx.Headers) -> Relay:
    """The upstream was asked for ``identity``, but some upstreams and proxies gzip anyway. The
    middleware meters the body this app sends, decoding it by the ``Content-Encoding`` this app
    sends, so body and header must agree. A gzip or deflate body is decoded and sent without
    ``Content-Encoding`` (the caller never negotiated one with us: its ``Accept-Encoding`` is not
    forwarded). A coding httpx may not decode (``br``, ``zstd``: httpx would skip it silently) is
    relayed as received, with the upstream's ``Content-Encoding``; the middleware then charges
    it from an estimate. ``Content-Length`` is never copied: the body is re-chunked."""
    codings = [c.strip().lower() for c in upstream.get_list("content-encoding", split_commas=True)]
    decode = all(c in _DECODED for c in codings if c)
    headers = {k: v for k, v in upstream.items() if k.lower() in _RELAYED}
    headers.update({_RENAMED[k]: v for k, v in upstream.items() if k.lower() in _RENAMED})
    headers.setdefault("content-type", "application/json")
    if not decode:
        headers["content-encoding"] = ", ".join(c for c in codings if c)
    return Relay(decode=decode, headers=headers)


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


def usage_days(raw: str | None) -> int | None:
    """The ``days`` query parameter of ``GET /v1/usage`` (default 1: today), None if invalid."""
    if raw is None or raw == "":
        return 1
    if not raw.isdigit() or not 1 <= int(raw) <= USAGE_MAX_DAYS:
        return None
    return int(raw)


def usage_report(
    decision: Decision, records: Sequence[UsageRecord], remaining: Sequence[Remaining]
) -> dict[str, Any]:
    """``GET /v1/usage``: the caller's usage per day and model (newest day first; tokens, cost in
    micro-USD and USD, how many requests were charged from estimates) and what is left of each
    token quota and budget of its plan this period (``used`` includes requests in flight)."""
    caller = decision.caller
    totals = {
        name: sum(getattr(r, name) for r in records)
        for name in ("requests", "input_tokens", "output_tokens", "cost_micros", "estimated")
    }
    return {
        "caller": caller.id if caller else None,
        "plan": decision.plan,
        "usage": [{**asdict(r), "cost_usd": r.cost_usd} for r in records],
        "totals": {**totals, "cost_usd": totals["cost_micros"] / 1_000_000},
        "remaining": [
            {"name": r.name, "kind": r.kind, "period": r.period, "unit": r.unit,
             "limit": r.limit, "used": r.used, "remaining": r.remaining,
             "resets_at": r.resets_at.isoformat()}
            for r in remaining
        ],
    }  # fmt: skip


def error_body(message: str, code: str) -> dict[str, Any]:
    """An OpenAI-shaped error body, like the middleware's own."""
    return {"error": {"message": message, "type": "invalid_request_error", "code": code,
                      "param": None}}  # fmt: skip
