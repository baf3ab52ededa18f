#!/usr/bin/env python
"""What quota-middleware adds to an AI response, measured in-process against a passthrough
baseline in the same run.

    python bench/bench_metering.py [--rounds 5] [--quick] [--write] [--profile]

No sockets between "client" and app: the ASGI app is driven with a raw scope / receive / send and
the WSGI app is called with an environ, its iterable consumed and closed, so the numbers are the
middleware's own CPU cost (plus the store round trips of the Redis variant). Variants, each run in
every round, in alternating order across rounds:

  bare      a tiny app answering a prebuilt OpenAI chat.completion JSON, or N prebuilt SSE chunks
            (``stream_options.include_usage``: "usage":null on every chunk, usage at the end)
  plain     the same app wrapped, policy without ai_routes (one RequestRate), memory backend
  metered   ai_routes=[AIRoute("/v1/chat/completions", "openai-chat")] and a plan with RequestRate +
            TokenRate + TokenQuota + Budget, memory backend
  redis     as metered, on a redis-server this script starts on a free loopback port

Limits are so high nothing is ever denied, and every response is checked to be a 200.
See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import io
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "examples"))  # fake_upstream: realistic OpenAI bodies

# A Redis URL in the environment would silently turn the memory variants into Redis ones.
os.environ.pop("QUOTA_REDIS_URL", None)

from fake_upstream import handle as fake_handle  # noqa: E402

from quota_middleware import QuotaMiddleware, WSGIQuotaMiddleware  # noqa: E402
from quota_middleware.config import AIRoute, Plan, QuotaConfig, StorageConfig  # noqa: E402
from quota_middleware.core._meter import Meter  # noqa: E402
from quota_middleware.limits import Budget, RequestRate, TokenQuota, TokenRate  # noqa: E402
from quota_middleware.metering._estimate import get_encoding, parse_request  # noqa: E402

now_ns = time.perf_counter_ns
PATH = "/v1/chat/completions"
MODEL = "gpt-4o-mini"
CLIENT = ("127.0.0.1", 50123)
SSE_CT = b"text/event-stream; charset=utf-8"
VARIANTS = ("bare", "plain", "metered", "redis")
PER_CHUNK_TARGET_US = 50.0


# -- payloads ------------------------------------------------------------------------------------
def chat_request(stream: bool, user_text: str | None = None) -> bytes:
    req: dict[str, Any] = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
            {
                "role": "user",
                "content": user_text
                or "Summarise the trade-offs between token buckets and fixed windows for rate "
                "limiting an LLM gateway, in three bullet points.",
            },
        ],
        "max_tokens": 256,
        "temperature": 0.2,
    }
    if stream:
        req["stream"] = True
        req["stream_options"] = {"include_usage": True}
    return json.dumps(req).encode()


def stream_chunks(body: bytes, n: int) -> list[bytes]:
    """fake_upstream's SSE events stretched to ``n``: role chunk, content chunks (cycled),
    finish chunk, usage chunk, ``[DONE]``."""
    chunks = list(fake_handle("POST", PATH, body).chunks)
    role, content, tail = chunks[0], chunks[1:-3], chunks[-3:]
    need = max(n - 1 - len(tail), 1)
    return [role, *(content[i % len(content)] for i in range(need)), *tail]


def english(nbytes: int, seed: int = 42) -> str:
    """Deterministic English-like prose of about ``nbytes`` bytes."""
    words = (
        "the a of to and in is it that for on with as was be by this are or from at which an "
        "not have but they their one all were we can more if there so when will would about "
        "rate limit token bucket request response model prompt stream budget quota latency "
        "middleware server client usage window policy tenant caller header cache settle admit "
        "reservation estimate throughput gateway provider completion chunk buffer parse"
    ).split()
    rng = random.Random(seed)
    out: list[str] = []
    size = 0
    while size < nbytes:
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(6, 18)))
        sentence = sentence[0].upper() + sentence[1:] + rng.choice([". ", ", ", "? ", ".\n"])
        out.append(sentence)
        size += len(sentence)
    return "".join(out)[:nbytes]


# -- configs -------------------------------------------------------------------------------------
def plain_config() -> QuotaConfig:
    return QuotaConfig(plans=[Plan(name="free", limits=[RequestRate(rate="1000000/second")])])


def metered_config(storage_url: str = "memory://") -> QuotaConfig:
    limits = [
        RequestRate(rate="1000000/second"),
        TokenRate(rate="1000000/second", burst=10**9),
        TokenQuota(tokens=10**12, period="day"),
        Budget(usd=10**6, period="month"),
    ]
    return QuotaConfig(
        plans=[Plan(name="free", limits=limits)],
        ai_routes=[AIRoute(path=PATH, format="openai-chat")],
        storage=StorageConfig(url=storage_url, prefix=f"qmbench{os.getpid()}"),
    )


# -- bare apps -----------------------------------------------------------------------------------
def bare_asgi(json_body: bytes, chunks: list[bytes]) -> Callable[..., Any]:
    json_headers = [(b"content-type", b"application/json"),
                    (b"content-length", str(len(json_body)).encode())]  # fmt: skip
    sse_headers = [(b"content-type", SSE_CT), (b"cache-control", b"no-cache")]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        request = await receive()  # a real app reads its body
        if b'"stream"' not in request["body"]:
            await send({"type": "http.response.start", "status": 200, "headers": json_headers})
            await send({"type": "http.response.body", "body": json_body})
            return
        await send({"type": "http.response.start", "status": 200, "headers": sse_headers})
        for c in chunks:
            await send({"type": "http.response.body", "body": c, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def bare_wsgi(json_body: bytes, chunks: list[bytes]) -> Callable[..., Any]:
    json_headers = [("Content-Type", "application/json"), ("Content-Length", str(len(json_body)))]
    sse_headers = [("Content-Type", SSE_CT.decode()), ("Cache-Control", "no-cache")]

    def gen() -> Iterator[bytes]:
        yield from chunks

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        if b'"stream"' not in body:
            start_response("200 OK", json_headers)
            return [json_body]
        start_response("200 OK", sse_headers)
        return gen()

    return app


# -- harnesses -----------------------------------------------------------------------------------
class Failures(Exception):
    pass


async def asgi_once(app: Any, body: bytes, clen: bytes) -> tuple[int, int, int, list[int], int]:
    """One request: (start ns, first non-empty body ns, end ns, body stamps, status)."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": PATH, "raw_path": PATH.encode(), "query_string": b"",
        "root_path": "", "client": CLIENT, "server": ("127.0.0.1", 8000),
        "headers": [(b"host", b"bench"), (b"content-type", b"application/json"),
                    (b"content-length", clen)],
    }  # fmt: skip
    stamps: list[int] = []
    status = 0
    first = 0
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)  # a client that stays connected
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, first
        t = now_ns()
        if message["type"] == "http.response.body":
            stamps.append(t)
            if not first and message.get("body"):
                first = t
        elif message["type"] == "http.response.start":
            status = message["status"]

    t0 = now_ns()
    await app(scope, receive, send)
    t1 = now_ns()
    return t0, first, t1, stamps, status


