"""`gradwatch.trace_nonfinite`: the replay of one batch names where its first NaN or Inf
is born (stage, layer, op, rows).

Each batch is built with its bad rows known; the rows are checked again against NumPy
written out by hand over the same weights. On TensorFlow the op is checked too (`op` is
TensorFlow's op type, None on JAX and PyTorch).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops
from reference import BACKEND, grads_of, mse, no_grad

import gradwatch
from gradwatch.keys import model_paths

# Run again under JAX and PyTorch (tests/test_backends.py).
pytestmark = pytest.mark.backends


def _op(name):
    """The op the replay names: TensorFlow's op type, None elsewhere."""
    return name if BACKEND == "tensorflow" else None


class LogSum(keras.layers.Layer):
    """`log` of each row's sum: -inf for an all-zero row."""

    def call(self, x):
        return ops.log(ops.sum(x, axis=-1, keepdims=True))


class Root(keras.layers.Layer):
    """`sqrt`: finite at 0, its gradient there is not."""

    def call(self, x):
        return ops.sqrt(x)


def _positive(n, features, seed=0):
    rng = np.random.default_rng(seed)
    return (np.abs(rng.normal(size=(n, features))) + 0.5).astype("float32")


def _variables(model):
    return [ops.convert_to_numpy(v).copy() for v in model.variables]


def _assert_unchanged(model, before):
    after = _variables(model)
    assert len(after) == len(before)
    for a, b in zip(after, before, strict=True):
        np.testing.assert_array_equal(a, b)


def _ones_dense(units, **kwargs):
    return keras.layers.Dense(units, kernel_initializer="ones", bias_initializer="zeros", **kwargs)


def test_trace_names_log_of_zero_in_a_custom_layer():
    x = _positive(8, 3)
    x[3] = 0.0  # one all-zero example
    y = np.ones((8, 1), "float32")
    model = keras.Sequential(
        [
            keras.Input((3,)),
            _ones_dense(3, name="d"),
            LogSum(name="log_sum"),
            keras.layers.Dense(1),
        ],
        name="net",
    )
    model.compile("sgd", "mse")
    before = _variables(model)
    origin = gradwatch.trace_nonfinite(model, x, y)
    # By hand: `d` sums each row three times (kernel of ones), so row 3 alone is 0 there.
    kernel, bias = model.get_layer("d").get_weights()
    with np.errstate(divide="ignore"):
        by_numpy = np.log((x @ kernel + bias).sum(axis=1))
    assert tuple(np.flatnonzero(~np.isfinite(by_numpy))) == (3,)
    assert (origin.stage, origin.layer, origin.op, origin.rows) == (
        "forward",
        "net/log_sum",
        _op("Log"),
        (3,),
    )
    assert origin.samples is None
    assert origin.detail == (
        "The output of `net/log_sum` holds 0 NaN and 1 Inf, in row 3, from finite inputs; "
        "its input there is all zeros."
    )
    _assert_unchanged(model, before)


def _over_row_sum(y_true, y_pred):
    # Averages the whole batch into one number: a row's own loss needs the row alone.
    return ops.mean(ops.divide(ops.abs(y_pred - y_true), ops.sum(y_true, axis=1, keepdims=True)))


def test_trace_names_a_division_by_zero_in_a_custom_loss():
    x = _positive(8, 2)
    y = _positive(8, 2, seed=1)
    y[2] = 0.0  # its row sum, the divisor
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, name="out")], name="net")
    model.compile("sgd", _over_row_sum)
    origin = gradwatch.trace_nonfinite(model, x, y)
    kernel, bias = model.get_weights()
    pred = x @ kernel + bias
    with np.errstate(divide="ignore", invalid="ignore"):
        per_row = (np.abs(pred - y) / y.sum(axis=1, keepdims=True)).mean(axis=1)
    assert np.isfinite(pred).all()
    assert tuple(np.flatnonzero(~np.isfinite(per_row))) == (2,)
    assert (origin.stage, origin.layer, origin.op, origin.rows) == (
        "loss",
        None,
        _op("RealDiv"),
        (2,),
    )
    assert origin.detail.startswith("The loss is inf: the loss of row 2 alone is not finite")
    assert origin.detail.endswith("; the targets there: all zeros).")


