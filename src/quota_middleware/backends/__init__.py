"""Storage backends: ``memory`` (embedded default) and Redis (sync and async, single or cluster)."""

from __future__ import annotations

from quota_middleware.backends.memory import MemoryBackend
from quota_middleware.base._protocols import AsyncBackend, CircuitBreaker, SyncBackend

__all__ = ["AsyncBackend", "CircuitBreaker", "MemoryBackend", "SyncBackend"]
