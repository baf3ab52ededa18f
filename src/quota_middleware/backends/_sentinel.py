"""Redis Sentinel URLs: ``redis+sentinel://`` and ``rediss+sentinel://`` to redis-py clients.

redis-py finds the master through the sentinels (``redis.sentinel.Sentinel.master_for``) and
follows a failover itself: a connection is (re)connected to whatever address the sentinels name
as the master at that moment, and a connection to a master that was demoted is dropped at its
first ``READONLY`` reply. redis-py has no URL form for that topology; this module adds one::

    redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service_name[/db][?options]
    rediss+sentinel://...      TLS to the sentinels and to the data nodes

- the hosts are the sentinels (port 26379 when left out; IPv6 in brackets);
- the user info authenticates to the data nodes (the master), like in a ``redis://`` URL;
- ``sentinel_username`` / ``sentinel_password`` authenticate to the sentinels (their
  ``requirepass``), which is usually a different secret;
- ``socket_timeout``, ``socket_connect_timeout`` (seconds) override the store's timeout;
- ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs`` (``none``,
  ``optional``, ``required``), ``ssl_check_hostname`` (``true``/``false``): TLS options, shared
  by the sentinel and the data connections (one private CA for the whole topology), only with
  ``rediss+sentinel``;
- ``min_other_sentinels``: a sentinel that sees fewer peers is not believed.

Any other option is an error naming it, so a misspelt ``sentinel_pasword`` never silently
connects without authentication. Passwords never appear in errors or reprs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from quota_middleware.errors import ConfigurationError

__all__ = ["SentinelURL", "is_sentinel_url", "parse_sentinel_url", "sentinel_client"]

SCHEMES = ("redis+sentinel", "rediss+sentinel")
DEFAULT_PORT = 26379
_W = "storage.url"
_TLS_OPTIONS = (
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_cert_reqs",
    "ssl_check_hostname",
)
_OPTIONS = (
    "sentinel_username",
    "sentinel_password",
    "socket_timeout",
    "socket_connect_timeout",
    "min_other_sentinels",
) + _TLS_OPTIONS


def is_sentinel_url(url: str) -> bool:
    """True for a ``redis+sentinel://`` or ``rediss+sentinel://`` URL (the scheme only)."""
    return url.partition("://")[0].lower() in SCHEMES


@dataclass(frozen=True, slots=True, repr=False)
class SentinelURL:
    """A parsed sentinel URL. ``repr`` masks both passwords."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, compare=False)
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, compare=False)
    tls: bool = False
    #: the other options, already converted (timeouts as floats, TLS flags)
    options: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        hosts = ",".join(f"{_host(h)}:{p}" for h, p in self.sentinels)
        auth = " password='***'" if self.password is not None else ""
        s_auth = " sentinel_password='***'" if self.sentinel_password is not None else ""
        return (
            f"SentinelURL({'rediss' if self.tls else 'redis'}+sentinel {hosts}/{self.service}"
            f"/{self.db}{auth}{s_auth})"
        )


def _host(h: str) -> str:
    return f"[{h}]" if ":" in h else h


def parse_sentinel_url(url: str) -> SentinelURL:
    """Parse ``url`` (see the module doc); a bad URL is a :class:`ConfigurationError` naming
    what is wrong, without the URL's secrets."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        raise ConfigurationError(_W, "not a redis+sentinel:// or rediss+sentinel:// URL")
    netloc, _, tail = rest.partition("/")
    tail, _, query = tail.partition("?")
    tail = tail.partition("#")[0]
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
    sentinels = tuple(_sentinel_address(h, i) for i, h in enumerate(hostlist.split(",")))
    path = [unquote(p) for p in tail.split("/")] if tail else []
    if not path or not path[0]:
        raise ConfigurationError(_W, "the service name is missing: .../service_name[/db]")
    if len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ConfigurationError(_W, "the path must be /service_name or /service_name/db")
    db = int(path[1]) if len(path) == 2 else 0
    opts: dict[str, Any] = {}
    s_user = s_pw = None
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in _OPTIONS:
            raise ConfigurationError(
                _W, f"unknown sentinel URL option {key!r}; known: {', '.join(_OPTIONS)}"
            )
        if key == "sentinel_username":
            s_user = value or None
        elif key == "sentinel_password":
            s_pw = value
        elif key in ("socket_timeout", "socket_connect_timeout"):
            opts[key] = _seconds(key, value)
        elif key == "min_other_sentinels":
            if not value.isdigit():
                raise ConfigurationError(_W, "min_other_sentinels must be a whole number")
            opts[key] = int(value)
        else:
            if scheme != "rediss+sentinel":
                raise ConfigurationError(_W, f"{key} needs the rediss+sentinel:// scheme (TLS)")
            opts[key] = _tls_option(key, value)
    return SentinelURL(
        sentinels,
        path[0],
        db,
        username,
        password,
        s_user,
        s_pw,
        tls=scheme == "rediss+sentinel",
        options=opts,
    )


