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


# The core tests (the seed's worked examples, the per-step reference comparison,
# bitwise neutrality, the error cases), run again under each other backend.
CORE = [
    "tests/test_seed.py",
    "tests/test_mixin.py",
    "tests/test_callback.py",
    "tests/test_alarms.py",
]


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
        model.fit(np.ones((8, 3)), np.ones((8, 2)), batch_size=4, callbacks=[watch], verbose=0)
        print(keras.backend.backend(), after_import, "tensorflow" in sys.modules, len(watch.log))
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [backend, "False", "False", "2"]


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_backends_core_suite_passes(backend):
    _needs(backend)
    env = dict(os.environ, KERAS_BACKEND=backend)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CORE],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout.splitlines()[-1]


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"histogram": True}, "histogram=4"),
        ({"stats": ["norm", "cos_prev"]}, "stats='cos_prev'"),
        ({"stats": ["clipped_norm"]}, "stats='clipped_norm'"),
        ({"per_replica": True}, "per_replica=True"),
    ],
)
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_backends_refuse_what_they_do_not_record_yet(backend, kwargs, named):
    _needs(backend)
    result = _run(
        backend,
        f"""
        import keras
        import numpy as np
        import gradwatch

        model = gradwatch.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile("sgd", "mse")
        watch = gradwatch.GradWatch(**{kwargs!r})
        try:
            model.fit(np.ones((8, 3)), np.ones((8, 2)), callbacks=[watch], verbose=0)
        except NotImplementedError as e:
            print(e)
        print("recorded", len(watch.log))
        """,
    )
    assert result.returncode == 0, result.stderr
    assert f"does not yet record {named} on the {backend} backend" in result.stdout
    assert "recorded 0" in result.stdout
