"""The sans-IO core: from a request to a :class:`Decision`, and from a decision to a settle call.

Nothing here does I/O. A phase that needs the store is a generator that ``yield``\\ s a
:class:`~quota_middleware.scripts.ScriptCall` and is sent the reply (the httpx auth-flow pattern);
``drive_sync`` and ``drive_async`` are the two ~10-line drivers the WSGI and ASGI adapters use.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .backends.base import AsyncBackend, SyncBackend
from .config import Concurrency, Plan, QuotaConfig, RequestRate, path_matches
from .errors import IdentificationError, StorageError
from .identity import Caller, Identifier
from .keys import CallerKeys
from .request import RequestInfo
from .scripts import ScriptArg, ScriptCall

log = logging.getLogger("quota_middleware")

Flow = Generator[ScriptCall, Any, "Decision"]
Reason = Literal["rate", "concurrency", "quota", "budget", "unavailable"]
#: how long a settled request's id is remembered, so a retried settle is a no-op
SETTLE_MARKER_MS = 15 * 60 * 1000


@dataclass(frozen=True, slots=True)
class LimitStatus:
    """One limit as this request left it, for the ``RateLimit`` headers and the app."""

    name: str
    #: ``"requests"`` (token bucket) or ``"concurrency"``
    kind: str
    #: the bucket's capacity (burst) or the concurrency maximum
    quota: int
    #: seconds for an empty bucket to refill (the policy's window); 0 for concurrency
    window: int
    remaining: int
    #: seconds until the limit is fully replenished (for a denying limit: until the request fits)
    reset: int
    denied: bool = False


@dataclass(frozen=True, slots=True)
class Decision:
    """What the middleware decided for one request. The app reads it from ``scope["state"]``
    (ASGI) or ``environ["quota_middleware.decision"]`` (WSGI)."""

    #: whether the request goes on to the app (True for shadow-mode denials)
    allowed: bool
    request_id: str
    caller: Caller | None = None
    plan: str | None = None
    #: whether any limit applied (exempt and unlimited routes carry no headers)
    limited: bool = False
    #: the first limit that said no (also set in shadow mode)
    denied_by: str | None = None
    reason: Reason | None = None
    #: seconds, >= 1, when denied
    retry_after: int | None = None
    #: the limits would have denied, but the plan is in shadow mode
    shadow: bool = False
    #: decided without the store (fail-open admit or fail-closed 503)
    degraded: bool = False
    statuses: tuple[LimitStatus, ...] = ()
    #: operations to undo or complete after the response (concurrency slots)
    releases: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    @property
    def caller_id(self) -> str | None:
        return self.caller.id if self.caller else None


class Stats:
    """Thread-safe counters of decisions, for logs, tests and the metrics exporter."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def incr(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    def __getitem__(self, name: str) -> int:
        return self.counts[name]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)


def new_request_id() -> str:
    return os.urandom(9).hex()


