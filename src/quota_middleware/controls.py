"""Runtime controls: block a caller or a tenant, and override any limit of a caller's plan by
name, without a deploy.

Everything is stored where the admit call already looks (``lua/admit.lua``): a caller's controls
are one hash under the caller's own hash tag (``CallerKeys.controls``), so the admit script reads
them in the same call, on every worker, from the very next request; no process caches them.
Expiry is the store's clock (``lua/control.lua``), like every limit's.

A tenant's block must reach callers in every slot, and on a cluster a script may only touch its
own slot. So it is written once per slot (16,384 small keys, ``base/_keys.tenant_controls``) and
each caller's admit reads the copy in its slot: atomic per request, at the price of a slower
block and unblock (one write per slot, about a second on Redis) and about 2 MB per blocked
tenant while it lasts. The same layout is used on a single Redis and in memory.

    controls = Controls(config, backend)
    controls.block("alice", reason="abuse", duration=3600)
    controls.set_limit("bob", "usd-month", 50)       # a Budget's USD
    controls.set_limit("bob", "req", "5/second", burst=5, expires=86400)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from quota_middleware.base._keys import SLOTS, CallerKeys, key_slot, tenant_controls
from quota_middleware.base._protocols import SyncBackend
from quota_middleware.base._scripts import ScriptCall, as_str
from quota_middleware.config import QuotaConfig
from quota_middleware.core._context import Context, SharedBudget
from quota_middleware.errors import (
    BackendMismatch,
    ConfigurationError,
    InvalidArgument,
    StorageError,
)
from quota_middleware.limits import Budget, Concurrency, Limit, RequestRate, TokenQuota, TokenRate

Scope = Literal["all", "ai"]
_MAX_REASON = 500


@dataclass(frozen=True, slots=True)
class Block:
    """A block of one caller, or of every caller of a tenant (:attr:`whole_tenant`)."""

    scope: Scope
    reason: str
    #: unix seconds the block ends, or None: until unblocked
    until: float | None
    whole_tenant: bool = False


@dataclass(frozen=True, slots=True)
class Override:
    """The operator's number for one limit of a caller's plan, in the limit's own units."""

    name: str
    #: the limit's kind (``requests``, ``tokens``, ``concurrency``, ``token_quota``, ``budget``)
    kind: str
    #: rates: per second and the burst; concurrency: the maximum; quotas: tokens; budgets: USD
    value: float
    burst: int | None
    until: float | None
    #: the script's numbers: interval and tau (us) for rates, else the amount (p2 None)
    p1: int
    p2: int | None


