"""The sinks an alert event is delivered to (webhook, Slack, the log, a Python callable), and
the webhook signatures (see the package docs)."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from quota_middleware.alerts._text import format_text, plain_text
from quota_middleware.base._events import AlertEvent
from quota_middleware.errors import ConfigurationError
from quota_middleware.errors import (
    DeliveryError as DeliveryError,  # alerts.DeliveryError, raised by sinks
)

# one logger for the whole package: its name is documented (README, LogSink)
log = logging.getLogger("quota_middleware.alerts")

SIGNATURE_HEADER = "X-Quota-Signature"
TIMESTAMP_HEADER = "X-Quota-Timestamp"
EVENT_ID_HEADER = "X-Quota-Event-Id"
_USER_AGENT = "quota-middleware-alerts/1"


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


def _mask(url: str, *, hide_path: bool = False) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    path = "/..." if hide_path and parts.path not in ("", "/") else parts.path
    return f"{parts.scheme}://{host}{path}"


# -- sinks ---------------------------------------------------------------------------------------
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