def _ceil_s(us: int) -> int:
    return max(0, -(-int(us) // 1_000_000))


class Engine:
    """Decides requests for one :class:`QuotaConfig`. Shared by the ASGI and WSGI adapters."""

    def __init__(
        self,
        config: QuotaConfig,
        *,
        identifier: Identifier | None = None,
        clock: Callable[[], int] | None = None,
    ) -> None:
        self.config = config
        self.identifier = identifier or Identifier(config.identity, prefix=config.storage.prefix)
        #: microseconds override for deterministic tests; None means Redis server time
        self.clock = clock
        self.stats = Stats()
        self._prefix = config.storage.prefix

    # -- admit ----------------------------------------------------------------------------
    def admit(self, info: RequestInfo) -> Flow:
        """The admission flow. Raises :class:`IdentificationError` for a 401."""
        rid = new_request_id()
        if not self.config.routes.is_limited(info.path):
            self.stats.incr("exempt")
            return Decision(allowed=True, request_id=rid)
        try:
            caller = yield from self.identifier.identify(info)
        except StorageError as e:
            return self._degraded(rid, None, self.config.plan(None), e)
        except IdentificationError:
            self.stats.incr("unauthenticated")
            raise
        plan = self.config.plan(caller.plan)
        limits = [lim for lim in plan.limits if lim.paths is None or path_matches(lim.paths, info.path)]
        if not limits:
            self.stats.incr("allowed")
            return Decision(allowed=True, request_id=rid, caller=caller, plan=plan.name)
        weight = self.config.routes.weight(info.method, info.path)
        call = self.plan_admit(caller, limits, weight, rid)
        try:
            reply = yield call
        except StorageError as e:
            return self._degraded(rid, caller, plan, e)
        return self.decide(caller, plan, limits, rid, reply)

    def plan_admit(
        self, caller: Caller, limits: Sequence[RequestRate | Concurrency], weight: int, rid: str
    ) -> ScriptCall:
        keys = CallerKeys(self._prefix, caller.tenant, caller.id)
        key_list: list[str] = [keys.buckets]
        args: list[ScriptArg] = [self._now_arg(), rid, len(limits)]
        for lim in limits:
            if isinstance(lim, RequestRate):
                assert lim.burst is not None and lim.name is not None
                interval = lim.interval_us
                args += ["b", 1, lim.name, interval, interval * lim.burst, weight, weight]
            else:
                key_list.append(keys.concurrency(lim.name))
                args += ["c", len(key_list), "", lim.max, int(lim.lease * 1_000_000), 1, 1]
        return ScriptCall("admit", tuple(key_list), tuple(args))

    def decide(
        self,
        caller: Caller,
        plan: Plan,
        limits: Sequence[RequestRate | Concurrency],
        rid: str,
        reply: Sequence[Any],
    ) -> Decision:
        allowed, denied_idx, retry_us = int(reply[0]), int(reply[1]), int(reply[2])
        statuses = []
        releases: list[tuple[str, str]] = []
        for i, lim in enumerate(limits):
            remaining, reset_us, charged = (int(v) for v in reply[4 + 3 * i : 7 + 3 * i])
            denied = denied_idx == i + 1
            if isinstance(lim, RequestRate):
                assert lim.burst is not None and lim.name is not None
                statuses.append(
                    LimitStatus(
                        name=lim.name,
                        kind="requests",
                        quota=lim.burst,
                        window=_ceil_s(lim.interval_us * lim.burst),
                        remaining=remaining,
                        reset=_ceil_s(retry_us if denied else reset_us),
                        denied=denied,
                    )
                )
            else:
                if charged:
                    releases.append(("c", lim.name))
                statuses.append(
                    LimitStatus(
                        name=lim.name,
                        kind="concurrency",
                        quota=lim.max,
                        window=0,
                        remaining=max(0, remaining),
                        reset=1 if denied else 0,
                        denied=denied,
                    )
                )
        if allowed:
            self.stats.incr("allowed")
            return Decision(
                allowed=True,
                request_id=rid,
                caller=caller,
                plan=plan.name,
                limited=True,
                statuses=tuple(statuses),
                releases=tuple(releases),
            )
        denier = limits[denied_idx - 1]
        reason: Reason = "concurrency" if isinstance(denier, Concurrency) else "rate"
        retry_after = max(1, _ceil_s(retry_us)) if retry_us >= 0 else None
        self.stats.incr("shadow_denied" if plan.shadow else "denied")
        if plan.shadow:
            log.info(
                "quota_middleware: shadow plan %s would deny caller %s (%s)",
                plan.name, caller.id, denier.name,
            )  # fmt: skip
        return Decision(
            allowed=plan.shadow,
            request_id=rid,
            caller=caller,
            plan=plan.name,
            limited=True,
            denied_by=denier.name,
            reason=reason,
            retry_after=retry_after,
            shadow=plan.shadow,
            statuses=tuple(statuses),
        )

    def _degraded(
        self, rid: str, caller: Caller | None, plan: Plan, error: StorageError
    ) -> Decision:
        fail_open = plan.on_error == "open"
        self.stats.incr("degraded_open" if fail_open else "degraded_closed")
        log.warning(
            "quota_middleware: store unavailable (%s); plan %s fails %s for caller %s",
            error, plan.name, plan.on_error, caller.id if caller else "-",
        )  # fmt: skip
        return Decision(
            allowed=fail_open,
            request_id=rid,
            caller=caller,
            plan=plan.name,
            degraded=True,
            reason=None if fail_open else "unavailable",
            retry_after=None if fail_open else max(1, int(self.config.storage.breaker_reset)),
        )

    # -- settle ---------------------------------------------------------------------------
    def plan_settle(self, decision: Decision) -> ScriptCall | None:
        """The call that gives back what an admitted request held; None when nothing is held."""
        if not decision.releases or decision.caller is None:
            return None
        caller = decision.caller
        keys = CallerKeys(self._prefix, caller.tenant, caller.id)
        key_list = [keys.settled(decision.request_id)]
        args: list[ScriptArg] = [
            self._now_arg(), decision.request_id, SETTLE_MARKER_MS, len(decision.releases)
        ]  # fmt: skip
        for kind, name in decision.releases:
            key_list.append(keys.concurrency(name))
            args += [kind, len(key_list), "", 0, 0]
        return ScriptCall("settle", tuple(key_list), tuple(args))

    def _now_arg(self) -> str:
        return "" if self.clock is None else str(self.clock())


# -- drivers -------------------------------------------------------------------------------
def drive_sync(flow: Flow, backend: SyncBackend) -> Decision:
    """Run a flow against a sync backend; store errors are thrown into the flow to handle."""
    try:
        call = next(flow)
        while True:
            try:
                reply = backend.run(call)
            except StorageError as e:
                call = flow.throw(e)
            else:
                call = flow.send(reply)
    except StopIteration as stop:
        result: Decision = stop.value
        return result


async def drive_async(flow: Flow, backend: AsyncBackend) -> Decision:
    try:
        call = next(flow)
        while True:
            try:
                reply = await backend.run_async(call)
            except StorageError as e:
                call = flow.throw(e)
            else:
                call = flow.send(reply)
    except StopIteration as stop:
        result: Decision = stop.value
        return result