def test_trace_names_a_nan_in_one_input_row():
    x = _positive(8, 3)
    x[5, 1] = np.nan
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, name="out")], name="net")
    model.compile("sgd", "mse")
    origin = gradwatch.trace_nonfinite(model, x, np.ones((8, 1), "float32"))
    assert tuple(np.flatnonzero(np.isnan(x).any(axis=1))) == (5,)
    assert (origin.stage, origin.layer, origin.op, origin.rows) == ("input", None, None, (5,))
    assert origin.detail == "`x` holds 1 NaN and 0 Inf, in row 5."


def test_trace_names_a_nan_in_one_target_and_an_inf_in_a_sample_weight():
    x = _positive(8, 3)
    y = np.ones((8, 1), "float32")
    y[6, 0] = np.nan
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, name="out")], name="net")
    model.compile("sgd", "mse")
    origin = gradwatch.trace_nonfinite(model, x, y)
    assert (origin.stage, origin.layer, origin.op, origin.rows) == ("target", None, None, (6,))
    assert origin.detail == "`y` holds 1 NaN and 0 Inf, in row 6."
    weights = np.ones(8, "float32")
    weights[1] = np.inf
    origin = gradwatch.trace_nonfinite(model, x, np.ones((8, 1), "float32"), weights)
    assert (origin.stage, origin.rows) == ("target", (1,))
    assert origin.detail == "`sample_weight` holds 0 NaN and 1 Inf, in row 1."


def _exp(x):
    return ops.exp(x)


def test_trace_names_exp_overflow_in_a_custom_activation_of_a_functional_model():
    x = _positive(8, 2)
    x[4] = 50.0  # exp(50 + 50) overflows float32 (its largest is about exp(88.7))
    inputs = keras.Input((2,))
    hidden = _ones_dense(2, activation=_exp, name="expo")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(hidden), name="net")
    model.compile("sgd", "mse")
    origin = gradwatch.trace_nonfinite(model, x, np.ones((8, 1), "float32"))
    with np.errstate(over="ignore"):
        by_numpy = np.exp(x.astype(np.float32) @ np.ones((2, 2), np.float32))
    assert tuple(np.flatnonzero(~np.isfinite(by_numpy).all(axis=1))) == (4,)
    assert (origin.stage, origin.layer, origin.op, origin.rows) == (
        "forward",
        "net/expo",
        _op("Exp"),
        (4,),
    )
    assert origin.detail == (
        "The output of `net/expo` holds 0 NaN and 2 Inf, in row 4, from finite inputs; "
        "its input there ranges from 50 to 50."
    )


def test_trace_names_a_float16_overflow_in_a_dense_layer():
    x = _positive(8, 5)
    x[2] = 20000.0  # fits float16 (largest 65504); five of them summed do not
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(4, activation="relu", name="hidden"),
            _ones_dense(1, dtype="float16", name="half", use_bias=False),
        ],
        name="net",
    )
    model.get_layer("hidden").set_weights([np.eye(5, 4, dtype="float32"), np.zeros(4, "float32")])
    model.compile("sgd", "mse")  # no loss scaling
    origin = gradwatch.trace_nonfinite(model, x, np.ones((8, 1), "float32"))
    with np.errstate(over="ignore"):
        by_numpy = (
            np.maximum(x @ np.eye(5, 4, dtype="float32"), 0)
            .astype(np.float16)
            .sum(axis=1, dtype=np.float16)
        )
    assert tuple(np.flatnonzero(~np.isfinite(by_numpy))) == (2,)
    assert (origin.stage, origin.layer, origin.op, origin.rows) == (
        "forward",
        "net/half",
        _op("MatMul"),
        (2,),
    )
    assert origin.detail.startswith("The output of `net/half` holds 0 NaN and 1 Inf, in row 2")


def test_trace_names_the_cast_into_a_mixed_float16_layer():
    # The layer casts its float32 input to float16 in its `__call__`: 1e5 is Inf there.
    x = np.ones((4, 3), "float32")
    x[2, 0] = 1e5
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(2, name="wide"),
            keras.layers.Dense(1, dtype="mixed_float16", name="half"),
        ],
        name="net",
    )
    model.get_layer("wide").set_weights([np.eye(3, 2, dtype="float32"), np.zeros(2, "float32")])
    model.compile("sgd", "mse")
    origin = gradwatch.trace_nonfinite(model, x, np.ones((4, 1), "float32"))
    with np.errstate(over="ignore"):
        by_numpy = (x @ np.eye(3, 2, dtype="float32")).astype(np.float16)
    assert tuple(np.flatnonzero(~np.isfinite(by_numpy).all(axis=1))) == (2,)
    assert (origin.stage, origin.layer, origin.op, origin.rows) == (
        "forward",
        "net/half",
        _op("Cast"),
        (2,),
    )
    assert origin.detail == (
        "The output of `net/half` holds 0 NaN and 1 Inf, in row 2, from finite inputs; "
        "its input there ranges from 1 to 1e+05."
    )


