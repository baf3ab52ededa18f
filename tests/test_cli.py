"""The ``quota-middleware`` command, end to end: each command runs as a subprocess against a real
redis-server; the traffic it reports on goes through the WSGI middleware in this process."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from werkzeug.test import Client

import ai_app
from quota_middleware import QuotaConfig, WSGIQuotaMiddleware
from quota_middleware.backends.redis import SyncRedisBackend
from quota_middleware.identity import KeyStore
from quota_middleware.reports import UsageReader
from servers import free_port

ROOT = Path(__file__).resolve().parents[1]
PATH = "/v1/chat/completions"

POLICY = """
default_plan = "free"

[storage]
url = "{url}"
prefix = "{prefix}"

[[ai_routes]]
path = "/v1/chat/completions"
format = "openai-chat"

[plans.free]
limits = [
    {{ type = "requests", rate = "1000/minute" }},
    {{ type = "token_quota", tokens = 1000000, period = "day" }},
]

[plans.pro]
timezone = "Europe/Paris"
limits = [
    {{ type = "requests", rate = "1000/minute", burst = 50 }},
    {{ type = "budget", usd = 5.0, period = "month" }},
]

[identity]
anonymous = "ip"

[identity.api_keys]
store = "redis"
cache_ttl = 0.1
negative_cache_ttl = 0

[[app_budgets]]
name = "daily"
usd = 0.001
period = "day"
thresholds = [50, 80]
hard_stop = false

[alerts]
log = true
deliver_in_process = false
"""


def cli(*args: str, env: dict[str, str] | None = None, code: int | None = 0) -> Any:
    """Run ``python -m quota_middleware.cli ARGS``; checks the exit status unless ``code=None``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("QUOTA_")}
    environ.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "quota_middleware.cli", *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=environ,
    )  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr
    if code is not None:
        assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    return proc


@pytest.fixture
def url(redis_server: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv("QUOTA_REDIS_URL", raising=False)
    u: str = redis_server.url
    redis.Redis.from_url(u).flushall()
    return u


@pytest.fixture
def policy(url: str, tmp_path: Path) -> str:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY.format(url=url, prefix="qm"))
    return str(path)


@pytest.fixture
def app(policy: str) -> Iterator[WSGIQuotaMiddleware]:
    mw = WSGIQuotaMiddleware(ai_app.wsgi_app, config=QuotaConfig.from_toml(policy))
    yield mw
    mw.backend.close()  # type: ignore[attr-defined]


def send(
    mw: Any, key: str | None, body: dict[str, Any] | None = None, path: str = PATH,
    ip: str = "192.0.2.7",
) -> int:  # fmt: skip
    headers = {"X-API-Key": key} if key else {}
    data = json.dumps(body or {}).encode()
    # buffered: the body is read and closed here, so the request is settled before we return
    r = Client(mw).post(path, data=data, content_type="application/json", headers=headers,
                        environ_base={"REMOTE_ADDR": ip}, buffered=True)  # fmt: skip
    return r.status_code


def chat(prompt: int, completion: int, model: str = "gpt-4o-mini") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}],
            "x_prompt": prompt, "x_completion": completion}  # fmt: skip


def new_key(policy: str, caller: str, *extra: str) -> tuple[str, str]:
    out = json.loads(cli("keys", "create", "--caller", caller, "--json", "--policy", policy,
                         *extra).stdout)  # fmt: skip
    return out["key"], out["key_id"]


# -- keys ----------------------------------------------------------------------------------------


