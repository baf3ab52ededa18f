"""``quota-middleware scan PATH...``: find AI provider keys (and this library's own) in frontend
builds and repositories, raw or hidden (base64, escapes, URL-encoding, fromCharCode, reversed,
concatenated, joined, in source maps, .env files, HTML attributes).

Exit status: 1 when a key is found (after the baseline), 0 when clean, 2 on a usage error (bad
options, a path that does not exist, an unreadable baseline). No output ever holds a whole key:
the table, ``--json`` and ``--sarif`` show the first 6 and last 4 characters and a SHA-256.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from quota_middleware.cli._common import CommandError


def _scan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="files or directories to scan (recursively); - reads standard input",
    )
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the findings as JSON")
    out.add_argument("--sarif", action="store_true", help="print a SARIF 2.1.0 log")
    p.add_argument(
        "--output",
        "-o",
        metavar="FILE",
        help="write the report (table, JSON or SARIF) to FILE instead of standard output",
    )
    p.add_argument(
        "--baseline",
        metavar="FILE",
        help="accept the findings listed in FILE (key fingerprints, see --write-baseline)",
    )
    p.add_argument(
        "--write-baseline",
        metavar="FILE",
        help="write a baseline accepting every finding of this scan to FILE, and exit 0",
    )
    p.add_argument(
        "--include-node-modules",
        action="store_true",
        help="also scan node_modules folders (skipped by default; .git, .hg, .svn always are)",
    )
    p.add_argument(
        "--key-prefix",
        action="append",
        metavar="PREFIX",
        help="prefix of this library's API keys to look for (repeatable; default: qm)",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=1 << 20,
        metavar="BYTES",
        help="read files in chunks of this size, never whole (default: 1 MiB)",
    )


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("quota-middleware")
    except Exception:  # pragma: no cover - not installed
        return "0"


def _write(text: str, path: str | None) -> None:
    if path is None:
        print(text)
        return
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    except OSError as e:
        raise CommandError(f"cannot write {path}: {e.strerror or e}") from None


def run_scan(args: argparse.Namespace) -> int:
    from quota_middleware.errors import InvalidArgument
    from quota_middleware.leaks import _report as r
    from quota_middleware.leaks._files import scan_paths

    missing = [p for p in args.paths if p != "-" and not os.path.exists(p)]
    if missing:
        raise CommandError(f"no such file or directory: {', '.join(missing)}")
    if args.chunk_size < 4096:
        raise CommandError("--chunk-size: at least 4096")
    accepted: set[str] = set()
    if args.baseline:
        try:
            with open(args.baseline, encoding="utf-8") as f:
                accepted = r.read_baseline(f.read(), args.baseline)
        except OSError as e:
            raise CommandError(f"cannot read baseline {args.baseline}: {e.strerror}") from None
        except InvalidArgument as e:
            raise CommandError(str(e)) from None
    try:
        results = list(
            scan_paths(
                args.paths,
                include_node_modules=args.include_node_modules,
                own_prefixes=tuple(args.key_prefix or ("qm",)),
                chunk_size=args.chunk_size,
                stdin=sys.stdin.buffer,
            )
        )
    except InvalidArgument as e:  # a bad --key-prefix
        raise CommandError(f"--key-prefix: {e}") from None
    every = r.located(results)
    if args.write_baseline:
        _write(json.dumps(r.baseline(every), indent=2), args.write_baseline)
        print(
            f"Wrote a baseline accepting {len({x.finding.fingerprint for x in every})} key(s) "
            f"to {args.write_baseline}.",
            file=sys.stderr,
        )
        return 0
    found = r.apply_baseline(every, accepted)
    known = len(every) - len(found)
    report: Any
    if args.sarif:
        report = json.dumps(r.to_sarif(found, version=_version()), indent=2)
    elif args.json:
        report = json.dumps(r.to_json(found, results, known), indent=2)
    else:
        report = r.table(found) + "\n\n" + r.summary(found, results, known) if found else ""
    if report:
        _write(report, args.output)
    if not args.json and not args.sarif:
        if not found:
            print(r.summary(found, results, known), file=sys.stderr)
        elif args.output:
            print(r.summary(found, results, known), file=sys.stderr)
    return 1 if found else 0
