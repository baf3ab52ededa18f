"""Prometheus metrics through both adapters: decisions, tokens and cost, store latency, with
bounded labels."""

from __future__ import annotations

import json
from typing import Any

import pytest

prometheus_client = pytest.importorskip("prometheus_client")

from prometheus_client import CollectorRegistry  # noqa: E402

from ai_harness import AIHarness, chat, config  # noqa: E402
from quota_middleware import RequestRate, TokenQuota  # noqa: E402
from quota_middleware.metrics import PrometheusMetrics  # noqa: E402


def value(registry: Any, name: str, **labels: str) -> float:
    v = registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


@pytest.mark.parametrize("adapter", ["asgi", "wsgi"])
def test_decisions_tokens_cost_and_store_latency(adapter: str, backend: Any) -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry, max_models=2)
    cfg = config(limits=[RequestRate(rate="2/minute", name="rpm"),
                         TokenQuota(tokens=100_000, name="tpd")])  # fmt: skip
    h = AIHarness(adapter, backend, cfg, metrics=metrics)
    try:
        assert h.post(chat(x_prompt=100, x_completion=20)).status == 200
        assert h.post({**chat(x_prompt=7, x_completion=3), "model": "gpt-4o"}).status == 200
        assert h.post(chat()).status == 429
    finally:
        h.close()
    assert value(registry, "quota_decisions_total", outcome="allowed", reason="", plan="p") == 2
    assert value(registry, "quota_decisions_total", outcome="denied", reason="rate", plan="p") == 1
    assert value(registry, "quota_tokens_total", model="gpt-4o-mini", kind="input") == 100
    assert value(registry, "quota_tokens_total", model="gpt-4o-mini", kind="output") == 20
    assert value(registry, "quota_tokens_total", model="gpt-4o", kind="output") == 3
    assert value(registry, "quota_cost_usd_total", model="gpt-4o-mini") > 0
    text = prometheus_client.generate_latest(registry).decode()
    assert "192.0.2" not in text  # caller ids are never labels


def test_store_latency_is_observed(redis_server: Any) -> None:
    """The middleware builds its own Redis backend from the URL and reports each call."""
    from werkzeug.test import Client

    import ai_app
    from quota_middleware import StorageConfig, WSGIQuotaMiddleware

    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry)
    cfg = config(storage=StorageConfig(url=redis_server.url))
    mw = WSGIQuotaMiddleware(ai_app.wsgi_app, config=cfg, metrics=metrics)
    r = Client(mw).post("/v1/chat/completions", data=json.dumps(chat()), buffered=True,
                        content_type="application/json")  # fmt: skip
    assert r.status_code == 200
    assert value(registry, "quota_store_seconds_count", call="admit", ok="true") == 1
    # the caller's settle and the app's (its rollups)
    assert value(registry, "quota_store_seconds_count", call="settle", ok="true") == 2


def test_model_labels_are_bounded(backend: Any) -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry, max_models=2)
    from quota_middleware.metering._usage import Usage

    for i in range(10):
        metrics.usage(Usage(input_tokens=1, model=f"m{i}"), 0)
    models = {
        s.labels["model"]
        for m in registry.collect() for s in m.samples if "model" in s.labels
    }  # fmt: skip
    assert models == {"m0", "m1", "other"}


def test_alert_deliveries_are_counted() -> None:
    from quota_middleware.alerts import AlertsConfig, Dispatcher
    from quota_middleware.backends.memory import MemoryBackend
    from quota_middleware.base._events import AlertEvent, outbox_call

    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry)
    got: list[AlertEvent] = []
    backend = MemoryBackend()
    event = AlertEvent(id="x", type="threshold", caller="a", tenant="default", plan="p",
                       limit="tpd", period="2026-11-28", threshold=50, used=5, limit_value=10,
                       unit="tokens", at=0.0)  # fmt: skip
    backend.run(outbox_call("qm", [event]))
    d = Dispatcher(backend, AlertsConfig(callables=[got.append], log=False), metrics=metrics)
    assert d.run_once() == 1
    assert got == [event]
    assert value(registry, "quota_alerts_total", type="threshold", state="delivered") == 1
