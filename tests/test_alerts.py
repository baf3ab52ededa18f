"""Alert delivery, end to end: a real HTTP receiver on loopback gets signed webhooks, retries with
backoff, dead letters after N failures, and nothing is delivered twice across two consumer
processes; threshold, app-budget (kill switch) and spike events are decided exactly once and
reach the outbox through both adapters, on the memory backend and a real redis-server."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from werkzeug.test import Client

from ai_app import STREAM_BODY
from ai_harness import PATH, AIHarness, FailingKeys, ai_info, chat, config
from quota_middleware import AIRoute, Plan, QuotaConfig, StorageConfig, TokenQuota
from quota_middleware.alerts import (
    AlertsConfig,
    Dispatcher,
    WebhookSink,
    dead_key,
    format_text,
    outbox_events,
    read_stream,
    sign,
    verify_signature,
)
from quota_middleware.backends.memory import MemoryBackend
from quota_middleware.backends.redis import SyncRedisBackend
from quota_middleware.base._events import AlertEvent, outbox_call, outbox_key
from quota_middleware.cli._alert_commands import cli_run, cli_tail, cli_test
from quota_middleware.core._engine import Engine, drive_sync
from quota_middleware.errors import ConfigurationError
from quota_middleware.limits import AppBudget, SpikeRule
from quota_middleware.metering._usage import Usage
from quota_middleware.metering.pricing import PriceTable, cost_micros
from servers import free_port, serve_app, stop_process

APPS = Path(__file__).parent / "apps"
SRC = Path(__file__).resolve().parents[1] / "src"
KINDS = [
    pytest.param("memory", marks=pytest.mark.memory),
    pytest.param("redis", marks=pytest.mark.redis),
]
STORES = [*KINDS, pytest.param("cluster", marks=pytest.mark.cluster)]


# -- a real webhook receiver ---------------------------------------------------------------------
@dataclass
class Hit:
    n: int
    status: int
    headers: Any  # email.message.Message: case-insensitive get()
    body: bytes
    at: float

    @property
    def event_id(self) -> str:
        return str(self.headers.get("X-Quota-Event-Id"))


class Receiver:
    """``ThreadingHTTPServer`` on 127.0.0.1: records every request; answers 500 to the first
    ``fail_first`` requests, to every ``fail_every``-th, or always."""

    def __init__(self, fail_first: int = 0, fail_every: int = 0, fail_always: bool = False):
        self.fail_first, self.fail_every, self.fail_always = fail_first, fail_every, fail_always
        self.hits: list[Hit] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with outer.lock:
                    n = len(outer.hits) + 1
                    status = outer.status_for(n)
                    outer.hits.append(Hit(n, status, self.headers, body, time.monotonic()))
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def status_for(self, n: int) -> int:
        if self.fail_always or n <= self.fail_first:
            return 500
        if self.fail_every and n % self.fail_every == 0:
            return 500
        return 200

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def ok(self) -> list[Hit]:
        with self.lock:
            return [h for h in self.hits if h.status == 200]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(**kw: Any) -> Receiver:
        r = Receiver(**kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


# -- helpers -------------------------------------------------------------------------------------
def event(i: int, **kw: Any) -> AlertEvent:
    values: dict[str, Any] = dict(
        id=f"threshold:default:alice:tpd:2026-11-28:{i}", type="threshold", caller="alice",
        tenant="default", plan="p", limit="tpd", period="2026-11-28", threshold=80,
        used=8000, limit_value=10000, unit="tokens", at=1_764_300_000.0,
    )  # fmt: skip
    values.update(kw)
    return AlertEvent(**values)


class Store:
    """The outbox on one kind of store: ``backend`` writes (the real Lua / Python twin),
    ``source`` is what a Dispatcher is given."""

    def __init__(self, kind: str, url: str | None, prefix: str) -> None:
        self.kind, self.prefix, self.url = kind, prefix, url
        if kind == "memory":
            self.backend: Any = MemoryBackend()
            self.source: Any = self.backend
        else:
            assert url is not None
            if kind == "cluster":
                from redis.cluster import RedisCluster

                self.source = RedisCluster.from_url(url)
            else:
                self.source = redis.Redis.from_url(url)
            self.backend = SyncRedisBackend(self.source)

    def add(self, *events: AlertEvent) -> None:
        assert self.backend.run(outbox_call(self.prefix, events)) == len(events)

    def dead(self) -> list[dict[str, bytes]]:
        return [f for _, f in read_stream(self.source, dead_key(self.prefix), count=1000)]

    def pending(self, d: Dispatcher) -> int:
        if self.kind == "memory":
            return sum(len(lane.pending) for lane in d.lanes)  # type: ignore[attr-defined]
        return sum(
            self.source.xpending(outbox_key(self.prefix), lane.group)["pending"]  # type: ignore[attr-defined]
            for lane in d.lanes
        )

    def close(self) -> None:
        if self.kind != "memory":
            self.source.close()


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    url = None
    if request.param == "redis":
        url = request.getfixturevalue("redis_server").url
    elif request.param == "cluster":
        url = request.getfixturevalue("redis_cluster").plain_url
    s = Store(request.param, url, f"t{os.urandom(4).hex()}")
    yield s
    s.close()


def drive(d: Dispatcher, until: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "timed out"
        d.run_once()
        time.sleep(0.005)


def hook(r: Receiver, **kw: Any) -> WebhookSink:
    return WebhookSink(url=r.url, secret="s3cret", **{"timeout": 2.0, **kw})


def alerts(*sinks: WebhookSink, **kw: Any) -> AlertsConfig:
    opts: dict[str, Any] = dict(log=False, backoff=0.05, poll_interval=0.02, claim_idle=5.0)
    opts.update(kw)
    return AlertsConfig(webhooks=sinks, **opts)


# -- signatures and config -----------------------------------------------------------------------
def test_webhook_is_signed_and_the_signature_verifies(receiver: Any) -> None:
    r = receiver()
    ev = event(1)
    hook(r, headers={"Authorization": "Bearer x"}).send(ev)
    (hit,) = r.hits
    assert hit.headers.get("Content-Type") == "application/json"
    assert hit.headers.get("Authorization") == "Bearer x"
    assert hit.event_id == ev.id
    assert json.loads(hit.body) == json.loads(ev.to_json())
    ts, sig = hit.headers.get("X-Quota-Timestamp"), hit.headers.get("X-Quota-Signature")
    assert abs(int(ts) - time.time()) < 5 and sig.startswith("sha256=")
    assert verify_signature("s3cret", ts, hit.body, sig)
    assert not verify_signature("wrong", ts, hit.body, sig)
    assert not verify_signature("s3cret", ts, hit.body.replace(b"8000", b"8001"), sig)
    assert not verify_signature("s3cret", int(ts) + 1, hit.body, sig)
    assert not verify_signature("s3cret", ts, hit.body, None)
    # an old (replayed) request fails even with a valid signature
    old = int(time.time()) - 301
    assert not verify_signature("s3cret", old, hit.body, sign("s3cret", old, hit.body))
    assert verify_signature("s3cret", old, hit.body, sign("s3cret", old, hit.body), 400)


def test_alerts_table_from_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "hook.secret").write_text("from-file\n")
    monkeypatch.setenv("QM_HOOK_SECRET", "from-env")
    policy = tmp_path / "policy.toml"
    policy.write_text(
        """
