"""OpenTelemetry: the middleware annotates the server span its instrumentation opened (the
official ASGI and WSGI instrumentations here) with its decision and, on AI requests, the GenAI
usage attributes; the ``gen_ai.client.token.usage`` histogram counts what was charged. Spans and
metrics are read back with the SDK's in-memory exporter and reader."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from werkzeug.test import Client

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware as AsgiInstrumentation
from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware as WsgiInstrumentation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import ai_app
from ai_harness import PATH, chat, config
from quota_middleware import QuotaMiddleware, WSGIQuotaMiddleware
from quota_middleware.backends.memory import MemoryBackend
from quota_middleware.limits import RequestRate, TokenQuota
from quota_middleware.metrics import PrometheusMetrics, combine
from quota_middleware.otel import TOKEN_BUCKETS, OpenTelemetry, caller_hash

CALLER = "192.0.2.77"
BODY = chat(max_tokens=50, x_prompt=33, x_completion=44)


class Telemetry:
    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.otel = OpenTelemetry(meter_provider=self.meter_provider)

    def server_spans(self) -> list[Any]:
        from opentelemetry.trace import SpanKind

        return [s for s in self.spans.get_finished_spans() if s.kind == SpanKind.SERVER]

    def token_points(self) -> dict[str, Any]:
        data = self.reader.get_metrics_data()
        out = {}
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == "gen_ai.client.token.usage":
                        assert metric.unit == "{token}"
                        for p in metric.data.data_points:
                            out[p.attributes["gen_ai.token.type"]] = p
        return out


def _config() -> Any:
    return config(limits=[RequestRate(rate="2/minute", name="rpm"),
                          TokenQuota(tokens=100_000, name="tpd")])  # fmt: skip


def _check(t: Telemetry, statuses: list[int]) -> None:
    assert statuses == [200, 200, 429]
    spans = t.server_spans()
    assert len(spans) == 3
    ok, _, denied = (dict(s.attributes) for s in spans)
    assert ok["quota.decision"] == "allowed" and ok["quota.plan"] == "p"
    assert ok["gen_ai.system"] == "openai" and ok["gen_ai.operation.name"] == "chat"
    assert ok["gen_ai.request.model"] == "gpt-4o-mini"
    assert (ok["gen_ai.usage.input_tokens"], ok["gen_ai.usage.output_tokens"]) == (33, 44)
    assert ok["quota.cost_usd"] > 0 and ok["quota.estimated"] is False
    assert ok["quota.caller.hash"] == caller_hash("default", CALLER)
    assert (denied["quota.decision"], denied["quota.reason"], denied["quota.denied_by"]) == (
        "denied", "rate", "rpm"
    )  # fmt: skip
    assert "gen_ai.usage.input_tokens" not in denied
    # the caller's id is in none of ours (the instrumentation's net.peer.ip is its business)
    for s in spans:
        ours = {k: v for k, v in s.attributes.items() if k.startswith(("quota.", "gen_ai."))}
        assert ours and all(CALLER not in str(v) for v in ours.values())
    points = t.token_points()
    assert (points["input"].sum, points["output"].sum) == (66, 88)
    assert points["input"].count == 2
    assert tuple(points["input"].explicit_bounds) == tuple(float(b) for b in TOKEN_BUCKETS)
    assert points["output"].attributes["gen_ai.response.model"] == "gpt-4o-mini"


def test_the_asgi_server_span_carries_the_decision_and_the_usage() -> None:
    t = Telemetry()
    mw = QuotaMiddleware(ai_app.asgi_app, config=_config(), backend=MemoryBackend(),
                         metrics=t.otel)  # fmt: skip
    app = AsgiInstrumentation(mw, tracer_provider=t.tracer_provider)

    async def run() -> list[int]:
        transport = httpx.ASGITransport(app=app, client=(CALLER, 1234))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return [(await client.post(PATH, json=BODY)).status_code for _ in range(3)]

    _check(t, asyncio.run(run()))


def test_the_wsgi_server_span_carries_the_decision_and_the_usage() -> None:
    t = Telemetry()
    mw = WSGIQuotaMiddleware(ai_app.wsgi_app, config=_config(), backend=MemoryBackend(),
                             metrics=t.otel)  # fmt: skip
    client = Client(WsgiInstrumentation(mw, tracer_provider=t.tracer_provider))
    statuses = [
        client.post(
            PATH, json=BODY, environ_base={"REMOTE_ADDR": CALLER}, buffered=True
        ).status_code
        for _ in range(3)
    ]
    _check(t, statuses)


def test_prometheus_and_opentelemetry_together() -> None:
    from prometheus_client import CollectorRegistry

    t = Telemetry()
    registry = CollectorRegistry()
    mw = WSGIQuotaMiddleware(
        ai_app.wsgi_app, config=_config(), backend=MemoryBackend(),
        metrics=combine(PrometheusMetrics(registry), t.otel),
    )  # fmt: skip
    client = Client(WsgiInstrumentation(mw, tracer_provider=t.tracer_provider))
    r = client.post(PATH, json=BODY, environ_base={"REMOTE_ADDR": CALLER}, buffered=True)
    assert r.status_code == 200
    assert registry.get_sample_value(
        "quota_tokens_total", {"model": "gpt-4o-mini", "kind": "input"}
    ) == 33  # fmt: skip
    assert t.token_points()["input"].sum == 33
    assert t.server_spans()[0].attributes["gen_ai.usage.output_tokens"] == 44


def test_without_a_recording_span_nothing_is_set_and_nothing_fails() -> None:
    t = Telemetry()
    mw = WSGIQuotaMiddleware(ai_app.wsgi_app, config=_config(), backend=MemoryBackend(),
                             metrics=t.otel)  # fmt: skip
    r = Client(mw).post(PATH, json=BODY, environ_base={"REMOTE_ADDR": CALLER}, buffered=True)
    assert r.status_code == 200
    assert t.spans.get_finished_spans() == ()
    assert t.token_points()["output"].sum == 44  # the metric still counts
