"""The embedded default backend: in-process, the same semantics as Redis, one lock.

For development, tests and single-process apps. Limits are per process: with several workers each
has its own counters, so use Redis there.
"""

from __future__ import annotations

import threading
from typing import Any

from quota_middleware.backends._memstore import MemoryStore
from quota_middleware.backends._registry import SCRIPTS
from quota_middleware.base._scripts import ScriptCall


class MemoryBackend:
    """Runs each script's Python twin under one lock, as Redis runs one script at a time."""

    #: answers in microseconds without I/O: async callers may run it inline (no coroutine per
    #: call), as the ASGI adapter does
    inline = True

    def __init__(self, store: MemoryStore | None = None) -> None:
        self.store = store or MemoryStore()
        self._lock = threading.Lock()

    def run(self, call: ScriptCall) -> Any:
        impl = SCRIPTS[call.name].twin
        with self._lock:
            store = self.store
            store.frozen_us = None
            store.frozen_us = store.time_us()
            try:
                return impl(store, call.keys, call.args)
            finally:
                store.sweep_some()
                store.frozen_us = None

    async def run_async(self, call: ScriptCall) -> Any:
        # Each script is a few microseconds of dict work: cheaper to run inline than to hop threads.
        return self.run(call)

    def close(self) -> None:
        pass

    async def aclose(self) -> None:
        pass
