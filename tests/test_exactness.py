"""Exactly N admitted: many concurrent clients, several processes, real servers, real Redis."""

from __future__ import annotations

import http.client
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from servers import serve_app, stop_process

APPS = Path(__file__).parent / "apps"
BURST = 50
PROCESSES = 4
PER_PROCESS = 60  # 240 requests in all


def _hit(port: int) -> int:
    for _attempt in range(3):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request("GET", "/", headers={"Connection": "close"})
            return conn.getresponse().status
        except (ConnectionError, http.client.HTTPException):
            time.sleep(0.05)
        finally:
            conn.close()
    return -1


def _client_process(port: int, n: int) -> list[int]:
    with ThreadPoolExecutor(max_workers=20) as pool:
        return list(pool.map(_hit, [port] * n))


@pytest.fixture
def serve(redis_server: Any) -> Iterator[Any]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(kind: str) -> int:
        import redis

        redis.Redis.from_url(redis_server.url).flushall()
        port, proc = serve_app(
            kind, "exact_app", {"QM_TEST_URL": redis_server.url, "QM_TEST_BURST": str(BURST)}
        )
        procs.append(proc)
        return port

    yield start
    for proc in procs:
        stop_process(proc)


@pytest.mark.slow
@pytest.mark.parametrize("server", ["uvicorn", "werkzeug"])
def test_exactly_burst_admitted_across_processes(serve: Any, server: str) -> None:
    port = serve(server)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(PROCESSES) as pool:
        results = pool.starmap(_client_process, [(port, PER_PROCESS)] * PROCESSES)
    counts = Counter(status for batch in results for status in batch)
    assert counts[200] == BURST, counts
    assert counts[429] == PROCESSES * PER_PROCESS - BURST, counts


def test_exactly_burst_admitted_memory_backend_threads() -> None:
    sys.path.insert(0, str(APPS))
    try:
        os.environ["QM_TEST_URL"] = "memory://"
        import importlib

        import exact_app

        importlib.reload(exact_app)
        app = exact_app.wsgi_app
    finally:
        sys.path.remove(str(APPS))
        os.environ.pop("QM_TEST_URL", None)

    statuses: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(16)

    def worker() -> None:
        barrier.wait()
        for _ in range(15):

            def sr(status: str, headers: Any, exc_info: Any = None) -> Any:
                with lock:
                    statuses.append(status[:3])

            env = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "REMOTE_ADDR": "192.0.2.1"}
            body = app(env, sr)
            getattr(body, "close", lambda: None)()

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = Counter(statuses)
    assert counts["200"] == BURST and counts["429"] == 16 * 15 - BURST, counts
