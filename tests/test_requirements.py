"""Every third-party package the code imports is pinned, and every pin is used (or says why not).

A package imported only because another one pulls it in works until that other one changes its
own requirements; a pin nothing imports is dead weight that still constrains installs.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCAL = {"covid_xray", "stages", *(p.stem for p in (REPO_ROOT / "tests").glob("*.py")),
         *(p.stem for p in (REPO_ROOT / "benchmarks").glob("*.py"))}
"""The project's own modules (tests and benchmarks import their helper modules by name)."""

EXTRAS = ("requirements-ray.txt", "requirements-s3.txt", "requirements-gpu.txt")
"""Optional extras (pyproject ``[ray]``, ``[s3]``, ``[gpu]``): the package may import them only
where the feature that needs them is used (a missing one is a one-line error there)."""

NOT_IMPORTED = {
    "requirements-s3.txt": {"dvc-s3": "a DVC plugin: DVC loads it for s3:// remotes"},
    "requirements-gpu.txt": {
        "tensorflow": "the CUDA build of the `tensorflow` module requirements.txt pins for CPU"},
    "requirements.txt": {
        "dvc": "the pipeline runner, used as a command (`dvc repro`)",
        "ruamel-yaml-clib": "DVC's C YAML loader (speed only)",
    },
    "requirements-dev.txt": {
        "pytest-timeout": "a pytest plugin, loaded by pytest (the `timeout` ini option)",
        "ruff": "the linter, run as a command",
    },
}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(file: str) -> set[str]:
    """Distribution names of a requirements file (``name[extras]==version  # comment``)."""
    names = set()
    for line in (REPO_ROOT / file).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
            assert match and "==" in line, f"{file}: {line!r} is not pinned with =="
            names.add(_normalise(match.group(0)))
    return names


def _dynamic_import(node: ast.AST) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) in
            ("importorskip", "import_module")
            and bool(node.args) and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str))


def imported_modules(folders: list[str]) -> dict[str, str]:
    """Top-level third-party modules imported anywhere in ``folders`` -> one file importing it."""
    found: dict[str, str] = {}
    for folder in folders:
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                elif _dynamic_import(node):  # pytest.importorskip("x"), import_module("x")
                    names = [node.args[0].value]  # type: ignore[attr-defined]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in LOCAL or top.startswith("test_"):
                        continue
                    found.setdefault(top, str(path.relative_to(REPO_ROOT)))
    return found


def distributions_of(modules: dict[str, str]) -> dict[str, str]:
    owners = packages_distributions()
    result = {}
    for module, where in modules.items():
        assert module in owners, f"{module} (imported in {where}) is not installed"
        for dist in owners[module]:
            result[_normalise(dist)] = f"{module} in {where}"
    return result


def test_the_package_and_stages_import_only_pinned_packages() -> None:
    used = distributions_of(imported_modules(["covid_xray", "stages"]))
    declared = pinned("requirements.txt").union(*(pinned(extra) for extra in EXTRAS))
    missing = {dist: why for dist, why in used.items() if dist not in declared}
    assert missing == {}, "imported but not in requirements.txt (or an extra)"


def test_tests_and_benchmarks_import_only_pinned_packages() -> None:
    used = distributions_of(imported_modules(["tests", "benchmarks"]))
    declared = pinned("requirements.txt") | pinned("requirements-dev.txt") | pinned(
        "requirements-ray.txt")  # the dev extra includes ray (the two-node cluster test)
    assert {dist: why for dist, why in used.items() if dist not in declared} == {}


def test_every_pin_is_imported_or_says_why_not() -> None:
    runtime = distributions_of(imported_modules(["covid_xray", "stages"]))
    dev = distributions_of(imported_modules(["tests", "benchmarks"]))
    for file, used in (("requirements.txt", runtime), ("requirements-dev.txt", dev),
                       *((extra, runtime) for extra in EXTRAS)):
        unused = pinned(file) - set(used) - set(NOT_IMPORTED.get(file, {}))
        assert unused == set(), f"{file}: pinned but never imported"
