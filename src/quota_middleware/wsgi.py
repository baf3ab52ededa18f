"""``WSGIQuotaMiddleware``: wraps ``start_response`` and the body iterable, and settles in
``close()`` (PEP 3333: the server calls it once the response is sent, also when the client went
away mid-stream). What happens to a request is :class:`~quota_middleware.exchange.Exchange`'s:
this module only translates the environ and the iterable into its calls."""

from __future__ import annotations

import inspect
import io
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from quota_middleware.alerts import in_process_delivery
from quota_middleware.backends._factory import sync_backend
from quota_middleware.base._protocols import SyncBackend
from quota_middleware.base._request import RequestInfo
from quota_middleware.config import QuotaConfig, load_config
from quota_middleware.core._decision import Charge
from quota_middleware.core._engine import Engine, drive_sync
from quota_middleware.core._exchange import METER_KEY, Exchange
from quota_middleware.core._responses import RawHeaders, Response
from quota_middleware.identity._identifier import Identifier
from quota_middleware.reports import UsageReader

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger("quota_middleware")

ENVIRON_KEY = "quota_middleware.decision"
#: where the middleware leaves itself in the environ, for a mounted app to read usage
INSTANCE_KEY = "quota_middleware.instance"
#: seconds between background attempts to write buffered settles
DRAIN_INTERVAL = 1.0


class WSGIQuotaMiddleware:
    """Per-caller limits for any WSGI app::

        app.wsgi_app = WSGIQuotaMiddleware(app.wsgi_app, config="policy.toml")

    Takes the same arguments as :class:`~quota_middleware.QuotaMiddleware`, with a sync
    ``redis.Redis``/``RedisCluster`` client (and a plain function as ``on_settle``). The
    decision is in ``environ["quota_middleware.decision"]``.
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
        metrics: Any = None,
        on_settle: Callable[[Charge], object] | None = None,
    ) -> None:
        if on_settle is not None and inspect.iscoroutinefunction(on_settle):
            raise TypeError("WSGIQuotaMiddleware: on_settle must be a plain function")
        self.on_settle = on_settle
        self.app = app
        self.config = load_config(config)
        self.engine = Engine(self.config, identifier=identifier, clock=clock, metrics=metrics)
        self._observer = metrics.store if metrics is not None else None
        self.backend = backend or sync_backend(self.config.storage, redis, observer=self._observer)
        #: the in-process alert dispatcher (``config.alerts.deliver_in_process``), started by the
        #: first request; ``.stop()`` it on shutdown (it is also stopped at exit)
        self.alerts = in_process_delivery(self.config, redis, metrics)
        self._drainer: threading.Thread | None = None
        self._drain_lock = threading.Lock()

    def reader(self) -> UsageReader:
        """A :class:`~quota_middleware.reports.UsageReader` on this middleware's store."""
        return UsageReader(self.config, self.backend)

    @property
    def stats(self) -> dict[str, int]:
        return self.engine.stats.snapshot()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self.alerts is not None:
            self.alerts.ensure(self.backend)
        ex = Exchange(self.engine, RequestInfo.from_environ(environ))
        body = _read_body(environ, ex.max_body) if ex.max_body is not None else None
        refusal = drive_sync(ex.admit(body), self.backend)
        if ex.decision is not None:
            environ[ENVIRON_KEY] = ex.decision
            environ[INSTANCE_KEY] = self  # for the self-service usage app (its reader)
        if refusal is not None:
            return _respond(start_response, refusal)
        if ex.app_body is not None:  # the output cap was written in: the app gets that body
            environ["wsgi.input"] = io.BytesIO(ex.app_body)
            environ["CONTENT_LENGTH"] = str(len(ex.app_body))
        if not ex.tracks_response:
            if not ex.extra:
                return self.app(environ, start_response)
            extra = _text_headers(ex.extra)

            def add_headers(
                status: str, headers: list[tuple[str, str]], exc_info: Any = None
            ) -> Callable[[bytes], object]:
                return start_response(status, [*headers, *extra], exc_info)

            return self.app(environ, add_headers)
        if ex.meter is not None:
            environ[METER_KEY] = ex.meter_only
        metered = _Metered(self, ex, start_response)
        try:
            app_iter = self.app(environ, metered.start_response)
        except BaseException:
            metered.close()
            raise
        metered.app_iter = app_iter
        return metered

    def _settle(self, ex: Exchange) -> None:
        charge = drive_sync(ex.settle(), self.backend)
        if ex.buffered:
            self._start_drain()
        if charge is not None and self.on_settle is not None:
            try:
                self.on_settle(charge)
            except Exception:
                log.exception("quota_middleware: on_settle hook failed for %s", charge.request_id)

    def _start_drain(self) -> None:
        """Writes the settle buffer from a daemon thread while it holds settles (the store was
        down), every ``DRAIN_INTERVAL`` seconds, so they land without waiting for traffic."""
        with self._drain_lock:
            if self._drainer is not None:
                return  # running, and it only stops with the buffer empty
            self._drainer = threading.Thread(
                target=self._drain_loop, name="quota-settle-drain", daemon=True
            )
            self._drainer.start()

    def _drain_loop(self) -> None:
        buffer = self.engine.settle_buffer
        progress = False
        while True:
            if not progress:  # the store was away a moment ago: give it time
                time.sleep(DRAIN_INTERVAL)
            before = len(buffer)
            try:
                drive_sync(self.engine.drain(), self.backend)
            except Exception:  # never let the drainer die silently with settles left
                log.exception("quota_middleware: draining the settle buffer failed")
            progress = len(buffer) < before
            with self._drain_lock:
                # decided under the lock that _start_drain takes: a settle buffered while this
                # thread exits either sees it alive and is drained here, or starts a new one
                if not len(buffer):
                    self._drainer = None
                    return