@dataclass(frozen=True, slots=True)
class State:
    """A caller's runtime controls as they stand."""

    caller: str
    tenant: str
    block: Block | None
    tenant_block: Block | None
    overrides: tuple[Override, ...]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Controls:
    """Blocks and limit overrides of ``config``'s callers, on a sync backend (memory or Redis)."""

    def __init__(self, config: QuotaConfig, backend: SyncBackend) -> None:
        if not hasattr(backend, "run"):
            raise BackendMismatch("Controls needs a sync backend (MemoryBackend, SyncRedisBackend)")
        self.config = config
        self.backend = backend
        self._prefix = config.storage.prefix
        self._by_tenant = config.storage.hash_tag == "tenant"

    # -- blocks ---------------------------------------------------------------------------
    def block(
        self,
        caller: str | None = None,
        *,
        tenant: str = "default",
        reason: str = "",
        duration: float | None = None,
        scope: Scope = "all",
    ) -> Block:
        """Refuse ``caller`` (or, with ``caller=None``, every caller of ``tenant``) with 403
        ``caller_blocked`` and ``reason``, on every route or (``scope="ai"``) AI routes only,
        for ``duration`` seconds or until :meth:`unblock`."""
        if scope not in ("all", "ai"):
            raise InvalidArgument(f"scope must be 'all' or 'ai', not {scope!r}")
        reason = " ".join(str(reason).split())[:_MAX_REASON]  # one line: it goes into logs
        life = self._life(duration, "duration")
        value = f"{scope}|{reason}"
        first, *rest = self._block_keys(caller, tenant)
        until_us = int(self._run(first, "set", "block", value, life, 0)[1])
        # every copy of a tenant's block ends at the instant the first one was given
        self._run_all(rest, "set", "block", value, life, until_us)
        return Block(scope, reason, _seconds(until_us), whole_tenant=caller is None)

    def unblock(self, caller: str | None = None, *, tenant: str = "default") -> bool:
        """Lift the block of ``caller`` (or of ``tenant``); whether there was one."""
        replies = self._run_all(list(self._block_keys(caller, tenant)), "del", "block")
        return any(bool(int(r[1])) for r in replies)

    # -- overrides ------------------------------------------------------------------------
    def set_limit(
        self,
        caller: str,
        name: str,
        value: float | str,
        *,
        tenant: str = "default",
        burst: int | None = None,
        expires: float | None = None,
        plan: str | None = None,
    ) -> Override:
        """Use ``value`` instead of the plan's number for limit ``name`` of ``caller``: USD
        for a budget, tokens for a token quota, the maximum for a concurrency limit, a rate
        (``"5/second"``, or a count per the plan's period) and ``burst`` for a rate; for
        ``expires`` seconds or until :meth:`unset_limit`."""
        lim = self._limit(name, plan)
        try:
            if isinstance(lim, RequestRate | TokenRate):
                rate = str(value)
                if "/" not in rate:
                    rate = f"{rate}/{lim.rate.split('/', 1)[1]}"
                new: Limit = dataclasses.replace(lim, rate=rate, burst=burst)
            elif isinstance(lim, Concurrency):
                new = dataclasses.replace(lim, max=_whole(value, name))
            elif isinstance(lim, TokenQuota):
                new = dataclasses.replace(lim, tokens=_whole(value, name))
            else:
                new = dataclasses.replace(lim, usd=float(value))
        except (ConfigurationError, TypeError, ValueError) as e:
            raise InvalidArgument(f"limit {name}: bad value {value!r}: {e}") from None
        p1, p2 = _numbers(new)
        life = self._life(expires, "expires")
        text = f"{p1}|{'' if p2 is None else p2}"
        reply = self._run(self._keys(caller, tenant).controls, "set", f"o|{name}", text, life, 0)
        return _override(name, lim, int(reply[1]), p1, p2)

    def unset_limit(self, caller: str, name: str, *, tenant: str = "default") -> bool:
        """Back to the plan's number for limit ``name``; whether there was an override."""
        return bool(int(self._run(self._keys(caller, tenant).controls, "del", f"o|{name}")[1]))

    def show(self, caller: str, *, tenant: str = "default") -> State:
        """The blocks and overrides that apply to ``caller`` now."""
        keys = self._keys(caller, tenant)
        fields = _fields(self._run(keys.controls, "get"))
        theirs = _fields(self._run(next(self._block_keys(None, tenant, keys)), "get"))
        overrides = []
        for field, (until, rest) in sorted(fields.items()):
            if not field.startswith("o|"):
                continue
            lim = self._find(field[2:])
            p1_text, _, p2_text = rest.partition("|")
            if lim is not None and p1_text.isdigit():
                p2 = int(p2_text) if p2_text.isdigit() else None
                overrides.append(_override(field[2:], lim, until, int(p1_text), p2))
        return State(
            caller, tenant, _block(fields.get("block"), False), _block(theirs.get("block"), True),
            tuple(overrides),
        )  # fmt: skip

    # -- helpers ----------------------------------------------------------------------------
    # -- shared budgets (the app's and the tenants') -------------------------------------------
    def set_budget(
        self, name: str, limit: float | None, *, tenant: str | None = None
    ) -> tuple[int | None, int]:
        """Replace the limit of the shared budget ``name`` (an app budget, or with ``tenant``
        that tenant's budget or token quota) for its current period: USD for a budget, tokens
        for a token quota; ``0`` is the kill switch (every AI request of a hard-stopped budget
        is refused at once); ``None`` restores the configured limit. Every worker follows
        within the budget's ``check_interval``. Returns (the override before, spent so far)."""
        b = self._shared(name, tenant)
        if limit is None:
            value = ""
        else:
            if not isinstance(limit, int | float) or isinstance(limit, bool) or limit < 0:
                raise InvalidArgument("limit must be a number >= 0")
            value = str(round(limit * 1_000_000) if b.in_usd else int(limit))
        ttl = max(0, b.end_us - self._now_us()) // 1000 + 3_600_000
        before, spent = self.backend.run(ScriptCall("budget_limit", (b.key,), (name, value, ttl)))
        raw = as_str(before)
        return (int(raw) if raw else None), int(spent)

    def _shared(self, name: str, tenant: str | None) -> SharedBudget:
        ctx = Context(self.config)
        for b in ctx.shared_budgets(tenant):
            if b.name == name and (b.tenant is None) == (tenant is None):
                return b
        where = "tenant budget" if tenant is not None else "app budget"
        raise InvalidArgument(
            f"no {where} named {name!r}"
            + (f" applies to tenant {tenant!r}" if tenant is not None else "")
        )

    @staticmethod
    def _now_us() -> int:
        return time.time_ns() // 1000

    def _keys(self, caller: str, tenant: str) -> CallerKeys:
        if not caller:
            raise InvalidArgument("a caller id is required")
        return CallerKeys(self._prefix, tenant, caller, self._by_tenant)

    def _block_keys(
        self, caller: str | None, tenant: str, near: CallerKeys | None = None
    ) -> Iterator[str]:
        if caller is not None:
            yield self._keys(caller, tenant).controls
        elif near is not None:  # reading: the copy in the caller's own slot is the one it sees
            yield tenant_controls(self._prefix, tenant, key_slot(near.base))
        else:
            for slot in range(SLOTS):
                yield tenant_controls(self._prefix, tenant, slot)

    def _run(self, key: str, op: str, field: str = "", value: str = "", life: int = 0,
             at: int = 0) -> list[Any]:  # fmt: skip
        reply: list[Any] = self.backend.run(
            ScriptCall("control", (key,), ("", op, field, value, life, at))
        )
        return reply

    def _run_all(self, keys: Sequence[str], op: str, field: str, value: str = "",
                 life: int = 0, at: int = 0) -> list[list[Any]]:  # fmt: skip
        """The same control on many keys (a tenant's copy in every slot): pipelined where the
        backend can (:meth:`SyncRedisBackend.run_many`), else one call each."""
        calls = [ScriptCall("control", (k,), ("", op, field, value, life, at)) for k in keys]
        many = getattr(self.backend, "run_many", None)
        if many is None:
            return [self.backend.run(c) for c in calls]
        replies: list[Any] = many(calls)
        for r in replies:
            if isinstance(r, StorageError):
                raise r
        return replies

    @staticmethod
    def _life(seconds: float | None, what: str) -> int:
        if seconds is None:
            return 0
        if not seconds > 0 or seconds > 10 * 365 * 86400:
            raise InvalidArgument(f"{what} must be a positive number of seconds (at most 10 years)")
        return max(1, int(seconds * 1_000_000))

    def _find(self, name: str, plan: str | None = None) -> Limit | None:
        plans = [self.config.plan(plan)] if plan is not None else list(self.config.plans)
        found = [lim for p in plans for lim in p.limits if lim.name == name]
        if found and any(type(lim) is not type(found[0]) for lim in found):
            raise InvalidArgument(f"limit {name!r} is of different kinds in different plans")
        return found[0] if found else None

    def _limit(self, name: str, plan: str | None) -> Limit:
        lim = self._find(name, plan)
        if lim is None:
            names = sorted({str(x.name) for p in self.config.plans for x in p.limits})
            raise InvalidArgument(f"no limit named {name!r} in the policy (limits: {names})")
        return lim