def _numpy_forward(model, x):
    """Each Dense layer's output (name, array) in float32 NumPy, from the model's weights."""
    outs, h = [], x
    for layer in model.layers:
        kernel, bias = layer.get_weights()
        h = h @ kernel + bias
        if layer.activation is keras.activations.relu:
            h = np.maximum(h, 0)
        outs.append((layer.name, h))
    return outs


def test_trace_names_the_first_layer_to_overflow_after_a_huge_learning_rate():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.integers(0, 3, size=16)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="relu", name="hidden"),
            keras.layers.Dense(8, activation="relu", name="middle"),
            keras.layers.Dense(3, name="out"),
        ],
        name="net",
    )
    model.set_weights([rng.normal(size=w.shape).astype("float32") for w in model.get_weights()])
    # Adam moves each weight by about the learning rate: 1e20 after one step, so that
    # `hidden`'s outputs reach about 1e20 and `middle`'s sums of their products 1e40.
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(keras.optimizers.Adam(1e20), loss)
    for _ in range(5):  # trains until the next step's forward pass overflows
        with np.errstate(over="ignore", invalid="ignore"):
            bad = [(name, h) for name, h in _numpy_forward(model, x) if not np.isfinite(h).all()]
        if bad:
            break
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert bad, "the huge learning rate never overflowed"
    assert all(np.isfinite(w).all() for w in model.get_weights())
    name, h = bad[0]
    rows = tuple(np.flatnonzero(~np.isfinite(h).all(axis=1)))
    assert name == "middle" and rows  # where NumPy finds it first
    origin = gradwatch.trace_nonfinite(model, x, y)
    assert (origin.stage, origin.layer, origin.op, origin.rows) == (
        "forward",
        "net/middle",
        _op("MatMul"),
        rows,
    )


