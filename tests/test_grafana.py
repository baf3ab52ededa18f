"""The shipped Grafana dashboard (docs/grafana/quota-middleware.json) asks only for series the
middleware exports, with label values it really sets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from quota_middleware import AlertEvent, Decision
from quota_middleware.metering import Usage

prometheus_client = pytest.importorskip("prometheus_client")

DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana" / "quota-middleware.json"


def exported() -> tuple[set[str], dict[str, set[str]]]:
    """Every series name a fed PrometheusMetrics exposes, and each label's values."""
    from quota_middleware.metrics import PrometheusMetrics

    registry = prometheus_client.CollectorRegistry()
    m = PrometheusMetrics(registry)
    m.decision(Decision(allowed=True, request_id="a", plan="free"))
    m.decision(Decision(allowed=False, request_id="b", plan="free", reason="rate"))
    m.usage(Usage(input_tokens=10, output_tokens=5, cached_tokens=2, reasoning_tokens=1,
                  model="gpt-4o-mini", estimated=True, reason="usage_invalid"), 123)  # fmt: skip
    m.decision(Decision(allowed=True, request_id="c", plan="free", degraded=True))
    m.alert(AlertEvent(id="x", type="threshold", caller="a", tenant="t", plan="free",
                       limit="usd", period="2026-12", threshold=80, used=1, limit_value=2,
                       unit="usd_micros", at=0.0), "sent")  # fmt: skip
    m.store("admit", 0.001, True)
    m.store("admit", 0.002, False)
    m.settle_buffer(1, 0)
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    for family in registry.collect():
        for sample in family.samples:
            names.add(sample.name)
            for k, v in sample.labels.items():
                labels.setdefault(k, set()).add(v)
    return names, labels


def test_every_panel_queries_exported_series_and_label_values() -> None:
    dashboard = json.loads(DASHBOARD.read_text("utf-8"))
    names, labels = exported()
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(dashboard["panels"]) >= 10 and len(exprs) >= 12
    for expr in exprs:
        for name in re.findall(r"\bquota_[a-z_]+", expr):
            assert name in names, (name, expr)
        for label, value in re.findall(r'(\w+)="([^"]*)"', expr):
            assert value in labels.get(label, set()), (label, value, expr)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(set(ids)) == len(ids)
