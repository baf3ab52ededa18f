"""API keys: the format and checksum, the key store (memory, fakeredis+Lua), the request cache."""

from __future__ import annotations

import re
from collections.abc import Generator, Iterator
from typing import Any

import pytest

from quota_middleware.backends.memory import MemoryBackend
from quota_middleware.base._scripts import SCRIPT_NAMES, ScriptCall, source
from quota_middleware.errors import ConfigurationError, InvalidCredentials, StorageError
from quota_middleware.identity._apikeys import ApiKeyConfig, ApiKeyVerifier, KeyMatch
from quota_middleware.identity._keyformat import (
    StaticKey,
    generate_key,
    index_key,
    key_digest,
    lookup_call,
    parse_key,
    record_key,
)
from quota_middleware.identity._keystore import KeyStore

T0 = 1_800_000_000.0


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def drive(gen: Generator[ScriptCall, Any, Any], backend: Any) -> tuple[Any, list[ScriptCall]]:
    """Run a sans-IO flow against ``backend``; returns its result and the calls it made."""
    calls: list[ScriptCall] = []
    try:
        call = next(gen)
        while True:
            calls.append(call)
            call = gen.send(backend.run(call))
    except StopIteration as stop:
        return stop.value, calls


@pytest.fixture(params=["memory", "fakeredis"])
def backend(request: pytest.FixtureRequest) -> Iterator[Any]:
    if request.param == "memory":
        yield MemoryBackend()
        return
    fakeredis = pytest.importorskip("fakeredis")
    pytest.importorskip("lupa")
    from quota_middleware.backends.redis import SyncRedisBackend

    client = fakeredis.FakeRedis()
    yield SyncRedisBackend(client)
    client.flushall()


# -- key format -------------------------------------------------------------------------------


def test_generated_key_shape_and_parse() -> None:
    key = generate_key("qm")
    assert re.fullmatch(r"qm_[0-9A-Za-z]{12}_[0-9A-Za-z]{38}", key)
    assert parse_key(key, "qm") == key[3:15]
    assert generate_key() != generate_key()
    assert parse_key(generate_key("acme"), "acme") is not None


@pytest.mark.parametrize(
    "mangle",
    [
        lambda k: k[:-1] + ("A" if k[-1] != "A" else "B"),  # checksum
        lambda k: k[:20] + ("x" if k[20] != "x" else "y") + k[21:],  # secret
        lambda k: "qx" + k[2:],  # prefix
        lambda k: k + "a",
        lambda k: k[:-1],
        lambda k: k.replace("_", "-"),
        lambda k: k[:-1] + "é",
        lambda k: k + "\n",
        lambda k: "",
    ],
)
def test_parse_refuses_malformed(mangle: Any) -> None:
    assert parse_key(mangle(generate_key("qm")), "qm") is None


def test_digest_and_key_names() -> None:
    assert key_digest("qm_x") == key_digest("qm_x")
    assert len(key_digest("qm_x")) == 64
    assert record_key("qm", "abcDEF123456") == "qm:key:{abcDEF123456}"
    assert index_key("qm") == "qm:keys"
    assert lookup_call("qm", "abcDEF123456").keys == ("qm:key:{abcDEF123456}",)


def test_scripts_registered_and_documented() -> None:
    for name in ("key_lookup", "key_put", "key_revoke", "key_list"):
        assert name in SCRIPT_NAMES
        head = source(name).split("\n\n")[0]
        assert "KEYS[1]" in head and "ARGV[1]" in head and "returns" in head


# -- the store --------------------------------------------------------------------------------


