"""Who is calling: JWT bearer tokens, API keys, a custom resolver or the client IP -> ``Caller``.

:meth:`Identifier.identify` is a sans-IO generator, driven like an httpx auth flow: it yields a
:class:`~quota_middleware.scripts.ScriptCall` when an API key must be looked up in the store and is
sent the reply; everything else is pure CPU. Verified JWTs and key lookups are cached in-process,
so a repeat caller normally costs no store round trip. A revoked key keeps working for up to the
key cache TTL (``identity.api_keys.cache_ttl``, default 10 s).

Bad credentials are always :class:`InvalidCredentials` (401), never a fall-through to the IP: a
client that sends a token must send a good one.
"""

from __future__ import annotations

import hashlib
import importlib
import ipaddress
import json
import os
import re
import time
from collections.abc import Callable, Collection, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import get_default_algorithms
from jwt.exceptions import InvalidSubjectError

from .apikeys import ApiKeyConfig, ApiKeyVerifier, TTLCache
from .errors import ConfigurationError, IdentificationError, InvalidCredentials, MissingCredentials
from .request import RequestInfo
from .scripts import ScriptCall

__all__ = [
    "Caller",
    "IdentityConfig",
    "Identifier",
    "JWTConfig",
    "Resolver",
]

METHODS = ("jwt", "api_key", "custom", "ip")
_TABLES = ("jwt", "api_keys", "resolver")
_HMAC = frozenset({"HS256", "HS384", "HS512"})
_BY_KEY_TYPE: dict[str, frozenset[str]] = {
    "RSA": frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
    "EC": frozenset({"ES256", "ES256K", "ES384", "ES512", "ES521"}),
    "OKP": frozenset({"EdDSA"}),
}
_ASYMMETRIC = frozenset(a for algs in _BY_KEY_TYPE.values() for a in algs)
_JWT_RE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_CLAIM_RE = re.compile(r"[^\x00-\x1f\x7f]{1,256}")
_XFF_MAX_HOPS = 32


@dataclass(frozen=True, slots=True)
class Caller:
    """An identified caller. ``plan=None`` means the policy's default plan."""

    id: str
    plan: str | None = None
    tenant: str = "default"
    source: str = "ip"  # "jwt" | "api_key" | "ip" | "custom"
    key_id: str | None = None  # the API key id when source == "api_key"; never the secret


Resolver = Callable[[RequestInfo], Caller | None]


def _known(d: Mapping[str, Any], allowed: Collection[str], where: str) -> None:
    for k in d:
        if k not in allowed:
            raise ConfigurationError(
                f"{where}.{k}", f"unknown key; expected one of {sorted(allowed)}"
            )


# -- JWT ------------------------------------------------------------------------------------


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
        _known(d, fields, "identity.jwt")
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


