"""The package's import graph has no cycles (lazy imports included: they only hide a cycle)."""

from __future__ import annotations

import graphlib
from pathlib import Path

from import_graph import closure, import_graph, imports_of


def test_no_import_cycles(repo_root: Path) -> None:
    graph = import_graph(repo_root)
    assert "covid_xray.params" in graph and "stages.train" in graph
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        raise AssertionError(
            f"import cycle {' -> '.join(reversed(exc.args[1]))}: move what both sides need into "
            "a module that imports neither (shared exceptions live in covid_xray/errors.py)"
        ) from None


def test_walker_sees_lazy_relative_and_submodule_imports_not_type_checking_ones(
        tmp_path: Path) -> None:
    package = tmp_path / "covid_xray"
    (package / "sub").mkdir(parents=True)
    for name in ("__init__", "a", "b", "c", "d", "e", "sub/__init__", "sub/f"):
        (package / f"{name}.py").write_text("")
    (package / "a.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "import os\n"
        "from covid_xray import b\n"
        "from . import c\n"
        "if TYPE_CHECKING:\n"
        "    from covid_xray.d import Thing\n"
        "def later():\n"
        "    from covid_xray.sub.f import g\n")
    (package / "sub" / "f.py").write_text("from ..e import x\n")
    assert imports_of(tmp_path, package / "a.py") == {
        "covid_xray", "covid_xray.b", "covid_xray.c", "covid_xray.sub.f"}
    assert {p.relative_to(package).as_posix() for p in closure(tmp_path, "covid_xray.a")} == {
        "__init__.py", "a.py", "b.py", "c.py", "sub/__init__.py", "sub/f.py", "e.py"}
