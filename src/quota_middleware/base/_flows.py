"""The two drivers of the sans-IO flows: a flow is a generator that yields
:class:`~quota_middleware.scripts.ScriptCall` values and is sent their replies (the httpx
auth-flow pattern). Store errors are thrown into the flow, which decides what they mean."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, TypeVar

from quota_middleware.base._protocols import AsyncBackend, SyncBackend
from quota_middleware.base._scripts import ScriptCall
from quota_middleware.errors import StorageError

T = TypeVar("T")


def drive_sync(flow: Generator[ScriptCall, Any, T], backend: SyncBackend) -> T:
    """Run a flow against a sync backend; store errors are thrown into the flow to handle."""
    try:
        call = next(flow)
        while True:
            try:
                reply = backend.run(call)
            except StorageError as e:
                call = flow.throw(e)
            else:
                call = flow.send(reply)
    except StopIteration as stop:
        result: T = stop.value
        return result


async def drive_async(flow: Generator[ScriptCall, Any, T], backend: AsyncBackend) -> T:
    try:
        call = next(flow)
        while True:
            try:
                reply = await backend.run_async(call)
            except StorageError as e:
                call = flow.throw(e)
            else:
                call = flow.send(reply)
    except StopIteration as stop:
        result: T = stop.value
        return result
