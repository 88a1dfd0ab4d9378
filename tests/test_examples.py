"""The examples behind a step: each example's loss and gradient norm (the engine,
`gradwatch._forensics.examples`), `log.examples` (the store, the files, a streamed log)
and the doctor's `examples` finding.

The engine is checked against a plain loop written here: each row alone through a clone
of the model holding the same weights, with the backend's own autodiff
(`reference.grads_of`: tf.GradientTape, jax.grad, torch.autograd), the loss written out
from the loss function and the clone's own losses. The engine's tests run again under
JAX and PyTorch (`@pytest.mark.backends`).
"""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd
import pytest
from keras import ops
from reference import BACKEND, grads_of

import gradwatch
from gradwatch._forensics.examples import PATHS, example_gradients, unsupported
from gradwatch._forensics.replay import Batch
from gradwatch.diagnose import Signals, run_rules
from gradwatch.log import GradientLog, store_of

backends = pytest.mark.backends


# ------------------------------------------------------------------ models and data
def _dense(seed=0):
    """A regularized MLP on 5 features, 3 outputs (mean squared error)."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(
                4, activation="tanh", kernel_regularizer=keras.regularizers.L2(0.05), name="h"
            ),
            keras.layers.Dense(3, bias_regularizer=keras.regularizers.L2(0.1), name="out"),
        ],
        name="net",
    )
    model.compile(keras.optimizers.SGD(0.05), keras.losses.MeanSquaredError())
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(6, 5)).astype("float32")
    y = rng.normal(size=(6, 3)).astype("float32")
    return model, x, y, keras.losses.MeanSquaredError()


def _tokens(seed=0):
    """Embedding, then a Conv1D, pooled: a classifier of 8-token sequences."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((8,), dtype="int32"),
            keras.layers.Embedding(20, 4, name="emb"),
            keras.layers.Conv1D(3, 3, activation="relu", name="conv"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(3, name="out"),
        ],
        name="tok",
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(keras.optimizers.Adam(0.01), loss)
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 20, size=(5, 8)).astype("int32")
    x[1, :4] = x[1, 0]  # a token repeated in a row: its embedding row's gradient adds up
    y = rng.integers(0, 3, size=(5,))
    return model, x, y, keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _nested(seed=0):
    """Two named inputs (a dict), one output."""
    keras.utils.set_random_seed(seed)
    a = keras.Input((3,), name="a")
    b = keras.Input((2,), name="b")
    h = keras.layers.Concatenate()([keras.layers.Dense(4, name="da")(a), b])
    out = keras.layers.Dense(1, name="out")(keras.layers.Activation("softplus")(h))
    model = keras.Model({"a": a, "b": b}, out, name="two")
    model.compile(keras.optimizers.SGD(0.05), keras.losses.MeanAbsoluteError())
    rng = np.random.default_rng(seed)
    x = {
        "a": rng.normal(size=(7, 3)).astype("float32"),
        "b": rng.normal(size=(7, 2)).astype("float32"),
    }
    y = rng.normal(size=(7, 1)).astype("float32")
    return model, x, y, keras.losses.MeanAbsoluteError()


MODELS = {"dense": _dense, "embedding_conv": _tokens, "nested_inputs": _nested}


def _rows(x, i):
    return keras.tree.map_structure(lambda a: a[i : i + 1], x)


def _moved(model, seed=1):
    """Weights by `id(variable)` that differ from the model's current ones."""
    rng = np.random.default_rng(seed)
    return {
        id(v): (ops.convert_to_numpy(v) + rng.normal(scale=0.3, size=v.shape)).astype(v.dtype)
        for v in model.trainable_variables
    }