def test_create_get_list_revoke(backend: Any) -> None:
    store = KeyStore(backend)
    key, rec = store.create("svc-a", "pro", tenant="acme")
    assert parse_key(key) == rec.key_id
    assert rec.caller == "svc-a" and rec.plan == "pro" and rec.tenant == "acme"
    assert rec.active and not rec.revoked and rec.expires is None
    assert rec.digest == key_digest(key)
    assert key not in repr(rec) and rec.digest not in repr(rec)

    got = store.get(rec.key_id)
    assert got == rec

    key2, rec2 = store.create("svc-b")
    assert rec2.plan is None and rec2.tenant == "default"
    assert [r.key_id for r in store.list()] == sorted(
        [rec.key_id, rec2.key_id],
        key=lambda i: (store.get(i).created, i),  # type: ignore[union-attr]
    )
    assert [r.key_id for r in store.list("svc-b")] == [rec2.key_id]
    assert store.list("nobody") == []

    assert store.revoke(rec.key_id) is True
    assert store.revoke(rec.key_id) is False
    after = store.get(rec.key_id)
    assert after is not None and after.revoked and after.status == "revoked"
    assert len(store.list()) == 2  # revoked keys stay listed until their retention ends


def test_unknown_and_invalid_ids(backend: Any) -> None:
    store = KeyStore(backend)
    assert store.get("AAAAAAAAAAAA") is None
    assert store.get("bad{id}") is None
    assert store.revoke("AAAAAAAAAAAA") is False
    assert store.revoke("x" * 100) is False
    with pytest.raises(ValueError):
        store.create("")
    with pytest.raises(ValueError):
        store.create("a", expires_in=0)


def test_expiry_uses_store_clock(backend: Any) -> None:
    clock = Clock(T0)
    store = KeyStore(backend, clock=clock)
    _, rec = store.create("svc", expires_in=60)
    assert rec.created == T0 and rec.expires == T0 + 60
    clock.t = T0 + 59
    assert store.get(rec.key_id).status == "active"  # type: ignore[union-attr]
    clock.t = T0 + 60
    assert store.get(rec.key_id).status == "expired"  # type: ignore[union-attr]


def test_expiry_on_real_time(backend: Any) -> None:
    import time

    store = KeyStore(backend)
    _, rec = store.create("svc", expires_in=0.05)
    time.sleep(0.08)
    got = store.get(rec.key_id)
    assert got is not None and got.status == "expired"


def test_list_prunes_dangling_index_entries(backend: Any) -> None:
    store = KeyStore(backend)
    _, rec = store.create("svc")
    backend.run(ScriptCall("key_list", (index_key("qm"),), ("add", "ZZZZZZZZZZZZ")))
    assert [r.key_id for r in store.list()] == [rec.key_id]
    ids = backend.run(ScriptCall("key_list", (index_key("qm"),), ("list",)))
    assert [i.decode() if isinstance(i, bytes) else i for i in ids] == [rec.key_id]


def test_put_never_overwrites(backend: Any) -> None:
    k = record_key("qm", "AAAAAAAAAAAA")
    args = ("", "a", "", "default", 0, "d" * 64, 1000)
    assert backend.run(ScriptCall("key_put", (k,), args))[0] == 1
    assert backend.run(ScriptCall("key_put", (k,), args)) == [0]


def _norm(v: Any) -> Any:
    if isinstance(v, list | tuple):
        return [_norm(x) for x in v]
    if isinstance(v, bytes):
        return v.decode()
    return str(v)


