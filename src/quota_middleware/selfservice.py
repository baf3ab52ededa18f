"""Self-service usage: the authenticated caller's own usage and what is left, as JSON, for the
app to mount behind the middleware (in place of a hand-written ``/v1/usage``)::

    app.add_route("/v1/usage", UsageApp(), methods=["GET"])   # FastAPI / Starlette
    Mount("/v1/usage", app=UsageApp())                        # any ASGI router (…/v1/usage/)
    app.register_blueprint(usage_blueprint(), url_prefix="/v1/usage")   # Flask

``GET`` answers, for the caller the middleware identified on this very request: its usage per
day and model for the last ``?days=N`` days (1..35, default 1: today; newest first), the totals,
and what is left of each token quota and budget of its plan this period. A caller can only ever
see its own. ``days`` out of range is a 400 naming it; a store that cannot be read a 503.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from dataclasses import asdict
from typing import Any
from urllib.parse import parse_qs

from quota_middleware.asgi import INSTANCE_KEY
from quota_middleware.core._decision import Decision
from quota_middleware.errors import StorageError
from quota_middleware.reports import Remaining, UsageRecord
from quota_middleware.wsgi import ENVIRON_KEY
from quota_middleware.wsgi import INSTANCE_KEY as WSGI_INSTANCE_KEY

__all__ = ["MAX_DAYS", "UsageApp", "parse_days", "usage_blueprint", "usage_report"]

#: the most days one request may ask for (usage records are kept 35 days by default)
MAX_DAYS = 35

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def parse_days(raw: str | None) -> int | None:
    """The ``days`` query parameter (default 1: today), None when it is not 1..MAX_DAYS."""
    if raw is None or raw == "":
        return 1
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_DAYS:
        return None
    return int(raw)


def usage_report(
    decision: Decision, records: Sequence[UsageRecord], remaining: Sequence[Remaining]
) -> dict[str, Any]:
    """The JSON body: usage per day and model (tokens, cost in micro-USD and USD, how many
    requests were charged from estimates), the totals, and what is left this period (``used``
    includes requests in flight)."""
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


def _error(status: int, code: str, message: str, param: str | None = None) -> tuple[int, bytes]:
    body = {"error": {"message": message, "type": "invalid_request_error", "code": code,
                      "param": param}}  # fmt: skip
    return status, json.dumps(body).encode()


def _check(decision: Any, method: str, query: str) -> tuple[int, bytes] | tuple[Decision, int]:
    if method not in ("GET", "HEAD"):
        return _error(405, "method_not_allowed", "use GET")
    if not isinstance(decision, Decision):
        return _error(500, "not_behind_the_middleware", "mount this behind QuotaMiddleware")
    if decision.caller is None:  # the store was down when the caller was identified
        return _error(503, "unavailable", "usage is unavailable right now")
    days = parse_days(parse_qs(query).get("days", [None])[0])
    if days is None:
        return _error(400, "invalid_days", f"days must be 1..{MAX_DAYS}", "days")
    return decision, days


class UsageApp:
    """The ASGI app (mount it behind :class:`~quota_middleware.QuotaMiddleware`)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        state = scope.get("state") or {}
        checked = _check(state.get("quota"), scope["method"],
                         bytes(scope.get("query_string") or b"").decode("latin-1"))  # fmt: skip
        status, body = checked if isinstance(checked[0], int) else (200, b"")
        if isinstance(checked[0], Decision):
            decision, days = checked
            middleware: Any = state.get(INSTANCE_KEY)
            assert decision.caller is not None
            caller = decision.caller
            try:
                reader = middleware.reader()
                records = await reader.ausage(caller.id, tenant=caller.tenant, days=days,
                                              plan=decision.plan)  # fmt: skip
                left = await reader.aremaining(caller.id, tenant=caller.tenant,
                                               plan=decision.plan)  # fmt: skip
                body = json.dumps(usage_report(decision, records, left)).encode()
            except (StorageError, OSError):
                status, body = _error(503, "unavailable", "usage is unavailable right now")
        assert isinstance(status, int)
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def usage_wsgi_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """The WSGI app (mount it behind :class:`~quota_middleware.WSGIQuotaMiddleware`)."""
    checked = _check(environ.get(ENVIRON_KEY), str(environ.get("REQUEST_METHOD", "GET")),
                     str(environ.get("QUERY_STRING") or ""))  # fmt: skip
    status, body = checked if isinstance(checked[0], int) else (200, b"")
    if isinstance(checked[0], Decision):
        decision, days = checked
        assert decision.caller is not None
        caller = decision.caller
        try:
            reader = environ[WSGI_INSTANCE_KEY].reader()
            records = reader.usage(caller.id, tenant=caller.tenant, days=days, plan=decision.plan)
            left = reader.remaining(caller.id, tenant=caller.tenant, plan=decision.plan)
            body = json.dumps(usage_report(decision, records, left)).encode()
        except (StorageError, OSError):
            status, body = _error(503, "unavailable", "usage is unavailable right now")
    reasons = {200: "OK", 400: "Bad Request", 405: "Method Not Allowed", 500: "Internal Server "
               "Error", 503: "Service Unavailable"}  # fmt: skip
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    start_response(f"{status} {reasons.get(int(status), '')}", headers)
    return [body]


def usage_blueprint(name: str = "quota_usage") -> Any:
    """A Flask blueprint answering ``GET`` at its root (needs Flask)."""
    from flask import Blueprint, Response, request

    bp = Blueprint(name, __name__)

    @bp.get("/")
    @bp.get("", strict_slashes=False)
    def usage() -> Any:
        out: dict[str, Any] = {}

        def start(status: str, headers: list[tuple[str, str]]) -> None:
            out["status"], out["headers"] = int(status.split(" ", 1)[0]), headers

        body = b"".join(usage_wsgi_app(request.environ, start))
        return Response(body, status=out["status"], headers=out["headers"])

    return bp
