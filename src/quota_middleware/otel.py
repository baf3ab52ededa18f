"""OpenTelemetry (optional: ``pip install quota-middleware[otel]``): the middleware's decisions
and charges on the request's span, following the GenAI semantic conventions (v1.36), and the
``gen_ai.client.token.usage`` histogram.

::

    from quota_middleware.metrics import PrometheusMetrics, combine
    from quota_middleware.otel import OpenTelemetry

    app.add_middleware(QuotaMiddleware, config=config, metrics=OpenTelemetry())
    # both: metrics=combine(PrometheusMetrics(), OpenTelemetry())

It opens no span of its own: it annotates the span that is current when the middleware runs,
the server span of your instrumentation (``opentelemetry-instrumentation-asgi`` / ``-wsgi``, or
FastAPI's and Flask's). On every limited request: ``quota.decision`` (allowed, denied, shadow,
degraded), ``quota.plan``, ``quota.caller.hash`` (a hash of tenant and caller, never the id),
``quota.reason`` and ``quota.denied_by`` when refused. On an AI request, at the charge:
``gen_ai.system``, ``gen_ai.operation.name``, ``gen_ai.request.model``,
``gen_ai.response.model``, ``gen_ai.usage.input_tokens``, ``gen_ai.usage.output_tokens``,
``quota.cost_usd`` and ``quota.estimated``. The histogram records input and output tokens with
``gen_ai.token.type``, the system, operation and models, on the conventions' bucket
boundaries.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from quota_middleware.base._events import AlertEvent
    from quota_middleware.core._decision import Charge, Decision
    from quota_middleware.metering._usage import Usage

__all__ = ["TOKEN_BUCKETS", "OpenTelemetry"]

#: the explicit bucket boundaries the GenAI conventions give ``gen_ai.client.token.usage``
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                 16777216, 67108864)  # fmt: skip

#: admitted AI requests whose span is kept for their charge (a bound: requests that never
#: settle, e.g. a worker killed mid-stream, must not grow it)
_OPEN_MAX = 10_000
# a route's format -> (gen_ai.system, gen_ai.operation.name)
_SYSTEMS = {
    "openai-chat": ("openai", "chat"),
    "openai-completions": ("openai", "text_completion"),
    "openai-responses": ("openai", "chat"),
    "openai-embeddings": ("openai", "embeddings"),
    "openai-realtime": ("openai", "chat"),
    "anthropic-messages": ("anthropic", "chat"),
    "gemini": ("gcp.gemini", "generate_content"),
    "ollama": ("ollama", "chat"),
}


def caller_hash(tenant: str, caller: str) -> str:
    """A stable, non-reversible name of a caller for traces (16 hex of SHA-256)."""
    return hashlib.sha256(f"{tenant}\0{caller}".encode()).hexdigest()[:16]


class OpenTelemetry:
    """The middleware's hooks (as :class:`~quota_middleware.metrics.PrometheusMetrics`) on
    OpenTelemetry: spans from the current context, instruments from ``meter_provider``
    (default: the global one)."""

    def __init__(self, meter_provider: Any = None) -> None:
        try:
            from opentelemetry import metrics, trace
        except ImportError as e:  # pragma: no cover - depends on the extra
            raise ImportError("OpenTelemetry needs: pip install 'quota-middleware[otel]'") from e
        self._trace = trace
        meter = (meter_provider or metrics.get_meter_provider()).get_meter("quota_middleware")
        self.token_usage = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}",
            description="Measures number of input and output tokens used",
            explicit_bucket_boundaries_advisory=list(TOKEN_BUCKETS),
        )  # fmt: skip
        #: request id -> the span of an admitted AI request, until its charge
        self._open: dict[str, Any] = {}
        self.cost = meter.create_counter(
            "quota.cost", unit="USD", description="AI spend charged by quota-middleware"
        )

    def _span(self) -> Any:
        span = self._trace.get_current_span()
        return span if span.is_recording() else None

    # -- hooks the middleware calls ---------------------------------------------------------
    def decision(self, decision: Decision) -> None:
        span = self._span()
        if span is None or not (decision.limited or decision.reason or decision.degraded):
            return
        if decision.degraded:
            outcome = "degraded"
        elif decision.shadow:
            outcome = "shadow_denied"
        else:
            outcome = "allowed" if decision.allowed else "denied"
        attrs: dict[str, Any] = {"quota.decision": outcome}
        if decision.plan is not None:
            attrs["quota.plan"] = decision.plan
        caller = decision.caller
        if caller is not None:
            attrs["quota.caller.hash"] = caller_hash(caller.tenant, caller.id)
        if decision.reason is not None:
            attrs["quota.reason"] = decision.reason
        if decision.denied_by is not None:
            attrs["quota.denied_by"] = decision.denied_by
        if decision.ai is not None:
            attrs["gen_ai.request.model"] = decision.ai.estimate.model or ""
            if decision.allowed:
                # the charge comes when the response ends: a WSGI server iterates the body
                # after the instrumentation's context is gone, so the span is kept for it
                if len(self._open) >= _OPEN_MAX:
                    self._open.clear()
                self._open[decision.request_id] = span
        span.set_attributes(attrs)

    def charged(self, decision: Decision, charge: Charge) -> None:
        """An AI request's charge (called where the charge log line is written)."""
        system, operation = _SYSTEMS.get(charge.provider, (charge.provider, "chat"))
        requested = decision.ai.estimate.model if decision.ai is not None else None
        common: dict[str, Any] = {"gen_ai.system": system, "gen_ai.operation.name": operation}
        if requested:
            common["gen_ai.request.model"] = requested
        if charge.model:
            common["gen_ai.response.model"] = charge.model
        for kind, value in (("input", charge.input_tokens), ("output", charge.output_tokens)):
            self.token_usage.record(value, {**common, "gen_ai.token.type": kind})
        if charge.cost_micros:
            self.cost.add(charge.cost_micros / 1_000_000, common)
        span = self._open.pop(decision.request_id, None) or self._span()
        if span is not None and span.is_recording():
            span.set_attributes({
                **common,
                "gen_ai.usage.input_tokens": charge.input_tokens,
                "gen_ai.usage.output_tokens": charge.output_tokens,
                "quota.cost_usd": charge.cost_usd,
                "quota.estimated": charge.estimated,
            })  # fmt: skip

    def usage(self, usage: Usage, cost_micros: int) -> None:
        """Counted in :meth:`charged`, which knows the request."""

    def settle_buffer(self, depth: int, dropped: int) -> None:
        """Not exported: the Prometheus gauge carries it."""

    def store(self, call: str, seconds: float, ok: bool) -> None:
        """Store latency: Redis's own instrumentation (``opentelemetry-instrumentation-redis``)."""

    def alert(self, event: AlertEvent, state: str) -> None:
        span = self._span()
        if span is not None and state == "fired":
            span.add_event("quota.alert", {"quota.alert.type": event.type})
