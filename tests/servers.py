"""Throwaway Redis servers for the test suite: one standalone server, or a 3-master cluster.

Plain Python (no pytest): each server runs on a free loopback port with its own temp dir, no
persistence, and is always stopped again (``stop()``, the context manager, and an ``atexit``
guard for anything left running). Readiness is checked with a raw RESP ``PING`` over a socket,
so this module needs nothing beyond the standard library.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

__all__ = [
    "RedisClusterServer",
    "RedisServer",
    "ServerError",
    "free_port",
    "redis_cli_binary",
    "redis_server_binary",
    "resp_command",
]

START_TIMEOUT = 10.0
_live: set[RedisServer] = set()
_live_lock = threading.Lock()


class ServerError(RuntimeError):
    """A test server could not be started (the message carries the tail of its log)."""


def redis_server_binary() -> str | None:
    return os.environ.get("REDIS_SERVER_BIN") or shutil.which("redis-server")


def redis_cli_binary() -> str | None:
    return os.environ.get("REDIS_CLI_BIN") or shutil.which("redis-cli")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(*, cluster: bool = False) -> int:
    """A loopback TCP port that is free now; with ``cluster`` its bus port (+10000) is free too."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if not cluster:
            return port
        if port + 10000 <= 65535 and _port_free(port + 10000):
            return port
    raise ServerError("no free port found")


# -- a minimal RESP client, for readiness checks and cluster setup ----------------------------
def _encode(args: tuple[Any, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _read_reply(f: Any) -> Any:
    line = f.readline()
    if not line:
        raise ConnectionError("connection closed")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise ServerError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)
        return data[:-2].decode()
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read_reply(f) for _ in range(n)]
    raise ServerError(f"unexpected RESP reply {line!r}")


