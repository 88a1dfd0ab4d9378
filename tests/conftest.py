"""Shared set-up: quiet TensorFlow, the TensorFlow backend, and seeded runs."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import pytest


@pytest.fixture(autouse=True)
def _fresh_keras():
    # Auto-generated layer names (dense, dense_1, ...) come from a global counter.
    keras.backend.clear_session()
    keras.utils.set_random_seed(1234)


@pytest.fixture(scope="session")
def fitted():
    """One real, seeded fit shared by the read-only log and io tests: (watch, model, x, y)."""
    from models import data, pair

    import gradwatch

    keras.utils.set_random_seed(7)
    x, y = data(n=24)
    model, _ = pair()
    model.compile(keras.optimizers.Adam(0.01), "mse", steps_per_execution=2)
    watch = gradwatch.GradWatch(stats=list(gradwatch.STATS), values="out/*", histogram=True)
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, callbacks=[watch], verbose=0)
    return watch, model, x, y
