"""TensorFlow-using processes run as published: Keras whole, and the interpreter's normal exit.

Both checks run in fresh interpreters, since the test process has long imported everything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_features import make_project

from covid_xray.config import Paths

REPO_ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path = REPO_ROOT,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = dict(os.environ if env is None else env)
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=300, check=False, env=environment)


def test_keras_is_imported_whole_with_its_optional_integrations() -> None:
    # Keras's scikit-learn wrappers subclass sklearn's BaseEstimator only when Keras could import
    # scikit-learn: nothing may hide installed packages from it.
    code = ("import stages.train\n"
            "from covid_xray.tf_runtime import keras\n"
            "import sklearn.base\n"
            "print(issubclass(keras.wrappers.SKLearnClassifier, sklearn.base.BaseEstimator))\n")
    out = _python(code)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True"


@pytest.mark.parametrize("value", ["0", None])
def test_tensorflow_log_level_defaults_to_quiet_but_the_user_wins(value: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    if value is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = value
    out = _python("import os\nfrom covid_xray.tf_runtime import tf\n"
                  "print(os.environ['TF_CPP_MIN_LOG_LEVEL'])\n", env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == (value or "2")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Paths]:
    root = tmp_path_factory.mktemp("teardown")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("COVID_XRAY_ROOT", raising=False)
        yield make_project(root, n_train=10, n_heldout=2, n_external=2)


@pytest.mark.parametrize("stage", ["featurize", "train covid_normal"])
def test_tensorflow_stages_end_with_the_normal_interpreter_shutdown(project: Paths,
                                                                   stage: str) -> None:
    """A stage that returned ran every atexit handler (libraries flush and close files there)."""
    module, *args = stage.split()
    code = ("import atexit, runpy, sys\n"
            "atexit.register(lambda: print('atexit handlers ran', flush=True))\n"
            f"sys.argv = [{module!r}, *{args!r}]\n"
            f"runpy.run_module('stages.{module}', run_name='__main__')\n")
    out = _python(code, cwd=project.root)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[-1] == "atexit handlers ran"