def _reference(model, loss_fn, x, y, sw, weights, watched):
    """Each row alone through a clone of the model holding `weights`, with the backend's
    autodiff: its loss (the loss function with the row's sample weight, plus the clone's
    own losses: regularizers) and the norm of its gradient over `watched` (float64)."""
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    for mine, theirs in zip(model.trainable_variables, clone.trainable_variables, strict=True):
        theirs.assign(weights[id(mine)])
    wanted = {id(w) for w in watched}
    index = [i for i, v in enumerate(model.trainable_variables) if id(v) in wanted]
    losses, norms = [], []
    for i in range(len(y)):

        def loss(i=i):
            pred = clone(_rows(x, i), training=True)
            weight = None if sw is None else sw[i : i + 1]
            value = loss_fn(y[i : i + 1], pred, sample_weight=weight)
            for extra in clone.losses:
                value = value + ops.sum(extra)
            return value

        # All of them (JAX maps each one the loss reads), the watched ones summed.
        value, grads = grads_of(loss, clone.trainable_variables)
        total = sum(
            np.sum(np.asarray(ops.convert_to_numpy(grads[j]), np.float64) ** 2) for j in index
        )
        losses.append(float(ops.convert_to_numpy(value)))
        norms.append(float(np.sqrt(total)))
    return np.asarray(losses), np.asarray(norms)


def _state(model):
    """Every variable of the model, its optimizer and metrics, as NumPy."""
    variables = [*model.variables, *model.optimizer.variables, *model.metrics_variables]
    return [np.array(ops.convert_to_numpy(v)) for v in variables]


# ------------------------------------------------------------------ the engine
@backends
@pytest.mark.parametrize("name", list(MODELS))
def test_example_gradients_match_a_per_example_tape_loop(name):
    model, x, y, loss_fn = MODELS[name]()
    model.fit(x, y, batch_size=len(y), epochs=2, verbose=0)
    sw = np.linspace(0.5, 2.0, len(y)).astype("float32")
    weights = _moved(model)
    watched = model.trainable_variables[1:]  # not the first: the norm is over these alone
    before = _state(model)
    batch = Batch(x, y, sw, len(y))
    # Vectorised alone (by default, a path that fails gives way to the next in silence).
    losses, norms = example_gradients(model, batch, watched, weights, path="vectorized")
    ref_losses, ref_norms = _reference(model, loss_fn, x, y, sw, weights, watched)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(norms, ref_norms, rtol=2e-5, atol=1e-6)
    assert len(set(np.round(norms, 4))) == len(norms)  # the rows differ: no row stands for all
    for a, b in zip(_state(model), before, strict=True):
        np.testing.assert_array_equal(a, b)


@backends
def test_example_gradients_paths_agree_with_the_tape_loop():
    model, x, y, loss_fn = _tokens()
    weights = _moved(model)
    expected = _reference(model, loss_fn, x, y, None, weights, model.trainable_variables)
    for path in PATHS:
        losses, norms = example_gradients(
            model, Batch(x, y, None, len(y)), model.trainable_variables, weights, path=path
        )
        np.testing.assert_allclose(losses, expected[0], rtol=2e-5, atol=1e-6, err_msg=path)
        np.testing.assert_allclose(norms, expected[1], rtol=2e-5, atol=1e-6, err_msg=path)


class Untraceable(keras.layers.Layer):
    """Doubles its input, by a factor that the vectorised path cannot trace: read in
    Python from the input's value (TensorFlow, PyTorch: no `tf.function`, no `vmap`),
    or from a host callback that has no batching rule (JAX, where every gradient is
    traced: `jit` and a loop run it, `vmap` does not)."""

    def call(self, x):
        if BACKEND == "jax":
            import jax

            factor = jax.pure_callback(
                lambda s: np.float32(2.0),
                jax.ShapeDtypeStruct((), "float32"),
                jax.lax.stop_gradient(ops.sum(x)),
            )
            return x * factor
        total = float(np.asarray(ops.convert_to_numpy(ops.sum(x))))
        return x * 2.0 if total > -1e30 else x

    def compute_output_shape(self, input_shape):
        return input_shape


