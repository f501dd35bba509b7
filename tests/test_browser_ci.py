"""The browser test cannot vanish quietly in CI: without Chromium it fails under ``CI=true``.

Runs pytest on ``tests/test_browser.py`` in a subprocess with Chromium pointed at a missing path;
cheap, since the module stops at collection before building models or starting a browser.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


def run_browser_test(repo_root: Path, tmp_path: Path,
                     ci: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["COVID_XRAY_CHROMIUM"] = str(tmp_path / "no-chromium-here")
    if ci is not None:
        env["CI"] = ci
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
               f"--basetemp={tmp_path / 'basetemp'}", "tests/test_browser.py"]
    return subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


def test_missing_chromium_fails_under_ci(repo_root: Path, tmp_path: Path) -> None:
    done = run_browser_test(repo_root, tmp_path, ci="true")
    output = done.stdout + done.stderr
    assert done.returncode not in (0, 5), output
    assert "no-chromium-here" in output and "CI=true" in output, output
    assert "1 error" in output and not re.search(r"\d+ (passed|skipped)", output), output


def test_missing_chromium_skips_with_the_reason_outside_ci(repo_root: Path,
                                                           tmp_path: Path) -> None:
    done = run_browser_test(repo_root, tmp_path, ci=None)
    output = done.stdout + done.stderr
    assert done.returncode in (0, 5) and "1 skipped" in output, output  # 5: nothing ran
    assert "Chromium not found" in output and "no-chromium-here" in output, output