def test_lua_and_python_twins_agree() -> None:
    fakeredis = pytest.importorskip("fakeredis")
    pytest.importorskip("lupa")
    from quota_middleware.backends.redis import SyncRedisBackend

    now = int(T0 * 1_000_000)
    k1, k2 = record_key("qm", "AAAAAAAAAAAA"), record_key("qm", "BBBBBBBBBBBB")
    idx = index_key("qm")
    script = [
        ScriptCall("key_lookup", (k1,), (now,)),
        ScriptCall("key_put", (k1,), (now, "a", "pro", "t", 0, "d" * 64, 1000)),
        ScriptCall("key_put", (k2,), (now, "b", "", "default", 5_000_000, "e" * 64, 1000)),
        ScriptCall("key_put", (k1,), (now, "x", "", "default", 0, "f" * 64, 1000)),
        ScriptCall("key_lookup", (k1,), (now,)),
        ScriptCall("key_lookup", (k2,), (now + 4_999_999,)),
        ScriptCall("key_lookup", (k2,), (now + 5_000_000,)),
        ScriptCall("key_revoke", (k1,), (now + 1, 1000)),
        ScriptCall("key_revoke", (k1,), (now + 2, 1000)),
        ScriptCall("key_lookup", (k1,), (now + 3,)),
        ScriptCall("key_list", (idx,), ("add", "BBBBBBBBBBBB", "AAAAAAAAAAAA", "AAAAAAAAAAAA")),
        ScriptCall("key_list", (idx,), ("list",)),
        ScriptCall("key_list", (idx,), ("remove", "AAAAAAAAAAAA", "CCCCCCCCCCCC")),
        ScriptCall("key_list", (idx,), ("list",)),
    ]
    mem, red = MemoryBackend(), SyncRedisBackend(fakeredis.FakeRedis())
    for call in script:
        assert _norm(mem.run(call)) == _norm(red.run(call)), call


# -- config -----------------------------------------------------------------------------------


def test_static_keys_are_kept_as_digests() -> None:
    key = generate_key()
    cfg = ApiKeyConfig(static={key: {"caller": "svc-a", "plan": "pro"}})
    assert cfg.store == "static"
    assert list(cfg.static) == [f"sha256:{key_digest(key)}"]
    assert key not in repr(cfg)
    again = ApiKeyConfig(static=cfg.static)  # digests are accepted as they are
    assert again.static == cfg.static
    assert cfg.static[f"sha256:{key_digest(key)}"] == StaticKey("svc-a", "pro")
    assert ApiKeyConfig(static={key_digest(key): "svc"}).static  # bare hex and bare caller


def test_config_errors_name_the_field() -> None:
    key = generate_key()
    bad = key[:-1] + ("A" if key[-1] != "A" else "B")
    with pytest.raises(ConfigurationError) as e:
        ApiKeyConfig(static={bad: {"caller": "a"}})
    assert e.value.field.startswith("identity.api_keys.static")
    assert bad[20:] not in str(e.value)  # never echo the secret part
    cases = [
        ({"static": {key: {"caller": "a", "role": "x"}}}, "identity.api_keys.static[...].role"),
        ({"static": {key: {"plan": "x"}}}, "identity.api_keys.static[...].caller"),
        ({"prefix": "q_m"}, "identity.api_keys.prefix"),
        ({"header": "X Bad"}, "identity.api_keys.header"),
        ({"store": "sql"}, "identity.api_keys.store"),
        ({"cache_ttl": -1}, "identity.api_keys.cache_ttl"),
        ({"colour": "red"}, "identity.api_keys.colour"),
    ]
    for d, field in cases:
        with pytest.raises(ConfigurationError) as e:
            ApiKeyConfig.from_dict(d)
        assert e.value.field == field


# -- request-time verification ----------------------------------------------------------------


def _verifier(**kw: Any) -> tuple[ApiKeyVerifier, Clock]:
    clock = Clock()
    return ApiKeyVerifier(ApiKeyConfig(**kw), clock=clock), clock


def test_malformed_key_refused_without_store_call() -> None:
    v, _ = _verifier()
    bad = generate_key()[:-1] + "0"
    for key in (bad if parse_key(bad) is None else "qm_nope", "qm_", "x" * 10_000, "qm_é"):
        gen = v.verify(key)
        with pytest.raises(InvalidCredentials) as e:
            next(gen)  # raises before its first yield: no store round trip
        assert e.value.scheme == "ApiKey"


def test_static_key_no_store_call() -> None:
    key = generate_key()
    v, _ = _verifier(static={key: {"caller": "svc", "plan": "pro", "tenant": "t"}})
    m, calls = drive(v.verify(key), MemoryBackend())
    assert calls == [] and m == KeyMatch(parse_key(key) or "", "svc", "pro", "t")
    with pytest.raises(InvalidCredentials):
        drive(v.verify(generate_key()), MemoryBackend())