@backends
def test_example_gradients_fall_back_to_a_loop_for_a_model_vectorisation_rejects():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, name="d"), Untraceable(), keras.layers.Dense(2)]
    )
    model.compile("sgd", keras.losses.MeanSquaredError())
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 4)).astype("float32"), rng.normal(size=(5, 2)).astype("float32")
    batch = Batch(x, y, None, 5)
    with pytest.raises(Exception):  # noqa: B017 (each backend's tracer has its own error)
        example_gradients(model, batch, model.trainable_variables, path="vectorized")
    weights = {id(v): ops.convert_to_numpy(v) for v in model.trainable_variables}
    expected = _reference(
        model, keras.losses.MeanSquaredError(), x, y, None, weights, model.trainable_variables
    )
    for _ in range(2):  # the second call goes straight to the path that ran
        losses, norms = example_gradients(model, batch, model.trainable_variables)
        np.testing.assert_allclose(losses, expected[0], rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(norms, expected[1], rtol=2e-5, atol=1e-6)


@backends
def test_example_gradients_use_the_weights_given_and_leave_the_model_as_it_was():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(6, name="d"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.Dropout(0.5, name="drop"),
            keras.layers.Dense(1, name="out"),
        ]
    )
    model.compile(keras.optimizers.Adam(0.01), "mse")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 4)).astype("float32"), rng.normal(size=(16, 1)).astype("float32")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    before = _state(model)
    batch = Batch(x[:8], y[:8], None, 8)
    # Only the output layer is watched: before it, dropout draws its own mask each call.
    watched = model.get_layer("out").trainable_variables
    weights = _moved(model)
    given = example_gradients(model, batch, watched, weights)
    now = example_gradients(model, batch, watched)
    for a, b in zip(_state(model), before, strict=True):
        np.testing.assert_array_equal(a, b)  # weights, moving statistics, seeds, optimizer
    assert np.all(np.abs(given[0] - now[0]) > 1e-6)  # the given weights were used
    # Dropout left out (inference would not differ here: a batch of one in training-mode
    # BatchNormalization is that row alone), each row's gradient at the given weights is
    # the tape loop's: check it with the rate at 0 on the same model.
    model.get_layer("drop").rate = 0.0
    got = example_gradients(model, batch, watched, weights, path="eager")
    expected = _reference(
        model, keras.losses.MeanSquaredError(), x[:8], y[:8], None, weights, watched
    )
    np.testing.assert_allclose(got[1], expected[1], rtol=2e-5, atol=1e-6)


