"""`on_nonfinite="skip"`, `"stop"` and `"raise"` keep a non-finite step's update from the
model; `"warn"` and `"ignore"` apply it.

Each run trains on 5 batches of 8 rows (`shuffle=False`) whose third batch (step 2) has
a NaN target, so that every gradient of step 2 is NaN. The reference is a plain Keras
model from the same weights, trained on the same batches without the bad one (for
"skip") or on the batches before it (for "stop" and "raise"): the weights and the
optimizer's variables must be equal bit for bit, as the watched model runs the same
ops on the same values at every applied step.
"""

from __future__ import annotations

import threading
import time
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import ops
from models import Sequential, data, layers
from reference import BACKEND, grads_of, mse, no_grad, skip_on_jax, skip_unless_supported, spe

import gradwatch
import gradwatch._capture.alarms

# Run again under JAX and PyTorch (tests/test_backends.py).
pytestmark = pytest.mark.backends

BATCH, BAD = 8, 2  # the batch size, and the step whose batch holds a NaN target
ROOT = Path(__file__).resolve().parent.parent


def _bad_data():
    x, y = data(n=40)
    y[BAD * BATCH + 1, 0] = np.nan
    return x, y


def _without(x, y, step):
    keep = np.ones(len(x), bool)
    keep[step * BATCH : (step + 1) * BATCH] = False
    return x[keep], y[keep]


def _optimizer(name):
    return keras.optimizers.SGD(0.1) if name == "sgd" else keras.optimizers.Adam(0.01)


def _pair(optimizer="sgd", steps_per_execution=1, jit_compile=False):
    """The model under test and a plain twin from the same weights, compiled alike."""
    watched = Sequential(layers(), name="net")
    plain = keras.Sequential(layers(), name="net")
    plain.set_weights(watched.get_weights())
    for m in (watched, plain):
        m.compile(
            optimizer=_optimizer(optimizer),
            loss="mse",
            steps_per_execution=steps_per_execution,
            jit_compile=jit_compile,
        )
    return watched, plain


def _numpy(variables):
    return [np.array(ops.convert_to_numpy(v)) for v in variables]


