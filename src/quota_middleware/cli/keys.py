"""``quota-middleware keys create | list | revoke | rotate``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from quota_middleware.cli._common import (
    Col,
    CommandError,
    _duration_text,
    _iso,
    _output_options,
    _policy_path,
    _store_options,
    _ts,
    emit,
    load_config,
    open_store,
    parse_duration,
)

if TYPE_CHECKING:
    from quota_middleware.config import QuotaConfig


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
    from quota_middleware.identity import KeyStore

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
