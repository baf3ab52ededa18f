"""Storage backends: ``memory`` (embedded default) and Redis (sync and async, single or cluster)."""

from __future__ import annotations

from .base import AsyncBackend, CircuitBreaker, SyncBackend
from .memory import MemoryBackend

__all__ = ["AsyncBackend", "CircuitBreaker", "MemoryBackend", "SyncBackend"]
