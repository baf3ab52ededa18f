"""The embedded default backend: in-process, the same semantics as Redis, one lock.

For development, tests and single-process apps. Limits are per process: with several workers each
has its own counters, so use Redis there.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from ..scripts import ScriptCall
from . import memory_scripts
from .memstore import MemoryStore

ScriptImpl = Callable[[MemoryStore, Sequence[str], Sequence[Any]], Any]

#: script name -> Python twin. Extended by modules that add scripts (API keys, usage, alerts).
SCRIPTS: dict[str, ScriptImpl] = {
    "admit": memory_scripts.admit,
    "settle": memory_scripts.settle,
    "extend": memory_scripts.extend,
    "read": memory_scripts.read,
    "margins": memory_scripts.margins,
    "outbox_add": memory_scripts.outbox_add,
}


class MemoryBackend:
    """Runs each script's Python twin under one lock, as Redis runs one script at a time."""

    def __init__(self, store: MemoryStore | None = None) -> None:
        self.store = store or MemoryStore()
        self._lock = threading.Lock()

    def run(self, call: ScriptCall) -> Any:
        impl = SCRIPTS.get(call.name)
        if impl is None:
            _load_extensions()
            impl = SCRIPTS[call.name]
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


def _load_extensions() -> None:
    from .. import apikeys  # noqa: F401  (registers the key store's scripts)
