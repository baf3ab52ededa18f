"""``quota-middleware check``: validate a policy file and print what it resolves to; with a Redis
configured, also say whether that Redis keeps its data across a restart."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from quota_middleware.base._scripts import as_str
from quota_middleware.cli._common import (
    _columns,
    _environ,
    _limit_text,
    _output_options,
    mask_url,
    read_policy,
)

if TYPE_CHECKING:
    from quota_middleware.config import QuotaConfig


# -- check ---------------------------------------------------------------------------------------
def _rule_text(lim: Any) -> str:
    """A limit's rule with every parameter (``check``): rates with their bursts, leases."""
    from quota_middleware.limits import Concurrency, RequestRate, TokenRate

    if isinstance(lim, RequestRate | TokenRate):
        unit = " tokens" if isinstance(lim, TokenRate) else ""
        return f"{lim.rate}{unit}, burst {lim.burst:,}"
    if isinstance(lim, Concurrency):
        return f"{lim.max} in flight, lease {lim.lease:g} s"
    return _limit_text(lim)


def _limit_summary(lim: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": lim.name,
        "type": str(lim.kind),
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


# -- is the configured Redis persistent? -----------------------------------------------------------
#: how long ``check`` waits for the configured Redis: long enough for a remote server, short
#: enough that a check run where Redis is out of reach (a CI job) is not held up for long
PROBE_TIMEOUT = 2.0

_LOSS = (
    "a restart empties it: every quota and rate limit starts over, and the stored API keys are gone"
)


def _config_value(client: Any, name: str) -> str:
    reply = client.config_get(name)
    for k, v in dict(reply).items():
        if as_str(k) == name:
            return as_str(v)
    raise LookupError(f"CONFIG GET {name} returned nothing")


def _node_persistence(client: Any, node: str) -> dict[str, Any]:
    """``appendonly`` and ``save`` of one server. ``persistent`` is True or False when CONFIG
    answered, and None when it could not be verified (CONFIG renamed or disabled, as managed
    services often do, or denied by an ACL): then INFO's ``aof_enabled`` can still prove AOF
    on, but nothing proves the absence of snapshots."""
    from redis.exceptions import ResponseError

    out: dict[str, Any] = {"node": node, "appendonly": None, "save": None, "error": None}
    try:
        out["appendonly"] = _config_value(client, "appendonly")
        out["save"] = _config_value(client, "save")
    except (ResponseError, LookupError) as e:
        out["error"] = f"CONFIG GET failed: {str(e).strip()}"
        try:
            aof = dict(client.info("persistence")).get("aof_enabled")
        except ResponseError:
            aof = None
        if aof is not None and int(aof) == 1:
            out["appendonly"] = "yes"
    if out["appendonly"] == "yes" or out["save"]:
        out["persistent"] = True
    elif out["error"] is None:
        out["persistent"] = False
    else:
        out["persistent"] = None
    return out


def redis_persistence(url: str, *, timeout: float = PROBE_TIMEOUT) -> dict[str, Any]:
    """Whether the Redis at ``url`` (every primary, on a cluster) keeps its data across a
    restart: ``{"url", "reachable", "error", "nodes": [per server], "persistent"}``, with
    ``persistent`` True, False, or None (unknown: unreachable or not verified)."""
    from redis.exceptions import RedisClusterException, RedisError

    from quota_middleware.backends.redis import client_from_url, is_cluster_url

    out: dict[str, Any] = {
        "url": mask_url(url),
        "reachable": False,
        "error": None,
        "nodes": [],
        "persistent": None,
    }
    client: Any = None
    try:
        client = client_from_url(url, timeout=timeout, asyncio=False)
        if is_cluster_url(url):
            targets = [
                (f"{n.host}:{n.port}", client.get_redis_connection(n))
                for n in client.get_primaries()
            ]
        else:
            kwargs = client.connection_pool.connection_kwargs
            where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
            targets = [(str(where), client)]
        for node, node_client in targets:
            node_client.ping()
            out["nodes"].append(_node_persistence(node_client, node))
        out["reachable"] = True
    except (RedisError, RedisClusterException, OSError, ValueError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
        out["nodes"] = []
        return out
    finally:
        if client is not None:
            client.close()
    verdicts = [n["persistent"] for n in out["nodes"]]
    out["persistent"] = (
        False if False in verdicts else None if None in verdicts or not verdicts else True
    )
    return out


def persistence_warnings(info: dict[str, Any]) -> list[str]:
    """What ``check`` prints to stderr about ``info`` (from :func:`redis_persistence`)."""
    url = info["url"]
    if not info["reachable"]:
        return [f"note: Redis at {url} not reachable ({info['error']}): persistence not checked"]
    out = []
    for n in info["nodes"]:
        where = url if len(info["nodes"]) == 1 else f"{url} (node {n['node']})"
        node = n["node"]
        host, _, port = node.rpartition(":")
        cli = f"redis-cli -s {node}" if node.startswith("/") else f"redis-cli -h {host} -p {port}"
        if n["persistent"] is False:
            out.append(
                f"warning: Redis at {where} keeps no data on disk (appendonly no, no save "
                f"points): {_LOSS}. Turn on the append-only file: `{cli} CONFIG SET appendonly "
                f"yes` and `{cli} CONFIG REWRITE` (or `appendonly yes` in redis.conf); or at "
                f'least snapshots: `{cli} CONFIG SET save "60 1000"`.'
            )
        elif n["persistent"] is None:
            out.append(
                f"warning: could not verify that Redis at {where} keeps its data on disk "
                f"({n['error']}): make sure appendonly or save is set, or {_LOSS}."
            )
    return out


def _persistence_line(info: dict[str, Any]) -> str:
    if not info["reachable"]:
        return f"redis: {info['url']} not reachable, persistence not checked"
    parts = []
    for n in info["nodes"]:
        if n["persistent"] is None:
            state = "persistence not verified"
        elif n["appendonly"] == "yes":
            state = "AOF on" + (f", snapshots {n['save']}" if n["save"] else "")
        elif n["save"]:
            state = f"snapshots {n['save']}, no AOF"
        else:
            state = "NO PERSISTENCE (a restart empties it)"
        parts.append(state if len(info["nodes"]) == 1 else f"{n['node']} {state}")
    return f"redis: {info['url']}: " + "; ".join(parts)


def run_check(args: argparse.Namespace) -> int:
    """Validate the policy (exit 1 when invalid). With a Redis configured and ``--offline`` not
    given, also check that Redis persists its data: a warning on stderr when it does not (or
    when that cannot be verified), and in ``--json`` under ``redis`` and ``warnings``. The
    warnings leave the exit status 0: they are about the server, not the policy, and a policy
    check in CI must not fail because the Redis it can reach is a scratch one."""
    from quota_middleware.errors import ConfigurationError

    redis_url = getattr(args, "redis_url", None)
    try:
        # --redis-url wins over QUOTA_REDIS_URL, which wins over the file, as for every command
        with _environ(QUOTA_REDIS_URL=redis_url):
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
    url = config.storage.url
    info = None if args.offline or url.startswith("memory://") else redis_persistence(url)
    warnings = [] if info is None else persistence_warnings(info)
    if args.json:
        extra = {"redis": info, "warnings": warnings}
        print(json.dumps({"ok": True, "policy": args.policy_file, **summary, **extra}, indent=2))
    else:
        print(f"{args.policy_file}: OK\n")
        print(format_policy(summary))
        if info is not None:
            print(_persistence_line(info))
        if redis_url:
            print("(--redis-url is set: it overrides QUOTA_REDIS_URL and the file's storage.url)")
        elif os.environ.get("QUOTA_REDIS_URL"):
            print("(QUOTA_REDIS_URL is set: it overrides the file's storage.url)")
    for w in warnings:
        print(f"quota-middleware: {w}", file=sys.stderr)
    return 0


def _check_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("policy_file", metavar="POLICY.toml")
    p.add_argument(
        "--redis-url",
        metavar="URL",
        default=argparse.SUPPRESS,
        help="Redis to check, over QUOTA_REDIS_URL and the policy's storage.url",
    )
    p.add_argument(
        "--offline",
        action="store_true",
        help="only validate the file: do not connect to the configured Redis to check that it "
        "persists its data (appendonly or save)",
    )
    _output_options(p, csv_too=False)
