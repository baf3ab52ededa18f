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

Modules (private; this package re-exports the public names): ``_sinks`` (webhook signing, the
sinks) and ``_text`` (event text for people) and ``_config`` (:class:`AlertsConfig`) sit below the
policy, which holds the sinks' configuration; ``_outbox`` (keys, the memory backend's outbox
scripts, reading the outbox), ``_dispatcher`` and ``_lanes`` (delivery) and ``_delivery`` (the
middleware hook) sit beside the core. The ``quota-middleware alerts ...`` commands live in
:mod:`quota_middleware.cli`.
"""

from __future__ import annotations

from quota_middleware.alerts._config import AlertsConfig
from quota_middleware.alerts._delivery import InProcessDelivery, in_process_delivery
from quota_middleware.alerts._dispatcher import Dispatcher
from quota_middleware.alerts._lanes import DEAD_MAXLEN, PRUNE_EVERY, PRUNE_IDLE_MS
from quota_middleware.alerts._outbox import dead_key, outbox_events, read_stream
from quota_middleware.alerts._sinks import (
    EVENT_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    CallableSink,
    DeliveryError,
    LogSink,
    Sink,
    SlackSink,
    WebhookSink,
    sign,
    verify_signature,
)
from quota_middleware.alerts._text import format_text, plain_text

__all__ = [
    "DEAD_MAXLEN",
    "EVENT_ID_HEADER",
    "PRUNE_EVERY",
    "PRUNE_IDLE_MS",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "AlertsConfig",
    "CallableSink",
    "DeliveryError",
    "Dispatcher",
    "InProcessDelivery",
    "LogSink",
    "Sink",
    "SlackSink",
    "WebhookSink",
    "dead_key",
    "format_text",
    "in_process_delivery",
    "outbox_events",
    "plain_text",
    "read_stream",
    "sign",
    "verify_signature",
]