def test_keys_create_list_revoke(policy: str, url: str) -> None:
    text = cli("keys", "create", "--caller", "alice", "--plan", "pro", "--expires", "90d",
               "--policy", policy).stdout  # fmt: skip
    assert "caller alice" in text and "plan pro" in text and "cannot be shown again" in text
    key = next(w for w in text.split() if w.startswith("qm_"))
    key_id = key[3:15]
    # global options go before or after the command; --redis-url alone is enough for keys
    bob_key, bob_id = new_key(policy, "bob", "--tenant", "acme")
    j = json.loads(cli("--redis-url", url, "keys", "list", "--json").stdout)
    assert {(r["key_id"], r["caller"], r["tenant"], r["plan"], r["status"]) for r in j} == {
        (key_id, "alice", "default", "pro", "active"),
        (bob_id, "bob", "acme", None, "active"),
    }
    alice = next(r for r in j if r["caller"] == "alice")
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    created, expires = (time.strptime(alice[f], fmt) for f in ("created", "expires"))
    assert round((time.mktime(expires) - time.mktime(created)) / 86400) == 90
    rows = list(csv.DictReader(io.StringIO(cli("keys", "list", "--csv", "--caller", "bob",
                                               "--policy", policy).stdout)))  # fmt: skip
    assert [(r["key_id"], r["tenant"], r["plan"], r["expires"]) for r in rows] == [
        (bob_id, "acme", "", "")
    ]
    table = cli("keys", "list", "--policy", policy).stdout
    assert table.splitlines()[0].split()[:3] == ["key", "id", "caller"] and bob_id in table
    assert key not in table and bob_key not in table  # never shown again

    out = cli("keys", "revoke", key_id, "--policy", policy)
    assert "Revoked" in out.stdout and "0.1 s" in out.stdout  # the policy's cache TTL
    again = cli("keys", "revoke", key_id, "--policy", policy, code=1)
    assert "revoked already" in again.stderr
    assert "no API key" in cli("keys", "revoke", "AAAAAAAAAAAA", "--policy", policy,
                               code=1).stderr  # fmt: skip
    j = json.loads(cli("keys", "list", "--json", "--caller", "alice", "--policy", policy).stdout)
    assert [(r["status"], r["revoked"]) for r in j] == [("revoked", True)]
    unknown = cli("keys", "create", "--caller", "x", "--plan", "gold", "--policy", policy, code=2)
    assert "no plan 'gold'" in unknown.stderr


def test_rotated_and_revoked_keys_through_the_middleware(
    policy: str, app: WSGIQuotaMiddleware
) -> None:
    old_key, old_id = new_key(policy, "carol", "--plan", "pro")
    assert send(app, old_key, path="/hello") == 200
    assert send(app, "qm_" + "A" * 12 + "_" + "B" * 38, path="/hello") == 401

    out = json.loads(cli("keys", "rotate", old_id, "--grace", "2s", "--json",
                         "--policy", policy).stdout)  # fmt: skip
    new_key_, new_id = out["key"], out["key_id"]
    assert out["replaces"] == old_id and new_id != old_id
    assert (out["caller"], out["plan"], out["expires"]) == ("carol", "pro", None)
    rotated_at = time.time()
    assert send(app, new_key_, path="/hello") == 200
    assert send(app, old_key, path="/hello") == 200  # in its grace period
    store = KeyStore(SyncRedisBackend(redis.Redis.from_url(app.config.storage.url)))
    old = store.get(old_id)
    assert old is not None and old.status == "active" and old.expires is not None
    assert rotated_at - 1 < old.expires <= rotated_at + 2.5
    time.sleep(max(0.0, old.expires - time.time()) + 0.2)  # the grace, then the 0.1 s cache
    assert send(app, old_key, path="/hello") == 401
    assert send(app, new_key_, path="/hello") == 200
    assert store.get(old_id).status == "expired"  # type: ignore[union-attr]

    text = cli("keys", "rotate", old_id, "--policy", policy, code=1).stderr
    assert "expired" in text
    text = cli("keys", "rotate", new_id, "--grace", "24h", "--policy", policy).stdout
    assert "keeps working until" in text and "grace 1d" in text and "cache TTL" in text
    newest = next(w for w in text.split() if w.startswith("qm_"))
    cli("keys", "revoke", newest[3:15], "--policy", policy)
    time.sleep(0.2)
    assert send(app, newest, path="/hello") == 401
    assert send(app, new_key_, path="/hello") == 200  # still in its 24 h grace


# -- usage ---------------------------------------------------------------------------------------


