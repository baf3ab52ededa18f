"""The layering contract, over the package's import graph (read from the source with ``ast``,
so a lazy import inside a function counts as much as one at the top; imports under
``if TYPE_CHECKING:`` do not, they never run).

- Every module has a layer; a module imports only modules of its own layer or below.
- The import graph has no cycles.
- The sans-IO core imports no I/O or framework library.

ARCHITECTURE.md draws the same layers. A new module must be placed in ``LAYERS``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "quota_middleware"
PACKAGE = "quota_middleware"

#: (module or package prefix, layer), lowest first. The longest matching prefix wins.
LAYERS: list[tuple[str, int]] = [
    # values everything else speaks
    ("errors", 0),
    ("limits", 1),
    ("base", 2),
    ("base._flows", 3),
    # identity: JWTs, API keys, client IPs
    ("identity._jwt", 3),
    ("identity._client_ip", 3),
    ("identity._keyformat", 3),
    ("identity._keystore", 3),
    ("identity._apikeys", 3),
    ("identity", 4),
    # metering: framing, per-provider usage, the parser, estimates, prices
    ("metering._framing", 3),
    ("metering._providers", 3),
    ("metering", 4),
    ("metering._estimate", 5),
    ("metering.pricing", 5),
    # leaked-key detection: patterns, decoders, the streaming scanner (pure), and file reading
    ("leaks", 3),
    # the policy (and the alert sinks' configuration it holds)
    ("alerts._sinks", 4),
    ("alerts._text", 4),
    ("alerts._config", 5),
    ("proxy._config", 5),  # the proxy's upstreams, part of the policy
    ("proxy._plan", 5),  # the proxy's sans-IO request plan and usage stripper
    ("admin._config", 5),  # the admin app's credentials, part of the policy
    ("config", 6),
    ("schema", 6),  # the policy file's JSON Schema, generated from the config types
    # the sans-IO core: decisions, admission, settlement, the per-request exchange
    ("core", 7),
    ("core._margins", 7),
    ("core._meter", 8),
    ("core._decision", 9),
    ("core._responses", 10),
    ("core._context", 10),
    ("core._extension", 10),
    ("core._hardstop", 11),
    ("core._settlement", 12),
    ("core._engine", 13),
    ("core._exchange", 14),
    ("core._connection", 14),  # the WebSocket peer of the exchange
    # stores
    ("backends", 6),
    # what runs beside the core: reading usage, delivering alerts, metrics
    ("reports", 15),
    ("controls", 15),
    ("fleet", 15),  # reports over every caller: SCANs and the app-wide rollups
    ("alerts", 15),
    ("metrics", 15),
    ("otel", 15),  # OpenTelemetry: the decision and GenAI usage on the request's span
    # the adapters, then the command line and the package's public face
    ("asgi", 16),
    ("wsgi", 16),
    ("_asgi_websocket", 16),  # the ASGI adapter's WebSocket half
    ("selfservice", 16),  # the caller's own usage, an app mounted behind either adapter
    ("proxy", 16),  # the proxy apps drive its plan with httpx, beside the adapters
    ("admin", 16),  # the admin API and dashboard over reports, fleet, controls, keys
    ("cli", 17),
    ("", 18),
]

CORE = ["core", "base"]
IO_LIBRARIES = ("redis", "asyncio", "starlette", "werkzeug", "flask", "fastapi", "httpx")


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(p for p in parts if p != "__init__")
        mods[name] = path
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path, mods: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(modules of this package, top-level names of other libraries) imported by ``name``."""
    inside: set[str] = set()
    outside: set[str] = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    if name == "":
        package = []

    def add(target: str, names: list[str]) -> None:
        for n in names:
            cand = f"{target}.{n}" if target else n
            inside.add(cand if cand in mods else target)

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if _is_type_checking(node.test):
                for n in node.orelse:
                    self.visit(n)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            for a in node.names:
                if a.name == PACKAGE or a.name.startswith(PACKAGE + "."):
                    inside.add(a.name.removeprefix(PACKAGE).removeprefix("."))
                else:
                    outside.add(a.name.split(".")[0])

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level == 0:
                module = node.module or ""
                if module == PACKAGE or module.startswith(PACKAGE + "."):
                    add(
                        module.removeprefix(PACKAGE).removeprefix("."), [a.name for a in node.names]
                    )
                else:
                    outside.add(module.split(".")[0])
                return
            base = package[: len(package) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            add(target, [a.name for a in node.names])

    Visitor().visit(ast.parse(path.read_text("utf-8")))
    inside.discard(name)
    return {m for m in inside if m in mods}, outside


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    mods = _modules()
    inside, outside = {}, {}
    for name, path in mods.items():
        inside[name], outside[name] = _imports(name, path, mods)
    return inside, outside


def _layer(module: str) -> int:
    best: tuple[str, int] | None = None
    for prefix, layer in LAYERS:
        if prefix == "" or module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, layer)
    assert best is not None
    return best[1]


def test_every_module_imports_only_its_layer_or_below() -> None:
    inside, _ = _graph()
    upward = {(m, t) for m, targets in inside.items() for t in targets if _layer(t) > _layer(m)}
    assert not upward, sorted(upward)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    inside, _ = _graph()
    assert _cycles(inside) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_core_imports_no_io_or_framework_library() -> None:
    _, outside = _graph()
    core = [m for m in outside if any(m == c or m.startswith(c + ".") for c in CORE)]
    assert len(core) > 10, core
    for module in core:
        bad = outside[module] & set(IO_LIBRARIES)
        assert not bad, (module, bad)


def test_every_module_outside_the_public_surface_is_private() -> None:
    """The public modules are the package, its folders' ``__init__`` and these; every other
    module name starts with an underscore (or sits in a folder whose ``__init__`` says so)."""
    public = {
        "errors", "limits", "config", "asgi", "wsgi", "reports", "metrics", "selfservice",
        "controls", "fleet", "schema", "otel", "metering.pricing", "backends.memory",
        "backends.redis", "cli.__main__",
    }  # fmt: skip
    folders = {m for m, p in _modules().items() if p.name == "__init__.py"}
    for module in _modules():
        leaf = module.rsplit(".", 1)[-1]
        if module in folders or module in public or module.startswith("cli."):
            continue
        assert leaf.startswith("_"), module


def test_every_module_has_a_layer_below_the_package() -> None:
    inside, _ = _graph()
    for module in inside:
        if module:
            assert _layer(module) < _layer(""), module