# -- the whole identity section --------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class IdentityConfig:
    """How callers are identified. ``order`` defaults to ``jwt, api_key, custom, ip``, keeping
    only configured methods. ``anonymous="reject"`` answers 401 instead of keying by IP.

    ``trusted_proxies`` (CIDRs) are the only peers whose ``X-Forwarded-For`` is believed.
    """

    order: Sequence[str] | None = None
    anonymous: str = "ip"
    trusted_proxies: Sequence[str] = ()
    ipv6_prefix: int = 64
    jwt: JWTConfig | None = None
    api_keys: ApiKeyConfig | None = None
    resolver: Resolver | None = None
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        init=False, repr=False, compare=False, default=()
    )

    def __post_init__(self) -> None:
        w = "identity"
        if self.anonymous not in ("ip", "reject"):
            raise ConfigurationError(f"{w}.anonymous", "must be 'ip' or 'reject'")
        available = {
            "jwt": self.jwt is not None,
            "api_key": self.api_keys is not None,
            "custom": self.resolver is not None,
            "ip": self.anonymous == "ip",
        }
        if self.order is None:
            order = tuple(m for m in METHODS if available[m])
        else:
            if isinstance(self.order, str):
                raise ConfigurationError(f"{w}.order", "must be a list")
            order = tuple(self.order)
            for m in order:
                if m not in METHODS:
                    raise ConfigurationError(f"{w}.order", f"unknown method {m!r}; use {METHODS}")
                if not available[m]:
                    hint = "anonymous = 'reject'" if m == "ip" else "it is not configured"
                    raise ConfigurationError(f"{w}.order", f"{m!r} is listed but {hint}")
            if len(set(order)) != len(order):
                raise ConfigurationError(f"{w}.order", "lists a method twice")
            if "ip" in order and order[-1] != "ip":
                raise ConfigurationError(f"{w}.order", "'ip' always succeeds, so it must be last")
        if not order:
            raise ConfigurationError(f"{w}.order", "no identification method is configured")
        object.__setattr__(self, "order", order)
        if isinstance(self.trusted_proxies, str):
            raise ConfigurationError(f"{w}.trusted_proxies", "must be a list of CIDRs")
        nets = []
        for i, cidr in enumerate(self.trusted_proxies):
            try:
                nets.append(ipaddress.ip_network(cidr, strict=False))
            except (ValueError, TypeError):
                raise ConfigurationError(
                    f"{w}.trusted_proxies[{i}]", f"not an IP network: {cidr!r}"
                ) from None
        object.__setattr__(self, "trusted_proxies", tuple(self.trusted_proxies))
        object.__setattr__(self, "networks", tuple(nets))
        if not isinstance(self.ipv6_prefix, int) or not 8 <= self.ipv6_prefix <= 128:
            raise ConfigurationError(f"{w}.ipv6_prefix", "must be in [8, 128]")
        if self.resolver is not None and not callable(self.resolver):
            raise ConfigurationError(f"{w}.resolver", "must be callable")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, base_dir: Path | None = None) -> IdentityConfig:
        """From the TOML ``[identity]`` table; ``resolver`` may name ``"package.module:func"``."""
        _known(d, ("order", "anonymous", "trusted_proxies", "ipv6_prefix") + _TABLES, "identity")
        kw: dict[str, Any] = {k: v for k, v in d.items() if k not in _TABLES}
        if "jwt" in d:
            if not isinstance(d["jwt"], Mapping):
                raise ConfigurationError("identity.jwt", "must be a table")
            kw["jwt"] = JWTConfig.from_dict(d["jwt"], base_dir=base_dir)
        if "api_keys" in d:
            if not isinstance(d["api_keys"], Mapping):
                raise ConfigurationError("identity.api_keys", "must be a table")
            kw["api_keys"] = ApiKeyConfig.from_dict(d["api_keys"])
        if "resolver" in d:
            kw["resolver"] = _import(d["resolver"])
        return cls(**kw)


def _import(spec: Any) -> Resolver:
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ConfigurationError("identity.resolver", "must be 'package.module:function'")
    mod_name, attr = spec.split(":")
    try:
        obj = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigurationError("identity.resolver", f"cannot import {spec!r}: {e}") from None
    if not callable(obj):
        raise ConfigurationError("identity.resolver", f"{spec!r} is not callable")
    resolver: Resolver = obj
    return resolver


# -- identification --------------------------------------------------------------------------

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ip(text: str) -> IPAddress | None:
    """An address from a peer or X-Forwarded-For entry (ports and brackets stripped), else None.

    IPv4-mapped IPv6 becomes IPv4, so one client is one caller whichever stack accepted it.
    """
    text = text.strip()
    if not text or len(text) > 64:
        return None
    if text.startswith("["):
        end = text.find("]")
        text = text[1:end] if end > 0 else ""
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
        if addr.scope_id is not None:
            return ipaddress.IPv6Address(int(addr))
    return addr


