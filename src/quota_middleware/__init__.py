"""quota-middleware: per-caller rate limits, token quotas and spend budgets for AI APIs, as
ASGI and WSGI middleware backed by Redis."""

from __future__ import annotations

from quota_middleware.alerts import AlertsConfig, WebhookSink
from quota_middleware.asgi import QuotaMiddleware
from quota_middleware.base._events import AlertEvent
from quota_middleware.base._request import RequestInfo
from quota_middleware.config import AIRoute, Plan, QuotaConfig, Routes, RouteWeight, StorageConfig
from quota_middleware.core._decision import Charge, Decision, LimitStatus
from quota_middleware.errors import (
    ConfigurationError,
    IdentificationError,
    InvalidCredentials,
    MissingCredentials,
    QuotaError,
    RequestTooLarge,
    StorageError,
)
from quota_middleware.identity._identifier import Caller, IdentityConfig
from quota_middleware.limits import (
    AppBudget,
    Budget,
    Concurrency,
    RequestRate,
    SpikeRule,
    TenantBudget,
    TokenQuota,
    TokenRate,
)
from quota_middleware.metering._usage import Usage
from quota_middleware.reports import Remaining, UsageReader, UsageRecord
from quota_middleware.wsgi import WSGIQuotaMiddleware

__all__ = [
    "AIRoute",
    "AlertEvent",
    "AlertsConfig",
    "AppBudget",
    "TenantBudget",
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
    "RequestInfo",
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
