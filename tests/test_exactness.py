"""Exactly N admitted: many concurrent clients, several processes, real servers, real Redis."""

from __future__ import annotations

import http.client
import multiprocessing
import os
import socket
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

from servers import free_port

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


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"server exited early: {err[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


@pytest.fixture
def serve(redis_server: Any) -> Iterator[Any]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(kind: str) -> int:
        import redis

        redis.Redis.from_url(redis_server.url).flushall()
        port = free_port()
        env = {**os.environ, "QM_TEST_URL": redis_server.url, "QM_TEST_BURST": str(BURST),
               "PYTHONPATH": str(APPS)}  # fmt: skip
        if kind == "uvicorn":
            cmd = [sys.executable, "-m", "uvicorn", "exact_app:asgi_app", "--port", str(port),
                   "--host", "127.0.0.1", "--workers", "2", "--log-level", "warning"]  # fmt: skip
        else:
            code = (
                "import exact_app; from werkzeug.serving import run_simple; "
                f"run_simple('127.0.0.1', {port}, exact_app.wsgi_app, threaded=True)"
            )
            cmd = [sys.executable, "-c", code]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(proc)
        _wait_port(port, proc)
        return port

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


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
