"""quota-middleware: per-caller rate limits, token quotas and spend budgets for AI APIs, as
ASGI and WSGI middleware backed by Redis."""

from __future__ import annotations

from .alerts import AlertsConfig, WebhookSink
from .asgi import QuotaMiddleware
from .config import AIRoute, Plan, QuotaConfig, Routes, RouteWeight, StorageConfig
from .decision import Charge, Decision, LimitStatus
from .errors import (
    ConfigurationError,
    IdentificationError,
    InvalidCredentials,
    MissingCredentials,
    QuotaError,
    RequestTooLarge,
    StorageError,
)
from .events import AlertEvent
from .identity import Caller, IdentityConfig
from .limits import AppBudget, Budget, Concurrency, RequestRate, SpikeRule, TokenQuota, TokenRate
from .reports import Remaining, UsageReader, UsageRecord
from .usage import Usage
from .wsgi import WSGIQuotaMiddleware

__all__ = [
    "AIRoute",
    "AlertEvent",
    "AlertsConfig",
    "AppBudget",
    "Budget",
    "Caller",
    "Charge",
    "Concurrency",
    "ConfigurationError",
    "Decision",
    "IdentificationError",
    "IdentityConfig",
    "InvalidCredentials",
    "LimitStatus",
    "MissingCredentials",
    "Plan",
    "QuotaConfig",
    "QuotaError",
    "QuotaMiddleware",
    "RequestRate",
    "Remaining",
    "RequestTooLarge",
    "RouteWeight",
    "Routes",
    "StorageConfig",
    "SpikeRule",
    "StorageError",
    "TokenQuota",
    "TokenRate",
    "Usage",
    "UsageReader",
    "UsageRecord",
    "WSGIQuotaMiddleware",
    "WebhookSink",
]