def _assert_same_training(watched, plain):
    for a, b in zip(watched.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(
        _numpy(watched.optimizer.variables), _numpy(plain.optimizer.variables), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def _fit(model, x, y, watch, **kwargs):
    model.fit(
        x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[watch], **kwargs
    )


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_skip_trains_as_a_plain_model_without_the_bad_batch(optimizer):
    x, y = _bad_data()
    watched, plain = _pair(optimizer)
    watch = gradwatch.GradWatch(on_nonfinite="skip", verbose=0)
    with pytest.warns(
        UserWarning,
        match=r"step 2, born in the targets .*, rows \[1\] \(samples \[17\]\): "
        r".*update was skipped.*training goes on",
    ):
        _fit(watched, x, y, watch)
    plain.fit(*_without(x, y, BAD), batch_size=BATCH, shuffle=False, verbose=0)
    # Weights and optimizer state (Adam's moments, `iterations`) as if step 2 never ran.
    _assert_same_training(watched, plain)
    assert int(ops.convert_to_numpy(watched.optimizer.iterations)) == 4
    log = watch.log
    assert log.steps.tolist() == [0, 1, 2, 3, 4]  # the skipped step is recorded
    assert log.skipped_steps.tolist() == [BAD]
    nonfinite = log.stat("nonfinite")
    assert (nonfinite.loc[BAD] > 0).all() and (nonfinite.drop(index=BAD) == 0).all().all()
    assert log.scalars["applied"].tolist() == [True, True, False, True, True]


def test_skip_keeps_the_batch_of_the_first_skipped_step_on_the_host():
    x, y = _bad_data()
    y[4 * BATCH, 1] = np.inf  # a second bad batch, at step 4
    watched, _ = _pair()
    watch = gradwatch.GradWatch(on_nonfinite="skip", verbose=0)
    with pytest.warns(UserWarning, match="Non-finite gradients at step 2"):
        _fit(watched, x, y, watch)
    assert watch.log.skipped_steps.tolist() == [2, 4]
    step, xb, yb, sample_weight = watch.skipped_batch
    assert step == BAD
    np.testing.assert_array_equal(xb, x[16:24])
    np.testing.assert_array_equal(yb, y[16:24])
    assert sample_weight is None


def test_a_healthy_run_skips_nothing_and_trains_bitwise_as_without_gradwatch():
    x, y = data(n=40)
    watched, plain = _pair("adam")
    watch = gradwatch.GradWatch(on_nonfinite="skip", verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no alarm, no other warning of ours
        _fit(watched, x, y, watch)
    plain.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    _assert_same_training(watched, plain)
    assert watch.log.skipped_steps.tolist() == []
    assert watch.skipped_batch is None


@pytest.mark.parametrize("steps_per_execution", [1, 2])
@pytest.mark.parametrize("jit", [False, True], ids=["graph", "jit"])
def test_skip_with_steps_per_execution_and_jit(steps_per_execution, jit):
    n = spe(steps_per_execution)
    skip_unless_supported(n, jit)
    if n != steps_per_execution:
        pytest.skip("the backend runs one step per execution")
    x, y = _bad_data()
    watched, plain = _pair("adam", n, jit)
    watch = gradwatch.GradWatch(on_nonfinite="skip", verbose=0)
    with pytest.warns(UserWarning, match="update was skipped"):
        _fit(watched, x, y, watch)
    plain.fit(*_without(x, y, BAD), batch_size=BATCH, shuffle=False, verbose=0)
    _assert_same_training(watched, plain)
    assert watch.log.skipped_steps.tolist() == [BAD]
    if BACKEND == "tensorflow" and jit:
        assert watch.skipped_batch is None  # no host call from an XLA-compiled step
    else:
        assert watch.skipped_batch[0] == BAD


def test_stop_keeps_the_weights_of_the_last_finite_step(capsys):
    x, y = _bad_data()
    watched, plain = _pair("adam")
    watch = gradwatch.GradWatch(on_nonfinite="stop", verbose=0)
    _fit(watched, x, y, watch)
    assert "update was skipped: the model keeps the weights" in capsys.readouterr().out
    plain.fit(x[: BAD * BATCH], y[: BAD * BATCH], batch_size=BATCH, shuffle=False, verbose=0)
    _assert_same_training(watched, plain)
    log = watch.log
    assert log.steps.tolist() == [0, 1, 2]  # `fit` ends at the step that tripped it
    assert log.skipped_steps.tolist() == [BAD]
    assert watch.skipped_batch[0] == BAD
    # The next `fit` trains again.
    _fit(watched, x[:BATCH], y[:BATCH], watch)
    plain.fit(x[:BATCH], y[:BATCH], batch_size=BATCH, shuffle=False, verbose=0)
    _assert_same_training(watched, plain)


def test_raise_keeps_the_weights_of_the_last_finite_step():
    x, y = _bad_data()
    watched, plain = _pair("adam")
    watch = gradwatch.GradWatch(on_nonfinite="raise", verbose=0)
    with pytest.raises(
        FloatingPointError,
        match=r"step 2, born in the targets .*update was skipped.*`log\.origins`",
    ):
        _fit(watched, x, y, watch)
    plain.fit(x[: BAD * BATCH], y[: BAD * BATCH], batch_size=BATCH, shuffle=False, verbose=0)
    _assert_same_training(watched, plain)
    assert watch.log.skipped_steps.tolist() == [BAD]


@pytest.mark.parametrize("policy", ["stop", "raise"])
def test_stop_and_raise_end_fit_at_the_tripped_step_however_late_callbacks_run(monkeypatch, policy):
    # Keras may run a callback's `on_train_batch_end` on a worker thread while the next
    # step starts. Such a thread made late on purpose: `fit` must still end at step 2.
    poll = gradwatch._capture.alarms.Alarms.poll

    def late(self, model):
        if threading.current_thread() is not threading.main_thread():
            time.sleep(1.0)
        return poll(self, model)

    monkeypatch.setattr(gradwatch._capture.alarms.Alarms, "poll", late)
    x, y = _bad_data()
    watched, _ = _pair()
    watch = gradwatch.GradWatch(on_nonfinite=policy, verbose=0)
    if policy == "raise":
        with pytest.raises(FloatingPointError):
            _fit(watched, x, y, watch)
    else:
        _fit(watched, x, y, watch)
    assert watch.log.steps.tolist() == [0, 1, BAD]
    assert watch.log.skipped_steps.tolist() == [BAD]
    assert int(ops.convert_to_numpy(watched.optimizer.iterations)) == BAD


@pytest.mark.parametrize("policy", ["warn", "ignore"])
def test_warn_and_ignore_apply_the_non_finite_update(policy):
    x, y = _bad_data()
    watched, _ = _pair()
    watch = gradwatch.GradWatch(on_nonfinite=policy, verbose=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(watched, x, y, watch)
    said = [str(w.message) for w in caught if "Non-finite" in str(w.message)]
    if policy == "warn":
        assert len(said) == 1
        assert "update was applied" in said[0]
        assert "on_nonfinite='skip'" in said[0]
        assert "gradwatch.trace_nonfinite(model, x, y)" in said[0]
    else:
        assert said == []
    assert all(np.isnan(w).all() for w in watched.get_weights())
    assert int(ops.convert_to_numpy(watched.optimizer.iterations)) == 5
    assert watch.log.skipped_steps.tolist() == []
    assert watch.skipped_batch is None


class TwoParts(keras.Model):
    """A custom step with two optimizers: `a` learns to output 1 from `x` (its loss never
    sees `y`), `b` fits `y`; the step applies `first` then the other part's optimizer."""

    def __init__(self, first="a", **kwargs):
        super().__init__(**kwargs)
        self.first = first
        self.a = keras.layers.Dense(2, name="a")
        self.b = keras.layers.Dense(2, name="b")

    def call(self, x):
        return self.a(x) + self.b(x)

    def compile(self, opt_a, opt_b, run_eagerly=False):
        super().compile(run_eagerly=run_eagerly)
        self.opt_a, self.opt_b = opt_a, opt_b

    def train_step(self, data):
        x, y = data[0], data[1]  # (train_on_batch hands a sample weight of None too)
        parts = {
            "a": (self.a, self.opt_a, lambda: mse(ops.ones_like(y), self.a(x))),
            "b": (self.b, self.opt_b, lambda: mse(y, self.b(x))),
        }
        order = [self.first, "b" if self.first == "a" else "a"]
        for name in order:
            layer, optimizer, loss_fn = parts[name]
            variables = layer.trainable_weights
            loss, grads = grads_of(loss_fn, variables)
            if isinstance(self, gradwatch.GradWatchMixin):
                self.record_gradients(grads, variables, optimizer)
            with no_grad():
                optimizer.apply(grads, variables)
        return {"loss": loss}


class MixedTwoParts(gradwatch.GradWatchMixin, TwoParts):
    pass


@pytest.mark.parametrize(
    ("first", "eagerly", "watched"),
    [("a", False, "*"), ("b", False, "*"), ("a", True, "*"), ("a", False, "two/b/*")],
    ids=["finite-first", "nan-first", "finite-first-eagerly", "finite-first-unwatched"],
)
@pytest.mark.parametrize("cls", [TwoParts, MixedTwoParts], ids=["plain", "mixin"])
def test_a_custom_step_skips_all_its_updates_together_whichever_applies_first(
    cls, first, eagerly, watched
):
    # Eagerly (PyTorch's way, and `run_eagerly=True`), the snapshots are taken where the
    # earlier steps had a later `apply`: the bad step is not the first. With `a` not
    # watched, its update is not gated, and is put back all the same.
    skip_on_jax("a stateful custom train_step")
    x, y = _bad_data()
    model = cls(first=first, name="two")
    model(x[:1])
    start = model.get_weights()
    model.compile(keras.optimizers.Adam(0.01), keras.optimizers.SGD(0.1), run_eagerly=eagerly)
    watch = gradwatch.GradWatch(variables=watched, on_nonfinite="skip", verbose=0)
    with pytest.warns(UserWarning, match="update was skipped"):
        _fit(model, x, y, watch)
    # The reference: the same step without the watch on every batch but the bad one. At
    # step 2 the NaN is in b's gradient alone; where `a` is applied first, its finite
    # update is put back at the step's end, so both parts skip the step, as where `b`
    # comes first; the other steps train as without gradwatch.
    twin = TwoParts(first=first, name="two")
    twin(x[:1])
    twin.set_weights(start)
    twin.compile(keras.optimizers.Adam(0.01), keras.optimizers.SGD(0.1))
    for step in range(5):
        xb, yb = x[step * BATCH : (step + 1) * BATCH], y[step * BATCH : (step + 1) * BATCH]
        if step != BAD:
            twin.train_on_batch(xb, yb)
    for a, b in zip(model.get_weights(), twin.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    for mine, theirs in ((model.opt_a, twin.opt_a), (model.opt_b, twin.opt_b)):
        for a, b in zip(_numpy(mine.variables), _numpy(theirs.variables), strict=True):
            np.testing.assert_array_equal(a, b)
    assert watch.log.skipped_steps.tolist() == [BAD]


def test_on_nonfinite_skip_is_refused_for_on_threshold():
    with pytest.raises(ValueError, match=r"`on_threshold` must be one of .*on_threshold='skip'"):
        gradwatch.GradWatch(on_threshold="skip")
