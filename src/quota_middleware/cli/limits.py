"""``quota-middleware limits show | set | unset | block | unblock``: the runtime controls
(:mod:`quota_middleware.controls`), effective on the callers' very next request."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from quota_middleware.cli._common import (
    CommandError,
    _iso,
    _output_options,
    _store_options,
    _ts,
    load_config,
    open_store,
    parse_duration,
)


@contextmanager
def _controls(args: argparse.Namespace) -> Iterator[Any]:
    from quota_middleware.controls import Controls

    config = load_config(args)
    with open_store(config) as backend:
        yield Controls(config, backend)


def _until(t: float | None) -> str:
    return "until unblocked" if t is None else f"until {_ts(t)}"


def _block_record(b: Any) -> dict[str, Any] | None:
    if b is None:
        return None
    return {"scope": b.scope, "reason": b.reason, "until": _iso(b.until)}


def _override_record(o: Any) -> dict[str, Any]:
    return {
        "name": o.name,
        "kind": o.kind,
        "value": o.value,
        "burst": o.burst,
        "until": _iso(o.until),
    }


def _value_text(o: Any) -> str:
    if o.kind in ("requests", "tokens"):
        return f"{o.value:g}/second burst {o.burst}"
    if o.kind == "budget":
        return f"${o.value:g}"
    return f"{o.value:,.0f}"


def _invalid(e: Exception) -> CommandError:
    return CommandError(str(e))


def run_limits_show(args: argparse.Namespace) -> int:
    with _controls(args) as controls:
        state = controls.show(args.caller, tenant=args.tenant)
    if args.json:
        print(
            json.dumps(
                {
                    "caller": state.caller,
                    "tenant": state.tenant,
                    "block": _block_record(state.block),
                    "tenant_block": _block_record(state.tenant_block),
                    "overrides": [_override_record(o) for o in state.overrides],
                },
                indent=2,
            )
        )
        return 0
    print(f"caller {state.caller} (tenant {state.tenant})")
    for what, b in (("blocked", state.block), ("tenant blocked", state.tenant_block)):
        if b is not None:
            where = "AI routes" if b.scope == "ai" else "all routes"
            print(f"  {what} on {where} {_until(b.until)}: {b.reason or '(no reason)'}")
    if state.block is None and state.tenant_block is None:
        print("  not blocked")
    for o in state.overrides:
        ends = "until unset" if o.until is None else f"until {_ts(o.until)}"
        print(f"  override {o.name} ({o.kind}) = {_value_text(o)}, {ends}")
    if not state.overrides:
        print("  no overrides: the plan's limits apply")
    return 0


def run_limits_set(args: argparse.Namespace) -> int:
    from quota_middleware.errors import InvalidArgument

    with _controls(args) as controls:
        try:
            o = controls.set_limit(
                args.caller,
                args.name,
                args.value,
                tenant=args.tenant,
                burst=args.burst,
                expires=args.expires,
                plan=args.plan,
            )
        except InvalidArgument as e:
            raise _invalid(e) from None
    if args.json:
        print(json.dumps(_override_record(o), indent=2))
    else:
        print(
            f"Limit {o.name} of {args.caller} is now {_value_text(o)}, "
            f"{'until unset' if o.until is None else 'until ' + _ts(o.until)}."
        )
    return 0


def run_limits_unset(args: argparse.Namespace) -> int:
    with _controls(args) as controls:
        if not controls.unset_limit(args.caller, args.name, tenant=args.tenant):
            print(
                f"quota-middleware: {args.caller} has no override of {args.name}", file=sys.stderr
            )
            return 1
    print(f"Limit {args.name} of {args.caller} is back to its plan's number.")
    return 0


def _who(args: argparse.Namespace) -> tuple[str | None, str]:
    if args.whole_tenant == (args.caller is not None):
        raise CommandError("name a CALLER, or pass --whole-tenant (with --tenant), not both")
    return args.caller, (f"caller {args.caller}" if args.caller else f"tenant {args.tenant}")


def run_limits_block(args: argparse.Namespace) -> int:
    from quota_middleware.errors import InvalidArgument

    caller, who = _who(args)
    with _controls(args) as controls:
        try:
            b = controls.block(
                caller,
                tenant=args.tenant,
                reason=args.reason,
                duration=args.duration,
                scope="ai" if args.ai_only else "all",
            )
        except InvalidArgument as e:
            raise _invalid(e) from None
    if args.json:
        print(json.dumps({"blocked": who, **(_block_record(b) or {})}, indent=2))
    else:
        where = "AI routes" if b.scope == "ai" else "all routes"
        print(f"Blocked {who} on {where} {_until(b.until)}.")
    return 0


def run_limits_unblock(args: argparse.Namespace) -> int:
    caller, who = _who(args)
    with _controls(args) as controls:
        if not controls.unblock(caller, tenant=args.tenant):
            print(f"quota-middleware: {who} was not blocked", file=sys.stderr)
            return 1
    print(f"Unblocked {who}.")
    return 0


def _limits_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="limits_command", metavar="ACTION", required=True)
    show = sub.add_parser(
        "show",
        help="a caller's blocks and overrides",
        description="Show the blocks and limit overrides that apply to a caller now.",
    )
    show.add_argument("caller", metavar="CALLER")
    _output_options(show, csv_too=False)
    show.set_defaults(run=run_limits_show)
    st = sub.add_parser(
        "set",
        help="override one limit of a caller's plan",
        description="Use VALUE instead of the plan's number for limit NAME: "
        "USD for a budget, tokens for a token quota, the maximum for a "
        "concurrency limit, a rate (5/second, or a count per the plan's period) "
        "for a rate.",
    )
    st.add_argument("caller", metavar="CALLER")
    st.add_argument("name", metavar="NAME", help="the limit's name in the policy")
    st.add_argument("value", metavar="VALUE")
    st.add_argument("--burst", type=int, help="a rate's burst (default: its count)")
    st.add_argument(
        "--expires",
        type=parse_duration,
        metavar="DURATION",
        help="how long the override lasts, e.g. 24h (default: until unset)",
    )
    st.add_argument("--plan", help="the plan whose limit NAME is meant (default: any)")
    _output_options(st, csv_too=False)
    st.set_defaults(run=run_limits_set)
    un = sub.add_parser(
        "unset",
        help="drop an override",
        description="Drop an override: the plan's number applies again.",
    )
    un.add_argument("caller", metavar="CALLER")
    un.add_argument("name", metavar="NAME")
    un.set_defaults(run=run_limits_unset)
    bl = sub.add_parser(
        "block",
        help="refuse a caller or a tenant (403 caller_blocked)",
        description="Refuse every request of a caller (or of every caller of a "
        "tenant, --whole-tenant) with 403 caller_blocked and the reason.",
    )
    bl.add_argument("caller", metavar="CALLER", nargs="?")
    bl.add_argument("--reason", default="", help="shown to the caller in the 403 body")
    bl.add_argument(
        "--duration",
        type=parse_duration,
        metavar="DURATION",
        help="how long, e.g. 30m (default: until unblocked)",
    )
    bl.add_argument("--ai-only", action="store_true", help="block AI routes only")
    _output_options(bl, csv_too=False)
    bl.set_defaults(run=run_limits_block)
    ub = sub.add_parser("unblock", help="lift a block", description="Lift a block.")
    ub.add_argument("caller", metavar="CALLER", nargs="?")
    ub.set_defaults(run=run_limits_unblock)
    for leaf in (bl, ub):
        leaf.add_argument(
            "--whole-tenant",
            action="store_true",
            help="the whole tenant (--tenant), not one caller",
        )
    for leaf in (show, st, un, bl, ub):
        leaf.add_argument("--tenant", default="default", help="tenant (default: default)")
        _store_options(leaf)
