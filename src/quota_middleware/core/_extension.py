"""Mid-stream top-ups of an AI request's reservations, sans-IO (no I/O here).

Admission reserves what a request is expected to use (prompt + output allowance). The hard
stop relays a streamed response while its output fits that reservation; when it is about to
outgrow it, the middleware asks the ``extend`` script (``lua/extend.lua``) for more room on every
token quota and budget the request holds. A grant grows the reservation in Redis and in the
request's :class:`~quota_middleware.decision.Hold` values alike, so the later settle still moves
each counter by ``actual - reserved`` and ends it at exactly the actual usage; a denial (some
quota or budget has no room, or the reservation is no longer live) ends the stream.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from quota_middleware.base._scripts import Op, ScriptArg, ScriptCall
from quota_middleware.core._decision import Decision, Hold
from quota_middleware.errors import StorageError

#: argv of an extend call before its ops: now, request id, lease_us, n
_HEAD = 4
#: values per op: key index, field, limit, step
_OP = 4


def _extendable(hold: Hold) -> bool:
    # Only calendar counters keep a reservation ledger; buckets and slots have nothing to top up.
    return hold.kind == Op.QUOTA and hold.ledger is not None


def plan_extend_holds(
    decision: Decision, steps: list[tuple[Hold, int]], lease_us: int, now_arg: str
) -> ScriptCall | None:
    """The ``extend`` call that adds each step to its hold (of ``decision``; steps of 0 are
    left out). None when there is nothing to extend."""
    keys: list[str] = []
    index: dict[str, int] = {}
    ops: list[ScriptArg] = []
    for h, step in steps:
        if step < 0:
            raise ValueError(f"an extension adds room, it never gives back: {step=}")
        if not _extendable(h) or step == 0:
            continue
        assert h.ledger is not None
        if h.key not in index:
            keys += [h.key, h.ledger]  # the script reads a key's ledger at the next index
            index[h.key] = len(keys) - 1
        ops += [index[h.key], h.name, h.amount, step]
    if not ops:
        return None
    args: list[ScriptArg] = [now_arg, decision.request_id, lease_us, len(ops) // _OP]
    return ScriptCall("extend", tuple(keys), tuple(args + ops))


def plan_extend(
    decision: Decision, tokens: int, cost: int, lease_us: int, now_arg: str
) -> ScriptCall | None:
    """The ``extend`` call that adds ``tokens`` to every token quota and ``cost`` (micro-dollars)
    to every budget ``decision`` holds a reservation on, and keeps the reservation alive
    ``lease_us`` from now. ``now_arg`` is the script's ARGV[1]: ``""`` for Redis server time
    (the engine's ``_now_arg()``). None when there is nothing to extend: no such hold, or both
    amounts are 0 for the holds there are (a step of 0 is left out)."""
    if tokens < 0 or cost < 0:
        raise ValueError(f"an extension adds room, it never gives back: {tokens=}, {cost=}")
    steps = [(h, cost if h.param == 1 else tokens) for h in decision.holds]
    return plan_extend_holds(decision, steps, lease_us, now_arg)


def apply_extend(decision: Decision, call: ScriptCall, reply: Any) -> bool:
    """Whether the extension ``call`` (from :func:`plan_extend` for ``decision``) was granted.
    When it was, each op's step is added to the hold it was planned from, so the later settle
    gives back or charges against the grown reservation. A denial changes nothing, here as in
    Redis."""
    if call.name != "extend" or str(call.args[1]) != decision.request_id:
        raise ValueError("this extend call was not planned for this decision")
    if int(reply[0]) != 1:
        return False
    # Ops name (key, field), not positions: match each to a hold with exactly that key and name,
    # in order when several share both, as plan_extend emitted them.
    queues: dict[tuple[str, str], list[Hold]] = {}
    for h in decision.holds:
        if _extendable(h):
            queues.setdefault((h.key, h.name), []).append(h)
    matched: list[tuple[Hold, int]] = []
    for i in range(int(call.args[3])):
        base = _HEAD + i * _OP
        key = call.keys[int(call.args[base]) - 1]
        name = str(call.args[base + 1])
        candidates = queues.get((key, name))
        if not candidates:
            raise ValueError(f"extend op {i + 1} ({key} {name}) matches no hold of this decision")
        matched.append((candidates.pop(0), int(call.args[base + 3])))
    # Every op is matched before any hold changes: a bad call leaves the decision as it was.
    for hold, step in matched:
        hold.charged += step
    return True


def extend_flow(
    decision: Decision, tokens: int, cost: int, lease_us: int, now_arg: str
) -> Generator[ScriptCall, Any, bool | None]:
    """The extension as a flow for ``drive_sync`` / ``drive_async``.

    Returns True when granted (or when there is nothing to extend: no quota or budget limits the
    request), False when denied (the stream must stop), and None when the store could not be
    asked (a :class:`StorageError` was thrown in). None is "unknown", not "denied": ending every
    stream on a Redis blip would be a hard stop caused by an outage, so the caller decides, e.g.
    by the plan's ``on_error``. Usually nothing changed then; if the script ran and only its
    reply was lost, Redis holds the grown reservation while the holds do not, which is still
    settled right: settle takes what is reserved from the reservation's own record, not from
    the holds. Do not retry the call blindly: a second grant reserves a second step (given
    back at settle, but held against the quota until then).
    """
    call = plan_extend(decision, tokens, cost, lease_us, now_arg)
    return (yield from run_extend(decision, call))


def run_extend(
    decision: Decision, call: ScriptCall | None
) -> Generator[ScriptCall, Any, bool | None]:
    """Make a planned extend call (see :func:`extend_flow` for what the result means)."""
    if call is None:
        return True
    try:
        reply = yield call
    except StorageError:
        return None
    return apply_extend(decision, call, reply)


__all__ = ["apply_extend", "extend_flow", "plan_extend", "plan_extend_holds", "run_extend"]
