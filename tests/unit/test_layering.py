"""The library's import graph has no cycle: each layer imports only the layers below it.

Read from the sources with :mod:`ast` (nothing is imported), so the check sees every import a
module can execute: top-level ones and the deferred ones inside functions (a deferred import
is still a dependency, it only runs later). Imports under ``if TYPE_CHECKING:`` are left out:
they exist for annotations only and never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import remote_mvc

PACKAGE = Path(remote_mvc.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (``remote_mvc.x``; a package by its own name)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("remote_mvc",) + path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that can run: everywhere except the bodies of ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def walk(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    walk(other)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            walk(child)

    walk(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports at run time."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names if alias.name in modules)
                continue
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            submodules = {f"{source}.{alias.name}" for alias in node.names} & modules.keys()
            deps.update(submodules)  # `from . import auth` depends on auth, not on the package
            if source in modules and len(submodules) < len(node.names):
                deps.add(source)
        graph[name] = deps - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_library_has_no_import_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 30 and "remote_mvc.server" in graph  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checker_sees_deferred_imports_and_ignores_type_checking_ones() -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from .b import B\n"
        "def f():\n    from .c import C\n    return C\n")
    names = [node.module for node in _runtime_imports(tree) if isinstance(node, ast.ImportFrom)]
    assert names == ["typing", "c"]


def test_the_checker_reports_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


# Pyro5's private surface: module-level names with a leading underscore (``protocol._header_format``,
# ``from Pyro5.server import _get_exposed_members``) and these members of its objects. The ``_pyro*``
# proxy attributes Pyro5 documents for users (``_pyroTimeout``, ``_pyroBind``, ``_pyroRelease``,
# ``_pyroHandshake``, ``_pyroSerializer``, ``_pyroClaimOwnership``, ``_pyroUri`` ...) are its public API.
PYRO5_PRIVATE_MEMBERS = frozenset({
    "_pyroConnection", "_pyroInvoke", "_pyroGetMetadata", "_handshake", "_sendExceptionResponse",
    "_pyroExposed", "_header_format", "_header_size", "_magic_number", "_empty_correlation_id",
})


def pyro5_private_uses(source: str) -> list[str]:
    """Where ``source`` reaches Pyro5's private surface (see PYRO5_PRIVATE_MEMBERS), as ``line: what``."""
    tree = ast.parse(source)
    pyro_names: set[str] = set()  # local names bound to Pyro5 modules
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "Pyro5":
                    pyro_names.add(alias.asname or "Pyro5")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "Pyro5" and not node.level:
            for alias in node.names:
                if alias.name.startswith("_"):
                    found.append(f"{node.lineno}: from {node.module} import {alias.name}")
                else:
                    pyro_names.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if node.attr in PYRO5_PRIVATE_MEMBERS or (isinstance(root, ast.Name) and root.id in pyro_names):
                found.append(f"{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.FunctionDef) and node.name in PYRO5_PRIVATE_MEMBERS:
            found.append(f"{node.lineno}: def {node.name}")  # an override of a private hook
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            found += [f"{node.lineno}: {t.id} =" for t in targets
                      if isinstance(t, ast.Name) and t.id in PYRO5_PRIVATE_MEMBERS]
    return sorted(set(found))


def test_pyro5_internals_are_reached_only_from_remote_mvc_pyro() -> None:
    outside = {name: path for name, path in _modules().items()
               if name != "remote_mvc.pyro" and not name.startswith("remote_mvc.pyro.")}
    uses = {name: found for name, path in sorted(outside.items()) if (found := pyro5_private_uses(path.read_text()))}
    assert not uses, f"Pyro5 internals outside remote_mvc/pyro/: {uses}"
    inside = [path for name, path in _modules().items() if name.startswith("remote_mvc.pyro.")]
    assert any(pyro5_private_uses(path.read_text()) for path in inside)  # the check sees them where they are


def test_the_private_name_checker_sees_each_way_in() -> None:
    assert pyro5_private_uses("from Pyro5 import protocol\nx = protocol._header_size\n") == ["2: ._header_size"]
    assert pyro5_private_uses("import Pyro5.protocol as p\nx = p._magic_number\n") == ["2: ._magic_number"]
    assert pyro5_private_uses("from Pyro5.server import _get_exposed_members\n") == \
        ["1: from Pyro5.server import _get_exposed_members"]
    assert pyro5_private_uses("sock = proxy._pyroConnection.sock\n") == ["1: ._pyroConnection"]
    assert pyro5_private_uses("class D:\n    def _handshake(self, conn): ...\n") == ["2: def _handshake"]
    assert pyro5_private_uses("proxy._pyroTimeout = 3\nproxy._pyroRelease()\nself._lock = 1\n") == []