def test_usage_top_callers_by_cost_and_tokens(policy: str, app: WSGIQuotaMiddleware) -> None:
    alice, _ = new_key(policy, "alice", "--plan", "pro")
    bob, _ = new_key(policy, "bob")
    # alice: fewer tokens, but output ones (dearer); bob: more tokens, mostly input
    assert send(app, alice, chat(100, 1000)) == 200
    assert send(app, alice, chat(100, 1000)) == 200
    assert send(app, bob, chat(3000, 10)) == 200
    assert send(app, None, chat(10, 1)) == 200  # anonymous, by IP

    by_cost = json.loads(cli("usage", "--json", "--policy", policy).stdout)
    assert [r["caller"] for r in by_cost] == ["alice", "bob", "192.0.2.7"]
    a = by_cost[0]
    assert (a["tenant"], a["requests"], a["input_tokens"], a["output_tokens"]) == (
        "default",
        2,
        200,
        2000,
    )
    assert a["total_tokens"] == 2200 and a["models"] == ["gpt-4o-mini"] and a["estimated"] == 0
    reader = UsageReader(app.config, app.backend)
    assert a["cost_micros"] == sum(r.cost_micros for r in reader.usage("alice", plan="pro"))
    assert by_cost[0]["cost_micros"] > by_cost[1]["cost_micros"] > 0

    by_tokens = json.loads(cli("usage", "--by", "tokens", "--json", "--policy", policy).stdout)
    assert [r["caller"] for r in by_tokens] == ["bob", "alice", "192.0.2.7"]
    top1 = json.loads(cli("usage", "--by", "tokens", "--limit", "1", "--period", "month",
                          "--json", "--policy", policy).stdout)  # fmt: skip
    assert [(r["caller"], r["total_tokens"]) for r in top1] == [("bob", 3010)]
    rows = list(csv.DictReader(io.StringIO(cli("usage", "--csv", "--policy", policy).stdout)))
    assert [r["caller"] for r in rows] == ["alice", "bob", "192.0.2.7"]
    assert rows[1]["total_tokens"] == "3010" and rows[1]["requests"] == "1"
    table = cli("usage", "--policy", policy).stdout
    assert "top callers today by cost" in table and "alice" in table
    assert "total (all): 4 requests, 5,221 tokens" in table
    assert json.loads(cli("usage", "--json", "--tenant", "acme", "--policy", policy).stdout) == []
    # an id too long for a key name is stored as a digest, and shown as one
    long_key, _ = new_key(policy, "x" * 100, "--tenant", "acme")
    assert send(app, long_key, chat(50, 50)) == 200
    [row] = json.loads(cli("usage", "--json", "--tenant", "acme", "--policy", policy).stdout)
    assert row["tenant"] == "acme" and row["caller"].startswith("h-") and row["hashed"] is True
    empty = cli("usage", "--policy", policy, "--prefix", "other").stdout
    assert "no usage recorded today" in empty


