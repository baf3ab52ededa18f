"""The ``quota-middleware`` command.

Subcommands register themselves in :data:`COMMANDS` (name -> (help, add_arguments, run)); each
``run`` takes the parsed arguments and returns the exit status.

``quota-middleware demo`` runs the FastAPI example in-process (no network, no Redis needed) and
drives it with a few callers, then prints what each was charged (tokens, cost, how many requests
were charged from estimates) and what is left of its token quota and budget; it needs a source
checkout (``examples/``) and the ``examples`` extra (``pip install -e '.[examples]'``).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import importlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import QuotaConfig

Runner = Callable[[argparse.Namespace], int]
AddArguments = Callable[[argparse.ArgumentParser], None]


class CommandError(Exception):
    """A user-facing failure: printed as ``quota-middleware: <message>``, exit status 2."""


# -- demo ----------------------------------------------------------------------------------------
DEMO_BASE_URL = "http://demo.local"


@dataclass
class Row:
    """One caller's line of the demo table."""

    caller: str
    plan: str = "-"
    sent: int = 0
    admitted: int = 0
    limited: int = 0
    unauthorized: int = 0
    why: list[str] = field(default_factory=list)
    ratelimit: str = "-"
    #: the caller id the middleware identified (from ``GET /v1/me``), None if never admitted
    caller_id: str | None = None
    #: today's usage records (UsageRecord fields + cost_usd) and what is left of each quota
    usage: list[dict[str, Any]] = field(default_factory=list)
    remaining: list[dict[str, Any]] = field(default_factory=list)

    def record(self, status: int, headers: Any, body: bytes) -> None:
        self.sent += 1
        self.ratelimit = headers.get("ratelimit", "-")
        if status == 401:
            self.unauthorized += 1
            self._why("bad token")
        elif status == 429:
            self.limited += 1
            error = _json_or_empty(body).get("error", {})
            if error.get("code") == "insufficient_quota":
                kind = "quota"
            elif "concurrent" in str(error.get("message", "")):
                kind = "concurrency"
            else:
                kind = "rate"
            self._why(f"{kind} {error.get('limit', '?')}")
        elif 200 <= status < 300:
            self.admitted += 1
            me = _json_or_empty(body)
            if isinstance(me.get("plan"), str):
                self.plan = me["plan"]
            if isinstance(me.get("caller"), str):
                self.caller_id = me["caller"]

    def _why(self, reason: str) -> None:
        if reason not in self.why:
            self.why.append(reason)

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "why": ", ".join(self.why) or "-"}


