"""The proxy's policy as plain values: which upstreams, their keys, their known API surface.

Nothing here does I/O at import or construction time except :meth:`UpstreamKey.resolve`, which
reads the key's environment variable or secret file when the proxy is built. Keys are held in
:class:`Secret` values whose ``repr`` and ``str`` never show them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from quota_middleware.errors import ConfigurationError, check_keys

__all__ = [
    "DEFAULT_BASE_URLS",
    "SURFACES",
    "Endpoint",
    "Provider",
    "ProxyConfig",
    "Secret",
    "Upstream",
    "UpstreamKey",
]

Provider = Literal["openai", "openai-compatible", "azure", "anthropic", "gemini", "ollama"]
_PROVIDERS: tuple[str, ...] = (
    "openai", "openai-compatible", "azure", "anthropic", "gemini", "ollama",
)  # fmt: skip

#: the base URL each SDK uses by default; azure and openai-compatible have none
DEFAULT_BASE_URLS: Mapping[str, str] = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
    "gemini": "https://generativelanguage.googleapis.com",
    "ollama": "http://127.0.0.1:11434",
}


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One operation of an upstream's API: ``method`` and a glob ``pattern`` relative to the
    base URL (as the SDK appends it), the AI format metered on it (None: not an AI call, e.g.
    the model list), and whether a request flag must be set for the usage to appear."""

    method: str
    pattern: str
    format: str | None = None
    #: OpenAI-format streams report usage only with ``stream_options.include_usage``
    stream_usage_flag: bool = False

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and _glob(self.pattern).fullmatch(path) is not None


def _glob(pattern: str) -> re.Pattern[str]:
    # ``*`` is one path segment (or part of one, as in Gemini's ``models/*:generateContent``):
    # an allow-list entry never lets a request reach a deeper path than it names
    return re.compile("".join("[^/]+" if c == "*" else re.escape(c) for c in pattern))