[plans.free]
limits = []

[alerts]
slack = ["https://hooks.slack.com/services/T0/B0/XXXXSECRET"]
max_attempts = 3
backoff = 0.5
deliver_in_process = false

[[alerts.webhooks]]
url = "https://ops.example.com/quota"
secret_env = "QM_HOOK_SECRET"
headers = { "X-Team" = "ml" }

[[alerts.webhooks]]
url = "https://other.example.com/quota"
secret_file = "hook.secret"
timeout = 2.5
"""
    )
    cfg = QuotaConfig.from_toml(policy).alerts
    assert isinstance(cfg, AlertsConfig)
    assert [w.secret for w in cfg.webhooks] == ["from-env", "from-file"]
    assert cfg.max_attempts == 3 and cfg.backoff == 0.5 and not cfg.deliver_in_process
    assert [s.name.split("-")[0] for s in cfg.sinks] == ["webhook", "webhook", "slack", "log"]
    text = repr(cfg) + repr(cfg.webhooks[0])
    assert "from-env" not in text and "XXXXSECRET" not in text

    def bad(table: dict[str, Any]) -> str:
        with pytest.raises(ConfigurationError) as e:
            AlertsConfig.from_dict(table)
        return e.value.field

    assert bad({"retries": 3}) == "alerts.retries"
    assert bad({"callables": []}) == "alerts.callables"
    assert bad({"webhooks": [{"url": "https://x.example", "secret": "s", "tls": 1}]}) == (
        "alerts.webhooks[0].tls"
    )
    assert bad({"webhooks": [{"url": "https://x.example"}]}) == "alerts.webhooks[0].secret"
    assert bad({"webhooks": [{"url": "https://x.example", "secret_env": "QM_NOPE"}]}) == (
        "alerts.webhooks[0].secret_env"
    )
    assert bad({"webhooks": [{"url": "ftp://x.example", "secret": "s"}]}) == (
        "alerts.webhooks[0].url"
    )
    assert bad({"max_attempts": 0}) == "alerts.max_attempts"
    AlertsConfig(claim_idle=1.0)  # fine without webhooks
    assert bad({"claim_idle": 2, "webhooks": [{"url": "https://x.example", "secret": "s"}]}) == (
        "alerts.claim_idle"
    )


def test_slack_message_is_human_readable(receiver: Any) -> None:
    r = receiver()
    cfg = AlertsConfig(slack=[r.url], log=False)
    cfg.sinks[0].send(event(1))
    assert json.loads(r.hits[0].body) == {
        "text": ":warning: caller alice used 80% of token quota tpd (8,000 / 10,000 tokens) "
        "for 2026-11-28"
    }
    money = event(2, type="app_threshold", caller=None, limit="app-usd-day", threshold=100,
                  used=10_500_000, limit_value=10_000_000, unit="usd_micros")  # fmt: skip
    assert format_text(money) == (
        ":rotating_light: app spend reached 100% of app budget app-usd-day ($10.50 / $10.00) "
        "for 2026-11-28"
    )
    spike = event(3, type="spike", threshold=None, limit="spike", period="491194", used=52000,
                  limit_value=None)  # fmt: skip
    assert "used 52,000 tokens in the hour from 2026-01-13 10:00 UTC" in format_text(spike)


# -- retries, backoff, dead letters (memory and real Redis) --------------------------------------
def test_retries_with_exponential_backoff_then_delivers(store: Store, receiver: Any) -> None:
    r = receiver(fail_first=3)
    d = Dispatcher(store.source, alerts(hook(r)), prefix=store.prefix)
    store.add(event(1))
    drive(d, lambda: bool(r.ok()))
    assert [h.status for h in r.hits] == [500, 500, 500, 200]
    assert {h.event_id for h in r.hits} == {event(1).id}  # one idempotency key for all tries
    gaps = [b.at - a.at for a, b in zip(r.hits, r.hits[1:], strict=False)]
    for gap, want in zip(gaps, (0.05, 0.1, 0.2), strict=True):
        assert gap >= want * 0.9, gaps
    for _ in range(20):
        d.run_once()
    assert len(r.hits) == 4 and store.pending(d) == 0 and store.dead() == []


def test_dead_letter_after_max_attempts(store: Store, receiver: Any) -> None:
    r = receiver(fail_always=True)
    d = Dispatcher(store.source, alerts(hook(r), max_attempts=3), prefix=store.prefix)
    store.add(event(1), event(2))
    drive(d, lambda: len(store.dead()) == 2)
    assert Counter(h.event_id for h in r.hits) == {event(1).id: 3, event(2).id: 3}
    dead = store.dead()
    assert [AlertEvent.from_json(f["event"]).id for f in dead] == [event(1).id, event(2).id]
    assert {f["error"] for f in dead} == {b"HTTP 500"} and {f["attempts"] for f in dead} == {b"3"}
    # acknowledged: never tried again
    time.sleep(0.3)
    for _ in range(20):
        d.run_once()
    assert len(r.hits) == 6 and store.pending(d) == 0 and len(store.dead()) == 2


def test_a_failing_sink_does_not_redeliver_to_the_others(store: Store, receiver: Any) -> None:
    r = receiver(fail_first=2)
    got: list[AlertEvent] = []
    d = Dispatcher(store.source, alerts(hook(r), callables=[got.append]), prefix=store.prefix)
    store.add(event(1), event(2))
    drive(d, lambda: len(r.ok()) == 2)
    for _ in range(10):
        d.run_once()
    assert [e.id for e in got] == [event(1).id, event(2).id]
    assert sorted(h.event_id for h in r.ok()) == sorted([event(1).id, event(2).id])


def test_a_new_sink_starts_replay_seconds_back(store: Store, receiver: Any) -> None:
    r = receiver()
    store.add(event(1))
    time.sleep(0.25)
    d = Dispatcher(store.source, alerts(hook(r), replay=0.2), prefix=store.prefix)
    assert d.run_once() == 0  # older than the replay window when the sink first appeared
    store.add(event(2))
    drive(d, lambda: len(r.ok()) == 1)
    assert [h.event_id for h in r.hits] == [event(2).id]


@pytest.mark.redis
def test_consumers_of_killed_workers_are_pruned(
    redis_server: Any, receiver: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import quota_middleware.alerts._lanes as alerts_mod

    s = Store("redis", redis_server.url, f"t{os.urandom(4).hex()}")
    stream, group = outbox_key(s.prefix), "quota-alerts:hook"
    s.source.xgroup_create(stream, group, id="0", mkstream=True)
    s.add(event(1), event(2))
    ((_, [(first, _f)]),) = s.source.xreadgroup(group, "idle-empty", {stream: ">"}, count=1)
    s.source.xack(stream, group, first)
    s.source.xreadgroup(group, "idle-holding", {stream: ">"}, count=1)
    monkeypatch.setattr(alerts_mod, "PRUNE_EVERY", 0.0)
    monkeypatch.setattr(alerts_mod, "PRUNE_IDLE_MS", 100)
    time.sleep(0.15)
    d = Dispatcher(s.source, alerts(hook(receiver(), name="hook")), prefix=s.prefix)
    d.run_once()
    names = {c["name"].decode() for c in s.source.xinfo_consumers(stream, group)}
    assert names - {d.consumer} == {"idle-holding"}  # the one holding an entry is kept
    d.stop()
    s.close()


@pytest.mark.redis
def test_an_entry_held_by_a_dead_consumer_is_taken_over(redis_server: Any, receiver: Any) -> None:
    s = Store("redis", redis_server.url, f"t{os.urandom(4).hex()}")
    r = receiver()
    cfg = alerts(hook(r, name="hook", timeout=0.2), claim_idle=0.4)
    stream, group = outbox_key(s.prefix), "quota-alerts:hook"
    s.source.xgroup_create(stream, group, id="0", mkstream=True)
    s.add(event(1))
    assert s.source.xreadgroup(group, "crashed", {stream: ">"}, count=10)  # ... and it dies
    d = Dispatcher(s.source, cfg, prefix=s.prefix)
    assert d.run_once() == 0  # not idle long enough: it may just be slow
    time.sleep(0.45)
    assert d.run_once() == 1
    assert [h.event_id for h in r.hits] == [event(1).id]
    assert s.pending(d) == 0
    s.close()


# -- two consumer processes share the group ------------------------------------------------------
WORKER = """
import sys
from quota_middleware import Plan, QuotaConfig, StorageConfig
from quota_middleware.alerts import AlertsConfig, WebhookSink
from quota_middleware.cli._alert_commands import cli_run

