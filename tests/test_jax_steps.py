"""The three custom-step patterns of Keras' "custom train step in JAX" guide, recorded.

Each pattern is the guide's code, changed only by the one line that records a stateless
step (`gradwatch.record_gradients` before `stateless_apply`): it trains, evaluates and
records, bitwise as without the watch, on a plain `keras.Model` subclass (which
`GradWatch` adopts) and on one of `gradwatch.Model`. gradwatch's state stays out of
`model.metrics`, which these steps iterate, slice or override.
"""

import keras
import numpy as np
import pytest

import gradwatch

pytestmark = [
    # Run under JAX by tests/test_backends.py.
    pytest.mark.backends,
    pytest.mark.skipif(keras.backend.backend() != "jax", reason="stateless train steps are JAX's"),
]

BASES = {"plain": keras.Model, "mixin": gradwatch.Model}
N, FEATURES, BATCH, EPOCHS = 48, 6, 16, 2


def _data():
    rng = np.random.default_rng(0)
    x = rng.random((N, FEATURES)).astype("float32")
    y = rng.random((N, 1)).astype("float32")
    return x, y


def _pattern_a(base):
    """The guide's first example: `self.metrics` iterated in `train_step`."""
    import jax

    class CustomModel(base):
        def compute_loss_and_updates(
            self, trainable_variables, non_trainable_variables, x, y, training=False
        ):
            y_pred, non_trainable_variables = self.stateless_call(
                trainable_variables, non_trainable_variables, x, training=training
            )
            loss = self.compute_loss(x, y, y_pred)
            return loss, (y_pred, non_trainable_variables)

        def train_step(self, state, data):
            (
                trainable_variables,
                non_trainable_variables,
                optimizer_variables,
                metrics_variables,
            ) = state
            x, y = data
            grad_fn = jax.value_and_grad(self.compute_loss_and_updates, has_aux=True)
            (loss, (y_pred, non_trainable_variables)), grads = grad_fn(
                trainable_variables, non_trainable_variables, x, y, training=True
            )
            gradwatch.record_gradients(self, grads, self.trainable_variables, self.optimizer)
            (trainable_variables, optimizer_variables) = self.optimizer.stateless_apply(
                optimizer_variables, grads, trainable_variables
            )
            new_metrics_vars = []
            logs = {}
            for metric in self.metrics:
                start = len(new_metrics_vars)
                this_metric_vars = metrics_variables[start : start + len(metric.variables)]
                if metric.name == "loss":
                    this_metric_vars = metric.stateless_update_state(this_metric_vars, loss)
                else:
                    this_metric_vars = metric.stateless_update_state(this_metric_vars, y, y_pred)
                logs[metric.name] = metric.stateless_result(this_metric_vars)
                new_metrics_vars += this_metric_vars
            state = (
                trainable_variables,
                non_trainable_variables,
                optimizer_variables,
                new_metrics_vars,
            )
            return logs, state

    return CustomModel, {"optimizer": "adam", "loss": "mse", "metrics": ["mae"]}