def _json_or_empty(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def find_examples() -> Path:
    """The ``examples/`` directory of a source checkout (this file's repo, then the cwd)."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "examples", Path.cwd() / "examples"):
        if (candidate / "fastapi_app" / "app.py").is_file():
            return candidate
    raise CommandError(
        "the demo needs the examples/ directory of a source checkout; run it from the "
        "repository root after `pip install -e '.[examples]'`"
    )


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


def _load_demo_modules() -> tuple[Any, Any]:
    examples = str(find_examples())
    if examples not in sys.path:
        sys.path.insert(0, examples)
    try:
        app_module = importlib.import_module("fastapi_app.app")
        common = importlib.import_module("demo_common")
    except ImportError as e:
        raise CommandError(
            f"the demo needs the examples extra ({e.name or e} is missing): "
            "pip install -e '.[examples]'"
        ) from None
    return app_module, common


async def _drive(app: Any, app_module: Any, common: Any, n: int) -> list[Row]:
    import httpx

    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}]}
    stream = {**chat, "stream": True, "stream_options": {"include_usage": True}}
    # Without include_usage the stream carries no usage: the middleware counts it with tiktoken.
    stream_no_usage = {**chat, "stream": True}
    messages = {"model": "claude-haiku-4-5", "max_tokens": 20, "system": "Be brief.",
                "messages": [{"role": "user", "content": "Say hello"}]}  # fmt: skip
    async with httpx.AsyncClient(transport=transport, base_url=DEMO_BASE_URL) as client:

        async def send(row: Row, method: str, path: str, headers: dict[str, str],
                       body: Any = None) -> httpx.Response:  # fmt: skip
            r = await client.request(method, path, headers=headers, json=body)
            row.record(r.status_code, r.headers, r.content)
            if r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"):
                events = r.text.count("data: ")
                row._why(f"streamed {events} events")
            return r

        jwt_h = {"authorization": f"Bearer {common.make_token('alice', 'pro')}"}
        bad_h = {"authorization": f"Bearer {common.make_token('mallory', 'pro', secret='x' * 32)}"}
        key_h = {"x-api-key": common.DEMO_KEYS["svc-reports"]}
        batch_h = {"x-api-key": common.DEMO_KEYS["svc-batch"]}
        rows = {name: Row(name) for name in ("alice", "svc-reports", "svc-batch", "anonymous")}
        rows["mallory"] = Row("mallory")
        rows["mallory"].plan = "-"
        for _ in range(n):
            await send(rows["alice"], "GET", "/v1/me", jwt_h)
        await send(rows["alice"], "POST", "/v1/chat/completions", jwt_h, stream)
        await send(rows["alice"], "POST", "/v1/chat/completions", jwt_h, stream_no_usage)
        await send(rows["alice"], "POST", "/v1/messages", jwt_h, messages)
        for _ in range(n):
            await send(rows["svc-reports"], "GET", "/v1/me", key_h)
        # Three streams at once against a plan that allows two in flight.
        await send(rows["svc-batch"], "GET", "/v1/me", batch_h)
        await asyncio.gather(
            *(send(rows["svc-batch"], "POST", "/v1/chat/completions", batch_h, stream)
              for _ in range(3))
        )  # fmt: skip
        for _ in range(n):
            await send(rows["anonymous"], "GET", "/v1/me", {})
        for _ in range(max(1, n // 3)):
            await send(rows["mallory"], "GET", "/v1/me", bad_h)
        # What each caller was charged, read back from the middleware's own store.
        reader = app_module.quota_middleware(app).reader()
        for row in rows.values():
            if row.caller_id is None:
                continue
            plan = row.plan if row.plan != "-" else None
            for rec in await reader.ausage(row.caller_id, days=1, plan=plan):
                row.usage.append({**dataclasses.asdict(rec), "cost_usd": rec.cost_usd})
            for left in await reader.aremaining(row.caller_id, plan=plan):
                row.remaining.append(
                    {"name": left.name, "kind": left.kind, "period": left.period,
                     "unit": left.unit, "limit": left.limit, "used": left.used,
                     "remaining": left.remaining, "resets_at": left.resets_at.isoformat()}
                )  # fmt: skip
        return list(rows.values())


def _columns(header: Sequence[str], body: Sequence[Sequence[str]], numeric: set[int]) -> str:
    lines = [tuple(header), *(tuple(line) for line in body)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for line in lines:
        cells = [c.rjust(w) if i in numeric else c.ljust(w)
                 for i, (c, w) in enumerate(zip(line, widths, strict=True))]  # fmt: skip
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def format_table(rows: Sequence[Row]) -> str:
    header = ("caller", "plan", "sent", "admitted", "429", "401", "why", "last RateLimit")
    body = [
        (r.caller, r.plan, str(r.sent), str(r.admitted), str(r.limited), str(r.unauthorized),
         ", ".join(r.why) or "-", r.ratelimit)
        for r in rows
    ]  # fmt: skip
    return _columns(header, body, {2, 3, 4, 5})


def _usd(micros: int) -> str:
    return f"${micros / 1_000_000:.6f}"


def format_usage(rows: Sequence[Row]) -> str:
    """Today's usage per caller and model, as the middleware charged it."""
    header = ("caller", "model", "requests", "input tok", "output tok", "cost USD", "estimated")
    body: list[tuple[str, ...]] = []
    for r in rows:
        if r.caller_id is None:
            continue
        if not r.usage:
            body.append((r.caller, "-", "0", "0", "0", _usd(0), "0"))
        for u in r.usage:
            body.append(
                (r.caller, u["model"], str(u["requests"]), f"{u['input_tokens']:,}",
                 f"{u['output_tokens']:,}", _usd(u["cost_micros"]), str(u["estimated"]))
            )  # fmt: skip
    return _columns(header, body, {2, 3, 4, 5, 6})


def format_remaining(rows: Sequence[Row]) -> str:
    """What is left of each caller's token quota and budget this period."""
    header = ("caller", "plan", "limit", "period", "used", "left", "of", "resets (UTC)")
    body: list[tuple[str, ...]] = []
    for r in rows:
        for q in r.remaining:
            money = q["kind"] == "budget"
            fmt = _usd if money else (lambda v: f"{v:,}")  # noqa: E731
            body.append(
                (r.caller, r.plan, q["name"], q["period"], fmt(q["used"]), fmt(q["remaining"]),
                 fmt(q["limit"]), q["resets_at"][:16].replace("T", " "))
            )  # fmt: skip
    return _columns(header, body, {4, 5, 6})


def _limit_text(lim: Any) -> str:
    from .limits import Budget, Concurrency, RequestRate, TokenQuota, TokenRate

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


def format_plans(config: Any) -> str:
    return "\n".join(
        f"  {p.name}: " + ", ".join(_limit_text(lim) for lim in p.limits) for p in config.plans
    )


def run_demo(args: argparse.Namespace) -> int:
    if args.requests < 1 or args.requests > 1000:
        raise CommandError("--requests must be between 1 and 1000")
    redis_url = args.redis_url or "memory://"
    with _environ(QUOTA_REDIS_URL=redis_url):
        app_module, common = _load_demo_modules()
        config = app_module.load_policy()
        if not redis_url.startswith("memory://"):
            # A fresh key prefix, so a shared Redis starts this run from full buckets.
            storage = dataclasses.replace(config.storage, prefix=f"qm-demo-{os.urandom(4).hex()}")
            config = dataclasses.replace(config, storage=storage)
        app = app_module.create_app(config)
        rows = asyncio.run(_drive(app, app_module, common, args.requests))
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
        return 0
    where = "embedded memory backend" if redis_url.startswith("memory://") else "Redis"
    print(f"quota-middleware demo: FastAPI example in-process, {where}, fake upstream\n")
    print(format_table(rows))
    print("\nusage today, as charged (estimated = streams without usage, counted with tiktoken)\n")
    print(format_usage(rows))
    print("\ntoken quotas and budgets: what is left this period\n")
    print(format_remaining(rows))
    print(f"\nplans:\n{format_plans(config)}")
    print(
        "\nRun it yourself: uvicorn --app-dir examples fastapi_app.app:app  "
        "(GET /v1/usage shows a caller its own usage)"
    )
    return 0


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=6, metavar="N",
                   help="requests per caller in the burst (default 6)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    # default SUPPRESS: a --redis-url given before the command (the global option) still counts
    p.add_argument("--redis-url", metavar="URL", default=argparse.SUPPRESS,
                   help="use this Redis instead of the embedded memory backend")  # fmt: skip


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
    from .config import QuotaConfig
    from .errors import ConfigurationError

    try:
        return QuotaConfig.from_toml(path)
    except ConfigurationError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        raise ConfigurationError("policy", f"{path}: {type(e).__name__}: {e}") from None


def load_config(args: argparse.Namespace) -> QuotaConfig:
    """The policy from ``--policy`` / ``QUOTA_POLICY`` (or a one-plan default), with ``--redis-url``
    (which wins over ``QUOTA_REDIS_URL``, which wins over the file) and ``--prefix`` applied."""
    from .config import Plan, QuotaConfig

    path = _policy_path(args)
    with _environ(QUOTA_REDIS_URL=getattr(args, "redis_url", None)):
        if path is not None:
            config = read_policy(path)
        else:
            config = QuotaConfig(plans=[Plan(name="default")])
        prefix = getattr(args, "prefix", None)
        if prefix is not None:
            storage = dataclasses.replace(config.storage, prefix=prefix)
            config = dataclasses.replace(config, storage=storage)
    return config


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    from .config import mask_url as config_mask_url

    return config_mask_url(url)


@contextmanager
def open_store(config: QuotaConfig) -> Iterator[Any]:
    """A ``SyncRedisBackend`` on the configured Redis, checked with a PING; closed afterwards."""
    from redis.exceptions import RedisClusterException, RedisError

    from .backends.redis import SyncRedisBackend, client_from_url

    url = config.storage.url
    shown = mask_url(url)
    if url.startswith("memory://"):
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


def _policy_key_settings(config: QuotaConfig) -> tuple[str, float, str | None]:
    """(key prefix, cache TTL, store mode) of the policy's API-key identity."""
    api = config.identity.api_keys
    if api is None:
        return "qm", 10.0, None
    return api.prefix, float(api.cache_ttl), api.store


# -- keys ----------------------------------------------------------------------------------------
def _key_record(rec: Any) -> dict[str, Any]:
    return {
        "key_id": rec.key_id,
        "caller": rec.caller,
        "tenant": rec.tenant,
        "plan": rec.plan,
        "status": rec.status,
        "revoked": rec.revoked,
        "created": _iso(rec.created),
        "expires": _iso(rec.expires),
    }


KEY_COLUMNS = (
    Col("key_id", "key id"),
    Col("caller", "caller"),
    Col("tenant", "tenant"),
    Col("plan", "plan", lambda v: v or "(default)"),
    Col("status", "status"),
    Col("created", "created (UTC)", lambda v: (v or "")[:16].replace("T", " ")),
    Col("expires", "expires (UTC)", lambda v: (v or "never")[:16].replace("T", " ")),
)


@contextmanager
def _key_store(args: argparse.Namespace) -> Iterator[tuple[Any, QuotaConfig]]:
    from .apikeys import KeyStore

    config = load_config(args)
    key_prefix, _, mode = _policy_key_settings(config)
    if mode == "static":
        print(
            "quota-middleware: warning: the policy's identity.api_keys.store is 'static': apps "
            "using it never look up stored keys",
            file=sys.stderr,
        )
    with open_store(config) as backend:
        yield KeyStore(backend, prefix=config.storage.prefix, key_prefix=key_prefix), config


def _print_new_key(args: argparse.Namespace, key: str, rec: Any, extra: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps({"key": key, **_key_record(rec), **extra}, indent=2))
        return
    plan = f"plan {rec.plan}" if rec.plan else "the default plan"
    expires = "never expires" if rec.expires is None else f"expires {_ts(rec.expires)}"
    print(
        f"New API key {rec.key_id} for caller {rec.caller} (tenant {rec.tenant}, {plan}), "
        f"{expires}:\n\n    {key}\n"
    )
    print("Copy it now: only its SHA-256 digest is stored, it cannot be shown again.")


def run_keys_create(args: argparse.Namespace) -> int:
    with _key_store(args) as (store, config):
        if args.plan is not None and _policy_path(args) and not config.has_plan(args.plan):
            names = ", ".join(p.name for p in config.plans)
            raise CommandError(f"the policy has no plan {args.plan!r} (plans: {names})")
        try:
            key, rec = store.create(
                args.caller, args.plan, tenant=args.tenant, expires_in=args.expires
            )
        except ValueError as e:
            raise CommandError(str(e)) from None
        _print_new_key(args, key, rec, {})
    return 0


def run_keys_list(args: argparse.Namespace) -> int:
    with _key_store(args) as (store, _):
        records = [_key_record(r) for r in store.list(args.caller)]
    emit(
        args,
        KEY_COLUMNS,
        records,
        empty="no API keys" + (f" for {args.caller}" if args.caller else ""),
    )
    return 0


def run_keys_revoke(args: argparse.Namespace) -> int:
    with _key_store(args) as (store, config):
        rec = store.get(args.key_id)
        if rec is None:
            print(f"quota-middleware: no API key {args.key_id!r}", file=sys.stderr)
            return 1
        if not store.revoke(args.key_id):
            print(f"quota-middleware: API key {args.key_id} was revoked already", file=sys.stderr)
            return 1
    ttl = _policy_key_settings(config)[1]
    print(
        f"Revoked API key {rec.key_id} (caller {rec.caller}). Running apps may still accept it "
        f"for up to their API-key cache TTL ({ttl:g} s with this policy)."
    )
    return 0


def run_keys_rotate(args: argparse.Namespace) -> int:
    with _key_store(args) as (store, config):
        try:
            key, rec = store.rotate(args.key_id, grace=args.grace)
        except ValueError as e:
            print(f"quota-middleware: {e}", file=sys.stderr)
            return 1
        old = store.get(args.key_id)
    old_expires = None if old is None else old.expires
    ttl = _policy_key_settings(config)[1]
    _print_new_key(args, key, rec, {"replaces": args.key_id, "old_expires": _iso(old_expires)})
    if not args.json:
        print(
            f"The old key {args.key_id} keeps working until {_ts(old_expires)} (grace "
            f"{_duration_text(args.grace)}), then stops; running apps may accept it for up to "
            f"their API-key cache TTL ({ttl:g} s with this policy) longer."
        )
    return 0


def _keys_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    c = sub.add_parser(
        "create",
        help="create a key (printed once)",
        description="Create an API key; the plain key is printed once, only its digest is stored.",
    )
    c.add_argument("--caller", required=True, help="the caller id the key identifies")
    c.add_argument("--plan", help="plan name (default: the policy's default plan)")
    c.add_argument("--tenant", default="default", help="tenant (default: default)")
    c.add_argument(
        "--expires",
        type=parse_duration,
        metavar="DURATION",
        help="lifetime, e.g. 90d, 24h, 30m (default: never expires)",
    )
    _output_options(c, csv_too=False)
    c.set_defaults(run=run_keys_create)
    ls = sub.add_parser(
        "list",
        help="list keys (with revoked and expired ones)",
        description="List API keys, oldest first, including revoked and expired "
        "ones (kept for 30 days).",
    )
    ls.add_argument("--caller", help="only this caller's keys")
    _output_options(ls)
    ls.set_defaults(run=run_keys_list)
    r = sub.add_parser("revoke", help="revoke a key", description="Revoke an API key.")
    r.add_argument("key_id", metavar="KEY_ID")
    r.set_defaults(run=run_keys_revoke)
    rot = sub.add_parser(
        "rotate",
        help="replace a key; the old one works for a grace period",
        description="Create a new key for the same caller, plan and tenant; the "
        "old key keeps working for --grace, then expires.",
    )
    rot.add_argument("key_id", metavar="KEY_ID")
    rot.add_argument(
        "--grace",
        type=parse_duration,
        default=86400.0,
        metavar="DURATION",
        help="how long the old key keeps working (default 24h; 0 stops it now)",
    )
    _output_options(rot, csv_too=False)
    rot.set_defaults(run=run_keys_rotate)
    for leaf in (c, ls, r, rot):
        _store_options(leaf)


# -- usage ---------------------------------------------------------------------------------------
def _usd_fmt(v: Any) -> str:
    return _usd(int(v or 0))


TOP_COLUMNS = (
    Col("tenant", "tenant"),
    Col("caller", "caller"),
    Col("requests", "requests", _n, True),
    Col("input_tokens", "input tok", _n, True),
    Col("output_tokens", "output tok", _n, True),
    Col("total_tokens", "tokens", _n, True),
    Col("cost_micros", "cost USD", _usd_fmt, True),
    Col("estimated", "estimated", _n, True),
    Col("models", "models", lambda v: ",".join(v)),
)
DAY_COLUMNS = (
    Col("day", "day"),
    Col("model", "model"),
    Col("requests", "requests", _n, True),
    Col("input_tokens", "input tok", _n, True),
    Col("cached_tokens", "cached", _n, True),
    Col("output_tokens", "output tok", _n, True),
    Col("reasoning_tokens", "reasoning", _n, True),
    Col("cost_micros", "cost USD", _usd_fmt, True),
    Col("estimated", "estimated", _n, True),
)
APP_COLUMNS = (
    Col("name", "budget"),
    Col("period", "period"),
    Col("spent_micros", "spent", _usd_fmt, True),
    Col("limit_micros", "limit", _usd_fmt, True),
    Col("override_micros", "override", lambda v: "-" if v is None else _usd(v), True),
    Col("percent", "used", lambda v: f"{v:.1f}%", True),
    Col("remaining_micros", "left", _usd_fmt, True),
    Col("hard_stop", "hard stop", lambda v: "yes" if v else "no"),
    Col("resets_at", "resets (UTC)", lambda v: v[:16].replace("T", " ")),
)


def run_usage(args: argparse.Namespace) -> int:
    if args.app:
        return _usage_app(args)
    if args.caller is not None:
        return _usage_caller(args)
    return _usage_top(args)


def _usage_top(args: argparse.Namespace) -> int:
    from .reports import top_callers

    config = load_config(args)
    if args.timezone is not None:
        _zone_or_error(args.timezone)
    zone = args.timezone or config.plan(None).timezone
    if args.limit < 0:
        raise CommandError("--limit must be >= 0 (0: every caller)")
    limit = args.limit or None
    with open_store(config) as backend:
        rows = top_callers(
            backend,
            config,
            period=args.period,
            by=args.by,
            limit=limit,
            tenant=args.tenant,
            zone=zone,
        )
    records = [
        {
            **dataclasses.asdict(r),
            "total_tokens": r.total_tokens,
            "cost_usd": r.cost_usd,
            "models": list(r.models),
            "days": list(r.days),
            "hashed": r.hashed,
        }
        for r in rows
    ]
    when = "today" if args.period == "day" else "this month"
    if not (args.json or args.csv):
        print(f"top callers {when} by {args.by} ({zone}; prefix {config.storage.prefix})\n")
    emit(args, TOP_COLUMNS, records, empty=f"no usage recorded {when}")
    if records and not (args.json or args.csv):
        cost = sum(r.cost_micros for r in rows)
        tokens = sum(r.total_tokens for r in rows)
        shown = "these callers" if limit is not None and len(rows) == limit else "all"
        print(
            f"\ntotal ({shown}): {sum(r.requests for r in rows):,} requests, "
            f"{tokens:,} tokens, {_usd(cost)}"
        )
        if any(r.hashed for r in rows):
            print("(h-... ids are digests of long or unusual caller ids, as stored in the keys)")
    return 0


def _zone_or_error(name: str) -> None:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise CommandError(f"unknown time zone {name!r}") from None


def _usage_caller(args: argparse.Namespace) -> int:
    from .reports import UsageReader

    config = load_config(args)
    if args.days < 1 or args.days > 366:
        raise CommandError("--days must be between 1 and 366")
    if args.plan is not None and not config.has_plan(args.plan):
        names = ", ".join(p.name for p in config.plans)
        raise CommandError(f"the policy has no plan {args.plan!r} (plans: {names})")
    plan = config.plan(args.plan)
    tenant = args.tenant or "default"
    with open_store(config) as backend:
        reader = UsageReader(config, backend)
        records = reader.usage(args.caller, tenant=tenant, days=args.days, plan=plan.name)
        left = reader.remaining(args.caller, tenant=tenant, plan=plan.name)
    usage = [{**dataclasses.asdict(r), "cost_usd": r.cost_usd} for r in records]
    remaining: list[dict[str, Any]] = [
        {
            "name": q.name,
            "kind": q.kind,
            "period": q.period,
            "unit": q.unit,
            "limit": q.limit,
            "used": q.used,
            "remaining": q.remaining,
            "resets_at": _iso(q.resets_at),
        }
        for q in left
    ]
    if args.json:
        print(
            json.dumps(
                {
                    "caller": args.caller,
                    "tenant": tenant,
                    "plan": plan.name,
                    "days": args.days,
                    "usage": usage,
                    "remaining": remaining,
                },
                indent=2,
            )
        )
        return 0
    if args.csv:
        emit(args, DAY_COLUMNS, usage)
        return 0
    print(
        f"usage of {args.caller} (tenant {tenant}), last {args.days} day(s), "
        f"days in {plan.timezone}\n"
    )
    emit(args, DAY_COLUMNS, usage, empty="no usage recorded")
    if usage:
        print(
            f"\ntotal: {sum(u['requests'] for u in usage):,} requests, "
            f"{sum(u['input_tokens'] + u['output_tokens'] for u in usage):,} tokens, "
            f"{_usd(sum(u['cost_micros'] for u in usage))}"
        )
    if remaining:
        print(
            f"\nwhat is left this period on plan {plan.name} "
            "(pass --plan if the caller is on another plan)\n"
        )
        cols = (
            Col("name", "limit"),
            Col("period", "period"),
            Col("used", "used", str, True),
            Col("remaining", "left", str, True),
            Col("limit", "of", str, True),
            Col("resets_at", "resets (UTC)"),
        )
        shown = [
            {
                **q,
                **{
                    k: (_usd(q[k]) if q["kind"] == "budget" else f"{q[k]:,}")
                    for k in ("used", "remaining", "limit")
                },
                "resets_at": (q["resets_at"] or "")[:16].replace("T", " "),
            }
            for q in remaining
        ]
        emit(args, cols, shown)
    return 0


def _usage_app(args: argparse.Namespace) -> int:
    from .reports import app_budget_status

    config = load_config(args)
    if not config.app_budgets:
        raise CommandError("the policy has no app budgets ([[app_budgets]]); pass --policy PATH")
    with open_store(config) as backend:
        rows = app_budget_status(backend, config)
    records = [
        {
            "name": s.name,
            "period": s.period,
            "spent_micros": s.spent,
            "limit_micros": s.limit,
            "configured_micros": s.configured,
            "override_micros": s.override,
            "remaining_micros": s.remaining,
            "percent": round(s.percent, 2),
            "spent_out": s.spent_out,
            "hard_stop": s.hard_stop,
            "resets_at": _iso(s.resets_at),
        }
        for s in rows
    ]
    if not (args.json or args.csv):
        print(f"app budgets (every caller; prefix {config.storage.prefix})\n")
    emit(args, APP_COLUMNS, records)
    if not (args.json or args.csv):
        for s in rows:
            if s.spent_out:
                stop = "AI routes answer 429" if s.hard_stop else "alerts only (no hard stop)"
                print(f"\n{s.name} is spent: {stop} until {_ts(s.resets_at)}")
    return 0


def _usage_arguments(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--caller", metavar="ID", help="one caller's usage per day and model, and what is left"
    )
    what.add_argument(
        "--app", action="store_true", help="the app budgets: spent against limit this period"
    )
    p.add_argument(
        "--period",
        choices=("day", "month"),
        default="day",
        help="top callers: today (default) or this calendar month",
    )
    p.add_argument(
        "--by",
        choices=("cost", "tokens", "requests"),
        default="cost",
        help="top callers: rank by (default cost)",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=20,
        metavar="N",
        help="top callers: how many (default 20; 0: all)",
    )
    p.add_argument(
        "--timezone",
        metavar="ZONE",
        help="top callers: the zone of 'today' (default: the default plan's)",
    )
    p.add_argument("--tenant", help="only this tenant (with --caller: the caller's tenant)")
    p.add_argument(
        "--days",
        type=int,
        default=7,
        metavar="N",
        help="with --caller: days back, today included (default 7)",
    )
    p.add_argument("--plan", help="with --caller: the caller's plan (default: the default plan)")
    _output_options(p)
    _store_options(p)


# -- check ---------------------------------------------------------------------------------------
def _rule_text(lim: Any) -> str:
    """A limit's rule with every parameter (``check``): rates with their bursts, leases."""
    from .limits import Concurrency, RequestRate, TokenRate

    if isinstance(lim, RequestRate | TokenRate):
        unit = " tokens" if isinstance(lim, TokenRate) else ""
        return f"{lim.rate}{unit}, burst {lim.burst:,}"
    if isinstance(lim, Concurrency):
        return f"{lim.max} in flight, lease {lim.lease:g} s"
    return _limit_text(lim)


def _limit_summary(lim: Any) -> dict[str, Any]:
    from .limits import Budget, Concurrency, RequestRate, TokenQuota, TokenRate

    kinds = {
        RequestRate: "requests",
        TokenRate: "tokens",
        Concurrency: "concurrency",
        TokenQuota: "token_quota",
        Budget: "budget",
    }
    out: dict[str, Any] = {
        "name": lim.name,
        "type": kinds.get(type(lim), type(lim).__name__),
        "rule": _rule_text(lim),
    }
    for f in ("rate", "burst", "max", "lease", "tokens", "usd", "period", "thresholds"):
        if hasattr(lim, f):
            value = getattr(lim, f)
            out[f] = list(value) if isinstance(value, tuple) else value
    out["paths"] = None if lim.paths is None else list(lim.paths)
    out["models"] = None if lim.models is None else list(lim.models)
    return out


def policy_summary(config: QuotaConfig) -> dict[str, Any]:
    """What a policy resolves to, as plain data (``check --json``)."""
    ident = config.identity
    jwt = ident.jwt
    api = ident.api_keys
    alerts = config.alerts
    return {
        "default_plan": config.default_plan,
        "plans": [
            {
                "name": p.name,
                "timezone": p.timezone,
                "shadow": p.shadow,
                "on_error": p.on_error,
                "models": None if p.models is None else list(p.models),
                "limits": [_limit_summary(lim) for lim in p.limits],
            }
            for p in config.plans
        ],
        "routes": {
            "include": list(config.routes.include),
            "exempt": list(config.routes.exempt),
            "weights": [
                {
                    "path": w.path,
                    "weight": w.weight,
                    "methods": None if w.methods is None else list(w.methods),
                }
                for w in config.routes.weights
            ],
        },
        "ai_routes": [
            {
                "path": r.path,
                "format": r.format,
                "methods": list(r.methods),
                "max_body": r.max_body,
                "default_output_tokens": r.default_output_tokens,
                "max_output_reserve": r.max_output_reserve,
                "lease": r.lease,
            }
            for r in config.ai_routes
        ],
        "unpriced": config.unpriced,
        "prices": sorted(config.prices),
        "identity": {
            "order": list(ident.order or ()),
            "anonymous": ident.anonymous,
            "trusted_proxies": list(ident.trusted_proxies),
            "jwt": None
            if jwt is None
            else {
                "algorithms": list(jwt.algorithms),
                "audience": jwt.audience
                if isinstance(jwt.audience, str | None)
                else list(jwt.audience),
                "issuer": jwt.issuer if isinstance(jwt.issuer, str | None) else list(jwt.issuer),
                "plan_claim": jwt.plan_claim,
                "tenant_claim": jwt.tenant_claim,
            },
            "api_keys": None
            if api is None
            else {
                "header": api.header,
                "bearer": api.bearer,
                "prefix": api.prefix,
                "store": api.store,
                "static_keys": len(api.static),
                "cache_ttl": api.cache_ttl,
            },
        },
        "storage": {
            "url": mask_url(config.storage.url),
            "prefix": config.storage.prefix,
            "timeout": config.storage.timeout,
        },
        "app_budgets": [
            {
                "name": b.name,
                "usd": b.usd,
                "period": b.period,
                "timezone": b.timezone,
                "thresholds": list(b.thresholds),
                "hard_stop": b.hard_stop,
            }
            for b in config.app_budgets
        ],
        "spikes": None if config.spikes is None else dataclasses.asdict(config.spikes),
        "alerts": None
        if alerts is None
        else {
            "sinks": [s.describe() for s in alerts.sinks],
            "deliver_in_process": alerts.deliver_in_process,
            "max_attempts": alerts.max_attempts,
        },
    }


def _yes(v: bool) -> str:
    return "yes" if v else "no"


def format_policy(s: dict[str, Any]) -> str:
    out: list[str] = [f"plans (default: {s['default_plan']})"]
    for p in s["plans"]:
        models = "any" if p["models"] is None else ", ".join(p["models"])
        out.append(
            f"\n  {p['name']}: timezone {p['timezone']}, on_error {p['on_error']}, "
            f"shadow {_yes(p['shadow'])}, models {models}"
        )
        body = [
            [
                lim["name"],
                lim["type"],
                lim["rule"],
                ",".join(lim["paths"]) if lim["paths"] else "*",
                ",".join(lim["models"]) if lim["models"] else "*",
            ]
            for lim in p["limits"]
        ]
        if body:
            table = _columns(["limit", "type", "rule", "paths", "models"], body, set())
            out += ["    " + line for line in table.splitlines()]
        else:
            out.append("    (no limits)")
    r = s["routes"]
    weights = ", ".join(f"{w['path']}={w['weight']}" for w in r["weights"]) or "-"
    out.append(
        f"\nroutes: include {', '.join(r['include'])}; "
        f"exempt {', '.join(r['exempt']) or '-'}; weights {weights}"
    )
    out.append("\nAI routes:" if s["ai_routes"] else "\nAI routes: none")
    for a in s["ai_routes"]:
        out.append(
            f"  {' '.join(a['methods'])} {a['path']}  format {a['format']}, "
            f"max body {a['max_body']:,} B, default output {a['default_output_tokens']:,} "
            f"tok, max reserve {a['max_output_reserve']:,} tok, lease {a['lease']:g} s"
        )
    out.append(
        f"unpriced models: {s['unpriced']}"
        + (f"; price overrides: {', '.join(s['prices'])}" if s["prices"] else "")
    )
    i = s["identity"]
    out.append(
        f"\nidentity: order {' -> '.join(i['order'])}; anonymous {i['anonymous']}"
        + (f"; trusted proxies {', '.join(i['trusted_proxies'])}" if i["trusted_proxies"] else "")
    )
    if i["jwt"]:
        j = i["jwt"]
        out.append(
            f"  jwt: {', '.join(j['algorithms'])}; audience {j['audience'] or '-'}; "
            f"issuer {j['issuer'] or '-'}; plan claim {j['plan_claim'] or '-'}; "
            f"tenant claim {j['tenant_claim'] or '-'}"
        )
    if i["api_keys"]:
        k = i["api_keys"]
        out.append(
            f"  api keys: header {k['header'] or '-'}, bearer {_yes(k['bearer'])}, "
            f"prefix {k['prefix']}, store {k['store']}, {k['static_keys']} static, "
            f"cache {k['cache_ttl']:g} s"
        )
    st = s["storage"]
    out.append(f"\nstorage: {st['url']} (prefix {st['prefix']}, timeout {st['timeout']:g} s)")
    if s["app_budgets"]:
        out.append("app budgets:")
        for b in s["app_budgets"]:
            out.append(
                f"  {b['name']}: ${b['usd']:g}/{b['period']} ({b['timezone']}), "
                f"thresholds {b['thresholds'] or '-'}, hard stop {_yes(b['hard_stop'])}"
            )
    else:
        out.append("app budgets: none")
    sp = s["spikes"]
    out.append(
        "spikes: off"
        if sp is None
        else f"spikes: x{sp['multiple']:g} the {sp['window_hours']} h average, "
        f"floor {sp['floor_tokens']:,} tokens"
    )
    al = s["alerts"]
    if al is None:
        out.append("alerts: outbox only (no [alerts] table)")
    else:
        where = "in process" if al["deliver_in_process"] else "by `alerts run` workers"
        out.append(
            f"alerts: {', '.join(al['sinks']) or 'no sinks'}; delivered {where}, "
            f"{al['max_attempts']} attempts"
        )
    return "\n".join(out)


def run_check(args: argparse.Namespace) -> int:
    from .errors import ConfigurationError

    try:
        config = read_policy(args.policy_file)
    except ConfigurationError as e:
        if args.json:
            print(
                json.dumps(
                    {"ok": False, "policy": args.policy_file, "field": e.field, "error": str(e)},
                    indent=2,
                )
            )
        print(f"quota-middleware: {args.policy_file}: invalid: {e}", file=sys.stderr)
        return 1
    summary = policy_summary(config)
    if args.json:
        print(json.dumps({"ok": True, "policy": args.policy_file, **summary}, indent=2))
        return 0
    print(f"{args.policy_file}: OK\n")
    print(format_policy(summary))
    env = os.environ.get("QUOTA_REDIS_URL")
    if env:
        print("(QUOTA_REDIS_URL is set: it overrides the file's storage.url)")
    return 0


def _check_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("policy_file", metavar="POLICY.toml")
    _output_options(p, csv_too=False)


# -- alerts --------------------------------------------------------------------------------------
def _alerts_logging() -> None:
    import logging

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def run_alerts_run(args: argparse.Namespace) -> int:
    from .alerts import cli_run

    _alerts_logging()
    return cli_run(load_config(args), once=args.once)


def run_alerts_tail(args: argparse.Namespace) -> int:
    from .alerts import cli_tail

    if args.count < 0:
        raise CommandError("--count must be >= 0")
    return cli_tail(
        load_config(args), follow=args.follow, count=args.count, as_json=args.json, out=sys.stdout
    )


def run_alerts_test(args: argparse.Namespace) -> int:
    from .alerts import cli_test

    _alerts_logging()
    return cli_test(load_config(args), sys.stdout)


def _alerts_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="alerts_command", metavar="ACTION", required=True)
    run = sub.add_parser(
        "run",
        help="deliver alert events from the outbox to the sinks",
        description="A delivery worker: reads the alert outbox and delivers to "
        "every sink of the policy's [alerts] table, until SIGTERM/SIGINT.",
    )
    run.add_argument("--once", action="store_true", help="deliver what is ready, then exit")
    run.set_defaults(run=run_alerts_run)
    tail = sub.add_parser(
        "tail",
        help="print the newest alert events",
        description="Print the newest alert events of the outbox (read only).",
    )
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    tail.add_argument(
        "-n",
        "--count",
        type=int,
        default=20,
        metavar="N",
        help="how many of the newest events (default 20)",
    )
    tail.add_argument("--json", action="store_true", help="one JSON event per line")
    tail.set_defaults(run=run_alerts_tail)
    test = sub.add_parser(
        "test",
        help="send a test event to every configured sink",
        description="Send a test event straight to every sink of the policy's "
        "[alerts] table and report each.",
    )
    test.set_defaults(run=run_alerts_test)
    for leaf in (run, tail, test):
        _store_options(leaf)