class Block(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.proj = _ones_dense(3, name="proj")
        self.inner = LogSum(name="inner")

    def call(self, x):
        return self.inner(self.proj(x))


class Nested(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.encoder = Block(name="encoder")
        self.head = keras.layers.Dense(1, name="head")

    def call(self, x):
        return self.head(self.encoder(x))


def test_trace_names_the_innermost_layer_of_a_subclassed_model():
    x = _positive(6, 3)
    x[0] = 0.0
    model = Nested(name="net")
    model(x[:1])
    model.compile("sgd", "mse")
    origin = gradwatch.trace_nonfinite(model, x, np.ones((6, 1), "float32"))
    assert (origin.stage, origin.layer, origin.op, origin.rows) == (
        "forward",
        "net/encoder/inner",
        _op("Log"),
        (0,),
    )
    # The same prefixes as the variable keys.
    assert "net/encoder/proj/kernel" in model_paths(model)


class RawOp(keras.Model):
    """Takes `log` in its own `call`, between two layers."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.proj = _ones_dense(3, name="proj")
        self.head = keras.layers.Dense(1, name="head")

    def call(self, x):
        return self.head(ops.log(self.proj(x)))


def test_trace_names_the_model_where_its_own_call_makes_the_nan():
    # `head` is the first layer to return an Inf, but from an input that was not finite.
    x = _positive(6, 3)
    x[4] = 0.0
    model = RawOp(name="net")
    model(x[:1])
    model.compile("sgd", "mse")
    origin = gradwatch.trace_nonfinite(model, x, np.ones((6, 1), "float32"))
    assert (origin.stage, origin.layer, origin.op, origin.rows) == (
        "forward",
        "net",
        _op("Log"),
        (4,),
    )


class OwnStep(keras.Model):
    """A custom `train_step` that computes its own loss (the replay cannot)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = _ones_dense(3, name="hidden")
        self.inner = LogSum(name="log_sum")
        self.out = keras.layers.Dense(1, name="out")

    def call(self, x):
        return self.out(self.inner(self.hidden(x)))

    def train_step(self, data):
        x, y = data
        variables = self.trainable_variables
        loss, grads = grads_of(lambda: mse(y, self(x, training=True)) / 0.0, variables)
        with no_grad():
            self.optimizer.apply(grads, variables)
        return {"loss": loss}


def test_trace_of_a_custom_train_step_finds_input_and_forward_and_says_what_it_cannot():
    x = _positive(4, 3)
    y = np.ones((4, 1), "float32")
    model = OwnStep(name="net")
    model(x[:1])
    model.compile(keras.optimizers.SGD(0.1))
    bad = x.copy()
    bad[1, 2] = np.inf
    origin = gradwatch.trace_nonfinite(model, bad, y)
    assert (origin.stage, origin.layer, origin.rows) == ("input", None, (1,))
    bad = x.copy()
    bad[2] = 0.0
    origin = gradwatch.trace_nonfinite(model, bad, y)
    assert (origin.stage, origin.layer, origin.op, origin.rows) == (
        "forward",
        "net/log_sum",
        _op("Log"),
        (2,),
    )
    # Its step divides the loss by zero, but only the step knows that.
    origin = gradwatch.trace_nonfinite(model, x, y)
    assert (origin.stage, origin.layer, origin.op, origin.rows) == (None, None, None, ())
    assert origin.detail == (
        "The input and every layer's output are finite; the loss and the backward pass "
        "could not be replayed: OwnStep has its own `train_step`, which computes them."
    )


def test_trace_names_sqrt_at_zero_in_the_backward_pass():
    x = _positive(8, 3)
    x[1] = 0.0
    y = np.ones((8, 1), "float32")
    model = keras.Sequential(
        [keras.Input((3,)), _ones_dense(3, name="d"), Root(name="root"), keras.layers.Dense(1)],
        name="net",
    )
    model.compile("sgd", "mse")
    origin = gradwatch.trace_nonfinite(model, x, y)
    kernel, bias = model.get_layer("d").get_weights()
    assert tuple(np.flatnonzero((x @ kernel + bias == 0).any(axis=1))) == (1,)
    assert (origin.stage, origin.layer, origin.op, origin.rows) == (
        "backward",
        "net/root",
        _op("SqrtGrad"),
        (1,),
    )
    assert origin.detail == (
        "Forward and loss are finite; in `net/root`, the gradient with respect to its input "
        "holds 0 NaN and 3 Inf, in row 1, while the gradient it received is finite; its "
        "input there is all zeros."
    )


def test_trace_of_a_healthy_batch_is_none_and_changes_nothing():
    x = _positive(8, 3)
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, name="d"),
            LogSum(name="log_sum"),  # rows of positive sums: finite
            keras.layers.BatchNormalization(name="norm"),
            keras.layers.Dropout(0.5, seed=1, name="drop"),
            keras.layers.Dense(1, name="out"),
        ],
        name="net",
    )
    model.get_layer("d").set_weights([np.ones((3, 4), "float32"), np.full(4, 5.0, "float32")])
    model.compile("sgd", "mse")
    before = _variables(model)
    assert gradwatch.trace_nonfinite(model, x, np.ones((8, 1), "float32")) is None
    # Moving statistics, the dropout's seed, the weights: all as they were.
    _assert_unchanged(model, before)


def test_trace_rejects_what_it_cannot_replay():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, name="out")], name="net")
    x, y = np.ones((4, 3), "float32"), np.ones((4, 1), "float32")
    with pytest.raises(ValueError, match=r"`y` was given, but the model has no loss"):
        gradwatch.trace_nonfinite(model, x, y)
    model.compile("sgd", "mse")
    with pytest.raises(TypeError, match=r"`model` must be a Keras model.*Received: model of type"):
        gradwatch.trace_nonfinite(model.layers[0], x, y)
    with pytest.raises(ValueError, match=r"same number of rows.*'y': \[\(3, 1\)\]"):
        gradwatch.trace_nonfinite(model, x, y[:3])
    with pytest.raises(ValueError, match=r"(?s)could not be called on `x`.*shapes \[\(4, 7\)\]"):
        gradwatch.trace_nonfinite(model, np.ones((4, 7), "float32"), y)
    with pytest.raises(TypeError, match=r"`x` must be one batch.*Received: x of type str"):
        gradwatch.trace_nonfinite(model, "x.csv", y)
    with pytest.raises(ValueError, match=r"`x` must be a batch.*a scalar"):
        gradwatch.trace_nonfinite(model, np.float32(1.0), y)
    unbuilt = keras.Sequential([keras.layers.Dense(1)], name="lazy")
    with pytest.raises(ValueError, match=r"`model` is not built"):
        gradwatch.trace_nonfinite(unbuilt, x)