def resp_command(port: int, *args: Any, timeout: float = 2.0) -> Any:
    """Send one command to 127.0.0.1:``port`` and return the decoded reply (errors raise)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(_encode(args))
        with s.makefile("rb") as f:
            return _read_reply(f)


def _pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    # If the test process dies hard (SIGKILL, OOM), take the server with it (Linux only).
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class RedisServer:
    """One ``redis-server`` on 127.0.0.1, no persistence. ``restart()`` keeps the same port."""

    def __init__(
        self,
        port: int | None = None,
        *,
        extra_args: tuple[str, ...] | list[str] = (),
        binary: str | None = None,
        cluster: bool = False,
    ) -> None:
        self._fixed_port = port is not None
        self._cluster = cluster
        self.port: int = port if port is not None else free_port(cluster=cluster)
        self.extra_args = list(extra_args)
        self.binary = binary or redis_server_binary()
        self.dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._started = False

    # -- properties ----------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def log_path(self) -> Path | None:
        return None if self.dir is None else self.dir / "redis.log"

    def log_tail(self, lines: int = 30) -> str:
        p = self.log_path
        if p is None or not p.exists():
            return "(no log)"
        return "\n".join(p.read_text(errors="replace").splitlines()[-lines:])

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> RedisServer:
        if self.running:
            return self
        if self.binary is None:
            raise ServerError("redis-server not installed: apt-get install redis-server")
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix=f"qm-redis-{self.port}-"))
        # the first start may move to another port if it loses a race for it; a start after a
        # stop() keeps its port, so that clients reconnect to the "same" server
        attempts = 1 if self._fixed_port or self._started else 3
        if self._started:
            self._wait_port_free()
        for attempt in range(attempts):
            try:
                self._spawn_and_wait()
                self._started = True
                return self
            except ServerError:
                self._kill()
                if attempt + 1 == attempts:
                    raise
                # lost a race for the port: pick another one
                self.port = free_port(cluster=self._cluster)
        return self  # unreachable

    def _spawn_and_wait(self) -> None:
        assert self.dir is not None and self.binary is not None
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "no",
            "--dir", str(self.dir),
            "--daemonize", "no",
            "--loglevel", "notice",
            *self.extra_args,
        ]  # fmt: skip
        log = open(self.dir / "redis.log", "ab")  # noqa: SIM115
        try:
            kwargs: dict[str, Any] = {}
            if (
                sys.platform.startswith("linux")
                and threading.current_thread() is threading.main_thread()
            ):
                kwargs["preexec_fn"] = _pdeathsig
            self.proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                **kwargs,
            )
        finally:
            log.close()
        with _live_lock:
            _live.add(self)
        deadline = time.monotonic() + START_TIMEOUT
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(
                    f"redis-server on port {self.port} exited with {self.proc.returncode}:\n"
                    + self.log_tail()
                )
            try:
                if resp_command(self.port, "PING", timeout=0.5) == "PONG":
                    return
            except (OSError, ServerError, ConnectionError) as e:
                last = e
            time.sleep(0.02)
        raise ServerError(
            f"redis-server on port {self.port} did not answer PING within {START_TIMEOUT:.0f}s "
            f"({last!r}):\n" + self.log_tail()
        )

    def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        elif proc is not None:
            proc.wait()
        with _live_lock:
            _live.discard(self)

    def stop(self, *, keep_dir: bool = False) -> None:
        """SIGTERM (then SIGKILL after 5 s) and wait; removes the temp dir unless ``keep_dir``."""
        self._kill()
        if not keep_dir and self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def restart(self) -> None:
        """Stop and start again on the same port: data and loaded scripts are gone."""
        self.stop(keep_dir=True)
        if self.dir is None:  # never started
            self.start()
            return
        self._wait_port_free()
        self._spawn_and_wait()

    def _wait_port_free(self) -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    pass
            except OSError:
                return
            time.sleep(0.02)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<RedisServer {self.url} {'running' if self.running else 'stopped'}>"


class RedisClusterServer:
    """A 3-master Redis Cluster (no replicas) on loopback, each node in its own temp dir."""

    def __init__(self, masters: int = 3, *, binary: str | None = None) -> None:
        self.binary = binary or redis_server_binary()
        self.masters = masters
        self.nodes: list[RedisServer] = []

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    @property
    def plain_url(self) -> str:
        """The URL without ``+cluster`` (what ``redis.cluster.RedisCluster.from_url`` takes)."""
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", n.port) for n in self.nodes]

    @property
    def running(self) -> bool:
        return bool(self.nodes) and all(n.running for n in self.nodes)

    def start(self) -> RedisClusterServer:
        if self.running:
            return self
        if self.binary is None:
            raise ServerError("redis-server not installed: apt-get install redis-server")
        try:
            for _ in range(self.masters):
                port = free_port(cluster=True)
                while port in self.ports:
                    port = free_port(cluster=True)
                node = RedisServer(
                    port,
                    binary=self.binary,
                    cluster=True,
                    extra_args=[
                        "--cluster-enabled", "yes",
                        "--cluster-config-file", f"nodes-{port}.conf",
                        "--cluster-node-timeout", "2000",
                    ],
                )  # fmt: skip
                self.nodes.append(node)
                node.start()
            self._create()
            self._wait_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def _create(self) -> None:
        cli = redis_cli_binary()
        if cli is None:
            self._create_by_hand()
            return
        cmd = [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports)]
        cmd += ["--cluster-replicas", "0", "--cluster-yes"]
        r = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60
        )
        if r.returncode != 0:
            raise ServerError(f"redis-cli --cluster create failed:\n{r.stdout}\n{r.stderr}")

    def _create_by_hand(self) -> None:
        # What redis-cli does: split the slots, give each node its own epoch, introduce them.
        n = len(self.nodes)
        for i, node in enumerate(self.nodes):
            lo, hi = 16384 * i // n, 16384 * (i + 1) // n - 1
            resp_command(node.port, "CLUSTER", "ADDSLOTSRANGE", lo, hi)
            resp_command(node.port, "CLUSTER", "SET-CONFIG-EPOCH", i + 1)
        for node in self.nodes[1:]:
            resp_command(self.nodes[0].port, "CLUSTER", "MEET", "127.0.0.1", node.port)

    def _wait_ok(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            ok = True
            for node in self.nodes:
                try:
                    raw = resp_command(node.port, "CLUSTER", "INFO")
                except (OSError, ServerError, ConnectionError):
                    ok = False
                    break
                info = dict(line.split(":", 1) for line in str(raw).splitlines() if ":" in line)
                if (
                    info.get("cluster_state") != "ok"
                    or info.get("cluster_slots_assigned") != "16384"
                    or info.get("cluster_slots_ok") != "16384"
                    or info.get("cluster_known_nodes") != str(self.masters)
                ):
                    ok = False
                    break
            if ok:
                return
            time.sleep(0.05)
        tails = "\n".join(f"--- node {n.port}:\n{n.log_tail(10)}" for n in self.nodes)
        raise ServerError(
            f"cluster not ok after {timeout:.0f}s (last CLUSTER INFO {info}):\n{tails}"
        )

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes = []

    def __enter__(self) -> RedisClusterServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<RedisClusterServer {self.ports} {'running' if self.running else 'stopped'}>"


@atexit.register
def _stop_all() -> None:
    with _live_lock:
        servers = list(_live)
    for s in servers:
        with contextlib.suppress(Exception):
            s.stop()


# -- serving a test app with a real HTTP server ---------------------------------------------------
APPS_DIR = Path(__file__).resolve().parent / "apps"


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Until ``port`` accepts connections; the server's stderr if it died first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError((proc.stderr.read() if proc.stderr else b"").decode()[-2000:])
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise ServerError(f"server on port {port} did not start")


def serve_app(
    kind: str, module: str, env: dict[str, str], *, workers: int = 2
) -> tuple[int, subprocess.Popen[bytes]]:
    """Serve ``module.asgi_app`` with uvicorn (``workers`` processes), ``module.wsgi_app``
    with gunicorn (``workers`` sync processes, 8 threads each) or with werkzeug's threaded
    server, from ``tests/apps``, on a free loopback port."""
    port = free_port()
    environ = {**os.environ, "PYTHONPATH": str(APPS_DIR), **env}
    environ.pop("QUOTA_REDIS_URL", None)  # the app's own QM_TEST_URL decides
    if kind == "uvicorn":
        cmd = [sys.executable, "-m", "uvicorn", f"{module}:asgi_app", "--port", str(port),
               "--host", "127.0.0.1", "--workers", str(workers),
               "--log-level", "warning"]  # fmt: skip
    elif kind == "gunicorn":
        cmd = [sys.executable, "-m", "gunicorn", f"{module}:wsgi_app", "--bind",
               f"127.0.0.1:{port}", "--workers", str(workers), "--threads", "8",
               "--log-level", "warning"]  # fmt: skip
    else:
        code = (
            f"import {module}; from werkzeug.serving import run_simple; "
            f"run_simple('127.0.0.1', {port}, {module}.wsgi_app, threaded=True)"
        )
        cmd = [sys.executable, "-c", code]
    proc = subprocess.Popen(cmd, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(port, proc)
    except BaseException:
        stop_process(proc)
        raise
    return port, proc


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
