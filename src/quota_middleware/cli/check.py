"""``quota-middleware check``: validate a policy file and print what it resolves to."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from ._common import _columns, _limit_text, _output_options, mask_url, read_policy

if TYPE_CHECKING:
    from ..config import QuotaConfig


# -- check ---------------------------------------------------------------------------------------
def _rule_text(lim: Any) -> str:
    """A limit's rule with every parameter (``check``): rates with their bursts, leases."""
    from ..limits import Concurrency, RequestRate, TokenRate

    if isinstance(lim, RequestRate | TokenRate):
        unit = " tokens" if isinstance(lim, TokenRate) else ""
        return f"{lim.rate}{unit}, burst {lim.burst:,}"
    if isinstance(lim, Concurrency):
        return f"{lim.max} in flight, lease {lim.lease:g} s"
    return _limit_text(lim)


def _limit_summary(lim: Any) -> dict[str, Any]:
    from ..limits import Budget, Concurrency, RequestRate, TokenQuota, TokenRate

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
    from ..errors import ConfigurationError

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
