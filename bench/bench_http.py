"""HTTP throughput of quota-middleware against a bare app and its peers, over real sockets.

Each variant is the same tiny app (``GET /`` -> ``{"ok": true}``, bench/http_apps/) served by
uvicorn (1 worker, uvloop + httptools) for ASGI or gunicorn (1 sync worker) for Flask, loaded by
wrk on loopback. The server is pinned to core 0 and wrk + redis-server to core 1 (taskset, when
there are >= 2 cores). Every variant is warmed up, then measured; rounds run the variants in
alternating order (A B C ..., then ... C B A); tables report medians over rounds, and each
variant's req/s as a ratio to the bare app of the same round and framework.

Usage (normally through ``bash bench/run_http.sh``, which builds the venv this needs)::

    python bench/bench_http.py                 # full run (~10 min on 2 cores), prints markdown
    python bench/bench_http.py --write         # ... and (re)writes the HTTP section of results.md
    python bench/bench_http.py --quick         # smoke test: bare + ours-memory, 1 s each, < 60 s

Exit status 1 (with ``FAILED: ...`` lines) when a server did not start, a response was not 2xx,
wrk saw socket errors, or the first response of a variant was not the expected body.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results.md"
SECTION = "## HTTP throughput vs peers"
PY = sys.executable

CHAT = {
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Say hello to the HTTP benchmark in a few words."},
    ],
    "max_tokens": 40,
}
CHAT_STREAM = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}

LUA_CALLERS = """
-- X-Caller cycles through N distinct values (N = first script argument), one per request
local n, i = 1, 0
function init(args)
  n = tonumber(args[1]) or 1
  i = math.random(0, n - 1)
end
function request()
  i = (i + 1) % n
  return wrk.format("GET", "/", {["X-Caller"] = "c" .. i})
end
"""
LUA_POST = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[%s]]
"""


@dataclass(frozen=True)
class Variant:
    name: str  # row label
    group: str  # ratio against the group's "bare" of the same round
    module: str  # bench.http_apps.<module>:app
    server: str = "uvicorn"  # or "gunicorn"
    redis: bool = False
    script: str | None = None  # "callers", "ai-json", "ai-stream"
    callers: int = 0
    peer: bool = False


ASGI = [
    Variant("bare", "asgi", "asgi_bare"),
    Variant("quota-middleware, memory", "asgi", "asgi_ours_memory"),
    Variant("quota-middleware, redis", "asgi", "asgi_ours_redis", redis=True),
    Variant("slowapi, redis", "asgi", "asgi_slowapi", redis=True, peer=True),
    Variant("fastapi-limiter, redis", "asgi", "asgi_fastapi_limiter", redis=True, peer=True),
    Variant("asgi-ratelimit, redis", "asgi", "asgi_ratelimit", redis=True, peer=True),
]
WSGI = [
    Variant("bare", "wsgi", "wsgi_bare", "gunicorn"),
    Variant("quota-middleware, memory", "wsgi", "wsgi_ours_memory", "gunicorn"),
    Variant("quota-middleware, redis", "wsgi", "wsgi_ours_redis", "gunicorn", redis=True),
    Variant("flask-limiter, redis", "wsgi", "wsgi_flask_limiter", "gunicorn", True, peer=True),
]
AI = [
    Variant(f"{label}", f"ai-{mode}", mod, redis=mod.endswith("redis"), script=f"ai-{mode}")
    for mode in ("json", "stream")
    for label, mod in (
        ("bare", "ai_bare"),
        ("quota-middleware metered, memory", "ai_ours_memory"),
        ("quota-middleware metered, redis", "ai_ours_redis"),
    )
]
SCALE = [
    Variant(f"{n:,} callers", "scale", "asgi_ours_redis_callers", redis=True, script="callers",
            callers=n)
    for n in (1, 1_000, 100_000)
]  # fmt: skip
SCALE_BARE = Variant("bare", "scale", "asgi_bare")
QUICK = [ASGI[0], ASGI[1]]


