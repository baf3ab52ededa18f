"""Overspend bound under concurrency: 50 concurrent streaming requests against a daily token quota
(and a USD budget) on a real redis-server, through real servers."""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from ai_app import STREAM_BODY
from quota_middleware import Budget, Plan, QuotaConfig, StorageConfig, TokenQuota
from quota_middleware.backends.redis import SyncRedisBackend
from quota_middleware.metering._estimate import parse_request
from quota_middleware.metering._usage import Usage
from quota_middleware.metering.pricing import PriceTable, cost_micros
from quota_middleware.reports import UsageReader
from servers import serve_app, stop_process

APPS = Path(__file__).parent / "apps"
BODY = STREAM_BODY
PROMPT_ESTIMATE = parse_request("openai-chat", json.dumps(BODY).encode()).prompt_tokens
ACTUAL = 40 + 260


@pytest.fixture
def serve(redis_server: Any) -> Iterator[Any]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(kind: str, **env: str) -> int:
        redis.Redis.from_url(redis_server.url).flushall()
        port, proc = serve_app(kind, "ai_server", {"QM_TEST_URL": redis_server.url, **env})
        procs.append(proc)
        return port

    yield start
    for proc in procs:
        stop_process(proc)


def _stream(port: int) -> int:
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions",
                           json=BODY) as r:  # fmt: skip
            for _ in r.iter_bytes():
                pass
            return r.status_code


def _burst(port: int, n: int = 50) -> Counter[int]:
    with ThreadPoolExecutor(max_workers=n) as pool:
        return Counter(pool.map(lambda _: _stream(port), range(n)))


def _settled_usage(reader: UsageReader, admitted: int) -> Any:
    """The usage record once every admitted request has settled: settle runs after the last
    byte is sent, so the client can finish reading a moment before its charge lands."""
    deadline = time.monotonic() + 10
    while True:
        records = reader.usage("127.0.0.1", days=1)
        if (records and records[0].requests >= admitted) or time.monotonic() > deadline:
            (rec,) = records
            return rec
        time.sleep(0.05)


def _drain(port: int) -> int:
    """Requests admitted after the burst: refunds of over-estimates may let one more in with a
    cut-short reservation; after that, only whole reservations fit, and none do."""
    extra = 0
    for _ in range(3):
        if _stream(port) != 200:
            break
        extra += 1
    assert _stream(port) == 429
    return extra


def _reader(url: str, limit: Any) -> UsageReader:
    cfg = QuotaConfig(plans=[Plan(name="p", limits=[limit])], storage=StorageConfig(url=url))
    return UsageReader(cfg, SyncRedisBackend(redis.Redis.from_url(url)))


@pytest.mark.slow
@pytest.mark.parametrize("server", ["uvicorn", "werkzeug"])
def test_token_quota_overspend_is_bounded(serve: Any, redis_server: Any, server: str) -> None:
    quota = 10_000
    port = serve(server, QM_TEST_TOKENS=str(quota))
    counts = _burst(port)
    assert counts[200] + counts[429] == 50 and counts[429] > 0
    counts[200] += _drain(port)
    reader = _reader(redis_server.url, TokenQuota(tokens=quota, name="tpd"))
    rec = _settled_usage(reader, counts[200])
    charged = rec.input_tokens + rec.output_tokens
    assert rec.requests == counts[200] and rec.estimated == 0
    # every admitted request is charged exactly; at most one ran past what was left (once a
    # reservation is cut short, refunds cannot let further cut-short requests in)
    assert charged == counts[200] * ACTUAL
    assert charged <= quota + (ACTUAL - PROMPT_ESTIMATE)
    (left,) = reader.remaining("127.0.0.1")
    assert left.remaining < PROMPT_ESTIMATE + BODY["max_tokens"]


@pytest.mark.slow
@pytest.mark.parametrize("server", ["uvicorn", "werkzeug"])
def test_budget_overspend_is_bounded(serve: Any, redis_server: Any, server: str) -> None:
    price = PriceTable().lookup("gpt-4o-mini")
    assert price is not None
    one = cost_micros(Usage(input_tokens=40, output_tokens=260), price)
    least = max(1, cost_micros(Usage(input_tokens=PROMPT_ESTIMATE), price))
    budget_micros = 20 * one + one // 2  # room for 20.5 requests
    port = serve(server, QM_TEST_USD=str(budget_micros / 1_000_000))
    counts = _burst(port)
    assert counts[429] > 0
    counts[200] += _drain(port)
    reader = _reader(redis_server.url, Budget(usd=budget_micros / 1e6, period="day", name="usd"))
    rec = _settled_usage(reader, counts[200])
    assert rec.cost_micros == counts[200] * one
    assert rec.cost_micros <= budget_micros + (one - least)
    reserve = cost_micros(Usage(input_tokens=PROMPT_ESTIMATE, output_tokens=300), price)
    assert counts[200] >= budget_micros // reserve