# -- entry point ---------------------------------------------------------------------------------
def _need_action(args: argparse.Namespace) -> int:  # pragma: no cover - argparse requires one
    raise CommandError(f"{args.command}: an action is required (see --help)")


COMMANDS: dict[str, tuple[str, AddArguments, Runner]] = {
    "keys": ("create, list, revoke and rotate API keys", _keys_arguments, _need_action),
    "usage": ("top callers, one caller's usage, app budgets", _usage_arguments, run_usage),
    "check": ("validate a policy file and print what it resolves to", _check_arguments, run_check),
    "alerts": ("alert delivery worker, outbox tail, test event", _alerts_arguments, _need_action),
    "demo": (
        "run the FastAPI example in-process and show limits at work",
        _demo_arguments,
        run_demo,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quota-middleware",
        description="Per-caller rate limits and quotas for AI APIs (ASGI/WSGI middleware).",
        epilog="Admin commands read the policy from --policy (or QUOTA_POLICY) and use its "
        "storage.url, overridden by QUOTA_REDIS_URL, overridden by --redis-url. Exit status: 0 "
        "ok, 1 the operation failed (invalid policy, unknown key, failed sink), 2 usage, "
        "configuration or connection error.",
    )
    _store_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, runner) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(run=runner)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runner: Runner = args.run
    try:
        return runner(args)
    except CommandError as e:
        print(f"quota-middleware: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. piped into head
        sys.stderr.close()
        return 0
    except Exception as e:
        return _report(e)


def _report(e: Exception) -> int:
    """A message and exit status 2 for the errors an admin can fix, never a traceback; anything
    else is a bug: 1, and the traceback with QUOTA_DEBUG=1."""
    from redis.exceptions import RedisClusterException, RedisError

    from .errors import ConfigurationError, StorageError

    if isinstance(e, ConfigurationError):
        print(f"quota-middleware: invalid configuration: {e}", file=sys.stderr)
        return 2
    if isinstance(e, StorageError | RedisError | RedisClusterException | OSError):
        print(f"quota-middleware: store error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if os.environ.get("QUOTA_DEBUG"):
        raise e
    print(
        f"quota-middleware: internal error: {type(e).__name__}: {e} (QUOTA_DEBUG=1 shows the "
        "traceback)",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
