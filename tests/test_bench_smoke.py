"""The benchmarks still start: CI does not run them (they need minutes, wrk and the peer
libraries), but their entry points, apps and report rendering must not rot."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_metering_benchmark_quick_run() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_metering.py"), "--quick"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "per chunk" in proc.stdout


def test_http_benchmark_cli_starts() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_http.py"), "--help"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0 and "--quick" in proc.stdout


@pytest.mark.parametrize(
    "module",
    ["asgi_bare", "asgi_ours_memory", "asgi_ours_redis", "wsgi_bare", "wsgi_ours_memory",
     "wsgi_ours_redis", "ai_bare", "ai_ours_memory"],
)  # fmt: skip
def test_http_benchmark_apps_import(module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # the peers' apps need the peer libraries, installed only in the benchmark's own venv
    monkeypatch.syspath_prepend(str(BENCH))
    mod = importlib.import_module(f"http_apps.{module}")
    assert getattr(mod, "app", None) is not None


def test_http_benchmark_renders_a_recorded_run(tmp_path: Path) -> None:
    dumps = sorted(BENCH.glob("*.json"))
    if not dumps:
        pytest.skip("no recorded run in bench/ to render")
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_http.py"), "--render", str(dumps[-1])],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    json.loads(dumps[-1].read_text())
