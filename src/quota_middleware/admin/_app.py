"""What both drivers share: the :class:`AdminContext` (the policy, the store and the writers
over it), the backend an app is built on, and :func:`handle`, which takes one
:class:`~quota_middleware.admin._http.Request` to its :class:`Response`: route, authenticate,
check CSRF, run the handler, and turn every failure into its status (never a traceback)."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from typing import Any

from quota_middleware.admin._audit import AuditLog
from quota_middleware.admin._auth import (
    Sessions,
    authenticate,
    check_csrf,
    check_settings,
    unauthorized,
)
from quota_middleware.admin._config import AdminConfig
from quota_middleware.admin._http import HTTPError, Request, Response, Router, json_response
from quota_middleware.admin._kv import KV
from quota_middleware.base._protocols import SyncBackend
from quota_middleware.config import QuotaConfig, load_config
from quota_middleware.controls import Controls
from quota_middleware.errors import BackendMismatch, ConfigurationError, StorageError
from quota_middleware.identity import KeyStore

__all__ = ["AdminContext", "build_router", "handle", "open_backend"]

log = logging.getLogger("quota_middleware.admin")


class AdminContext:
    """Everything a handler needs: ``config`` (the policy), ``settings`` (its ``[admin]``),
    ``backend`` (a sync backend), ``controls``, ``keys`` (the API key store), ``audit``,
    ``sessions`` and ``kv`` (the admin app's own keys)."""

    def __init__(self, config: QuotaConfig, backend: SyncBackend) -> None:
        settings = config.admin
        if not isinstance(settings, AdminConfig):
            raise ConfigurationError(
                "admin", "the policy has no [admin] table (QuotaConfig(admin=AdminConfig(...)))"
            )
        check_settings(config, settings)
        env = settings.session_secret_env
        if env is not None and not os.environ.get(env):
            raise ConfigurationError(
                "admin.session_secret_env", f"environment variable {env!r} is not set"
            )
        prefix = config.storage.prefix
        api = config.identity.api_keys
        self.config = config
        self.settings = settings
        self.backend = backend
        self.kv = KV(backend)
        self.controls = Controls(config, backend)
        self.keys = KeyStore(backend, prefix=prefix, key_prefix=api.prefix if api else "qm")
        self.audit = AuditLog(backend, prefix, settings.audit_max)
        self.sessions = Sessions(settings, self.kv, prefix)


def open_backend(
    config: QuotaConfig | str | os.PathLike[str], backend: Any = None, url: str | None = None
) -> tuple[QuotaConfig, SyncBackend, bool]:
    """(the policy, a sync backend, whether the app owns it and must close it): ``backend``
    (a sync backend, or a sync ``redis.Redis`` / ``RedisCluster`` client), else one for
    ``url``, else for the policy's ``[storage]``. A memory store is per process: give the
    middleware's own backend to see its data."""
    from quota_middleware.backends._factory import sync_backend

    cfg = load_config(config)
    if backend is not None and url is not None:
        raise ConfigurationError("admin", "give a backend or a url, not both")
    if backend is not None:
        if hasattr(backend, "run"):
            return cfg, backend, False
        if hasattr(backend, "run_async"):
            raise BackendMismatch("the admin app needs a sync backend, not an async one")
        return cfg, sync_backend(cfg.storage, backend), False
    storage = cfg.storage if url is None else dataclasses.replace(cfg.storage, url=url)
    return cfg, sync_backend(storage), True


def build_router() -> Router:
    """Every route of the admin app: the JSON API, login and logout, the dashboard."""
    from quota_middleware.admin import _api, _auth, _dashboard

    router = Router()
    router.add("POST", "/login", _auth.login, public=True)
    router.add("POST", "/logout", _auth.logout)
    _api.register(router)
    _dashboard.register(router)
    return router


def _store_error(e: Exception) -> bool:
    """The store failed: our ``StorageError``, or redis-py's own error from a reader that
    talks to the client directly (the outbox and audit streams' XREVRANGE), or the socket's."""
    if isinstance(e, StorageError | ConnectionError | TimeoutError):
        return True
    redis_exceptions = sys.modules.get("redis.exceptions")  # loaded if a redis client exists
    return redis_exceptions is not None and isinstance(e, redis_exceptions.RedisError)


def _describe(e: Exception) -> str:
    # the exception's class, not its text: a redis error can quote the command's arguments
    return str(e) if isinstance(e, StorageError) else type(e).__name__


def handle(ctx: AdminContext, router: Router, req: Request) -> Response:
    """The response to ``req``: 404/405 for no route, 401 for no or wrong credentials (or the
    route's own answer, e.g. a redirect to the login page), 403 ``csrf``, 503 when the store
    cannot be reached, 500 (logged, no details sent) for a bug."""
    try:
        route, params = router.match(req.method, req.segments)
        req.params = params
        if not route.public:
            req.admin = authenticate(req, ctx)
            if req.admin is None:
                if route.unauthorized is not None:
                    return route.unauthorized(req, ctx)
                raise unauthorized("wrong or missing admin credentials")
            if not check_csrf(req):
                raise HTTPError(403, "csrf", "missing or wrong CSRF token, or another site")
        response = route.handler(req, ctx)
    except HTTPError as e:
        response = e.response()
    except Exception as e:
        if not _store_error(e):
            log.exception("quota_middleware: admin %s %s failed", req.method, req.path)
            response = json_response({"error": "internal"}, 500)
        else:
            log.warning("quota_middleware: admin %s %s: store unavailable: %s",
                        req.method, req.path, _describe(e))  # fmt: skip
            response = json_response(
                {"error": "store_unavailable", "message": "the store cannot be reached"}, 503,
                headers=[("retry-after", "1")],
            )  # fmt: skip
    if req.method == "HEAD":
        response.body = b""
    return response
