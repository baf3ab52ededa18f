"""Regression tests for defects found in review: each reproduces the failure it fixes."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import pytest
import redis

from quota_middleware import AppBudget, Concurrency, Plan, QuotaConfig, QuotaMiddleware, TokenQuota
from quota_middleware.backends.base import CircuitBreaker
from quota_middleware.backends.memory import MemoryBackend
from quota_middleware.config import mask_url
from quota_middleware.engine import Engine, drive_sync
from quota_middleware.errors import StorageError
from quota_middleware.keys import app_tag, caller_tag
from quota_middleware.request import Headers, RequestInfo
from quota_middleware.scripts import ScriptCall
from quota_middleware.usage import Usage, clean_model
from test_ai import PATH, AIHarness, chat, config

SURROGATE_BODY = (
    b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}], "x_prompt": 3}'
)


@pytest.mark.parametrize("adapter", ["asgi", "wsgi"])
def test_unencodable_model_name_is_dropped_not_fatal(adapter: str, backend: Any) -> None:
    """A lone surrogate is valid JSON: it used to hang the whole Redis batch (ASGI) or escape to
    the server unsettled (WSGI)."""
    h = AIHarness(adapter, backend, config(unpriced="tokens-only"))
    try:
        r = h.post(SURROGATE_BODY)
        assert r.status == 200
        assert h.usage()["requests"] == 1  # charged, under the model "unknown"
        assert h.post(chat(x_prompt=5, x_completion=5)).status == 200
    finally:
        h.close()
    assert clean_model("\ud800") is None and clean_model("x" * 201) is None
    assert clean_model("gpt-4o") == "gpt-4o"


def test_batch_of_many_is_never_left_hanging(redis_server: Any) -> None:
    from quota_middleware.backends.redis import AsyncRedisBackend

    async def main() -> list[Any]:
        client = redis.asyncio.Redis.from_url(redis_server.url)
        backend = AsyncRedisBackend(client)
        good = ScriptCall("read", ("qm:{default:a}",), ())
        bad = ScriptCall("read", ("qm:{default:\ud800}",), ())
        try:
            return await asyncio.wait_for(
                asyncio.gather(*(backend.run_async(c) for c in (good, bad, good)),
                               return_exceptions=True), 5)  # fmt: skip
        finally:
            await client.aclose()

    replies = asyncio.run(main())
    assert replies[0] == [[]] and replies[2] == [[]]  # the good calls answered


def test_month_app_budget_outlives_a_day(backend: Any) -> None:
    """The app budget's key is only written by settle; it used to get a fixed 1-day TTL, so a
    monthly budget (and its hard stop) reset a day after its first charge."""
    cfg = config(limits=[TokenQuota(tokens=10**9, name="tpd")],
                 app_budgets=[AppBudget(usd=1000, period="month", name="m")])  # fmt: skip
    h = AIHarness("wsgi", backend, cfg)
    try:
        assert h.post(chat(x_prompt=100, x_completion=100)).status == 200
    finally:
        h.close()
    key, end_us = Engine(cfg).app_period_key(cfg.app_budgets[0])
    client = backend.sync_client()
    ttl_ms = client.pttl(key) if client is not None else backend.sync().store.pttl(key)
    assert ttl_ms >= (end_us - time.time_ns() // 1000) // 1000 + 3_500_000


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


class FailingKeys(MemoryBackend):
    """A memory backend whose calls touching keys containing ``marker`` fail."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def run(self, call: ScriptCall) -> Any:
        if any(self.marker in k for k in call.keys) or call.name == self.marker:
            raise StorageError("down for this slot")
        return super().run(call)


def _ai_info(body: bytes) -> RequestInfo:
    return RequestInfo("POST", PATH, Headers([("content-type", "application/json")]),
                       client="10.9.8.7", body=body)  # fmt: skip


def test_app_spend_is_charged_when_the_caller_settle_fails() -> None:
    cfg = config(limits=[TokenQuota(tokens=10**6, name="tpd")],
                 app_budgets=[AppBudget(usd=1000, period="day", name="d")])  # fmt: skip
    engine = Engine(cfg)
    backend = FailingKeys("10.9.8.7}:s:")  # the caller's settle marker: caller settle fails
    decision = drive_sync(engine.admit(_ai_info(json.dumps(chat()).encode())), backend)
    drive_sync(engine.settle(decision, Usage(input_tokens=1000, output_tokens=0), 150), backend)
    key = engine.app_period_key(cfg.app_budgets[0])[0]
    assert int(backend.store.hget(key, "d") or 0) == 150


def test_events_survive_an_outbox_failure_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(limits=[TokenQuota(tokens=1000, name="tpd")])
    engine = Engine(cfg)
    backend = FailingKeys("outbox_add")
    decision = drive_sync(engine.admit(_ai_info(json.dumps(chat(max_tokens=10)).encode())),
                          backend)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="quota_middleware"):
        events = drive_sync(engine.settle(decision, Usage(input_tokens=600, output_tokens=0)),
                            backend)  # fmt: skip
    assert [e.threshold for e in events] == [50]
    assert any("alert not queued" in r.message and '"threshold":50' in r.message
               for r in caplog.records)  # fmt: skip


def test_request_cancelled_during_admit_gives_its_slot_back(redis_server: Any) -> None:
    """The admit call still runs in Redis after the client is gone; its slot is released at
    once instead of when the 300 s lease ends."""
    from quota_middleware.backends.redis import AsyncRedisBackend

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    cfg = QuotaConfig(plans=[Plan(name="p", limits=[Concurrency(max=1)])])

    class Slow(AsyncRedisBackend):
        """The admit is already queued for Redis when the client goes away."""

        async def _flush_batch(self, batch: Any) -> None:
            if any(call.name == "admit" for call, _ in batch):
                await asyncio.sleep(0.2)
            await super()._flush_batch(batch)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main() -> None:
        aclient = redis.asyncio.Redis.from_url(redis_server.url)
        mw = QuotaMiddleware(app, config=cfg, backend=Slow(aclient))
        scope = {"type": "http", "method": "GET", "path": "/", "headers": [],
                 "client": ("10.1.1.1", 1), "query_string": b""}  # fmt: skip

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        async def send(message: Any) -> None:
            pass

        task = asyncio.ensure_future(mw(scope, receive, send))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.5)  # the admit completes, then the orphan is released
        await aclient.aclose()

    asyncio.run(main())
    assert client.zcard("qm:{default:10.1.1.1}:c:inflight") == 0


def test_urls_are_masked() -> None:
    assert mask_url("redis://h:6379/0?password=s3cr3t") == "redis://h:6379/0?password=***"
    assert mask_url("redis://:p@ssw0rd@h:6379/0") == "redis://:***@h:6379/0"
    assert mask_url("memory://") == "memory://"


def test_caller_tags_are_unambiguous() -> None:
    assert caller_tag("a:b", "c") != caller_tag("a", "b:c")
    assert caller_tag("default", "2001:db8::/64") == "{default:2001:db8::/64}"
    hashed = caller_tag("t", "x{y}")[3:-1]
    assert caller_tag("t", hashed) != caller_tag("t", "x{y}")  # a raw id can't pose as a digest
    assert all(app_tag("qm") != f"qm:{caller_tag(t, c)}" for t in ("app", "@app")
               for c in ("*", "@app", ""))  # fmt: skip
