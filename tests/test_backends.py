"""gradwatch on Keras' JAX and PyTorch backends, each run in a fresh interpreter."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_PACKAGES = {"jax": "jax", "torch": "torch"}


def _needs(backend: str) -> None:
    if importlib.util.find_spec(_PACKAGES[backend]) is None:
        pytest.skip(
            f"the {backend} backend is not installed; "
            f"install it with pip install 'gradwatch[{backend}]'"
        )


def _run(backend: str, code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=str(ROOT))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_backends_import_and_fit_never_import_tensorflow(backend):
    _needs(backend)
    result = _run(
        backend,
        """
        import sys
        import keras
        import numpy as np
        import gradwatch

        after_import = "tensorflow" in sys.modules
        watch = gradwatch.GradWatch()
        model = gradwatch.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile("sgd", "mse")
        model.fit(np.ones((8, 3)), np.ones((8, 2)), batch_size=4, verbose=0)
        print(keras.backend.backend(), after_import, "tensorflow" in sys.modules)
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [backend, "False", "False"]
