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


class RecordsItself(keras.Model):
    """A custom step that records its gradients without `optimizer=`, then applies them
    with its optimizers: the model's own, or a GAN's two (`two=True`)."""

    def __init__(self, two=False, **kwargs):
        super().__init__(**kwargs)
        self.two = two
        self.hidden = keras.layers.Dense(3, activation="tanh", name="hidden")
        self.out = keras.layers.Dense(1, name="out")

    def call(self, x):
        return self.out(self.hidden(x))

    def train_step(self, data):
        x, y = data
        variables = self.trainable_variables
        loss, grads = grads_of(lambda: mse(y, self(x, training=True)), variables)
        gradwatch.record_gradients(self, grads, variables)
        with no_grad():
            if self.two:  # the hidden layer by one optimizer, the head by another
                self.first.apply(grads[:2], variables[:2])
                self.second.apply(grads[2:], variables[2:])
            else:
                self.optimizer.apply(grads, variables)
        return {"loss": loss}


def _clip_reference(model, x, y, clipnorm, steps):
    """The tape gradients of `steps` steps of SGD(0.1, clipnorm) from `model`'s weights,
    on a twin: `(gradients, clipped gradients)` per step, in NumPy."""
    twin = RecordsItself(name=model.name)
    twin(x[:1])
    twin.set_weights(model.get_weights())
    opt = keras.optimizers.SGD(0.1, clipnorm=clipnorm)
    out = []
    for step in range(steps):
        xb, yb = x[8 * step : 8 * step + 8], y[8 * step : 8 * step + 8]
        _, grads = grads_of(lambda xb=xb, yb=yb: mse(yb, twin(xb)), twin.trainable_variables)
        grads = [np.asarray(keras.ops.convert_to_numpy(g), np.float64) for g in grads]
        out.append(grads)
        with no_grad():
            opt.apply(
                [keras.ops.convert_to_tensor(g.astype("float32")) for g in grads],
                twin.trainable_variables,
            )
    return out


def test_clipped_norm_without_optimizer_follows_the_models_own_optimizer():
    _skip_stateful_steps_on_jax()
    x, y = data(n=16, features=2, outputs=1)
    model = RecordsItself(name="net")
    model(x[:1])
    reference = _clip_reference(model, x, y, clipnorm=0.05, steps=2)
    model.compile(keras.optimizers.SGD(0.1, clipnorm=0.05))
    watch = gradwatch.GradWatch(stats=["norm", "clipped_norm"])
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, callbacks=[watch], verbose=0)
    norms, clipped = watch.log.stat("norm"), watch.log.stat("clipped_norm")
    for step, grads in enumerate(reference):
        by_hand = [np.linalg.norm(g) for g in grads]
        # Keras' clipnorm: each gradient scaled by c / max(|g|, c).
        expected = [n * 0.05 / max(n, 0.05) for n in by_hand]
        assert min(by_hand) > 0.05  # every gradient here is clipped
        np.testing.assert_allclose(norms.loc[step].to_numpy(), by_hand, rtol=1e-5)
        np.testing.assert_allclose(clipped.loc[step].to_numpy(), expected, rtol=1e-5)


def test_clipped_norm_without_optimizer_on_a_model_with_several_warns_once():
    _skip_stateful_steps_on_jax()
    x, y = data(n=16, features=2, outputs=1)
    model = RecordsItself(two=True, name="net")
    model(x[:1])
    model.compile()
    model.first = keras.optimizers.SGD(0.1, clipnorm=0.05)
    model.second = keras.optimizers.SGD(0.1, clipnorm=0.05)
    watch = gradwatch.GradWatch(stats=["norm", "clipped_norm"])
    with pytest.warns(UserWarning, match=r"`clipped_norm` of .*equals `norm`.*optimizer=") as w:
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, callbacks=[watch], verbose=0)
    ours = [str(m.message) for m in w if "clipped_norm" in str(m.message)]
    assert len(ours) == 1
    log = watch.log
    assert str(log.variables) in ours[0]
    np.testing.assert_array_equal(log.stat("clipped_norm").to_numpy(), log.stat("norm").to_numpy())