def test_usage_of_one_caller_and_app_budgets(policy: str, app: WSGIQuotaMiddleware) -> None:
    alice, _ = new_key(policy, "alice", "--plan", "pro")
    assert send(app, alice, chat(1000, 500)) == 200
    assert send(app, alice, chat(1000, 500, model="gpt-4o")) == 200
    assert send(app, alice, chat(1000, 500)) == 200

    got = json.loads(cli("usage", "--caller", "alice", "--plan", "pro", "--days", "3", "--json",
                         "--policy", policy).stdout)  # fmt: skip
    assert (got["caller"], got["tenant"], got["plan"], got["days"]) == (
        "alice",
        "default",
        "pro",
        3,
    )
    per_model = {u["model"]: u for u in got["usage"]}
    assert set(per_model) == {"gpt-4o", "gpt-4o-mini"}
    assert per_model["gpt-4o-mini"]["requests"] == 2
    assert per_model["gpt-4o-mini"]["input_tokens"] == 2000
    assert per_model["gpt-4o"]["output_tokens"] == 500
    spent = sum(u["cost_micros"] for u in got["usage"])
    [budget] = got["remaining"]
    assert (budget["name"], budget["kind"], budget["used"]) == ("usd-month", "budget", spent)
    assert budget["remaining"] == 5_000_000 - spent
    rows = list(csv.DictReader(io.StringIO(cli("usage", "--caller", "alice", "--plan", "pro",
                                               "--csv", "--policy", policy).stdout)))  # fmt: skip
    assert sorted(r["model"] for r in rows) == ["gpt-4o", "gpt-4o-mini"]
    table = cli("usage", "--caller", "alice", "--plan", "pro", "--policy", policy).stdout
    assert "usd-month" in table and "Europe/Paris" in table and "gpt-4o-mini" in table

    app_budget = json.loads(cli("usage", "--app", "--json", "--policy", policy).stdout)
    [daily] = app_budget
    assert (daily["name"], daily["spent_micros"], daily["limit_micros"]) == ("daily", spent, 1000)
    assert daily["override_micros"] is None and daily["spent_out"] is True
    assert daily["percent"] == round(100 * spent / 1000, 2)
    # an operator raises the limit in the store: the override shows
    key = next(iter(redis.Redis.from_url(app.config.storage.url).scan_iter(match="qm:{@app}:q:*")))
    redis.Redis.from_url(app.config.storage.url).hset(key, "daily:limit", 1_000_000_000)
    table = cli("usage", "--app", "--policy", policy).stdout
    assert "daily" in table and "$1000.000000" in table and "is spent" not in table
    rows = list(
        csv.DictReader(io.StringIO(cli("usage", "--app", "--csv", "--policy", policy).stdout))
    )
    assert rows[0]["override_micros"] == "1000000000" and rows[0]["limit_micros"] == "1000000000"

    # the thresholds the app budget crossed are in the outbox
    lines = cli("alerts", "tail", "--json", "--policy", policy).stdout.splitlines()
    events = [json.loads(line) for line in lines]
    assert sorted(e["threshold"] for e in events if e["limit"] == "daily") == [50, 80]
    text = cli("alerts", "tail", "-n", "1", "--policy", policy).stdout
    assert len(text.splitlines()) == 1 and "daily" in text
    run = cli("alerts", "run", "--once", "--policy", policy)
    assert "delivered" in run.stderr and "quota alert" in run.stderr


def test_usage_and_keys_on_a_cluster_scan_every_primary(redis_cluster: Any, tmp_path: Path) -> None:
    from redis.cluster import RedisCluster

    prefix = f"t{os.urandom(3).hex()}"
    policy = tmp_path / "cluster.toml"
    policy.write_text(POLICY.format(url=redis_cluster.url, prefix=prefix))
    mw = WSGIQuotaMiddleware(ai_app.wsgi_app, config=QuotaConfig.from_toml(policy))
    ips = [f"198.51.100.{i}" for i in range(1, 9)]
    for n, ip in enumerate(ips, 1):
        assert send(mw, None, chat(10 * n, 5), ip=ip) == 200
    mw.backend.close()  # type: ignore[attr-defined]
    client = RedisCluster.from_url(redis_cluster.plain_url)
    nodes = {client.get_node_from_key(f"{prefix}:{{default:{ip}}}:u:x").name for ip in ips}
    client.close()
    assert len(nodes) > 1  # the usage keys live on several primaries
    rows = json.loads(cli("usage", "--by", "tokens", "--json", "--policy", str(policy)).stdout)
    assert [r["caller"] for r in rows] == ips[::-1]
    _, key_id = new_key(str(policy), "dora")
    listed = json.loads(cli("keys", "list", "--json", "--policy", str(policy)).stdout)
    assert [r["key_id"] for r in listed] == [key_id]
    [daily] = json.loads(cli("usage", "--app", "--json", "--policy", str(policy)).stdout)
    assert daily["spent_micros"] == sum(r["cost_micros"] for r in rows) > 0


# -- check, alerts test, demo, errors ------------------------------------------------------------


