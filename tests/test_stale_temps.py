"""Temporaries of a stage killed mid-write: ignored by git and DVC, removed by the next run.

Each temporary's name carries its writer's pid; only those whose writer is gone are removed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pipeline_helpers import git_env, make_repo_copy, run

from covid_xray.io import atomic_dir, atomic_path, remove_stale_temps


def _exited_pid() -> int:
    """The pid of a process that has finished (as a killed stage's is)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _leave_temp(folder: Path, target: str, pid: int, is_dir: bool = True) -> Path:
    temp = folder / f".{target}.tmp-{pid}-abcd1234"
    if is_dir:
        (temp / "inner").mkdir(parents=True)
        (temp / "inner" / "features.npy").write_bytes(b"x" * 1000)
    else:
        temp.write_bytes(b"half a file")
    return temp


def test_the_next_write_removes_temporaries_of_a_dead_writer(tmp_path: Path) -> None:
    dead = _exited_pid()
    stale_dir = _leave_temp(tmp_path, "features", dead)
    stale_file = _leave_temp(tmp_path, "metrics.json", dead, is_dir=False)
    other_target = _leave_temp(tmp_path, "datasets", dead)
    with atomic_dir(tmp_path / "features") as folder:
        (folder / "ok.txt").write_text("new")
    assert not stale_dir.exists()
    assert other_target.exists()  # another stage's output: left to that stage's next run
    with atomic_path(tmp_path / "metrics.json") as tmp:
        tmp.write_text("{}")
    assert not stale_file.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".datasets.tmp-" + f"{dead}-abcd1234", "features", "metrics.json"]


def test_a_running_writers_temporary_is_kept(tmp_path: Path) -> None:
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)  # the temporary is written after its writer started
        live = _leave_temp(tmp_path, "features", writer.pid)
        assert remove_stale_temps(tmp_path / "features") == []
        assert live.exists()
        # The same pid, but its process started after the temporary was last written: a reused
        # pid, not the writer.
        an_hour_ago = time.time() - 3600
        os.utime(live, (an_hour_ago, an_hour_ago))
        assert remove_stale_temps(tmp_path / "features") == [live]
        assert not live.exists()
    finally:
        writer.kill()
        writer.wait()


def test_this_process_keeps_its_open_temporaries(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    leaked = _leave_temp(tmp_path, "features", os.getpid())  # an earlier process with our pid
    with atomic_dir(tmp_path / "features") as folder:
        assert not leaked.exists()
        assert remove_stale_temps(tmp_path / "features") == []
        monkeypatch.chdir(tmp_path)  # the same target, spelt relative
        assert remove_stale_temps(Path("features")) == []
        assert folder.is_dir()
        (folder / "a.txt").write_text("a")
    assert (tmp_path / "features" / "a.txt").read_text() == "a"


def _kill_once_files_are_written(repo: Path) -> bool:
    """Start copy_images, SIGKILL it once its temporary folder holds files; False if it ended
    first."""
    stage = subprocess.Popen([sys.executable, "-m", "stages.copy_images"], cwd=repo,
                             env=git_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while stage.poll() is None:
            if any(f.is_file() for t in (repo / "data").glob(".datasets.*") for f in t.rglob("*")):
                os.kill(stage.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
    finally:
        stage.wait()
    return stage.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_kill_9_during_copy_images_then_the_next_run_cleans_up(repo_root: Path,
                                                               tmp_path: Path) -> None:
    repo = make_repo_copy(repo_root, tmp_path / "repo", {})  # the default demo: ~640 images
    run(["dvc", "repro", "select_metadata"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "first stages"], repo)
    for _attempt in range(5):  # on a busy machine the stage may finish before it is caught
        if _kill_once_files_are_written(repo):
            break
    else:
        pytest.fail("copy_images always finished before it could be killed")
    left = list((repo / "data").glob(".datasets.*"))
    assert len(left) == 1 and left[0].is_dir()
    status = run(["git", "status", "--porcelain", "--untracked-files=all"], repo).stdout
    assert [line for line in status.splitlines() if " data/" in line] == []

    again = run(["dvc", "repro", "copy_images"], repo)
    assert "removed 1 temporary file(s) left by an interrupted run" in again.stderr
    assert list((repo / "data").glob(".datasets.*")) == []
    assert (repo / "data" / "datasets" / "manifest.csv").is_file()
