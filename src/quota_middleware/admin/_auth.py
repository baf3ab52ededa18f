"""Who may use the admin app: admin tokens, admin JWTs, and browser sessions, with CSRF rules.

- ``Authorization: Bearer <token>``: the token's SHA-256 digest is compared, in constant time
  (``hmac.compare_digest``), with every digest of ``admin.token_sha256``; the admin is
  ``token:<first 8 hex of the digest>``.
- ``Authorization: Bearer <JWT>`` (with ``admin.jwt_claim`` set): verified with the policy's
  ``[identity.jwt]`` settings (``identity._jwt.decode_token``) and accepted when its claim says
  admin (:class:`~quota_middleware.admin.AdminConfig`); the admin is its subject.
- A browser session: ``POST /login`` with one of those tokens sets an HttpOnly, SameSite=Strict
  cookie, ``Path`` the mount point, holding ``who``, the expiry and a random session id, signed
  with HMAC-SHA256. The signing key is ``admin.session_secret_env``'s value, or else a random
  key created once in the store (``<prefix>:{@app}:admin:session-key``, SET NX) that every
  worker and process on the store reads, so a session made by one worker is good on all.
  ``POST /logout`` records the session id as ended (until its expiry) and clears the cookie.
  A token session ends when its token's digest leaves the policy; a JWT session never
  outlives the JWT's ``exp``.

CSRF: a request authenticated by an ``Authorization`` header cannot be forged by another site
(a browser never adds one by itself). A state-changing request (POST, PUT, PATCH, DELETE)
authenticated by the cookie must carry the session's CSRF token (form field ``csrf`` or header
``X-CSRF-Token``) and, when it has an ``Origin`` (else a ``Referer``) header, one naming the
host the request was sent to (the ``Host`` header; the scheme is not compared, so a proxy that
terminates TLS does not break it); otherwise 403 ``csrf``.

Tokens, JWTs and cookies are never logged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from quota_middleware.admin._audit import log as audit_log
from quota_middleware.admin._config import AdminConfig
from quota_middleware.admin._http import HTTPError, Request, Response, json_response
from quota_middleware.admin._kv import KV
from quota_middleware.base._keys import app_tag
from quota_middleware.config import QuotaConfig
from quota_middleware.errors import ConfigurationError

if TYPE_CHECKING:
    from quota_middleware.admin._app import AdminContext

__all__ = [
    "COOKIE",
    "Admin",
    "Sessions",
    "authenticate",
    "check_csrf",
    "csrf_token",
    "login",
    "logout",
    "same_origin",
    "unauthorized",
]

#: the session cookie's name
COOKIE = "qm_admin"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: how long (s) a process trusts its copy of the stored signing key before reading it again
_KEY_REFRESH = 60.0


@dataclass(frozen=True, slots=True)
class Admin:
    """An authenticated admin. ``via`` is ``"token"``, ``"jwt"`` (an ``Authorization`` header)
    or ``"session"`` (the cookie); only a session has a :attr:`csrf` token and an expiry."""

    who: str
    via: str
    csrf: str = ""
    expires: float | None = None
    session_id: str | None = None


def unauthorized(message: str = "") -> HTTPError:
    """The 401 every failed authentication answers: no data, a ``WWW-Authenticate`` challenge."""
    return HTTPError(
        401, "unauthorized", message, headers=[("www-authenticate", 'Bearer realm="quota-admin"')]
    )


# -- credentials ---------------------------------------------------------------------------------
def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def _token_admin(settings: AdminConfig, token: str) -> str | None:
    """The matching digest, comparing with every configured one (no early exit)."""
    presented = _digest(token)
    found: str | None = None
    for d in settings.digests:
        if hmac.compare_digest(presented, d):
            found = d
    return found


def _claim_says_admin(value: Any, wanted: str) -> bool:
    if value is True:
        return True
    if isinstance(value, str):
        return wanted in value.split()
    if isinstance(value, list):
        return any(isinstance(v, str) and v == wanted for v in value)
    return False


def _jwt_admin(config: QuotaConfig, settings: AdminConfig, token: str) -> tuple[str, float] | None:
    """(subject, exp) of an admin JWT, or None for any token that is not one."""
    jc = config.identity.jwt
    if settings.jwt_claim is None or jc is None or token.count(".") != 2:
        return None
    if len(token) > jc.max_token_bytes:
        return None
    from quota_middleware.identity._jwt import decode_token

    try:
        claims = decode_token(jc, token)
    except Exception:  # every way a token can be bad (pyjwt's errors, ours): not an admin
        return None
    if not _claim_says_admin(claims.get(settings.jwt_claim), settings.jwt_value):
        return None
    sub = claims.get(jc.subject_claim)
    # the subject is the audit trail's "who" and goes into log lines: one printable line
    if not isinstance(sub, str) or not sub or len(sub) > 256 or not sub.isprintable():
        return None
    exp = claims.get("exp")
    return sub, float(exp) if isinstance(exp, int | float) else time.time() + 86400


def check_settings(config: QuotaConfig, settings: AdminConfig) -> None:
    """The cross-table check: a JWT admin needs the policy's ``[identity.jwt]``."""
    if settings.jwt_claim is not None and config.identity.jwt is None:
        raise ConfigurationError(
            "admin.jwt_claim", "admin JWTs are verified with [identity.jwt], which is missing"
        )


