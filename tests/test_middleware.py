"""Limiter scenarios, each written once and run through both adapters on every backend."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from harness import Harness
from quota_middleware import (
    Concurrency,
    ConfigurationError,
    Plan,
    QuotaConfig,
    RequestRate,
    Routes,
    RouteWeight,
)

ADAPTERS = ["asgi", "wsgi"]


class Clock:
    """Microseconds, moved only by the test (sent to the scripts as their ``now``)."""

    def __init__(self) -> None:
        self.now = time.time_ns() // 1000

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * 1_000_000)


@pytest.fixture(params=ADAPTERS)
def adapter(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make(adapter: str, backend: Any, clock: Clock) -> Iterator[Any]:
    built: list[Harness] = []

    def factory(config: QuotaConfig, **kwargs: Any) -> Harness:
        h = Harness.build(adapter, backend, config, clock=clock, **kwargs)
        built.append(h)
        return h

    yield factory
    for h in built:
        h.close()


def one_plan(*limits: Any, shadow: bool = False, routes: Routes | None = None) -> QuotaConfig:
    return QuotaConfig(
        plans=[Plan(name="default", limits=limits, shadow=shadow)], routes=routes or Routes()
    )


def test_burst_then_429_with_retry_after_and_headers(make: Any, clock: Clock) -> None:
    h = make(one_plan(RequestRate(rate="10/minute", burst=3, name="rpm")))
    statuses = [h.request().status for _ in range(3)]
    assert statuses == [200, 200, 200]
    r = h.request()
    assert r.status == 429
    # one token refills every 6 s; the clock has not moved
    assert r.retry_after == 6
    assert r.headers["ratelimit-policy"] == '"rpm";q=3;w=18'
    assert r.headers["ratelimit"] == '"rpm";r=0;t=6'
    assert r.body["error"]["type"] == "rate_limit_exceeded"
    assert r.body["error"]["limit"] == "rpm"
    assert r.headers["content-type"] == "application/json"
    clock.advance(5.9)
    assert h.request().status == 429
    clock.advance(0.1)
    ok = h.request()
    assert ok.status == 200
    assert ok.headers["ratelimit"] == '"rpm";r=0;t=18'


def test_admitted_response_carries_headers_and_decision(make: Any) -> None:
    h = make(one_plan(RequestRate(rate="5/second", name="rps")))
    r = h.request()
    assert r.status == 200
    assert r.headers["ratelimit"] == '"rps";r=4;t=1'
    assert r.decision is not None and r.decision.allowed
    assert r.decision.caller_id == "203.0.113.7"
    assert r.body["caller"] == "203.0.113.7"


def test_callers_are_limited_separately(make: Any) -> None:
    h = make(one_plan(RequestRate(rate="1/minute", name="rpm")))
    assert h.request(client_ip="198.51.100.1").status == 200
    assert h.request(client_ip="198.51.100.1").status == 429
    assert h.request(client_ip="198.51.100.2").status == 200


def test_all_or_nothing_across_buckets(make: Any, clock: Clock) -> None:
    h = make(
        one_plan(
            RequestRate(rate="100/minute", name="wide"),
            RequestRate(rate="2/minute", name="narrow", paths=["/narrow/*"]),
        )
    )
    assert [h.request("/narrow/x").status for _ in range(3)] == [200, 200, 429]
    # the denied request did not consume "wide": 98 left after two admitted requests
    r = h.request("/other")
    assert r.headers["ratelimit"] == '"wide";r=97;t=2'


def test_exempt_path_is_never_limited_and_has_no_headers(make: Any) -> None:
    h = make(one_plan(RequestRate(rate="1/minute", name="rpm"), routes=Routes(exempt=["/health"])))
    for _ in range(5):
        r = h.request("/health")
        assert r.status == 200
        assert "ratelimit" not in r.headers
    assert h.request("/api").status == 200
    assert h.request("/api").status == 429


def test_route_weight(make: Any) -> None:
    routes = Routes(weights=[RouteWeight(path="/heavy/*", weight=4)])
    h = make(one_plan(RequestRate(rate="10/minute", burst=10, name="rpm"), routes=routes))
    assert h.request("/heavy/a").headers["ratelimit"].startswith('"rpm";r=6;')
    assert h.request("/heavy/a").headers["ratelimit"].startswith('"rpm";r=2;')
    assert h.request("/heavy/a").status == 429
    assert h.request("/light").status == 200


def test_weight_above_burst_is_a_startup_error() -> None:
    with pytest.raises(ConfigurationError, match="weight"):
        QuotaConfig(
            plans=[Plan(name="p", limits=[RequestRate(rate="2/minute")])],
            routes=Routes(weights=[RouteWeight(path="/x", weight=3)]),
        )


def test_shadow_mode_reports_but_never_blocks(make: Any) -> None:
    h = make(one_plan(RequestRate(rate="1/minute", name="rpm"), shadow=True))
    assert h.request().status == 200
    r = h.request()
    assert r.status == 200
    assert r.decision is not None
    assert r.decision.shadow and r.decision.denied_by == "rpm"
    assert h.middleware.stats["shadow_denied"] == 1


def test_concurrency_slot_is_released_after_response(make: Any) -> None:
    h = make(one_plan(Concurrency(max=1, name="inflight")))
    for _ in range(3):
        r = h.request()
        assert r.status == 200
        assert r.headers["ratelimit"] == '"inflight";r=0;t=0'


def test_plans_by_caller(make: Any, adapter: str, backend: Any, clock: Clock) -> None:
    from quota_middleware import Caller

    def resolver(info: Any) -> Caller | None:
        tier = info.headers.get("x-tier")
        return Caller(id=f"user-{tier}", plan=tier, source="custom") if tier else None

    from quota_middleware.identity._identifier import IdentityConfig

    config = QuotaConfig(
        plans=[
            Plan(name="free", limits=[RequestRate(rate="1/minute", name="rpm")]),
            Plan(name="pro", limits=[RequestRate(rate="3/minute", name="rpm")]),
        ],
        identity=IdentityConfig(order=("custom", "ip"), resolver=resolver),
    )
    h = make(config)
    assert [h.request(headers={"x-tier": "pro"}).status for _ in range(4)] == [200] * 3 + [429]
    assert [h.request(headers={"x-tier": "free"}).status for _ in range(2)] == [200, 429]
    # unknown plan names fall back to the default plan (the first)
    r = h.request()
    assert r.status == 200 and r.decision is not None and r.decision.plan == "free"
