"""The few plain string keys the admin app keeps beside the scripts' data: the browser
sessions' signing key, logged-out sessions, and the replies of idempotent requests.

Each needs an atomic set-if-absent with a lifetime, which no script offers. As in ``_fleet``
(SCAN) and the alert lanes (stream commands), Redis gets plain commands (``SET NX PX``, ``GET``,
``DEL``: one key each, so a cluster routes them by slot) on the backend's own client, and the
memory backend its store's same-named operations. Those keys are touched by this module only,
and the memory store lives in one process, so a lock of ours makes each operation atomic there.
"""

from __future__ import annotations

import threading
from typing import Any

from quota_middleware.backends.memory import MemoryBackend
from quota_middleware.base._protocols import SyncBackend
from quota_middleware.errors import BackendMismatch, StorageError

__all__ = ["KV"]

_LOCK = threading.Lock()


class KV:
    """String keys on ``backend`` (a ``MemoryBackend`` or a ``SyncRedisBackend``)."""

    def __init__(self, backend: SyncBackend) -> None:
        self.backend = backend
        if isinstance(backend, MemoryBackend):
            self._client: Any = None
        else:
            client = getattr(backend, "client", None)
            if client is None or not hasattr(client, "set"):
                raise BackendMismatch(
                    "the admin app needs a MemoryBackend or a SyncRedisBackend "
                    f"(or a sync redis client), not {type(backend).__name__}"
                )
            self._client = client

    def set(self, key: str, value: str, *, ttl_ms: int | None = None, nx: bool = False) -> bool:
        """SET ``key`` (only if absent with ``nx``); whether it was set."""
        if self._client is None:
            assert isinstance(self.backend, MemoryBackend)
            with _LOCK:
                return self.backend.store.set(key, value, nx=nx, px=ttl_ms)
        return bool(self._redis("set", key, value, px=ttl_ms, nx=nx))

    def get(self, key: str) -> str | None:
        if self._client is None:
            assert isinstance(self.backend, MemoryBackend)
            with _LOCK:
                raw = self.backend.store.get(key)
        else:
            raw = self._redis("get", key)
        if raw is None:
            return None
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    def delete(self, key: str) -> None:
        if self._client is None:
            assert isinstance(self.backend, MemoryBackend)
            with _LOCK:
                self.backend.store.delete(key)
            return
        self._redis("delete", key)

    def _redis(self, command: str, *args: Any, **kwargs: Any) -> Any:
        from redis.exceptions import RedisError

        try:
            return getattr(self._client, command)(*args, **kwargs)
        except RedisError as e:
            raise StorageError(f"redis {command} failed: {type(e).__name__}", e) from None