def _sentinel_address(text: str, i: int) -> tuple[str, int]:
    where = f"sentinel host #{i + 1}"
    if not text:
        raise ConfigurationError(_W, f"{where} is empty (hosts are separated by commas)")
    try:
        # urllib parses one host[:port] (brackets for IPv6) and checks the port's range
        parts = urlsplit(f"//{text}")
        host, port = parts.hostname, parts.port
    except ValueError:
        raise ConfigurationError(_W, f"{where} has a bad port or address") from None
    if not host:
        raise ConfigurationError(_W, f"{where} has no host name")
    return host, port if port is not None else DEFAULT_PORT


def _seconds(key: str, value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        v = -1.0
    if not 0 < v <= 300:
        raise ConfigurationError(_W, f"{key} must be a number of seconds in (0, 300]")
    return v


def _tls_option(key: str, value: str) -> Any:
    if key == "ssl_check_hostname":
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigurationError(_W, "ssl_check_hostname must be true or false")
        return value.lower() in ("true", "1", "yes")
    if key == "ssl_cert_reqs":
        if value.lower() not in ("none", "optional", "required"):
            raise ConfigurationError(_W, "ssl_cert_reqs must be none, optional or required")
        return value.lower()
    if not value:
        raise ConfigurationError(_W, f"{key} must name a file")
    return value


def sentinel_client(url: str, *, timeout: float, asyncio: bool, retry: Any) -> Any:
    """A redis-py client for the master of the service ``url`` names (``redis.Redis`` or
    ``redis.asyncio.Redis`` over a sentinel connection pool), with ``timeout`` on every socket
    unless the URL sets its own and ``retry`` (the caller's no-retry policy) on the data and the
    sentinel connections."""
    su = parse_sentinel_url(url)
    common: dict[str, Any] = {
        "socket_timeout": su.options.get("socket_timeout", timeout),
        "socket_connect_timeout": su.options.get("socket_connect_timeout", timeout),
        "retry": retry,
    }
    if su.tls:
        common["ssl"] = True
        common.update({k: v for k, v in su.options.items() if k in _TLS_OPTIONS})
    sentinel_kwargs = dict(common)
    if su.sentinel_password is not None:
        sentinel_kwargs["password"] = su.sentinel_password
    if su.sentinel_username is not None:
        sentinel_kwargs["username"] = su.sentinel_username
    data = dict(common, db=su.db, health_check_interval=30)
    if su.password is not None:
        data["password"] = su.password
    if su.username is not None:
        data["username"] = su.username
    cls: Any
    if asyncio:
        from redis.asyncio.sentinel import Sentinel as cls
    else:
        from redis.sentinel import Sentinel as cls
    manager = cls(
        list(su.sentinels),
        min_other_sentinels=su.options.get("min_other_sentinels", 0),
        sentinel_kwargs=sentinel_kwargs,
    )
    # SentinelConnectionPool pops "ssl" to pick its SSL connection class
    return manager.master_for(su.service, **data)


def sentinel_manager(client: Any) -> Any:
    """The ``Sentinel`` behind a client made by :func:`sentinel_client` (or by hand with
    ``master_for``), or None for any other client."""
    return getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