class _Metered:
    """The app's body, through the exchange as it is iterated (metered, ended at the hard
    stop); ``close()`` closes the app's iterable and then settles, exactly once (a
    ``ClosingIterator`` that also counts)."""

    __slots__ = ("mw", "ex", "_start_response", "app_iter", "_closed", "_app_closed", "_settled")

    def __init__(self, mw: WSGIQuotaMiddleware, ex: Exchange, start_response: StartResponse):
        self.mw = mw
        self.ex = ex
        self._start_response = start_response
        self.app_iter: Iterable[bytes] = ()
        self._closed = False
        self._app_closed = False
        self._settled = False

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], object]:
        code = int(status.split(" ", 1)[0]) if status[:3].isdigit() else 500
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        extra = _text_headers(self.ex.response_start(code, raw))
        write = self._start_response(status, [*headers, *extra], exc_info)
        if self.ex.meter is None:
            return write
        ex = self.ex

        def metered_write(data: bytes) -> object:
            ex.response_chunk(data)
            return write(data)

        return metered_write

    def __iter__(self) -> Iterator[bytes]:
        ex = self.ex
        if ex.meter is None:
            yield from self.app_iter
        elif not ex.hard_stop:
            for chunk in self.app_iter:
                ex.response_chunk(chunk)
                yield chunk
        else:
            backend = self.mw.backend
            for chunk in self.app_iter:
                ex.response_chunk(chunk)
                yield chunk
                last = drive_sync(ex.stop(), backend) if chunk else None
                if last is not None:
                    self._close_app()  # the app stops generating, its upstream is closed
                    if last:
                        yield last
                    break
        # The whole body went to the server: settle now. Servers may skip close() (werkzeug's
        # dev server does when the client resets the connection after the last byte).
        self._settle_once()

    def _settle_once(self) -> None:
        if not self._settled:
            self._settled = True
            self.mw._settle(self.ex)

    def __del__(self) -> None:
        # Last resort for servers that drop the iterable without close() when the client
        # vanished mid-stream (werkzeug's dev server can): charge what was relayed, once.
        if not self._settled:
            try:
                self._settle_once()
            except Exception:  # never raise from a finalizer
                log.exception("quota_middleware: settle from finalizer failed")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._close_app()
        finally:
            self._settle_once()

    def _close_app(self) -> None:
        if self._app_closed:
            return  # the hard stop closed it already; close() may run once only
        self._app_closed = True
        close = getattr(self.app_iter, "close", None)
        if close is not None:
            close()


def _text_headers(raw: RawHeaders) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw]


def _read_body(environ: WSGIEnvironment, limit: int) -> bytes | None:
    """Buffer the request body (None when over ``limit``) and put it back for the app."""
    stream = environ.get("wsgi.input")
    length = environ.get("CONTENT_LENGTH") or ""
    if length.strip().isdigit():
        size = int(length)
        if size > limit:
            return None
        body = stream.read(size) if stream is not None and size else b""
    elif stream is not None and environ.get("wsgi.input_terminated"):
        body = stream.read(limit + 1)
        if len(body) > limit:
            return None
    else:
        body = b""
    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body))
    return body


def _respond(start_response: StartResponse, response: Response) -> list[bytes]:
    start_response(response.status_line, response.wsgi_headers())
    return [response.body]
