"""The admin JSON API (``quota_middleware.admin``): every endpoint with an admin token and an
admin JWT, no/wrong credentials (401, no data), CSRF for cookie sessions, the audit trail (the
stream and the log), 400s naming the field, 404/405/413, idempotent replays, 503 when the store
is down; through both drivers (ASGI over ``httpx.ASGITransport`` and a real uvicorn with the app
mounted under a prefix, WSGI over werkzeug's test client and mounted in Flask) on the memory
store and a real redis-server (and one cluster case); and end to end with the middleware on the
same store: a block set through the API refuses the caller's next request, an override raises a
budget exactly, unblocking restores.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt as pyjwt
import pytest
from werkzeug.test import Client as WerkzeugClient

import ai_app
from _seed import Seeded, resolve, seed_config, seed_month
from ai_harness import PATH, chat, prompt_estimate
from quota_middleware import (
    AIRoute,
    Plan,
    QuotaConfig,
    QuotaMiddleware,
    RequestRate,
    TokenQuota,
    WSGIQuotaMiddleware,
)
from quota_middleware.admin import AdminApp, AdminConfig, Request, WSGIAdminApp
from quota_middleware.admin._auth import authenticate
from quota_middleware.config import StorageConfig
from quota_middleware.controls import Controls
from quota_middleware.fleet import period_days
from quota_middleware.identity import IdentityConfig
from quota_middleware.identity._apikeys import ApiKeyConfig
from quota_middleware.identity._jwt import JWTConfig

TOKEN = "qm-admin-token-for-the-tests-0123456789"
DIGEST = hashlib.sha256(TOKEN.encode()).hexdigest()
#: a second admin's token: both digests are in the policy
TOKEN2 = "another-admin-token-abcdefghijklmnop"
JWT_SECRET = "jwt-secret-of-the-tests-0123456789abcdef"
UNAUTHORIZED = {"error": "unauthorized", "message": "wrong or missing admin credentials"}
KINDS = ("asgi", "wsgi")


# -- the policy, the apps, and a client that speaks to either driver ------------------------------
def make_config(base: QuotaConfig | None = None, **admin: Any) -> QuotaConfig:
    """``base`` (default: the seed's policy) with an ``[admin]`` table (two admin tokens by
    digest, JWTs whose ``roles`` hold ``admin``), JWT verification and API keys."""
    base = base or seed_config()
    identity = IdentityConfig(
        resolver=resolve,
        anonymous="reject",
        jwt=JWTConfig(algorithms=["HS256"], secret=JWT_SECRET),
        api_keys=ApiKeyConfig(cache_ttl=0.0, negative_cache_ttl=0.0),
    )
    settings = AdminConfig(
        token_sha256=[DIGEST, hashlib.sha256(TOKEN2.encode()).hexdigest()],
        jwt_claim="roles",
        **admin,
    )
    return dataclasses.replace(base, identity=identity, admin=settings)


def admin_jwt(secret: str = JWT_SECRET, exp_in: float = 600, **claims: Any) -> str:
    payload: dict[str, Any] = {"sub": "ops@example.com", "roles": ["admin", "billing"],
                               "exp": int(time.time() + exp_in), **claims}  # fmt: skip
    return pyjwt.encode({k: v for k, v in payload.items() if v is not None}, secret, "HS256")


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


H = bearer(TOKEN)


@dataclasses.dataclass
class Resp:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """Requests to an ASGI app (``httpx.ASGITransport`` on a loop of its own) or a WSGI app
    (werkzeug's test client). Cookies are never kept: a test sends them itself."""

    def __init__(self, kind: str, app: Any, *, root_path: str = "") -> None:
        self.kind = kind
        if kind == "asgi":
            self.runner = asyncio.Runner()
            self.host = "admin.test"
            transport = httpx.ASGITransport(app=app, root_path=root_path)
            self.http = httpx.AsyncClient(transport=transport, base_url=f"http://{self.host}")
        else:
            self.host = "localhost"
            self.wsgi = WerkzeugClient(app, use_cookies=False)

    def __call__(
        self, method: str, path: str, *, headers: dict[str, str] | None = None,
        json_body: Any = None, content: bytes | None = None, form: dict[str, str] | None = None,
    ) -> Resp:  # fmt: skip
        headers = dict(headers or {})
        if json_body is not None:
            content = json.dumps(json_body).encode()
            headers.setdefault("content-type", "application/json")
        if form is not None:
            from urllib.parse import urlencode

            content = urlencode(form).encode()
            headers["content-type"] = "application/x-www-form-urlencoded"
        if self.kind == "asgi":
            r = self.runner.run(self.http.request(method, path, headers=headers, content=content))
            self.http.cookies.clear()
            return Resp(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content)
        w = self.wsgi.open(path, method=method, headers=headers, data=content or b"")
        return Resp(w.status_code, {k.lower(): v for k, v in w.headers.items()}, w.get_data())

    def get(self, path: str, **kw: Any) -> Resp:
        return self("GET", path, **kw)

    def stream(self, method: str, path: str, *, headers: dict[str, str], chunks: Any) -> Resp:
        """An ASGI request whose body is sent in chunks, without a Content-Length."""
        r = self.runner.run(self.http.request(method, path, headers=headers, content=chunks))
        return Resp(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content)

    def close(self) -> None:
        if self.kind == "asgi":
            self.runner.run(self.http.aclose())
            self.runner.close()


def admin_app(kind: str, config: QuotaConfig, store: Any) -> Any:
    return (AdminApp if kind == "asgi" else WSGIAdminApp)(config, store)


@pytest.fixture(params=[pytest.param("memory", marks=pytest.mark.memory, id="memory"),
                        pytest.param("redis", marks=pytest.mark.redis, id="redis")])  # fmt: skip
def backend_name(request: pytest.FixtureRequest) -> str:
    """The conftest ``backend`` fixture, here on the memory store and a real redis-server
    (fakeredis adds nothing the two do not cover; the cluster has a test of its own)."""
    name: str = request.param
    return name


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def admin(kind: str, backend: Any) -> Iterator[Client]:
    """A client of the admin app (the chosen driver) on an empty store of the chosen kind."""
    c = Client(kind, admin_app(kind, make_config(), backend.sync()))
    yield c
    c.close()


def session(c: Client, token: str = TOKEN) -> tuple[dict[str, str], str]:
    """Sign in through ``POST /login``: (the Cookie header, the session's CSRF token)."""
    r = c("POST", "/login", form={"token": token})
    assert r.status == 200, r.body
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    return {"cookie": cookie.split(";", 1)[0]}, r.json()["csrf"]


# every JSON route (and the one authenticated non-API one), with a body where it takes one: the
# credential tests run each; test_the_route_table_is_what_the_tests_cover keeps it complete
ENDPOINTS: list[tuple[str, str, Any]] = [
    ("GET", "/api/whoami", None),
    ("GET", "/api/usage?period=month", None),
    ("GET", "/api/usage/daily?days=7", None),
    ("GET", "/api/callers/acme/user-00000", None),
    ("GET", "/api/tenants?period=month", None),
    ("GET", "/api/tenants/acme", None),
    ("PUT", "/api/tenants/acme/block", {"reason": "x"}),
    ("DELETE", "/api/tenants/acme/block", None),
    ("GET", "/api/controls/acme/user-00000", None),
    ("PUT", "/api/controls/acme/user-00000/block", {"reason": "x"}),
    ("DELETE", "/api/controls/acme/user-00000/block", None),
    ("PUT", "/api/controls/acme/user-00000/limits/usd-month", {"value": 9}),
    ("DELETE", "/api/controls/acme/user-00000/limits/usd-month", None),
    ("GET", "/api/keys", None),
    ("POST", "/api/keys", {"caller": "mallory"}),
    ("GET", "/api/keys/AbCdEfGhIjKl", None),
    ("DELETE", "/api/keys/AbCdEfGhIjKl", None),
    ("POST", "/api/keys/AbCdEfGhIjKl/rotate", {}),
    ("GET", "/api/budgets", None),
    ("PUT", "/api/budgets/app-day", {"limit": 0}),
    ("DELETE", "/api/budgets/app-day", None),
    ("GET", "/api/alerts?limit=5", None),
    ("GET", "/api/alerts/dead", None),
    ("GET", "/api/spikes", None),
    ("GET", "/api/audit", None),
    ("POST", "/logout", None),
]


def test_the_route_table_is_what_the_tests_cover() -> None:
    """A route added to the API without a line in ENDPOINTS fails here."""
    app = AdminApp(make_config(), _memory())
    api = {(r.method, r.pattern) for r in app.router.routes
           if r.pattern.startswith("/api/") or r.pattern == "/logout"}  # fmt: skip
    covered = set()
    for method, path, _ in ENDPOINTS:
        route, _params = app.router.match(method, path.split("?")[0].split("/")[1:])
        covered.add((route.method, route.pattern))
    assert covered == api


def _memory() -> Any:
    from quota_middleware.backends.memory import MemoryBackend

    return MemoryBackend()


# -- every endpoint, with an admin token and with an admin JWT ------------------------------------
@pytest.fixture
def seeded(backend: Any) -> tuple[QuotaConfig, Seeded]:
    """A week of traffic from 8 callers through the real admit and settle path."""
    cfg = make_config()
    return cfg, seed_month(backend.sync(), cfg, callers=8, days=7)


def test_every_endpoint_answers_an_admin_token_and_an_admin_jwt(
    kind: str, backend: Any, seeded: tuple[QuotaConfig, Seeded]
) -> None:
    cfg, s = seeded
    c = Client(kind, admin_app(kind, cfg, backend.sync()))
    try:
        walk(c, bearer(TOKEN), cfg, backend, s, who=f"token:{DIGEST[:8]}", via="token")
        walk(c, bearer(admin_jwt()), cfg, backend, s, who="ops@example.com", via="jwt")
    finally:
        c.close()


def walk(c: Client, h: dict[str, str], cfg: QuotaConfig, backend: Any, s: Seeded, *, who: str,
         via: str) -> None:  # fmt: skip
    """Every endpoint once, each answer checked against what the store holds."""
    from quota_middleware.fleet import top_callers

    r = c.get("/api/whoami", headers=h)
    assert r.status == 200 and r.json() == {"who": who, "via": via, "csrf": None, "expires": None}

    # top callers of the month: the rollups agree with a SCAN of every caller's usage hashes,
    # and with what the seed settled
    month_days = period_days(cfg, "month")[1]
    month_cost = sum(s.per_day.get(d, 0) for d in month_days)
    scanned = top_callers(backend.sync(), cfg, period="month", by="cost", limit=None)
    r = c.get("/api/usage?period=month&by=cost&limit=1000", headers=h)
    assert r.status == 200, r.body
    u = r.json()
    assert u["days"] == month_days and u["count"] == len(scanned)
    assert [(x["tenant"], x["caller"], x["cost_micros"]) for x in u["callers"]] == [
        (x.tenant, x.caller, x.cost_micros) for x in scanned]  # fmt: skip
    assert u["shown_total"]["cost_micros"] == month_cost
    costs = [x["cost_micros"] for x in u["callers"]]
    assert costs == sorted(costs, reverse=True)
    for by, field in (("tokens", "total_tokens"), ("requests", "requests")):
        rows = c.get(f"/api/usage?period=month&by={by}&limit=3", headers=h).json()["callers"]
        values = [x[field] for x in rows]
        assert len(rows) == 3 and values == sorted(values, reverse=True), by
    top = u["callers"][0]
    only = c.get(f"/api/usage?period=month&tenant={top['tenant']}", headers=h).json()
    assert only["callers"] and {x["tenant"] for x in only["callers"]} == {top["tenant"]}
    today = c.get("/api/usage", headers=h).json()  # the default: today, by cost
    assert today["period"] == "day" and today["days"] == [s.days[-1]]
    assert today["shown_total"]["cost_micros"] == s.per_day.get(s.days[-1], 0)

    # the whole app per day and model: the seed's own totals, day by day
    r = c.get(f"/api/usage/daily?days={len(s.days)}", headers=h)
    assert r.status == 200
    daily = r.json()
    assert [d["day"] for d in daily["days"]] == s.days
    assert {d["day"]: d["total"]["cost_micros"] for d in daily["days"]} == {
        d: s.per_day.get(d, 0) for d in s.days}  # fmt: skip
    assert daily["total"]["cost_micros"] == s.cost_micros
    assert daily["total"]["requests"] == s.requests
    for d in daily["days"]:
        assert sum(m["cost_micros"] for m in d["models"].values()) == d["total"]["cost_micros"]

    # one caller: per-day per-model usage summing to its ranking row, what is left, controls
    r = c.get(f"/api/callers/{top['tenant']}/{top['caller']}", headers=h)
    assert r.status == 200
    one = r.json()
    assert one["caller"] == top["caller"] and one["tenant"] == top["tenant"]
    in_month = [x for x in one["usage"] if x["day"] in month_days]
    assert sum(x["cost_micros"] for x in in_month) == top["cost_micros"]
    assert sum(x["requests"] for x in in_month) == top["requests"]
    left = {x["name"]: x for x in one["remaining"]}
    assert set(left) == {"tokens-day", "usd-month"}  # quotas and budgets (a rate refills)
    assert left["usd-month"]["limit"] == 4_000_000
    assert left["usd-month"]["remaining"] == 4_000_000 - left["usd-month"]["used"]
    assert one["controls"] == {"caller": top["caller"], "tenant": top["tenant"], "block": None,
                               "tenant_block": None, "overrides": []}  # fmt: skip

    # tenants of the month: their spend adds up to the month's
    r = c.get("/api/tenants?period=month", headers=h)
    assert r.status == 200
    assert sum(t["cost_micros"] for t in r.json()["tenants"]) == month_cost
    r = c.get("/api/tenants/acme", headers=h)
    assert r.status == 200 and r.json() == {"tenant": "acme", "block": None, "budgets": []}

    # a tenant block, seen by any caller of the tenant, then lifted: once, on memory (on Redis
    # a tenant block writes its copy into each of the 16384 slots, 2-3 s: the end-to-end test
    # makes one there)
    if via == "token" and backend.name == "memory":
        r = c("PUT", "/api/tenants/acme/block", headers=h,
              json_body={"reason": "unpaid", "duration": "1h"})  # fmt: skip
        assert r.status == 200, r.body
        assert r.json()["whole_tenant"] is True and r.json()["reason"] == "unpaid"
        assert c.get("/api/tenants/acme", headers=h).json()["block"]["reason"] == "unpaid"
        shown = c.get("/api/controls/acme/anyone", headers=h).json()
        assert shown["tenant_block"]["reason"] == "unpaid" and shown["block"] is None
        r = c("DELETE", "/api/tenants/acme/block", headers=h)
        assert r.status == 200 and r.json()["removed"] is True
        assert c.get("/api/tenants/acme", headers=h).json()["block"] is None

    # a caller block and an override, read back, then undone
    t, who_c = top["tenant"], top["caller"]
    r = c("PUT", f"/api/controls/{t}/{who_c}/block", headers=h,
          json_body={"reason": "abuse", "scope": "ai", "duration": 600})  # fmt: skip
    assert r.status == 200, r.body
    assert r.json()["scope"] == "ai" and r.json()["whole_tenant"] is False
    r = c("PUT", f"/api/controls/{t}/{who_c}/limits/usd-month", headers=h,
          json_body={"value": 10, "expires": "2h"})  # fmt: skip
    assert r.status == 200, r.body
    assert r.json()["value"] == 10 and r.json()["kind"] == "budget" and r.json()["until"]
    state = c.get(f"/api/controls/{t}/{who_c}", headers=h).json()
    assert state["block"]["reason"] == "abuse" and state["overrides"][0]["name"] == "usd-month"
    left = {x["name"]: x for x in c.get(f"/api/callers/{t}/{who_c}", headers=h).json()["remaining"]}
    assert left["usd-month"]["limit"] == 10_000_000  # the override, not the plan's 4 USD
    r = c("DELETE", f"/api/controls/{t}/{who_c}/limits/usd-month", headers=h)
    assert r.status == 200 and r.json()["removed"] is True
    r = c("DELETE", f"/api/controls/{t}/{who_c}/block", headers=h)
    assert r.status == 200 and r.json()["removed"] is True
    assert c.get(f"/api/controls/{t}/{who_c}", headers=h).json()["block"] is None

    # API keys: create (the plain key once), list, show, rotate, revoke
    r = c("POST", "/api/keys", headers=h, json_body={"caller": "bob", "tenant": "acme"})
    assert r.status == 201, r.body
    made = r.json()
    plain, key_id = made["key"], made["key_id"]
    assert plain.startswith("qm_") and made["caller"] == "bob" and made["status"] == "active"
    listed = c.get("/api/keys?caller=bob", headers=h).json()["keys"]
    assert key_id in {k["key_id"] for k in listed} and all("key" not in k for k in listed)
    assert key_id in {k["key_id"] for k in c.get("/api/keys", headers=h).json()["keys"]}
    assert c.get(f"/api/keys/{key_id}", headers=h).json()["caller"] == "bob"
    r = c("POST", f"/api/keys/{key_id}/rotate", headers=h, json_body={"grace": 0})
    assert r.status == 201, r.body
    rotated = r.json()
    assert rotated["old"]["key_id"] == key_id and rotated["new"]["caller"] == "bob"
    assert rotated["key"] != plain and rotated["key"].startswith("qm_")
    new_id = rotated["new"]["key_id"]
    r = c("DELETE", f"/api/keys/{new_id}", headers=h)
    assert r.status == 200 and r.json()["revoked"] is True and r.json()["key"]["revoked"] is True
    r = c("DELETE", f"/api/keys/{new_id}", headers=h)  # again: nothing to do
    assert r.status == 200 and r.json()["revoked"] is False

    # the app budgets, and the kill switch
    r = c.get("/api/budgets", headers=h)
    assert r.status == 200
    budgets = {b["name"]: b for b in r.json()["budgets"]}
    assert set(budgets) == {"app-day", "app-month"}
    assert budgets["app-day"]["spent"] == s.per_day.get(s.days[-1], 0)
    assert budgets["app-month"]["spent"] == month_cost
    assert budgets["app-day"]["limit"] == budgets["app-day"]["configured"] == 5_000_000
    r = c("PUT", "/api/budgets/app-day", headers=h, json_body={"limit": 0})
    assert r.status == 200, r.body
    assert r.json()["limit"] == 0 and r.json()["override"] == 0 and r.json()["spent_out"] is True
    r = c("DELETE", "/api/budgets/app-day", headers=h)
    assert r.status == 200 and r.json()["limit"] == 5_000_000 and r.json()["override"] is None

    # the outbox (the seed's threshold alerts and its spike), dead letters, the audit trail
    r = c.get("/api/alerts?limit=3", headers=h)
    assert r.status == 200
    events = r.json()["events"]
    assert 1 <= len(events) <= 3 and all(e["type"] and e["at_iso"] for e in events)
    ats = [e["at"] for e in c.get("/api/alerts?limit=1000", headers=h).json()["events"]]
    assert ats == sorted(ats, reverse=True)
    assert c.get("/api/alerts/dead", headers=h).json() == {"dead": []}
    spikes = c.get("/api/spikes", headers=h).json()["spikes"]
    assert s.spiker is not None
    assert [(e["tenant"], e["caller"]) for e in spikes][:1] == [s.spiker]
    entries = c.get("/api/audit?limit=14", headers=h).json()["entries"]
    mine = ["budget.restore", "budget.set", "key.revoke", "key.rotate", "key.create", "unblock",
            "override.unset", "override.set", "block"]  # fmt: skip
    if via == "token" and backend.name == "memory":
        mine += ["unblock", "block"]  # the tenant's
    assert [e["action"] for e in entries[: len(mine)]] == mine
    assert {e["who"] for e in entries[: len(mine)]} == {who}
    blocked = entries[8]
    assert blocked["target"] == f"caller:{t}/{who_c}" and blocked["before"] is None
    assert blocked["after"]["reason"] == "abuse" and blocked["after"]["scope"] == "ai"


# -- wrong or missing credentials: 401 and nothing else -------------------------------------------
def _bad_credentials() -> list[tuple[str, dict[str, str]]]:
    import jwt as pyjwt_

    exp = int(time.time() + 600)
    return [
        ("none", {}),
        ("wrong token", bearer("not-the-admin-token")),
        ("token + 1 char", bearer(TOKEN + "x")),
        ("the digest itself", bearer(DIGEST)),
        ("right token, Basic scheme", {"authorization": f"Basic {TOKEN}"}),
        ("empty bearer", {"authorization": "Bearer "}),
        ("JWT of another secret", bearer(admin_jwt(secret="another-secret-0123456789abcdefgh"))),
        ("JWT without the role", bearer(admin_jwt(roles=["billing", "administrator"]))),
        ("JWT role as a word inside", bearer(admin_jwt(roles="nonadmin billing"))),
        ("JWT role 'true' as text", bearer(admin_jwt(roles="true"))),
        ("JWT role 1", bearer(admin_jwt(roles=1))),
        ("JWT without roles", bearer(admin_jwt(roles=None))),
        ("expired JWT", bearer(admin_jwt(exp_in=-60))),
        ("JWT subject of two lines", bearer(admin_jwt(sub="ops\nFAKE audit line"))),
        ("JWT without a subject", bearer(admin_jwt(sub=None))),
        (
            "JWT alg none",
            bearer(
                pyjwt_.encode({"sub": "x", "roles": ["admin"], "exp": exp}, None, algorithm="none")
            ),
        ),  # fmt: skip
        ("forged cookie", {"cookie": "qm_admin=eyJ3IjoidG9rZW46eCJ9.c2lnbmF0dXJl"}),
        ("garbage cookie", {"cookie": "qm_admin=...; other=1"}),
    ]


def test_no_or_wrong_credentials_are_401_without_data(admin: Client) -> None:
    for label, headers in _bad_credentials():
        for method, path, body in ENDPOINTS:
            r = admin(method, path, headers=headers, json_body=body)
            assert r.status == 401, (label, method, path, r.body)
            assert r.json() == UNAUTHORIZED, (label, method, path)  # the whole body: no data
            assert r.headers["www-authenticate"].startswith("Bearer"), (label, path)
            assert r.headers["cache-control"] == "no-store"
    # nothing was changed by any of them
    assert admin.get("/api/audit", headers=H).json() == {"entries": []}
    assert admin.get("/api/keys", headers=H).json() == {"keys": []}
    state = admin.get("/api/controls/acme/user-00000", headers=H).json()
    assert state["block"] is None and state["overrides"] == []
    day = {b["name"]: b for b in admin.get("/api/budgets", headers=H).json()["budgets"]}
    assert day["app-day"]["override"] is None


def test_a_jwt_role_rule_that_says_admin(admin: Client) -> None:
    """The claim rule: JSON true, a space-separated word, or a list item equal to ``admin``."""
    for roles in (True, "billing admin", ["admin"]):
        r = admin.get("/api/whoami", headers=bearer(admin_jwt(roles=roles)))
        assert r.status == 200 and r.json()["who"] == "ops@example.com", roles
    r = admin.get("/api/whoami", headers=bearer(TOKEN2))
    assert r.json()["who"] == "token:" + hashlib.sha256(TOKEN2.encode()).hexdigest()[:8]


# -- browser sessions and CSRF ------------------------------------------------------------------
def test_a_cookie_session_needs_the_csrf_token_and_its_own_origin(
    kind: str, backend: Any, admin: Client
) -> None:
    cookie, csrf = session(admin)
    me = admin.get("/api/whoami", headers=cookie).json()
    assert me["who"] == f"token:{DIGEST[:8]}" and me["via"] == "session" and me["csrf"] == csrf
    path = "/api/controls/acme/carol/block"
    body = {"reason": "csrf test"}
    own = f"http://{admin.host}"
    refused = [
        {},  # no token
        {"x-csrf-token": "not-the-token"},
        {"x-csrf-token": csrf, "origin": "http://evil.example"},
        {"x-csrf-token": csrf, "origin": f"http://{admin.host}.evil.example"},
        {"x-csrf-token": csrf, "referer": "https://evil.example/admin/api"},
        {"x-csrf-token": csrf, "origin": "null"},
    ]
    for extra in refused:
        r = admin("PUT", path, headers={**cookie, **extra}, json_body=body)
        assert r.status == 403 and r.json()["error"] == "csrf", extra
    for method in ("DELETE", "POST"):  # every state-changing method, not only PUT
        target = path if method == "DELETE" else "/api/keys"
        r = admin(method, target, headers=cookie, json_body={"caller": "x"})
        assert r.status == 403 and r.json()["error"] == "csrf", method
    assert admin.get("/api/controls/acme/carol", headers=H).json()["block"] is None
    assert admin.get("/api/keys", headers=H).json() == {"keys": []}
    # the token and the site's own origin (or none: browsers send one on every POST)
    r = admin("PUT", path, headers={**cookie, "x-csrf-token": csrf, "origin": own}, json_body=body)
    assert r.status == 200, r.body
    r = admin("PUT", path, headers={**cookie, "x-csrf-token": csrf,
                                    "referer": own + "/ui/"}, json_body=body)  # fmt: skip
    assert r.status == 200, r.body
    r = admin("PUT", path, headers=cookie, form={"csrf": csrf, "reason": "from a form"})
    assert r.status == 200 and r.json()["reason"] == "from a form"
    entries = admin.get("/api/audit", headers=H).json()["entries"]
    assert [e["who"] for e in entries] == [f"token:{DIGEST[:8]}"] * 3
    # an Authorization header cannot be forged by another site: no CSRF token needed
    r = admin("PUT", path, headers={**H, "origin": "http://evil.example"}, json_body=body)
    assert r.status == 200
    # a wrong header is refused even with a good cookie
    r = admin.get("/api/whoami", headers={**cookie, **bearer("wrong")})
    assert r.status == 401 and r.json() == UNAUTHORIZED
    # HTTP/2 sends each cookie in a header of its own (ASGI scopes keep them apart)
    req = Request.build("GET", "/api/whoami", headers=[("cookie", "theme=dark"),
                        ("cookie", cookie["cookie"]), ("host", admin.host)])  # fmt: skip
    ctx = AdminApp(make_config(), backend.sync()).context
    found = authenticate(req, ctx)
    assert found is not None and found.via == "session"
    # a tampered cookie is refused
    name, _, value = cookie["cookie"].partition("=")
    r = admin.get("/api/whoami", headers={"cookie": f"{name}={value[:-2]}xx"})
    assert r.status == 401 and r.json() == UNAUTHORIZED
    # another worker on the same store accepts the session (the signing key is in the store)
    other = Client(kind, admin_app(kind, make_config(), backend.sync()))
    try:
        assert other.get("/api/whoami", headers=cookie).json()["via"] == "session"
    finally:
        other.close()
    # logout is a state change too; then the cookie is dead everywhere
    assert admin("POST", "/logout", headers=cookie).status == 403
    r = admin("POST", "/logout", headers={**cookie, "x-csrf-token": csrf})
    assert r.status == 200 and "Max-Age=0" in r.headers["set-cookie"]
    r = admin.get("/api/whoami", headers=cookie)
    assert r.status == 401 and r.json() == UNAUTHORIZED


def test_login_refuses_wrong_tokens_and_other_sites(admin: Client) -> None:
    for token in ("wrong", "", DIGEST, admin_jwt(roles=["billing"])):
        r = admin("POST", "/login", form={"token": token})
        assert r.status == 401 and r.json()["error"] == "unauthorized", token
        assert "set-cookie" not in r.headers
    r = admin("POST", "/login", headers={"origin": "http://evil.example"}, form={"token": TOKEN})
    assert r.status == 403 and "set-cookie" not in r.headers
    # a JWT login lasts no longer than the JWT
    token = admin_jwt(exp_in=120)
    r = admin("POST", "/login", json_body={"token": token})
    assert r.status == 200 and r.json()["who"] == "ops@example.com"
    assert r.json()["expires"] <= time.time() + 121
    max_age = int(r.headers["set-cookie"].split("Max-Age=")[1].split(";")[0])
    assert 100 <= max_age <= 120


# -- the audit trail, idempotent replays, no secret anywhere -------------------------------------
def test_changes_are_audited_in_the_stream_and_the_log_without_secrets(
    admin: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    path = "/api/controls/acme/dave/block"
    rid = {"x-request-id": "req-42"}
    first = admin("PUT", path, headers={**H, **rid}, json_body={"reason": "spam", "duration": 60})
    assert first.status == 200
    # PUT again with the same block: the same state (one block), audited again
    again = admin("PUT", path, headers=H, json_body={"reason": "spam", "duration": 60})
    assert again.status == 200 and again.json()["reason"] == "spam"
    changed = admin("PUT", path, headers=bearer(admin_jwt()), json_body={"reason": "fraud"})
    assert changed.status == 200
    state = admin.get("/api/controls/acme/dave", headers=H).json()
    assert state["block"] == changed.json()
    override = "/api/controls/acme/dave/limits/tokens-day"
    for _ in range(2):  # PUT twice: one override
        r = admin("PUT", override, headers=H, json_body={"value": 5000})
        assert r.status == 200 and r.json()["value"] == 5000
    assert len(admin.get("/api/controls/acme/dave", headers=H).json()["overrides"]) == 1
    assert admin("DELETE", path, headers=H).json()["removed"] is True
    assert admin("DELETE", path, headers=H).json() == {"removed": False, "before": None}
    entries = admin.get("/api/audit", headers=H).json()["entries"]
    assert [e["action"] for e in entries] == [
        "unblock", "override.set", "override.set", "block", "block", "block"]  # fmt: skip
    unblock, _, _, fraud, spam2, spam1 = entries
    assert spam1["before"] is None and spam1["after"]["reason"] == "spam"
    assert spam1["request_id"] == "req-42" and spam1["who"] == f"token:{DIGEST[:8]}"
    assert spam2["before"]["reason"] == "spam"
    assert fraud["who"] == "ops@example.com" and fraud["before"]["reason"] == "spam"
    assert fraud["after"] == changed.json() and fraud["target"] == "caller:acme/dave"
    assert unblock["before"]["reason"] == "fraud" and unblock["after"] is None
    assert entries[1]["before"]["value"] == 5000 and entries[2]["before"] is None
    assert all(abs(e["at"] - time.time()) < 60 for e in entries)
    # one INFO line per entry on the audit logger, with the same fields
    logged = [r for r in caplog.records if r.name == "quota_middleware.audit"
              and hasattr(r, "audit")]  # fmt: skip
    assert all(r.levelno == logging.INFO for r in logged)
    assert [r.audit["action"] for r in logged] == [e["action"] for e in reversed(entries)]
    for rec, entry in zip(logged, reversed(entries), strict=True):
        assert {**rec.audit, "id": entry["id"]} == entry

    # a key created twice with one Idempotency-Key: one key; its secret written nowhere
    idem = {**H, "idempotency-key": "create-erin-1"}
    r1 = admin("POST", "/api/keys", headers=idem, json_body={"caller": "erin", "tenant": "acme"})
    r2 = admin("POST", "/api/keys", headers=idem, json_body={"caller": "erin", "tenant": "acme"})
    assert r1.status == 201 and r2.status == 200
    plain = r1.json()["key"]
    assert r2.json()["key_id"] == r1.json()["key_id"] and r2.json()["replayed"] is True
    assert "key" not in r2.json()
    assert [k["key_id"] for k in admin.get("/api/keys?caller=erin", headers=H).json()["keys"]] == [
        r1.json()["key_id"]]  # fmt: skip
    # the same key with another request: refused, not a second key
    r3 = admin("POST", "/api/keys", headers=idem, json_body={"caller": "frank"})
    assert r3.status == 422 and r3.json()["error"] == "idempotency_key_reused"
    # another admin's same Idempotency-Key is theirs
    r4 = admin("POST", "/api/keys", headers={**bearer(TOKEN2), "idempotency-key": "create-erin-1"},
               json_body={"caller": "erin", "tenant": "acme"})  # fmt: skip
    assert r4.status == 201 and r4.json()["key_id"] != r1.json()["key_id"]
    # rotation with an Idempotency-Key: the replay names the same new key
    rot = {**H, "idempotency-key": "rotate-erin-1"}
    k1 = admin("POST", f"/api/keys/{r1.json()['key_id']}/rotate", headers=rot, json_body={})
    k2 = admin("POST", f"/api/keys/{r1.json()['key_id']}/rotate", headers=rot, json_body={})
    assert k1.status == 201 and k2.status == 200 and "key" not in k2.json()
    assert k2.json()["new"]["key_id"] == k1.json()["new"]["key_id"]
    secrets_ = [plain, r4.json()["key"], k1.json()["key"], TOKEN, TOKEN2]
    audit_text = admin.get("/api/audit?limit=1000", headers=H).body.decode()
    creates = [e for e in json.loads(audit_text)["entries"] if e["action"] == "key.create"]
    assert len(creates) == 2 and creates[-1]["idempotency_key"] == "create-erin-1"
    logs = caplog.text + "".join(repr(r.__dict__) for r in caplog.records)
    for secret in secrets_:
        assert secret not in audit_text and secret not in logs
        assert secret.split("_")[-1] not in audit_text and secret.split("_")[-1] not in logs


def test_the_admin_tokens_and_jwts_are_never_logged(
    admin: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = admin_jwt()
    admin("POST", "/login", form={"token": TOKEN})
    admin("POST", "/login", form={"token": "a-wrong-token-typed-by-hand"})
    admin("POST", "/login", form={"token": token})
    admin.get("/api/whoami", headers=bearer(token))
    admin.get("/api/whoami", headers=bearer("a-wrong-token-typed-by-hand"))
    logs = caplog.text + "".join(repr(r.__dict__) for r in caplog.records)
    assert "login token:" in logs  # the log says who signed in...
    for secret in (TOKEN, token, token.split(".")[2], "a-wrong-token-typed-by-hand"):
        assert secret not in logs  # ...never with what


# -- bad input: 400 naming the field, 404, 405, 413 -----------------------------------------------
BLOCK = "/api/controls/acme/user-00000/block"
LIMIT = "/api/controls/acme/user-00000/limits"
BAD: list[tuple[str, str, Any, str]] = [
    ("GET", "/api/usage?limit=abc", None, "limit"),
    ("GET", "/api/usage?limit=0", None, "limit"),
    ("GET", "/api/usage?limit=1001", None, "limit"),
    ("GET", "/api/usage?limit=-3", None, "limit"),
    ("GET", "/api/usage?limit=%C2%B2", None, "limit"),  # "²".isdigit(), but not for int()
    ("GET", "/api/usage?period=year", None, "period"),
    ("GET", "/api/usage?by=dollars", None, "by"),
    ("GET", "/api/usage?tenant=" + "t" * 300, None, "tenant"),
    ("GET", "/api/usage/daily?days=0", None, "days"),
    ("GET", "/api/usage/daily?days=x", None, "days"),
    ("GET", "/api/tenants?period=decade", None, "period"),
    ("GET", "/api/callers/acme/bob?days=0", None, "days"),
    ("GET", "/api/callers/acme/bob?plan=gold", None, "plan"),
    ("GET", "/api/callers/acme/" + "c" * 300, None, "caller"),
    ("GET", "/api/alerts?limit=1e3", None, "limit"),
    ("GET", "/api/alerts/dead?limit=0", None, "limit"),
    ("GET", "/api/spikes?limit=zero", None, "limit"),
    ("GET", "/api/audit?limit=99999", None, "limit"),
    ("GET", "/api/budgets?tenant=%00", None, "tenant"),
    ("PUT", BLOCK, b"{not json", "body"),
    ("PUT", BLOCK, b"\xff\xfe", "body"),
    ("PUT", BLOCK, [1, 2], "body"),
    ("PUT", BLOCK, {"duration": "forever"}, "duration"),
    ("PUT", BLOCK, {"duration": -5}, "duration"),
    ("PUT", BLOCK, {"duration": 0}, "duration"),
    ("PUT", BLOCK, {"duration": True}, "duration"),
    ("PUT", BLOCK, {"duration": "20y"}, "duration"),
    ("PUT", BLOCK, {"scope": "everything"}, "scope"),
    ("PUT", BLOCK, {"reason": 123}, "reason"),
    ("PUT", BLOCK, {"reason": "x" * 501}, "reason"),
    ("PUT", BLOCK, {"colour": "red"}, "colour"),
    ("PUT", "/api/tenants/acme/block", {"duration": "1 fortnight"}, "duration"),
    ("PUT", f"{LIMIT}/usd-month", {"value": "lots"}, "value"),
    ("PUT", f"{LIMIT}/usd-month", {"value": True}, "value"),
    ("PUT", f"{LIMIT}/usd-month", {"value": None}, "value"),
    ("PUT", f"{LIMIT}/usd-month", {"value": -1}, "value"),
    ("PUT", f"{LIMIT}/usd-month", {}, "value"),
    ("PUT", f"{LIMIT}/usd-month", b'{"value": 1e400}', "value"),  # inf
    ("PUT", f"{LIMIT}/usd-month", {"value": 1e30}, "value"),
    ("PUT", f"{LIMIT}/usd-month", {"value": 5, "burst": 2}, "burst"),  # not a rate
    ("PUT", f"{LIMIT}/rpm", {"value": 5, "burst": 10**30}, "burst"),
    ("PUT", f"{LIMIT}/usd-month", {"value": 5, "expires": "soon"}, "expires"),
    ("PUT", f"{LIMIT}/usd-month", {"value": 5, "plan": "gold"}, "plan"),
    ("PUT", f"{LIMIT}/tokens-day", {"value": 1.5}, "value"),
    ("PUT", f"{LIMIT}/rpm", {"value": "many/second"}, "value"),
    ("PUT", f"{LIMIT}/rpm", {"value": 5, "burst": 0}, "burst"),
    ("PUT", f"{LIMIT}/no-such-limit", {"value": 5}, "name"),
    ("POST", "/api/keys", {}, "caller"),
    ("POST", "/api/keys", {"caller": ""}, "caller"),
    ("POST", "/api/keys", {"caller": 7}, "caller"),
    ("POST", "/api/keys", {"caller": "bob", "tenant": ""}, "tenant"),
    ("POST", "/api/keys", {"caller": "bob", "plan": "gold"}, "plan"),
    ("POST", "/api/keys", {"caller": "bob", "expires_in": "x"}, "expires_in"),
    ("POST", "/api/keys", {"caller": "bob", "secret": "mine"}, "secret"),
    ("POST", "/api/keys", b"[]", "body"),
    ("PUT", "/api/budgets/app-day", {"limit": -1}, "limit"),
    ("PUT", "/api/budgets/app-day", {"limit": "abc"}, "limit"),
    ("PUT", "/api/budgets/app-day", {"limit": float("nan")}, "limit"),
    ("PUT", "/api/budgets/app-day", {}, "limit"),
    ("PUT", "/api/budgets/app-day", {"limit": 1e30}, "limit"),
    ("PUT", "/api/budgets/app-day", b'{"limit": 1e400}', "limit"),
    ("PUT", "/api/budgets/app-day", {"limit": 1, "until": "x"}, "until"),
]


def test_bad_input_is_a_400_naming_the_field(admin: Client) -> None:
    for method, path, body, field in BAD:
        if isinstance(body, bytes):
            r = admin(method, path, headers={**H, "content-type": "application/json"},
                      content=body)  # fmt: skip
        else:
            r = admin(method, path, headers=H, json_body=body)
        assert r.status == 400, (method, path, body, r.status, r.body)
        data = r.json()
        assert data["error"] == "invalid" and data["field"] == field, (path, body, data)
        assert data["message"] and "Traceback" not in data["message"]
    r = admin("POST", "/api/keys", headers={**H, "idempotency-key": "k" * 300},
              json_body={"caller": "bob"})  # fmt: skip
    assert r.status == 400 and r.json()["field"] == "Idempotency-Key"
    # nothing bad was written
    assert admin.get("/api/audit", headers=H).json() == {"entries": []}
    assert admin.get("/api/keys", headers=H).json() == {"keys": []}


def test_unknown_things_are_404_and_wrong_methods_405(admin: Client) -> None:
    for method, path, body in [
        ("PUT", "/api/budgets/no-such-budget", {"limit": 1}),
        ("DELETE", "/api/budgets/no-such-budget", None),
        ("GET", "/api/keys/AbCdEfGhIjKl", None),
        ("DELETE", "/api/keys/AbCdEfGhIjKl", None),
        ("POST", "/api/keys/AbCdEfGhIjKl/rotate", {}),
        ("DELETE", "/api/keys/not-a-key-id!", None),
    ]:
        r = admin(method, path, headers=H, json_body=body)
        assert r.status == 404 and r.json()["error"] == "not_found", (method, path, r.body)
    for path in ("/api/nope", "/api", "/api/keys/a/b/c", "/nope", "/api/callers/acme"):
        r = admin.get(path, headers=H)
        assert r.status == 404 and r.json() == {"error": "not_found"}, path
    for method, path, allow in [
        ("DELETE", "/api/keys", "GET, POST"),
        ("PATCH", "/api/budgets/app-day", "DELETE, PUT"),
        ("POST", "/api/usage", "GET"),
        ("GET", "/logout", "POST"),
        ("PUT", "/api/controls/acme/bob", "GET"),
    ]:
        r = admin(method, path, headers=H, json_body={})
        assert r.status == 405 and r.json() == {"error": "method_not_allowed"}, (method, path)
        assert r.headers["allow"] == allow
    # HEAD is a GET without the body
    r = admin("HEAD", "/api/whoami", headers=H)
    assert r.status == 200 and r.body == b""


def test_a_body_over_64_kib_is_413(admin: Client) -> None:
    big = json.dumps({"reason": "x" * (64 * 1024)}).encode()
    r = admin("PUT", BLOCK, headers={**H, "content-type": "application/json"}, content=big)
    assert r.status == 413 and r.json()["error"] == "too_large"
    r = admin("PUT", BLOCK, headers={"content-type": "application/json"}, content=big)
    assert r.status == 413  # before any credential is looked at: nothing was read
    # exactly 64 KiB is read (and the reason is then too long: a 400, not a 413)
    exact = b'{"reason":"' + b"x" * (64 * 1024 - 13) + b'"}'
    assert len(exact) == 64 * 1024
    r = admin("PUT", BLOCK, headers={**H, "content-type": "application/json"}, content=exact)
    assert r.status == 400 and r.json()["field"] == "reason"
    if admin.kind == "asgi":  # no Content-Length (chunked): counted while it is read

        async def chunks() -> Any:
            for _ in range(70):
                yield b"x" * 1024

        r = admin.stream("PUT", BLOCK, headers=H, chunks=chunks())
        assert r.status == 413 and r.json()["error"] == "too_large"
    assert admin.get("/api/audit", headers=H).json() == {"entries": []}


# -- the store down: 503, then back ---------------------------------------------------------------
@pytest.mark.redis
@pytest.mark.parametrize("kind", KINDS)
def test_503_while_the_store_is_down_then_back(kind: str, fresh_redis_server: Any) -> None:
    cfg = make_config(seed_config(url=fresh_redis_server.url))
    app = (AdminApp if kind == "asgi" else WSGIAdminApp)(cfg)  # the backend of [storage]
    c = Client(kind, app)
    try:
        cookie, csrf = session(c)
        assert c.get("/api/usage", headers=H).status == 200
        fresh_redis_server.stop(keep_dir=True)
        down = {"error": "store_unavailable", "message": "the store cannot be reached"}
        for method, path, body in ENDPOINTS:
            if path in ("/api/whoami", "/logout"):  # they need no store
                continue
            t0 = time.perf_counter()
            r = c(method, path, headers=H, json_body=body)
            assert r.status == 503 and r.json() == down, (method, path, r.status, r.body)
            assert r.headers["retry-after"] == "1"
            assert time.perf_counter() - t0 < 5, path
        # a session is checked against the store (its key, logged-out sessions): 503 too
        r = c.get("/api/usage", headers=cookie)
        assert r.status == 503 and r.json() == down
        r = c("POST", "/login", form={"token": TOKEN})
        assert r.status in (200, 503)  # the signing key may still be in this process's cache
        # wrong credentials stay a 401 (never a 503 that tells the store is down)
        r = c.get("/api/usage", headers=bearer("wrong"))
        assert r.status == 401 and r.json() == UNAUTHORIZED
        fresh_redis_server.restart()
        deadline = time.monotonic() + 10
        while (r := c.get("/api/usage", headers=H)).status != 200:
            assert time.monotonic() < deadline, r.body
            time.sleep(0.1)
        assert c.get("/api/whoami", headers=cookie).json()["via"] == "session"
        r = c("PUT", BLOCK, headers={**cookie, "x-csrf-token": csrf}, json_body={"reason": "ok"})
        assert r.status == 200
    finally:
        c.close()
        app.close()


# -- end to end: the API's changes and the middleware on the same store --------------------------
def _ai_policy(quota: int) -> QuotaConfig:
    return make_config(QuotaConfig(
        plans=[Plan(name="standard", limits=[
            RequestRate(rate="1000/minute", name="rpm"),
            TokenQuota(tokens=quota, period="day", name="tokens-day")])],
        ai_routes=[AIRoute(path=PATH, format="openai-chat", default_output_tokens=100)],
    ))  # fmt: skip


def _ai_body() -> tuple[dict[str, Any], int]:
    """A chat request whose reported usage equals its admission's reservation: (body, tokens)."""
    body = chat(max_tokens=50, x_completion=50, x_prompt=0)
    body["x_prompt"] = prompt_estimate(body)
    return body, body["x_prompt"] + 50


def _middleware(kind: str, cfg: QuotaConfig, backend: Any) -> Any:
    if kind == "asgi":
        return QuotaMiddleware(ai_app.asgi_app, config=cfg, backend=backend.async_())
    return WSGIQuotaMiddleware(ai_app.wsgi_app, config=cfg, backend=backend.sync())


def test_the_api_blocks_overrides_and_keys_act_on_the_next_request(kind: str, backend: Any) -> None:
    body, used = _ai_body()
    cfg = _ai_policy(3 * used)
    api = Client(kind, admin_app(kind, cfg, backend.sync()))
    app = Client(kind, _middleware(kind, cfg, backend))
    carol = {"x-caller": "carol", "x-tenant": "acme"}

    def call(headers: dict[str, str] = carol) -> Resp:
        return app("POST", PATH, headers=headers, json_body=body)

    try:
        assert call().status == 200
        # a block through the API refuses the very next request; another caller goes on
        t0 = time.perf_counter()
        r = api("PUT", "/api/controls/acme/carol/block", headers=H,
                json_body={"reason": "abuse of the API"})  # fmt: skip
        assert r.status == 200
        refused = call()
        latency = time.perf_counter() - t0
        assert refused.status == 403, refused.body
        error = refused.json()["error"]
        assert error["code"] == "caller_blocked" and error["reason"] == "abuse of the API"
        assert call({"x-caller": "dan", "x-tenant": "acme"}).status == 200
        assert call({"x-caller": "carol", "x-tenant": "other"}).status == 200  # another tenant
        print(f"block through the API -> next request refused: {latency * 1000:.1f} ms")
        assert api("DELETE", "/api/controls/acme/carol/block", headers=H).json()["removed"]
        assert call().status == 200
        # an AI-only block lets other routes through
        api("PUT", "/api/controls/acme/carol/block", headers=H, json_body={"scope": "ai"})
        assert call().status == 403
        other = app("POST", "/v1/other", headers=carol, json_body=body)
        assert other.status == 200
        api("DELETE", "/api/controls/acme/carol/block", headers=H)

        # the plan's quota: 3 requests' tokens; 2 were used, so one more, then refused
        assert call().status == 200
        assert call().status == 429
        left = api.get("/api/callers/acme/carol", headers=H).json()["remaining"]
        assert [(q["limit"], q["used"], q["remaining"]) for q in left] == [
            (3 * used, 3 * used, 0)]  # fmt: skip
        # an override raises it by exactly two requests' tokens
        r = api("PUT", "/api/controls/acme/carol/limits/tokens-day", headers=H,
                json_body={"value": 5 * used})  # fmt: skip
        assert r.status == 200 and r.json()["value"] == 5 * used
        left = api.get("/api/callers/acme/carol", headers=H).json()["remaining"]
        assert [(q["limit"], q["remaining"]) for q in left] == [(5 * used, 2 * used)]
        ok = call()
        assert ok.status == 200 and f'"tokens-day";r={used};' in ok.headers["ratelimit"]
        assert call().status == 200
        assert call().status == 429  # exactly two
        # unset: back to the plan's number
        api("DELETE", "/api/controls/acme/carol/limits/tokens-day", headers=H)
        left = api.get("/api/callers/acme/carol", headers=H).json()["remaining"]
        assert [(q["limit"], q["remaining"]) for q in left] == [(3 * used, 0)]

        # an API key made through the API identifies its caller; revoked, it does not
        made = api("POST", "/api/keys", headers=H,
                   json_body={"caller": "erin", "tenant": "acme"}).json()  # fmt: skip
        r = call({"x-api-key": made["key"]})
        assert r.status == 200, r.body
        usage = api.get("/api/callers/acme/erin", headers=H).json()["totals"]
        assert usage["requests"] == 1 and usage["total_tokens"] == used
        api("DELETE", f"/api/keys/{made['key_id']}", headers=H)
        r = call({"x-api-key": made["key"]})
        assert r.status == 401, r.body
    finally:
        app.close()
        api.close()


# -- mounted under a prefix in real apps ---------------------------------------------------------
ODD_CALLER = "a/b c+d%41"  # an encoded "/" stays inside one id, "%41" is decoded once only
ODD_PATH = "a%2Fb%20c%2Bd%2541"


@pytest.mark.redis
def test_through_uvicorn_mounted_under_a_prefix_in_fastapi(redis_server: Any) -> None:
    """The deployment shape: FastAPI mounts the admin app at /admin beside the app behind the
    middleware, uvicorn serves both on a real redis-server; root_path is honoured (links, the
    cookie's Path), ids are decoded per segment, a block stops the caller on the next request."""
    from fastapi import FastAPI

    from fake_provider import ServerThread

    body, used = _ai_body()
    cfg = _ai_policy(100 * used)
    cfg = dataclasses.replace(cfg, storage=StorageConfig(url=redis_server.url, prefix="mnt"))
    admin = AdminApp(cfg)
    outer = FastAPI()
    outer.mount("/admin", admin)
    outer.mount("/", QuotaMiddleware(ai_app.asgi_app, config=cfg))
    with ServerThread(outer) as server, httpx.Client(base_url=server.url, timeout=10) as http:
        r = http.get("/admin/api/whoami", headers=H)
        assert r.status_code == 200 and r.json()["via"] == "token"
        assert http.get("/api/whoami", headers=H).status_code != 200  # not mounted there
        r = http.get("/admin/api/nope", headers=H)
        assert r.status_code == 404 and r.json() == {"error": "not_found"}
        r = http.get("/admin/api/whoami")
        assert r.status_code == 401 and r.json() == UNAUTHORIZED
        r = http.post("/admin/login", data={"token": TOKEN})
        assert r.status_code == 200 and "Path=/admin;" in r.headers["set-cookie"]
        cookie = {"cookie": r.headers["set-cookie"].split(";", 1)[0]}
        csrf = r.json()["csrf"]
        http.cookies.clear()
        # a caller id with "/", a space, "+" and a non-ASCII letter, through the real server
        carol = {"x-caller": ODD_CALLER, "x-tenant": "acme"}
        assert http.post(PATH, json=body, headers=carol).status_code == 200
        r = http.get(f"/admin/api/callers/acme/{ODD_PATH}", headers=H)
        assert r.status_code == 200, r.text
        assert r.json()["caller"] == ODD_CALLER and r.json()["totals"]["requests"] == 1
        r = http.get("/admin/api/controls/%C3%A9quipe/%E2%82%AC", headers=H)
        assert (r.json()["tenant"], r.json()["caller"]) == ("équipe", "€")
        # a browser session blocks the caller (CSRF token and its own Origin)
        r = http.put(f"/admin/api/controls/acme/{ODD_PATH}/block",
                     headers={**cookie, "x-csrf-token": csrf, "origin": server.url},
                     json={"reason": "mounted"})  # fmt: skip
        assert r.status_code == 200, r.text
        refused = http.post(PATH, json=body, headers=carol)
        assert refused.status_code == 403 and refused.json()["error"]["reason"] == "mounted"
        r = http.put(f"/admin/api/controls/acme/{ODD_PATH}/block",
                     headers={**cookie, "x-csrf-token": csrf, "origin": "http://evil.example"},
                     json={"reason": "forged"})  # fmt: skip
        assert r.status_code == 403 and r.json()["error"] == "csrf"
        entry = http.get("/admin/api/audit?limit=1", headers=H).json()["entries"][0]
        assert entry["target"] == f"caller:acme/{ODD_CALLER}" and entry["after"]["reason"] == (
            "mounted")  # fmt: skip
        assert http.delete(f"/admin/api/controls/acme/{ODD_PATH}/block", headers=H).json()[
            "removed"]  # fmt: skip
        assert http.post(PATH, json=body, headers=carol).status_code == 200

        # how long from the admin's PUT until the caller is refused, over real HTTP
        dave = {"x-caller": "dave", "x-tenant": "acme"}
        times = []
        for _ in range(15):
            assert http.post(PATH, json=body, headers=dave).status_code == 200
            t0 = time.perf_counter()
            http.put("/admin/api/controls/acme/dave/block", headers=H, json={"reason": "t"})
            assert http.post(PATH, json=body, headers=dave).status_code == 403
            times.append(time.perf_counter() - t0)
            http.delete("/admin/api/controls/acme/dave/block", headers=H)
        times.sort()
        print(f"uvicorn+redis: PUT block -> next request 403: median {times[7] * 1000:.1f} ms,"
              f" max {times[-1] * 1000:.1f} ms")  # fmt: skip

        # a whole tenant, blocked and unblocked through the API (each writes 16384 slot copies)
        t0 = time.perf_counter()
        r = http.put("/admin/api/tenants/acme/block", headers=H, json={"reason": "tenant"})
        took = time.perf_counter() - t0
        assert r.status_code == 200
        for who in ("dave", "erin", ODD_CALLER):
            r = http.post(PATH, json=body, headers={"x-caller": who, "x-tenant": "acme"})
            assert r.status_code == 403 and r.json()["error"]["blocked"] == "tenant", who
        assert http.post(PATH, json=body, headers={"x-caller": "dave"}).status_code == 200
        assert http.delete("/admin/api/tenants/acme/block", headers=H).json()["removed"]
        assert http.post(PATH, json=body, headers=dave).status_code == 200
        print(f"uvicorn+redis: a tenant block through the API took {took * 1000:.0f} ms")
    admin.close()


def test_mounted_in_flask_with_dispatcher_middleware(backend: Any) -> None:
    from flask import Flask
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    body, _ = _ai_body()
    cfg = _ai_policy(1_000_000)
    flask_app = Flask(__name__)

    @flask_app.post(PATH)
    def completions() -> Any:
        status, headers, chunks = ai_app.respond(flask_request_body())
        return b"".join(chunks), status, headers

    def flask_request_body() -> bytes:
        from flask import request

        return request.get_data()

    admin = WSGIAdminApp(cfg, backend.sync())
    guarded = WSGIQuotaMiddleware(flask_app.wsgi_app, config=cfg, backend=backend.sync())
    flask_app.wsgi_app = DispatcherMiddleware(guarded, {"/admin": admin})  # type: ignore[method-assign]
    c = Client("wsgi", flask_app)
    carol = {"x-caller": ODD_CALLER, "x-tenant": "acme"}
    assert c("POST", PATH, headers=carol, json_body=body).status == 200
    r = c.get("/admin/api/whoami", headers=H)
    assert r.status == 200 and r.json()["who"] == f"token:{DIGEST[:8]}"
    assert c.get("/admin/api/whoami").json() == UNAUTHORIZED
    r = c.get(f"/admin/api/callers/acme/{ODD_PATH}", headers=H)
    assert r.status == 200 and r.json()["caller"] == ODD_CALLER
    r = c.get("/admin/api/controls/%C3%A9quipe/%E2%82%AC", headers=H)
    assert (r.json()["tenant"], r.json()["caller"]) == ("équipe", "€")
    r = c("POST", "/admin/login", form={"token": TOKEN})
    assert "Path=/admin;" in r.headers["set-cookie"]
    cookie, csrf = {"cookie": r.headers["set-cookie"].split(";", 1)[0]}, r.json()["csrf"]
    r = c("PUT", f"/admin/api/controls/acme/{ODD_PATH}/block",
          headers={**cookie, "x-csrf-token": csrf, "origin": "http://localhost"},
          json_body={"reason": "flask"})  # fmt: skip
    assert r.status == 200, r.body
    refused = c("POST", PATH, headers=carol, json_body=body)
    assert refused.status == 403 and refused.json()["error"]["code"] == "caller_blocked"
    assert c("DELETE", f"/admin/api/controls/acme/{ODD_PATH}/block", headers=H).status == 200
    assert c("POST", PATH, headers=carol, json_body=body).status == 200
    assert c.get("/admin/api/nope", headers=H).status == 404


def test_asgi_root_path_from_the_server(backend: Any) -> None:
    """``uvicorn --root-path /admin`` style: the scope's root_path names the mount, and the
    path holds it (ASGI 3) or not (older servers); both resolve below the mount."""
    app = AdminApp(make_config(), backend.sync())
    c = Client("asgi", app, root_path="/admin")
    try:
        assert c.get("/admin/api/whoami", headers=H).json()["via"] == "token"
        r = c("POST", "/admin/login", form={"token": TOKEN})
        assert "Path=/admin;" in r.headers["set-cookie"]
    finally:
        c.close()


# -- tenant budgets, and a policy without the rollups --------------------------------------------
def test_tenant_budgets_and_their_kill_switch(kind: str, backend: Any) -> None:
    from quota_middleware.limits import TenantBudget

    base = seed_config(tenant_budgets=[
        TenantBudget(usd=2.0, period="month", name="team-usd", tenants=["acme", "globex"]),
        TenantBudget(tokens=100_000, period="day", name="team-tokens")])  # fmt: skip
    cfg = make_config(base)
    seed_month(backend.sync(), cfg, callers=8, days=2)
    c = Client(kind, admin_app(kind, cfg, backend.sync()))
    try:
        one = c.get("/api/tenants/acme", headers=H).json()
        budgets = {b["name"]: b for b in one["budgets"]}
        assert set(budgets) == {"team-usd", "team-tokens"}
        assert budgets["team-usd"]["unit"] == "usd_micros" and budgets["team-usd"]["tenant"] == (
            "acme")  # fmt: skip
        listed = c.get("/api/tenants?period=month", headers=H).json()["tenants"]
        acme = next(t for t in listed if t["tenant"] == "acme")
        assert {b["name"] for b in acme["budgets"]} == {"team-usd", "team-tokens"}
        names = {(b["name"], b["tenant"]) for b in
                 c.get("/api/budgets?tenant=acme", headers=H).json()["budgets"]}  # fmt: skip
        assert {("team-usd", "acme"), ("app-day", None)} <= names
        r = c("PUT", "/api/budgets/team-usd", headers=H, json_body={"limit": 0, "tenant": "acme"})
        assert r.status == 200 and r.json()["limit"] == 0 and r.json()["tenant"] == "acme"
        # tokens are counted, not micro-USD: 5 billion is a fine token quota
        r = c("PUT", "/api/budgets/team-tokens", headers=H,
              json_body={"limit": 5_000_000_000, "tenant": "acme"})  # fmt: skip
        assert r.status == 200 and r.json()["limit"] == 5_000_000_000
        r = c("DELETE", "/api/budgets/team-usd?tenant=acme", headers=H)
        assert r.status == 200 and r.json()["limit"] == 2_000_000 and r.json()["override"] is None
        again = c("DELETE", "/api/budgets/team-usd?tenant=acme", headers=H)
        assert again.status == 200  # nothing to restore: no audit entry
        r = c(
            "PUT", "/api/budgets/team-usd", headers=H, json_body={"limit": 1, "tenant": "initech"}
        )
        assert r.status == 404 and r.json()["error"] == "not_found"
        entries = c.get("/api/audit", headers=H).json()["entries"]
        assert [(e["action"], e["target"]) for e in entries] == [
            ("budget.restore", "budget:acme/team-usd"), ("budget.set", "budget:acme/team-tokens"),
            ("budget.set", "budget:acme/team-usd")]  # fmt: skip
        assert entries[2]["before"]["override"] is None and entries[2]["after"]["limit"] == 0
    finally:
        c.close()


def test_without_the_rollups_the_reports_say_so(admin: Client, backend: Any) -> None:
    cfg = make_config(seed_config(rollups=False))
    seed_month(backend.sync(), cfg, callers=5, days=2)
    c = Client(admin.kind, admin_app(admin.kind, cfg, backend.sync()))
    try:
        r = c.get("/api/usage?period=month", headers=H)  # a SCAN of the callers' usage
        assert r.status == 200 and r.json()["count"] == 5
        assert c.get("/api/usage?period=week", headers=H).json()["field"] == "period"
        for path in ("/api/usage/daily", "/api/tenants"):
            r = c.get(path, headers=H)  # not zeros that read as "no traffic"
            assert r.status == 409 and r.json()["error"] == "rollups_off", path
    finally:
        c.close()


# -- the [admin] table, and sessions across policies ---------------------------------------------
POLICY = """
[plans.p]
limits = [{ type = "requests", rate = "10/second" }]
[admin]
"""


def test_the_admin_table_of_a_toml_policy(tmp_path: Any) -> None:
    from quota_middleware.config import load_config
    from quota_middleware.errors import ConfigurationError

    path = tmp_path / "policy.toml"
    path.write_text(POLICY + f'token_sha256 = ["{DIGEST}"]\naudit_max = 500\n')
    app = AdminApp(path)  # [storage] defaults to the memory store
    assert app.config.admin.digests == (DIGEST,) and app.config.admin.audit_max == 500
    c = Client("asgi", app)
    try:
        assert c.get("/api/whoami", headers=H).status == 200
    finally:
        c.close()
    for extra, where in [
        (f'token_sha256 = "{DIGEST}"\ncolour = "red"\n', "admin.colour"),
        (f'token_sha256 = "{TOKEN}"\n', "admin.token_sha256"),  # the token, not its digest
        (f'token_sha256 = ["{DIGEST}", "{TOKEN2}"]\n', "admin.token_sha256[1]"),
        (f'token_sha256 = "{DIGEST}"\naudit_max = 5\n', "admin.audit_max"),
        (f'token_sha256 = "{DIGEST}"\nsession_ttl = 1\n', "admin.session_ttl"),
        ("audit_max = 500\n", "admin"),  # nobody could sign in
    ]:
        path.write_text(POLICY + extra)
        with pytest.raises(ConfigurationError) as e:
            load_config(path)
        assert str(e.value).startswith(where + ":"), str(e.value)
        assert TOKEN not in str(e.value) and TOKEN2 not in str(e.value)  # never echoed
    path.write_text(POLICY + 'jwt_claim = "roles"\n')
    with pytest.raises(ConfigurationError, match=r"admin.jwt_claim: .*\[identity.jwt\]"):
        AdminApp(path)
    path.write_text(POLICY.replace("[admin]\n", ""))
    with pytest.raises(ConfigurationError, match="no \\[admin\\] table"):
        AdminApp(path)


def test_sessions_end_with_their_token_and_follow_the_secret(
    backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = backend.sync()
    c = Client("wsgi", WSGIAdminApp(make_config(), store))
    cookie, _ = session(c, TOKEN2)
    assert c.get("/api/whoami", headers=cookie).status == 200
    # the policy drops TOKEN2's digest: its sessions end on the next request
    only_first = dataclasses.replace(make_config(), admin=AdminConfig(token_sha256=DIGEST))
    c2 = Client("wsgi", WSGIAdminApp(only_first, store))
    r = c2.get("/api/whoami", headers=cookie)
    assert r.status == 401 and r.json() == UNAUTHORIZED
    mine, _ = session(c2, TOKEN)
    assert c2.get("/api/whoami", headers=mine).status == 200
    # with a signing secret from the environment, the store's key signs nothing
    monkeypatch.setenv("QM_ADMIN_SESSION_SECRET", "a-secret-of-the-deployment-0123456789")
    env_cfg = make_config(session_secret_env="QM_ADMIN_SESSION_SECRET")
    c3 = Client("wsgi", WSGIAdminApp(env_cfg, store))
    assert c3.get("/api/whoami", headers=mine).status == 401
    theirs, _ = session(c3)
    c4 = Client("wsgi", WSGIAdminApp(env_cfg, store))  # another process, the same secret
    assert c4.get("/api/whoami", headers=theirs).json()["via"] == "session"
    monkeypatch.delenv("QM_ADMIN_SESSION_SECRET")
    from quota_middleware.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="QM_ADMIN_SESSION_SECRET"):
        WSGIAdminApp(env_cfg, store)


# -- one case on the real cluster -----------------------------------------------------------------
@pytest.mark.cluster
def test_on_the_real_cluster(request: pytest.FixtureRequest) -> None:
    """The walk over every endpoint, a session, an idempotent key and a block stopping the
    middleware's next request, on a real 3-master cluster (the admin keys, the audit stream
    and the callers' keys live in different slots)."""
    from conftest import BackendFactory

    cluster = BackendFactory("cluster", request)
    cluster.flush()
    try:
        cfg = make_config()
        seeded = seed_month(cluster.sync(), cfg, callers=6, days=3)
        c = Client("wsgi", WSGIAdminApp(cfg, cluster.sync()))
        walk(c, H, cfg, cluster, seeded, who=f"token:{DIGEST[:8]}", via="token")
        cookie, csrf = session(c)
        idem = {**cookie, "x-csrf-token": csrf, "idempotency-key": "cluster-1"}
        first = c("POST", "/api/keys", headers=idem, json_body={"caller": "zed"})
        again = c("POST", "/api/keys", headers=idem, json_body={"caller": "zed"})
        assert first.status == 201 and again.json()["key_id"] == first.json()["key_id"]
        app = Client("wsgi", _middleware("wsgi", cfg, cluster))
        zed = {"x-caller": "zed", "x-tenant": "default"}
        body, _ = _ai_body()
        assert app("POST", PATH, headers=zed, json_body=body).status == 200
        c("PUT", "/api/controls/default/zed/block", headers=H, json_body={"reason": "cluster"})
        r = app("POST", PATH, headers=zed, json_body=body)
        assert r.status == 403 and r.json()["error"]["code"] == "caller_blocked"
    finally:
        cluster.close()


# -- the alert outbox's dead letters ------------------------------------------------------------
def test_dead_letters_are_listed_newest_first(admin: Client, backend: Any) -> None:
    from quota_middleware.alerts import AlertsConfig, Dispatcher

    cfg = make_config()
    seed_month(backend.sync(), cfg, callers=4, days=2)  # threshold alerts and a spike

    def refuse(event: Any) -> None:
        raise RuntimeError("the receiver is down")

    source = backend.sync() if backend.name == "memory" else backend.sync().client
    sinks = AlertsConfig(callables=[refuse], log=False, max_attempts=1, backoff=0.01)
    d = Dispatcher(source, sinks, prefix=cfg.storage.prefix)
    events = admin.get("/api/alerts?limit=1000", headers=H).json()["events"]
    assert events
    for _ in range(20):
        d.run_once()
        dead = admin.get("/api/alerts/dead?limit=1000", headers=H).json()["dead"]
        if len(dead) == len(events):
            break
    assert len(dead) == len(events)
    assert [x["event"]["id"] for x in dead] == [e["id"] for e in events]  # newest first
    assert all("the receiver is down" in x["error"] for x in dead)
    assert admin.get("/api/alerts/dead?limit=1", headers=H).json()["dead"] == dead[:1]


# -- a body cut short changes nothing ---------------------------------------------------------
FORM = b"reason=abuse+of+the+API&duration=3600"  # cut after 15 bytes: "reason=abuse+of"


def test_a_client_that_leaves_mid_body_changes_nothing(backend: Any) -> None:
    import io

    cfg = make_config()
    headers = [(b"authorization", f"Bearer {TOKEN}".encode()), (b"host", b"admin.test"),
               (b"content-type", b"application/x-www-form-urlencoded"),
               (b"content-length", str(len(FORM)).encode())]  # fmt: skip
    path = "/api/controls/acme/cut/block"
    scope = {"type": "http", "method": "PUT", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "headers": headers}  # fmt: skip
    messages = [{"type": "http.request", "body": FORM[:15], "more_body": True},
                {"type": "http.disconnect"}]  # fmt: skip
    sent: list[Any] = []

    async def receive() -> Any:
        return messages.pop(0)

    async def send(message: Any) -> None:
        sent.append(message)

    asyncio.run(AdminApp(cfg, backend.sync())(scope, receive, send))
    assert sent == []  # nobody to answer
    # WSGI: the server hands over fewer bytes than the Content-Length announced
    environ = {"REQUEST_METHOD": "PUT", "PATH_INFO": path, "HTTP_HOST": "admin.test",
               "HTTP_AUTHORIZATION": f"Bearer {TOKEN}", "CONTENT_LENGTH": str(len(FORM)),
               "CONTENT_TYPE": "application/x-www-form-urlencoded",
               "wsgi.input": io.BytesIO(FORM[:15])}  # fmt: skip
    status: list[str] = []
    out = WSGIAdminApp(cfg, backend.sync())(environ, lambda s, h: status.append(s))
    assert status == ["400 Bad Request"] and json.loads(b"".join(out))["field"] == "body"
    # not a block "for ever" with half its reason
    assert Controls(cfg, backend.sync()).show("cut", tenant="acme").block is None
    # whole, the same form blocks for an hour
    c = Client("wsgi", WSGIAdminApp(cfg, backend.sync()))
    r = c("PUT", path, headers={**H, "content-type": "application/x-www-form-urlencoded"},
          content=FORM)  # fmt: skip
    assert r.status == 200 and r.json()["reason"] == "abuse of the API" and r.json()["until"]


def test_the_audit_stream_is_trimmed_to_audit_max(backend: Any) -> None:
    c = Client("wsgi", WSGIAdminApp(make_config(audit_max=100), backend.sync()))
    for i in range(260):
        c("PUT", f"/api/controls/acme/u{i}/block", headers=H, json_body={"reason": "r"})
    entries = c.get("/api/audit?limit=1000", headers=H).json()["entries"]
    # about audit_max (Redis trims whole macro nodes: XADD MAXLEN ~)
    assert 100 <= len(entries) < 260 and entries[0]["target"] == "caller:acme/u259"


# -- what the app can be built on; concurrent idempotent requests ---------------------------------
@pytest.mark.redis
def test_built_on_a_client_a_url_or_a_backend(redis_server: Any) -> None:
    import redis as redis_py
    import redis.asyncio

    from quota_middleware.backends.redis import AsyncRedisBackend
    from quota_middleware.errors import BackendMismatch, ConfigurationError

    cfg = make_config()
    client = redis_py.Redis.from_url(redis_server.url)
    try:
        client.flushall()
        Controls(cfg, AdminApp(cfg, client).context.backend).block("ivy", reason="via client")
        by_url = AdminApp(cfg, url=redis_server.url)
        c = Client("asgi", by_url)
        try:
            state = c.get("/api/controls/default/ivy", headers=H).json()
            assert state["block"]["reason"] == "via client"  # the same store both ways
        finally:
            c.close()
            by_url.close()
        with pytest.raises(BackendMismatch):
            AdminApp(cfg, AsyncRedisBackend(redis_py.asyncio.Redis.from_url(redis_server.url)))
        with pytest.raises(ConfigurationError):
            AdminApp(cfg, client, url=redis_server.url)
    finally:
        client.close()


@pytest.mark.redis
def test_concurrent_creates_with_one_idempotency_key_make_one_key(redis_server: Any) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import redis as redis_py

    cfg = make_config()
    client = redis_py.Redis.from_url(redis_server.url)
    client.flushall()
    apps = [WSGIAdminApp(cfg, client) for _ in range(4)]  # four workers on one store
    headers = {**H, "idempotency-key": "burst-1"}

    def create(i: int) -> Resp:
        return Client("wsgi", apps[i % 4])("POST", "/api/keys", headers=headers,
                                            json_body={"caller": "kim"})  # fmt: skip

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(create, range(16)))
    statuses = sorted(r.status for r in replies)
    assert statuses.count(201) == 1, statuses  # one key made; the others replay or wait
    assert set(statuses) <= {200, 201, 409}
    made = next(r for r in replies if r.status == 201).json()["key_id"]
    assert {r.json()["key_id"] for r in replies if r.status == 200} <= {made}
    keys = Client("wsgi", apps[0]).get("/api/keys?caller=kim", headers=H).json()["keys"]
    assert [k["key_id"] for k in keys] == [made]
    client.close()


def test_login_redirects_only_below_the_mount(admin: Client) -> None:
    r = admin("POST", "/login", form={"token": TOKEN, "next": "/ui/callers"})
    assert r.status == 303 and r.headers["location"] == "/ui/callers"
    r = admin("POST", "/login", form={"token": "wrong", "next": "/ui/"})
    assert r.status == 303 and r.headers["location"].startswith("/login?failed=1")
    assert "set-cookie" not in r.headers
    # another site, however spelled: browsers drop tabs and newlines, so "/\t/x" is "//x"
    for target in ("//evil.example", "/\t/evil.example", "/\n/evil.example", "/\\evil.example",
                   "https://evil.example/", "/ui/\r\nSet-Cookie: x=1", "/ui/ x"):  # fmt: skip
        r = admin("POST", "/login", form={"token": TOKEN, "next": target})
        assert r.status == 200 and "location" not in r.headers, repr(target)
