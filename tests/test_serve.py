"""``quota-middleware serve``: the standalone gateway in a subprocess (uvicorn, two workers,
a real redis-server), the openai SDK as the client, the recording fake provider upstream."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from fake_provider import Provider, ServerThread, create_app
from quota_middleware import QuotaConfig, UsageReader
from quota_middleware.backends.redis import SyncRedisBackend
from servers import free_port, stop_process, wait_port

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

SERVER_KEY = "sk-gateway-" + "k" * 40
PROMPT = [{"role": "user", "content": "Tell me something about rate limits"}]


@pytest.fixture
def gateway(tmp_path: Path, redis_server: Any) -> Iterator[tuple[Provider, str, QuotaConfig]]:
    fake = Provider()
    with ServerThread(create_app(fake)) as upstream:
        policy = tmp_path / "policy.toml"
        policy.write_text(
            f'unpriced = "tokens-only"\n'
            f'[storage]\nurl = "{redis_server.url}"\nprefix = "gw{uuid.uuid4().hex[:8]}"\n'
            '[plans.free]\nlimits = [{ type = "requests", rate = "100/minute" }]\n'
            '[proxy]\nmount = ""\n'
            f'[[proxy.upstreams]]\nname = "openai"\nprovider = "openai"\n'
            f'base_url = "{upstream.url}/v1"\n'
            '[[proxy.upstreams.keys]]\nid = "primary"\nenv = "GW_OPENAI_KEY"\n'
        )
        port = free_port()
        env = {**os.environ, "GW_OPENAI_KEY": SERVER_KEY}
        env.pop("QUOTA_REDIS_URL", None)
        cmd = [sys.executable, "-m", "quota_middleware.cli", "serve", "--policy", str(policy),
               "--port", str(port), "--workers", "2", "--log-level", "warning"]  # fmt: skip
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_port(port, proc)
            fake.proc = proc  # type: ignore[attr-defined]
            yield fake, f"http://127.0.0.1:{port}", QuotaConfig.from_toml(policy)
        finally:
            stop_process(proc)


def usage_of(config: QuotaConfig, timeout: float = 5.0, want: int = 1) -> tuple[int, int, int]:
    client = redis.Redis.from_url(config.storage.url)
    reader = UsageReader(config, SyncRedisBackend(client))
    deadline = time.monotonic() + timeout
    while True:
        records = reader.usage("127.0.0.1")
        total = (sum(r.requests for r in records), sum(r.output_tokens for r in records),
                 sum(r.estimated for r in records))  # fmt: skip
        if total[0] >= want or time.monotonic() > deadline:
            return total
        time.sleep(0.05)


def test_the_gateway_serves_health_metrics_and_exact_sdk_calls(gateway: Any) -> None:
    fake, url, config = gateway
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    metrics = httpx.get(f"{url}/metrics")
    assert metrics.status_code == 200 and "quota_" in metrics.text
    client = openai.OpenAI(base_url=f"{url}/openai", api_key="sk-client-key", max_retries=0)
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT)
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT,
                                                 stream=True))  # fmt: skip
    assert all(c.choices for c in chunks)
    assert reply.usage is not None
    requests, output, estimated = usage_of(config, want=2)
    assert (requests, output, estimated) == (2, 2 * reply.usage.completion_tokens, 0)
    assert all(s.headers["authorization"] == f"Bearer {SERVER_KEY}" for s in fake.seen)
    assert httpx.post(f"{url}/openai/..%2fadmin", content=b"{}").status_code == 400


def test_sigterm_lets_an_in_flight_stream_finish_and_settles_it(gateway: Any) -> None:
    fake, url, config = gateway
    fake.delay = 0.1
    req = {"model": "gpt-4o-mini", "messages": PROMPT, "stream": True}
    with httpx.stream("POST", f"{url}/openai/chat/completions", json=req, timeout=10) as r:
        it = r.iter_bytes()
        body = next(it)
        fake.proc.send_signal(signal.SIGTERM)
        body += b"".join(it)
    assert body.rstrip().endswith(b"data: [DONE]")
    requests, output, estimated = usage_of(config)
    assert requests == 1 and output > 0 and estimated == 0
    fake.proc.wait(15)
