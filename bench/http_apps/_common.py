"""Shared pieces of the benchmark apps: the quota-middleware policies."""

from __future__ import annotations

import os

from quota_middleware import QuotaConfig, RequestInfo
from quota_middleware.config import AIRoute, Plan, StorageConfig
from quota_middleware.identity import Caller, IdentityConfig
from quota_middleware.limits import Budget, RequestRate, TokenQuota, TokenRate

HUGE_RATE = "1000000/second"  # never triggers; a bucket key lives ~1 s after its last request
AI_PATH = "/v1/chat/completions"


def storage(kind: str) -> StorageConfig:
    if kind == "memory":
        return StorageConfig(url="memory://")
    return StorageConfig(url=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))


def x_caller(info: RequestInfo) -> Caller | None:
    """The benchmark's caller header (wrk comes from one IP): ``X-Caller: c123``."""
    value = info.headers.get("x-caller")
    return Caller(value, source="custom") if value else None


def plain_config(kind: str, *, by_header: bool = False) -> QuotaConfig:
    """One request bucket, keyed by client IP (or by X-Caller when ``by_header``)."""
    identity = (
        IdentityConfig(order=("custom", "ip"), resolver=x_caller) if by_header else IdentityConfig()
    )
    return QuotaConfig(
        plans=[Plan(name="bench", limits=[RequestRate(rate=HUGE_RATE)])],
        identity=identity,
        storage=storage(kind),
    )


def ai_config(kind: str) -> QuotaConfig:
    """The metering path: AI route, request + token buckets, daily token quota, monthly budget."""
    return QuotaConfig(
        plans=[
            Plan(
                name="bench",
                limits=[
                    RequestRate(rate=HUGE_RATE),
                    TokenRate(rate="1000000/second", burst=10**9),
                    TokenQuota(tokens=10**12, period="day"),
                    Budget(usd=10**6, period="month"),
                ],
            )
        ],
        ai_routes=[AIRoute(path=AI_PATH, format="openai-chat")],
        storage=storage(kind),
    )
