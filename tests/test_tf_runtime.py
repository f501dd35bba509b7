"""The per-process TensorFlow costs a train stage avoids: Keras's optional imports and teardown.

Both matter for the head-only experiment budget (README, Performance); both run in fresh
interpreters here, since the test process has long imported everything.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=300, check=False)


def test_train_stage_imports_keras_without_sklearn_and_matplotlib() -> None:
    code = ("import sys, stages.train, dvclive, dvclive.keras\n"
            "from covid_xray.tf_runtime import KERAS_OPTIONAL_IMPORTS, keras\n"
            "print(sorted(m for m in KERAS_OPTIONAL_IMPORTS if m in sys.modules))\n"
            "import sklearn.metrics, matplotlib.pyplot\n"  # still importable afterwards
            "print(keras.layers.Dense(3).units, sklearn.metrics.__name__)\n")
    out = _python(code)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["[]", "3", "sklearn.metrics"]


def test_already_imported_optional_packages_are_left_alone() -> None:
    code = ("import sys, sklearn, matplotlib\n"
            "before = sys.modules['sklearn']\n"
            "from covid_xray.tf_runtime import keras\n"
            "print(sys.modules['sklearn'] is before)\n")
    out = _python(code)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True"


def _stage_script(body: str) -> str:
    return ("import logging, sys\n"
            "from pathlib import Path\n"
            "from covid_xray.io import PipelineError, run_stage\n"
            "def main():\n"
            f"{body}"
            "run_stage(main, skip_teardown=True)\n"
            "raise SystemExit(3)  # never reached after a successful main()\n")


def test_skipping_teardown_still_flushes_output_and_exits_zero(tmp_path: Path) -> None:
    marker = tmp_path / "done.txt"
    body = ("    logging.getLogger('covid_xray.demo').info('stage did its work')\n"
            "    sys.stdout.write('unterminated stdout line')\n"  # still in the buffer at exit
            f"    Path({str(marker)!r}).write_text('ok')\n")
    out = _python(_stage_script(body))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == "unterminated stdout line"
    assert "covid_xray.demo: stage did its work" in out.stderr
    assert marker.read_text() == "ok"


def test_skipping_teardown_keeps_the_error_exit(tmp_path: Path) -> None:
    body = "    raise PipelineError('train.dropout: 1.5 is not in [0, 1)')\n"
    out = _python(_stage_script(body))
    assert out.returncode == 1
    assert "error: train.dropout: 1.5 is not in [0, 1)" in out.stderr
