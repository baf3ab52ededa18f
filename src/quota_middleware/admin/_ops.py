"""The admin app's state changes, each checked, made through the library's own writers
(:class:`~quota_middleware.controls.Controls`, :class:`~quota_middleware.identity.KeyStore`,
``Controls.set_budget``) and audited (``_audit``): the JSON API and the dashboard's forms both
call these, so a change is the same, and audited the same, whichever made it.

Every function takes the :class:`~quota_middleware.admin.AdminContext` and the authenticated
:class:`~quota_middleware.admin._http.Request` (for who, its ``X-Request-Id`` and its
``Idempotency-Key``), and raises ``_http.HTTPError`` (400 naming the field, 404, 409) for bad
input. The ``*_record`` functions are the JSON form of the values they return.

Idempotency: a block, an override or a budget limit is a PUT (setting it again leaves the same
state; each call is audited). Unblocking, unsetting or revoking what is not there changes
nothing and writes no entry. Creating (or rotating) a key with an ``Idempotency-Key`` header
stores the answer for 24 hours under that key and the admin's name, the plain key left out;
a replay gets the same key record (``"replayed": true``) without the plain key, which was shown
once: a client that lost the first answer revokes that key id and makes another.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from quota_middleware.admin._http import HTTPError, Request, invalid
from quota_middleware.base._keys import app_tag
from quota_middleware.controls import Block, Override, State
from quota_middleware.errors import ApiKeyNotActive, ApiKeyNotFound, InvalidArgument
from quota_middleware.fleet import AppBudgetStatus
from quota_middleware.identity._keyformat import KeyRecord

if TYPE_CHECKING:
    from quota_middleware.admin._app import AdminContext

__all__ = [
    "Actor",
    "actor",
    "block",
    "block_record",
    "budget_record",
    "create_key",
    "ident",
    "iso",
    "key_record",
    "override_record",
    "parse_duration",
    "plan_arg",
    "revoke_key",
    "rotate_key",
    "set_budget",
    "set_override",
    "state_record",
    "tenant_block_of",
    "unblock",
    "unset_override",
]

#: how long an idempotent answer is kept (seconds)
IDEMPOTENCY_TTL = 24 * 3600
_MAX_ID = 256
_MAX_REASON = 500
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_TEN_YEARS = 10 * 365 * 86400
#: the largest amount a limit may hold in the store (as the policy's own limits)
_MAX_AMOUNT = 1 << 52


@dataclass(frozen=True, slots=True)
class Actor:
    """Who makes a change, and the request it came with (for the audit entry)."""

    who: str
    request_id: str
    idempotency_key: str | None = None


def actor(req: Request) -> Actor:
    """The :class:`Actor` of an authenticated request."""
    if req.admin is None:  # the app authenticates before any handler runs
        raise HTTPError(401, "unauthorized")
    rid = req.headers.get("x-request-id", "").strip()
    if not _REQUEST_ID.fullmatch(rid):
        rid = secrets.token_hex(8)
    idem = req.headers.get("idempotency-key")
    if idem is not None:
        idem = idem.strip()
        if not 1 <= len(idem) <= 255 or not idem.isprintable():
            raise invalid("Idempotency-Key", "1 to 255 printable characters")
    return Actor(req.admin.who, rid, idem)


# -- checks -------------------------------------------------------------------------------------
def ident(value: Any, field: str) -> str:
    """A caller, tenant or key id: 1-256 printable characters."""
    if not isinstance(value, str) or not 1 <= len(value) <= _MAX_ID or not value.isprintable():
        raise invalid(field, f"{field} must be 1 to {_MAX_ID} printable characters")
    return value


def parse_duration(value: Any, field: str) -> float | None:
    """Seconds from a number or ``"90"``, ``"30m"``, ``"2h"``, ``"7d"``, ``"1w"``; None for
    none given (``None``, ``""``): until undone."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise invalid(field, f"{field} must be a number of seconds or like 30m, 2h, 7d")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.fullmatch(value.strip().lower())):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise invalid(field, f"{field} must be a number of seconds or like 30m, 2h, 7d")
    if not 0 < seconds <= _TEN_YEARS:
        raise invalid(field, f"{field} must be more than 0 seconds and at most 10 years")
    return seconds