def _whole(value: float | str, name: str) -> int:
    number = float(value)
    if number != int(number):
        raise InvalidArgument(f"limit {name}: {value!r} is not a whole number")
    return int(number)


def _numbers(lim: Limit) -> tuple[int, int | None]:
    """The script's p1 (and p2) for ``lim``, as ``plan_admit`` passes them."""
    if isinstance(lim, RequestRate | TokenRate):
        return lim.interval_us, lim.interval_us * lim.capacity
    if isinstance(lim, Concurrency):
        return lim.max, None
    return lim.amount, None


def _override(name: str, lim: Limit, until_us: int, p1: int, p2: int | None) -> Override:
    burst: int | None = None
    if isinstance(lim, RequestRate | TokenRate):
        tau = p2 if p2 is not None else p1 * lim.capacity
        value, burst = 1_000_000 / p1, tau // p1
    elif isinstance(lim, Budget):
        value = p1 / 1_000_000
    else:
        value = float(p1)
    return Override(name, str(lim.kind), value, burst, _seconds(until_us), p1, p2)


def _seconds(until_us: int) -> float | None:
    return until_us / 1_000_000 if until_us > 0 else None


def _fields(reply: list[Any]) -> dict[str, tuple[int, str]]:
    """A ``get`` reply as field -> (until us, the value after it)."""
    out: dict[str, tuple[int, str]] = {}
    for i in range(1, len(reply) - 1, 2):
        until, _, rest = as_str(reply[i + 1]).partition("|")
        if until.isdigit():
            out[as_str(reply[i])] = (int(until), rest)
    return out


def _block(entry: tuple[int, str] | None, whole_tenant: bool) -> Block | None:
    if entry is None:
        return None
    until, rest = entry
    scope, _, reason = rest.partition("|")
    return Block("ai" if scope == "ai" else "all", reason, _seconds(until), whole_tenant)


__all__ = ["Block", "Controls", "Override", "Scope", "State"]
