"""Redis stopped, slow or restarted: fail-open admits, fail-closed answers 503, both recover,
and no exception ever reaches the server."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from ai_harness import FailingKeys, ai_info, chat, config
from harness import Harness
from quota_middleware import (
    AppBudget,
    Plan,
    QuotaConfig,
    RequestRate,
    StorageConfig,
    TokenQuota,
)
from quota_middleware.base._protocols import CircuitBreaker
from quota_middleware.core._engine import Engine, drive_sync
from quota_middleware.metering._usage import Usage

ADAPTERS = ["asgi", "wsgi"]


class _URLBackend:
    """Stands in for the ``backend`` fixture: no backend is passed, so the middleware builds its
    own clients from ``config.storage.url``, with the real timeouts and circuit breaker."""

    def sync(self) -> None:
        return None

    def async_(self) -> None:
        return None


def _config(url: str, on_error: str) -> QuotaConfig:
    return QuotaConfig(
        plans=[
            Plan(
                name="p",
                on_error=on_error,  # type: ignore[arg-type]
                limits=[RequestRate(rate="3/hour", name="rph")],
            ),
        ],  # fmt: skip
        storage=StorageConfig(url=url, timeout=0.2, breaker_failures=2, breaker_reset=0.3),
    )


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("on_error", ["open", "closed"])
def test_redis_down_then_back(fresh_redis_server: Any, adapter: str, on_error: str) -> None:
    h = Harness.build(adapter, _URLBackend(), _config(fresh_redis_server.url, on_error))
    try:
        assert h.request().status == 200
        fresh_redis_server.stop()

        down = [h.request() for _ in range(6)]
        expected = 200 if on_error == "open" else 503
        assert [r.status for r in down] == [expected] * 6
        if on_error == "closed":
            assert down[0].body["error"]["code"] == "quota_store_unavailable"
            assert int(down[0].headers["retry-after"]) >= 1
        else:
            assert "ratelimit" not in down[0].headers
        stats = h.middleware.stats
        assert stats["degraded_" + on_error] == 6

        # the breaker is open: a degraded decision costs no socket timeout
        start = time.perf_counter()
        h.request()
        assert time.perf_counter() - start < 0.15

        fresh_redis_server.start()
        # recovery without a restart: once the breaker lets a probe through, limits apply again;
        # the bucket still holds the first request (the server kept no data, so it is full)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            r = h.request()
            if r.status == 200 and "ratelimit" in r.headers:
                break
            time.sleep(0.1)
        else:
            pytest.fail("limits did not come back after Redis did")
        statuses = [h.request().status for _ in range(3)]
        assert statuses == [200, 200, 429]
    finally:
        h.close()


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_redis_restart_flushes_scripts_and_limits_keep_working(
    fresh_redis_server: Any, adapter: str
) -> None:
    import redis

    h = Harness.build(adapter, _URLBackend(), _config(fresh_redis_server.url, "closed"))
    try:
        assert h.request().status == 200
        redis.Redis.from_url(fresh_redis_server.url).script_flush()
        assert h.request().status == 200  # NOSCRIPT -> load -> retry, invisible to the caller
        assert h.request().status == 200
        assert h.request().status == 429
        fresh_redis_server.restart()
        # no request fails on a connection the old server closed (that would be a 503 here,
        # fail-closed): the server came back empty, so it is a full bucket of 3 again
        assert [h.request().status for _ in range(5)] == [200, 200, 200, 429, 429]
    finally:
        h.close()


def test_cancelled_probe_does_not_keep_the_circuit_open() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failures=1, reset=1.0, clock=lambda: now[0])
    breaker.failure()
    now[0] = 2.0
    breaker.before()  # this call is the probe...
    breaker.abandon()  # ...and it was cancelled
    breaker.before()  # the next call may probe again instead of failing forever
    breaker.success()
    breaker.before()


def test_app_spend_is_charged_when_the_caller_settle_fails() -> None:
    cfg = config(limits=[TokenQuota(tokens=10**6, name="tpd")],
                 app_budgets=[AppBudget(usd=1000, period="day", name="d")])  # fmt: skip
    engine = Engine(cfg)
    backend = FailingKeys("10.9.8.7}:s:")  # the caller's settle marker: caller settle fails
    decision = drive_sync(engine.admit(ai_info(json.dumps(chat()).encode())), backend)
    drive_sync(engine.settle(decision, Usage(input_tokens=1000, output_tokens=0), 150), backend)
    key = engine.app_period_key(cfg.app_budgets[0])[0]
    assert int(backend.store.hget(key, "d") or 0) == 150
