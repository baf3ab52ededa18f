"""Alert delivery: from the durable outbox to webhooks, Slack, the log and Python callables.

The settle script decides each threshold crossing, app-budget threshold and usage spike exactly
once and appends it to the outbox (``{prefix}:alerts``, a Redis Stream with one ``event`` field of
JSON; the memory backend keeps the same stream in its store). A :class:`Dispatcher` reads it, off
the request path, and delivers every event to every configured sink:

- **Redis**: one consumer group per sink (``{group}:{sink}``) on the outbox stream, so a sink that
  fails never makes the others see an event twice, and many app workers (or ``quota-middleware
  alerts run`` workers) share each group: an entry is owned by one consumer at a time. A failed
  delivery stays pending and is retried by its owner with exponential backoff (``backoff``,
  doubled each attempt, capped at ``max_backoff``); an entry whose owner went silent for
  ``claim_idle`` seconds is taken over by another consumer (``XCLAIM`` with a minimum idle time,
  so exactly one wins). After ``max_attempts`` failed attempts the entry goes to the dead-letter
  stream ``{prefix}:alerts:dead`` (with the sink, the error and the attempts) and is acknowledged.
- **Memory**: one cursor per sink in the store (claimed atomically, so two dispatchers on one
  store never both take an entry) and the same retry, backoff and dead-letter rules.

Every event carries an idempotency key, :attr:`AlertEvent.id` (``X-Quota-Event-Id`` on webhooks):
a receiver that stores the ids it has seen is exactly-once even across a worker crash between a
successful POST and its acknowledgement.

Webhook signatures: the body is the event's JSON; ``X-Quota-Timestamp`` is the send time in unix
seconds and ``X-Quota-Signature`` is ``sha256=`` + the hex HMAC-SHA256 of
``f"{timestamp}.{body}"`` under the sink's secret. Check it with :func:`verify_signature`, which
also refuses timestamps more than ``tolerance`` seconds away (replays).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TextIO
from urllib.parse import urlsplit

from .backends.memory import SCRIPTS, MemoryBackend
from .backends.memstore import MemoryStore
from .config import QuotaConfig, StorageConfig
from .errors import ConfigurationError
from .events import AlertEvent, outbox_key
from .scripts import ScriptCall

log = logging.getLogger("quota_middleware.alerts")

#: entries kept in the dead-letter stream (approximately)
DEAD_MAXLEN = 10_000
#: how often (s) a dispatcher removes consumers that hold nothing and were idle PRUNE_IDLE_MS
PRUNE_EVERY = 600.0
PRUNE_IDLE_MS = 3_600_000
SIGNATURE_HEADER = "X-Quota-Signature"
TIMESTAMP_HEADER = "X-Quota-Timestamp"
EVENT_ID_HEADER = "X-Quota-Event-Id"
_USER_AGENT = "quota-middleware-alerts/1"


def dead_key(prefix: str) -> str:
    return f"{outbox_key(prefix)}:dead"


def _cursor_key(prefix: str) -> str:
    return f"{outbox_key(prefix)}:cursors"


# -- signatures ----------------------------------------------------------------------------------
def _b(v: str | bytes) -> bytes:
    return v.encode() if isinstance(v, str) else v


def sign(secret: str | bytes, timestamp: int | str, body: str | bytes) -> str:
    """The ``X-Quota-Signature`` value: ``sha256=<hex HMAC-SHA256(secret, f"{ts}.{body}")>``."""
    mac = hmac.new(_b(secret), _b(str(timestamp)) + b"." + _b(body), hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(
    secret: str | bytes,
    timestamp: str | int,
    body: str | bytes,
    header: str | None,
    tolerance: float = 300,
    *,
    now: float | None = None,
) -> bool:
    """For receivers: whether ``header`` (``X-Quota-Signature``) signs ``body`` at ``timestamp``
    (``X-Quota-Timestamp``) under ``secret``, and the timestamp is within ``tolerance`` seconds of
    now. Pass the raw body bytes as received. Constant-time comparison."""
    if not header:
        return False
    try:
        ts = int(str(timestamp).strip())
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, ts, body).encode(), header.strip().encode())


# -- human-readable text -------------------------------------------------------------------------
def _amount(value: int | None, unit: str) -> str:
    if value is None:
        return "?"
    if unit == "usd_micros":
        usd = value / 1_000_000
        # cents hide small budgets ("$0.00 / $0.00"): show micro-dollars below a dollar
        return f"${usd:,.2f}" if usd >= 1 or usd == 0 else f"${usd:.6f}".rstrip("0")
    return f"{value:,}"


def _who(event: AlertEvent) -> str:
    who = f"caller {event.caller}"
    if event.tenant and event.tenant != "default":
        who += f" (tenant {event.tenant})"
    return who


def format_text(event: AlertEvent) -> str:
    """One line for people: Slack messages, the log, ``alerts tail``."""
    pct = f"{event.threshold}%" if event.threshold is not None else "?"
    if event.type == "threshold":
        money = event.unit == "usd_micros"
        what = "budget" if money else "token quota"
        unit = "" if money else " tokens"
        icon = ":no_entry:" if (event.threshold or 0) >= 100 else ":warning:"
        return (
            f"{icon} {_who(event)} used {pct} of {what} {event.limit} "
            f"({_amount(event.used, event.unit)} / {_amount(event.limit_value, event.unit)}{unit})"
            f" for {event.period}"
        )
    if event.type == "app_threshold":
        icon = ":rotating_light:" if (event.threshold or 0) >= 100 else ":warning:"
        return (
            f"{icon} app spend reached {pct} of app budget {event.limit} "
            f"({_amount(event.used, event.unit)} / {_amount(event.limit_value, event.unit)})"
            f" for {event.period}"
        )
    if event.type == "spike":
        try:
            hour = datetime.fromtimestamp(int(event.period) * 3600, UTC)
            when = hour.strftime("%Y-%m-%d %H:00 UTC")
        except (TypeError, ValueError, OverflowError):
            when = event.period
        return (
            f":chart_with_upwards_trend: usage spike: {_who(event)} used "
            f"{_amount(event.used, event.unit)} tokens in the hour from {when}"
        )
    if event.type == "test":
        return ":white_check_mark: quota-middleware test alert: this sink is reachable"
    return f":bell: {event.type} alert {event.id}"


_EMOJI = re.compile(r":[a-z_]+: ")


def plain_text(event: AlertEvent) -> str:
    """:func:`format_text` without Slack's emoji codes, for logs and terminals."""
    return _EMOJI.sub("", format_text(event), count=1)


