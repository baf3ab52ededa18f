"""``WSGIQuotaMiddleware``: wraps ``start_response`` and settles in ``close()`` (PEP 3333: the
server calls it once the response is sent, also when the client went away)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .backends.base import SyncBackend
from .backends.factory import sync_backend
from .config import QuotaConfig
from .engine import Decision, Engine, drive_sync
from .errors import IdentificationError, StorageError
from .identity import Identifier
from .request import RequestInfo
from .responses import Response, denied, rate_limit_headers, unauthorized

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger("quota_middleware")

ENVIRON_KEY = "quota_middleware.decision"


class WSGIQuotaMiddleware:
    """Per-caller limits for any WSGI app::

        app.wsgi_app = WSGIQuotaMiddleware(app.wsgi_app, config="policy.toml")

    Takes the same arguments as :class:`~quota_middleware.QuotaMiddleware`, with a sync
    ``redis.Redis``/``RedisCluster`` client. The decision is in
    ``environ["quota_middleware.decision"]``.
    """

    def __init__(
        self,
        app: WSGIApplication,
        *,
        config: QuotaConfig | str | os.PathLike[str],
        redis: Any = None,
        backend: SyncBackend | None = None,
        identifier: Identifier | None = None,
        clock: Callable[[], int] | None = None,
    ) -> None:
        self.app = app
        self.config = config if isinstance(config, QuotaConfig) else QuotaConfig.from_toml(config)
        self.engine = Engine(self.config, identifier=identifier, clock=clock)
        self.backend = backend or sync_backend(self.config.storage, redis)

    @property
    def stats(self) -> dict[str, int]:
        return self.engine.stats.snapshot()

    def __call__(
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> Iterable[bytes]:
        try:
            decision = drive_sync(
                self.engine.admit(RequestInfo.from_environ(environ)), self.backend
            )
        except IdentificationError as e:
            return _respond(start_response, unauthorized(e))
        environ[ENVIRON_KEY] = decision
        if not decision.allowed:
            return _respond(start_response, denied(decision))
        extra = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in rate_limit_headers(decision.statuses)
        ]
        app_start_response = start_response
        if extra:

            def app_start_response(
                status: str, headers: list[tuple[str, str]], exc_info: Any = None
            ) -> Callable[[bytes], object]:
                return start_response(status, [*headers, *extra], exc_info)

        if self.engine.plan_settle(decision) is None:
            return self.app(environ, app_start_response)
        try:
            app_iter = self.app(environ, app_start_response)
        except BaseException:
            self._settle(decision)
            raise
        return _ClosingIterable(app_iter, lambda: self._settle(decision))

    def _settle(self, decision: Decision) -> None:
        call = self.engine.plan_settle(decision)
        if call is None:
            return
        try:
            self.backend.run(call)
        except StorageError as e:
            log.warning("quota_middleware: settle failed (%s); lease will expire", e)


class _ClosingIterable:
    """Iterates the app's body; ``close()`` closes it and then runs ``on_close`` exactly once."""

    __slots__ = ("_iterable", "_on_close", "_closed")

    def __init__(self, iterable: Iterable[bytes], on_close: Callable[[], None]) -> None:
        self._iterable = iterable
        self._on_close = on_close
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._iterable)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            close = getattr(self._iterable, "close", None)
            if close is not None:
                close()
        finally:
            self._on_close()


def _respond(start_response: StartResponse, response: Response) -> list[bytes]:
    start_response(response.status_line, response.wsgi_headers())
    return [response.body]