def test_check_valid_and_invalid(tmp_path: Path) -> None:
    env = {"DEMO_JWT_SECRET": "s" * 40, "QUOTA_REDIS_URL": "redis://:hunter2@127.0.0.1:1/0"}
    example = str(ROOT / "examples" / "fastapi_app" / "policy.toml")
    text = cli("check", example, env=env).stdout
    assert text.startswith(f"{example}: OK")
    for part in (
        "anonymous", "free", "pro", "tokens-day", "5/minute, burst 5", "2 in flight",
        "/v1/chat/completions", "jwt -> api_key -> ip", "redis://:***@127.0.0.1:1/0",
    ):  # fmt: skip
        assert part in text, part
    assert "hunter2" not in text
    j = json.loads(cli("check", example, "--json", env=env).stdout)
    assert j["ok"] is True and j["default_plan"] == "anonymous"
    assert [p["name"] for p in j["plans"]] == ["anonymous", "free", "pro"]
    assert j["identity"]["order"] == ["jwt", "api_key", "ip"]
    assert [r["path"] for r in j["ai_routes"]] == ["/v1/chat/completions", "/v1/messages"]
    free = next(p for p in j["plans"] if p["name"] == "free")
    assert free["limits"][0] == {
        "name": "5-m", "type": "requests", "rule": "5/minute, burst 5", "rate": "5/minute",
        "burst": 5, "paths": None, "models": None,
    }  # fmt: skip

    bad = tmp_path / "bad.toml"
    bad.write_text('[plans.free]\nlimits = [{ type = "requests", rate = "10/sec0nd" }]\n')
    out = cli("check", str(bad), code=1)
    assert "invalid" in out.stderr and "rate" in out.stderr and "10/sec0nd" in out.stderr
    j = json.loads(cli("check", str(bad), "--json", code=1).stdout)
    assert j["ok"] is False and "rate" in j["field"]
    assert "cannot read" in cli("check", str(tmp_path / "missing.toml"), code=1).stderr


def test_alerts_test_sends_to_every_sink(policy: str, tmp_path: Path) -> None:
    out = cli("alerts", "test", "--policy", policy)
    assert out.stdout.startswith("OK") and "log" in out.stdout
    assert "quota alert test:" in out.stderr
    dead = tmp_path / "dead.toml"
    dead.write_text(
        POLICY.format(url="memory://", prefix="qm").replace(
            "log = true", f'log = true\nwebhooks = [{{ url = "http://127.0.0.1:{free_port()}/x",'
            ' secret = "s3cret-s3cret-s3cret", timeout = 0.5 }]'
        )
    )  # fmt: skip
    out = cli("alerts", "test", "--policy", str(dead), code=1)
    assert "FAILED" in out.stdout and "OK" in out.stdout
    assert "no alert sinks" in cli("alerts", "test", code=2).stdout


def test_demo_still_works() -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    out = cli("demo", "--requests", "2")
    assert "embedded memory backend" in out.stdout and "alice" in out.stdout


