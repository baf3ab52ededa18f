"""``quota-middleware serve``: the backend proxy as a standalone gateway under uvicorn."""

from __future__ import annotations

import argparse
import os

from quota_middleware.cli._common import CommandError, _policy_path, _store_options


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    _store_options(p)
    p.add_argument(
        "--host",
        default=os.environ.get("QUOTA_HOST", "127.0.0.1"),
        help="address to listen on (env QUOTA_HOST; 0.0.0.0 in a container)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("QUOTA_PORT", "8080")),
        help="port (env QUOTA_PORT, default 8080)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("QUOTA_WORKERS", "1")),
        help="worker processes; they share the limits through Redis",
    )
    p.add_argument(
        "--graceful-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM, how long in-flight streams may run on (then settled)",
    )
    p.add_argument("--log-level", default="info", help="uvicorn's log level")


def run_serve(args: argparse.Namespace) -> int:
    path = _policy_path(args)
    if path is None:
        raise CommandError("serve: --policy (or QUOTA_POLICY) is required")
    if args.workers < 1:
        raise CommandError("serve: --workers must be >= 1")
    try:
        import uvicorn
    except ImportError:
        raise CommandError("serve needs: pip install 'quota-middleware[serve]'") from None
    os.environ["QUOTA_POLICY"] = os.path.abspath(path)  # the workers read it
    if getattr(args, "redis_url", None):
        os.environ["QUOTA_REDIS_URL"] = args.redis_url
    # Fail here, with a clear message, rather than in every worker: a bad policy, a missing
    # provider key (a key value is never printed, only its variable's name)
    from quota_middleware.proxy._gateway import create_app

    create_app()
    uvicorn.run(
        "quota_middleware.proxy._gateway:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        timeout_graceful_shutdown=args.graceful_timeout,
        log_level=args.log_level,
        server_header=False,
    )
    return 0
