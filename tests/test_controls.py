"""Runtime controls (``controls.py``): blocks and limit overrides, read by the same admit call, on
every backend (memory, fakeredis, a real redis-server, the real cluster); the new and changed
scripts against their twins; a block set through the CLI stopping the next request served by
uvicorn with 2 workers."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import httpx
import pytest

from ai_harness import AIHarness, chat
from ai_harness import config as ai_config
from harness import Harness
from quota_middleware import Plan, QuotaConfig, RequestRate, TokenQuota
from quota_middleware.base._keys import CallerKeys, key_slot, tenant_controls
from quota_middleware.base._scripts import ScriptCall
from quota_middleware.controls import Controls
from quota_middleware.errors import InvalidArgument
from servers import serve_app, stop_process

IP = "203.0.113.7"  # the Harness's client, so the caller id
AI_IP = "192.0.2.10"  # the AIHarness's


def plain_config(*limits: Any) -> QuotaConfig:
    return QuotaConfig(plans=[Plan(name="p", limits=list(limits) or [
        RequestRate(rate="1000/minute", name="rpm")])])  # fmt: skip


# -- blocks -------------------------------------------------------------------------------------
def test_a_block_refuses_the_very_next_request_and_unblock_restores(backend: Any) -> None:
    cfg = plain_config()
    h = Harness.build("wsgi", backend, cfg)
    controls = Controls(cfg, backend.sync())
    assert h.request().status == 200
    b = controls.block(IP, reason="abuse  from\nthis key")
    assert b.until is None and b.reason == "abuse from this key" and b.scope == "all"
    r = h.request()
    assert r.status == 403
    assert r.body["error"]["code"] == "caller_blocked"
    assert r.body["error"]["reason"] == "abuse from this key"
    assert "abuse from this key" in r.body["error"]["message"]
    assert r.headers["x-should-retry"] == "false" and "retry-after" not in r.headers
    assert h.request(client_ip="198.51.100.1").status == 200  # another caller
    state = controls.show(IP)
    assert state.block is not None and state.block.reason == "abuse from this key"
    assert controls.unblock(IP) is True
    assert h.request().status == 200
    assert controls.unblock(IP) is False
    assert controls.show(IP).block is None


def test_a_block_ends_by_itself_on_the_store_clock(backend: Any) -> None:
    cfg = plain_config()
    h = Harness.build("wsgi", backend, cfg)
    controls = Controls(cfg, backend.sync())
    b = controls.block(IP, reason="cool down", duration=0.6)
    assert b.until is not None and 0 < b.until - time.time() < 5
    r = h.request()
    assert r.status == 403 and r.headers["retry-after"] == "1"
    time.sleep(0.8)
    assert h.request().status == 200
    assert controls.show(IP).block is None


def test_an_ai_only_block_lets_other_routes_through(backend: Any) -> None:
    cfg = ai_config()
    h = AIHarness("asgi", backend, cfg)
    try:
        Controls(cfg, backend.sync()).block(AI_IP, reason="no AI", scope="ai")
        r = h.post(chat(max_tokens=10))
        assert r.status == 403 and r.json["error"]["code"] == "caller_blocked"
        other = h.post(chat(max_tokens=10), path="/v1/other")
        assert other.status == 200 and "ratelimit" in other.headers  # limited, not blocked
    finally:
        h.close()


def test_a_tenant_block_refuses_every_caller_of_the_tenant(backend: Any) -> None:
    cfg = plain_config()
    h = Harness.build("asgi", backend, cfg)
    controls = Controls(cfg, backend.sync())
    controls.block(None, tenant="default", reason="unpaid invoice", duration=60)
    for ip in (IP, "198.51.100.1", "198.51.100.2", "2001:db8::9"):
        r = h.request(client_ip=ip)
        assert r.status == 403, ip
        assert r.body["error"]["blocked"] == "tenant"
        assert r.body["error"]["reason"] == "unpaid invoice"
        assert 30 <= int(r.headers["retry-after"]) <= 60  # (fakeredis on a loaded machine)
    state = controls.show(IP)
    assert state.block is None and state.tenant_block is not None
    assert state.tenant_block.whole_tenant and state.tenant_block.until is not None
    # another tenant's copy in the same slots is untouched
    assert controls.show(IP, tenant="other").tenant_block is None
    assert controls.unblock(None, tenant="default") is True
    assert h.request(client_ip="198.51.100.1").status == 200
    h.close()


def test_bad_arguments_are_invalid_argument(backend: Any) -> None:
    controls = Controls(ai_config(), backend.sync())
    with pytest.raises(InvalidArgument):
        controls.block(IP, scope="everything")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        controls.block(IP, duration=-1)
    with pytest.raises(InvalidArgument, match="no limit named"):
        controls.set_limit(IP, "nope", 5)
    with pytest.raises(InvalidArgument):
        controls.set_limit(IP, "tpd", 1.5)
    with pytest.raises(InvalidArgument):
        controls.set_limit(IP, "rpm", "fast")


# -- overrides ----------------------------------------------------------------------------------
def quota_call(keys: CallerKeys, amount: int, cost: int, rid: str) -> ScriptCall:
    """One admit of a 1-limit token quota ``tpd`` of ``amount``, reserving ``cost`` exactly."""
    period = keys.period("d2099-01-01")
    tenant = tenant_controls("qm", "default", key_slot(keys.base))
    end_us = int((time.time() + 3600) * 1_000_000)
    return ScriptCall(
        "admit", (period, keys.ledger(period), keys.controls, tenant),
        ("", rid, 0, 1, "q", 1, "tpd", amount, end_us, cost, cost, "a", 3, 4),
    )  # fmt: skip


def test_an_override_raises_a_quota_by_exactly_its_difference(backend: Any) -> None:
    cfg = plain_config(TokenQuota(tokens=1000, name="tpd"))
    store, controls = backend.sync(), Controls(cfg, backend.sync())
    keys = CallerKeys("qm", "default", IP)
    assert store.run(quota_call(keys, 1000, 1000, "r1"))[0] == 1
    assert store.run(quota_call(keys, 1000, 1, "r2"))[0] == 0  # spent
    o = controls.set_limit(IP, "tpd", 1500)
    assert (o.kind, o.value, o.p1, o.until) == ("token_quota", 1500.0, 1500, None)
    denied = store.run(quota_call(keys, 1000, 501, "r3"))  # 500 more, not 501
    assert denied[0] == 0 and list(denied[-3:]) == [1, 1500, denied[-1]]
    assert store.run(quota_call(keys, 1000, 500, "r4"))[0] == 1
    assert store.run(quota_call(keys, 1000, 1, "r5"))[0] == 0
    assert controls.unset_limit(IP, "tpd") is True
    assert controls.unset_limit(IP, "tpd") is False
    assert controls.show(IP).overrides == ()


def test_an_override_lowers_a_rate_and_the_headers_say_so(backend: Any) -> None:
    cfg = plain_config(RequestRate(rate="100/minute", name="rpm"))
    h = Harness.build("asgi", backend, cfg)
    controls = Controls(cfg, backend.sync())
    assert h.request().headers["ratelimit-policy"] == '"rpm";q=100;w=60'
    controls.set_limit(IP, "rpm", "2/minute", burst=2)
    statuses = [h.request() for _ in range(3)]
    # the bucket keeps its state: the first request's 0.6 s of debt leaves room for one of the
    # new 30 s intervals in the 60 s burst, not two
    assert [r.status for r in statuses] == [200, 429, 429]
    assert statuses[0].headers["ratelimit-policy"] == '"rpm";q=2;w=60'
    assert h.request(client_ip="198.51.100.1").status == 200  # others keep the plan's rate
    [o] = controls.show(IP).overrides
    assert o.name == "rpm" and o.burst == 2 and abs(o.value - 2 / 60) < 1e-9
    h.close()


def test_an_override_of_a_budget_shows_in_remaining_and_expires(backend: Any) -> None:
    cfg = ai_config()
    h = AIHarness("wsgi", backend, cfg)
    controls = Controls(cfg, backend.sync())
    assert h.remaining()["usd"] == 100_000_000
    controls.set_limit(AI_IP, "usd", 250, expires=0.6)
    assert h.remaining()["usd"] == 250_000_000
    r = h.post(chat(max_tokens=10))
    assert r.status == 200
    assert '"usd";q=250000000' in r.headers["ratelimit-policy"]
    time.sleep(0.8)
    assert 0 < h.remaining()["usd"] < 100_000_000  # the plan's budget, less what was spent
    assert '"usd";q=100000000' in h.post(chat(max_tokens=10)).headers["ratelimit-policy"]
    assert controls.show(AI_IP).overrides == ()
    h.close()


def test_a_quota_override_is_what_the_settled_request_counts_against(backend: Any) -> None:
    # the hold carries the operator's number, so settle and the hard stop use it too
    cfg = ai_config()
    controls = Controls(cfg, backend.sync())
    controls.set_limit(AI_IP, "tpd", 5000)
    h = AIHarness("wsgi", backend, cfg)
    r = h.post(chat(max_tokens=10, x_prompt=100, x_completion=10))
    assert r.status == 200 and h.remaining()["tpd"] == 5000 - 110
    h.close()


# -- the scripts against their twins ------------------------------------------------------------
NOW = 1_900_000_000_000_000


def _control(key: str, op: str, field: str = "", value: str = "", life: int = 0, at: int = 0,
             now: int = NOW) -> ScriptCall:  # fmt: skip
    return ScriptCall("control", (key,), (str(now), op, field, value, life, at))


def test_the_admit_and_control_twins_agree_with_the_lua(twin_backends: Any) -> None:
    keys = CallerKeys("qm", "acme", "alice")
    tkey = tenant_controls("qm", "acme", key_slot(keys.base))
    period = keys.period("d2030-01-01")

    def admit(now: int, ai: str, rid: str, cost: int = 10) -> ScriptCall:
        return ScriptCall(
            "admit", (keys.buckets, keys.concurrency("inflight"), period, keys.ledger(period),
                      keys.controls, tkey),
            (str(now), rid, 1_000_000, 3,
             "b", 1, "rpm", 1_000_000, 5_000_000, 1, 1,
             "c", 2, "inflight", 2, 1_000_000, 1, 1,
             "q", 3, "tpd", 100, NOW + 3_600_000_000, cost, cost,
             ai, 5, 6),
        )  # fmt: skip

    s = 1_000_000  # one second
    steps = [
        admit(NOW, "a", "r0"),
        _control(keys.controls, "set", "o|rpm", "500000|1000000", 0, 0),
        _control(keys.controls, "set", "o|tpd", "150|", 2 * s),
        _control(keys.controls, "set", "o|inflight", "1|", 0, NOW + s + 3),
        _control(keys.controls, "set", "o|junk", "x|y"),  # not a number: ignored
        admit(NOW + s, "a", "r1", 130),  # 140 of 150: over the plan's 100
        admit(NOW + s + 2, "a", "r2", 5),  # inflight overridden to 1: r1 holds it
        _control(keys.controls, "get"),
        _control(keys.controls, "set", "block", "ai|abuse|with a pipe", 0, NOW + 5 * s),
        admit(NOW + s + 3, "a", "r3"),
        admit(NOW + s + 3, "", "r4"),  # AI-only block: a plain route passes
        _control(tkey, "set", "block", "all|tenant says no", s, now=NOW + s + 4),
        admit(NOW + s + 5, "", "r5"),
        admit(NOW + 2 * s + 5, "", "r6"),  # the tenant block has ended
        admit(NOW + 3 * s, "a", "r7", 5),  # the caller's AI-only block has not
        _control(keys.controls, "del", "block", now=NOW + 3 * s),
        admit(NOW + 3 * s + 1, "a", "r8", 5),
        _control(keys.controls, "get", now=NOW + 3 * s + 1),
        _control(keys.controls, "del", "o|nothing", now=NOW + 3 * s + 1),
        _control(keys.controls, "set", "block", "all|", 0, NOW + 4 * s, now=NOW + 3 * s + 2),
        _control(keys.controls, "get", now=NOW + 20 * s),
    ]
    state = twin_backends()
    replies: dict[str, list[Any]] = {}
    for name in ("memory", "fakeredis", "real"):
        replies[name] = [_plain(state[name].run(call)) for call in steps]
    assert replies["memory"] == replies["real"]
    assert replies["fakeredis"] == replies["real"]
    r = replies["real"]
    assert r[5][:2] == [1, 0]
    assert r[5][-9:] == [1, 500_000, 1_000_000, 2, 1, 1_000_000, 3, 150, NOW + 3_600_000_000]
    assert r[6][:2] == [0, 2]  # the one slot is taken
    assert r[9] == [0, -1, 4 * s - 3, NOW + s + 3, b"abuse|with a pipe", b"caller"]
    assert r[10][:2] == [1, 0]
    assert r[12] == [0, -1, s - 1, NOW + s + 5, b"tenant says no", b"tenant"]
    assert r[13][:2] == [1, 0] and r[14][:2] == [0, -1] and r[16][:2] == [1, 0]
    # the lapsed are left out (o|junk has no end: admit ignores its value, it is not a number)
    assert r[20] == [NOW + 20 * s, b"o|rpm", b"0|500000|1000000", b"o|junk", b"0|x|y"]


def _plain(value: Any) -> Any:
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, str):
        return value.encode()
    return value


# -- across processes: the CLI, real redis, uvicorn with 2 workers ------------------------------
def cli(*args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "quota_middleware.cli", *args],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == code, (done.stdout, done.stderr)
    return done


def test_a_cli_block_stops_the_next_request_on_every_uvicorn_worker(redis_server: Any) -> None:
    import redis

    url = redis_server.url
    redis.Redis.from_url(url).flushall()
    port, proc = serve_app("uvicorn", "exact_app", {"QM_TEST_URL": url, "QM_TEST_BURST": "10000"},
                           workers=2)  # fmt: skip
    try:

        def statuses(n: int) -> list[int]:
            # a new connection each: uvicorn's workers share the socket, so both serve some
            return [httpx.get(f"http://127.0.0.1:{port}/x", headers={"connection": "close"})
                    .status_code for _ in range(n)]  # fmt: skip

        assert set(statuses(6)) == {200}
        out = cli("limits", "block", "127.0.0.1", "--reason", "stolen key", "--redis-url", url)
        assert "Blocked caller 127.0.0.1" in out.stdout
        r = httpx.get(f"http://127.0.0.1:{port}/x")
        assert r.status_code == 403 and r.json()["error"]["reason"] == "stolen key"
        assert set(statuses(12)) == {403}
        shown = cli("limits", "show", "127.0.0.1", "--json", "--redis-url", url).stdout
        assert '"reason": "stolen key"' in shown
        cli("limits", "unblock", "127.0.0.1", "--redis-url", url)
        assert set(statuses(6)) == {200}
        cli("limits", "unblock", "127.0.0.1", "--redis-url", url, code=1)
    finally:
        stop_process(proc)


def test_the_cli_sets_and_unsets_an_override(redis_server: Any, tmp_path: Any) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[plans.p]\nlimits = [{ type = "token_quota", tokens = 1000, name = "tpd" }]\n'
    )
    url = redis_server.url
    base = ("--policy", str(policy), "--redis-url", url)
    out = cli("limits", "set", "alice", "tpd", "5000", "--expires", "1h", *base)
    assert "Limit tpd of alice is now 5,000" in out.stdout
    assert "override tpd (token_quota) = 5,000" in cli("limits", "show", "alice", *base).stdout
    cli("limits", "set", "alice", "nope", "1", *base, code=2)
    cli("limits", "block", *base, code=2)  # neither a caller nor --whole-tenant
    cli("limits", "unset", "alice", "tpd", *base)
    cli("limits", "unset", "alice", "tpd", *base, code=1)


@pytest.mark.parametrize("backend_name", ["redis", "cluster"], indirect=True)
def test_a_tenant_block_writes_every_slots_copy_in_pipelined_passes(backend: Any) -> None:
    """The 16,384 copies go out per connection (one server) or per primary (a cluster), not
    one round trip each: every copy is there, with one end, and unblock removes them all."""
    from quota_middleware.base._keys import SLOTS

    sync = backend.sync()
    controls = Controls(ai_config(), sync)
    controls.block(None, tenant="bulk", reason="abuse", duration=600)
    keys = [tenant_controls("qm", "bulk", slot) for slot in range(SLOTS)]
    client = sync.client
    values = {client.hget(keys[i], "block") for i in range(0, SLOTS, 997)}
    assert len(values) == 1 and values.pop().endswith(b"|all|abuse")
    ends = sync.run_many([ScriptCall("control", (k,), ("", "get", "", "", 0, 0)) for k in keys])
    assert len(ends) == SLOTS and not any(isinstance(e, Exception) for e in ends)
    assert controls.unblock(None, tenant="bulk") is True
    assert all(client.exists(keys[i]) == 0 for i in range(0, SLOTS, 997))
    assert controls.unblock(None, tenant="bulk") is False