class Identifier:
    """Turns a request into a :class:`Caller`; one per middleware, safe to share across threads.

    ``prefix`` is the storage key prefix (``storage.prefix``). ``plans``: the policy's plan names;
    a token or key naming any other plan gets the default plan (``plan=None``). ``clock`` (unix
    seconds) drives the caches; inject one in tests.
    """

    def __init__(
        self,
        config: IdentityConfig,
        *,
        prefix: str = "qm",
        plans: Collection[str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.prefix = prefix
        self._plans = frozenset(plans) if plans is not None else None
        self._peer_ids: dict[str, str] = {}
        self._ip_callers: dict[str, Caller] = {}
        self._wants_bearer = config.jwt is not None or (
            config.api_keys is not None and config.api_keys.bearer
        )
        self._clock = clock
        jc = config.jwt
        self._jwt_cache: TTLCache[bytes, Caller] = TTLCache(jc.cache_size if jc else 0, clock)
        ak = config.api_keys
        self._keys = ApiKeyVerifier(ak, prefix=prefix, clock=clock) if ak else None
        self._key_marker = f"{ak.prefix}_" if ak and ak.bearer else None
        self._scheme = "Bearer" if jc is not None or (ak and ak.bearer) else "ApiKey"

    def identify(self, info: RequestInfo) -> Generator[ScriptCall, Any, Caller]:
        """Yield store calls (API key lookups), return the Caller; raise IdentificationError."""
        bearer = self._bearer(info) if self._wants_bearer else None
        for method in self.config.order or ():
            if method == "jwt":
                if bearer is not None and not self._is_key(bearer):
                    return self._verify_jwt(bearer)
            elif method == "api_key":
                assert self._keys is not None
                key, scheme = self._api_key(info, bearer)
                if key is not None:
                    m = yield from self._keys.verify(key, scheme=scheme)
                    plan = self._plan(m.plan)
                    return Caller(m.caller, plan, m.tenant, source="api_key", key_id=m.key_id)
            elif method == "custom":
                assert self.config.resolver is not None
                caller = self.config.resolver(info)
                if caller is not None:
                    return caller
            else:
                return self._ip_caller(info)
        raise MissingCredentials("credentials required", scheme=self._scheme)

    # -- credentials -----------------------------------------------------------------------

    @staticmethod
    def _bearer(info: RequestInfo) -> str | None:
        value = info.headers.get("authorization")
        if value is None:
            return None
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer":
            return None
        return token.strip()

    def _is_key(self, token: str) -> bool:
        return self._key_marker is not None and token.startswith(self._key_marker)

    def _api_key(self, info: RequestInfo, bearer: str | None) -> tuple[str | None, str]:
        ak = self.config.api_keys
        assert ak is not None
        if ak.header is not None:
            value = info.headers.get(ak.header)
            if value is not None and value.strip():
                return value.strip(), "ApiKey"
        if bearer is not None and self._is_key(bearer):
            return bearer, "Bearer"
        return None, "ApiKey"

    def _plan(self, plan: Any) -> str | None:
        if not isinstance(plan, str) or (self._plans is not None and plan not in self._plans):
            return None
        return plan

    def _verify_jwt(self, token: str) -> Caller:
        jc = self.config.jwt
        assert jc is not None
        if len(token) > jc.max_token_bytes:
            raise InvalidCredentials("token too long")
        if not _JWT_RE.fullmatch(token):
            raise InvalidCredentials("malformed token")
        cache_key = hashlib.sha256(token.encode("ascii")).digest()
        hit = self._jwt_cache.get(cache_key)
        if hit is not None:
            return hit[0]
        try:
            claims = self._decode(jc, token)
        except IdentificationError:
            raise
        except jwt.ExpiredSignatureError:
            raise InvalidCredentials("token expired") from None
        except jwt.ImmatureSignatureError:
            raise InvalidCredentials("token not yet valid") from None
        except jwt.InvalidAudienceError:
            raise InvalidCredentials("token audience not accepted") from None
        except jwt.InvalidIssuerError:
            raise InvalidCredentials("token issuer not accepted") from None
        except jwt.InvalidSignatureError:
            raise InvalidCredentials("token signature invalid") from None
        except jwt.InvalidAlgorithmError:
            raise InvalidCredentials("token algorithm not allowed") from None
        except InvalidSubjectError:
            raise InvalidCredentials("token has an unusable 'sub' claim") from None
        except jwt.MissingRequiredClaimError as e:
            raise InvalidCredentials(f"token lacks the {e.claim!r} claim") from None
        except Exception:
            # Whatever a hostile token trips inside the decoder, it is the client's fault: 401.
            raise InvalidCredentials("malformed token") from None
        caller = self._caller_from(jc, claims)
        now = self._clock()
        until = now + jc.cache_ttl
        exp = claims.get("exp")
        if isinstance(exp, int | float) and not isinstance(exp, bool):
            until = min(until, float(exp))
        self._jwt_cache.put(cache_key, caller, until)
        return caller

    @staticmethod
    def _decode(jc: JWTConfig, token: str) -> dict[str, Any]:
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

    def _caller_from(self, jc: JWTConfig, claims: Mapping[str, Any]) -> Caller:
        sub = claims.get(jc.subject_claim)
        if not isinstance(sub, str) or not _CLAIM_RE.fullmatch(sub):
            raise InvalidCredentials(f"token has no usable {jc.subject_claim!r} claim")
        tenant = "default"
        if jc.tenant_claim is not None and jc.tenant_claim in claims:
            t = claims[jc.tenant_claim]
            if not isinstance(t, str) or not _CLAIM_RE.fullmatch(t):
                raise InvalidCredentials(f"token has an unusable {jc.tenant_claim!r} claim")
            tenant = t
        plan = self._plan(claims.get(jc.plan_claim)) if jc.plan_claim else None
        return Caller(sub, plan, tenant, source="jwt")

    # -- client address ---------------------------------------------------------------------

    def _ip_caller(self, info: RequestInfo) -> Caller:
        client = info.client
        caller = self._ip_callers.get(client) if client else None
        if caller is None:
            caller = Caller(self.client_id(info), source="ip")
            # only peers whose id does not depend on X-Forwarded-For are cached (client_id
            # cached them in _peer_ids)
            if client and client in self._peer_ids:
                if len(self._ip_callers) >= 10_000:
                    self._ip_callers.clear()
                self._ip_callers[client] = caller
        return caller

    def client_id(self, info: RequestInfo) -> str:
        """The client's IP (or IPv6 network), walking X-Forwarded-For through trusted proxies."""
        cached = self._peer_ids.get(info.client) if info.client else None
        if cached is not None:
            return cached
        peer = parse_ip(info.client) if info.client else None
        if peer is None:
            # Not an IP (a unix socket, a test client name): the server's label is all we have.
            raw = info.client or ""
            return raw if raw.isascii() and raw.isprintable() and 0 < len(raw) <= 64 else "unknown"
        addr = peer
        if not self._trusted(peer):
            # Only an untrusted peer's id depends on the peer alone (no header): worth caching,
            # as parsing addresses is most of the cost of identifying an anonymous caller.
            if len(self._peer_ids) >= 10_000:
                self._peer_ids.clear()
            caller_id = self._format(peer)
            self._peer_ids[info.client or ""] = caller_id
            return caller_id
        if self._trusted(peer):
            hops = ",".join(info.headers.getlist("x-forwarded-for")).split(",")
            for entry in reversed(hops[-_XFF_MAX_HOPS:]):
                nxt = parse_ip(entry)
                if nxt is None:
                    break
                addr = nxt
                if not self._trusted(nxt):
                    break
        return self._format(addr)

    def _format(self, addr: IPAddress) -> str:
        if isinstance(addr, ipaddress.IPv6Address):
            return str(ipaddress.IPv6Network((addr, self.config.ipv6_prefix), strict=False))
        return str(addr)

    def _trusted(self, addr: IPAddress) -> bool:
        return any(addr in net for net in self.config.networks)
