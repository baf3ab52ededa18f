"""Alert events: what the settle script reports (a threshold crossed, a usage spike), as plain
values with an idempotency key, and the call that appends them to the durable outbox."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from quota_middleware.base._scripts import ScriptCall, as_str

#: entries kept in the outbox stream (approximately; older ones are trimmed)
OUTBOX_MAXLEN = 100_000


@dataclass(frozen=True, slots=True)
class AlertEvent:
    """One alert. ``id`` is stable for the same crossing, so a sink can drop repeats."""

    id: str
    #: ``"threshold"`` (a caller's quota or budget), ``"app_threshold"`` (the app budget) or
    #: ``"spike"``
    type: str
    caller: str | None
    tenant: str | None
    plan: str | None
    limit: str
    #: the period the crossing belongs to (``2026-11-28``, ``2026-11``), or the hour of a spike
    period: str
    #: the percentage crossed (threshold events)
    threshold: int | None
    used: int
    #: the limit's size: tokens, or micro-dollars for budgets (None for spikes)
    limit_value: int | None
    unit: str
    at: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> AlertEvent:
        data = json.loads(text)
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__})

    @property
    def percent(self) -> float | None:
        if not self.limit_value:
            return None
        return 100.0 * self.used / self.limit_value


def outbox_key(prefix: str) -> str:
    return f"{prefix}:alerts"


def outbox_call(prefix: str, events: Sequence[AlertEvent]) -> ScriptCall:
    return ScriptCall(
        "outbox_add", (outbox_key(prefix),),
        (OUTBOX_MAXLEN, *(e.to_json() for e in events)),
    )  # fmt: skip


def parse_settle_events(reply: Any) -> list[tuple[str, str, int, int]]:
    """``(kind, name, level, used)`` for each event in a settle reply."""
    if not isinstance(reply, list | tuple) or len(reply) < 5:
        return []
    out = []
    for i in range(1, len(reply) - 3, 4):
        out.append((as_str(reply[i]), as_str(reply[i + 1]), int(reply[i + 2]), int(reply[i + 3])))
    return out


def now() -> float:
    return time.time()
