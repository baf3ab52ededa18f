"""Shared by the commands: the registry's types, errors, store options, policy and store access,
and output (tables, JSON, CSV)."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from quota_middleware.config import QuotaConfig

Runner = Callable[[argparse.Namespace], int]
AddArguments = Callable[[argparse.ArgumentParser], None]


class CommandError(Exception):
    """A user-facing failure: printed as ``quota-middleware: <message>``, exit status 2."""


@contextmanager
def _environ(**values: str | None) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is not None:
                os.environ[k] = v
        yield
    finally:
        for k, old in saved.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old


def _columns(header: Sequence[str], body: Sequence[Sequence[str]], numeric: set[int]) -> str:
    lines = [tuple(header), *(tuple(line) for line in body)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for line in lines:
        cells = [c.rjust(w) if i in numeric else c.ljust(w)
                 for i, (c, w) in enumerate(zip(line, widths, strict=True))]  # fmt: skip
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def _usd(micros: int) -> str:
    return f"${micros / 1_000_000:.6f}"


def _limit_text(lim: Any) -> str:
    from quota_middleware.limits import Budget, Concurrency, RequestRate, TokenQuota, TokenRate

    if isinstance(lim, RequestRate):
        count, _ = lim.rate.split("/", 1) if "/" in lim.rate else (lim.rate, "")
        burst = f" burst {lim.burst}" if str(lim.burst) != count.strip() else ""
        return f"{lim.rate}{burst}"
    if isinstance(lim, TokenRate):
        return f"{lim.rate} tokens"
    if isinstance(lim, Concurrency):
        return f"{lim.max} in flight"
    if isinstance(lim, TokenQuota):
        return f"{lim.tokens:,} tokens/{lim.period}"
    if isinstance(lim, Budget):
        return f"${lim.usd:g}/{lim.period}"
    return str(getattr(lim, "name", lim))


# -- shared by the admin commands: policy, store, output -----------------------------------------
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """``90d``, ``24h``, ``30m``, ``3600s``, ``2w`` or plain seconds, as seconds."""
    m = _DURATION_RE.fullmatch(text.strip().lower())
    if m is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 90d, 24h, 30m, 45s)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _duration_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _store_options(p: argparse.ArgumentParser, *, top: bool = False) -> None:
    """``--policy``, ``--redis-url``, ``--prefix``: accepted before and after the command."""
    default = None if top else argparse.SUPPRESS
    g = p.add_argument_group("store options")
    g.add_argument(
        "--policy",
        metavar="PATH",
        default=default,
        help="policy TOML (storage, plans, app budgets, alerts); env QUOTA_POLICY",
    )
    g.add_argument(
        "--redis-url",
        metavar="URL",
        default=default,
        help="Redis to use, over the policy's storage.url; env QUOTA_REDIS_URL",
    )
    g.add_argument(
        "--prefix",
        metavar="PREFIX",
        default=default,
        help="storage key prefix (default: the policy's storage.prefix, or qm)",
    )


def _output_options(p: argparse.ArgumentParser, *, csv_too: bool = True) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true", help="print JSON")
    if csv_too:
        g.add_argument("--csv", action="store_true", help="print CSV")


def _policy_path(args: argparse.Namespace) -> str | None:
    return getattr(args, "policy", None) or os.environ.get("QUOTA_POLICY") or None


def read_policy(path: str) -> QuotaConfig:
    """``QuotaConfig.from_toml(path)``; a policy whose shape the loader trips over (a number
    where a list belongs, ...) is a :class:`ConfigurationError` too, never a traceback."""
    from quota_middleware.config import QuotaConfig
    from quota_middleware.errors import ConfigurationError

    try:
        return QuotaConfig.from_toml(path)
    except ConfigurationError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        raise ConfigurationError("policy", f"{path}: {type(e).__name__}: {e}") from None


def load_config(args: argparse.Namespace) -> QuotaConfig:
    """The policy from ``--policy`` / ``QUOTA_POLICY`` (or a one-plan default), with ``--redis-url``
    (which wins over ``QUOTA_REDIS_URL``, which wins over the file) and ``--prefix`` applied."""
    from quota_middleware.config import Plan, QuotaConfig

    path = _policy_path(args)
    with _environ(QUOTA_REDIS_URL=getattr(args, "redis_url", None)):
        if path is not None:
            config = read_policy(path)
        else:
            config = QuotaConfig(plans=[Plan(name="default")]).with_env()
        prefix = getattr(args, "prefix", None)
        if prefix is not None:
            storage = dataclasses.replace(config.storage, prefix=prefix)
            config = dataclasses.replace(config, storage=storage)
    return config


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    from quota_middleware.config import mask_url as config_mask_url

    return config_mask_url(url)


@contextmanager
def open_store(config: QuotaConfig) -> Iterator[Any]:
    """A ``SyncRedisBackend`` on the configured Redis, checked with a PING; closed afterwards."""
    from redis.exceptions import RedisClusterException, RedisError

    from quota_middleware.backends.redis import SyncRedisBackend, client_from_url

    url = config.storage.url
    shown = mask_url(url)
    if config.storage.is_memory:
        raise CommandError(
            "the store is memory:// (the embedded store lives inside the app process, this command "
            "cannot see it); pass --redis-url URL, set QUOTA_REDIS_URL, or set [storage] url in "
            "the policy (--policy)"
        )
    try:
        client = client_from_url(url, timeout=max(config.storage.timeout, 5.0), asyncio=False)
        client.ping()
    except (RedisError, RedisClusterException, OSError, ValueError) as e:
        raise CommandError(f"cannot reach Redis at {shown}: {type(e).__name__}: {e}") from None
    try:
        yield SyncRedisBackend(client)
    finally:
        client.close()


def _ts(t: float | datetime | None) -> str:
    """A time for tables: ``2026-11-28 04:46Z`` (UTC), or ``never``."""
    if t is None:
        return "never"
    when = t if isinstance(t, datetime) else datetime.fromtimestamp(t, UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%MZ")


def _iso(t: float | datetime | None) -> str | None:
    """A time for JSON and CSV: ISO 8601 in UTC, seconds precision, or None."""
    if t is None:
        return None
    when = t if isinstance(t, datetime) else datetime.fromtimestamp(t, UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _n(v: Any) -> str:
    return f"{v:,}" if isinstance(v, int) else str(v)


@dataclass(frozen=True)
class Col:
    """One output column: the record field, its table title, how a table shows it."""

    key: str
    title: str
    fmt: Callable[[Any], str] = str
    numeric: bool = False


def emit(
    args: argparse.Namespace,
    cols: Sequence[Col],
    records: Sequence[dict[str, Any]],
    *,
    empty: str = "(none)",
) -> None:
    """``records`` as JSON (every field), CSV (the columns' fields, raw) or an aligned table."""
    if getattr(args, "json", False):
        print(json.dumps(list(records), indent=2))
    elif getattr(args, "csv", False):
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow([c.key for c in cols])
        for r in records:
            w.writerow(["" if r.get(c.key) is None else r.get(c.key) for c in cols])
    elif not records:
        print(empty)
    else:
        body = [[c.fmt(r.get(c.key)) for c in cols] for r in records]
        numeric = {i for i, c in enumerate(cols) if c.numeric}
        print(_columns([c.title for c in cols], body, numeric))
