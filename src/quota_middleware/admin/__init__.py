"""The admin console: a JSON API and an HTML dashboard over the store, mountable in any ASGI
(:class:`AdminApp`) or WSGI (:class:`WSGIAdminApp`) app, for the people who run the service.

What it shows: usage per caller, day and model and per tenant, top callers by cost, tokens or
requests for a day, week or month (from the app-wide rollups, :mod:`quota_middleware.fleet`),
what each caller has left, blocks and limit overrides, API keys, the shared budgets and their
kill switch, the alert outbox (recent events, dead letters) and spikes, and its own audit
trail. What it changes (blocks, overrides, keys, budget limits) is checked, made through the
library's own writers, and audited in the store and the log.

Who may use it: the policy's ``[admin]`` table (:class:`AdminConfig`): admin tokens by their
SHA-256 digest, or JWTs with an admin claim; a browser signs in once for a session cookie.
Wrong or missing credentials are a 401 with no data; every state change through a session is
CSRF-checked.

Modules (private): ``_config`` (the ``[admin]`` table, below the policy), ``_http`` (the
sans-IO request, response and router), ``_auth`` (credentials, sessions, CSRF), ``_kv`` (the
admin app's own keys), ``_audit`` (the audit stream), ``_ops`` (the audited operations),
``_api`` (the JSON routes), ``_dashboard`` with ``_html`` and ``_svg`` (the pages), ``_app``
(the context and the request pipeline both drivers share), ``_asgi`` and ``_wsgi`` (the
drivers).
"""

from __future__ import annotations

from quota_middleware.admin._app import AdminContext
from quota_middleware.admin._asgi import AdminApp
from quota_middleware.admin._audit import AuditEntry
from quota_middleware.admin._auth import Admin
from quota_middleware.admin._config import AdminConfig
from quota_middleware.admin._http import Request, Response, Router
from quota_middleware.admin._wsgi import WSGIAdminApp

__all__ = [
    "Admin",
    "AdminApp",
    "AdminConfig",
    "AdminContext",
    "AuditEntry",
    "Request",
    "Response",
    "Router",
    "WSGIAdminApp",
]
