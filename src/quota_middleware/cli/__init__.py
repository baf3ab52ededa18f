"""The ``quota-middleware`` command.

Subcommands register themselves in :data:`COMMANDS` (name -> (help, add_arguments, run)); each
``run`` takes the parsed arguments and returns the exit status.

``quota-middleware demo`` runs the FastAPI example in-process (no network, no Redis needed) and
drives it with a few callers, then prints what each was charged (tokens, cost, how many requests
were charged from estimates) and what is left of its token quota and budget; it needs a source
checkout (``examples/``) and the ``examples`` extra (``pip install -e '.[examples]'``).

Modules: :mod:`._common` (shared options, policy and store access, output), one per command
(:mod:`.keys`, :mod:`.limits`, :mod:`.usage`, :mod:`.check`, :mod:`.alerts`, :mod:`.demo`) and
``__main__`` (``python -m quota_middleware.cli``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from quota_middleware.cli._common import (
    AddArguments,
    Col,
    CommandError,
    Runner,
    _store_options,
    emit,
    load_config,
    mask_url,
    open_store,
    parse_duration,
    read_policy,
)
from quota_middleware.cli.alerts import (
    _alerts_arguments,
    run_alerts_run,
    run_alerts_tail,
    run_alerts_test,
)
from quota_middleware.cli.check import _check_arguments, format_policy, policy_summary, run_check
from quota_middleware.cli.demo import (
    DEMO_BASE_URL,
    Row,
    _demo_arguments,
    find_examples,
    format_plans,
    format_remaining,
    format_table,
    format_usage,
    run_demo,
)
from quota_middleware.cli.keys import (
    KEY_COLUMNS,
    _keys_arguments,
    run_keys_create,
    run_keys_list,
    run_keys_revoke,
    run_keys_rotate,
)
from quota_middleware.cli.limits import (
    _limits_arguments,
    run_limits_block,
    run_limits_set,
    run_limits_show,
    run_limits_unblock,
    run_limits_unset,
)
from quota_middleware.cli.scan import _scan_arguments, run_scan
from quota_middleware.cli.schema import _schema_arguments, run_schema
from quota_middleware.cli.serve import _serve_arguments, run_serve
from quota_middleware.cli.usage import (
    APP_COLUMNS,
    DAY_COLUMNS,
    TOP_COLUMNS,
    _usage_arguments,
    run_usage,
)

__all__ = [
    "APP_COLUMNS",
    "COMMANDS",
    "DAY_COLUMNS",
    "DEMO_BASE_URL",
    "KEY_COLUMNS",
    "TOP_COLUMNS",
    "AddArguments",
    "Col",
    "CommandError",
    "Row",
    "Runner",
    "build_parser",
    "emit",
    "find_examples",
    "format_plans",
    "format_policy",
    "format_remaining",
    "format_table",
    "format_usage",
    "load_config",
    "main",
    "mask_url",
    "open_store",
    "parse_duration",
    "policy_summary",
    "read_policy",
    "run_alerts_run",
    "run_alerts_tail",
    "run_alerts_test",
    "run_check",
    "run_demo",
    "run_keys_create",
    "run_keys_list",
    "run_keys_revoke",
    "run_keys_rotate",
    "run_limits_block",
    "run_limits_set",
    "run_limits_show",
    "run_limits_unblock",
    "run_limits_unset",
    "run_serve",
    "run_usage",
]


# -- entry point ---------------------------------------------------------------------------------
def _need_action(args: argparse.Namespace) -> int:  # pragma: no cover - argparse requires one
    raise CommandError(f"{args.command}: an action is required (see --help)")


COMMANDS: dict[str, tuple[str, AddArguments, Runner]] = {
    "keys": ("create, list, revoke and rotate API keys", _keys_arguments, _need_action),
    "limits": (
        "a caller's runtime controls: show, set, unset, block, unblock",
        _limits_arguments,
        _need_action,
    ),
    "usage": ("top callers, one caller's usage, app budgets", _usage_arguments, run_usage),
    "check": ("validate a policy file and print what it resolves to", _check_arguments, run_check),
    "alerts": ("alert delivery worker, outbox tail, test event", _alerts_arguments, _need_action),
    "serve": (
        "run the backend proxy as a standalone gateway (uvicorn)",
        _serve_arguments,
        run_serve,
    ),
    "scan": ("find leaked AI provider keys in builds and repos", _scan_arguments, run_scan),
    "schema": ("print the JSON Schema of the policy file", _schema_arguments, run_schema),
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

    from quota_middleware.errors import ConfigurationError, StorageError

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