url, prefix, hook_url, name = sys.argv[1:]
cfg = QuotaConfig(
    plans=[Plan(name="p")],
    storage=StorageConfig(url=url, prefix=prefix),
    alerts=AlertsConfig(
        webhooks=[WebhookSink(url=hook_url, secret="s3cret", timeout=2, name="hook",
                              headers={"X-Worker": name})],
        log=False, backoff=0.05, poll_interval=0.02, batch=5, claim_idle=5,
    ),
)
sys.exit(cli_run(cfg))
"""


@pytest.mark.slow
@pytest.mark.redis
def test_two_worker_processes_deliver_each_event_exactly_once(
    redis_server: Any, receiver: Any
) -> None:
    s = Store("redis", redis_server.url, f"t{os.urandom(4).hex()}")
    r = receiver(fail_every=7)  # some deliveries fail and are retried
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    env.pop("QUOTA_REDIS_URL", None)
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, redis_server.url, s.prefix, r.url, name],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for name in ("A", "B")
    ]  # fmt: skip
    try:
        stream, group = outbox_key(s.prefix), "quota-alerts:hook"
        for p in procs:  # both are running ("delivering alerts as <consumer> to ...")
            assert p.stderr is not None
            assert b"delivering alerts as" in p.stderr.readline()
        ids = [event(i).id for i in range(200)]
        for i in range(0, 200, 10):
            s.add(*(event(j) for j in range(i, i + 10)))
        deadline = time.monotonic() + 30
        while len(r.ok()) < 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # anything delivered twice would arrive now
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(10) for p in procs]
    errors = b"".join(p.stderr.read() for p in procs if p.stderr).decode()
    assert codes == [0, 0], errors
    ok = r.ok()
    assert Counter(h.event_id for h in ok) == dict.fromkeys(ids, 1)
    assert all(verify_signature("s3cret", h.headers.get("X-Quota-Timestamp"), h.body,
                                h.headers.get("X-Quota-Signature")) for h in ok)  # fmt: skip
    by_worker = Counter(h.headers.get("X-Worker") for h in ok)
    assert by_worker["A"] > 0 and by_worker["B"] > 0, by_worker
    assert any(h.status == 500 for h in r.hits)
    assert s.source.xpending(stream, group)["pending"] == 0
    # a clean shutdown leaves no consumers behind
    assert s.source.xinfo_consumers(stream, group) == []
    s.close()


# -- threshold events exactly once, from real servers with several worker processes ---------------


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.parametrize("server", ["uvicorn", "werkzeug"])
def test_thresholds_fire_once_under_concurrency(redis_server: Any, server: str) -> None:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    port, proc = serve_app(server, "ai_server",
                           {"QM_TEST_URL": redis_server.url, "QM_TEST_TOKENS": "7200"})  # fmt: skip
    try:

        def one(_: int) -> int:
            with httpx.Client(timeout=30) as c:
                with c.stream("POST", f"http://127.0.0.1:{port}{PATH}", json=STREAM_BODY) as resp:
                    for _chunk in resp.iter_bytes():
                        pass
                    return resp.status_code

        with ThreadPoolExecutor(max_workers=20) as pool:
            statuses = Counter(pool.map(one, range(20)))
        assert statuses == {200: 20}
        # 20 x 300 tokens = 6000 of 7200: 50% and 80% crossed, 100% not
        deadline = time.monotonic() + 10
        while True:
            events = outbox_events(client, "qm")
            if len(events) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        time.sleep(0.3)  # late settles would add duplicates now
        events = outbox_events(client, "qm")
    finally:
        stop_process(proc)
        client.close()
    assert sorted((e.type, e.limit, e.threshold) for e in events) == [
        ("threshold", "tpd", 50), ("threshold", "tpd", 80)
    ]  # fmt: skip
    # ``used`` is actual usage (whole 300-token requests), never reservations in flight
    assert len({e.id for e in events}) == 2
    assert all(e.used % 300 == 0 and e.used <= 6000 for e in events)
    for e in events:
        assert e.caller == "127.0.0.1" and e.limit_value == 7200 and e.unit == "tokens"
        assert e.used * 100 >= (e.threshold or 0) * 7200


def test_threshold_counts_actual_usage_not_reservations_in_flight() -> None:
    from quota_middleware.base._request import Headers, RequestInfo
    from quota_middleware.core._engine import Engine, drive_sync

    cfg = ai_config(limits=[TokenQuota(tokens=1000, name="tpd")])
    engine, backend = Engine(cfg), MemoryBackend()
    body = json.dumps(chat(max_tokens=300)).encode()

    def admit() -> Any:
        info = RequestInfo("POST", PATH, Headers.from_raw([]), "10.0.0.1", body=body)
        return drive_sync(engine.admit(info), backend)

    a, _b, _c = admit(), admit(), admit()  # three in flight, ~308 tokens reserved each
    events = drive_sync(engine.settle(a, Usage(input_tokens=10, output_tokens=10)), backend)
    # 20 of 1000 tokens used (2%): the 924 reserved in flight must not fire the 50% alert
    assert events == []


# -- through the adapters: in-process delivery, kill switch, spikes -------------------------------
class Harness(AIHarness):
    def get(self, path: str = "/health") -> int:
        if self.adapter == "wsgi":
            return int(Client(self.mw).get(path).status_code)
        return int(self.loop.run_until_complete(self._get(path)))

    async def _get(self, path: str) -> int:
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "scheme": "http", "client": ("192.0.2.10", 5000), "server": ("127.0.0.1", 80),
            "headers": [],
        }  # fmt: skip
        status = 0

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        await self.mw(scope, receive, send)
        return status


def ai_config(**kw: Any) -> QuotaConfig:
    limits = kw.pop("limits", [])
    route = AIRoute(path=PATH, format="openai-chat", default_output_tokens=100)
    return QuotaConfig(plans=[Plan(name="p", limits=limits)], ai_routes=[route], **kw)


@pytest.fixture(params=["asgi", "wsgi"])
def adapter(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def harness(adapter: str, backend: Any) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(cfg: QuotaConfig, **kw: Any) -> Harness:
        h = Harness(adapter, backend, cfg, **kw)
        made.append(h)
        return h

    yield make
    for h in made:
        if h.mw.alerts is not None:
            h.mw.alerts.stop()
        h.close()


@pytest.mark.parametrize("backend_name", KINDS)
def test_middleware_delivers_in_process_to_callables_and_the_log(
    harness: Any, backend: Any, receiver: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="quota_middleware.alerts")
    r = receiver()
    got: list[AlertEvent] = []
    cfg = ai_config(
        limits=[TokenQuota(tokens=1000, name="tpd")],
        alerts=AlertsConfig(webhooks=[hook(r)], callables=[got.append], poll_interval=0.02),
    )
    h = harness(cfg)
    assert h.post(chat(x_prompt=300, x_completion=300)).status == 200  # 60%
    assert h.post(chat(x_prompt=300, x_completion=300)).status == 200  # 120%

    def logged() -> list[logging.LogRecord]:
        return [rec for rec in caplog.records if rec.name == "quota_middleware.alerts"]

    deadline = time.monotonic() + 10  # each sink has its own thread
    while (len(got) < 3 or len(r.ok()) < 3 or len(logged()) < 3) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sorted(e.threshold or 0 for e in got) == [50, 80, 100]
    assert {e.id for e in got} == {h.event_id for h in r.ok()} and len(r.hits) == 3
    d = h.mw.alerts.dispatcher
    assert d is not None and d.memory is (backend.sync() if backend.name == "memory" else None)
    time.sleep(0.1)
    records = logged()
    assert len(records) == 3 and all(rec.levelno == logging.WARNING for rec in records)
    assert "used 100% of token quota tpd (1,200 / 1,000 tokens)" in records[-1].getMessage()


@pytest.mark.parametrize("backend_name", KINDS)
def test_app_budget_kill_switch(harness: Any, backend: Any) -> None:
    price = PriceTable().lookup("gpt-4o-mini")
    assert price is not None
    one = cost_micros(Usage(input_tokens=1000, output_tokens=1000), price)
    budget = AppBudget(usd=(one * 1.5) / 1e6, period="day", check_interval=0.05)
    h = harness(ai_config(app_budgets=[budget]))
    assert h.post(chat(x_prompt=1000, x_completion=1000)).status == 200  # 67%
    assert h.post(chat(x_prompt=1000, x_completion=1000)).status == 200  # 133%: spent
    time.sleep(0.1)  # the copy of the app counters is at most check_interval old
    r = h.post(chat(x_prompt=1, x_completion=1))
    assert r.status == 429
    assert r.json["error"]["code"] == "insufficient_quota"
    assert int(r.headers["retry-after"]) >= 1
    assert h.get("/health") == 200  # non-AI routes keep working
    events = outbox_events(backend.sync(), "qm")
    assert sorted((e.type, e.threshold) for e in events) == [
        ("app_threshold", 50), ("app_threshold", 80), ("app_threshold", 100)
    ]  # fmt: skip
    full = next(e for e in events if e.threshold == 100)
    assert full.limit == budget.name and full.used == 2 * one
    assert full.limit_value == budget.micros and full.unit == "usd_micros"
    assert full.id == f"app:{budget.name}:{full.period}:100" and full.caller is None


@pytest.mark.parametrize("backend_name", KINDS)
def test_usage_spike_fires_once_for_its_hour(harness: Any, backend: Any) -> None:
    now = [0]
    base_hour = time.time_ns() // 3_600_000_000_000 - 12
    cfg = ai_config(spikes=SpikeRule(multiple=3.0, floor_tokens=1000, window_hours=24))
    h = harness(cfg, clock=lambda: now[0])

    def at(hour: int, minute: int, prompt: int, completion: int) -> None:
        now[0] = (base_hour + hour) * 3_600_000_000 + minute * 60_000_000
        assert h.post(chat(x_prompt=prompt, x_completion=completion)).status == 200

    for hour in range(1, 6):
        at(hour, 1, 100, 100)  # 200 tokens an hour: the usual
    at(8, 1, 1500, 500)  # 2000 > 3 x 1000/24 and >= the floor: a spike
    at(8, 30, 1500, 500)  # the same hour: no second event
    at(9, 1, 100, 100)  # ordinary again
    events = outbox_events(backend.sync(), "qm")
    assert [(e.type, e.period, e.used) for e in events] == [("spike", str(base_hour + 8), 2000)]
    assert events[0].caller == "192.0.2.10" and events[0].id.startswith("spike:default:")


# -- the CLI functions ---------------------------------------------------------------------------
@pytest.mark.redis
def test_cli_tail_run_once_and_test(redis_server: Any, receiver: Any) -> None:
    s = Store("redis", redis_server.url, f"t{os.urandom(4).hex()}")
    r = receiver()
    cfg = QuotaConfig(
        plans=[Plan(name="p")],
        storage=StorageConfig(url=redis_server.url, prefix=s.prefix),
        alerts=alerts(hook(r)),
    )
    s.add(event(1), event(2), event(3))
    out = io.StringIO()
    assert cli_tail(cfg, count=2, out=out) == 0
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and event(2).id in lines[0] and event(3).id in lines[1]
    assert "caller alice used 80% of token quota tpd" in lines[1]
    out = io.StringIO()
    assert cli_tail(cfg, count=10, as_json=True, out=out) == 0
    assert [json.loads(x)["id"] for x in out.getvalue().splitlines()] == [
        event(i).id for i in (1, 2, 3)
    ]
    # follow: prints what arrives later
    out, stop = io.StringIO(), threading.Event()
    t = threading.Thread(target=cli_tail, args=(cfg,),
                         kwargs=dict(follow=True, count=0, as_json=True, out=out, stop=stop,
                                     poll=0.02))  # fmt: skip
    t.start()
    time.sleep(0.1)
    s.add(event(4))
    deadline = time.monotonic() + 5
    while event(4).id not in out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    t.join(5)
    assert [json.loads(x)["id"] for x in out.getvalue().splitlines()] == [event(4).id]

    assert cli_run(cfg, once=True, err=io.StringIO()) == 0
    assert sorted(h.event_id for h in r.ok()) == sorted(event(i).id for i in (1, 2, 3, 4))

    out = io.StringIO()
    assert cli_test(cfg, out) == 0
    assert out.getvalue().startswith("OK      webhook http://127.0.0.1:")
    assert json.loads(r.hits[-1].body)["type"] == "test"
    broken = QuotaConfig(
        plans=[Plan(name="p")],
        alerts=alerts(
            hook(r), WebhookSink(url=f"http://127.0.0.1:{free_port()}/x", secret="s", timeout=1)
        ),
    )
    out = io.StringIO()
    assert cli_test(broken, out) == 1
    assert "FAILED  webhook http://127.0.0.1:" in out.getvalue()
    memory = QuotaConfig(plans=[Plan(name="p")], alerts=alerts(hook(r)))
    assert cli_run(memory, once=True, err=io.StringIO()) == 2
    s.close()


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


def test_events_survive_an_outbox_failure_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(limits=[TokenQuota(tokens=1000, name="tpd")])
    engine = Engine(cfg)
    backend = FailingKeys("outbox_add")
    decision = drive_sync(engine.admit(ai_info(json.dumps(chat(max_tokens=10)).encode())),
                          backend)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="quota_middleware"):
        events = drive_sync(engine.settle(decision, Usage(input_tokens=600, output_tokens=0)),
                            backend)  # fmt: skip
    assert [e.threshold for e in events] == [50]
    assert any("alert not queued" in r.message and '"threshold":50' in r.message
               for r in caplog.records)  # fmt: skip
