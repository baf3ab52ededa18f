"""The script registry (``backends/registry.py``) against ``lua/``: every script has its Python
twin and every twin its script. The scripts that take the time read it in one prelude
(``lua/prelude/now.lua``), which :func:`~quota_middleware.scripts.source` puts in place of their
``-- #include`` line; Redis runs and hashes that composed text."""

from __future__ import annotations

import ast
import hashlib
import re
from importlib import resources
from pathlib import Path

import fakeredis
import pytest

from quota_middleware.backends._registry import SCRIPTS
from quota_middleware.backends.memory import MemoryBackend
from quota_middleware.backends.redis import SyncRedisBackend
from quota_middleware.base._scripts import SCRIPT_NAMES, ScriptCall, source

LUA = Path(str(resources.files("quota_middleware").joinpath("lua")))
FILES = sorted(p.stem for p in LUA.glob("*.lua"))
INCLUDE_NOW = "-- #include prelude/now.lua\n"
TAKES_NOW = re.compile(r'^-- ARGV\[1\]  now in microseconds, or "" to read TIME$', re.MULTILINE)
# operations without Lua: on Redis the alert lanes use stream commands (alerts/lanes.py)
MEMORY_ONLY = {"alerts_claim", "alerts_dead", "alerts_recent"}


def raw(name: str) -> str:
    return (LUA / f"{name}.lua").read_text("utf-8")


def code(text: str) -> str:
    """``text`` without its Lua comments (no script has "--" inside a string)."""
    return "\n".join(line.split("--", 1)[0] for line in text.splitlines())


# -- the registry -------------------------------------------------------------------------------
def test_every_script_has_a_twin_and_every_twin_a_script() -> None:
    with_lua = {name for name, s in SCRIPTS.items() if s.lua is not None}
    assert sorted(with_lua) == FILES
    assert set(SCRIPTS) - with_lua == MEMORY_ONLY
    for name, s in SCRIPTS.items():
        assert s.lua in (None, f"{name}.lua"), name
        assert callable(s.twin), name


def test_script_names_are_the_lua_files() -> None:
    assert list(SCRIPT_NAMES) == FILES


def test_the_table_is_static() -> None:
    with pytest.raises(TypeError):
        SCRIPTS["extra"] = SCRIPTS["read"]  # type: ignore[index]


def test_the_twins_need_nothing_outside_the_backends() -> None:
    # nothing registers scripts on import: the table and its twins import neither the key store
    # nor the alerts (no import cycle), and a fresh memory backend runs their operations
    backends = LUA.parent / "backends"
    allowed = ("quota_middleware.errors", "quota_middleware.base", "quota_middleware.backends")
    for module in ("_registry", "memory", "_memory_scripts", "_memory_outbox"):
        tree = ast.parse((backends / f"{module}.py").read_text("utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("quota_"):
                assert node.level == 0 and node.module.startswith(allowed), (module, node.module)
    b = MemoryBackend()
    assert b.run(ScriptCall("key_lookup", ("k",), ("",))) == []
    assert b.run(ScriptCall("alerts_recent", ("s",), (5, ""))) == []


def test_unknown_script() -> None:
    with pytest.raises(KeyError):
        MemoryBackend().run(ScriptCall("nope", (), ()))


# -- the prelude --------------------------------------------------------------------------------
def compile_error(text: str) -> str:
    """Lua 5.1's (as in Redis) complaint about compiling ``text``, "" for none."""
    check = "local _, err = loadstring(ARGV[1]); return err or ''"
    return str(fakeredis.FakeRedis().eval(check, 0, text).decode())


def test_the_prelude_reads_now_from_argv_or_time() -> None:
    prelude = (LUA / "prelude" / "now.lua").read_text("utf-8")
    assert "local now\n" in code(prelude) and "redis.call('TIME')" in code(prelude)
    assert "ARGV[1]" in code(prelude)
    assert compile_error(prelude) == ""
    assert compile_error("local x = = 1") != ""


@pytest.mark.parametrize("name", FILES)
def test_scripts_that_take_the_time_use_the_prelude(name: str) -> None:
    text = raw(name)
    takes_now = TAKES_NOW.search(text) is not None
    assert (INCLUDE_NOW in text) == takes_now
    # the time is read in the prelude only, and no script has a `now` of its own
    assert "TIME" not in code(text)
    assert re.search(r"\blocal\s+now\b", code(text)) is None
    if re.search(r"\bnow\b", code(text)):
        assert takes_now, f"{name}.lua uses now without the prelude"


@pytest.mark.parametrize("name", FILES)
def test_source_keeps_the_header_and_puts_the_prelude_in_place(name: str) -> None:
    text, composed = raw(name), source(name)
    assert "#include" not in composed
    assert composed.split("\n\n")[0] == text.split("\n\n")[0]
    prelude = (LUA / "prelude" / "now.lua").read_text("utf-8")
    body = "".join(line for line in prelude.splitlines(True) if not line.startswith("--"))
    assert body.startswith("local now\n")
    assert composed == text.replace(INCLUDE_NOW, body)
    assert compile_error(composed) == ""


@pytest.mark.parametrize(("name", "empty"), [("key_lookup", []), ("read", [[]])])
def test_redis_runs_and_hashes_the_composed_source(name: str, empty: list[object]) -> None:
    # A fresh server has no scripts: EVALSHA of the composed text's SHA meets NOSCRIPT, the
    # backend loads source() and runs it again, which only works when both are the same text.
    client = fakeredis.FakeRedis()
    backend = SyncRedisBackend(client)
    assert backend.run(ScriptCall(name, ("qm:key:{x}",), ("",))) == empty
    assert client.script_exists(hashlib.sha1(source(name).encode()).hexdigest()) == [True]
