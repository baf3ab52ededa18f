"""``quota-middleware schema``: print the JSON Schema of the policy file (for an editor), or
write it; ``--check`` fails when a file differs from what this version generates."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from quota_middleware.cli._common import CommandError


def _schema_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--write", metavar="PATH", help="write the schema to PATH instead of stdout")
    p.add_argument(
        "--check", metavar="PATH", help="exit 1 if PATH is not the schema of this version"
    )


def run_schema(args: argparse.Namespace) -> int:
    from quota_middleware.schema import schema_json

    text = schema_json()
    if args.check:
        try:
            current = Path(args.check).read_text(encoding="utf-8")
        except OSError as e:
            raise CommandError(f"schema: cannot read {args.check}: {e.strerror}") from None
        if current != text:
            print(f"{args.check} is out of date: quota-middleware schema --write {args.check}",
                  file=sys.stderr)  # fmt: skip
            return 1
        return 0
    if args.write:
        try:
            Path(args.write).write_text(text, encoding="utf-8")
        except OSError as e:
            raise CommandError(f"schema: cannot write {args.write}: {e.strerror}") from None
        return 0
    sys.stdout.write(text)
    return 0
