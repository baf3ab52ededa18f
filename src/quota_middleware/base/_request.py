"""The one place that reads both ASGI scopes and WSGI environs into a plain value."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any


class Headers(Mapping[str, str]):
    """Case-insensitive, read-only view of request headers.

    Keys are lower-case; repeated headers are joined with ``", "`` on ``[]`` as HTTP allows for
    list-valued fields; :meth:`getlist` returns each occurrence.
    """

    __slots__ = ("_items", "_raw", "_environ")

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: list[tuple[str, str]] | None = [(k.lower(), v) for k, v in items]
        self._raw: Iterable[tuple[bytes, bytes]] = ()
        self._environ: Mapping[str, Any] | None = None

    @classmethod
    def from_raw(cls, raw: Iterable[tuple[bytes, bytes]]) -> Headers:
        # Decoded on first use: most requests (anonymous callers by IP) never read a header.
        h = cls.__new__(cls)
        h._items = None
        h._raw = raw
        h._environ = None
        return h

    @classmethod
    def from_environ(cls, environ: Mapping[str, Any]) -> Headers:
        h = cls.__new__(cls)
        h._items = None
        h._raw = ()
        h._environ = environ
        return h

    @property
    def items_(self) -> list[tuple[str, str]]:
        if self._items is None:
            environ = self._environ
            if environ is not None:
                items: list[tuple[str, str]] = []
                for key, value in environ.items():
                    if key.startswith("HTTP_"):
                        items.append((key[5:].replace("_", "-").lower(), value))
                    elif key in ("CONTENT_TYPE", "CONTENT_LENGTH") and value:
                        items.append((key.replace("_", "-").lower(), value))
                self._items = items
            else:
                # latin-1 is what ASGI servers hand over; it round-trips every byte.
                self._items = [
                    (bytes(k).decode("latin-1").lower(), bytes(v).decode("latin-1"))
                    for k, v in self._raw
                ]
        return self._items

    def getlist(self, key: str) -> list[str]:
        key = key.lower()
        return [v for k, v in self.items_ if k == key]

    def __getitem__(self, key: str) -> str:
        values = self.getlist(key)
        if not values:
            raise KeyError(key)
        return ", ".join(values)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and any(k == key.lower() for k, _ in self.items_)

    def __iter__(self) -> Iterator[str]:
        seen: dict[str, None] = {}
        for k, _ in self.items_:
            seen.setdefault(k)
        return iter(seen)

    def __len__(self) -> int:
        return len({k for k, _ in self.items_})

    def __repr__(self) -> str:
        # Never print credentials.
        masked = [(k, "***" if k in _SECRET_HEADERS else v) for k, v in self.items_]
        return f"Headers({masked!r})"


_SECRET_HEADERS = frozenset({"authorization", "x-api-key", "cookie", "proxy-authorization"})


@dataclass(slots=True)
class RequestInfo:
    """What the core needs to know about a request, independent of the protocol."""

    method: str
    path: str
    headers: Headers
    client: str | None = None
    query: str = ""
    body: bytes | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_scope(cls, scope: Mapping[str, Any]) -> RequestInfo:
        client = scope.get("client")
        # root_path is part of the URL the client used but not of scope["path"] semantics here:
        # route rules are written against the app's own paths.
        return cls(
            method=scope.get("method", "GET"),
            path=scope.get("path", "/"),
            headers=Headers.from_raw(scope.get("headers") or ()),
            client=client[0] if client else None,
            query=(scope.get("query_string") or b"").decode("latin-1"),
        )

    @classmethod
    def from_environ(cls, environ: Mapping[str, Any]) -> RequestInfo:
        path = environ.get("PATH_INFO", "") or "/"
        # PEP 3333: PATH_INFO is latin-1 decoded bytes; re-decode as UTF-8 like ASGI servers do.
        try:
            path = path.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            pass
        return cls(
            method=environ.get("REQUEST_METHOD", "GET"),
            path=path,
            # decoded on first use, like the ASGI headers
            headers=Headers.from_environ(environ),
            client=environ.get("REMOTE_ADDR") or None,
            query=environ.get("QUERY_STRING", ""),
        )