def _pattern_b(base):
    """The guide's lower-level example: its own metrics, sliced, and a `metrics` property."""
    import jax

    class CustomModel(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.loss_tracker = keras.metrics.Mean(name="loss")
            self.mae_metric = keras.metrics.MeanAbsoluteError(name="mae")
            self.loss_fn = keras.losses.MeanSquaredError()

        def compute_loss_and_updates(
            self, trainable_variables, non_trainable_variables, x, y, training=False
        ):
            y_pred, non_trainable_variables = self.stateless_call(
                trainable_variables, non_trainable_variables, x, training=training
            )
            loss = self.loss_fn(y, y_pred)
            return loss, (y_pred, non_trainable_variables)

        def train_step(self, state, data):
            (
                trainable_variables,
                non_trainable_variables,
                optimizer_variables,
                metrics_variables,
            ) = state
            x, y = data
            grad_fn = jax.value_and_grad(self.compute_loss_and_updates, has_aux=True)
            (loss, (y_pred, non_trainable_variables)), grads = grad_fn(
                trainable_variables, non_trainable_variables, x, y, training=True
            )
            gradwatch.record_gradients(self, grads, self.trainable_variables, self.optimizer)
            (trainable_variables, optimizer_variables) = self.optimizer.stateless_apply(
                optimizer_variables, grads, trainable_variables
            )
            loss_tracker_vars = metrics_variables[: len(self.loss_tracker.variables)]
            mae_metric_vars = metrics_variables[len(self.loss_tracker.variables) :]
            loss_tracker_vars = self.loss_tracker.stateless_update_state(loss_tracker_vars, loss)
            mae_metric_vars = self.mae_metric.stateless_update_state(mae_metric_vars, y, y_pred)
            logs = {}
            logs[self.loss_tracker.name] = self.loss_tracker.stateless_result(loss_tracker_vars)
            logs[self.mae_metric.name] = self.mae_metric.stateless_result(mae_metric_vars)
            new_metric_vars = loss_tracker_vars + mae_metric_vars
            state = (
                trainable_variables,
                non_trainable_variables,
                optimizer_variables,
                new_metric_vars,
            )
            return logs, state

        @property
        def metrics(self):
            return [self.loss_tracker, self.mae_metric]

    return CustomModel, {"optimizer": "adam"}


def _pattern_c(base):
    """The guide's evaluation example: a custom `test_step` that iterates `self.metrics`
    (training runs the stock step)."""

    class CustomModel(base):
        def test_step(self, state, data):
            x, y = data
            (trainable_variables, non_trainable_variables, metrics_variables) = state
            y_pred, non_trainable_variables = self.stateless_call(
                trainable_variables, non_trainable_variables, x, training=False
            )
            loss = self.compute_loss(x, y, y_pred)
            new_metrics_vars = []
            logs = {}
            for metric in self.metrics:
                start = len(new_metrics_vars)
                this_metric_vars = metrics_variables[start : start + len(metric.variables)]
                if metric.name == "loss":
                    this_metric_vars = metric.stateless_update_state(this_metric_vars, loss)
                else:
                    this_metric_vars = metric.stateless_update_state(this_metric_vars, y, y_pred)
                logs[metric.name] = metric.stateless_result(this_metric_vars)
                new_metrics_vars += this_metric_vars
            state = (trainable_variables, non_trainable_variables, new_metrics_vars)
            return logs, state

    return CustomModel, {"optimizer": "adam", "loss": "mae", "metrics": ["mae"]}


PATTERNS = {"A": _pattern_a, "B": _pattern_b, "C": _pattern_c}


def _run(pattern, base, watch):
    """Builds the guide's model (same seed, same weights), fits it, and evaluates it."""
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(3)
    cls, compile_args = PATTERNS[pattern](BASES[base])
    inputs = keras.Input(shape=(FEATURES,))
    outputs = keras.layers.Dense(1)(inputs)
    model = cls(inputs, outputs)
    model.compile(**compile_args)
    x, y = _data()
    weights = [np.array(w) for w in model.get_weights()]
    callbacks = [] if watch is None else [watch]
    # A and B override `compute_loss_and_updates` with a signature of their own, which
    # Keras' stock `test_step` cannot call: as in the guide, only C evaluates (also
    # during fit, for validation).
    evaluates = pattern == "C"
    history = model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=EPOCHS,
        shuffle=False,
        validation_data=(x[:BATCH], y[:BATCH]) if evaluates else None,
        callbacks=callbacks,
        verbose=0,
    )
    evaluated = (
        model.evaluate(x, y, batch_size=BATCH, verbose=0, return_dict=True) if evaluates else None
    )
    return model, weights, history.history, evaluated


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_jax_guide_pattern_trains_evaluates_and_records(pattern, base):
    plain, weights0, history0, evaluated0 = _run(pattern, base, None)
    watch = gradwatch.GradWatch(values="*")
    model, weights, history, evaluated = _run(pattern, base, watch)
    # Training and evaluation are those of the same model without the watch, bitwise.
    np.testing.assert_array_equal(weights0[0], weights[0])
    for a, b in zip(plain.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert history == history0
    assert evaluated == evaluated0
    # Every step is recorded, and step 0's gradients are those of the loss at the
    # starting weights, by hand: r = x @ w + b - y; for mse dL/dw = 2/B x^T r,
    # dL/db = 2/B sum r; for mae, sign(r) / B in place of 2 r / B.
    log = watch.log
    np.testing.assert_array_equal(log.steps, np.arange(EPOCHS * N // BATCH))
    x, y = _data()
    xb, yb = x[:BATCH].astype(np.float64), y[:BATCH].astype(np.float64)
    w, b = (a.astype(np.float64) for a in weights)
    r = xb @ w + b - yb
    dr = np.sign(r) / BATCH if pattern == "C" else 2.0 * r / BATCH
    kernel, bias = (log.key(v.path) for v in model.trainable_weights)
    np.testing.assert_allclose(log.gradient(kernel, step=0), xb.T @ dr, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(log.gradient(bias, step=0), dr.sum(0), rtol=1e-5, atol=1e-7)
    norms = log.stat("norm")
    assert np.isfinite(norms.to_numpy()).all()
    # gradwatch's state is not among what users iterate.
    assert [m.name for m in model.metrics] == [m.name for m in plain.metrics]
    assert not any(m.name.startswith("gradwatch") for m in model.metrics)


def test_jax_guide_custom_test_step_evaluates_after_fit_without_a_watch():
    # The mixin counts steps also without a GradWatch; its counter must not reach
    # a custom `test_step` that iterates `self.metrics`.
    keras.utils.set_random_seed(3)
    cls, compile_args = _pattern_c(gradwatch.Model)
    inputs = keras.Input(shape=(FEATURES,))
    model = cls(inputs, keras.layers.Dense(1)(inputs))
    model.compile(**compile_args)
    x, y = _data()
    model.fit(x, y, batch_size=BATCH, verbose=0)
    first = model.evaluate(x, y, batch_size=BATCH, verbose=0, return_dict=True)
    assert set(first) == {"loss", "mae"}
    # The step count goes on across the evaluation.
    watch = gradwatch.GradWatch(stats="norm")
    model.fit(x, y, batch_size=BATCH, callbacks=[watch], verbose=0)
    np.testing.assert_array_equal(watch.log.steps, np.arange(N // BATCH, 2 * N // BATCH))
