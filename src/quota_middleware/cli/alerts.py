"""``quota-middleware alerts run | tail | test`` (the work is in :mod:`quota_middleware.alerts`)."""

from __future__ import annotations

import argparse
import sys

from quota_middleware.cli._common import CommandError, _store_options, load_config


# -- alerts --------------------------------------------------------------------------------------
def _alerts_logging() -> None:
    import logging

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def run_alerts_run(args: argparse.Namespace) -> int:
    from quota_middleware.cli._alert_commands import cli_run

    _alerts_logging()
    return cli_run(load_config(args), once=args.once)


def run_alerts_tail(args: argparse.Namespace) -> int:
    from quota_middleware.cli._alert_commands import cli_tail

    if args.count < 0:
        raise CommandError("--count must be >= 0")
    return cli_tail(
        load_config(args), follow=args.follow, count=args.count, as_json=args.json, out=sys.stdout
    )


def run_alerts_test(args: argparse.Namespace) -> int:
    from quota_middleware.cli._alert_commands import cli_test

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
