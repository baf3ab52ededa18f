"""``[alerts]``: :class:`AlertsConfig`, where alert events go and how hard delivery tries."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quota_middleware.alerts._sinks import (
    CallableSink,
    LogSink,
    Sink,
    SlackSink,
    WebhookSink,
    _callable_name,
    _check_url,
)
from quota_middleware.base._events import AlertEvent
from quota_middleware.errors import ConfigurationError, check_keys, construct

# -- configuration -------------------------------------------------------------------------------
_TOML_KEYS = {
    "webhooks", "slack", "log", "max_attempts", "backoff", "max_backoff", "group",
    "deliver_in_process", "poll_interval", "batch", "claim_idle", "replay",
}  # fmt: skip
_WEBHOOK_KEYS = {"url", "secret", "secret_env", "secret_file", "timeout", "headers", "name"}


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class AlertsConfig:
    """Where alert events go, and how hard delivery tries. ``QuotaConfig(alerts=...)`` or the
    ``[alerts]`` table of the policy file.

    :param webhooks: signed JSON POSTs (:class:`WebhookSink`).
    :param slack: Slack-compatible incoming-webhook URLs.
    :param log: log each event at WARNING on the ``quota_middleware.alerts`` logger.
    :param callables: Python callables taking an :class:`AlertEvent` (not from TOML).
    :param max_attempts: delivery attempts per event and sink before it is dead-lettered.
    :param backoff: seconds before the first retry, doubled each attempt up to ``max_backoff``.
    :param group: consumer group name prefix (one group per sink: ``{group}:{sink name}``).
    :param deliver_in_process: the middleware starts a background dispatcher thread in each
        worker process; set False when a separate ``quota-middleware alerts run`` delivers.
    :param poll_interval: seconds between outbox reads when idle.
    :param batch: entries read per call.
    :param claim_idle: seconds after which an entry held by a silent consumer (a dead worker) is
        taken over; must exceed the longest delivery (webhook timeouts, callables).
    :param replay: how far back (seconds) a sink seen for the first time starts in the outbox:
        events older than that are not sent to a newly added sink.
    """

    webhooks: Sequence[WebhookSink] = ()
    slack: Sequence[str] = ()
    log: bool = True
    callables: Sequence[Callable[[AlertEvent], Any]] = ()
    max_attempts: int = 5
    backoff: float = 1.0
    max_backoff: float = 300.0
    group: str = "quota-alerts"
    deliver_in_process: bool = True
    poll_interval: float = 0.5
    batch: int = 50
    claim_idle: float = 60.0
    replay: float = 86400.0
    sinks: tuple[Sink, ...] = field(init=False, default=(), compare=False)

    def __post_init__(self) -> None:
        webhooks = tuple(self.webhooks)
        for w in webhooks:
            if not isinstance(w, WebhookSink):
                raise ConfigurationError("alerts.webhooks", f"not a WebhookSink: {type(w)}")
        slack = (self.slack,) if isinstance(self.slack, str) else tuple(self.slack)
        callables = tuple(self.callables)
        for fn in callables:
            if not callable(fn):
                raise ConfigurationError("alerts.callables", f"not callable: {fn!r}")
        if not isinstance(self.log, bool):
            raise ConfigurationError("alerts.log", "must be true or false")
        if not isinstance(self.deliver_in_process, bool):
            raise ConfigurationError("alerts.deliver_in_process", "must be true or false")
        _int(self.max_attempts, "alerts.max_attempts", 1, 100)
        _int(self.batch, "alerts.batch", 1, 1000)
        _num(self.backoff, "alerts.backoff", 0.001, 3600)
        _num(self.max_backoff, "alerts.max_backoff", self.backoff, 86400)
        _num(self.poll_interval, "alerts.poll_interval", 0.001, 60)
        _num(self.claim_idle, "alerts.claim_idle", 0.001, 86400)
        _num(self.replay, "alerts.replay", 0, 366 * 86400)
        longest = max((w.timeout for w in webhooks), default=0.0)
        if slack:
            longest = max(longest, 5.0)
        if self.claim_idle <= longest:
            raise ConfigurationError(
                "alerts.claim_idle", f"must exceed the longest webhook timeout ({longest}s)"
            )
        if not isinstance(self.group, str) or not self.group or " " in self.group:
            raise ConfigurationError("alerts.group", "a non-empty name without spaces")
        sinks: list[Sink] = [*webhooks, *(SlackSink(_check_url(u, "alerts.slack")) for u in slack)]
        if self.log:
            sinks.append(LogSink())
        sinks += [CallableSink(fn, _callable_name(fn)) for fn in callables]
        seen: dict[str, int] = {}
        unique: list[Sink] = []
        for s in sinks:
            n = seen[s.name] = seen.get(s.name, 0) + 1
            if n > 1 and isinstance(s, CallableSink):
                s = CallableSink(s.fn, f"{s.name}-{n}")
            elif n > 1:
                raise ConfigurationError("alerts", f"two sinks named {s.name!r} (same URL?)")
            unique.append(s)
        object.__setattr__(self, "webhooks", webhooks)
        object.__setattr__(self, "slack", slack)
        object.__setattr__(self, "callables", callables)
        object.__setattr__(self, "sinks", tuple(unique))

    def __repr__(self) -> str:
        return (
            f"AlertsConfig(sinks=[{', '.join(s.describe() for s in self.sinks)}], "
            f"max_attempts={self.max_attempts}, backoff={self.backoff}, group={self.group!r}, "
            f"deliver_in_process={self.deliver_in_process})"
        )

    def start_id(self) -> str:
        """The stream id a new consumer group (or memory cursor) starts after."""
        return f"{max(0, int((time.time() - self.replay) * 1000))}-0"

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failed attempt."""
        return float(min(self.backoff * 2 ** max(0, failures - 1), self.max_backoff))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, base_dir: Path | None = None) -> AlertsConfig:
        """From the ``[alerts]`` table of a policy file (``secret_file`` relative to
        ``base_dir``)."""
        if not isinstance(d, Mapping):
            raise ConfigurationError("alerts", "must be a table")
        check_keys(d, _TOML_KEYS, "alerts", python_only=("callables",))
        raw_hooks = d.get("webhooks", [])
        if not isinstance(raw_hooks, list):
            raise ConfigurationError("alerts.webhooks", "must be an array of tables")
        webhooks = []
        for i, w in enumerate(raw_hooks):
            where = f"alerts.webhooks[{i}]"
            if not isinstance(w, Mapping):
                raise ConfigurationError(where, "must be a table")
            check_keys(w, _WEBHOOK_KEYS, where)
            params = dict(w)
            if "secret_file" in params and base_dir is not None:
                params["secret_file"] = str(Path(base_dir) / str(params["secret_file"]))
            webhooks.append(construct(WebhookSink, params, where))
        slack = d.get("slack", [])
        if isinstance(slack, str):
            slack = [slack]
        if not isinstance(slack, list):
            raise ConfigurationError("alerts.slack", "must be a list of URLs")
        rest = {k: d[k] for k in _TOML_KEYS - {"webhooks", "slack"} if k in d}
        return cls(webhooks=webhooks, slack=slack, **rest)


def _int(v: Any, where: str, lo: int, hi: int) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or not (lo <= v <= hi):
        raise ConfigurationError(where, f"must be an integer in [{lo}, {hi}]")


def _num(v: Any, where: str, lo: float, hi: float) -> None:
    if not isinstance(v, int | float) or isinstance(v, bool) or not (lo <= v <= hi):
        raise ConfigurationError(where, f"must be a number in [{lo}, {hi}]")
