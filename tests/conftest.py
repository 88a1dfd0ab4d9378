"""Shared set-up: quiet TensorFlow, the TensorFlow backend, and seeded runs."""

import os
import random
import shutil
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np
import pytest

# Keras (and with it TensorFlow, ten CPU-seconds to import) is imported by the test files
# that use it, not here: pytest-xdist's controller and the pytest runs that
# tests/test_background.py starts collect only tests/test_backends.py, which needs neither.


def pytest_collection_modifyitems(config, items):
    """Runs tests/test_backends.py last: its long runs (other backends, each in its own
    interpreter) then overlap the other tests, using the CPU that they leave idle."""
    backends = [item for item in items if item.path.name == "test_backends.py"]
    items[:] = [item for item in items if item.path.name != "test_backends.py"] + backends


def pytest_collection_finish(session):
    """Starts the long runs that the selected tests wait for, once `-k`, `-m` and the
    rest have deselected what they deselect; none for `--collect-only`. Under pytest-xdist
    the controller starts them instead (`pytest_xdist_node_collection_finished`)."""
    if session.config.option.collectonly or hasattr(session.config, "workerinput"):
        return
    backends = [item for item in session.items if item.path.name == "test_backends.py"]
    if backends:
        backends[0].module.start_in_background([item.name for item in backends])


def _distributing(config) -> bool:
    """Whether this process is pytest-xdist's controller of workers (`-n 2`)."""
    return bool(getattr(config.option, "numprocesses", 0)) and not hasattr(config, "workerinput")


def pytest_configure(config):
    import background

    if _distributing(config):
        # The long runs' results, published by the controller, read by the workers' tests.
        config._gradwatch_runs = tempfile.mkdtemp(prefix="gradwatch-runs-")
    elif hasattr(config, "workerinput"):
        background.SHARED = config.workerinput.get("gradwatch_runs")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    node.workerinput["gradwatch_runs"] = node.config._gradwatch_runs


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    """Under pytest-xdist: the controller starts the long runs once, as soon as the first
    worker has collected (and deselected), so that they overlap the workers' tests; each
    run's end is published to a file that the test waiting for it reads, in its worker."""
    config = node.config
    if getattr(config, "_gradwatch_started", False) or config.option.collectonly:
        return
    config._gradwatch_started = True
    names = [i.split("::", 1)[1] for i in ids if i.startswith("tests/test_backends.py::")]
    if names:
        import test_backends

        test_backends.start_in_background(names, publish_to=config._gradwatch_runs)


def pytest_sessionfinish(session, exitstatus):
    # However the session ends (`-x`, Ctrl-C, an error): no run outlives it.
    from background import RUNS

    RUNS.stop_all()
    shared = getattr(session.config, "_gradwatch_runs", None)
    if shared is not None:
        shutil.rmtree(shared, ignore_errors=True)


@pytest.fixture(autouse=True)
def _fresh_keras():
    # Auto-generated layer names (dense, dense_1, ...) come from a global counter. Without
    # its `gc.collect()` (a quarter of the suite's time): Python's own collector frees the
    # models of earlier tests, and no test depends on when.
    keras = sys.modules.get("keras")
    if keras is None:  # no test of this process has imported Keras: seed what there is
        random.seed(1234)
        np.random.seed(1234)
        return
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(1234)


@pytest.fixture(scope="session")
def fitted():
    """One real, seeded fit shared by the read-only log and io tests: (watch, model, x, y)."""
    import keras
    from models import data, pair

    import gradwatch

    keras.utils.set_random_seed(7)
    x, y = data(n=24)
    model, _ = pair()
    model.compile(keras.optimizers.Adam(0.01), "mse", steps_per_execution=2)
    watch = gradwatch.GradWatch(stats=list(gradwatch.STATS), values="out/*", histogram=True)
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, callbacks=[watch], verbose=0)
    return watch, model, x, y


@pytest.fixture(scope="session")
def outlier():
    """A real, seeded fit whose step 3 (batch 3 of epoch 0) has non-finite gradients.

    Batch 3 has outlier targets, so under a loss scale of 2**120 its scaled
    gradients overflow to Inf; the LossScaleOptimizer skips that update and
    halves the scale, and training goes on. Steps 0-5 are epoch 0, 6-11 epoch 1,
    and the outlier batch comes round again at step 9. Returns the `GradWatch`.
    """
    import keras
    from models import data, pair

    import gradwatch

    keras.utils.set_random_seed(7)
    x, y = data(n=48)
    y[3 * 8 : 4 * 8] *= 1e4
    model, _ = pair(regularize=False)
    optimizer = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.05), initial_scale=2.0**120
    )
    model.compile(optimizer, "mse")
    watch = gradwatch.GradWatch(histogram=True, on_nonfinite="ignore")
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, callbacks=[watch], verbose=0)
    return watch
