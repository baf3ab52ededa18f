"""Added latency of the backend proxy (``quota-middleware serve``) over calling the upstream
directly, side by side in one run.

The upstream is ``examples/fake_upstream.py`` under uvicorn (no delay between chunks); the
gateway runs the proxy behind the middleware under uvicorn (one worker), on the memory store
and, when ``redis-server`` is on PATH, on a real Redis the script starts. One client (httpx,
keep-alive) sends requests one at a time; variants alternate every round. It prints p50/p99
per JSON request and per SSE stream, and the added time per SSE event.

    python bench/bench_proxy.py [--rounds 3] [--requests 300]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [{"role": "user", "content": "Tell me something about rate limits"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit((proc.stderr.read() if proc.stderr else b"").decode()[-2000:])
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} did not open")


def start(cmd: list[str], port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    wait(port, proc)
    return proc


def gateway(
    tmp: Path, upstream: str, storage: str, name: str
) -> tuple[str, subprocess.Popen[bytes]]:
    policy = tmp / f"{name}.toml"
    policy.write_text(
        f'[storage]\nurl = "{storage}"\nprefix = "bp{name}"\n'
        '[plans.free]\nlimits = [{ type = "requests", rate = "1000000/minute" },\n'
        '  { type = "token_quota", tokens = 1000000000, period = "day" },\n'
        '  { type = "budget", usd = 100000.0, period = "day" }]\n'
        f'[proxy]\nmount = ""\n[[proxy.upstreams]]\nname = "openai"\nprovider = "openai"\n'
        f'base_url = "{upstream}/v1"\n[[proxy.upstreams.keys]]\nid = "k"\nenv = "BENCH_KEY"\n'
    )
    port = free_port()
    cmd = [sys.executable, "-m", "quota_middleware.cli", "serve", "--policy", str(policy),
           "--port", str(port), "--log-level", "warning"]  # fmt: skip
    proc = start(cmd, port, {"BENCH_KEY": "sk-bench", "QUOTA_REDIS_URL": ""})
    return f"http://127.0.0.1:{port}/openai", proc


def timed(client: httpx.Client, base: str, stream: bool, n: int) -> list[float]:
    body = {"model": "gpt-4o-mini", "messages": PROMPT, "stream": stream}
    out = []
    for _ in range(n):
        t = time.perf_counter()
        with client.stream("POST", f"{base}/chat/completions", json=body) as r:
            for _chunk in r.iter_raw():
                pass
            assert r.status_code == 200, r.status_code
        out.append(time.perf_counter() - t)
    return out


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def open_streams(tmp: Path, n: int) -> None:
    """The gateway's resident memory with ``n`` streams open at once through it (a slow
    upstream: one event per second), against its memory idle."""
    import asyncio

    up_port = free_port()
    procs = [start([sys.executable, "-m", "uvicorn", "fake_upstream:app", "--app-dir",
                    str(ROOT / "examples"), "--port", str(up_port), "--log-level", "warning",
                    "--limit-concurrency", str(n + 100)], up_port,
                   {"FAKE_UPSTREAM_DELAY_MS": "1000"})]  # fmt: skip
    try:
        base, gw = gateway(tmp, f"http://127.0.0.1:{up_port}", "memory://", "streams")
        procs.append(gw)
        with httpx.Client() as c:  # warm: tiktoken, the pool
            c.post(f"{base}/chat/completions", json={"model": "gpt-4o-mini", "messages": PROMPT})
        idle = rss_kib(gw.pid)

        async def one(client: httpx.AsyncClient, started: list[int]) -> None:
            body = {"model": "gpt-4o-mini", "messages": PROMPT, "stream": True}
            async with client.stream("POST", f"{base}/chat/completions", json=body) as r:
                it = r.aiter_raw()
                await it.__anext__()
                started.append(1)
                async for _ in it:
                    pass

        async def run() -> int:
            limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
            async with httpx.AsyncClient(timeout=120, limits=limits) as client:
                started: list[int] = []
                tasks = [asyncio.ensure_future(one(client, started)) for _ in range(n)]
                while len(started) < n and not all(t.done() for t in tasks):
                    await asyncio.sleep(0.2)
                await asyncio.sleep(1.0)
                peak = rss_kib(gw.pid)
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                print(f"{len(started)} streams open at once through the gateway")
                return peak

        peak = asyncio.run(run())
        print(f"gateway RSS idle {idle / 1024:.1f} MiB, with them {peak / 1024:.1f} MiB: "
              f"{(peak - idle) / n:.1f} KiB per open stream")  # fmt: skip
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument(
        "--streams",
        type=int,
        default=0,
        help="instead: the gateway's memory with this many streams open at once",
    )
    args = ap.parse_args()
    if args.streams:
        tmp = Path(tempfile.mkdtemp())
        try:
            open_streams(tmp, args.streams)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return 0
    procs: list[subprocess.Popen[bytes]] = []
    tmp = Path(tempfile.mkdtemp())
    try:
        up_port = free_port()
        procs.append(start([sys.executable, "-m", "uvicorn", "fake_upstream:app", "--app-dir",
                            str(ROOT / "examples"), "--port", str(up_port), "--log-level",
                            "warning"], up_port, {"FAKE_UPSTREAM_DELAY_MS": "0"}))  # fmt: skip
        upstream = f"http://127.0.0.1:{up_port}"
        variants = {"direct": f"{upstream}/v1"}
        base, proc = gateway(tmp, upstream, "memory://", "mem")
        procs.append(proc)
        variants["serve (memory)"] = base
        if shutil.which("redis-server"):
            rport = free_port()
            procs.append(start(["redis-server", "--port", str(rport), "--save", "",
                                "--appendonly", "no"], rport, {}))  # fmt: skip
            base, proc = gateway(tmp, upstream, f"redis://127.0.0.1:{rport}/0", "redis")
            procs.append(proc)
            variants["serve (redis)"] = base
        else:
            print("redis-server not on PATH: the Redis variant is skipped")
        events = httpx.post(f"{upstream}/v1/chat/completions",
                            json={"model": "m", "messages": PROMPT, "stream": True}
                            ).text.count("data:")  # fmt: skip
        results: dict[tuple[str, bool], list[list[float]]] = {}
        with httpx.Client(timeout=30) as client:
            for base in variants.values():  # warm up: connections, tiktoken, scripts
                timed(client, base, False, 20)
                timed(client, base, True, 5)
            for rnd in range(args.rounds):
                order = list(variants.items())
                if rnd % 2:
                    order.reverse()
                for name, base in order:
                    for stream in (False, True):
                        n = args.requests if not stream else max(20, args.requests // 5)
                        results.setdefault((name, stream), []).append(
                            timed(client, base, stream, n)
                        )
        for stream in (False, True):
            what = f"SSE stream of {events} events" if stream else "JSON request"
            print(f"\n{what} (ms; medians over {args.rounds} rounds)")
            print(f"{'variant':<16}{'p50':>8}{'p99':>8}{'added p50':>11}"
                  + (f"{'added/event µs':>16}" if stream else ""))  # fmt: skip
            direct = statistics.median(pct(r, 0.5) for r in results[("direct", stream)])
            for name in variants:
                rounds = results[(name, stream)]
                p50 = statistics.median(pct(r, 0.5) for r in rounds)
                p99 = statistics.median(pct(r, 0.99) for r in rounds)
                added = p50 - direct
                line = f"{name:<16}{p50 * 1e3:>8.2f}{p99 * 1e3:>8.2f}{added * 1e3:>11.2f}"
                if stream:
                    line += f"{added / events * 1e6:>16.1f}" if name != "direct" else f"{'-':>16}"
                print(line)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
