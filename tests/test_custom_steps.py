"""What a custom `train_step` records: some variables only, clipping by the optimizer that
applies the gradients, and several updates of one variable in one step (a critic loop).

Each recorded step is checked against a plain gradient loop (tf.GradientTape,
torch.autograd) over the same batches from the same weights, or against NumPy written
out by hand.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
from models import data
from reference import BACKEND, grads_of, mse, no_grad

import gradwatch


def _skip_stateful_steps_on_jax():
    if BACKEND == "jax":
        pytest.skip("a stateful custom train_step does not run on JAX")


class HeadOnly(keras.Model):
    """Fine-tunes the head alone: the step applies the gradients of `out` only."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(3, activation="tanh", name="hidden")
        self.out = keras.layers.Dense(1, name="out")

    def call(self, x):
        return self.out(self.hidden(x))

    def train_step(self, data):
        x, y = data
        head = self.out.trainable_weights
        loss, grads = grads_of(lambda: mse(y, self(x, training=True)), head)
        with no_grad():
            self.optimizer.apply(grads, head)
        return {"loss": loss}


def test_variables_a_custom_step_does_not_record_are_nan_not_disconnected():
    _skip_stateful_steps_on_jax()
    x, y = data(n=16, features=2, outputs=1)
    model = HeadOnly(name="net")
    model(x[:1])
    k1, b1, k2, b2 = (w.astype(np.float64) for w in model.get_weights())
    model.compile(keras.optimizers.SGD(0.1))
    watch = gradwatch.GradWatch(values="*")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, callbacks=[watch], verbose=0)
    assert not [w for w in caught if issubclass(w.category, UserWarning)]  # nothing is wrong
    log = watch.log
    assert log.disconnected == []
    assert log.variables == [
        "net/hidden/kernel",
        "net/hidden/bias",
        "net/out/kernel",
        "net/out/bias",
    ]
    norms = log.stat("norm")
    assert norms[["net/hidden/kernel", "net/hidden/bias"]].isna().all().all()
    assert np.isnan(log.gradient("hidden/kernel", 1)).all()
    for step in range(2):
        xb, yb = x[8 * step : 8 * step + 8], y[8 * step : 8 * step + 8]
        h = np.tanh(xb @ k1 + b1)
        d_out = -2.0 * (yb - (h @ k2 + b2)) / len(xb)
        grads = [h.T @ d_out, d_out.sum(axis=0)]
        for key, g in zip(["out/kernel", "out/bias"], grads, strict=True):
            np.testing.assert_allclose(log.gradient(key, step), g, rtol=1e-5, atol=1e-7)
            assert norms.loc[step, f"net/{key}"] == pytest.approx(np.linalg.norm(g), rel=1e-5)
        k2, b2 = k2 - 0.1 * grads[0], b2 - 0.1 * grads[1]
