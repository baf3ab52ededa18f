#!/usr/bin/env bash
# HTTP throughput benchmark: quota-middleware vs a bare app and its peers (see bench/README.md).
#
#   bash bench/run_http.sh            # full run (~10 min on 2 cores); rewrites the
#                                     # "## HTTP throughput vs peers" section of bench/results.md
#   bash bench/run_http.sh --quick    # smoke test: bare + ours-memory, 1 s each, < 60 s, exit 0
#   bash bench/run_http.sh --rounds 5 --duration 10   # any other bench_http.py option
#
# Needs: python3 (>= 3.11), root or sudo for apt when wrk / redis-server are missing.
# Builds its own venv in bench/.venv-bench (quota-middleware editable + servers + peers).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=bench/.venv-bench

missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v taskset >/dev/null || missing+=(util-linux)
command -v ss >/dev/null || missing+=(iproute2)
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# Peers at their current releases (checked with `pip index versions` when this was written:
# slowapi 0.1.10, fastapi-limiter 0.2.0 (pyrate-limiter API), asgi-ratelimit 0.10.0,
# flask-limiter 4.1.1).
"$VENV/bin/pip" install -q --disable-pip-version-check -e . \
  'uvicorn[standard]' gunicorn fastapi flask httpx \
  slowapi fastapi-limiter asgi-ratelimit flask-limiter redis hiredis py-spy

if [ "${1:-}" != "--quick" ] && [[ " $* " != *" --render "* ]]; then
  set -- --write "$@"
fi
exec "$VENV/bin/python" bench/bench_http.py "$@"