def _mask(url: str, *, hide_path: bool = False) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    path = "/..." if hide_path and parts.path not in ("", "/") else parts.path
    return f"{parts.scheme}://{host}{path}"


# -- sinks ---------------------------------------------------------------------------------------
class DeliveryError(Exception):
    """A sink refused or could not take an event (non-2xx, network error, callable raised)."""


class Sink(Protocol):
    @property
    def name(self) -> str:
        """Stable across processes and restarts: it names the sink's consumer group."""
        ...

    def send(self, event: AlertEvent) -> None: ...

    def describe(self) -> str: ...


def _check_url(url: Any, where: str) -> str:
    if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
        raise ConfigurationError(where, "must be an http:// or https:// URL")
    if not urlsplit(url).hostname:
        raise ConfigurationError(where, "URL has no host")
    return url


def _sink_name(kind: str, url: str) -> str:
    return f"{kind}-{hashlib.sha256(url.encode()).hexdigest()[:10]}"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is a failed delivery: never replay a signed POST somewhere else (or as GET)."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def _post(url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> int:
    """POST ``body``; the status, or :class:`DeliveryError` for non-2xx and network errors.
    (urllib, so the usual ``HTTPS_PROXY`` / ``NO_PROXY`` environment applies.)"""
    req = urllib.request.Request(url, data=body, method="POST")
    for k, v in headers.items():
        req.add_header(k, v)
    try:
        with _opener.open(req, timeout=timeout) as resp:
            resp.read(65536)
            status = int(resp.status)
    except urllib.error.HTTPError as e:
        with contextlib.suppress(Exception):
            e.read(4096)
        raise DeliveryError(f"HTTP {e.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise DeliveryError(f"{type(e).__name__}: {reason}") from None
    if not 200 <= status < 300:
        raise DeliveryError(f"HTTP {status}")
    return status


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class WebhookSink:
    """A JSON POST of each event, signed with HMAC-SHA256 (see the module docs).

    :param secret: the HMAC key; or ``secret_env`` (an environment variable holding it) or
        ``secret_file`` (a file holding it, relative to the policy file). Read once, at startup.
    :param headers: extra request headers (e.g. an auth token of the receiver).
    :param name: names the sink's consumer group; default derived from the URL. Set it to keep
        delivery state when the URL changes.
    """

    url: str
    secret: str | None = None
    secret_env: str | None = None
    secret_file: str | None = None
    timeout: float = 5.0
    headers: Mapping[str, str] = field(default_factory=dict)
    name: str = ""

    def __post_init__(self) -> None:
        where = "alerts.webhooks"
        _check_url(self.url, f"{where}.url")
        given = [k for k in ("secret", "secret_env", "secret_file") if getattr(self, k)]
        if len(given) != 1:
            raise ConfigurationError(
                f"{where}.secret", "exactly one of secret, secret_env, secret_file is required"
            )
        if self.secret_env:
            value = os.environ.get(self.secret_env)
            if not value:
                raise ConfigurationError(
                    f"{where}.secret_env", f"environment variable {self.secret_env} is not set"
                )
            object.__setattr__(self, "secret", value)
        elif self.secret_file:
            try:
                value = Path(self.secret_file).read_text("utf-8").strip()
            except OSError as e:
                raise ConfigurationError(
                    f"{where}.secret_file", f"cannot read it: {e.strerror}"
                ) from None
            if not value:
                raise ConfigurationError(f"{where}.secret_file", "the file is empty")
            object.__setattr__(self, "secret", value)
        if not isinstance(self.secret, str):
            raise ConfigurationError(f"{where}.secret", "must be a string")
        if not isinstance(self.timeout, int | float) or not (0 < self.timeout <= 60):
            raise ConfigurationError(f"{where}.timeout", "must be in (0, 60] seconds")
        if not isinstance(self.headers, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.headers.items()
        ):
            raise ConfigurationError(f"{where}.headers", "must be a table of strings")
        object.__setattr__(self, "headers", dict(self.headers))
        name = self.name or _sink_name("webhook", self.url)
        if not isinstance(name, str) or not name or len(name) > 64 or " " in name:
            raise ConfigurationError(f"{where}.name", "1-64 characters, no spaces")
        object.__setattr__(self, "name", name)

    def __repr__(self) -> str:
        return (
            f"WebhookSink(url={_mask(self.url)!r}, secret='***', timeout={self.timeout}, "
            f"headers={sorted(self.headers)}, name={self.name!r})"
        )

    def describe(self) -> str:
        return f"webhook {_mask(self.url)}"

    def request(
        self, event: AlertEvent, *, now: float | None = None
    ) -> tuple[bytes, dict[str, str]]:
        """The body and headers of the POST for ``event`` (signed at ``now``)."""
        assert self.secret is not None
        body = event.to_json().encode()
        ts = int(time.time() if now is None else now)
        headers = {
            "User-Agent": _USER_AGENT,
            **self.headers,
            "Content-Type": "application/json",
            EVENT_ID_HEADER: event.id,
            TIMESTAMP_HEADER: str(ts),
            SIGNATURE_HEADER: sign(self.secret, ts, body),
        }
        return body, headers

    def send(self, event: AlertEvent) -> None:
        body, headers = self.request(event)
        _post(self.url, body, headers, self.timeout)


@dataclass(frozen=True, slots=True)
class SlackSink:
    """A Slack-compatible incoming webhook (Slack, Mattermost, Rocket.Chat, ...):
    ``{"text": "..."}``. The URL is a credential: it is never logged."""

    url: str
    timeout: float = 5.0
    name: str = ""

    def __post_init__(self) -> None:
        _check_url(self.url, "alerts.slack")
        if not self.name:
            object.__setattr__(self, "name", _sink_name("slack", self.url))

    def __repr__(self) -> str:
        return f"SlackSink(url={_mask(self.url, hide_path=True)!r}, name={self.name!r})"

    def describe(self) -> str:
        return f"slack {_mask(self.url, hide_path=True)}"

    def send(self, event: AlertEvent) -> None:
        body = json.dumps({"text": format_text(event)}).encode()
        headers = {"Content-Type": "application/json", "User-Agent": _USER_AGENT}
        _post(self.url, body, headers, self.timeout)


@dataclass(frozen=True, slots=True)
class LogSink:
    """Each event at WARNING on the ``quota_middleware.alerts`` logger."""

    name: str = "log"

    def describe(self) -> str:
        return "log (logger quota_middleware.alerts)"

    def send(self, event: AlertEvent) -> None:
        log.warning("quota alert %s: %s", event.id, plain_text(event))


@dataclass(frozen=True, slots=True)
class CallableSink:
    """A Python callable, called with each :class:`AlertEvent` in the dispatcher's thread; an
    exception is a failed delivery (retried)."""

    fn: Callable[[AlertEvent], Any]
    name: str

    def describe(self) -> str:
        return f"callable {self.name}"

    def send(self, event: AlertEvent) -> None:
        try:
            self.fn(event)
        except Exception as e:
            raise DeliveryError(f"{type(e).__name__}: {e}") from e


def _callable_name(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None) or "callable"
    qual = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"py-{module}.{qual}".replace("<", "").replace(">", "").replace(" ", "")[:64]


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
        for key in d:
            if key not in _TOML_KEYS:
                hint = " (Python only)" if key == "callables" else ""
                raise ConfigurationError(
                    f"alerts.{key}", f"unknown key{hint}; expected one of {sorted(_TOML_KEYS)}"
                )
        raw_hooks = d.get("webhooks", [])
        if not isinstance(raw_hooks, list):
            raise ConfigurationError("alerts.webhooks", "must be an array of tables")
        webhooks = []
        for i, w in enumerate(raw_hooks):
            where = f"alerts.webhooks[{i}]"
            if not isinstance(w, Mapping):
                raise ConfigurationError(where, "must be a table")
            for key in w:
                if key not in _WEBHOOK_KEYS:
                    raise ConfigurationError(
                        f"{where}.{key}", f"unknown key; expected one of {sorted(_WEBHOOK_KEYS)}"
                    )
            params = dict(w)
            if "secret_file" in params and base_dir is not None:
                params["secret_file"] = str(Path(base_dir) / str(params["secret_file"]))
            try:
                webhooks.append(WebhookSink(**params))
            except ConfigurationError as e:
                sub = e.field.split(".")[-1]
                raise ConfigurationError(f"{where}.{sub}", str(e).split(": ", 1)[-1]) from None
            except TypeError as e:
                raise ConfigurationError(where, str(e)) from None
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


# -- memory backend: the outbox operations as scripts (run under the backend's lock) -------------
def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _mem_claim(store: MemoryStore, keys: Sequence[str], argv: Sequence[Any]) -> list[Any]:
    """KEYS: outbox, cursors hash. ARGV: lane, count, start id (for a new lane). The next
    entries after the lane's cursor, and the cursor moved past them (a group's ``>`` read)."""
    lane, count = _s(argv[0]), int(argv[1])
    cursor = store.hget(keys[1], lane)
    after = cursor.decode() if cursor is not None else _s(argv[2])
    entries = store.xrange(keys[0], after)[:count]
    if entries:
        store.hset(keys[1], {lane: entries[-1][0].encode()})
    return [[eid, fields.get("event")] for eid, fields in entries]


def _mem_dead(store: MemoryStore, keys: Sequence[str], argv: Sequence[Any]) -> str:
    """KEYS: dead-letter stream. ARGV: maxlen, then field, value pairs."""
    fields = {_s(argv[i]): _b(argv[i + 1]) for i in range(1, len(argv) - 1, 2)}
    return store.xadd(keys[0], fields, maxlen=int(argv[0]))


def _mem_recent(store: MemoryStore, keys: Sequence[str], argv: Sequence[Any]) -> list[Any]:
    """KEYS: a stream. ARGV: count, after id ("" for the newest ``count``)."""
    count, after = int(argv[0]), _s(argv[1])
    if after:
        entries = store.xrange(keys[0], after)[:count]
    else:
        entries = store.xrange(keys[0])[-count:]
    return [[eid, fields] for eid, fields in entries]


SCRIPTS.setdefault("alerts_claim", _mem_claim)
SCRIPTS.setdefault("alerts_dead", _mem_dead)
SCRIPTS.setdefault("alerts_recent", _mem_recent)


# -- the dispatcher ------------------------------------------------------------------------------
def _consumer_name() -> str:
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{os.urandom(3).hex()}"


def _is_async_client(client: Any) -> bool:
    import redis.asyncio as redis_async
    from redis.asyncio.cluster import RedisCluster

    return isinstance(client, redis_async.Redis | RedisCluster)


def _sync_client(source: Any, storage: StorageConfig | None) -> tuple[Any, bool]:
    """A sync redis client for ``source`` (a backend, a client, or None), and whether we own it."""
    from .backends.redis import client_from_url

    # a backend (it has run()/run_async()) wraps its client
    client = source.client if hasattr(source, "breaker") else source
    if client is not None and not _is_async_client(client):
        return client, False
    timeout = max(storage.timeout, 5.0) if storage is not None else 5.0
    if storage is not None and not storage.url.startswith("memory://"):
        return client_from_url(storage.url, timeout=timeout, asyncio=False), True
    pool = getattr(client, "connection_pool", None)
    kwargs = dict(getattr(pool, "connection_kwargs", {}) or {})
    if kwargs:
        import redis

        keep = ("host", "port", "db", "username", "password", "path")
        opts = {k: kwargs[k] for k in keep if kwargs.get(k) is not None}
        if "path" in opts:
            opts["unix_socket_path"] = opts.pop("path")
        return redis.Redis(socket_timeout=timeout, socket_connect_timeout=timeout, **opts), True
    raise ConfigurationError(
        "storage.url", "alert delivery needs a Redis URL (or a sync redis client) to connect to"
    )


class _Lane(Protocol):
    sink: Sink

    def step(self) -> int: ...


class Dispatcher:
    """Reads the outbox and delivers every event to every sink of ``config``.

    :param source: a :class:`MemoryBackend`, a sync Redis backend or client (``redis.Redis`` /
        ``RedisCluster``), an async one (a sync client is then built from ``storage.url`` or the
        async client's connection settings: the dispatcher runs in a thread), or None for
        ``config.storage.url``.
    :param config: a :class:`QuotaConfig` (its ``alerts``, ``storage`` and prefix) or an
        :class:`AlertsConfig`.
    :param prefix: the key prefix (default: ``config.storage.prefix``, or ``"qm"``).
    :param consumer: this consumer's name in the groups (default ``host-pid-random``).
    """

    def __init__(
        self,
        source: Any,
        config: QuotaConfig | AlertsConfig,
        *,
        prefix: str | None = None,
        consumer: str | None = None,
        storage: StorageConfig | None = None,
        metrics: Any = None,
    ) -> None:
        #: a :class:`~quota_middleware.metrics.PrometheusMetrics`: deliveries and failures
        self.metrics = metrics
        if isinstance(config, QuotaConfig):
            if config.alerts is None:
                raise ConfigurationError("alerts", "no [alerts] sinks configured")
            storage = storage or config.storage
            alerts: AlertsConfig = config.alerts
        else:
            alerts = config
        self.config = alerts
        self.prefix = prefix or (storage.prefix if storage is not None else "qm")
        self.consumer = consumer or _consumer_name()
        self.stream = outbox_key(self.prefix)
        self.dead_stream = dead_key(self.prefix)
        self._owned = False
        self.memory: MemoryBackend | None = None
        self.client: Any = None
        if source is None and storage is not None and storage.url.startswith("memory://"):
            raise ConfigurationError(
                "storage.url",
                "the memory backend's outbox lives inside the app process: pass its backend, "
                "or use Redis for a separate alert worker",
            )
        if isinstance(source, MemoryBackend):
            self.memory = source
        else:
            self.client, self._owned = _sync_client(source, storage)
        self.lanes: list[_Lane] = [
            _MemoryLane(self, s) if self.memory is not None else _RedisLane(self, s)
            for s in alerts.sinks
        ]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._errors_logged: dict[str, float] = {}

    # -- running ------------------------------------------------------------------------------
    def run_once(self) -> int:
        """Deliver whatever is ready on every sink (new entries, retries that are due); the
        number of successful deliveries."""
        return sum(self._step(lane) for lane in self.lanes)

    def _step(self, lane: _Lane) -> int:
        try:
            return lane.step()
        except Exception as e:  # the store is down, or a bug: keep the thread alive
            self._warn(lane.sink.name, f"alert delivery to {lane.sink.describe()} failed: {e!r}")
            return 0

    def _warn(self, key: str, message: str) -> None:
        now = time.monotonic()
        if now - self._errors_logged.get(key, -1e9) >= 60:
            self._errors_logged[key] = now
            log.warning("quota_middleware: %s", message)

    def _lane_loop(self, lane: _Lane, stop: threading.Event) -> None:
        while not stop.is_set():
            if self._step(lane) == 0:
                stop.wait(self.config.poll_interval)

    def run_forever(self, stop: threading.Event | None = None) -> None:
        """Deliver until ``stop`` is set (one thread per sink, so a slow sink delays no other)."""
        stop = stop or self._stop
        threads = [
            threading.Thread(target=self._lane_loop, args=(lane, stop), daemon=True,
                             name=f"quota-alerts-{lane.sink.name}")
            for lane in self.lanes[1:]
        ]  # fmt: skip
        for t in threads:
            t.start()
        try:
            if self.lanes:
                self._lane_loop(self.lanes[0], stop)
            else:
                stop.wait()
        finally:
            stop.set()
            for t in threads:
                t.join()

    def start(self) -> None:
        """Deliver in a daemon thread until :meth:`stop`."""
        if self._threads and self._threads[0].is_alive():
            return
        self._stop.clear()
        t = threading.Thread(target=self.run_forever, args=(self._stop,), daemon=True,
                             name="quota-alerts")  # fmt: skip
        self._threads = [t]
        t.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (after the delivery in flight) and release what this consumer holds."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        self._threads = []
        if self.client is not None:
            for lane in self.lanes:
                if isinstance(lane, _RedisLane):
                    with contextlib.suppress(Exception):
                        lane.forget_consumer()
            if self._owned:
                with contextlib.suppress(Exception):
                    self.client.close()

    # -- shared by the lanes ------------------------------------------------------------------
    def attempt(self, sink: Sink, raw: Any) -> str | None:
        """Deliver one entry's JSON to ``sink``: None on success, else the error."""
        if raw is None:
            return "malformed outbox entry: no event field"
        try:
            event = AlertEvent.from_json(raw)
        except (ValueError, TypeError) as e:
            return f"malformed outbox entry: {e}"
        try:
            sink.send(event)
        except Exception as e:
            if self.metrics is not None:
                self.metrics.alert(event, "failed")
            return str(e) if isinstance(e, DeliveryError) else f"{type(e).__name__}: {e}"
        if self.metrics is not None:
            self.metrics.alert(event, "delivered")
        return None

    def dead_fields(
        self, sink: Sink, group: str, eid: str, raw: Any, error: str, attempts: int
    ) -> dict[str, Any]:
        log.warning(
            "quota_middleware: alert %s to %s dead-lettered after %d attempts: %s",
            eid, sink.describe(), attempts, error,
        )  # fmt: skip
        return {
            "event": raw if raw is not None else b"",
            "sink": sink.name,
            "group": group,
            "entry": eid,
            "error": error[:500],
            "attempts": str(attempts),
            "at": f"{time.time():.3f}",
        }


def _is_malformed(error: str) -> bool:
    return error.startswith("malformed outbox entry")


class _RedisLane:
    """One sink's consumer group on the outbox stream."""

    def __init__(self, d: Dispatcher, sink: Sink) -> None:
        self.d = d
        self.sink = sink
        self.group = f"{d.config.group}:{sink.name}"
        self.ready = False
        self.errors: dict[str, str] = {}
        self.pruned = time.monotonic()

    def _ensure_group(self) -> None:
        if self.ready:
            return
        try:
            start = self.d.config.start_id()
            self.d.client.xgroup_create(self.d.stream, self.group, id=start, mkstream=True)
        except Exception as e:
            if "BUSYGROUP" not in str(e):
                raise
        self.ready = True

    def step(self) -> int:
        self._ensure_group()
        try:
            n = self._retry_pending()
            n += self._read_new()
            if time.monotonic() - self.pruned > PRUNE_EVERY:
                self.pruned = time.monotonic()
                self._prune()
        except Exception as e:
            if "NOGROUP" in str(e):  # the stream or the group was deleted: create it again
                self.ready = False
                return 0
            raise
        return n

    def _read_new(self) -> int:
        c, d = self.d.client, self.d
        reply = c.xreadgroup(self.group, d.consumer, {d.stream: ">"}, count=d.config.batch)
        n = 0
        for _stream, entries in reply or ():
            for eid, fields in entries:
                n += self._deliver(_s(eid), _field(fields), attempts=1)
        return n

    def _retry_pending(self) -> int:
        c, d, cfg = self.d.client, self.d, self.d.config
        rows = c.xpending_range(
            d.stream, self.group, min="-", max="+", count=cfg.batch,
            idle=max(1, int(cfg.backoff * 1000)),
        )  # fmt: skip
        n = 0
        for row in rows:
            eid = _s(row["message_id"])
            tries = int(row["times_delivered"])
            need = cfg.delay(tries)
            if _s(row["consumer"]) != d.consumer:
                need = max(need, cfg.claim_idle)  # a silent consumer: maybe dead, maybe slow
            need_ms = int(need * 1000)
            if int(row["time_since_delivered"]) < need_ms:
                continue
            # atomic take-over: if another consumer claimed it meanwhile, its idle time was
            # reset and this claim returns nothing
            claimed = c.xclaim(d.stream, self.group, d.consumer, need_ms, [eid])
            if not claimed or claimed[0] is None:
                continue
            fields = _field(claimed[0][1])
            if tries >= cfg.max_attempts:  # its last attempt failed, then its consumer died
                error = self.errors.pop(eid, "delivery failed (consumer gone)")
                self._dead(eid, fields, error, tries)
                continue
            n += self._deliver(eid, fields, attempts=tries + 1)
        return n

    def _deliver(self, eid: str, raw: Any, attempts: int) -> int:
        c, d = self.d.client, self.d
        error = d.attempt(self.sink, raw)
        if error is None:
            c.xack(d.stream, self.group, eid)
            self.errors.pop(eid, None)
            return 1
        if attempts >= d.config.max_attempts or _is_malformed(error):
            self._dead(eid, raw, error, attempts)
            return 0
        self.errors[eid] = error
        log.info("quota_middleware: alert %s to %s failed (attempt %d): %s",
                 eid, self.sink.describe(), attempts, error)  # fmt: skip
        # restart the entry's idle clock without counting a delivery: the backoff runs from now
        c.xclaim(d.stream, self.group, d.consumer, 0, [eid], justid=True)
        return 0

    def _dead(self, eid: str, raw: Any, error: str, attempts: int) -> None:
        c, d = self.d.client, self.d
        fields = d.dead_fields(self.sink, self.group, eid, raw, error, attempts)
        c.xadd(d.dead_stream, fields, maxlen=DEAD_MAXLEN, approximate=True)
        c.xack(d.stream, self.group, eid)
        self.errors.pop(eid, None)

    def _prune(self) -> None:
        """Remove consumers that hold nothing and have not been seen for a long time (workers
        that were killed): a live consumer reads every ``poll_interval``, so it is never idle
        that long, and one that holds entries is kept until they are taken over."""
        c, d = self.d.client, self.d
        for info in c.xinfo_consumers(d.stream, self.group):
            name = _s(info["name"])
            if int(info["pending"]) == 0 and int(info["idle"]) > PRUNE_IDLE_MS:
                if name != d.consumer:
                    c.xgroup_delconsumer(d.stream, self.group, name)

    def forget_consumer(self) -> None:
        """Remove this consumer from the group if it holds nothing (a tidy shutdown)."""
        if not self.ready:
            return
        c, d = self.d.client, self.d
        mine = c.xpending_range(d.stream, self.group, min="-", max="+", count=1,
                                consumername=d.consumer)  # fmt: skip
        if not mine:
            c.xgroup_delconsumer(d.stream, self.group, d.consumer)


def _field(fields: Any) -> Any:
    if not isinstance(fields, Mapping):
        return None
    return fields.get(b"event", fields.get("event"))


class _MemoryLane:
    """One sink's cursor on the memory backend's outbox, with its failed entries."""

    def __init__(self, d: Dispatcher, sink: Sink) -> None:
        self.d = d
        self.sink = sink
        self.group = f"{d.config.group}:{sink.name}"
        # entry id -> [failed attempts, due (monotonic), raw event, last error]
        self.pending: dict[str, list[Any]] = {}

    def _run(self, name: str, keys: tuple[str, ...], args: tuple[Any, ...]) -> Any:
        assert self.d.memory is not None
        return self.d.memory.run(ScriptCall(name, keys, args))

    def step(self) -> int:
        d = self.d
        n = 0
        now = time.monotonic()
        for eid, (failures, due, raw, _err) in list(self.pending.items()):
            if due <= now:
                n += self._deliver(eid, raw, failures + 1)
        got = self._run("alerts_claim", (d.stream, _cursor_key(d.prefix)),
                        (self.group, d.config.batch, d.config.start_id()))  # fmt: skip
        for eid, raw in got:
            n += self._deliver(eid, raw, 1)
        return n

    def _deliver(self, eid: str, raw: Any, attempts: int) -> int:
        d = self.d
        error = d.attempt(self.sink, raw)
        if error is None:
            self.pending.pop(eid, None)
            return 1
        if attempts >= d.config.max_attempts or _is_malformed(error):
            self.pending.pop(eid, None)
            fields = d.dead_fields(self.sink, self.group, eid, raw, error, attempts)
            flat: list[Any] = [DEAD_MAXLEN]
            for k, v in fields.items():
                flat += [k, v]
            self._run("alerts_dead", (d.dead_stream,), tuple(flat))
            return 0
        log.info("quota_middleware: alert %s to %s failed (attempt %d): %s",
                 eid, self.sink.describe(), attempts, error)  # fmt: skip
        self.pending[eid] = [attempts, time.monotonic() + d.config.delay(attempts), raw, error]
        return 0


# -- reading the outbox (tail, tests, admin pages) -----------------------------------------------
def read_stream(
    source: Any, key: str, *, count: int = 20, after: str | None = None
) -> list[tuple[str, dict[str, bytes]]]:
    """Entries of stream ``key`` (the outbox or the dead letters), oldest first: the newest
    ``count``, or up to ``count`` after id ``after``. ``source``: a memory backend or a sync
    Redis backend / client."""
    if isinstance(source, MemoryBackend):
        rows = source.run(ScriptCall("alerts_recent", (key,), (count, after or "")))
        return [(_s(eid), {_s(k): _b(v) for k, v in f.items()}) for eid, f in rows]
    client = source.client if hasattr(source, "breaker") else source
    if after:
        raw = client.xrange(key, min=f"({after}", max="+", count=count)
    else:
        raw = list(reversed(client.xrevrange(key, max="+", min="-", count=count)))
    return [(_s(eid), {_s(k): _b(v) for k, v in f.items()}) for eid, f in raw]


def outbox_events(source: Any, prefix: str = "qm", count: int = 1000) -> list[AlertEvent]:
    """The newest ``count`` events in the outbox, oldest first."""
    return [
        AlertEvent.from_json(f["event"])
        for _eid, f in read_stream(source, outbox_key(prefix), count=count)
        if "event" in f
    ]


# -- the middleware hook -------------------------------------------------------------------------
class InProcessDelivery:
    """One dispatcher per middleware instance and process, started lazily by the first request
    (after a pre-fork server forked its workers) in a daemon thread; stopped at exit."""

    def __init__(self, config: QuotaConfig, redis: Any = None, metrics: Any = None) -> None:
        self.config = config
        self._redis = redis
        self._metrics = metrics
        self._lock = threading.Lock()
        self._pid: int | None = None
        self.dispatcher: Dispatcher | None = None
        self._registered = False

    def ensure(self, backend: Any) -> None:
        """Start the dispatcher in this process if it is not running (cheap when it is)."""
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            source = backend if isinstance(backend, MemoryBackend) else (self._redis or backend)
            try:
                self.dispatcher = Dispatcher(source, self.config, metrics=self._metrics)
                self.dispatcher.start()
            except Exception as e:
                self.dispatcher = None
                log.warning("quota_middleware: alert delivery not started: %s", e)
                return
            if not self._registered:
                self._registered = True
                atexit.register(self.stop)

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            d, self.dispatcher = self.dispatcher, None
            self._pid = None
        if d is not None:
            d.stop(timeout)


def in_process_delivery(
    config: QuotaConfig, redis: Any = None, metrics: Any = None
) -> InProcessDelivery | None:
    """The adapters' hook: None unless ``config.alerts.deliver_in_process``."""
    alerts = config.alerts
    if alerts is None or not getattr(alerts, "deliver_in_process", False):
        return None
    return InProcessDelivery(config, redis, metrics)


# -- the CLI commands (wired in cli.py) ----------------------------------------------------------
def _need_redis(config: QuotaConfig, err: TextIO) -> bool:
    if config.storage.url.startswith("memory://"):
        print(
            "quota-middleware: the memory backend's alert outbox lives inside the app process; "
            "set [storage] url (or QUOTA_REDIS_URL) to a Redis URL",
            file=err,
        )
        return False
    return True


def cli_run(
    config: QuotaConfig,
    *,
    once: bool = False,
    stop: threading.Event | None = None,
    err: TextIO | None = None,
) -> int:
    """``quota-middleware alerts run``: a separate delivery worker (set ``deliver_in_process =
    false`` in the app's policy). Runs until SIGTERM/SIGINT (or ``stop``); ``once``: deliver what
    is ready and exit. Any number of workers may run: they share the consumer groups."""
    err = err or sys.stderr
    if config.alerts is None:
        print("quota-middleware: no [alerts] table in the policy: nothing to deliver to", file=err)
        return 2
    if not _need_redis(config, err):
        return 2
    dispatcher = Dispatcher(None, config)
    if once:
        try:
            n = dispatcher.run_once()
        finally:
            dispatcher.stop()
        print(f"delivered {n}", file=err)
        return 0
    stop = stop or threading.Event()
    restore: list[tuple[signal.Signals, Any]] = []
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            restore.append((sig, signal.getsignal(sig)))
            signal.signal(sig, lambda *_: stop.set())
    sinks = ", ".join(s.describe() for s in dispatcher.config.sinks)
    print(f"quota-middleware: delivering alerts as {dispatcher.consumer} to {sinks}", file=err)
    try:
        dispatcher.run_forever(stop)
    finally:
        dispatcher.stop()
        for sig, handler in restore:
            signal.signal(sig, handler)
    return 0


def _tail_line(eid: str, fields: Mapping[str, bytes], as_json: bool) -> str:
    raw = fields.get("event", b"")
    if as_json:
        return raw.decode("utf-8", "replace")
    try:
        event = AlertEvent.from_json(raw)
    except (ValueError, TypeError):
        return f"{eid}  (malformed entry)"
    when = datetime.fromtimestamp(event.at or 0, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    text = format_text(event)
    if text.startswith(":"):  # drop the Slack emoji
        text = text.split(" ", 1)[-1]
    return f"{when}  {event.type:<13}  {event.id}  {text}"


def cli_tail(
    config: QuotaConfig,
    *,
    follow: bool = False,
    count: int = 20,
    as_json: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
    stop: threading.Event | None = None,
    poll: float = 0.5,
) -> int:
    """``quota-middleware alerts tail``: the newest ``count`` outbox events, oldest first (one
    JSON object a line with ``as_json``); ``follow`` keeps printing new ones until interrupted.
    Reads only: it takes nothing from the delivery groups."""
    out = out or sys.stdout
    err = err or sys.stderr
    if not _need_redis(config, err):
        return 2
    from .backends.redis import client_from_url

    client = client_from_url(
        config.storage.url, timeout=max(config.storage.timeout, 5.0), asyncio=False
    )
    key = outbox_key(config.storage.prefix)
    stop = stop or threading.Event()
    try:
        rows = read_stream(client, key, count=count) if count > 0 else []
        for eid, fields in rows:
            print(_tail_line(eid, fields, as_json), file=out)
        out.flush()
        if rows:
            last = rows[-1][0]
        else:
            newest = client.xrevrange(key, count=1)
            last = _s(newest[0][0]) if newest else "0-0"
        while follow and not stop.is_set():
            rows = read_stream(client, key, count=1000, after=last)
            for eid, fields in rows:
                print(_tail_line(eid, fields, as_json), file=out)
            if rows:
                last = rows[-1][0]
                out.flush()
            else:
                stop.wait(poll)
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
    return 0


def sample_event() -> AlertEvent:
    """The synthetic event ``alerts test`` sends (type ``"test"``)."""
    now = time.time()
    return AlertEvent(
        id=f"test:{os.urandom(6).hex()}", type="test", caller=None, tenant=None, plan=None,
        limit="test", period=datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d"),
        threshold=None, used=0, limit_value=None, unit="tokens", at=now,
    )  # fmt: skip


def cli_test(config: QuotaConfig, out: TextIO | None = None) -> int:
    """``quota-middleware alerts test``: send a test event straight to every configured sink
    (not through the outbox) and report each; exit status 1 if any failed."""
    out = out or sys.stdout
    alerts: AlertsConfig | None = config.alerts
    if alerts is None or not alerts.sinks:
        print("no alert sinks configured (add an [alerts] table)", file=out)
        return 2
    event = sample_event()
    failed = 0
    for sink in alerts.sinks:
        try:
            sink.send(event)
        except Exception as e:
            failed += 1
            print(f"FAILED  {sink.describe()}: {e}", file=out)
        else:
            print(f"OK      {sink.describe()}", file=out)
    return 1 if failed else 0
