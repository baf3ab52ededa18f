"""Identity over real HTTP through both adapters: every bad JWT is a 401 with
``WWW-Authenticate``, never a 500; X-Forwarded-For only counts through trusted proxies."""

from __future__ import annotations

import base64
import hmac
import json
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from harness import Harness
from quota_middleware import IdentityConfig, Plan, QuotaConfig, RequestRate
from quota_middleware.identity._identifier import JWTConfig

SECRET = "s3cret-for-tests-only-0123456789abcdef"
_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PUBLIC_PEM = _RSA.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)


def _b64(obj: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def _claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "alice", "plan": "pro", "aud": "api", "iss": "https://issuer", "exp": now + 600,
            **over}  # fmt: skip


def rs256(**over: Any) -> str:
    return jwt.encode(_claims(**over), _RSA, algorithm="RS256")


def _hmac_signed_with_public_key() -> str:
    signing_input = _b64({"alg": "HS256", "typ": "JWT"}) + "." + _b64(_claims())
    sig = hmac.new(PUBLIC_PEM, signing_input.encode(), "sha256").digest()
    return signing_input + "." + base64.urlsafe_b64encode(sig).rstrip(b"=").decode()


BAD_TOKENS = {
    "expired": lambda: rs256(exp=int(time.time()) - 3600),
    "not-yet-valid": lambda: rs256(nbf=int(time.time()) + 3600),
    # a valid signature over other claims: the payload was tampered with
    "bad-signature": lambda: ".".join(
        [rs256().split(".")[0], _b64(_claims(sub="mallory")), rs256().split(".")[2]]
    ),
    "alg-none": lambda: _b64({"alg": "none", "typ": "JWT"}) + "." + _b64(_claims()) + ".",
    # the classic key confusion: HMAC "signed" with the RSA public key as the secret
    "hs256-with-public-key": lambda: _hmac_signed_with_public_key(),
    "hs256-other-secret": lambda: jwt.encode(_claims(), SECRET, algorithm="HS256"),
    "wrong-audience": lambda: rs256(aud="other"),
    "wrong-issuer": lambda: rs256(iss="https://evil"),
    "malformed": lambda: "not.a.jwt",
    "garbage-base64": lambda: "eyJ!!!.eyJ???.sig",
    "oversized": lambda: rs256(pad="x" * 20000),
    "no-exp": lambda: jwt.encode({k: v for k, v in _claims().items() if k != "exp"}, _RSA,
                                 algorithm="RS256"),
}  # fmt: skip


def _config(**identity: Any) -> QuotaConfig:
    ident = IdentityConfig(
        jwt=JWTConfig(algorithms=["RS256"], public_key=PUBLIC_PEM, audience="api",
                      issuer="https://issuer"),
        **identity,
    )  # fmt: skip
    return QuotaConfig(
        plans=[Plan(name="free", limits=[RequestRate(rate="2/minute", name="rpm")]),
               Plan(name="pro", limits=[RequestRate(rate="5/minute", name="rpm")])],
        identity=ident,
    )  # fmt: skip


@pytest.fixture(params=["asgi", "wsgi"])
def harness(request: pytest.FixtureRequest, backend: Any) -> Iterator[Any]:
    made: list[Harness] = []

    def build(config: QuotaConfig) -> Harness:
        h = Harness.build(str(request.param), backend, config)
        made.append(h)
        return h

    yield build
    for h in made:
        h.close()


def test_valid_jwt_gets_its_plan(harness: Any) -> None:
    h = harness(_config())
    r = h.request(headers={"Authorization": f"Bearer {rs256()}"})
    assert r.status == 200
    assert r.decision.caller_id == "alice" and r.decision.plan == "pro"
    assert r.headers["ratelimit"].startswith('"rpm";r=4;')


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
def test_bad_jwt_is_401_never_500(harness: Any, case: str) -> None:
    h = harness(_config())
    r = h.request(headers={"Authorization": f"Bearer {BAD_TOKENS[case]()}"})
    assert r.status == 401, r.body
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert r.body["error"]["code"] == "invalid_credentials"
    # a bad token is never let through as an anonymous (IP) caller
    assert r.decision is None


def test_forwarded_for_only_through_trusted_proxies(harness: Any) -> None:
    h = harness(_config(trusted_proxies=["10.0.0.0/8"]))
    spoof = {"X-Forwarded-For": "198.51.100.9"}
    # an untrusted peer cannot choose its identity with the header
    r = h.request(headers=spoof, client_ip="203.0.113.50")
    assert r.decision.caller_id == "203.0.113.50"
    # through a trusted proxy the right-most untrusted hop is the client
    r = h.request(headers={"X-Forwarded-For": "192.0.2.1, 198.51.100.9, 10.1.1.1"},
                  client_ip="10.2.2.2")  # fmt: skip
    assert r.decision.caller_id == "198.51.100.9"
    # IPv6 callers share a /64
    a = h.request(client_ip="2001:db8:1:2::1").decision.caller_id
    b = h.request(client_ip="2001:db8:1:2:ffff::9").decision.caller_id
    assert a == b == "2001:db8:1:2::/64"


def test_missing_credentials_with_anonymous_reject(harness: Any) -> None:
    h = harness(_config(anonymous="reject"))
    r = h.request()
    assert r.status == 401
    assert r.headers["www-authenticate"] == 'Bearer realm="api"'
