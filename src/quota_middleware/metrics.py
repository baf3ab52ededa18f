"""Prometheus metrics (optional: ``pip install quota-middleware[metrics]``).

::

    metrics = PrometheusMetrics()            # registers on prometheus_client's default registry
    app.add_middleware(QuotaMiddleware, config=config, metrics=metrics)

Labels are bounded: plans, outcomes and reasons come from the configuration; model names come
from requests, so only the first ``max_models`` distinct ones get their own label (the rest are
``"other"``); caller ids are never labels.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from quota_middleware.metering._usage import clean_model

if TYPE_CHECKING:
    from quota_middleware.base._events import AlertEvent
    from quota_middleware.core._decision import Decision
    from quota_middleware.metering._usage import Usage


class PrometheusMetrics:
    """Counters and a histogram fed by the middleware (and the alert dispatcher)."""

    def __init__(
        self, registry: Any = None, *, namespace: str = "quota", max_models: int = 50
    ) -> None:
        try:
            from prometheus_client import REGISTRY, Counter, Gauge, Histogram
        except ImportError as e:  # pragma: no cover - depends on the extra
            raise ImportError(
                "PrometheusMetrics needs: pip install 'quota-middleware[metrics]'"
            ) from e
        registry = REGISTRY if registry is None else registry
        kw: dict[str, Any] = {"namespace": namespace, "registry": registry}
        self.decisions = Counter(
            "decisions", "Admission decisions", ["outcome", "reason", "plan"], **kw
        )
        self.tokens = Counter("tokens", "AI tokens charged", ["model", "kind"], **kw)
        self.cost = Counter("cost_usd", "AI spend charged, USD", ["model"], **kw)
        self.estimated = Counter(
            "estimated_requests", "AI requests charged from estimates", ["model"], **kw
        )
        self.store_latency = Histogram(
            "store_seconds", "Store (Redis) call latency", ["call", "ok"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0), **kw,
        )  # fmt: skip
        self.degraded = Counter(
            "degraded_decisions", "Decisions made without the store", ["policy"], **kw
        )
        self.alerts = Counter("alerts", "Alert events", ["type", "state"], **kw)
        self.buffer_depth = Gauge(
            "settle_buffer_depth", "Settles waiting for the store to answer (this process)", **kw
        )
        self.buffer_dropped = Gauge(
            "settle_buffer_dropped", "Settles dropped from the buffer, since start", **kw
        )
        self.usage_invalid = Counter(
            "usage_invalid", "AI responses whose usage could not be believed", ["model"], **kw
        )
        self._models: set[str] = set()
        self._max_models = max_models
        self._lock = threading.Lock()

    def _model(self, model: str | None) -> str:
        name = clean_model(model) or "unknown"
        if name in self._models:
            return name
        with self._lock:
            if len(self._models) < self._max_models:
                self._models.add(name)
                return name
        return "other"

    # -- hooks the middleware calls ---------------------------------------------------------
    def decision(self, decision: Decision) -> None:
        if decision.degraded:
            self.degraded.labels("open" if decision.allowed else "closed").inc()
        if decision.shadow:
            outcome = "shadow_denied"
        elif decision.allowed:
            outcome = "allowed"
        else:
            outcome = "denied"
        self.decisions.labels(outcome, decision.reason or "", decision.plan or "").inc()

    def usage(self, usage: Usage, cost_micros: int) -> None:
        model = self._model(usage.model)
        for kind, value in (
            ("input", usage.input_tokens),
            ("output", usage.output_tokens),
            ("cached", usage.cached_tokens),
            ("reasoning", usage.reasoning_tokens),
        ):
            if value:
                self.tokens.labels(model, kind).inc(value)
        if cost_micros:
            self.cost.labels(model).inc(cost_micros / 1_000_000)
        if usage.estimated:
            self.estimated.labels(model).inc()
        if usage.reason == "usage_invalid":
            self.usage_invalid.labels(model).inc()

    def settle_buffer(self, depth: int, dropped: int) -> None:
        self.buffer_depth.set(depth)
        self.buffer_dropped.set(dropped)

    def store(self, call: str, seconds: float, ok: bool) -> None:
        self.store_latency.labels(call, "true" if ok else "false").observe(seconds)

    def alert(self, event: AlertEvent, state: str) -> None:
        """``state``: ``fired`` (decided by settle), ``delivered`` or ``failed`` (by a sink)."""
        self.alerts.labels(event.type, state).inc()


class _Combined:
    """Several observers behind the one ``metrics=`` argument: each hook calls each of them."""

    def __init__(self, observers: tuple[Any, ...]) -> None:
        self.observers = observers
        charged = [o.charged for o in observers if hasattr(o, "charged")]
        if charged:
            self.charged = lambda decision, charge: [f(decision, charge) for f in charged]

    def decision(self, decision: Decision) -> None:
        for o in self.observers:
            o.decision(decision)

    def usage(self, usage: Usage, cost_micros: int) -> None:
        for o in self.observers:
            o.usage(usage, cost_micros)

    def settle_buffer(self, depth: int, dropped: int) -> None:
        for o in self.observers:
            o.settle_buffer(depth, dropped)

    def store(self, call: str, seconds: float, ok: bool) -> None:
        for o in self.observers:
            o.store(call, seconds, ok)

    def alert(self, event: AlertEvent, state: str) -> None:
        for o in self.observers:
            o.alert(event, state)


def combine(*observers: Any) -> Any:
    """One ``metrics=`` value for several observers, e.g. ``combine(PrometheusMetrics(),
    OpenTelemetry())``."""
    if len(observers) == 1:
        return observers[0]
    return _Combined(tuple(observers))
