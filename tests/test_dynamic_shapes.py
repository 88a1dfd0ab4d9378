"""Gradients whose shape the traced step knows only at run time: a table sliced to the
batch's sequence length (KerasHub's position embeddings, a custom layer of the same
kind), fitted on batches of two sequence lengths."""

from __future__ import annotations

import importlib.util

import keras
import numpy as np
import pytest
from components import require
from keras import ops
from models import Model
from reference import (
    BACKEND,
    np_stats,
    reference_bins,
    skip_unless_supported,
    spe,
    tape_gradients,
    tf_only,
)

import gradwatch
from gradwatch.stats import GRADIENT_STATS, compute_histograms, compute_stats

pytestmark = pytest.mark.backends  # run again under JAX and PyTorch (test_backends)

VOCAB, LONGEST, DIM = 50, 8, 8
#: Each batch's sequence length: two lengths, alternating, so that a traced step (one
#: per length on JAX, one for both on TensorFlow) runs with each.
LENGTHS = (5, 7, 5, 7)


class Batches(keras.utils.PyDataset):
    """Fixed batches of varying shapes. On TensorFlow, Keras makes it a `tf.data` dataset
    whose element spec has `None` where the batches' shapes differ."""

    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


def text_dataset(seed=0):
    """A padded text pipeline, as KerasHub's guides fit a task model: token sequences of
    varying length, `padded_batch` to each batch's longest (its element spec has `None`
    for the sequence length), next-token labels. Batch lengths: `LENGTHS`."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    # Each batch's longest sequence is as long as `LENGTHS` says; the other is shorter.
    lengths = [n for longest in LENGTHS for n in (longest, longest - 2)]
    sequences = [rng.integers(1, VOCAB, size=n + 1).astype("int32") for n in lengths]

    def example(ids):
        features = {"token_ids": ids[:-1], "padding_mask": tf.ones_like(ids[:-1])}
        return features, ids[1:]

    ds = tf.data.Dataset.from_tensor_slices(tf.ragged.constant(sequences))
    return ds.map(example).padded_batch(2)


def sparse_ce(y, logits, sw=None):
    """Keras' sparse categorical cross-entropy from logits, averaged over every token,
    written out."""
    logp = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)
    picked = ops.take_along_axis(logp, ops.cast(y, "int32")[..., None], axis=-1)
    return -ops.mean(picked)


def skip_unjitted_on_jax(jit):
    if BACKEND == "jax" and not jit:
        # JAX records in the jitted step, traced with the batch's concrete shapes;
        # unjitted, every op of the step runs eagerly (slowly) at every step.
        pytest.skip("JAX traces its step under jit_compile=True")


def causal_lm():
    require(
        importlib.util.find_spec("keras_hub") is not None,
        "keras-hub is not installed; install it with pip install 'gradwatch[test]'",
    )
    import keras_hub

    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCAB,
        num_layers=1,
        num_heads=2,
        hidden_dim=DIM,
        intermediate_dim=16,
        dropout=0.0,
        max_sequence_length=LONGEST,
        name="gpt2",
    )
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None, name="lm")


def check_against_tape(log, reference, batches, optimizer, loss_fn, stats=("norm",)):
    """Every variable's `stats` at every step against a plain gradient loop from the same
    start; returns the loop's gradients (one list per step, in weight order)."""
    grads = tape_gradients(reference, optimizer, [(x, y, None) for x, y in batches], loss_fn)
    assert list(log.steps) == list(range(len(batches)))
    assert len(log.variables) == len(reference.trainable_weights)
    for name in stats:
        wide = log.stat(name)
        for step, step_grads in enumerate(grads):
            for key, g in zip(log.variables, step_grads, strict=True):
                expected = np_stats(g)[name]
                got = wide.loc[step, key]
                assert got == pytest.approx(expected, rel=1e-4, abs=1e-6), (name, step, key)
    return grads


