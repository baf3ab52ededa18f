"""PLACEHOLDER - being written by the identity helper."""
from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .request import RequestInfo
from .scripts import ScriptCall


@dataclass(frozen=True, slots=True)
class Caller:
    id: str
    plan: str | None = None
    tenant: str = "default"
    source: str = "ip"


@dataclass(frozen=True, slots=True, kw_only=True)
class IdentityConfig:
    order: tuple[str, ...] = ("ip",)
    trusted_proxies: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, base_dir: Path | None = None) -> IdentityConfig:
        return cls()


class Identifier:
    def __init__(self, config: IdentityConfig, *, prefix: str = "qm") -> None:
        self.config = config

    def identify(self, info: RequestInfo) -> Generator[ScriptCall, Any, Caller]:
        return Caller(id=info.client or "unknown")
        yield  # pragma: no cover