def _bearer(req: Request) -> str | None:
    header = req.headers.get("authorization")
    if header is None:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return ""
    return value.strip()


def credentials(ctx: AdminContext, token: str) -> tuple[str, str, float | None] | None:
    """(who, via, JWT expiry) for an admin token or JWT, or None."""
    digest = _token_admin(ctx.settings, token) if token else None
    if digest is not None:
        return f"token:{digest[:8]}", "token", None
    found = _jwt_admin(ctx.config, ctx.settings, token) if token else None
    if found is not None:
        return found[0], "jwt", found[1]
    return None


def authenticate(req: Request, ctx: AdminContext) -> Admin | None:
    """The admin making ``req``: by its ``Authorization`` header when it has one (a wrong one
    is refused, never passed over for the cookie), else by its session cookie; None when
    neither is good."""
    token = _bearer(req)
    if token is not None:
        found = credentials(ctx, token)
        if found is None:
            return None
        return Admin(found[0], found[1])
    cookie = _cookies(req.headers.get("cookie", "")).get(COOKIE)
    if cookie is None:
        return None
    return ctx.sessions.verify(cookie)


def csrf_token(admin: Admin | None) -> str:
    """The CSRF token forms of this admin's session must send (field ``csrf``); ``""`` for an
    admin authenticated by a header, who needs none."""
    return admin.csrf if admin is not None else ""


def same_origin(req: Request) -> bool:
    """The request's ``Origin`` (else its ``Referer``) names the host it was sent to, or it has
    neither (the header is only compared when present, as browsers send it on POSTs)."""
    host = req.headers.get("host", "").strip().lower()
    origin = req.headers.get("origin")
    if origin is not None:
        return bool(host) and urlsplit(origin.strip()).netloc.lower() == host
    referer = req.headers.get("referer")
    if referer is not None:
        return bool(host) and urlsplit(referer.strip()).netloc.lower() == host
    return True


def check_csrf(req: Request) -> bool:
    """Whether ``req`` (authenticated: ``req.admin``) passes the CSRF rules above."""
    admin = req.admin
    if admin is None:
        return False
    if admin.via != "session" or req.method in SAFE_METHODS:
        return True
    sent = req.headers.get("x-csrf-token")
    if sent is None:
        sent = req.form().get("csrf", "")
    if not admin.csrf or not hmac.compare_digest(sent.encode(), admin.csrf.encode()):
        return False
    return same_origin(req)


