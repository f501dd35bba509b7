"""The project's own import graph, read statically with ``ast`` (nothing is imported).

Used by test_dvc_deps.py (each stage's code dependencies) and test_import_graph.py (no cycles).
An import counts wherever it is written, also inside a function (a lazy import still runs when
that code runs), except under ``if TYPE_CHECKING:`` (never runs). Only modules of the project's
packages count; importing ``a.b.c`` also runs ``a/__init__.py`` and ``a/b/__init__.py``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGES: tuple[str, ...] = ("covid_xray", "stages")


def module_file(root: Path, name: str) -> Path | None:
    """The file of project module ``name`` (a package's ``__init__.py``), or None if not ours."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)  # the body only runs under a type checker
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def imports_of(root: Path, path: Path) -> set[str]:
    """Project modules that ``path`` imports directly (lazy imports in functions included)."""
    this = module_name(root, path).split(".")
    package = this if path.name == "__init__.py" else this[:-1]
    found: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:  # relative: from . import x, from ..a import b
                parts = package[:len(package) - node.level + 1]
                base = ".".join([*parts, node.module] if node.module else parts)
            else:
                base = node.module or ""
            # `from pkg import name`: name may be a submodule (then it is imported) or an attribute
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        found.update(t for t in targets if module_file(root, t) is not None)
    return found


def _with_packages(root: Path, name: str) -> list[Path]:
    """The files that ``import name`` runs: every enclosing package's __init__.py, then it."""
    parts = name.split(".")
    files = (module_file(root, ".".join(parts[:i])) for i in range(1, len(parts) + 1))
    return [f for f in files if f is not None]


def closure(root: Path, module: str) -> set[Path]:
    """Every project file that runs when ``python -m <module>`` runs (transitive imports)."""
    seen: set[Path] = set()
    todo = _with_packages(root, module)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imports_of(root, path):
            todo.extend(_with_packages(root, name))
    return seen


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> project modules it imports, for every module of the project's packages."""
    return {module_name(root, path): imports_of(root, path)
            for package in PACKAGES for path in sorted((root / package).rglob("*.py"))}