@dataclass
class Run:
    variant: str
    group: str
    round: int
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    requests: int = 0
    non2xx: int = 0
    socket_errors: str = ""
    redis_cmds: dict[str, float] = field(default_factory=dict)  # per request, by command
    round_trips: float | None = None  # top-level redis commands per request (MONITOR)
    reads: float | None = None  # socket reads by redis-server per request
    memory: dict[str, Any] = field(default_factory=dict)
    error: str = ""


# -- processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin(core: int) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return ["taskset", "-c", str(core)]
    return []


def start_server(v: Variant, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    app = f"bench.http_apps.{v.module}:app"
    if v.server == "uvicorn":
        cmd = [PY, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--loop", "uvloop", "--http", "httptools",
               "--log-level", "warning", "--no-access-log"]  # fmt: skip
    else:
        cmd = [PY, "-m", "gunicorn", "-w", "1", "-k", "sync", "-b", f"127.0.0.1:{port}",
               "--log-level", "warning", "--backlog", "2048", app]  # fmt: skip
    return subprocess.Popen(
        pin(0) + cmd, cwd=ROOT, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def wait_ready(proc: subprocess.Popen[bytes], port: int, v: Variant, timeout: float = 20) -> str:
    """Wait until the server answers; return "" or an error. Checks the first response."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            return f"server exited ({proc.returncode}): {err.strip()[-600:]}"
        try:
            if v.script and v.script.startswith("ai-"):
                body = json.dumps(CHAT_STREAM if v.script == "ai-stream" else CHAT).encode()
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                    headers={"Content-Type": "application/json"},
                )  # fmt: skip
                with urllib.request.urlopen(req, timeout=5) as r:
                    data = r.read()
                    ok = r.status == 200 and b"usage" in data
            else:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    data = r.read()
                    ok = r.status == 200 and json.loads(data) == {"ok": True}
            return "" if ok else f"unexpected first response: {data[:200]!r}"
        except (OSError, ValueError):
            time.sleep(0.1)
    return "server did not answer in time"


_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _UNIT[m.group(2)]


def wrk(port: int, seconds: float, path: str, script: Path | None, args: list[str],
        connections: int) -> dict[str, Any]:  # fmt: skip
    cmd = pin(1) + ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
                    "--timeout", "10s"]  # fmt: skip
    if script is not None:
        cmd += ["-s", str(script)]
    cmd.append(f"http://127.0.0.1:{port}{path}")
    if args:
        cmd += ["--", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    res: dict[str, Any] = {"raw": out}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["rps"] = float(m.group(1)) if m else 0.0
    m = re.search(r"(\d+) requests in", out)
    res["requests"] = int(m.group(1)) if m else 0
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        res[f"p{pct}"] = _ms(m.group(1)) if m else 0.0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: (.*)", out)
    res["socket_errors"] = m.group(1).strip() if m else ""
    return res


# -- redis -----------------------------------------------------------------------------------


class RedisServer:
    def __init__(self) -> None:
        import redis

        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        self.proc = subprocess.Popen(
            pin(1) + ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                      "--save", "", "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.client = redis.Redis(port=self.port)
        for _ in range(100):
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        self.version = self.client.info("server")["redis_version"]

    def commandstats(self) -> Counter[str]:
        stats = self.client.info("commandstats")
        c: Counter[str] = Counter()
        for k, v in stats.items():
            name = k.removeprefix("cmdstat_")
            if name not in ("info", "ping", "dbsize", "flushall", "memory", "client"):
                c[name] = int(v["calls"])
        return c

    def reads(self) -> int:
        """Socket reads redis-server processed: a client that batches (pipelines) concurrent
        commands on one connection gets several commands per read."""
        return int(self.client.info("stats")["total_reads_processed"])

    def monitor(self) -> subprocess.Popen[bytes]:
        """MONITOR to a temp file: top-level commands show the client address, commands run
        by a Lua script show ``[0 lua]``."""
        self.monitor_file = Path(self.dir) / "monitor.txt"
        return subprocess.Popen(
            ["redis-cli", "-p", str(self.port), "monitor"], stdout=self.monitor_file.open("wb"),
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def top_level_commands(self, proc: subprocess.Popen[bytes]) -> int:
        proc.terminate()
        proc.wait(5)
        n = 0
        for line in self.monitor_file.read_text(errors="replace").splitlines():
            if "[0 " in line and " lua]" not in line and '"monitor"' not in line.lower():
                n += 1
        return n

    def used_memory(self) -> int:
        return int(self.client.info("memory")["used_memory"])

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.client.shutdown(nosave=True)
        with contextlib.suppress(Exception):
            self.proc.wait(5)
        stop(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


# -- one measurement -------------------------------------------------------------------------


def measure(v: Variant, rnd: int, opts: argparse.Namespace, redis_srv: RedisServer | None,
            scripts: dict[str, Path]) -> Run:  # fmt: skip
    run = Run(v.name, v.group, rnd)
    env = {**os.environ, "PYTHONHASHSEED": "0", "FAKE_UPSTREAM_DELAY_MS": "0"}
    env.pop("QUOTA_REDIS_URL", None)
    if redis_srv is not None:
        env["REDIS_URL"] = redis_srv.url
        redis_srv.client.flushall()
    port = free_port()
    proc = start_server(v, port, env)
    try:
        err = wait_ready(proc, port, v)
        if err:
            run.error = err
            return run
        path = "/v1/chat/completions" if v.script and v.script.startswith("ai-") else "/"
        script = scripts.get(v.script or "")
        args = [str(v.callers)] if v.callers else []
        wrk(port, opts.warmup, path, script, args, opts.connections)
        if v.redis and redis_srv is not None:
            if v.callers:
                redis_srv.client.flushall()
                time.sleep(0.2)
            cs0, w0, mem0 = redis_srv.commandstats(), redis_srv.reads(), None
            if v.callers:
                mem0 = redis_srv.used_memory()
        res = wrk(port, opts.duration, path, script, args, opts.connections)
        if v.redis and redis_srv is not None:
            if v.callers:  # right away: keys live ~1 s after their caller's last request
                mem1, keys = redis_srv.used_memory(), int(redis_srv.client.dbsize())
            cs1, w1 = redis_srv.commandstats(), redis_srv.reads()
            # round trips: a short extra run under MONITOR (slow, so not in the measured one)
            mon = redis_srv.monitor()
            time.sleep(0.2)
            mres = wrk(port, 1, path, script, args, 4)
            top = redis_srv.top_level_commands(mon)
        run.rps, run.requests = res["rps"], res["requests"]
        run.p50_ms, run.p99_ms = res["p50"], res["p99"]
        run.non2xx, run.socket_errors = res["non2xx"], res["socket_errors"]
        if not run.requests:
            run.error = "wrk reported no requests: " + res["raw"][-400:]
        if v.redis and redis_srv is not None and run.requests:
            n = run.requests
            run.redis_cmds = {k: (cs1[k] - cs0[k]) / n for k in cs1 if cs1[k] - cs0[k] > 0}
            run.reads = (w1 - w0) / n
            run.round_trips = top / mres["requests"] if mres["requests"] else None
            if v.callers and mem0 is not None:
                run.memory = {"keys": keys, "bytes": mem1 - mem0,
                              "per_key": (mem1 - mem0) / keys if keys else None}  # fmt: skip
    finally:
        stop(proc)
    if v.callers and redis_srv is not None and run.memory:
        # keys expire ~1 s after their last request (bucket full again + 1 s slack)
        t0 = time.monotonic()
        while time.monotonic() - t0 < opts.expiry_wait and redis_srv.client.dbsize() > 0:
            time.sleep(0.25)
        run.memory["keys_after"] = int(redis_srv.client.dbsize())
        run.memory["expired_in_s"] = round(time.monotonic() - t0, 2)
        run.memory["bytes_after"] = redis_srv.used_memory() - mem0  # type: ignore[operator]
    return run


def profile(opts: argparse.Namespace, redis_srv: RedisServer, scripts: dict[str, Path]) -> dict:
    """py-spy the quota-middleware + redis ASGI server under wrk load; top functions."""
    v = ASGI[2]
    spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    if not Path(spy).exists():
        return {"error": "py-spy not installed"}
    env = {**os.environ, "REDIS_URL": redis_srv.url}
    port = free_port()
    proc = start_server(v, port, env)
    out: dict[str, Any] = {}
    try:
        if err := wait_ready(proc, port, v):
            return {"error": err}
        wrk(port, 1, "/", None, [], opts.connections)
        load = subprocess.Popen(
            pin(1) + ["wrk", "-t1", f"-c{opts.connections}", f"-d{opts.profile_seconds + 3}s",
                      f"http://127.0.0.1:{port}/"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(1)
        raw = Path(tempfile.mkdtemp()) / "profile.txt"
        common = pin(1) + [spy, "record", "-d", str(opts.profile_seconds), "--pid",
                           str(proc.pid), "-r", "200", "--nonblocking"]  # fmt: skip
        r = subprocess.run(common + ["-f", "raw", "-o", str(raw)], capture_output=True,
                           text=True, timeout=opts.profile_seconds + 60)  # fmt: skip
        if r.returncode != 0 or not raw.exists():
            load.wait()
            return {"error": f"py-spy failed: {r.stderr.strip()[-400:]}"}
        load.wait()
        # the flame graph, for humans (a second, shorter sample)
        load = subprocess.Popen(
            pin(1) + ["wrk", "-t1", f"-c{opts.connections}", "-d6s", f"http://127.0.0.1:{port}/"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(0.5)
        svg = BENCH / "profile.svg"
        subprocess.run(pin(1) + [spy, "record", "-d", "4", "--pid", str(proc.pid), "-r", "200",
                                 "--nonblocking", "-o", str(svg)],
                       capture_output=True, timeout=60)  # fmt: skip
        load.wait()
        out = summarise_profile(raw.read_text())
        out["svg"] = str(svg.relative_to(ROOT)) if svg.exists() else None
    finally:
        stop(proc)
    return out


def _frame_key(frame: str) -> str:
    # py-spy raw frames: "func (path/to/file.py:123)"; key by function + file, not line
    m = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return frame
    func, path = m.groups()
    for marker in ("site-packages/", "src/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{func} ({path})"


def summarise_profile(text: str) -> dict[str, Any]:
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    area: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame_key(f) for f in stack.split(";")]
        total += n
        self_t[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
        leaf = stack.split(";")[-1]
        qm = any("quota_middleware/" in f for f in stack.split(";"))
        if "quota_middleware/" in leaf:
            area["quota_middleware (own code)"] += n
        elif "/redis/" in leaf and qm:
            area["redis-py, under quota_middleware"] += n
        elif qm:
            area["other, under quota_middleware (stdlib, asyncio, ...)"] += n
        elif "/redis/" in leaf:
            area["redis-py, elsewhere"] += n
        elif "fastapi/" in leaf or "starlette/" in leaf or "pydantic" in leaf:
            area["fastapi / starlette / pydantic"] += n
        elif "uvicorn/" in leaf or "httptools" in leaf or "uvloop" in leaf:
            area["uvicorn / httptools / uvloop"] += n
        else:
            area["other (stdlib, asyncio, idle)"] += n
    if not total:
        return {"error": "no samples"}

    def pct(c: Counter[str], k: int, only_qm: bool = False) -> list[tuple[str, float]]:
        items = [(f, n) for f, n in c.most_common() if not only_qm or "quota_middleware" in f]
        return [(f, round(100 * n / total, 1)) for f, n in items[:k]]

    return {
        "samples": total,
        "areas": pct(area, 10),
        "top_self": pct(self_t, 15),
        "top_inclusive_qm": pct(incl, 15, only_qm=True),
    }


# -- report ----------------------------------------------------------------------------------


def machine_info(redis_version: str | None) -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    freeze = subprocess.run([PY, "-m", "pip", "freeze"], capture_output=True, text=True).stdout
    wanted = ("quota-middleware", "uvicorn", "uvloop", "httptools", "gunicorn", "fastapi",
              "starlette", "flask", "werkzeug", "slowapi", "limits", "fastapi-limiter",
              "pyrate-limiter", "asgi-ratelimit", "flask-limiter", "redis", "hiredis", "py-spy")  # fmt: skip  # noqa: E501
    pkgs = []
    for line in freeze.splitlines():
        name = re.split(r"[=@ ]", line.replace("# Editable Git install with no remote (", ""))[0]
        if name.lower().replace("_", "-") in wanted:
            pkgs.append(line.replace("# Editable Git install with no remote (", "").rstrip(")"))
    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "nproc": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "wrk": (wrk_v.stdout + wrk_v.stderr).split("\n")[0].strip(),
        "redis-server": redis_version or "-",
        "packages": ", ".join(sorted(pkgs, key=str.lower)),
    }


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def rows_for(runs: list[Run], group: str, order: list[str]) -> list[dict[str, Any]]:
    out = []
    bare = {r.round: r.rps for r in runs if r.group == group and r.variant == "bare" and r.rps}
    for name in order:
        rs = [r for r in runs if r.group == group and r.variant == name and r.rps]
        if not rs:
            errs = [r.error for r in runs if r.group == group and r.variant == name and r.error]
            if not errs:
                continue
            out.append({"name": name, "error": errs[0] if errs else "no data"})
            continue
        ratios = [r.rps / bare[r.round] for r in rs if r.round in bare]
        cmds: dict[str, list[float]] = {}
        for r in rs:
            for k, x in r.redis_cmds.items():
                cmds.setdefault(k, []).append(x)
        rts = [r.round_trips for r in rs if r.round_trips is not None]
        rds = [r.reads for r in rs if r.reads is not None]
        mems = [r.memory for r in rs if r.memory]
        out.append({
            "name": name,
            "rps": med([r.rps for r in rs]),
            "ratio": med(ratios) if ratios else None,
            "p50": med([r.p50_ms for r in rs]),
            "p99": med([r.p99_ms for r in rs]),
            "rounds": len(rs),
            "cmds": {k: med(v) for k, v in sorted(cmds.items(), key=lambda kv: -med(kv[1]))},
            "round_trips": med(rts) if rts else None,
            "reads": med(rds) if rds else None,
            "memory": mems,
        })  # fmt: skip
    return out


def fmt_cmds(cmds: dict[str, float]) -> str:
    if not cmds:
        return "-"
    total = sum(cmds.values())
    parts = ", ".join(f"{k} {v:.2f}" for k, v in cmds.items() if v >= 0.005)
    return f"{total:.2f} ({parts})"


def table(rows: list[dict[str, Any]], redis_cols: bool = True) -> list[str]:
    head = "| variant | req/s | vs bare | p50 ms | p99 ms |"
    sep = "|---|---:|---:|---:|---:|"
    if redis_cols:
        head += (
            " redis round trips/req | redis socket reads/req | redis commands/req "
            "(incl. inside scripts) |"
        )
        sep += "---:|---:|---|"
    lines = [head, sep]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:120]} |")
            continue
        ratio = "-" if r["name"] == "bare" else f"{r['ratio']:.2f}x"
        line = f"| {r['name']} | {r['rps']:,.0f} | {ratio} | {r['p50']:.2f} | {r['p99']:.2f} |"
        if redis_cols:
            rt = "-" if r["round_trips"] is None else f"{r['round_trips']:.2f}"
            rd = "-" if r["reads"] is None else f"{r['reads']:.2f}"
            line += f" {rt} | {rd} | {fmt_cmds(r['cmds'])} |"
        lines.append(line)
    return lines


def render(data: dict[str, Any]) -> str:
    runs = [Run(**r) for r in data["runs"]]
    o = data["options"]
    m = data["machine"]
    L = [SECTION, "",
         "Produced by `bash bench/run_http.sh` (`bench/bench_http.py --write`); "
         "what is measured and "
         "how: bench/README.md, \"HTTP throughput\".", "",
         "### Machine", ""]  # fmt: skip
    L += [f"- {k}: {v}" for k, v in m.items()]
    L += [
        f"- method: server pinned to core 0, wrk + redis-server to core 1; `wrk -t1 "
        f"-c{o['connections']} --latency`, {o['warmup']:g} s warm-up + {o['duration']:g} s "
        f"measured per variant; {o['rounds']} rounds, variants in alternating order; every "
        'cell is the median over rounds; "vs bare" is the median of per-round ratios to the '
        "bare app of the same round and framework",
        "",
    ]
    if data.get("failures"):
        L += ["**Failures:** " + "; ".join(data["failures"]), ""]
    L += ["### ASGI: FastAPI on uvicorn (1 worker, uvloop, httptools)", ""]
    L += table(rows_for(runs, "asgi", [v.name for v in ASGI]))
    if any(r.group == "wsgi" for r in runs):
        L += ["", "### WSGI: Flask on gunicorn (1 sync worker)", ""]
        L += table(rows_for(runs, "wsgi", [v.name for v in WSGI]))
    for mode in ("json", "stream"):
        if any(r.group == f"ai-{mode}" for r in runs):
            what = ("JSON `chat.completion` (~0.8 KB)" if mode == "json"
                    else "SSE stream (~44 `chat.completion.chunk` events + usage + [DONE])")  # fmt: skip  # noqa: E501
            L += ["", f"### AI route, {what}: metering path vs passthrough", "",
                  "POST /v1/chat/completions (gpt-4o-mini, max_tokens 40) to a pure ASGI app "
                  "answering with `examples/fake_upstream.py` (no delay); \"bare\" is that app "
                  "without middleware.", ""]  # fmt: skip
            L += table(
                rows_for(runs, f"ai-{mode}", [v.name for v in AI if v.group == f"ai-{mode}"])
            )  # noqa: E501
    if any(r.group == "scale" and r.variant != "bare" for r in runs):
        rows = rows_for(runs, "scale", ["bare"] + [v.name for v in SCALE])
        L += ["", "### Scale: distinct callers (quota-middleware, redis, ASGI)", "",
              "Caller from an `X-Caller` header (custom resolver); wrk cycles through N values, "
              "one per request. \"vs bare\" against the ASGI bare app of the same round.", ""]  # fmt: skip  # noqa: E501
        L += table(rows)
        L += ["", "Redis memory per active caller (one request bucket, rate 1,000,000/second: a "
              "caller's key expires ~1 s after its last request). Memory delta and keys (DBSIZE) "
              "read right after the measured run; then DBSIZE polled until 0.", "",
              "| callers | active keys at end | used_memory delta | bytes per active caller | "
              "keys left after expiry | expired within | memory delta after expiry |",
              "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in rows[1:]:
            if "error" in r or not r["memory"]:
                continue
            ms = r["memory"]
            per = [x["per_key"] for x in ms if x.get("per_key")]
            L.append(
                f"| {r['name']} | {med([x['keys'] for x in ms]):,.0f} | "
                f"{med([x['bytes'] for x in ms]):,.0f} B | {med(per):,.0f} | "
                f"{med([x.get('keys_after', -1) for x in ms]):,.0f} | "
                f"{med([x.get('expired_in_s', -1) for x in ms]):.1f} s | "
                f"{med([x.get('bytes_after', 0) for x in ms]):,.0f} B |"
            )
    prof = data.get("profile")
    if prof:
        L += ["", "### Where the time goes: py-spy, quota-middleware + redis (ASGI) under load", ""]
        if "error" in prof:
            L.append(f"Profile not taken: {prof['error']}")
        else:
            L += [f"{prof['samples']:,} samples at 200 Hz of the uvicorn worker under `wrk -c"
                  f"{o['connections']}` (`py-spy record --nonblocking`; idle time in the event "
                  f"loop's poll is included in the total). Flame graph: `{prof.get('svg')}`.", "",
                  "| area (by leaf frame) | % of samples |", "|---|---:|"]  # fmt: skip
            L += [f"| {a} | {p} |" for a, p in prof["areas"]]
            L += ["", "| function (self time) | % |", "|---|---:|"]
            L += [f"| `{f}` | {p} |" for f, p in prof["top_self"]]
            L += ["", "| quota_middleware function (inclusive) | % |", "|---|---:|"]
            L += [f"| `{f}` | {p} |" for f, p in prof["top_inclusive_qm"]]
    if data.get("targets"):
        L += ["", "### Against the targets", ""] + data["targets"]
    return "\n".join(L) + "\n"


def targets(runs: list[Run]) -> list[str]:
    asgi = {r["name"]: r for r in rows_for(runs, "asgi", [v.name for v in ASGI]) if "rps" in r}
    wsgi = {r["name"]: r for r in rows_for(runs, "wsgi", [v.name for v in WSGI]) if "rps" in r}
    scale = rows_for(runs, "scale", [v.name for v in SCALE])
    out = []

    def line(what: str, value: float | None, goal: str, ok: bool | None) -> None:
        v = "n/a" if value is None else f"{value:.2f}"
        out.append(f"- {what}: {v} (target {goal}) -> "
                   f"{'n/a' if ok is None else 'PASS' if ok else 'FAIL'}")  # fmt: skip

    ours = asgi.get("quota-middleware, redis")
    if ours:
        line("ASGI + redis vs bare", ours["ratio"], ">= 0.75x", ours["ratio"] >= 0.75)
        peers = [r for n, r in asgi.items() if n.split(",")[0] in
                 ("slowapi", "fastapi-limiter", "asgi-ratelimit")]  # fmt: skip
        best = max((p["rps"] for p in peers), default=None)
        line("ASGI + redis req/s vs best peer", ours["rps"] / best if best else None, "> 1.00x",
             bool(best) and ours["rps"] > best)  # fmt: skip
        line("round trips per non-AI request (ASGI)", ours["round_trips"], "= 1",
             ours["round_trips"] is not None and ours["round_trips"] <= 1.05)  # fmt: skip
    mem = asgi.get("quota-middleware, memory")
    if mem:
        line("ASGI + memory vs bare", mem["ratio"], ">= 0.9x", mem["ratio"] >= 0.9)
    w = wsgi.get("quota-middleware, redis")
    if w:
        line("WSGI + redis vs bare", w["ratio"], ">= 0.75x", w["ratio"] >= 0.75)
        line("round trips per non-AI request (WSGI)", w["round_trips"], "= 1",
             w["round_trips"] is not None and w["round_trips"] <= 1.05)  # fmt: skip
    pers = [x["per_key"] for r in scale if "memory" in r for x in r["memory"] if x.get("per_key")
            and x["keys"] >= 500]  # fmt: skip
    if pers:
        worst = max(pers)
        line("Redis bytes per active caller, worst run with >= 500 keys", worst, "<= 300",
             worst <= 300)  # fmt: skip
    return out


def write_results(md: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else ""
    start = text.find(SECTION)
    if start < 0:
        new = text.rstrip("\n") + "\n\n" + md
    else:
        nxt = re.search(r"^## ", text[start + len(SECTION) :], re.M)
        end = start + len(SECTION) + nxt.start() if nxt else len(text)
        new = text[:start] + md + ("\n" + text[end:] if nxt else "")
    RESULTS.write_text(new)


# -- main ------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: bare + ours-memory, 1 s")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per variant")
    ap.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per variant")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--expiry-wait", type=float, default=8.0)
    ap.add_argument("--profile-seconds", type=int, default=5)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--only", default="", help="comma list of groups: asgi,wsgi,ai,scale")
    ap.add_argument("--write", action="store_true", help="(re)write the section of results.md")
    ap.add_argument("--json", help="dump the raw runs to this file")
    ap.add_argument("--render", help="render (and with --write, write) from a --json dump")
    opts = ap.parse_args()

    if opts.render:
        data = json.loads(Path(opts.render).read_text())
        md = render(data)
        print(md)
        if opts.write:
            write_results(md)
        return 0

    if not shutil.which("wrk"):
        print("FAILED: wrk not found (apt-get install -y wrk)", file=sys.stderr)
        return 1
    if opts.quick:
        opts.rounds, opts.duration, opts.warmup, opts.no_profile = 1, 1.0, 1.0, True
        variants = QUICK
    else:
        groups = set(filter(None, opts.only.split(","))) or {"asgi", "wsgi", "ai", "scale"}
        variants = []
        if "asgi" in groups:
            variants += ASGI
        if "wsgi" in groups:
            variants += WSGI
        if "ai" in groups:
            variants += AI
        if "scale" in groups:
            variants += [SCALE_BARE] + SCALE if "asgi" not in groups else SCALE
    need_redis = any(v.redis for v in variants) or not opts.no_profile
    redis_srv = None
    if need_redis:
        if not shutil.which("redis-server"):
            print("FAILED: redis-server not found (apt-get install -y redis-server)")
            return 1
        redis_srv = RedisServer()
    tmp = Path(tempfile.mkdtemp(prefix="bench-http-"))
    scripts = {"callers": tmp / "callers.lua", "ai-json": tmp / "ai-json.lua",
               "ai-stream": tmp / "ai-stream.lua"}  # fmt: skip
    scripts["callers"].write_text(LUA_CALLERS)
    scripts["ai-json"].write_text(LUA_POST % json.dumps(CHAT))
    scripts["ai-stream"].write_text(LUA_POST % json.dumps(CHAT_STREAM))

    runs: list[Run] = []
    failures: list[str] = []
    t_start = time.monotonic()
    prof: dict[str, Any] | None = None
    try:
        for rnd in range(opts.rounds):
            order = variants if rnd % 2 == 0 else list(reversed(variants))
            for v in order:
                t0 = time.monotonic()
                run = measure(v, rnd, opts, redis_srv if v.redis else None, scripts)
                # the scale group's bare is the ASGI bare of the same round
                if v.group == "asgi" and v.name == "bare":
                    runs.append(Run(**{**run.__dict__, "group": "scale"}))
                runs.append(run)
                status = run.error or (
                    f"{run.rps:,.0f} req/s p50 {run.p50_ms:.2f} ms p99 {run.p99_ms:.2f} ms"
                    + (f" rt/req {run.round_trips:.2f}" if run.round_trips is not None else "")
                    + (f" mem {run.memory}" if run.memory else "")
                )  # fmt: skip
                print(f"[round {rnd + 1}/{opts.rounds} {time.monotonic() - t_start:5.0f}s] "
                      f"{v.group:9} {v.name:34} {status} ({time.monotonic() - t0:.1f}s)",
                      file=sys.stderr, flush=True)  # fmt: skip
                if run.error:
                    failures.append(f"{v.group}/{v.name} round {rnd + 1}: {run.error[:300]}")
                if run.non2xx:
                    failures.append(f"{v.group}/{v.name} round {rnd + 1}: {run.non2xx} non-2xx")
                if run.socket_errors:
                    failures.append(f"{v.group}/{v.name} round {rnd + 1}: socket errors "
                                    f"{run.socket_errors}")  # fmt: skip
        if not opts.no_profile and redis_srv is not None:
            prof = profile(opts, redis_srv, scripts)
            print(f"[profile] {prof.get('error') or str(prof.get('samples')) + ' samples'}",
                  file=sys.stderr)  # fmt: skip
    finally:
        if redis_srv is not None:
            redis_srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    data = {
        "machine": machine_info(redis_srv.version if redis_srv else None),
        "options": {k: getattr(opts, k) for k in ("rounds", "duration", "warmup", "connections")},
        "runs": [r.__dict__ for r in runs],
        "failures": failures,
        "profile": prof,
    }
    data["targets"] = targets(runs) if not opts.quick else []
    md = render(data)
    print(md)
    if opts.json:
        Path(opts.json).write_text(json.dumps(data, indent=1))
    if opts.write and not opts.quick:
        write_results(md)
    print(f"total {time.monotonic() - t_start:.1f} s", file=sys.stderr)
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