def test_example_gradients_average_to_the_recorded_step_gradient():
    # MSE (a mean over the rows), sample weights, an L2 on the watched bias: each row's
    # gradient of the bias is 2 w_i (pred_i - y_i) / 1 + 2 * 0.1 * b, all negative for
    # targets far above the predictions, so the mean of the norms is the norm of the
    # mean: the step's gradient, recorded by GradWatch. The mean of the losses (each
    # with the regularization in full) is the step's loss.
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, activation="tanh", kernel_regularizer="l2", name="h"),
            keras.layers.Dense(1, bias_regularizer=keras.regularizers.L2(0.1), name="out"),
        ],
        name="net",
    )
    model.compile(keras.optimizers.SGD(0.01), "mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 3)).astype("float32")
    y = (10.0 + rng.uniform(size=(8, 1))).astype("float32")
    sw = rng.uniform(0.5, 1.5, size=(8,)).astype("float32")
    weights = {id(v): np.array(ops.convert_to_numpy(v)) for v in model.trainable_variables}
    bias = model.get_layer("out").bias
    watch = gradwatch.GradWatch(values="out/bias")
    model.fit(
        x, y, sample_weight=sw, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[watch]
    )
    losses, norms = example_gradients(model, Batch(x, y, sw, 8), [bias], weights)
    recorded = watch.log.gradient("out/bias", step=0)
    assert np.all(recorded < 0)
    np.testing.assert_allclose(norms.mean(), np.abs(recorded).item(), rtol=1e-5)
    step_loss = watch.log.scalars.set_index("step").loc[0, "loss"]
    np.testing.assert_allclose(losses.mean(), step_loss, rtol=1e-5)


def test_example_gradients_refuse_a_custom_train_step_with_the_reason():
    class OwnStep(keras.Sequential):
        def train_step(self, data):
            return super().train_step(data)

    model = OwnStep([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    assert "has its own `train_step`" in unsupported(model)
    x = np.zeros((2, 2), "float32")
    with pytest.raises(ValueError, match="its own `train_step`"):
        example_gradients(model, Batch(x, x[:, :1], None, 2), model.trainable_variables)
    assert unsupported(_dense()[0]) is None


def test_example_gradients_check_their_arguments():
    model, x, y, _ = _dense()
    other = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    batch = Batch(x, y, None, len(y))
    with pytest.raises(ValueError, match="must be trainable variables of Sequential"):
        example_gradients(model, batch, other.trainable_variables)
    with pytest.raises(ValueError, match="`variables` is empty"):
        example_gradients(model, batch, [])
    kernel = model.get_layer("h").kernel
    with pytest.raises(ValueError, match=r"net/h/kernel.*Received: shape=\(2, 2\)"):
        example_gradients(model, batch, [kernel], {id(kernel): np.zeros((2, 2), "float32")})
    with pytest.raises(ValueError, match="`path` must be one of"):
        example_gradients(model, batch, [kernel], path="fast")


def test_example_gradients_of_a_smaller_batch_pad_the_compiled_rows():
    model, x, y, _ = _dense()
    weights = _moved(model)
    variables = model.trainable_variables
    whole = example_gradients(model, Batch(x, y, None, 6), variables, weights)
    part = example_gradients(model, Batch(x[:4], y[:4], None, 4), variables, weights)
    assert part[0].shape == (4,)
    np.testing.assert_allclose(part[1], whole[1][:4], rtol=1e-6)
    np.testing.assert_allclose(part[0], whole[0][:4], rtol=1e-6)


# ------------------------------------------------------------------ log.examples
def _log_with_steps(steps=3):
    log = GradientLog(("norm",))
    store = store_of(log)
    codes = store.add_variables(["m/w"], [(2,)])
    store.append(
        np.arange(steps),
        np.zeros(steps),
        np.arange(steps),
        codes,
        np.ones((steps, 1, 1), np.float32),
        codes[:0],
        np.zeros((steps, 0), np.float32),
    )
    return log, store


def test_log_examples_is_empty_with_its_columns_and_dtypes():
    log, _ = _log_with_steps()
    ex = log.examples
    assert list(ex.columns) == ["step", "row", "sample", "loss", "grad_norm"]
    assert len(ex) == 0
    assert [str(t) for t in ex.dtypes] == ["int64", "int64", "Int64", "float64", "float64"]


def test_log_examples_frame_by_step_with_unknown_samples_as_na():
    log, store = _log_with_steps()
    store.add_examples(2, [0, 1, 2], [10, None, 2**40], [0.5, np.nan, 1e30], [1.0, np.inf, 3.5])
    store.add_examples(1, [0, 1], None, [0.1, 0.2], [0.3, 0.4])
    ex = log.examples
    assert ex["step"].tolist() == [1, 1, 2, 2, 2]
    assert ex["row"].tolist() == [0, 1, 0, 1, 2]
    assert ex["sample"].isna().tolist() == [True, True, False, True, False]
    assert ex["sample"][ex["sample"].notna()].tolist() == [10, 2**40]
    assert ex["grad_norm"].tolist()[:4] == [0.3, 0.4, 1.0, np.inf]
    store.add_examples(1, [3], [7], [9.0], [8.0])  # a step added again is replaced
    assert log.examples[log.examples["step"] == 1]["row"].tolist() == [3]
    with pytest.raises(ValueError, match="one entry per example"):
        store.add_examples(4, [0, 1], None, [0.1], [0.3, 0.4])


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_log_examples_round_trip_through_files(tmp_path, suffix):
    log, store = _log_with_steps()
    store.add_examples(0, [0, 1], [3, 2**40 + 1], [0.1, 1.0 / 3.0], [2.0, np.nan])
    store.add_examples(2, [0, 1, 2], None, [np.inf, 0.5, 0.25], [1e-30, 4.0, 9.0])
    path = tmp_path / f"grads.{suffix}"
    getattr(log, f"to_{suffix}")(path)
    back = gradwatch.read_log(path)
    pd.testing.assert_frame_equal(back.examples, log.examples)
    assert back == log
    if suffix == "parquet":
        import pyarrow.parquet as pq

        assert b"gradwatch" in pq.read_schema(path).metadata  # a real Parquet file


class AddExamples(keras.callbacks.Callback):
    """Adds examples to a watch's store as a replay would: at the start of the batches in
    `at` (for the step before), and at the end of training (for the last step)."""

    def __init__(self, watch, at):
        super().__init__()
        self.watch, self.at, self.added = watch, at, {}

    def _add(self, step):
        n = 3
        rows = np.arange(n)
        losses = np.linspace(0.1, 0.3, n) + step
        norms = np.linspace(1.0, 3.0, n) * (step + 1)
        store_of(self.watch._log).add_examples(step, rows, rows + 10 * step, losses, norms)
        self.added[step] = (losses, norms)

    def on_train_batch_begin(self, batch, logs=None):
        if batch in self.at:
            self._add(batch - 1)

    def on_train_end(self, logs=None):
        self._add(7)


def test_log_examples_stream_to_parts_and_read_back(tmp_path):
    model, x, y, _ = _dense()
    x, y = np.concatenate([x] * 4)[:16], np.concatenate([y] * 4)[:16]
    watch = gradwatch.GradWatch(path=tmp_path / "run", flush_every=2)
    adder = AddExamples(watch, at={3, 6})
    # The adder first: its `on_train_end` comes before the watch's last part.
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=[adder, watch])
    back = gradwatch.read_log(tmp_path / "run")
    ex = back.examples
    assert sorted(set(ex["step"])) == [2, 5, 7]
    for step, (losses, norms) in adder.added.items():
        rows = ex[ex["step"] == step]
        np.testing.assert_array_equal(rows["loss"].to_numpy(), losses)
        np.testing.assert_array_equal(rows["grad_norm"].to_numpy(), norms)
        assert rows["sample"].tolist() == [10 * step, 10 * step + 1, 10 * step + 2]
    parts = sorted((tmp_path / "run").rglob("part-*.parquet"))
    assert len(parts) > 1  # written part by part, each step's examples once
    pd.testing.assert_frame_equal(watch.log.examples, ex)
    # Examples added after the last part (no step left to write) are written when the
    # log is read: `watch.log` is what the files hold.
    adder._add(6)
    assert sorted(set(watch.log.examples["step"])) == [2, 5, 6, 7]
    assert sorted(set(gradwatch.read_log(tmp_path / "run").examples["step"])) == [2, 5, 6, 7]


# ------------------------------------------------------------------ the doctor
def _finding(examples):
    signals = Signals(np.arange(0), [], {}, lambda name: None, examples=examples)
    rows = run_rules(signals)
    return rows[rows["finding"] == "examples"]


def test_examples_finding_by_hand_median_ratio_nonfinite_and_recurrence():
    def frame(rows):
        step, row, sample, norm = zip(*rows, strict=True)
        return pd.DataFrame(
            {
                "step": np.asarray(step, np.int64),
                "row": np.asarray(row, np.int64),
                "sample": pd.array(list(sample), dtype="Int64"),
                "loss": np.ones(len(rows)),
                "grad_norm": np.asarray(norm, np.float64),
            }
        )

    # Step 4: median of (1, 2, 3, 35) is 2.5: 35 is 14x, over 10x; 3 is not.
    # Step 8: median of the finite (20.4, 2, 2, 2) is 2: 20.4 is 10.2x; NaN is an outlier.
    # Step 9: median 0 (most rows fit exactly): nothing is "far above" it.
    ex = frame(
        [
            *[(4, 0, 5, 1.0), (4, 1, 6, 2.0), (4, 2, 7, 3.0), (4, 3, 8, 35.0)],
            *[(8, 0, 8, 20.4), (8, 1, 1, 2.0), (8, 2, 2, 2.0), (8, 3, 3, 2.0), (8, 4, 4, np.nan)],
            *[(9, 0, 1, 0.0), (9, 1, 2, 0.0), (9, 2, 3, 5.0)],
        ]
    )
    (row,) = _finding(ex).to_dict("records")
    assert row["severity"] == "warning"
    assert (row["first_step"], row["last_step"]) == (4, 8)
    assert row["evidence"].startswith(
        "3 examples in 2 of the 3 replayed steps have a gradient norm over 10x their "
        "batch's median: step 8 row 4 (sample 4, non-finite), step 4 row 3 (sample 8, 14x), "
        "step 8 row 0 (sample 8, 10.2x)."
    )
    assert "Sample 8 is such an outlier at 2 replayed steps (4, 8)." in row["evidence"]
    assert "mislabelled or corrupt" in row["advice"]
    # A higher threshold: 14x and 10.2x are under 15x; the NaN row stays.
    rows = run_rules(Signals(np.arange(0), [], {}, lambda n: None, examples=ex), examples_ratio=15)
    (evidence,) = rows[rows["finding"] == "examples"]["evidence"]
    assert evidence.startswith("1 example in 1 of the 3 replayed steps has")
    clean = ex[ex["grad_norm"].between(0.5, 3.0)]
    assert _finding(clean).empty
    assert _finding(None).empty


def test_examples_finding_trips_on_a_corrupted_label_and_not_on_clean_batches():
    # A regression trained to fit its data; the replayed batches are its own, clean,
    # then one with a label multiplied by 1000.
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 1)) + 0.1 * rng.normal(size=(256, 1))).astype("float32")
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(keras.optimizers.Adam(0.01), "mse")
    model.fit(x, y, batch_size=64, epochs=10, verbose=0)
    log, store = _log_with_steps(8)
    variables = model.trainable_variables
    for step in range(4):
        rows = slice(64 * step, 64 * (step + 1))
        losses, norms = example_gradients(model, Batch(x[rows], y[rows], None, 64), variables)
        store.add_examples(step, np.arange(64), np.arange(64) + 64 * step, losses, norms)
    assert log.diagnose().query("finding == 'examples'").empty
    bad = y[:64].copy()
    bad[5] *= 1000.0
    losses, norms = example_gradients(model, Batch(x[:64], bad, None, 64), variables)
    assert norms[5] > 10 * np.median(norms)
    store.add_examples(4, np.arange(64), np.arange(64), losses, norms)
    found = log.diagnose().query("finding == 'examples'")
    (evidence,) = found["evidence"]
    assert evidence.startswith("1 example in 1 of the 5 replayed steps has")
    assert "step 4 row 5 (sample 5, " in evidence