def wsgi_once(app: Any, body: bytes, clen: str) -> tuple[int, int, int, list[int], int]:
    environ = {
        "REQUEST_METHOD": "POST", "PATH_INFO": PATH, "SCRIPT_NAME": "", "QUERY_STRING": "",
        "SERVER_NAME": "bench", "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": CLIENT[0], "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": clen,
        "HTTP_HOST": "bench",
        "wsgi.input": io.BytesIO(body), "wsgi.url_scheme": "http", "wsgi.version": (1, 0),
        "wsgi.errors": sys.stderr, "wsgi.multithread": False, "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }  # fmt: skip
    stamps: list[int] = []
    status = ""
    first = 0

    def start_response(s: str, headers: Any, exc_info: Any = None) -> Any:
        nonlocal status
        status = s
        return lambda data: None

    t0 = now_ns()
    it = app(environ, start_response)
    try:
        for chunk in it:
            t = now_ns()
            stamps.append(t)
            if not first and chunk:
                first = t
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    t1 = now_ns()
    return t0, first, t1, stamps, int(status[:3] or 0)


def summarize(results: list[tuple[int, int, int, list[int], int]]) -> dict[str, float]:
    """µs: median / p90 of total, median TTFB, median inter-chunk gap (streams)."""
    totals = sorted((r[2] - r[0]) / 1000 for r in results)
    bad = sum(1 for r in results if r[4] != 200)
    if bad:
        raise Failures(f"{bad} of {len(results)} responses were not 200")
    out = {
        "median": statistics.median(totals),
        "p90": totals[min(len(totals) - 1, int(len(totals) * 0.9))],
        "ttfb": statistics.median((r[1] - r[0]) / 1000 for r in results),
    }
    gaps = []
    for r in results:
        s = r[3]
        if len(s) > 4:
            # gaps between consecutive content chunks: one chunk's app + middleware work
            g = sorted(s[i + 1] - s[i] for i in range(1, len(s) - 2))
            gaps.append(g[len(g) // 2] / 1000)
    if gaps:
        out["gap"] = statistics.median(gaps)
    return out


class Runner:
    """Times ``n`` back-to-back requests through one app, GC off."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def asgi(self, app: Any, body: bytes, n: int) -> dict[str, float]:
        clen = str(len(body)).encode()

        async def many() -> list[Any]:
            return [await asgi_once(app, body, clen) for _ in range(n)]

        return summarize(self._timed(lambda: self.loop.run_until_complete(many())))

    def wsgi(self, app: Any, body: bytes, n: int) -> dict[str, float]:
        clen = str(len(body))
        return summarize(self._timed(lambda: [wsgi_once(app, body, clen) for _ in range(n)]))

    @staticmethod
    def _timed(fn: Callable[[], list[Any]]) -> list[Any]:
        gc.collect()
        gc.disable()
        try:
            return fn()
        finally:
            gc.enable()


# -- redis-server --------------------------------------------------------------------------------
@contextlib.contextmanager
def redis_server() -> Iterator[str | None]:
    exe = shutil.which("redis-server")
    if exe is None:
        print("note: redis-server not found; the 'redis' variant is skipped")
        yield None
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        import redis

        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        else:
            print("note: redis-server did not start; the 'redis' variant is skipped")
            yield None
            return
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- micro benchmarks ----------------------------------------------------------------------------
def bench_loop(fn: Callable[[], object], reps: int) -> float:
    """Median ns of ``fn()`` over ``reps`` calls, GC off."""
    times = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(reps):
            t0 = now_ns()
            fn()
            times.append(now_ns() - t0)
    finally:
        gc.enable()
    return statistics.median(times)


def meter_feed_us(ai: Any, chunks: list[bytes], reps: int) -> dict[str, float]:
    """µs per chunk of Meter.feed alone, and of start + finish + cost (per response)."""
    ctype = SSE_CT.decode()

    def feed_all() -> None:
        m = Meter(ai)
        m.start(200, ctype, None)
        for c in chunks:
            m.feed(c)

    def start_only() -> None:
        Meter(ai).start(200, ctype, None)

    feed = bench_loop(feed_all, reps)
    start = bench_loop(start_only, reps * 10)
    # finish() + cost() on meters fed beforehand (finish is once per meter)
    fed = []
    for _ in range(reps):
        m = Meter(ai)
        m.start(200, ctype, None)
        for c in chunks:
            m.feed(c)
        fed.append(m)
    it = iter(fed)
    finish = bench_loop(lambda: (lambda m: m.cost(m.finish()))(next(it)), reps)
    usage = Meter(ai)
    usage.start(200, ctype, None)
    for c in chunks:
        usage.feed(c)
    u = usage.finish()
    if u.output_tokens <= 0 or u.estimated:
        raise Failures(f"Meter did not read the provider usage: {u}")
    return {
        "feed_per_chunk": (feed - start) / len(chunks) / 1000,
        "finish_cost": finish / 1000,
        "start": start / 1000,
    }


def estimate_costs(sizes_kb: tuple[int, ...], quick: bool) -> dict[int, dict[str, float]]:
    get_encoding("o200k_base")  # warm
    out = {}
    for kb in sizes_kb:
        body = chat_request(False, english(kb * 1024, seed=kb))
        est = parse_request("openai-chat", body)
        assert est.prompt_tokens > 0
        reps = max(3, (30 if quick else 300) // kb)
        parse_request("openai-chat", body)
        ns = bench_loop(lambda b=body: parse_request("openai-chat", b), reps)
        out[kb] = {
            "us": ns / 1000,
            "us_per_kb": ns / 1000 / (len(body) / 1024),
            "tokens": est.prompt_tokens,
            "bytes": len(body),
        }
    return out


COLD_SNIPPET = """
import json, time
t0 = time.perf_counter()
from quota_middleware.metering._estimate import get_encoding, parse_request
t1 = time.perf_counter()
get_encoding("o200k_base")
t2 = time.perf_counter()
get_encoding("cl100k_base")
t3 = time.perf_counter()
print(json.dumps({"import_ms": (t1 - t0) * 1e3, "o200k_ms": (t2 - t1) * 1e3,
                  "cl100k_ms": (t3 - t2) * 1e3}))
"""


def cold_load() -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "QUOTA_REDIS_URL"}
    out = subprocess.run(
        [sys.executable, "-c", COLD_SNIPPET], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the run -------------------------------------------------------------------------------------
def machine_info() -> dict[str, str]:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def ver(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    info = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "nproc": str(os.cpu_count()),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
    }
    for dist in ("quota-middleware", "redis", "hiredis", "tiktoken", "starlette"):
        info[dist] = ver(dist)
    exe = shutil.which("redis-server")
    if exe:
        with contextlib.suppress(Exception):
            v = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
            info["redis-server"] = v.split("v=", 1)[1].split()[0]
    return info


def build_apps(json_body: bytes, chunks: list[bytes], redis_url: str | None) -> dict[str, Any]:
    asgi_bare, wsgi_bare = bare_asgi(json_body, chunks), bare_wsgi(json_body, chunks)
    apps: dict[str, Any] = {
        "bare": (asgi_bare, wsgi_bare),
        "plain": (
            QuotaMiddleware(asgi_bare, config=plain_config()),
            WSGIQuotaMiddleware(wsgi_bare, config=plain_config()),
        ),
        "metered": (
            QuotaMiddleware(asgi_bare, config=metered_config()),
            WSGIQuotaMiddleware(wsgi_bare, config=metered_config()),
        ),
    }
    if redis_url:
        apps["redis"] = (
            QuotaMiddleware(asgi_bare, config=metered_config(redis_url)),
            WSGIQuotaMiddleware(wsgi_bare, config=metered_config(redis_url)),
        )
    return apps


def check_wiring(apps: dict[str, Any], loop: asyncio.AbstractEventLoop, body: bytes) -> Any:
    """Each variant does what it claims: plain is limited but unmetered, metered is metered and
    settles with the provider's usage. Returns the AIRequest of a metered request."""
    ai = None
    for name, (asgi_app, _wsgi_app) in apps.items():
        if name == "bare":
            continue
        scope = {"type": "http", "method": "POST", "path": PATH, "client": CLIENT,
                 "headers": [(b"content-type", b"application/json"),
                             (b"content-length", str(len(body)).encode())]}  # fmt: skip
        statuses: list[int] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any], statuses: list[int] = statuses) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        loop.run_until_complete(asgi_app(scope, receive, send))
        if statuses != [200]:
            raise Failures(f"{name}: status {statuses}")
        decision = scope["state"]["quota"]
        if not (decision.allowed and decision.limited):
            raise Failures(f"{name}: not limited: {decision}")
        if (decision.ai is not None) != (name != "plain"):
            raise Failures(f"{name}: AI metering is {'on' if decision.ai else 'off'}")
        if decision.ai is not None:
            ai = decision.ai
    return ai


def measure(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    rounds = 1 if quick else args.rounds
    n_json = 100 if quick else args.json_iters
    n_stream = 5 if quick else args.stream_iters
    n_chunks = args.chunks
    json_req, stream_req = chat_request(False), chat_request(True)
    json_body = fake_handle("POST", PATH, json_req).body
    chunks = stream_chunks(stream_req, n_chunks)
    assert len(chunks) == n_chunks, len(chunks)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    runner = Runner(loop)
    t_start = time.perf_counter()
    res: dict[str, Any] = {"info": machine_info(), "params": {
        "rounds": rounds, "json_iters": n_json, "stream_iters": n_stream, "chunks": n_chunks,
        "json_request_bytes": len(json_req), "json_response_bytes": len(json_body),
        "stream_response_bytes": sum(map(len, chunks)), "quick": quick,
    }}  # fmt: skip
    with redis_server() as redis_url:
        apps = build_apps(json_body, chunks, redis_url)
        variants = [v for v in VARIANTS if v in apps]
        res["variants"] = variants
        ai = check_wiring(apps, loop, json_req)
        # warm-up: tiktoken, scripts (EVALSHA loaded), connections, code paths
        for name in variants:
            a, w = apps[name]
            runner.asgi(a, json_req, 20 if quick else 200)
            runner.wsgi(w, json_req, 20 if quick else 200)
            runner.asgi(a, stream_req, 2 if quick else 10)
            runner.wsgi(w, stream_req, 2 if quick else 10)
        # rows[(proto, scenario, variant)] = list of per-round summaries
        rows: dict[tuple[str, str, str], list[dict[str, float]]] = {}
        for r in range(rounds):
            order = variants if r % 2 == 0 else variants[::-1]
            for scenario, body, n in (("json", json_req, n_json), ("stream", stream_req, n_stream)):
                for proto in ("asgi", "wsgi"):
                    for name in order:
                        app = apps[name][0 if proto == "asgi" else 1]
                        run = runner.asgi if proto == "asgi" else runner.wsgi
                        rows.setdefault((proto, scenario, name), []).append(run(app, body, n))
            print(f"  round {r + 1}/{rounds} done ({time.perf_counter() - t_start:.1f} s)",
                  file=sys.stderr)  # fmt: skip
        for name in variants:
            for proto in (0, 1):
                app = apps[name][proto]
                if isinstance(app, QuotaMiddleware):
                    loop.run_until_complete(asyncio.sleep(0))  # let settle tasks finish
                    if app._pending:
                        loop.run_until_complete(asyncio.gather(*app._pending))
                    backend = app._backend
                    if backend is not None and hasattr(backend, "aclose"):
                        loop.run_until_complete(backend.aclose())
                elif isinstance(app, WSGIQuotaMiddleware):
                    app.backend.close()
                if isinstance(app, QuotaMiddleware | WSGIQuotaMiddleware):
                    stats = app.stats
                    if stats.get("denied") or stats.get("degraded_open"):
                        raise Failures(f"{name}: {stats}")
    loop.close()
    res["rows"] = rows
    res["meter"] = meter_feed_us(ai, chunks, 50 if quick else 400)
    res["estimate"] = estimate_costs((1, 10, 100), quick)
    res["cold"] = cold_load()
    res["elapsed_s"] = time.perf_counter() - t_start
    return res


# -- report --------------------------------------------------------------------------------------
def med(values: list[float]) -> float:
    return statistics.median(values)


def derive(res: dict[str, Any]) -> dict[str, Any]:
    """Medians over rounds, and per-round differences to bare (the same round's bare run)."""
    rows = res["rows"]
    chunks = res["params"]["chunks"]
    out: dict[str, Any] = {}
    for proto in ("asgi", "wsgi"):
        for scenario in ("json", "stream"):
            bare = rows[(proto, scenario, "bare")]
            for name in res["variants"]:
                runs = rows[(proto, scenario, name)]
                d: dict[str, float] = {k: med([r[k] for r in runs]) for k in runs[0]}
                pairs = list(zip(runs, bare, strict=True))

                def diff(key: str, pairs: list[Any] = pairs) -> float:
                    return med([r[key] - b[key] for r, b in pairs])

                d["added"] = diff("median")
                d["added_p90"] = diff("p90")
                d["ratio"] = med([r["median"] / b["median"] for r, b in pairs])
                if scenario == "stream":
                    d["added_ttfb"] = diff("ttfb")
                    d["per_chunk_amortized"] = d["added"] / chunks
                    d["per_chunk_marginal"] = diff("gap")
                out[(proto, scenario, name)] = d
    return out


def fmt(x: float, nd: int = 1) -> str:
    return f"{x:,.{nd}f}"


def render(res: dict[str, Any], markdown: bool) -> str:
    d = derive(res)
    p = res["params"]
    info = res["info"]
    lines: list[str] = []

    def h(title: str) -> None:
        lines.append(f"\n## {title}\n" if markdown else f"\n{title}\n{'-' * len(title)}")

    def table(header: list[str], body: list[list[str]]) -> None:
        if markdown:
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|")
            lines.extend("| " + " | ".join(r) + " |" for r in body)
        else:
            widths = [max(len(x) for x in col) for col in zip(header, *body, strict=True)]

            def row(r: list[str]) -> str:
                cells = enumerate(zip(r, widths, strict=True))
                return "  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in cells)

            lines.append(row(header))
            lines.append("  ".join("-" * w for w in widths))
            lines.extend(row(r) for r in body)

    def label(proto: str) -> None:
        if not markdown:
            lines.append(f"{proto.upper()}:")
        else:
            lead = "" if proto == "asgi" else "\n"
            lines.append(f"{lead}**{proto.upper()}**\n")

    if markdown:
        lines.append("# quota-middleware metering benchmark\n")
        lines.append("Produced by `python bench/bench_metering.py --write` "
                     "(see bench/README.md for what each number means).\n")  # fmt: skip
    else:
        lines.append("quota-middleware metering benchmark")
    h("Machine")
    for k, v in info.items():
        lines.append(f"- {k}: {v}" if markdown else f"  {k:17} {v}")
    lines.append(
        ("- " if markdown else "  ")
        + (
            f"rounds: {p['rounds']} (medians of per-round medians; variants interleaved, order "
            f"alternating); {p['json_iters']} JSON requests and {p['stream_iters']} streams of "
            f"{p['chunks']} chunks per variant per round; request {p['json_request_bytes']} B, "
            f"JSON response {p['json_response_bytes']} B, stream {p['stream_response_bytes']} B"
            + ("; QUICK (smoke test only, numbers are noise)" if p["quick"] else "")
        )
    )

    names = res["variants"]
    h("JSON AI response, end to end (µs per request)")
    for proto in ("asgi", "wsgi"):
        body = []
        for n in names:
            x = d[(proto, "json", n)]
            body.append([n, fmt(x["median"]), fmt(x["p90"]),
                         "-" if n == "bare" else fmt(x["added"]),
                         "-" if n == "bare" else fmt(x["added_p90"]),
                         "-" if n == "bare" else f"{x['ratio']:.1f}x"])  # fmt: skip
        label(proto)
        table(["variant", "median", "p90", "added", "added p90", "vs bare"], body)

    h(f"Streamed response, {p['chunks']} SSE chunks (µs)")
    for proto in ("asgi", "wsgi"):
        body = []
        for n in names:
            x = d[(proto, "stream", n)]
            dash = n == "bare"
            body.append([n, fmt(x["ttfb"]), "-" if dash else fmt(x["added_ttfb"]),
                         fmt(x["median"]), "-" if dash else fmt(x["added"]),
                         fmt(x["gap"], 2),
                         "-" if dash else fmt(x["per_chunk_amortized"], 2),
                         "-" if dash else fmt(x["per_chunk_marginal"], 2)])  # fmt: skip
        label(proto)
        table(["variant", "TTFB", "added TTFB", "total", "added total", "chunk gap",
               "added/chunk (amortized)", "added/chunk (marginal)"], body)  # fmt: skip
    worst = max(
        d[(proto, "stream", n)]["per_chunk_marginal"]
        for proto in ("asgi", "wsgi") for n in names if n != "bare"
    )  # fmt: skip
    verdict = "PASS" if worst < PER_CHUNK_TARGET_US else "FAIL"
    lines.append(
        f"\nPer-chunk target < {PER_CHUNK_TARGET_US:.0f} µs (marginal, worst variant): "
        f"{fmt(worst, 2)} µs -> {verdict}"
    )

    m = res["meter"]
    h("Meter alone (microbenchmark, same chunks)")
    table(["what", "µs"], [
        ["Meter.feed per chunk", fmt(m["feed_per_chunk"], 2)],
        ["Meter() + start() per response", fmt(m["start"], 2)],
        ["finish() + cost() per response", fmt(m["finish_cost"], 2)],
    ])  # fmt: skip

    h("Prompt estimate: parse_request('openai-chat', body), warm o200k_base")
    table(["prompt", "body bytes", "tokens", "µs per call", "µs per KB"], [
        [f"{kb} KB", f"{e['bytes']:,}", f"{e['tokens']:,}", fmt(e["us"]), fmt(e["us_per_kb"])]
        for kb, e in res["estimate"].items()
    ])  # fmt: skip
    c = res["cold"]
    lines.append(
        "\nCold start (fresh interpreter): import quota_middleware.metering._estimate "
        f"{fmt(c['import_ms'])}"
        f" ms, first get_encoding('o200k_base') {fmt(c['o200k_ms'])} ms, "
        f"then cl100k_base {fmt(c['cl100k_ms'])} ms."
    )
    lines.append(f"\nRun took {res['elapsed_s']:.1f} s.")
    return "\n".join(lines) + "\n"


def load_dump(path: Path) -> dict[str, Any]:
    raw = json.loads(path.read_text())
    raw["rows"] = {tuple(k.split("/")): v for k, v in raw["rows"].items()}
    raw["estimate"] = {int(k): v for k, v in raw["estimate"].items()}
    return raw


NOTES_HEADING = "## Reading the numbers"


def write_markdown(text: str, path: Path) -> None:
    """Overwrite ``path``, keeping a hand-written "Reading the numbers" section if there is one."""
    notes = ""
    if path.exists():
        old = path.read_text()
        i = old.find(NOTES_HEADING)
        if i >= 0:
            notes = "\n" + old[i:]
    path.write_text(text + notes)


# -- profile -------------------------------------------------------------------------------------
def profile(args: argparse.Namespace) -> None:
    """cProfile metered requests (ASGI, memory backend; streamed or JSON) and list
    quota_middleware's functions by cumulative time."""
    import cProfile
    import pstats

    stream_req = chat_request(True)
    json_body = fake_handle("POST", PATH, chat_request(False)).body
    chunks = stream_chunks(stream_req, args.chunks)
    app = QuotaMiddleware(bare_asgi(json_body, chunks), config=metered_config())
    loop = asyncio.new_event_loop()
    runner = Runner(loop)
    streamed = args.profile == "stream"
    req = stream_req if streamed else chat_request(False)
    n = (20 if args.quick else 200) * (1 if streamed else 10)
    runner.asgi(app, req, n // 10)
    prof = cProfile.Profile()
    prof.enable()
    runner.asgi(app, req, n)
    prof.disable()
    loop.close()
    stats = pstats.Stats(prof)
    rows = []
    for (file, line, func), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if "quota_middleware" in file:
            short = file.split("quota_middleware/", 1)[-1]
            rows.append((ct, tt, nc, f"{short}:{line} {func}"))
    rows.sort(reverse=True)
    what = f"streams of {args.chunks} chunks" if streamed else "JSON requests"
    print(f"cProfile: {n} metered ASGI {what} (memory backend); quota_middleware functions by "
          f"cumulative time (profiler overhead inflates these)")  # fmt: skip
    print(f"{'cum ms':>9} {'per req µs':>11} {'own ms':>8} {'calls':>8}  function")
    for ct, tt, nc, name in rows[: args.top]:
        print(f"{ct * 1e3:9.1f} {ct * 1e6 / n:11.1f} {tt * 1e3:8.1f} {nc:8d}  {name}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 tiny round, < 10 s")
    ap.add_argument("--write", action="store_true", help="write bench/results.md")
    ap.add_argument("--json-iters", type=int, default=2000, help="JSON requests per round")
    ap.add_argument("--stream-iters", type=int, default=100, help="streams per round")
    ap.add_argument("--chunks", type=int, default=200, help="SSE chunks per stream")
    ap.add_argument(
        "--profile",
        nargs="?",
        const="stream",
        choices=("stream", "json"),
        help="no benchmark: cProfile metered ASGI requests (memory backend)",
    )
    ap.add_argument("--top", type=int, default=10, help="functions listed by --profile")
    ap.add_argument("--output", type=Path, default=HERE / "results.md")
    ap.add_argument("--json", type=Path, help="also dump raw per-round numbers to this file")
    ap.add_argument("--render", type=Path, help="no run: re-render a --json dump (with --write)")
    args = ap.parse_args()
    if args.profile:
        profile(args)
        return 0
    try:
        res = load_dump(args.render) if args.render else measure(args)
    except Failures as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    print(render(res, markdown=False))
    if args.json and not args.render:
        raw = {**res, "rows": {"/".join(k): v for k, v in res["rows"].items()},
               "derived": {"/".join(k): v for k, v in derive(res).items()}}  # fmt: skip
        args.json.write_text(json.dumps(raw, indent=1, default=str))
    if args.write:
        write_markdown(render(res, markdown=True), args.output)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