def test_store_lookup_is_cached_for_ttl_and_revocation_delay() -> None:
    backend = MemoryBackend()
    key, rec = KeyStore(backend).create("svc", "pro")
    v, clock = _verifier(cache_ttl=10)
    m, calls = drive(v.verify(key), backend)
    assert m.caller == "svc" and m.plan == "pro" and len(calls) == 1
    KeyStore(backend).revoke(rec.key_id)
    clock.t += 9.9
    _, calls = drive(v.verify(key), backend)
    assert calls == []  # still cached: revocation takes up to cache_ttl
    clock.t += 0.2
    with pytest.raises(InvalidCredentials):
        drive(v.verify(key), backend)


def test_unknown_key_is_negative_cached_briefly() -> None:
    backend = MemoryBackend()
    v, clock = _verifier(negative_cache_ttl=2)
    key = generate_key()
    seen: list[ScriptCall] = []

    class Spy:
        def run(self, call: ScriptCall) -> Any:
            seen.append(call)
            return backend.run(call)

    for _ in range(3):
        with pytest.raises(InvalidCredentials):
            drive(v.verify(key), Spy())
    assert len(seen) == 1
    clock.t += 2.1
    with pytest.raises(InvalidCredentials):
        drive(v.verify(key), Spy())
    assert len(seen) == 2


def test_wrong_digest_is_refused() -> None:
    backend = MemoryBackend()
    key, rec = KeyStore(backend).create("svc")
    # Same id and a valid checksum, different secret: the stored digest does not match.
    body = f"qm_{rec.key_id}_{'a' * 32}"
    from quota_middleware.identity._keyformat import _checksum

    forged = body + _checksum(body)
    assert parse_key(forged) == rec.key_id
    v, _ = _verifier()
    with pytest.raises(InvalidCredentials):
        drive(v.verify(forged), backend)
    assert drive(v.verify(key), backend)[0].caller == "svc"


def test_expiring_key_cached_no_longer_than_its_expiry() -> None:
    backend = MemoryBackend()
    clock = Clock()
    key, _ = KeyStore(backend, clock=clock).create("svc", expires_in=3)
    v = ApiKeyVerifier(ApiKeyConfig(cache_ttl=10), clock=clock)

    class AtClock:
        def run(self, call: ScriptCall) -> Any:
            call = ScriptCall(call.name, call.keys, (int(clock.t * 1_000_000),))
            return backend.run(call)

    assert drive(v.verify(key), AtClock())[0].caller == "svc"
    clock.t += 3
    with pytest.raises(InvalidCredentials):
        drive(v.verify(key), AtClock())


def test_storage_error_propagates_and_is_not_cached() -> None:
    backend = MemoryBackend()
    key, _ = KeyStore(backend).create("svc")
    v, _ = _verifier()
    gen = v.verify(key)
    call = next(gen)
    assert call.name == "key_lookup"
    with pytest.raises(StorageError):
        gen.throw(StorageError("down"))
    assert drive(v.verify(key), backend)[1]  # looked up again


def test_through_fakeredis_backend() -> None:
    fakeredis = pytest.importorskip("fakeredis")
    pytest.importorskip("lupa")
    from quota_middleware.backends.redis import SyncRedisBackend

    backend = SyncRedisBackend(fakeredis.FakeRedis())
    key, rec = KeyStore(backend, prefix="app").create("svc", "pro")
    v = ApiKeyVerifier(ApiKeyConfig(), prefix="app")
    m, calls = drive(v.verify(key), backend)
    assert m.key_id == rec.key_id and calls[0].keys == (f"app:key:{{{rec.key_id}}}",)


# -- rotation (key_expire) ----------------------------------------------------------------------


