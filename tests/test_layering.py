"""The layering of src/connwatch: every import runs down the planes, and no module imports in a circle.

Every Import/ImportFrom node counts, wherever it sits (inside functions, under TYPE_CHECKING): a
type-only import still ties the importer to the imported module's layer.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "connwatch"

# The one table (STYLE.md "Layout", BRIEF.md "The import rule").
# layer: (its modules, the layers it may import).
# "x.*" names the package x and everything under it; any other name is one module.
# Modules in one layer import each other freely (the circle check still applies).
# The foundation is a row per module, because its modules may not use each other freely.
FOUNDATION = (
    "foundation",
    "foundation/_types",
    "foundation/exceptions",
    "foundation/histogram",
    "foundation/snapshots",
)
BELOW_COMMANDS = (
    "runtime",
    "observe",
    "proxy",
    "liveness",
    "health",
    "wire",
    "config",
    *FOUNDATION,
)
LAYERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "foundation": (("connwatch",), ()),
    "foundation/_types": (("connwatch._types",), ()),
    "foundation/exceptions": (("connwatch.exceptions",), ("foundation/_types",)),
    "foundation/histogram": (("connwatch.histogram",), ()),
    "foundation/snapshots": (
        ("connwatch.snapshots",),
        ("foundation/_types", "foundation/histogram"),
    ),
    "config": (("connwatch.config.*",), FOUNDATION),
    "wire": (("connwatch.wire.*",), FOUNDATION),
    "proxy": (("connwatch.proxy.*",), ("config", "wire", *FOUNDATION)),
    "liveness": (("connwatch.liveness.*",), ("config", *FOUNDATION)),
    "health": (("connwatch.health.*",), ("proxy", "wire", "config", *FOUNDATION)),
    # the public face of SPEC §7; nothing inside connwatch imports it
    "heartbeat face": (("connwatch.heartbeat",), ("health", "wire", *FOUNDATION)),
    "observe": (
        ("connwatch.observe.*",),
        ("proxy", "liveness", "health", "wire", "config", *FOUNDATION),
    ),
    "runtime": (
        ("connwatch.runtime.*",),
        ("observe", "proxy", "liveness", "health", "wire", "config", *FOUNDATION),
    ),
    "commands": (("connwatch.commands.*",), BELOW_COMMANDS),
    "commands.top": (("connwatch.commands.top.*",), BELOW_COMMANDS),
    # demo shows top's view of its in-process daemon and runs on the commands' event loop
    "commands.demo": (
        ("connwatch.commands.demo.*",),
        ("commands", "commands.top", *BELOW_COMMANDS),
    ),
    "cli": (
        ("connwatch.cli", "connwatch.__main__"),
        ("commands", "commands.top", "commands.demo", *FOUNDATION),
    ),
}


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    path: Path
    line: int
    imported: str  # dotted name of the module (or package) the statement loads


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> str | None:
    """The layer whose longest matching entry names this module."""
    best: tuple[int, str] | None = None
    for layer, (members, _) in LAYERS.items():
        for entry in members:
            if entry.endswith(".*"):
                package = entry[:-2]
                hit = module == package or module.startswith(package + ".")
                size = len(package)
            else:
                hit = module == entry
                size = len(entry)
            if hit and (best is None or size > best[0]):
                best = (size, layer)
    return best[1] if best else None


def imports_of(module: str, path: Path, known: set[str]) -> Iterator[Import]:
    """Every connwatch import in the file, resolved to the module it loads."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, path, node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # `from connwatch.wire import proxy_protocol` loads the submodule
                sub = f"{base}.{alias.name}"
                yield Import(module, path, node.lineno, sub if sub in known else base)


def all_imports() -> list[Import]:
    """Each (file, line, imported module) once, connwatch modules only."""
    found = modules()
    known = set(found)
    unique = {
        imp: None
        for name, path in found.items()
        for imp in imports_of(name, path, known)
        if imp.imported == "connwatch" or imp.imported.startswith("connwatch.")
    }
    return list(unique)


def describe(layers: tuple[str, ...]) -> str:
    """The allowed layers, the whole foundation said once."""
    if not layers:
        return "the standard library"
    if set(FOUNDATION) <= set(layers):
        layers = (*(name for name in layers if name not in FOUNDATION), "foundation (all of it)")
    return ", ".join(layers)


def test_every_module_has_a_layer() -> None:
    unmapped = [name for name in modules() if layer_of(name) is None]
    assert not unmapped, f"modules missing from LAYERS in {__file__}: {unmapped}"


def test_the_layer_table_names_only_known_layers() -> None:
    unknown = {allowed for _, may in LAYERS.values() for allowed in may if allowed not in LAYERS}
    assert not unknown, f"LAYERS allows imports of layers it does not define: {unknown}"


def test_every_import_runs_down_or_within_its_layer() -> None:
    broken = []
    for imp in all_imports():
        own = layer_of(imp.importer)
        target = layer_of(imp.imported)
        if own is None or own == target:
            continue
        allowed = LAYERS[own][1]
        if target not in allowed:
            rel = imp.path.relative_to(SRC.parent)
            rule = f"{own} may import only {describe(allowed)}"
            broken.append(
                f"{rel}:{imp.line}: imports {imp.imported} (layer {target}); rule broken: {rule}"
            )
    assert not broken, "imports that run up or sideways:\n" + "\n".join(broken)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component (Tarjan), each as a closed path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [circle_in(graph, set(component)) for component in components]


def circle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest closed path through the component's smallest name (breadth first)."""
    start = min(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph.get(node, set()) & component):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if nxt not in previous:
                    previous[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no circle through {start}")  # unreachable for a real component


def test_no_module_imports_in_a_circle() -> None:
    graph: dict[str, set[str]] = {}
    lines: dict[tuple[str, str], str] = {}
    for imp in all_imports():
        if imp.imported != imp.importer:
            graph.setdefault(imp.importer, set()).add(imp.imported)
            lines.setdefault((imp.importer, imp.imported), f"{imp.path.name}:{imp.line}")
    cycles = find_cycles(graph)
    described = [
        " -> ".join(circle) + "  (" + ", ".join(lines[(a, b)] for a, b in pairwise(circle)) + ")"
        for circle in cycles
    ]
    assert not cycles, "import circles:\n" + "\n".join(described)


# Forks a child per module from an interpreter that has imported nothing of connwatch, so each
# module is imported alone (with only what it imports itself) without paying interpreter start-up
# fifty times.
_IMPORT_EACH = textwrap.dedent(
    """
    import importlib, os, sys, traceback
    running, failed = {}, []
    def reap():
        pid, status = os.wait()
        if status:
            failed.append(running[pid])
        del running[pid]
    for name in sys.argv[1:]:
        if len(running) >= 2:  # two at a time: the machine has two cores
            reap()
        pid = os.fork()
        if pid == 0:
            try:
                importlib.import_module(name)
            except BaseException as exc:
                where = traceback.extract_tb(exc.__traceback__)[-1]
                what = traceback.format_exception_only(exc)[-1].strip()
                print(f"{name}: {what} (at {where.filename}:{where.lineno})", flush=True)
                os._exit(1)
            os._exit(0)
        running[pid] = name
    while running:
        reap()
    sys.exit(1 if failed else 0)
    """
)


def test_each_module_imports_alone_in_a_fresh_interpreter() -> None:
    names = [name for name in modules() if name != "connwatch.__main__"]  # __main__ runs the CLI
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, *names],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, (
        f"modules that fail to import alone:\n{result.stdout}\n{result.stderr}"
    )