_OPENAI = (
    Endpoint("POST", "chat/completions", "openai-chat", stream_usage_flag=True),
    Endpoint("POST", "completions", "openai-completions", stream_usage_flag=True),
    Endpoint("POST", "responses", "openai-responses"),
    Endpoint("POST", "embeddings", "openai-embeddings"),
    Endpoint("GET", "models"),
    Endpoint("GET", "models/*"),
)
#: OpenAI Realtime: a WebSocket (method WEBSOCKET, as the middleware names connections)
_REALTIME = Endpoint("WEBSOCKET", "realtime", "openai-realtime")
#: each provider's known API surface; a request outside it is a 404 (``Upstream.allow`` adds
#: more, ``Upstream.surface`` replaces it)
SURFACES: Mapping[str, tuple[Endpoint, ...]] = {
    "openai": (*_OPENAI, _REALTIME),
    "openai-compatible": _OPENAI,
    "azure": (
        # classic deployment paths (…/openai/deployments/<name>/…?api-version=…) and the v1 API
        Endpoint("POST", "deployments/*/chat/completions", "openai-chat", stream_usage_flag=True),
        Endpoint("POST", "deployments/*/completions", "openai-completions", stream_usage_flag=True),
        Endpoint("POST", "deployments/*/embeddings", "openai-embeddings"),
        Endpoint("POST", "v1/chat/completions", "openai-chat", stream_usage_flag=True),
        Endpoint("POST", "v1/responses", "openai-responses"),
        Endpoint("POST", "v1/embeddings", "openai-embeddings"),
        Endpoint("GET", "models"),
        Endpoint("GET", "v1/models"),
        _REALTIME,  # …/openai/realtime?api-version=…&deployment=…
    ),
    "anthropic": (
        Endpoint("POST", "v1/messages", "anthropic-messages"),
        Endpoint("POST", "v1/messages/count_tokens"),
        Endpoint("GET", "v1/models"),
        Endpoint("GET", "v1/models/*"),
    ),
    "gemini": tuple(
        e
        for version in ("v1beta", "v1")
        for e in (
            Endpoint("POST", f"{version}/models/*:generateContent", "gemini"),
            Endpoint("POST", f"{version}/models/*:streamGenerateContent", "gemini"),
            Endpoint("POST", f"{version}/models/*:embedContent", "gemini"),
            Endpoint("POST", f"{version}/models/*:batchEmbedContents", "gemini"),
            Endpoint("POST", f"{version}/models/*:countTokens"),
            Endpoint("GET", f"{version}/models"),
            Endpoint("GET", f"{version}/models/*"),
        )
    ),
    "ollama": (
        Endpoint("POST", "api/chat", "ollama"),
        Endpoint("POST", "api/generate", "ollama"),
        Endpoint("POST", "api/embed", "ollama"),
        Endpoint("POST", "api/embeddings", "ollama"),
        Endpoint("POST", "api/show"),
        Endpoint("GET", "api/tags"),
        Endpoint("GET", "api/version"),
    ),
}
_FORMATS = (
    "openai-chat", "openai-completions", "openai-responses", "openai-embeddings",
    "anthropic-messages", "gemini", "ollama",
)  # fmt: skip
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class Secret:
    """A provider key in memory: never shown by ``repr``/``str``, only a short fingerprint."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class UpstreamKey:
    """One server-side key of an upstream: read from the environment variable ``env`` or the
    secret file ``file`` (first line; Docker and Kubernetes secrets). ``id`` is stable across
    rotations: it names the key in logs and in the providers' usage reports, never its value."""

    id: str
    env: str | None = None
    file: str | None = None

    def __post_init__(self) -> None:
        where = f"proxy.upstreams.keys[{self.id}]"
        if not isinstance(self.id, str) or not _NAME_RE.fullmatch(self.id):
            raise ConfigurationError(f"{where}.id", "1-64 of [A-Za-z0-9_.-]")
        if (self.env is None) == (self.file is None):
            raise ConfigurationError(where, "set exactly one of env or file")
        if self.env is not None and not _ENV_RE.fullmatch(self.env):
            raise ConfigurationError(f"{where}.env", "must be an environment variable name")

    def resolve(self) -> Secret:
        """The key's value; a clear error naming the variable or file (never a value)."""
        where = f"proxy.upstreams.keys[{self.id}]"
        if self.env is not None:
            value = os.environ.get(self.env, "").strip()
            if not value:
                raise ConfigurationError(where, f"environment variable {self.env} is not set")
        else:
            assert self.file is not None
            try:
                value = Path(self.file).read_text("utf-8").strip().splitlines()[0].strip()
            except (OSError, UnicodeDecodeError, IndexError):
                raise ConfigurationError(where, f"cannot read a key from {self.file}") from None
        if not value.isprintable() or len(value) > 4096:
            raise ConfigurationError(where, "the key is not a printable single-line value")
        return Secret(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class Upstream:
    """An AI provider the proxy forwards to.

    :param name: the upstream's path segment under the mount (``/ai/<name>/...``), unless
        ``prefix`` says otherwise. Upstreams may share a prefix (even ``""``): a request goes
        to the first one, in order, whose surface has its method and path.
    :param provider: the API shape: ``openai``, ``openai-compatible`` (vLLM, Ollama ``/v1``,
        OpenRouter, Groq, Together, ...), ``azure``, ``anthropic``, ``gemini``, ``ollama``.
    :param base_url: the base URL as the provider's SDK takes it (default: the SDK's own, for
        openai, anthropic, gemini and ollama). Request paths are joined onto it, never replace it.
    :param keys: server-side keys, used in turn. None for an upstream without auth (Ollama).
    :param allow: extra ``"METHOD path-glob"`` entries (``*`` is one segment) to forward beyond
        the provider's known surface; ``surface`` replaces that surface.
    :param headers: fixed headers sent upstream (``OpenAI-Organization``, ...).
    :param inject_usage: ask OpenAI-format streams for their usage (``include_usage``) and strip
        that extra chunk from what the client receives, so the charge is exact.
    """

    name: str
    provider: Provider
    base_url: str | None = None
    prefix: str | None = None
    keys: Sequence[UpstreamKey] = ()
    allow: Sequence[str] = ()
    surface: Sequence[str] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    inject_usage: bool = True
    #: ``api-version`` added for Azure's deployment paths when the client sends none
    api_version: str | None = None

    def __post_init__(self) -> None:
        where = f"proxy.upstreams[{self.name}]"
        if not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            raise ConfigurationError(f"{where}.name", "1-64 of [A-Za-z0-9_.-]")
        if self.provider not in _PROVIDERS:
            raise ConfigurationError(f"{where}.provider", f"one of {', '.join(_PROVIDERS)}")
        base = self.base_url or DEFAULT_BASE_URLS.get(self.provider)
        if base is None:
            raise ConfigurationError(f"{where}.base_url", f"required for {self.provider}")
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigurationError(f"{where}.base_url", "must be an http(s) URL with a host")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ConfigurationError(
                f"{where}.base_url", "no query, fragment or credentials (use keys)"
            )
        object.__setattr__(self, "base_url", base.rstrip("/"))
        prefix = ("/" + self.name) if self.prefix is None else self.prefix.rstrip("/")
        if prefix and not re.fullmatch(r"(/[A-Za-z0-9_.-]+)+", prefix):
            raise ConfigurationError(f"{where}.prefix", "'' or /segment[/segment...]")
        object.__setattr__(self, "prefix", prefix)
        keys = tuple(k if isinstance(k, UpstreamKey) else UpstreamKey(**k) for k in self.keys)
        if len({k.id for k in keys}) != len(keys):
            raise ConfigurationError(f"{where}.keys", "key ids must be unique")
        object.__setattr__(self, "keys", keys)
        for entry in (*self.allow, *(self.surface or ())):
            method, _, pattern = entry.partition(" ")
            methods = ("GET", "POST", "PUT", "PATCH", "DELETE", "WEBSOCKET")
            if method.upper() not in methods or not pattern:
                raise ConfigurationError(f"{where}.allow", f"{entry!r}: want 'METHOD path-glob'")
        for k, v in self.headers.items():
            if not (isinstance(k, str) and isinstance(v, str)) or "\n" in k + v or "\r" in k + v:
                raise ConfigurationError(f"{where}.headers", "string names and values, one line")

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The operations forwarded: the provider's surface (or ``surface``) plus ``allow``."""
        base = SURFACES[self.provider] if self.surface is None else _entries(self.surface, ())
        return (*base, *_entries(self.allow, base))


def _entries(entries: Sequence[str], known: Sequence[Endpoint]) -> tuple[Endpoint, ...]:
    out = []
    for entry in entries:
        method, _, pattern = entry.partition(" ")
        pattern = pattern.strip().lstrip("/")
        # an allowed path that is also a known AI operation keeps that operation's format
        fmt = next((e for e in known if e.pattern == pattern), None)
        out.append(Endpoint(method.upper(), pattern, fmt.format if fmt else None))
    return tuple(out)


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyConfig:
    """The backend proxy: the upstreams it forwards to, and where it is mounted.

    :param mount: the path the proxy app is mounted at (``app.mount("/ai", AIProxy(config))``);
        its AI routes are derived from it, so they are not declared twice. ``""`` for the
        standalone gateway, where the proxy is the whole app.
    :param connect_timeout: seconds to connect to an upstream (then 504).
    :param read_timeout: seconds to wait for the first byte and between chunks (then 504
        before the response starts; a cut stream, charged by estimate, after).
    :param http2: talk HTTP/2 to upstreams (needs the ``h2`` package).
    """

    upstreams: Sequence[Upstream]
    mount: str = "/ai"
    connect_timeout: float = 5.0
    read_timeout: float = 300.0
    write_timeout: float = 30.0
    http2: bool = False
    #: most idle pooled connections per upstream host
    max_connections: int = 100
    #: request bodies over this many bytes are refused (413); an AI route's own ``max_body``
    #: (smaller by default) applies first when the middleware is in front
    max_body: int = 32 << 20

    def __post_init__(self) -> None:
        ups = tuple(u if isinstance(u, Upstream) else Upstream(**u) for u in self.upstreams)
        if not ups:
            raise ConfigurationError("proxy.upstreams", "at least one upstream is required")
        if len({u.name for u in ups}) != len(ups):
            raise ConfigurationError("proxy.upstreams", "upstream names must be unique")
        object.__setattr__(self, "upstreams", ups)
        mount = self.mount.rstrip("/")
        if mount and not re.fullmatch(r"(/[A-Za-z0-9_.-]+)+", mount):
            raise ConfigurationError("proxy.mount", "'' or /segment[/segment...]")
        object.__setattr__(self, "mount", mount)
        for name in ("connect_timeout", "read_timeout", "write_timeout"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 < value <= 3600:
                raise ConfigurationError(f"proxy.{name}", "seconds in (0, 3600]")

    def ai_endpoints(self) -> list[tuple[str, str, str]]:
        """``(method, full path glob, format)`` of every metered operation, for the policy's
        derived AI routes (``*`` in the glob is as in :attr:`AIRoute.path`)."""
        out = []
        seen = set()
        for u in self.upstreams:
            for e in u.endpoints:
                path = f"{self.mount}{u.prefix}/{e.pattern}"
                if e.format is not None and (e.method, path) not in seen:
                    seen.add((e.method, path))
                    out.append((e.method, path, e.format))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProxyConfig:
        check_keys(data, set(cls.__dataclass_fields__), "proxy")
        ups = data.get("upstreams")
        if not isinstance(ups, Sequence) or isinstance(ups, str):
            raise ConfigurationError("proxy.upstreams", "a [[proxy.upstreams]] table is required")
        upstreams = []
        for i, u in enumerate(ups):
            if not isinstance(u, Mapping):
                raise ConfigurationError(f"proxy.upstreams[{i}]", "must be a table")
            check_keys(u, set(Upstream.__dataclass_fields__), f"proxy.upstreams[{i}]")
            keys = u.get("keys", ())
            if not isinstance(keys, Sequence) or not all(isinstance(k, Mapping) for k in keys):
                raise ConfigurationError(f"proxy.upstreams[{i}].keys", "[[...keys]] tables")
            for k in keys:
                check_keys(k, set(UpstreamKey.__dataclass_fields__), f"proxy.upstreams[{i}].keys")
            upstreams.append(Upstream(**{**u, "keys": [UpstreamKey(**k) for k in keys]}))
        return cls(**{**data, "upstreams": upstreams})
