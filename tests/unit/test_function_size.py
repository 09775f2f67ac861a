"""No function of the package is longer than 150 lines (STYLE.md): one that is does several jobs,
which want names of their own. Read from the source with ast, decorators and signature included,
so a command whose options fill its signature counts them too (s2cs declares them in options.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import scistream

PACKAGE = Path(scistream.__file__).parent
LIMIT = 150


def lengths(source: str) -> list[tuple[str, int, int]]:
    """(name, first line, lines) of every function and method, nested ones too."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            found.append((node.name, first, (node.end_lineno or node.lineno) - first + 1))
    return found


def test_lengths_count_every_line_of_a_function_nested_ones_too():
    source = "@decorated\ndef outer(\n    a: int,\n) -> None:\n    def inner():\n        pass\n    return a\n"
    assert sorted(lengths(source)) == [("inner", 5, 2), ("outer", 1, 7)]


def test_no_function_of_the_package_is_over_150_lines():
    long = [
        f"{path.relative_to(PACKAGE.parent)}:{first} {name}: {count} lines"
        for path in sorted(PACKAGE.rglob("*.py"))
        for name, first, count in lengths(path.read_text(encoding="utf-8"))
        if count > LIMIT
    ]
    assert long == [], f"over {LIMIT} lines: split them"
