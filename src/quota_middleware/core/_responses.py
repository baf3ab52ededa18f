"""Decisions as HTTP: status, headers and body for 401, 403, 413, 429 and 503, the IETF
``RateLimit-Policy`` / ``RateLimit`` headers (draft-ietf-httpapi-ratelimit-headers) on every
limited response, and OpenAI's ``x-ratelimit-*`` headers on AI routes. Plain values; the adapters
only write them out."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from quota_middleware.core._decision import Decision, LimitStatus
from quota_middleware.errors import IdentificationError

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
    403: "Forbidden",
    413: "Content Too Large",
    429: "Too Many Requests",
    503: "Service Unavailable",
}
# Units outside the draft's registry ("requests", "concurrent-requests") get a vendor parameter.
_UNIT = {
    "concurrency": ';qu="concurrent-requests"',
    "tokens": ';qm-unit="tokens"',
    "token_quota": ';qm-unit="tokens"',
    "budget": ';qm-unit="usd-micros"',
}


def _policy_item(s: LimitStatus) -> str:
    window = "" if s.kind == "concurrency" else f";w={max(1, s.window)}"
    return f'"{s.name}";q={s.quota}{window}{_UNIT.get(s.kind, "")}'


_POLICIES: dict[tuple[tuple[str, str, int, int], ...], bytes] = {}


def rate_limit_headers(statuses: Sequence[LimitStatus]) -> RawHeaders:
    """``RateLimit-Policy`` and ``RateLimit``, one list member per limit that applied."""
    if not statuses:
        return []
    # The policy header only changes with the configuration: build it once per limit set.
    shape = tuple((s.name, s.kind, s.quota, s.window) for s in statuses)
    policy = _POLICIES.get(shape)
    if policy is None:
        if len(_POLICIES) > 1024:
            _POLICIES.clear()
        policy = _POLICIES[shape] = ", ".join(_policy_item(s) for s in statuses).encode()
    state = ", ".join(f'"{s.name}";r={s.remaining};t={s.reset}' for s in statuses)
    return [(b"ratelimit-policy", policy), (b"ratelimit", state.encode())]


def _duration(seconds: int) -> str:
    # OpenAI writes resets as Go durations ("1s", "6m0s", "1h2m3s").
    h, rest = divmod(max(0, seconds), 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m}m{s}s"
    return f"{m}m{s}s" if m else f"{s}s"


def openai_headers(statuses: Sequence[LimitStatus]) -> RawHeaders:
    """``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` from the tightest limit of each
    kind, as OpenAI sends them, so clients written for OpenAI pace themselves."""
    out: RawHeaders = []
    for label, kinds in (("requests", ("requests",)), ("tokens", ("tokens", "token_quota"))):
        candidates = [s for s in statuses if s.kind in kinds]
        if not candidates:
            continue
        tight = min(candidates, key=lambda s: (s.remaining, -s.reset))
        out += [
            (f"x-ratelimit-limit-{label}".encode(), str(tight.quota).encode()),
            (f"x-ratelimit-remaining-{label}".encode(), str(tight.remaining).encode()),
            (f"x-ratelimit-reset-{label}".encode(), _duration(tight.reset).encode()),
        ]
    return out


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
    return {"error": {"message": message, "type": type_, "code": code, "param": None, **extra}}


def denied(decision: Decision) -> Response:
    """429, or 403 / 413 / 503 for the reasons that are not about pace."""
    reason = decision.reason
    if reason == "unavailable":
        headers = [(b"retry-after", str(decision.retry_after or 1).encode())]
        body = _error(
            "Rate limiting is temporarily unavailable; try again shortly.",
            "service_unavailable", "quota_store_unavailable",
        )  # fmt: skip
        return _json(503, body, headers)
    if reason == "blocked":
        # an operator's order, not a pace: no RateLimit headers, and SDKs must not retry
        who = "This caller's tenant" if decision.denied_by == "tenant" else "This caller"
        message = f"{who} is blocked: {decision.block_reason or 'no reason given'}."
        headers = [(b"x-should-retry", b"false")]
        if decision.retry_after is not None:
            headers.append((b"retry-after", str(decision.retry_after).encode()))
        body = _error(message, "permission_error", "caller_blocked",
                      reason=decision.block_reason, blocked=decision.denied_by)  # fmt: skip
        return _json(403, body, headers)
    if reason in ("model", "unpriced"):
        why = "is not allowed on your plan" if reason == "model" else "has no price configured"
        body = _error(f"The {decision.denied_by} {why}.", "invalid_request_error",
                      "model_not_allowed" if reason == "model" else "model_not_priced")  # fmt: skip
        return _json(403, body, [(b"x-should-retry", b"false")])
    headers = rate_limit_headers(decision.statuses)
    if decision.ai is not None or any(s.kind != "requests" for s in decision.statuses):
        headers += openai_headers(decision.statuses)
    if reason == "too_large":
        body = _error(
            f"This request needs more than limit '{decision.denied_by}' allows in total.",
            "invalid_request_error", "tokens_exceed_limit", limit=decision.denied_by,
        )  # fmt: skip
        return _json(413, body, [*headers, (b"x-should-retry", b"false")])
    if decision.retry_after is not None:
        headers.append((b"retry-after", str(decision.retry_after).encode()))
    if reason in ("quota", "budget"):
        what = "token quota" if reason == "quota" else "spend budget"
        message = f"You exceeded your {what} '{decision.denied_by}'; it renews in "
        message += f"{_duration(decision.retry_after or 0)}."
        # retrying before the period ends cannot succeed: tell SDKs not to hammer
        headers.append((b"x-should-retry", b"false"))
        body = _error(message, "insufficient_quota", "insufficient_quota",
                      limit=decision.denied_by, retry_after=decision.retry_after)  # fmt: skip
        return _json(429, body, headers)
    if reason == "concurrency":
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


def allowed_headers(decision: Decision) -> RawHeaders:
    """Headers added to an admitted response; on AI routes also the request id the charge is
    logged under (``x-request-id``, unless the app's response sets its own)."""
    headers = rate_limit_headers(decision.statuses)
    if decision.ai is not None:
        if decision.statuses:
            headers += openai_headers(decision.statuses)
        headers.append((REQUEST_ID, decision.public_id.encode()))
    return headers


REQUEST_ID = b"x-request-id"
