"""Decisions as HTTP: status, headers and body for 401, 413, 429 and 503, and the IETF
``RateLimit-Policy`` / ``RateLimit`` headers (draft-ietf-httpapi-ratelimit-headers) for every
limited response. Plain values; the adapters only write them out."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from .engine import Decision, LimitStatus
from .errors import IdentificationError

RawHeaders = list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: RawHeaders
    body: bytes

    @property
    def status_line(self) -> str:
        return f"{self.status} {_REASONS[self.status]}"

    def wsgi_headers(self) -> list[tuple[str, str]]:
        return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self.headers]


_REASONS = {
    401: "Unauthorized",
    413: "Content Too Large",
    429: "Too Many Requests",
    503: "Service Unavailable",
}


def _policy_item(s: LimitStatus) -> str:
    if s.kind == "concurrency":
        return f'"{s.name}";q={s.quota};qu="concurrent-requests"'
    return f'"{s.name}";q={s.quota};w={max(1, s.window)}'


def rate_limit_headers(statuses: Sequence[LimitStatus]) -> RawHeaders:
    """``RateLimit-Policy`` and ``RateLimit``, one list member per limit that applied."""
    if not statuses:
        return []
    policy = ", ".join(_policy_item(s) for s in statuses)
    state = ", ".join(f'"{s.name}";r={s.remaining};t={s.reset}' for s in statuses)
    return [(b"ratelimit-policy", policy.encode()), (b"ratelimit", state.encode())]


def _json(status: int, payload: object, headers: RawHeaders) -> Response:
    body = json.dumps(payload, separators=(",", ":")).encode()
    base = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    return Response(status, base + headers, body)


def _error(message: str, type_: str, code: str, **extra: object) -> dict[str, object]:
    # OpenAI's error shape, so OpenAI SDK clients classify and retry it correctly.
    return {"error": {"message": message, "type": type_, "code": code, **extra}}


def denied(decision: Decision) -> Response:
    """429 (or 503 when the store is down and the plan fails closed)."""
    if decision.reason == "unavailable":
        headers = [(b"retry-after", str(decision.retry_after or 1).encode())]
        body = _error(
            "Rate limiting is temporarily unavailable; try again shortly.",
            "service_unavailable", "quota_store_unavailable",
        )  # fmt: skip
        return _json(503, body, headers)
    headers = rate_limit_headers(decision.statuses)
    if decision.retry_after is not None:
        headers.append((b"retry-after", str(decision.retry_after).encode()))
    if decision.reason == "concurrency":
        message = f"Too many concurrent requests (limit '{decision.denied_by}')."
    else:
        message = f"Rate limit '{decision.denied_by}' exceeded."
    if decision.retry_after is not None:
        message += f" Retry after {decision.retry_after} s."
    body = _error(
        message, "rate_limit_exceeded", "rate_limit_exceeded",
        limit=decision.denied_by, retry_after=decision.retry_after,
    )  # fmt: skip
    return _json(429, body, headers)


def unauthorized(error: IdentificationError) -> Response:
    # RFC 6750 error codes; the description never echoes the credential.
    code = "invalid_token" if error.reason == "invalid_credentials" else "invalid_request"
    challenge = f'{error.scheme} realm="api", error="{code}"'
    if error.reason == "missing_credentials":
        challenge = f'{error.scheme} realm="api"'
    body = _error(str(error), "invalid_request_error", error.reason)
    return _json(401, body, [(b"www-authenticate", challenge.encode())])


def too_large(limit: int) -> Response:
    body = _error(f"Request body exceeds {limit} bytes.", "invalid_request_error", "body_too_large")
    return _json(413, body, [])
