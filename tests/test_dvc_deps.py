"""dvc.yaml declares exactly the code each stage runs, so a code change re-runs what it affects.

Rule: a stage's code deps (its deps under stages/ and covid_xray/) are every project file that
``python -m stages.<name>`` runs: the stage script, every covid_xray module it imports
transitively (imports inside functions included, ``if TYPE_CHECKING:`` ones not), and the
packages' ``__init__.py``. Every imported module counts, also those that change no number
(logging, TensorFlow set-up): the simplest rule that cannot go stale. Folder deps would be
complete too, but would re-run featurize (the expensive stage) on any code edit.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml
from dvc.repo import Repo
from import_graph import PACKAGES, closure
from pipeline_helpers import make_repo_copy


def stage_code(root: Path) -> dict[str, tuple[str, set[str], set[str]]]:
    """Stage address -> (entry module, declared code deps, files its command runs)."""
    found = {}
    with Repo(str(root)) as repo:
        for stage in repo.index.stages:  # foreach/matrix expanded by DVC itself
            words = shlex.split(stage.cmd)
            assert words[:3] == ["python", "-m", words[2]] and words[2].startswith("stages."), (
                f"dvc.yaml stage `{stage.name}`: cmd {stage.cmd!r} is not "
                "`python -m stages.<name>`; extend tests/test_dvc_deps.py for it")
            module = words[2]
            declared = {d.def_path for d in stage.deps
                        if Path(d.def_path).parts[0] in PACKAGES}
            runs = {p.relative_to(root).as_posix() for p in closure(root, module)}
            found[stage.name] = (module, declared, runs)
    return found


def missing_and_stale(root: Path) -> list[str]:
    problems = []
    for address, (module, declared, runs) in stage_code(root).items():
        add, remove = sorted(runs - declared), sorted(declared - runs)
        if add or remove:
            problems.append(
                f"stage `{address}` (python -m {module}):"
                + (f"\n    add to deps:      {', '.join(add)}" if add else "")
                + (f"\n    remove from deps: {', '.join(remove)}" if remove else ""))
    return problems


def test_each_stage_declares_exactly_the_code_it_runs(repo_root: Path) -> None:
    problems = missing_and_stale(repo_root)
    assert not problems, (
        "dvc.yaml code deps differ from what each stage imports (rule in "
        "tests/test_dvc_deps.py: the stage script, every covid_xray module it imports, lazy "
        "imports included, and the packages' __init__.py). Otherwise `dvc repro` reports "
        "\"up to date\" after a code change. Fix dvc.yaml:\n" + "\n".join(problems))


def test_a_forgotten_dep_and_a_stale_dep_are_both_reported(repo_root: Path,
                                                           tmp_path: Path) -> None:
    repo = make_repo_copy(repo_root, tmp_path / "repo", {})
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())
    deps = dvc_yaml["stages"]["train"]["do"]["deps"]
    deps.remove("covid_xray/splitting.py")
    deps.append("covid_xray/report.py")
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    problems = "\n".join(missing_and_stale(repo))
    for address in ("train@covid_normal", "train@covid_pneumonia"):
        assert (f"stage `{address}` (python -m stages.train):\n"
                "    add to deps:      covid_xray/splitting.py\n"
                "    remove from deps: covid_xray/report.py") in problems
    assert "stage `featurize`" not in problems


@pytest.mark.parametrize("stage", ["featurize", "train@covid_normal"])
def test_the_lazily_imported_and_shared_modules_are_declared(repo_root: Path,
                                                             stage: str) -> None:
    _, declared, _ = stage_code(repo_root)[stage]
    assert {"covid_xray/config.py", "covid_xray/io.py", "covid_xray/params.py",
            "covid_xray/errors.py", "covid_xray/splitting.py"} <= declared