# ------------------------------------------------------------ in `fit`, end to end
class WeightsBefore(keras.callbacks.Callback):
    """The trainable weights before each step (one step an execution), by step."""

    def __init__(self):
        super().__init__()
        self.at: dict[int, dict[int, np.ndarray]] = {}

    def on_train_batch_begin(self, batch, logs=None):
        self.at[len(self.at)] = {
            id(v): np.array(ops.convert_to_numpy(v)) for v in self.model.trainable_variables
        }


@backends
def test_fit_replays_the_asked_and_the_kept_steps_on_the_weights_before_each():
    model, _, _, loss_fn = _dense()
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8 * 4, 5)).astype("float32")
    y = rng.normal(size=(8 * 4, 3)).astype("float32")
    y[2 * 8 + 5, 1] = np.nan  # step 2's row 5: its gradient is NaN, the step is kept back
    watch = gradwatch.GradWatch(variables="out/*", examples_every=3, on_nonfinite="skip")
    before = WeightsBefore()
    with pytest.warns(UserWarning, match="Non-finite gradients at step 2"):
        model.fit(x, y, batch_size=8, shuffle=False, verbose=0, callbacks=[before, watch])

    ex = watch.log.examples
    assert sorted(set(ex["step"])) == [0, 2, 3]  # every 3rd step, and the kept one
    watched = model.trainable_variables[2:]  # `out/kernel`, `out/bias`
    for step in (0, 2, 3):
        rows = ex[ex["step"] == step]
        xb, yb = x[step * 8 : (step + 1) * 8], y[step * 8 : (step + 1) * 8]
        losses, norms = _reference(model, loss_fn, xb, yb, None, before.at[step], watched)
        np.testing.assert_array_equal(rows["row"], np.arange(8))
        np.testing.assert_array_equal(rows["sample"].to_numpy(), step * 8 + np.arange(8))
        np.testing.assert_allclose(rows["loss"], losses, rtol=2e-5)
        np.testing.assert_allclose(rows["grad_norm"], norms, rtol=2e-5)
    kept = ex[ex["step"] == 2]["grad_norm"].to_numpy()
    assert np.isnan(kept[5]) and np.isfinite(np.delete(kept, 5)).all()
    # The doctor names the row whose gradient is NaN.
    found = watch.log.diagnose()
    row = found[found.finding == "examples"]
    assert len(row) == 1 and "21" in row.evidence.iloc[0]  # sample 2 * 8 + 5


def test_fit_without_examples_every_replays_no_step():
    model, x, y, _ = _dense()
    watch = gradwatch.GradWatch()
    model.fit(x, y, batch_size=2, verbose=0, callbacks=[watch])
    assert watch.log.examples.empty
