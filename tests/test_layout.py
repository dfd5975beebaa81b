"""The package's floor plan (issue 15): pod, proxy and mock never import each other, and no module import circles.

Read from the source with ``ast`` (imports inside functions count too: a lazy import is still an arrow).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llmpod"
PRODUCTS = ("pod", "proxy", "mock")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("llmpod"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llmpod") and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from llmpod.pod import cli`
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {
        name: {target for target in imports_of(path) if target in modules and target != name}
        for name, path in modules.items()
    }


def product(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in PRODUCTS else None


def shared(module: str) -> bool:
    """A top-level module of llmpod (errors, sse_response, ...), not one of the three packages."""
    parts = module.split(".")
    return len(parts) == 2 and parts[1] not in PRODUCTS


def test_the_three_packages_do_not_import_each_other() -> None:
    crossing = sorted(
        f"{source} -> {target}"
        for source, targets in graph().items()
        for target in targets
        if product(source) and product(target) and product(source) != product(target)
    )
    assert crossing == []


def test_shared_modules_import_none_of_the_three_packages() -> None:
    upward = sorted(
        f"{source} -> {target}"
        for source, targets in graph().items()
        for target in targets
        if shared(source) and product(target) is not None
    )
    assert upward == []


def test_no_import_circle() -> None:
    edges = graph()
    # a package's __init__ re-exporting its own modules is not a circle through them: leave __init__ -> child out
    edges = {source: {t for t in targets if not t.startswith(source + ".")} for source, targets in edges.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                pytest.fail("import circle: " + " -> ".join([*stack[stack.index(target) :], target]))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start)


def test_no_module_is_over_400_lines() -> None:
    long = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}
