"""Bearer JWT verification: :class:`JWTConfig` (key loading from a secret, PEM or JWKS) and the
helpers :class:`~quota_middleware.identity.Identifier` verifies a token with.

Keys are resolved once, when the config is built, so verifying a token is pure CPU.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import get_default_algorithms
from jwt.exceptions import InvalidSubjectError

from quota_middleware.errors import ConfigurationError, InvalidCredentials, check_keys

__all__ = ["JWTConfig", "decode_token", "rejection"]

_HMAC = frozenset({"HS256", "HS384", "HS512"})
_BY_KEY_TYPE: dict[str, frozenset[str]] = {
    "RSA": frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
    "EC": frozenset({"ES256", "ES256K", "ES384", "ES512", "ES521"}),
    "OKP": frozenset({"EdDSA"}),
}
_ASYMMETRIC = frozenset(a for algs in _BY_KEY_TYPE.values() for a in algs)


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class JWTConfig:
    """Bearer JWT verification. Give exactly one key source: an HMAC secret (``secret``,
    ``secret_env``, ``secret_file``), a PEM public key or certificate (``public_key``,
    ``public_key_file``), or a JWKS (``jwks`` as a dict or JSON text, ``jwks_file``).

    ``algorithms`` is required and must fit the key: HS* only with a secret, asymmetric only with
    public keys, so a public key can never be used as an HMAC secret. ``audience`` is checked only
    when set. Tokens must carry ``required_claims`` (default ``exp``). Verified tokens are cached
    until ``min(exp, now + cache_ttl)``.
    """

    algorithms: Sequence[str]
    secret: str | bytes | None = None
    secret_env: str | None = None
    secret_file: str | Path | None = None
    public_key: str | bytes | None = None
    public_key_file: str | Path | None = None
    jwks: Mapping[str, Any] | str | None = None
    jwks_file: str | Path | None = None
    audience: str | Sequence[str] | None = None
    issuer: str | Sequence[str] | None = None
    leeway: float = 0.0
    subject_claim: str = "sub"
    plan_claim: str | None = "plan"
    tenant_claim: str | None = None
    required_claims: Sequence[str] = ("exp",)
    max_token_bytes: int = 8192
    cache_ttl: float = 300.0
    cache_size: int = 10_000
    # kid (None: any) -> algorithm -> verification key; resolved once, at construction.
    keys: Mapping[str | None, Mapping[str, Any]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        w = "identity.jwt"
        algs = self.algorithms
        if isinstance(algs, str) or not algs or not all(isinstance(a, str) for a in algs):
            raise ConfigurationError(f"{w}.algorithms", "a non-empty list is required")
        known = set(get_default_algorithms()) - {"none"}
        for a in algs:
            if a.lower() == "none":
                raise ConfigurationError(f"{w}.algorithms", "'none' is never allowed")
            if a not in known:
                raise ConfigurationError(f"{w}.algorithms", f"unknown algorithm {a!r}")
        object.__setattr__(self, "algorithms", tuple(algs))
        sources = [
            n
            for n in ("secret", "secret_env", "secret_file", "public_key", "public_key_file")
            + ("jwks", "jwks_file")
            if getattr(self, n) is not None
        ]
        if len(sources) != 1:
            raise ConfigurationError(
                w,
                "give exactly one of secret, secret_env, secret_file, public_key, "
                f"public_key_file, jwks, jwks_file (got {sources or 'none'})",
            )
        src = sources[0]
        keys: dict[str | None, dict[str, Any]]
        if src.startswith("secret"):
            keys = {None: self._hmac_keys(src)}
        elif src.startswith("public_key"):
            keys = {None: self._public_keys(src)}
        else:
            keys = self._jwks_keys(src)
        object.__setattr__(self, "keys", keys)
        for name in ("audience", "issuer"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                if not v or not all(isinstance(x, str) for x in v):
                    raise ConfigurationError(f"{w}.{name}", "must be a string or list of strings")
                object.__setattr__(self, name, tuple(v))
        if not isinstance(self.subject_claim, str) or not self.subject_claim:
            raise ConfigurationError(f"{w}.subject_claim", "must be a claim name")
        req = self.required_claims
        if isinstance(req, str) or not all(isinstance(c, str) for c in req):
            raise ConfigurationError(f"{w}.required_claims", "must be a list of claim names")
        object.__setattr__(self, "required_claims", tuple(req))
        if not isinstance(self.leeway, int | float) or not 0 <= self.leeway <= 3600:
            raise ConfigurationError(f"{w}.leeway", "must be in [0, 3600] seconds")
        if not isinstance(self.max_token_bytes, int) or not 64 <= self.max_token_bytes <= 1 << 20:
            raise ConfigurationError(f"{w}.max_token_bytes", "must be in [64, 1 MiB]")
        if not isinstance(self.cache_ttl, int | float) or not 0 <= self.cache_ttl <= 86400:
            raise ConfigurationError(f"{w}.cache_ttl", "must be in [0, 86400] seconds")
        if not isinstance(self.cache_size, int) or self.cache_size < 0:
            raise ConfigurationError(f"{w}.cache_size", "must be an integer >= 0")

    def _require(self, family: frozenset[str], src: str, what: str) -> None:
        wrong = [a for a in self.algorithms if a not in family]
        if wrong:
            raise ConfigurationError(
                "identity.jwt.algorithms",
                f"{wrong} cannot be used with {src} ({what}); HMAC algorithms need a secret, "
                "asymmetric ones a public key or JWKS",
            )

    def _hmac_keys(self, src: str) -> dict[str, Any]:
        self._require(_HMAC, src, "an HMAC secret")
        where = f"identity.jwt.{src}"
        if src == "secret_env":
            name = self.secret_env
            value = os.environ.get(name) if isinstance(name, str) else None
            if not value:
                raise ConfigurationError(where, f"environment variable {name!r} is not set")
            secret = value.encode()
        elif src == "secret_file":
            secret = _read(self.secret_file, where).rstrip(b"\r\n")
        else:
            s = self.secret
            if not isinstance(s, str | bytes):
                raise ConfigurationError(where, "must be a string")
            secret = s.encode() if isinstance(s, str) else s
        out: dict[str, Any] = {}
        for a in self.algorithms:
            alg = get_default_algorithms()[a]
            try:
                prepared = alg.prepare_key(secret)
            except jwt.PyJWTError:
                raise ConfigurationError(
                    where, "looks like a PEM key, not an HMAC secret"
                ) from None
            msg = alg.check_key_length(prepared)
            if msg:
                raise ConfigurationError(where, f"too short for {a}: {msg.split('. ')[0]}")
            out[a] = secret
        return out

    def _public_keys(self, src: str) -> dict[str, Any]:
        where = f"identity.jwt.{src}"
        if src == "public_key_file":
            pem = _read(self.public_key_file, where)
        else:
            pk = self.public_key
            if not isinstance(pk, str | bytes):
                raise ConfigurationError(where, "must be PEM text")
            pem = pk.encode() if isinstance(pk, str) else pk
        try:
            if b"-----BEGIN CERTIFICATE-----" in pem:
                key: Any = x509.load_pem_x509_certificate(pem).public_key()
            else:
                key = serialization.load_pem_public_key(pem)
        except (ValueError, TypeError):
            raise ConfigurationError(
                where, "not a PEM public key or certificate (private keys do not belong here)"
            ) from None
        if isinstance(key, rsa.RSAPublicKey):
            kty = "RSA"
        elif isinstance(key, ec.EllipticCurvePublicKey):
            kty = "EC"
        elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            kty = "OKP"
        else:
            raise ConfigurationError(where, f"unsupported key type {type(key).__name__}")
        self._require(_BY_KEY_TYPE[kty], src, f"an {kty} public key")
        out: dict[str, Any] = {}
        for a in self.algorithms:
            alg = get_default_algorithms()[a]
            msg = alg.check_key_length(alg.prepare_key(key))
            if msg:
                raise ConfigurationError(where, f"too weak for {a}: {msg.split('. ')[0]}")
            out[a] = key
        return out

    def _jwks_keys(self, src: str) -> dict[str | None, dict[str, Any]]:
        where = f"identity.jwt.{src}"
        self._require(_ASYMMETRIC, src, "a JWKS")
        raw: Any = self.jwks
        try:
            if src == "jwks_file":
                raw = json.loads(_read(self.jwks_file, where))
            elif isinstance(raw, str):
                raw = json.loads(raw)
        except ValueError:
            raise ConfigurationError(where, "is not valid JSON") from None
        jwk_list = raw.get("keys") if isinstance(raw, Mapping) else None
        if not isinstance(jwk_list, list) or not jwk_list:
            raise ConfigurationError(where, "must be a JWKS document {'keys': [...]}")
        out: dict[str | None, dict[str, Any]] = {}
        for i, jwk_d in enumerate(jwk_list):
            kw = f"{where}.keys[{i}]"
            if not isinstance(jwk_d, Mapping):
                raise ConfigurationError(kw, "must be a JWK object")
            kty = jwk_d.get("kty")
            if kty == "oct":
                raise ConfigurationError(kw, "symmetric keys are not allowed in a JWKS; use secret")
            if "d" in jwk_d:
                raise ConfigurationError(kw, "is a private key; publish only public keys")
            if jwk_d.get("use", "sig") != "sig" or kty not in _BY_KEY_TYPE:
                continue
            algs = [a for a in self.algorithms if a in _BY_KEY_TYPE[kty]]
            if "alg" in jwk_d:
                algs = [a for a in algs if a == jwk_d["alg"]]
            kid = jwk_d.get("kid")
            if kid is not None and not isinstance(kid, str):
                raise ConfigurationError(kw, "kid must be a string")
            if kid in out:
                raise ConfigurationError(kw, f"duplicate kid {kid!r}")
            by_alg: dict[str, Any] = {}
            for a in algs:
                try:
                    pyjwk = jwt.PyJWK(dict(jwk_d), algorithm=a)
                except jwt.PyJWTError as e:
                    # An EC key only fits the algorithm of its curve: skip the others.
                    if kty == "EC":
                        continue
                    raise ConfigurationError(kw, f"unusable key: {e}") from None
                if kty == "EC" and not _curve_fits(pyjwk.key, a):
                    continue
                msg = pyjwk.Algorithm.check_key_length(pyjwk.key)
                if msg:
                    raise ConfigurationError(kw, f"too weak: {msg.split('. ')[0]}")
                by_alg[a] = pyjwk
            if by_alg:
                out[kid] = by_alg
        if None in out and len(out) > 1:
            raise ConfigurationError(where, "every key needs a 'kid' when the JWKS has several")
        if not out:
            raise ConfigurationError(where, f"no signing key fits algorithms {self.algorithms}")
        return out

    def __repr__(self) -> str:
        source = next(
            f"{n}={getattr(self, n)!r}" if n.endswith(("_env", "_file")) else f"{n}='***'"
            for n in ("secret", "secret_env", "secret_file", "public_key", "public_key_file")
            + ("jwks", "jwks_file")
            if getattr(self, n) is not None
        )
        return (
            f"JWTConfig(algorithms={list(self.algorithms)!r}, {source}, "
            f"audience={self.audience!r}, issuer={self.issuer!r}, leeway={self.leeway!r})"
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, base_dir: Path | None = None) -> JWTConfig:
        fields = {f for f in cls.__dataclass_fields__ if f != "keys"}
        check_keys(d, fields, "identity.jwt")
        if "algorithms" not in d:
            raise ConfigurationError("identity.jwt.algorithms", "required, e.g. ['RS256']")
        kw = dict(d)
        for name in ("secret_file", "public_key_file", "jwks_file"):
            if isinstance(kw.get(name), str) and base_dir is not None:
                kw[name] = base_dir / kw[name]
        return cls(**kw)


def _curve_fits(key: Any, alg: str) -> bool:
    curve = getattr(getattr(key, "curve", None), "name", "")
    want = {"ES256": "secp256r1", "ES256K": "secp256k1", "ES384": "secp384r1"}
    return want.get(alg, "secp521r1") == curve


def _read(path: Any, where: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except (OSError, TypeError) as e:
        raise ConfigurationError(
            where, f"cannot read {path}: {getattr(e, 'strerror', e)}"
        ) from None


# -- verifying a token -----------------------------------------------------------------------


def decode_token(jc: JWTConfig, token: str) -> dict[str, Any]:
    """The verified claims of ``token``; raises pyjwt's errors (see :func:`rejection`)."""
    header = jwt.get_unverified_header(token)
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in jc.algorithms:
        raise InvalidCredentials("token algorithm not allowed")
    if None in jc.keys:
        by_alg = jc.keys[None]
    else:
        kid = header.get("kid")
        if kid is None and len(jc.keys) == 1:
            kid = next(iter(jc.keys))
        if not isinstance(kid, str) or kid not in jc.keys:
            raise InvalidCredentials("token signed with an unknown key (kid)")
        by_alg = jc.keys[kid]
    key = by_alg.get(alg)
    if key is None:
        raise InvalidCredentials("token algorithm does not fit its key")
    claims: dict[str, Any] = jwt.decode(
        token,
        key,
        algorithms=[alg],
        audience=jc.audience,
        issuer=jc.issuer,
        leeway=jc.leeway,
        options={"require": list(jc.required_claims), "verify_aud": jc.audience is not None},
    )
    return claims


def rejection(e: Exception) -> InvalidCredentials:
    """The 401 for an exception raised while decoding a token (checked in this order)."""
    if isinstance(e, jwt.ExpiredSignatureError):
        return InvalidCredentials("token expired")
    if isinstance(e, jwt.ImmatureSignatureError):
        return InvalidCredentials("token not yet valid")
    if isinstance(e, jwt.InvalidAudienceError):
        return InvalidCredentials("token audience not accepted")
    if isinstance(e, jwt.InvalidIssuerError):
        return InvalidCredentials("token issuer not accepted")
    if isinstance(e, jwt.InvalidSignatureError):
        return InvalidCredentials("token signature invalid")
    if isinstance(e, jwt.InvalidAlgorithmError):
        return InvalidCredentials("token algorithm not allowed")
    if isinstance(e, InvalidSubjectError):
        return InvalidCredentials("token has an unusable 'sub' claim")
    if isinstance(e, jwt.MissingRequiredClaimError):
        return InvalidCredentials(f"token lacks the {e.claim!r} claim")
    # Whatever a hostile token trips inside the decoder, it is the client's fault: 401.
    return InvalidCredentials("malformed token")
