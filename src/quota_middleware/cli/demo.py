"""``quota-middleware demo``: runs the FastAPI example in-process (no network, no Redis needed)
and drives it with a few callers, then prints what each was charged (tokens, cost, how many
requests were charged from estimates) and what is left of its token quota and budget; it needs a
source checkout (``examples/``) and the ``examples`` extra (``pip install -e '.[examples]'``)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quota_middleware.cli._common import CommandError, _columns, _environ, _limit_text, _usd

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
    for candidate in (here.parents[3] / "examples", Path.cwd() / "examples"):
        if (candidate / "fastapi_app" / "app.py").is_file():
            return candidate
    raise CommandError(
        "the demo needs the examples/ directory of a source checkout; run it from the "
        "repository root after `pip install -e '.[examples]'`"
    )


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


def format_table(rows: Sequence[Row]) -> str:
    header = ("caller", "plan", "sent", "admitted", "429", "401", "why", "last RateLimit")
    body = [
        (r.caller, r.plan, str(r.sent), str(r.admitted), str(r.limited), str(r.unauthorized),
         ", ".join(r.why) or "-", r.ratelimit)
        for r in rows
    ]  # fmt: skip
    return _columns(header, body, {2, 3, 4, 5})


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
