"""Identification: real JWTs (HS256, RS256, JWKS), API keys, custom resolvers and client IPs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jwt.algorithms import RSAAlgorithm

from quota_middleware.backends.memory import MemoryBackend
from quota_middleware.base._request import Headers, RequestInfo
from quota_middleware.base._scripts import ScriptCall
from quota_middleware.errors import (
    ConfigurationError,
    IdentificationError,
    InvalidCredentials,
    MissingCredentials,
    StorageError,
)
from quota_middleware.identity import ApiKeyConfig, KeyStore, generate_key
from quota_middleware.identity._identifier import (
    Caller,
    Identifier,
    IdentityConfig,
    JWTConfig,
    parse_ip,
)

SECRET = "s3cret-" + "x" * 40


def req(client: str | None = "203.0.113.9", **headers: str) -> RequestInfo:
    items = [(k.replace("_", "-"), v) for k, v in headers.items()]
    return RequestInfo("GET", "/", Headers(items), client=client)


def drive(gen: Generator[ScriptCall, Any, Caller], backend: Any = None) -> Caller:
    try:
        call = next(gen)
        while True:
            if backend is None:
                raise AssertionError(f"unexpected store call {call}")
            call = gen.send(backend.run(call))
    except StopIteration as stop:
        result: Caller = stop.value
        return result


def ident(info: RequestInfo, ider: Identifier, backend: Any = None) -> Caller:
    return drive(ider.identify(info), backend)


def hs(claims: dict[str, Any], key: str | bytes = SECRET, **kw: Any) -> str:
    base = {"sub": "alice", "exp": int(time.time()) + 600}
    return jwt.encode({**base, **claims}, key, algorithm="HS256", **kw)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def rsa_keys() -> list[rsa.RSAPrivateKey]:
    return [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(3)]


def pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def rs(key: rsa.RSAPrivateKey, claims: dict[str, Any] | None = None, **kw: Any) -> str:
    base = {"sub": "bob", "exp": int(time.time()) + 600}
    return jwt.encode({**base, **(claims or {})}, key, algorithm="RS256", **kw)


def jwks(keys: list[rsa.RSAPrivateKey], kids: list[str]) -> dict[str, Any]:
    out = []
    for k, kid in zip(keys, kids, strict=True):
        d = RSAAlgorithm.to_jwk(k.public_key(), as_dict=True)
        out.append({**d, "kid": kid, "use": "sig"})
    return {"keys": out}


def hs_identifier(**kw: Any) -> Identifier:
    cfg = IdentityConfig(jwt=JWTConfig(algorithms=["HS256"], secret=SECRET, **kw))
    return Identifier(cfg, plans={"free", "pro"})


# -- JWT --------------------------------------------------------------------------------------


def test_hs256_valid_with_claim_mapping() -> None:
    ider = Identifier(
        IdentityConfig(
            jwt=JWTConfig(
                algorithms=["HS256"], secret=SECRET, tenant_claim="org", plan_claim="tier"
            )
        ),
        plans={"pro"},
    )
    c = ident(req(**bearer(hs({"tier": "pro", "org": "acme"}))), ider)
    assert c == Caller("alice", "pro", "acme", source="jwt")
    c = ident(req(**bearer(hs({"tier": "platinum"}))), ider)
    assert c.plan is None and c.tenant == "default"  # unknown plan -> default plan


@pytest.mark.parametrize(
    ("token", "why"),
    [
        (hs({"exp": int(time.time()) - 10}), "expired"),
        # a day ahead: the token is made when tests are collected, minutes before it is used
        (hs({"nbf": int(time.time()) + 86400}), "not yet valid"),
        (hs({}, key="other-secret-" + "y" * 40), "signature"),
        (hs({"exp": None}), "exp"),
        (hs({"exp": "soon"}), ""),
        (jwt.encode({"sub": "a", "exp": int(time.time()) + 60}, None, algorithm="none"), ""),
        (hs({"sub": ""}), "sub"),
        (hs({"sub": ["a"]}), "sub"),
        (hs({"sub": "a\nb"}), "sub"),
        (hs({"sub": 42}), "sub"),
        (hs({}, headers={"typ": 1, "alg": "HS256", "crit": ["zz"]}), ""),
        ("abc", "malformed"),
        ("a.b.c", "malformed"),
        ("eyJhbGciOiJIUzI1NiJ9..", "malformed"),
        ("é.é.é", "malformed"),
        ("x" * 9000, "too long"),
        (hs({"pad": "p" * 9000}), "too long"),
    ],
)
def test_bad_tokens_are_invalid_credentials(token: str, why: str) -> None:
    with pytest.raises(InvalidCredentials) as e:
        ident(req(**bearer(token)), hs_identifier())
    assert why in str(e.value)
    assert e.value.scheme == "Bearer"


def test_missing_exp_and_claims() -> None:
    token = jwt.encode({"sub": "a"}, SECRET, algorithm="HS256")
    with pytest.raises(InvalidCredentials, match="exp"):
        ident(req(**bearer(token)), hs_identifier())
    assert ident(req(**bearer(token)), hs_identifier(required_claims=[])).id == "a"


def test_leeway() -> None:
    token = hs({"exp": int(time.time()) - 10})
    assert ident(req(**bearer(token)), hs_identifier(leeway=30)).id == "alice"


def test_audience_and_issuer() -> None:
    ider = hs_identifier(audience="my-api", issuer=["https://a", "https://b"])
    assert ident(req(**bearer(hs({"aud": "my-api", "iss": "https://b"}))), ider).id == "alice"
    for claims in (
        {"aud": "other", "iss": "https://a"},
        {"aud": "my-api", "iss": "https://evil"},
        {"iss": "https://a"},
        {"aud": "my-api"},
    ):
        with pytest.raises(InvalidCredentials):
            ident(req(**bearer(hs(claims))), ider)


def test_rs256_public_key_and_key_confusion(rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    public = pem(rsa_keys[0])
    ider = Identifier(IdentityConfig(jwt=JWTConfig(algorithms=["RS256"], public_key=public)))
    assert ident(req(**bearer(rs(rsa_keys[0]))), ider).id == "bob"
    with pytest.raises(InvalidCredentials):
        ident(req(**bearer(rs(rsa_keys[1]))), ider)
    # The classic attack: HS256 "signed" with the public key PEM as the HMAC secret.
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()  # noqa: E731
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": "mallory", "exp": int(time.time()) + 600}).encode())
    sig = b64(hmac.new(public, f"{head}.{body}".encode(), hashlib.sha256).digest())
    with pytest.raises(InvalidCredentials, match="algorithm"):
        ident(req(**bearer(f"{head}.{body}.{sig}")), ider)


def test_algorithm_key_family_checked_at_construction(rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    public = pem(rsa_keys[0])
    private = rsa_keys[0].private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cases: list[tuple[dict[str, Any], str]] = [
        ({"algorithms": ["HS256"], "public_key": public}, "identity.jwt.algorithms"),
        ({"algorithms": ["RS256", "HS256"], "public_key": public}, "identity.jwt.algorithms"),
        ({"algorithms": ["RS256"], "secret": SECRET}, "identity.jwt.algorithms"),
        ({"algorithms": ["HS256"], "secret": public}, "identity.jwt.secret"),
        ({"algorithms": ["none"], "secret": SECRET}, "identity.jwt.algorithms"),
        ({"algorithms": ["HS256", "NONE"], "secret": SECRET}, "identity.jwt.algorithms"),
        ({"algorithms": [], "secret": SECRET}, "identity.jwt.algorithms"),
        ({"algorithms": "HS256", "secret": SECRET}, "identity.jwt.algorithms"),
        ({"algorithms": ["XS1"], "secret": SECRET}, "identity.jwt.algorithms"),
        ({"algorithms": ["HS256"], "secret": "short"}, "identity.jwt.secret"),
        ({"algorithms": ["HS256"]}, "identity.jwt"),
        ({"algorithms": ["HS256"], "secret": SECRET, "public_key": public}, "identity.jwt"),
        ({"algorithms": ["RS256"], "public_key": private}, "identity.jwt.public_key"),
        ({"algorithms": ["RS256"], "public_key": "junk"}, "identity.jwt.public_key"),
        ({"algorithms": ["HS256"], "jwks": jwks(rsa_keys[:1], ["a"])}, "identity.jwt.algorithms"),
        (
            {"algorithms": ["RS256"], "jwks": {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}},
            "identity.jwt.jwks.keys[0]",
        ),
        ({"algorithms": ["RS256"], "jwks": "{not json"}, "identity.jwt.jwks"),
        ({"algorithms": ["RS256"], "jwks": {"keys": []}}, "identity.jwt.jwks"),
        ({"algorithms": ["HS256"], "secret": SECRET, "leeway": -1}, "identity.jwt.leeway"),
    ]
    for kw, field in cases:
        with pytest.raises(ConfigurationError) as e:
            JWTConfig(**kw)
        assert e.value.field == field, kw


def test_jwks_two_kids(rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    doc = jwks(rsa_keys[:2], ["k1", "k2"])
    ider = Identifier(IdentityConfig(jwt=JWTConfig(algorithms=["RS256", "PS256"], jwks=doc)))
    assert ident(req(**bearer(rs(rsa_keys[0], headers={"kid": "k1"}))), ider).id == "bob"
    assert ident(req(**bearer(rs(rsa_keys[1], headers={"kid": "k2"}))), ider).id == "bob"
    ps = jwt.encode(
        {"sub": "p", "exp": int(time.time()) + 60}, rsa_keys[1], "PS256", headers={"kid": "k2"}
    )
    assert ident(req(**bearer(ps)), ider).id == "p"
    for token in (
        rs(rsa_keys[0], headers={"kid": "k2"}),  # wrong key for kid
        rs(rsa_keys[0], headers={"kid": "k9"}),  # unknown kid
        rs(rsa_keys[0]),  # no kid, several keys
        rs(rsa_keys[2], headers={"kid": "k1"}),
        jwt.encode({"sub": "x"}, SECRET, "HS256", headers={"kid": "k1"}),
    ):
        with pytest.raises(InvalidCredentials):
            ident(req(**bearer(token)), ider)


def test_jwks_alg_pinned_by_jwk(rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    doc = jwks(rsa_keys[:1], ["k1"])
    doc["keys"][0]["alg"] = "PS256"
    ider = Identifier(IdentityConfig(jwt=JWTConfig(algorithms=["RS256", "PS256"], jwks=doc)))
    with pytest.raises(InvalidCredentials):
        ident(req(**bearer(rs(rsa_keys[0], headers={"kid": "k1"}))), ider)
    # a single key without a kid in the token is fine
    ps = jwt.encode({"sub": "p", "exp": int(time.time()) + 60}, rsa_keys[0], "PS256")
    assert ident(req(**bearer(ps)), ider).id == "p"


def test_key_sources_from_env_and_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rsa_keys: list[rsa.RSAPrivateKey]
) -> None:
    monkeypatch.setenv("QM_TEST_JWT_SECRET", SECRET)
    cfg = IdentityConfig.from_dict(
        {"jwt": {"algorithms": ["HS256"], "secret_env": "QM_TEST_JWT_SECRET"}}
    )
    assert ident(req(**bearer(hs({}))), Identifier(cfg)).id == "alice"
    with pytest.raises(ConfigurationError) as e:
        IdentityConfig.from_dict({"jwt": {"algorithms": ["HS256"], "secret_env": "QM_NOPE_XYZ"}})
    assert e.value.field == "identity.jwt.secret_env"

    (tmp_path / "pub.pem").write_bytes(pem(rsa_keys[0]))
    (tmp_path / "jwks.json").write_text(json.dumps(jwks(rsa_keys[1:2], ["only"])))
    (tmp_path / "secret.txt").write_text(SECRET + "\n")
    for table, token in (
        ({"public_key_file": "pub.pem"}, rs(rsa_keys[0])),
        ({"jwks_file": "jwks.json"}, rs(rsa_keys[1], headers={"kid": "only"})),
    ):
        cfg = IdentityConfig.from_dict(
            {"jwt": {"algorithms": ["RS256"], **table}}, base_dir=tmp_path
        )
        assert ident(req(**bearer(token)), Identifier(cfg)).id == "bob"
    cfg = IdentityConfig.from_dict(
        {"jwt": {"algorithms": ["HS256"], "secret_file": "secret.txt"}}, base_dir=tmp_path
    )
    assert ident(req(**bearer(hs({}))), Identifier(cfg)).id == "alice"
    with pytest.raises(ConfigurationError) as e:
        IdentityConfig.from_dict(
            {"jwt": {"algorithms": ["RS256"], "jwks_file": "missing.json"}}, base_dir=tmp_path
        )
    assert e.value.field == "identity.jwt.jwks_file"


def test_secrets_never_in_repr(rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    cfg = IdentityConfig(jwt=JWTConfig(algorithms=["HS256"], secret=SECRET))
    assert SECRET not in repr(cfg) and "***" in repr(cfg)
    cfg = IdentityConfig(jwt=JWTConfig(algorithms=["RS256"], jwks=jwks(rsa_keys[:1], ["k"])))
    assert '"n"' not in repr(cfg) and "'n'" not in repr(cfg)


def test_verified_tokens_are_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [time.time()]
    cfg = IdentityConfig(jwt=JWTConfig(algorithms=["HS256"], secret=SECRET, cache_ttl=60))
    ider = Identifier(cfg, clock=lambda: now[0])
    calls = []
    real = Identifier._decode

    def counting(jc: JWTConfig, token: str) -> dict[str, Any]:
        calls.append(token)
        return real(jc, token)

    monkeypatch.setattr(Identifier, "_decode", staticmethod(counting))
    long_lived, short_lived = hs({}), hs({"exp": int(now[0]) + 5, "sub": "s"})
    for _ in range(3):
        ident(req(**bearer(long_lived)), ider)
        ident(req(**bearer(short_lived)), ider)
    assert len(calls) == 2
    now[0] += 10  # past the short token's exp, within the long one's TTL
    ident(req(**bearer(long_lived)), ider)
    ident(req(**bearer(short_lived)), ider)  # verified again (pyjwt's clock still accepts it)
    assert len(calls) == 3
    now[0] += 60
    ident(req(**bearer(long_lived)), ider)
    assert len(calls) == 4


# -- order, API keys, custom resolvers --------------------------------------------------------


def test_defaults_and_order_resolution() -> None:
    assert IdentityConfig().order == ("ip",)
    jc = JWTConfig(algorithms=["HS256"], secret=SECRET)
    full = IdentityConfig(jwt=jc, api_keys=ApiKeyConfig(), resolver=lambda i: None)
    assert full.order == ("jwt", "api_key", "custom", "ip")
    assert IdentityConfig(jwt=jc, anonymous="reject").order == ("jwt",)
    bad: list[tuple[dict[str, Any], str]] = [
        ({"order": ["jwt", "ip"]}, "identity.order"),
        ({"order": ["ip", "api_key"], "api_keys": ApiKeyConfig()}, "identity.order"),
        ({"order": ["ip", "ip"]}, "identity.order"),
        ({"order": ["password"]}, "identity.order"),
        ({"order": ["ip"], "anonymous": "reject"}, "identity.order"),
        ({"anonymous": "reject"}, "identity.order"),
        ({"anonymous": "maybe"}, "identity.anonymous"),
        ({"trusted_proxies": ["10.0.0.0/33"]}, "identity.trusted_proxies[0]"),
        ({"trusted_proxies": "10.0.0.0/8"}, "identity.trusted_proxies"),
    ]
    for kw, field in bad:
        with pytest.raises(ConfigurationError) as e:
            IdentityConfig(**kw)
        assert e.value.field == field, kw


def test_from_dict_unknown_keys_name_the_field() -> None:
    for d, field in (
        ({"bogus": 1}, "identity.bogus"),
        ({"jwt": {"algorithms": ["HS256"], "secret": SECRET, "algo": 1}}, "identity.jwt.algo"),
        ({"jwt": {"secret": SECRET}}, "identity.jwt.algorithms"),
        ({"api_keys": {"hedaer": "x"}}, "identity.api_keys.hedaer"),
        ({"jwt": "HS256"}, "identity.jwt"),
        ({"resolver": "no_such_module_qm:f"}, "identity.resolver"),
    ):
        with pytest.raises(ConfigurationError) as e:
            IdentityConfig.from_dict(d)
        assert e.value.field == field


def test_toml_shape() -> None:
    key = generate_key()
    cfg = IdentityConfig.from_dict(
        {
            "order": ["jwt", "api_key", "ip"],
            "anonymous": "ip",
            "trusted_proxies": ["10.0.0.0/8", "127.0.0.1/32"],
            "jwt": {
                "algorithms": ["HS256"],
                "secret": SECRET,
                "audience": "my-api",
                "issuer": "https://issuer",
                "leeway": 30,
                "subject_claim": "sub",
                "plan_claim": "plan",
                "tenant_claim": "org",
            },
            "api_keys": {
                "header": "X-API-Key",
                "prefix": "qm",
                "store": "redis",
                "cache_ttl": 10,
                "static": {key: {"caller": "svc-a", "plan": "pro"}},
            },
        }
    )
    ider = Identifier(cfg)
    assert ident(req(x_api_key=key), ider) == Caller(
        "svc-a", "pro", source="api_key", key_id=key[3:15]
    )


def test_bad_credentials_never_fall_through_to_ip() -> None:
    ider = Identifier(
        IdentityConfig(
            jwt=JWTConfig(algorithms=["HS256"], secret=SECRET),
            api_keys=ApiKeyConfig(store="static"),
        )
    )
    assert ident(req(), ider) == Caller("203.0.113.9")
    assert ident(req(authorization="Basic dXNlcjpwdw=="), ider).source == "ip"
    with pytest.raises(InvalidCredentials) as e:
        ident(req(**bearer("nope")), ider)
    assert e.value.scheme == "Bearer"
    with pytest.raises(InvalidCredentials) as e:
        ident(req(x_api_key="qm_bad"), ider)
    assert e.value.scheme == "ApiKey"
    with pytest.raises(InvalidCredentials):
        ident(req(**bearer(generate_key())), ider)  # a key in Authorization goes to api_key
    with pytest.raises(InvalidCredentials):
        ident(req(authorization=f"Bearer {hs({})}, Bearer {hs({})}"), ider)


def test_anonymous_reject() -> None:
    ider = Identifier(
        IdentityConfig(jwt=JWTConfig(algorithms=["HS256"], secret=SECRET), anonymous="reject")
    )
    with pytest.raises(MissingCredentials) as e:
        ident(req(), ider)
    assert e.value.scheme == "Bearer"
    assert ident(req(**bearer(hs({}))), ider).id == "alice"


def test_api_key_via_store_header_and_bearer() -> None:
    backend = MemoryBackend()
    key, rec = KeyStore(backend).create("svc", "pro", tenant="acme")
    ider = Identifier(
        IdentityConfig(jwt=JWTConfig(algorithms=["HS256"], secret=SECRET), api_keys=ApiKeyConfig()),
        plans={"pro"},
    )
    want = Caller("svc", "pro", "acme", source="api_key", key_id=rec.key_id)
    assert ident(req(x_api_key=key), ider, backend) == want
    assert ident(req(**bearer(key)), ider) == want  # cached: no store call now
    assert ident(req(**bearer(hs({}))), ider).source == "jwt"


def test_store_errors_propagate() -> None:
    backend = MemoryBackend()
    key, _ = KeyStore(backend).create("svc")
    ider = Identifier(IdentityConfig(api_keys=ApiKeyConfig()))
    gen = ider.identify(req(x_api_key=key))
    assert next(gen).name == "key_lookup"
    with pytest.raises(StorageError):
        gen.throw(StorageError("down"))


def test_custom_resolver_anywhere_in_order() -> None:
    def resolver(info: RequestInfo) -> Caller | None:
        if info.headers.get("x-tenant") == "bad":
            raise InvalidCredentials("bad tenant header")
        if "x-user" in info.headers:
            return Caller(info.headers["x-user"], source="custom")
        return None

    jc = JWTConfig(algorithms=["HS256"], secret=SECRET)
    ider = Identifier(IdentityConfig(order=["custom", "jwt", "ip"], jwt=jc, resolver=resolver))
    assert ident(req(x_user="u1", **bearer(hs({}))), ider).id == "u1"
    assert ident(req(**bearer(hs({}))), ider).id == "alice"
    assert ident(req(), ider).source == "ip"
    with pytest.raises(InvalidCredentials):
        ident(req(x_tenant="bad"), ider)
    ider = Identifier(
        IdentityConfig(order=["jwt", "custom"], jwt=jc, resolver=resolver, anonymous="reject")
    )
    assert ident(req(x_user="u2", **bearer(hs({}))), ider).id == "alice"
    with pytest.raises(MissingCredentials):
        ident(req(), ider)


# -- client address ---------------------------------------------------------------------------


def ip_id(client: str | None, xff: list[str] | None = None, **kw: Any) -> str:
    ider = Identifier(IdentityConfig(**kw))
    items = [("x-forwarded-for", v) for v in (xff or [])]
    return ider.client_id(RequestInfo("GET", "/", Headers(items), client=client))


def test_client_ip_and_forwarded_for() -> None:
    trusted = {"trusted_proxies": ["10.0.0.0/8", "127.0.0.1/32", "fd00::/8"]}
    assert ip_id("203.0.113.9") == "203.0.113.9"
    assert ip_id("203.0.113.9", ["1.2.3.4"], **trusted) == "203.0.113.9"  # untrusted peer
    assert ip_id("10.0.0.1", ["1.2.3.4"]) == "10.0.0.1"  # no trusted proxies configured
    assert ip_id("10.0.0.1", ["1.2.3.4"], **trusted) == "1.2.3.4"
    assert ip_id("10.0.0.1", ["6.6.6.6, 1.2.3.4, 10.9.9.9"], **trusted) == "1.2.3.4"
    assert ip_id("127.0.0.1", ["6.6.6.6", "1.2.3.4", "10.9.9.9"], **trusted) == "1.2.3.4"
    assert ip_id("10.0.0.1", ["10.0.0.2, 10.0.0.3"], **trusted) == "10.0.0.2"  # all trusted
    assert ip_id("10.0.0.1", ["1.2.3.4, garbage, 10.0.0.3"], **trusted) == "10.0.0.3"
    assert ip_id("10.0.0.1", ["unknown"], **trusted) == "10.0.0.1"
    assert ip_id("10.0.0.1", [""], **trusted) == "10.0.0.1"
    assert ip_id("10.0.0.1", ["[2001:db8::1]:443"], **trusted) == "2001:db8::/64"
    assert ip_id("10.0.0.1", ["1.2.3.4:5678"], **trusted) == "1.2.3.4"
    assert ip_id("fd00::1", ["1.2.3.4"], **trusted) == "1.2.3.4"
    assert ip_id("::ffff:10.0.0.1", ["1.2.3.4"], **trusted) == "1.2.3.4"


def test_ipv6_grouping_and_odd_peers() -> None:
    assert ip_id("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert ip_id("2001:db8:1:2:bbbb::7") == "2001:db8:1:2::/64"
    assert ip_id("2001:db8:1:2::1", ipv6_prefix=48) == "2001:db8:1::/48"
    assert ip_id("::ffff:192.0.2.1") == "192.0.2.1"
    assert ip_id("fe80::1%eth0") == "fe80::/64"
    assert ip_id(None) == "unknown"
    assert ip_id("testclient") == "testclient"
    assert ip_id("bad\x00peer") == "unknown"
    assert parse_ip("not-an-ip") is None and parse_ip("[::1") is None


# -- robustness -------------------------------------------------------------------------------

_VALID_KEY = generate_key()
_JWS = jwt.PyJWS()
_text = st.text(alphabet=st.characters(max_codepoint=0xFF), max_size=120)
_values = st.one_of(
    _text,
    _text.map(lambda s: "Bearer " + s),
    _text.map(lambda s: "bearer qm_" + s),
    st.sampled_from([_VALID_KEY, _VALID_KEY[:-1], "Bearer " + _VALID_KEY, "Bearer a.b.c"]),
    st.lists(st.text("abcXYZ-_=.0189", max_size=40), min_size=3, max_size=3).map(
        lambda p: "Bearer " + ".".join(p)
    ),
    st.builds(
        lambda claims: "Bearer " + _JWS.encode(json.dumps(claims).encode(), SECRET, "HS256"),
        st.dictionaries(
            st.sampled_from(["sub", "exp", "nbf", "iat", "aud", "iss", "plan", "org"]),
            st.one_of(st.none(), st.integers(-(2**63), 2**63), _text, st.lists(st.integers())),
        ),
    ),
)
_replies = st.one_of(
    st.just([]),
    st.none(),
    st.integers(),
    st.lists(st.one_of(st.binary(max_size=20), st.integers()), max_size=9),
)


class _RandomStore:
    def __init__(self, reply: Any) -> None:
        self.reply = reply

    def run(self, call: ScriptCall) -> Any:
        return self.reply


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    headers=st.dictionaries(
        st.sampled_from(["authorization", "x-api-key", "x-forwarded-for", "x-user"]),
        _values,
        max_size=4,
    ),
    client=st.one_of(st.none(), _text, st.ip_addresses().map(str)),
    reply=_replies,
)
def test_identify_only_raises_identification_errors(
    headers: dict[str, str], client: str | None, reply: Any
) -> None:
    ider = _fuzz_identifier
    try:
        c = ident(
            RequestInfo("GET", "/", Headers(headers.items()), client=client),
            ider,
            _RandomStore(reply),
        )
    except IdentificationError:
        return
    assert isinstance(c, Caller) and isinstance(c.id, str) and c.id


_fuzz_identifier = Identifier(
    IdentityConfig(
        jwt=JWTConfig(
            algorithms=["HS256"], secret=SECRET, tenant_claim="org", audience="a", cache_ttl=0
        ),
        api_keys=ApiKeyConfig(cache_ttl=0, negative_cache_ttl=0),
        trusted_proxies=["0.0.0.0/0", "::/0"],
    )
)