def _cookies(header: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name and name not in out:
            out[name] = value.strip().strip('"')
    return out


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# -- sessions ------------------------------------------------------------------------------------
class Sessions:
    """Signs and checks session cookies; the key is shared through the store (see above)."""

    def __init__(self, settings: AdminConfig, kv: KV, prefix: str) -> None:
        self.settings = settings
        self.kv = kv
        self._key_name = f"{app_tag(prefix)}:admin:session-key"
        self._ended = f"{app_tag(prefix)}:admin:ended:"
        self._key: bytes | None = None
        self._key_at = 0.0

    def _signing_key(self) -> bytes:
        env = self.settings.session_secret_env
        if env is not None:
            value = os.environ.get(env)
            if not value:
                raise ConfigurationError(
                    "admin.session_secret_env", f"environment variable {env!r} is not set"
                )
            return hmac.digest(value.encode(), b"quota-admin-session", "sha256")
        now = time.monotonic()
        if self._key is None or now - self._key_at > _KEY_REFRESH:
            stored = self.kv.get(self._key_name)
            if stored is None:
                self.kv.set(self._key_name, secrets.token_hex(32), nx=True)
                stored = self.kv.get(self._key_name)
            if stored is None:  # deleted again at once: nothing to share, nothing signed
                raise HTTPError(503, "store_unavailable", "the session key could not be kept")
            self._key = hmac.digest(stored.encode(), b"quota-admin-session", "sha256")
            self._key_at = now
        return self._key

    def _sign(self, payload: str) -> str:
        return _b64(hmac.digest(self._signing_key(), payload.encode(), "sha256"))

    def _csrf(self, session_id: str) -> str:
        raw = hmac.digest(self._signing_key(), b"csrf\0" + session_id.encode(), "sha256")
        return _b64(raw)[:32]

    def create(self, who: str, via: str, jwt_exp: float | None) -> tuple[str, Admin]:
        """A new session for ``who``: the cookie value and the :class:`Admin` it stands for."""
        expires = time.time() + self.settings.session_ttl
        if jwt_exp is not None:
            expires = min(expires, jwt_exp)
        sid = secrets.token_hex(16)
        body = {"w": who, "k": via, "e": int(expires), "n": sid}
        payload = _b64(json.dumps(body, separators=(",", ":")).encode())
        cookie = f"{payload}.{self._sign(payload)}"
        return cookie, Admin(who, "session", self._csrf(sid), float(int(expires)), sid)

    def verify(self, cookie: str) -> Admin | None:
        payload, _, sig = cookie.partition(".")
        if not payload or not sig or len(cookie) > 4096:
            return None
        if not hmac.compare_digest(sig.encode(), self._sign(payload).encode()):
            return None
        try:
            body = json.loads(_unb64(payload))
            who, via, expires, sid = str(body["w"]), str(body["k"]), int(body["e"]), str(body["n"])
        except (ValueError, KeyError, TypeError):
            return None
        if expires <= time.time():
            return None
        if via == "token":
            # a token's sessions end when its digest leaves the policy
            if not any(who == f"token:{d[:8]}" for d in self.settings.digests):
                return None
        elif self.settings.jwt_claim is None:
            return None
        if self.kv.get(self._ended + sid) is not None:
            return None
        return Admin(who, "session", self._csrf(sid), float(expires), sid)

    def end(self, admin: Admin) -> None:
        """Refuse ``admin``'s session from now on (until it would have expired anyway)."""
        if admin.session_id is None or admin.expires is None:
            return
        ttl_ms = max(1000, int((admin.expires - time.time()) * 1000) + 1000)
        self.kv.set(self._ended + admin.session_id, "1", ttl_ms=ttl_ms)


def _cookie_header(req: Request, ctx: AdminContext, value: str, max_age: int) -> str:
    secure = ctx.settings.cookie_secure
    if secure is None:
        secure = req.scheme == "https"
    path = quote(req.root or "/", safe="/")
    parts = [f"{COOKIE}={value}", f"Path={path}", f"Max-Age={max_age}", "HttpOnly",
             "SameSite=Strict"]  # fmt: skip
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


def _safe_next(req: Request, target: str) -> str | None:
    """A redirect target below the mount, never another site (``//evil``, ``https://``)."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return None
    # visible ASCII only: browsers drop tabs and newlines from a URL ("/\t/evil" is then
    # "//evil", another site), and a CR or LF would end the Location header
    if not all(33 <= ord(ch) < 127 for ch in target):
        return None
    root = req.root or ""
    return target if target == root or target.startswith(root + "/") else None


# -- the login and logout routes (public: they take the credential themselves) --------------------
def login(req: Request, ctx: AdminContext) -> Response:
    """``POST /login``, a form (or JSON) with ``token`` (an admin token or admin JWT) and an
    optional ``next`` (a path below the mount to go to): sets the session cookie. With
    ``next``: 303 there (back to ``<mount>/login?failed=1`` on a bad token), else JSON
    ``{"who", "csrf", "expires"}`` (401 on a bad token)."""
    data = req.data()
    token, nxt = data.get("token"), data.get("next")
    target = _safe_next(req, nxt) if isinstance(nxt, str) else None
    if not same_origin(req):
        raise HTTPError(403, "csrf", "the request comes from another site")
    found = credentials(ctx, token) if isinstance(token, str) and len(token) < 16384 else None
    if found is None:
        audit_log.info("login refused from %s", req.client or "?")
        if target is not None:
            back = f"{req.root}/login?failed=1&next={quote(target, safe='/')}"
            return Response(303, "text/plain", b"", [("location", back)])
        raise unauthorized("wrong or missing admin token")
    cookie, admin = ctx.sessions.create(found[0], found[1], found[2])
    assert admin.expires is not None
    max_age = max(1, int(admin.expires - time.time()))
    header = ("set-cookie", _cookie_header(req, ctx, cookie, max_age))
    audit_log.info("login %s (%s) from %s", admin.who, found[1], req.client or "?")
    if target is not None:
        return Response(303, "text/plain", b"", [("location", target), header])
    body = {"who": admin.who, "csrf": admin.csrf, "expires": admin.expires}
    return json_response(body, headers=[header])


def logout(req: Request, ctx: AdminContext) -> Response:
    """``POST /logout`` (authenticated, CSRF-checked like every state change): ends the session
    and clears the cookie; a form with ``next`` is sent there (303), else JSON."""
    admin = req.admin
    if admin is not None and admin.via == "session":
        ctx.sessions.end(admin)
        audit_log.info("logout %s", admin.who)
    header = ("set-cookie", _cookie_header(req, ctx, "", 0))
    nxt = req.form().get("next")
    target = _safe_next(req, nxt) if nxt else None
    if target is not None:
        return Response(303, "text/plain", b"", [("location", target), header])
    return json_response({"ok": True}, headers=[header])