def _number(value: Any, field: str, *, minimum: float = 0) -> float:
    if isinstance(value, bool):
        raise invalid(field, f"{field} must be a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise invalid(field, f"{field} must be a number") from None
    if number != number or number in (float("inf"), float("-inf")) or number < minimum:
        raise invalid(field, f"{field} must be a number >= {minimum:g}")
    return number


def _optional_int(value: Any, field: str) -> int | None:
    if value is None or value == "":
        return None
    number = _number(value, field, minimum=1)
    if number != int(number):
        raise invalid(field, f"{field} must be a whole number")
    return int(number)


def plan_arg(ctx: AdminContext, value: Any, field: str = "plan") -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not ctx.config.has_plan(value):
        names = ", ".join(p.name for p in ctx.config.plans)
        raise invalid(field, f"no plan {value!r} in the policy (plans: {names})")
    return value


# -- the JSON form of values ---------------------------------------------------------------------
def iso(t: float | datetime | None) -> str | None:
    if t is None:
        return None
    if isinstance(t, datetime):
        return t.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def block_record(b: Block | None) -> dict[str, Any] | None:
    if b is None:
        return None
    return {"scope": b.scope, "reason": b.reason, "until": iso(b.until),
            "whole_tenant": b.whole_tenant}  # fmt: skip


def override_record(o: Override | None) -> dict[str, Any] | None:
    if o is None:
        return None
    value: float | int = o.value
    if o.kind in ("token_quota", "concurrency") and float(value).is_integer():
        value = int(value)  # a count of tokens or requests, not 290.0
    return {"name": o.name, "kind": o.kind, "value": value, "burst": o.burst,
            "until": iso(o.until)}  # fmt: skip


def state_record(s: State) -> dict[str, Any]:
    return {
        "caller": s.caller,
        "tenant": s.tenant,
        "block": block_record(s.block),
        "tenant_block": block_record(s.tenant_block),
        "overrides": [override_record(o) for o in s.overrides],
    }


def key_record(r: KeyRecord) -> dict[str, Any]:
    """A key's record, never its digest (nor, of course, the key)."""
    return {
        "key_id": r.key_id,
        "caller": r.caller,
        "tenant": r.tenant,
        "plan": r.plan,
        "status": r.status,
        "revoked": r.revoked,
        "created": iso(r.created),
        "expires": iso(r.expires),
    }


def budget_record(s: AppBudgetStatus) -> dict[str, Any]:
    return {
        "name": s.name,
        "tenant": s.tenant,
        "period": s.period,
        "unit": s.unit,
        "spent": s.spent,
        "limit": s.limit,
        "configured": s.configured,
        "override": s.override,
        "remaining": s.remaining,
        "percent": round(s.percent, 2),
        "spent_out": s.spent_out,
        "hard_stop": s.hard_stop,
        "resets_at": iso(s.resets_at),
    }


def _caller_target(tenant: str, caller: str | None) -> str:
    return f"tenant:{tenant}" if caller is None else f"caller:{tenant}/{caller}"


# -- blocks --------------------------------------------------------------------------------------
_TENANT_PROBE = "@tenant"  # any caller id reads the tenant's block (the copy in its slot)


def tenant_block_of(ctx: AdminContext, tenant: str) -> Block | None:
    """The block of the whole ``tenant``, if any."""
    return ctx.controls.show(_TENANT_PROBE, tenant=tenant).tenant_block


def _current_block(ctx: AdminContext, tenant: str, caller: str | None) -> Block | None:
    if caller is None:
        return tenant_block_of(ctx, tenant)
    return ctx.controls.show(caller, tenant=tenant).block


def block(
    ctx: AdminContext,
    req: Request,
    *,
    tenant: str = "default",
    caller: str | None,
    reason: Any = "",
    scope: Any = "all",
    duration: Any = None,
) -> dict[str, Any]:
    """Block ``caller`` (None: every caller of ``tenant``); the block as it now stands."""
    who = actor(req)
    tenant = ident(tenant, "tenant")
    if caller is not None:
        caller = ident(caller, "caller")
    if scope not in ("all", "ai"):
        raise invalid("scope", "scope must be 'all' or 'ai'")
    if not isinstance(reason, str) or len(reason) > _MAX_REASON:
        raise invalid("reason", f"reason must be text of at most {_MAX_REASON} characters")
    seconds = parse_duration(duration, "duration")
    before = _current_block(ctx, tenant, caller)
    try:
        made = ctx.controls.block(caller, tenant=tenant, reason=reason, duration=seconds,
                                  scope=scope)  # fmt: skip
    except InvalidArgument as e:  # pragma: no cover - checked above
        raise invalid("body", str(e)) from None
    after = block_record(made)
    ctx.audit.write(who.who, "block", _caller_target(tenant, caller), block_record(before),
                    after, request_id=who.request_id)  # fmt: skip
    assert after is not None
    return after


def unblock(
    ctx: AdminContext, req: Request, *, tenant: str = "default", caller: str | None
) -> dict[str, Any]:
    """Lift the block of ``caller`` (None: of ``tenant``): ``{"removed": bool, "before": ...}``."""
    who = actor(req)
    tenant = ident(tenant, "tenant")
    if caller is not None:
        caller = ident(caller, "caller")
    before = _current_block(ctx, tenant, caller)
    removed = ctx.controls.unblock(caller, tenant=tenant)
    if removed:
        ctx.audit.write(who.who, "unblock", _caller_target(tenant, caller),
                        block_record(before), None, request_id=who.request_id)  # fmt: skip
    return {"removed": removed, "before": block_record(before)}


# -- overrides -----------------------------------------------------------------------------------
def _limit_names(ctx: AdminContext) -> set[str]:
    return {str(lim.name) for p in ctx.config.plans for lim in p.limits}


def _override_of(ctx: AdminContext, tenant: str, caller: str, name: str) -> Override | None:
    state = ctx.controls.show(caller, tenant=tenant)
    return next((o for o in state.overrides if o.name == name), None)


def _is_rate(ctx: AdminContext, name: str) -> bool:
    from quota_middleware.limits import RequestRate, TokenRate

    return any(isinstance(lim, RequestRate | TokenRate) and str(lim.name) == name
               for p in ctx.config.plans for lim in p.limits)  # fmt: skip


def set_override(
    ctx: AdminContext,
    req: Request,
    *,
    tenant: str = "default",
    caller: str,
    name: str,
    value: Any,
    burst: Any = None,
    expires: Any = None,
    plan: Any = None,
) -> dict[str, Any]:
    """Override limit ``name`` of ``caller`` with ``value`` (the limit's own units: USD for a
    budget, tokens for a token quota, the maximum for a concurrency, ``"5/second"`` or a count
    per the plan's period for a rate); the override as it now stands."""
    who = actor(req)
    tenant, caller = ident(tenant, "tenant"), ident(caller, "caller")
    if not isinstance(name, str) or name not in _limit_names(ctx):
        names = ", ".join(sorted(_limit_names(ctx)))
        raise invalid("name", f"no limit named {name!r} in the policy (limits: {names})")
    if isinstance(value, bool) or not isinstance(value, int | float | str) or value == "":
        raise invalid("value", "value must be a number or a rate like 5/second")
    if isinstance(value, float) and not math.isfinite(value):  # JSON's 1e400 is inf
        raise invalid("value", "value must be a finite number")
    burst_n = _optional_int(burst, "burst")
    if burst_n is not None and not _is_rate(ctx, name):
        # Controls would drop it without a word: say so instead of answering 200
        raise invalid("burst", f"burst applies to rate limits only; {name!r} is not one")
    seconds = parse_duration(expires, "expires")
    plan_name = plan_arg(ctx, plan)
    before = _override_of(ctx, tenant, caller, name)
    try:
        made = ctx.controls.set_limit(caller, name, value, tenant=tenant, burst=burst_n,
                                      expires=seconds, plan=plan_name)  # fmt: skip
    except InvalidArgument as e:
        text = str(e)
        field = "plan" if "different kinds" in text else "burst" if ".burst" in text else "value"
        raise invalid(field, str(e)) from None
    after = override_record(made)
    ctx.audit.write(who.who, "override.set", f"caller:{tenant}/{caller}/{name}",
                    override_record(before), after, request_id=who.request_id)  # fmt: skip
    assert after is not None
    return after


def unset_override(
    ctx: AdminContext, req: Request, *, tenant: str = "default", caller: str, name: str
) -> dict[str, Any]:
    """Back to the plan's number: ``{"removed": bool, "before": ...}``."""
    who = actor(req)
    tenant, caller = ident(tenant, "tenant"), ident(caller, "caller")
    if not isinstance(name, str) or not name:
        raise invalid("name", "which limit's override to remove")
    before = _override_of(ctx, tenant, caller, name)
    removed = ctx.controls.unset_limit(caller, name, tenant=tenant)
    if removed:
        ctx.audit.write(who.who, "override.unset", f"caller:{tenant}/{caller}/{name}",
                        override_record(before), None, request_id=who.request_id)  # fmt: skip
    return {"removed": removed, "before": override_record(before)}


# -- API keys ------------------------------------------------------------------------------------
def _idem_key(ctx: AdminContext, who: Actor, op: str) -> str | None:
    if who.idempotency_key is None:
        return None
    digest = hashlib.sha256(f"{who.who}\0{op}\0{who.idempotency_key}".encode()).hexdigest()
    return f"{app_tag(ctx.config.storage.prefix)}:admin:idem:{digest[:40]}"


def _idempotent(
    ctx: AdminContext, who: Actor, op: str, request: Mapping[str, Any]
) -> tuple[str | None, dict[str, Any] | None]:
    """(the store key to keep this answer under, or a stored answer to replay)."""
    key = _idem_key(ctx, who, op)
    if key is None:
        return None, None
    fingerprint = json.dumps(request, sort_keys=True, default=str)
    for _ in range(3):
        if ctx.kv.set(key, json.dumps({"pending": fingerprint}), ttl_ms=60_000, nx=True):
            return key, None
        stored = ctx.kv.get(key)
        if stored is None:  # it expired between the two calls: try to take it again
            continue
        data = json.loads(stored)
        if data.get("fingerprint", data.get("pending")) != fingerprint:
            raise HTTPError(
                422,
                "idempotency_key_reused",
                "this Idempotency-Key was used for a different request",
            )
        if "pending" in data:
            raise HTTPError(409, "in_progress", "a request with this Idempotency-Key is running")
        answer: dict[str, Any] = data["answer"]
        return None, answer
    raise HTTPError(409, "in_progress", "a request with this Idempotency-Key is running")


def _keep(ctx: AdminContext, key: str | None, request: Mapping[str, Any],
          answer: dict[str, Any]) -> None:  # fmt: skip
    if key is not None:
        fingerprint = json.dumps(request, sort_keys=True, default=str)
        data = {"fingerprint": fingerprint, "answer": answer}
        ctx.kv.set(key, json.dumps(data, default=str), ttl_ms=IDEMPOTENCY_TTL * 1000)


def create_key(
    ctx: AdminContext,
    req: Request,
    *,
    caller: Any,
    tenant: Any = "default",
    plan: Any = None,
    expires_in: Any = None,
) -> tuple[dict[str, Any], str | None]:
    """A new API key: (its record, the plain key), or on an idempotent replay (the first
    answer's record with ``"replayed": true``, None)."""
    who = actor(req)
    caller, tenant = ident(caller, "caller"), ident(tenant, "tenant")
    plan_name = plan_arg(ctx, plan)
    seconds = parse_duration(expires_in, "expires_in")
    request = {"caller": caller, "tenant": tenant, "plan": plan_name, "expires_in": seconds}
    keep, replay = _idempotent(ctx, who, "key.create", request)
    if replay is not None:
        return {**replay, "replayed": True}, None
    try:
        plain, rec = ctx.keys.create(caller, plan_name, tenant=tenant, expires_in=seconds)
    except BaseException:
        if keep is not None:
            ctx.kv.delete(keep)
        raise
    record = key_record(rec)
    _keep(ctx, keep, request, record)
    ctx.audit.write(who.who, "key.create", f"key:{rec.key_id}", None, record,
                    request_id=who.request_id, idempotency_key=who.idempotency_key)  # fmt: skip
    return record, plain


def _key_id(value: Any) -> str:
    from quota_middleware.identity._keyformat import KEY_ID_RE

    if not isinstance(value, str) or not KEY_ID_RE.fullmatch(value):
        raise HTTPError(404, "not_found", "no such API key")
    return value


def revoke_key(ctx: AdminContext, req: Request, key_id: str) -> dict[str, Any]:
    """Revoke a key: ``{"revoked": bool (False: it was already), "key": record}``; 404 for an
    unknown id."""
    who = actor(req)
    key_id = _key_id(key_id)
    before = ctx.keys.get(key_id)
    if before is None:
        raise HTTPError(404, "not_found", "no such API key")
    revoked = ctx.keys.revoke(key_id)
    after = ctx.keys.get(key_id) or before
    if revoked:
        ctx.audit.write(who.who, "key.revoke", f"key:{key_id}", key_record(before),
                        key_record(after), request_id=who.request_id)  # fmt: skip
    return {"revoked": revoked, "key": key_record(after)}


def rotate_key(
    ctx: AdminContext, req: Request, key_id: str, *, grace: Any = 3600
) -> tuple[dict[str, Any], str | None]:
    """Replace a key by a new one for the same caller; the old one works ``grace`` seconds
    more. (``{"old": record, "new": record}``, the new plain key); an idempotent replay as in
    :func:`create_key`. 404 unknown id, 409 a key that is not active."""
    who = actor(req)
    key_id = _key_id(key_id)
    if grace is None or grace == "":
        grace = 3600
    grace_s = 0.0 if grace in (0, "0") else parse_duration(grace, "grace")
    assert grace_s is not None
    if grace_s > 366 * 86400:
        raise invalid("grace", "grace must be at most 366 days")
    request = {"key_id": key_id, "grace": grace_s}
    keep, replay = _idempotent(ctx, who, "key.rotate", request)
    if replay is not None:
        return {**replay, "replayed": True}, None
    try:
        before = ctx.keys.get(key_id)
        plain, new = ctx.keys.rotate(key_id, grace=grace_s)
    except ApiKeyNotFound:
        _drop(ctx, keep)
        raise HTTPError(404, "not_found", "no such API key") from None
    except ApiKeyNotActive as e:
        _drop(ctx, keep)
        raise HTTPError(409, "not_active", str(e)) from None
    except BaseException:
        _drop(ctx, keep)
        raise
    old = ctx.keys.get(key_id) or before
    assert old is not None
    answer = {"old": key_record(old), "new": key_record(new)}
    _keep(ctx, keep, request, answer)
    ctx.audit.write(who.who, "key.rotate", f"key:{key_id}",
                    key_record(before) if before else None, answer,
                    request_id=who.request_id, idempotency_key=who.idempotency_key)  # fmt: skip
    return answer, plain


def _drop(ctx: AdminContext, keep: str | None) -> None:
    if keep is not None:
        ctx.kv.delete(keep)


# -- shared budgets: the kill switch -------------------------------------------------------------
def set_budget(
    ctx: AdminContext, req: Request, name: str, *, limit: Any, tenant: Any = None
) -> dict[str, Any]:
    """Replace the limit of app budget ``name`` (or with ``tenant``, that tenant's budget or
    token quota) for its current period: USD for a budget, tokens for a token quota; ``0`` is
    the kill switch; ``None`` restores the policy's limit. The budget as it now stands."""
    who = actor(req)
    if tenant is not None:
        tenant = ident(tenant, "tenant")
    number = None if limit is None else _number(limit, "limit")
    if number is not None:
        current = _budget_status(ctx, name, tenant)
        # the store's counters are exact integers below 2**52 (micro-USD for a budget)
        top = _MAX_AMOUNT / (1_000_000 if current and current.unit == "usd_micros" else 1)
        if number >= top:
            raise invalid("limit", f"limit must be below {top:.4g}")
    try:
        before, spent = ctx.controls.set_budget(name, number, tenant=tenant)
    except InvalidArgument as e:
        raise HTTPError(404, "not_found", str(e)) from None
    status = _budget_status(ctx, name, tenant)
    after = budget_record(status) if status is not None else {"override": None}
    target = f"budget:{name}" if tenant is None else f"budget:{tenant}/{name}"
    action = "budget.restore" if number is None else "budget.set"
    if before is not None or number is not None:
        ctx.audit.write(who.who, action, target, {"override": before, "spent": spent},
                        {"override": after.get("override"), "spent": spent,
                         "limit": after.get("limit")},
                        request_id=who.request_id)  # fmt: skip
    return after


def _budget_status(ctx: AdminContext, name: str, tenant: str | None) -> AppBudgetStatus | None:
    from quota_middleware.fleet import app_budget_status

    rows = app_budget_status(ctx.backend, ctx.config, tenants=[tenant] if tenant else [])
    return next((s for s in rows if s.name == name and s.tenant == tenant), None)