def test_rotate_keeps_owner_and_expiry_and_gives_the_old_key_a_grace(backend: Any) -> None:
    clock = Clock(T0)
    store = KeyStore(backend, clock=clock)
    old_key, old = store.create("svc", "pro", tenant="acme", expires_in=3600)
    clock.t = T0 + 100
    new_key, new = store.rotate(old.key_id, grace=60)
    assert new_key != old_key and parse_key(new_key) == new.key_id != old.key_id
    assert (new.caller, new.plan, new.tenant) == ("svc", "pro", "acme")
    assert new.expires == pytest.approx(T0 + 3600)  # the same remaining lifetime
    assert store.get(old.key_id).expires == T0 + 160  # type: ignore[union-attr]
    clock.t = T0 + 159
    assert store.get(old.key_id).status == "active"  # type: ignore[union-attr]
    clock.t = T0 + 160
    assert store.get(old.key_id).status == "expired"  # type: ignore[union-attr]
    assert store.get(new.key_id).status == "active"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="expired"):
        store.rotate(old.key_id, grace=10)


def test_rotate_never_extends_and_refuses_dead_keys(backend: Any) -> None:
    clock = Clock(T0)
    store = KeyStore(backend, clock=clock)
    _, short = store.create("svc", expires_in=30)
    _, new = store.rotate(short.key_id, grace=3600)  # grace beyond the key's own end
    assert store.get(short.key_id).expires == T0 + 30  # type: ignore[union-attr]
    assert new.expires == pytest.approx(T0 + 30)
    _, forever = store.create("svc")
    _, new2 = store.rotate(forever.key_id, grace=0)
    assert new2.expires is None
    assert store.get(forever.key_id).status == "expired"  # type: ignore[union-attr]
    store.revoke(new2.key_id)
    with pytest.raises(ValueError, match="revoked"):
        store.rotate(new2.key_id, grace=1)
    with pytest.raises(ValueError, match="no API key"):
        store.rotate("AAAAAAAAAAAA", grace=1)
    with pytest.raises(ValueError, match="grace"):
        store.rotate(new.key_id, grace=-1)
    assert sum(r.caller == "svc" for r in store.list()) == 4  # no stray key from the refusals


def test_key_expire_twins_agree() -> None:
    fakeredis = pytest.importorskip("fakeredis")
    pytest.importorskip("lupa")
    from quota_middleware.backends.redis import SyncRedisBackend

    assert "KEYS[1]" in source("key_expire") and "returns" in source("key_expire")
    now = int(T0 * 1_000_000)
    k1, k2, k3 = (record_key("qm", c * 12) for c in "ABC")
    script = [
        ScriptCall("key_expire", (k1,), (now, 5_000_000, 1000)),
        ScriptCall("key_put", (k1,), (now, "a", "pro", "t", 0, "d" * 64, 1000)),
        ScriptCall("key_put", (k2,), (now, "b", "", "default", 5_000_000, "e" * 64, 1000)),
        ScriptCall("key_put", (k3,), (now, "c", "", "default", 0, "f" * 64, 1000)),
        ScriptCall("key_expire", (k1,), (now + 1, 2_000_000, 1000)),
        ScriptCall("key_expire", (k1,), (now + 2, 9_000_000, 1000)),  # never extends
        ScriptCall("key_lookup", (k1,), (now + 2_000_000,)),
        ScriptCall("key_lookup", (k1,), (now + 2_000_001,)),
        ScriptCall("key_expire", (k1,), (now + 2_000_001, 1, 1000)),
        ScriptCall("key_expire", (k2,), (now, 1_000_000, 1000)),
        ScriptCall("key_lookup", (k2,), (now + 999_999,)),
        ScriptCall("key_revoke", (k3,), (now, 1000)),
        ScriptCall("key_expire", (k3,), (now, 1_000_000, 1000)),
    ]
    mem, red = MemoryBackend(), SyncRedisBackend(fakeredis.FakeRedis())
    for call in script:
        assert _norm(mem.run(call)) == _norm(red.run(call)), call
    for k in (k1, k2, k3):
        assert _norm(sorted(mem.store.hgetall(k).items())) == _norm(
            sorted((f.decode(), v) for f, v in red.client.hgetall(k).items())
        ), k
