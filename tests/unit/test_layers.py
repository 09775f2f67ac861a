"""The package's layers point only down, and no modules import each other in a circle.

    tools (scistream.cli, demo, compose_demo, loopback): may use every layer
    s2uc (the CLI) -> scistream.api -> scistream.client (the client library) -> shared
    s2cs (the control server) -> s2ds (the data plane)                      -> shared
    shared: protocol, errors, scopes, globus, credentials
    the package (scistream/__init__.py: __version__, and the API loaded at its first use): by all

Read from the source with ast, so every import counts: at the top of a module, inside a function
(imported late, to start fast) and under TYPE_CHECKING alike. A late import is still a dependency:
a layer that imports upwards only inside a function is as tangled as one that does so at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import scistream

PACKAGE = Path(scistream.__file__).parent

SHARED = "shared"
PACKAGE_LAYER = "package"
LAYERS = {  # layer -> the layers its modules may import (each may import its own as well)
    "tools": {"cli", "api", "client", "control", "data plane", SHARED, PACKAGE_LAYER},
    "cli": {"api", "client", SHARED, PACKAGE_LAYER},
    "api": {"client", SHARED, PACKAGE_LAYER},
    "client": {SHARED, PACKAGE_LAYER},
    "control": {"data plane", SHARED, PACKAGE_LAYER},
    "data plane": {SHARED, PACKAGE_LAYER},
    SHARED: set(),
    PACKAGE_LAYER: {"api", SHARED},
}
# The pure core: no socket, no process, no TLS, whatever it imports of the package either.
PURE = (
    "scistream.protocol",
    "scistream.errors",
    "scistream.credentials",
    "scistream.scopes",
    "scistream.s2ds.render",
    "scistream.s2cs.policy",
    "scistream.s2ds.shaping",
    "scistream.client.address",
    "scistream.client.replies",
    "scistream.client.reports",
)
IMPURE = {"socket", "subprocess", "ssl"}


def layer(module: str) -> str:
    parts = module.split(".")
    if module == "scistream":
        return PACKAGE_LAYER
    if module in (
        "scistream.protocol",
        "scistream.errors",
        "scistream.scopes",
        "scistream.globus",
        "scistream.credentials",
    ):
        return SHARED
    if parts[1] == "s2uc":
        return "cli"
    if parts[1] == "api":
        return "api"
    if parts[1] == "client":
        return "client"
    if parts[1] == "s2cs":
        return "control"
    if parts[1] == "s2ds":
        return "data plane"
    return "tools"  # scistream.cli, __main__, demo, compose_demo, loopback


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Every module `module` imports: of the package (by full name) and of the outside (top name)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from . import api` imports the module scistream.api; `from .errors import X` the
            # module scistream.errors.
            subs = {f"{source}.{alias.name}" for alias in node.names} & known
            found.update(subs or {source})
    return {name if name in known else name.split(".")[0] for name in found}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def test_every_layer_imports_only_its_own_and_those_below(graph):
    wrong = [
        f"{module} ({layer(module)}) imports {name} ({layer(name)})"
        for module, names in sorted(graph.items())
        for name in sorted(names)
        if name in graph and layer(name) != layer(module) and layer(name) not in LAYERS[layer(module)]
    ]
    assert not wrong, "\n".join(wrong)


def test_the_server_imports_nothing_of_the_clients(graph):
    wrong = [
        f"{module} imports {name}"
        for module, names in sorted(graph.items())
        if layer(module) in ("control", "data plane")
        for name in sorted(names)
        if name.startswith(("scistream.s2uc", "scistream.api", "scistream.client"))
    ]
    assert not wrong, "\n".join(wrong)


def reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(name for name in graph.get(module, ()) if name in graph)
    return seen


def test_the_pure_core_touches_no_socket_process_or_tls(graph):
    missing = [module for module in PURE if module not in graph]
    assert not missing, f"not in the package: {missing}"
    wrong = [
        f"{module} imports {sorted(graph[inner] & IMPURE)} (through {inner})"
        for module in PURE
        for inner in sorted(reach(graph, module))
        if graph[inner] & IMPURE
    ]
    assert not wrong, "\n".join(wrong)


def test_no_modules_import_each_other_in_a_circle(graph):
    circles = [
        f"{module} -> {name} -> ... -> {module}"
        for module in sorted(graph)
        for name in sorted(graph[module])
        if name in graph and module in reach(graph, name)
    ]
    assert not circles, "\n".join(circles)