def test_store_errors_are_messages_not_tracebacks(policy: str, tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    for args in (("keys", "list"), ("usage",), ("usage", "--caller", "a"), ("alerts", "tail")):
        out = cli(*args, "--redis-url", dead, code=2)
        assert "quota-middleware:" in out.stderr and "127.0.0.1" in out.stderr, out.stderr
    out = cli("keys", "list", env={"QUOTA_REDIS_URL": "redis://:pw@127.0.0.1:1/0"}, code=2)
    assert "cannot reach Redis at redis://:***@127.0.0.1:1/0" in out.stderr
    memory = cli("keys", "list", code=2).stderr
    assert "memory://" in memory and "--redis-url" in memory
    assert "memory" in cli("usage", "--app", "--policy", policy, "--redis-url", "memory://",
                           code=2).stderr  # fmt: skip
    assert "unsupported scheme" in cli("keys", "list", "--redis-url", "http://x", code=2).stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[plans.free]\nlimits = [3]\n")
    assert "plans.free.limits[0]" in cli("usage", "--policy", str(bad), code=2).stderr
    bad.write_text("[plans.free]\nlimits = 3\n")  # the loader trips over it: still a message
    assert "invalid configuration" in cli("keys", "list", "--policy", str(bad), code=2).stderr
    assert "invalid" in cli("check", str(bad), code=1).stderr
    assert "no app budgets" in cli("usage", "--app", "--redis-url", dead, code=2).stderr
    # QUOTA_POLICY is the default --policy
    env = {"QUOTA_POLICY": policy}
    assert json.loads(cli("keys", "list", "--json", env=env).stdout) == []


# -- check: does the configured Redis keep its data across a restart? ----------------------------
CHECK_POLICY = """
[storage]
url = "{url}"

[plans.free]
limits = [{{ type = "requests", rate = "9/minute" }}]
"""


def _check_policy(tmp_path: Path, url: str) -> str:
    path = tmp_path / "check.toml"
    path.write_text(CHECK_POLICY.format(url=url))
    return str(path)


def test_check_warns_when_redis_keeps_no_data(tmp_path: Path) -> None:
    from servers import RedisServer

    with RedisServer() as bare, RedisServer(extra_args=["--appendonly", "yes"]) as aof:
        # no persistence (the test servers' default: --save "" --appendonly no), from the file
        policy = _check_policy(tmp_path, bare.url)
        out = cli("check", policy)  # a warning, not a failure: exit 0
        assert out.stdout.startswith(f"{policy}: OK")
        assert f"redis: {bare.url}: NO PERSISTENCE" in out.stdout
        assert "warning" in out.stderr and "keeps no data on disk" in out.stderr
        assert "API keys are gone" in out.stderr
        assert f"redis-cli -h 127.0.0.1 -p {bare.port} CONFIG SET appendonly yes" in out.stderr
        assert "CONFIG REWRITE" in out.stderr and 'CONFIG SET save "60 1000"' in out.stderr
        j = json.loads(cli("check", policy, "--json").stdout)
        assert j["ok"] is True and j["redis"]["persistent"] is False
        node = {"node": f"127.0.0.1:{bare.port}", "appendonly": "no", "save": "", "error": None,
                "persistent": False}  # fmt: skip
        assert j["redis"]["nodes"] == [node]
        assert len(j["warnings"]) == 1 and "keeps no data" in j["warnings"][0]

        # the URL is resolved as for every command: --redis-url > QUOTA_REDIS_URL > the file
        out = cli("check", policy, env={"QUOTA_REDIS_URL": aof.url})
        assert out.stderr == "" and f"redis: {aof.url}: AOF on" in out.stdout
        out = cli("check", policy, "--redis-url", bare.url, env={"QUOTA_REDIS_URL": aof.url})
        assert "keeps no data" in out.stderr and "--redis-url is set" in out.stdout
        assert cli("--redis-url", aof.url, "check", policy).stderr == ""  # before the command

        # --offline: the file only, no connection
        out = cli("check", policy, "--offline")
        assert out.stderr == "" and "\nredis: " not in out.stdout


def test_persistence_verdicts() -> None:
    from quota_middleware.cli.check import persistence_warnings, redis_persistence
    from servers import RedisServer

    hidden = ["--rename-command", "CONFIG", ""]  # as managed services often do
    cases = {
        "rdb": (["--save", "60 1000"], True),  # snapshots without AOF count
        "aof": (["--appendonly", "yes"], True),
        "hidden": (hidden, None),  # CONFIG refused: not verified...
        "hidden_aof": ([*hidden, "--appendonly", "yes"], True),  # ...unless INFO shows AOF on
    }
    for name, (args, verdict) in cases.items():
        with RedisServer(extra_args=args) as server:
            info = redis_persistence(server.url)
        assert info["reachable"] and info["persistent"] is verdict, (name, info)
        warnings = persistence_warnings(info)
        if verdict:
            assert warnings == [], (name, warnings)
        else:
            assert len(warnings) == 1 and "could not verify" in warnings[0], warnings
            assert "unknown command" in warnings[0]


def test_check_with_redis_out_of_reach_is_a_note_not_a_failure(tmp_path: Path) -> None:
    dead = f"redis://:pw@127.0.0.1:{free_port()}/0"
    out = cli("check", _check_policy(tmp_path, dead))
    assert "not reachable" in out.stderr and "persistence not checked" in out.stderr
    assert "redis://:***@127.0.0.1" in out.stderr and ":pw@" not in out.stderr + out.stdout
    j = json.loads(cli("check", _check_policy(tmp_path, dead), "--json").stdout)
    assert j["ok"] is True and j["redis"]["reachable"] is False
    assert j["redis"]["persistent"] is None and len(j["warnings"]) == 1


@pytest.mark.cluster
def test_check_looks_at_every_primary_of_a_cluster(redis_cluster: Any, tmp_path: Path) -> None:
    j = json.loads(cli("check", _check_policy(tmp_path, redis_cluster.url), "--json").stdout)
    assert j["redis"]["persistent"] is False
    assert len(j["redis"]["nodes"]) == 3 and len(j["warnings"]) == 3