def test_dynamic_shapes_keras_hub_causal_lm_records_and_trains_bitwise():
    # TensorFlow and PyTorch, unjitted: XLA's compile of the model for each sequence
    # length, twice, took minutes on 2 cores, and what XLA does with a gradient of run-time
    # shape is pinned by the sliced table below (`jit=True`), whose `ops.slice` gives the
    # same `Pad` gradient. Not on JAX: its step is jitted for each sequence length, so no
    # gradient there has a run-time shape (the sliced table below runs there, jitted),
    # and compiling the three GPT-2 models for each length took 53 s there.
    if BACKEND == "jax":
        pytest.skip("JAX compiles a step per sequence length: no run-time shapes to record")
    jit = False
    dataset = text_dataset()
    batches = list(dataset.as_numpy_iterator())
    assert [x["token_ids"].shape[1] for x, _ in batches] == list(LENGTHS)
    assert dataset.element_spec[1].shape.as_list() == [None, None]
    watched, twin, reference = causal_lm(), causal_lm(), causal_lm()
    start = watched.get_weights()
    for model in (twin, reference):
        model.set_weights(start)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for model in (watched, twin):
        model.compile(keras.optimizers.SGD(0.5), loss, jit_compile=jit)
    watch = gradwatch.GradWatch(stats="norm")
    ha = watched.fit(dataset, shuffle=False, callbacks=[watch], verbose=0)
    hb = twin.fit(dataset, shuffle=False, verbose=0)

    # Training is bitwise that of plain Keras.
    assert ha.history == hb.history
    for a, b in zip(watched.get_weights(), twin.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    log = watch.log
    position = log.key("position_embedding/embeddings")
    assert log.variables.count(position) == 1
    check_against_tape(log, reference, batches, keras.optimizers.SGD(0.5), sparse_ce)


class SlicedPositions(keras.layers.Layer):
    """Adds a learned vector per position: a table of `longest` rows sliced to the
    batch's sequence length (on TensorFlow the gradient is a `Pad` whose static shape is
    unknown while the length is)."""

    def __init__(self, longest, **kwargs):
        super().__init__(**kwargs)
        self.longest = longest

    def build(self, input_shape):
        self.table = self.add_weight(
            shape=(self.longest, input_shape[-1]), initializer="random_normal", name="table"
        )

    def call(self, x):
        table = ops.convert_to_tensor(self.table)
        rows = ops.slice(table, (0, 0), (ops.shape(x)[1], ops.shape(table)[1]))
        return x + rows[None]

    def compute_output_shape(self, input_shape):
        return input_shape


def sliced_positions_layers(tokens):
    """Token ids through an `Embedding` (a sparse gradient) or float features through a
    `Dense` layer, then `SlicedPositions`, pooled into two outputs."""
    if tokens:
        inputs = keras.Input((None,), dtype="int32")
        h = keras.layers.Embedding(VOCAB, 4, name="emb")(inputs)
    else:
        inputs = keras.Input((None, 3))
        h = keras.layers.Dense(4, name="proj")(inputs)
    h = SlicedPositions(LONGEST, name="pos")(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return inputs, keras.layers.Dense(2, name="out")(h)


def mse(y, pred, sw=None):
    return ops.mean(ops.square(ops.convert_to_tensor(y) - pred))


# Token ids (an `Embedding`'s sparse gradient on TensorFlow) in a step without XLA; float
# features with XLA. (Recording an `Embedding` under XLA changes the table's update in
# its last bits, whatever the shapes: not what this file tests.)
@pytest.mark.parametrize(("tokens", "jit"), [(True, False), (False, True)])
def test_dynamic_shapes_sliced_table_records_stats_values_and_histograms(tokens, jit):
    skip_unless_supported(spe=spe(2), jit=jit)
    skip_unjitted_on_jax(jit)
    rng = np.random.default_rng(1)
    batches = [
        (
            rng.integers(0, VOCAB, size=(2, n)).astype("int32")
            if tokens
            else rng.normal(size=(2, n, 3)).astype("float32"),
            rng.normal(size=(2, 2)).astype("float32"),
        )
        for n in LENGTHS
    ]
    watched = Model(*sliced_positions_layers(tokens), name="net")
    twin = keras.Model(*sliced_positions_layers(tokens), name="net")
    reference = keras.Model(*sliced_positions_layers(tokens), name="net")
    for model in (twin, reference):
        model.set_weights(watched.get_weights())
    for model in (watched, twin):
        model.compile(
            keras.optimizers.SGD(0.1, momentum=0.9),
            "mse",
            steps_per_execution=spe(2),
            jit_compile=jit,
        )
    stats = [*GRADIENT_STATS, "cos_prev"]
    watch = gradwatch.GradWatch(stats=stats, values="*", histogram=2)
    ha = watched.fit(Batches(batches), shuffle=False, callbacks=[watch], verbose=0)
    hb = twin.fit(Batches(batches), shuffle=False, verbose=0)

    assert ha.history == hb.history
    for a, b in zip(watched.get_weights(), twin.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    log = watch.log
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    grads = check_against_tape(log, reference, batches, optimizer, mse, GRADIENT_STATS)
    cos_prev = log.stat("cos_prev")
    for step, step_grads in enumerate(grads):
        for key, g in zip(log.variables, step_grads, strict=True):
            np.testing.assert_allclose(log.gradient(key, step), g, rtol=1e-5, atol=1e-7)
            counts = log.histogram(key, step)["count"].to_numpy()
            np.testing.assert_array_equal(counts, reference_bins(g, 2), err_msg=key)
            if step:
                previous = np.asarray(grads[step - 1][log.variables.index(key)], np.float64)
                cos = np.sum(g * previous) / np.linalg.norm(g) / np.linalg.norm(previous)
                assert cos_prev.loc[step, key] == pytest.approx(cos, rel=1e-4), (step, key)


@tf_only
@pytest.mark.parametrize("jit", [False, True])
def test_dynamic_shapes_stats_of_tensors_of_unknown_shape(jit):
    # `compute_stats` and `compute_histograms` traced with shapes known at run time
    # only, then run on tensors of several sizes, empty and non-finite ones included.
    import tensorflow as tf

    names = list(GRADIENT_STATS)
    spec = [tf.TensorSpec((None, 3)), tf.TensorSpec(None), tf.TensorSpec((4,))]

    @tf.function(input_signature=spec, jit_compile=jit)
    def stats_of(a, b, c):
        return compute_stats([a, b, c, None], names), compute_histograms([a, b, c], 1)

    c = np.array([10.0, 2.0, -3e-5, 0.0], "float32")
    cases = [
        (np.arange(6.0).reshape(2, 3) - 2.5, np.zeros((0,))),
        (np.zeros((0, 3)), np.array([[np.nan, np.inf], [3.0, 0.0]])),
    ]
    for a, b in cases:
        a, b = a.astype("float32"), b.astype("float32")
        table, counts = (np.asarray(t) for t in stats_of(a, b, c))
        for row, g in zip(table, (a, b, c), strict=False):
            expected = np_stats(g)
            np.testing.assert_allclose(row, [expected[n] for n in names], rtol=1e-6, atol=1e-12)
        assert np.isnan(table[3]).all()  # no gradient
        for row, g in zip(counts, (a, b, c), strict=True):
            np.testing.assert_array_equal(row, reference_bins(g, 1))


@tf_only
def test_dynamic_shapes_recorded_gradient_has_its_variables_shape():
    # A gradient's shape is its variable's, which Keras always knows: the record takes
    # it, so that the stats stack it with the other tensors of its size.
    import tensorflow as tf

    from gradwatch._backend import current

    table = keras.Variable(np.arange(12.0).reshape(4, 3), dtype="float32")

    @tf.function(input_signature=[tf.TensorSpec((), tf.int32)])
    def recorded(n):
        with tf.GradientTape() as tape:
            loss = ops.sum(ops.square(ops.slice(table.value, (0, 0), (n, 3))))
        grad = tape.gradient(loss, table.value)
        assert grad.shape.as_list() == [None, None]  # a Pad of run-time size
        out = current.as_recorded(grad, table)
        assert out.shape.as_list() == [4, 3]
        return out

    expected = 2.0 * np.arange(12.0).reshape(4, 3)
    expected[2:] = 0.0
    np.testing.assert_array_equal(recorded(tf.constant(2)), expected)
