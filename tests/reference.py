"""Independent references: NumPy stats and a plain gradient loop of the backend
(tf.GradientTape on TensorFlow, torch.autograd on PyTorch)."""

from __future__ import annotations

import contextlib

import keras
import numpy as np
import pytest
from keras import ops

BACKEND = keras.backend.backend()

if BACKEND == "tensorflow":
    import tensorflow as tf

# Tests of what only the TensorFlow backend has (tf.distribute, XLA).
tf_only = pytest.mark.skipif(
    BACKEND != "tensorflow", reason=f"TensorFlow-only feature; the backend is {BACKEND}"
)
# PyTorch runs one step per execution (Keras requires `steps_per_execution=1` there).
MAX_SPE = 1 if BACKEND == "torch" else None


# The "Stats" table of docs/reference.md, in its order, written out (not read from gradwatch.STATS).
README_STATS = [
    "norm",
    "mean",
    "std",
    "min",
    "max",
    "abs_max",
    "nonfinite",
    "zero_frac",
    "weight_norm",
    "update_norm",
    "update_ratio",
    "cos_prev",
    "clipped_norm",
    "v_ratio",
    "eps_frac",
    "update_cos",
]


def spe(n: int) -> int:
    """`n` steps per execution where the backend allows it, else 1."""
    return n if MAX_SPE is None else min(n, MAX_SPE)


def skip_on_jax(reason: str) -> None:
    """Skips a test whose model cannot run on JAX as written (a stateful custom step)."""
    if BACKEND == "jax":
        pytest.skip(f"not on JAX: {reason}")


def skip_unless_supported(spe: int = 1, jit: bool = False) -> None:
    """Skips a test case that the backend cannot run (not one gradwatch gets wrong)."""
    if BACKEND == "torch" and spe > 1:
        pytest.skip("Keras' PyTorch backend requires steps_per_execution=1")
    if BACKEND == "torch" and jit:
        # Not a gap: torch.compile takes 15-60 s a model on the CPU, so `jit_compile=True`
        # on PyTorch is tested once, in test_backends.py, against the same references.
        pytest.skip("torch jit_compile is tested in test_backends.py (compiling is slow)")


def skip_unjitted_jax_duplicate(jit: bool) -> None:
    """Skips, on JAX, a `jit_compile=False` case whose jitted twin runs beside it.

    Unjitted, Keras runs JAX's step op by op: gradwatch's code is the same as in the
    jitted step, at tens of seconds a test. `test_every_step_matches_a_plain_tape_loop`
    (`spe=1`) keeps JAX's unjitted step; the cases that call this run jitted only."""
    if BACKEND == "jax" and not jit:
        pytest.skip("JAX's unjitted step runs in test_every_step_matches_a_plain_tape_loop")


def grads_of(loss_fn, variables):
    """`(loss, gradients of loss_fn() with respect to variables)`, with the backend's
    own autodiff; `None` for a variable the loss does not depend on. `variables` may be
    a callable, read after the loss (a model is built by its first call)."""
    if BACKEND == "tensorflow":
        with tf.GradientTape() as tape:
            loss = loss_fn()
        variables = variables() if callable(variables) else variables
        return loss, tape.gradient(loss, variables)
    if BACKEND == "torch":
        import torch

        loss = loss_fn()
        variables = variables() if callable(variables) else variables
        grads = torch.autograd.grad(loss, [v.value for v in variables], allow_unused=True)
        return loss, list(grads)
    if BACKEND == "jax":
        import jax

        # Differentiate the stateful loss by mapping the variables to traced values.
        def stateless(values):
            mapping = list(zip(variables, values, strict=True))
            with keras.StatelessScope(state_mapping=mapping, collect_losses=True):
                return loss_fn()

        if callable(variables):
            loss_fn()  # builds the layers, so that the variables exist
            variables = variables()
        loss, grads = jax.value_and_grad(stateless)([v.value for v in variables])
        return loss, list(grads)
    raise NotImplementedError(f"no reference gradient loop for the {BACKEND} backend")


def no_grad():
    """Where weights are updated: outside autograd's graph on PyTorch."""
    if BACKEND == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


def np_stats(g) -> dict[str, float]:
    """The stats catalogue, written out in NumPy from the definitions in docs/reference.md."""
    g = np.asarray(g, dtype=np.float64).ravel()
    finite = g[np.isfinite(g)]
    notnan = g[~np.isnan(g)]
    n = g.size
    return {
        # NaN where no element is finite; 0 for an empty tensor.
        "norm": float(np.sqrt(np.sum(finite**2))) if finite.size or not n else np.nan,
        "mean": float(finite.mean()) if finite.size else np.nan,
        "std": float(finite.std()) if finite.size else np.nan,
        "min": float(notnan.min()) if notnan.size else np.nan,
        "max": float(notnan.max()) if notnan.size else np.nan,
        "abs_max": float(np.abs(notnan).max()) if notnan.size else np.nan,
        "nonfinite": float(n - finite.size),
        "zero_frac": float(np.mean(g == 0)) if n else np.nan,
    }


def tape_gradients(model, optimizer, batches, loss_fn):
    """Trains `model` with a plain tape loop; returns each step's gradients in weight order.

    `loss_fn(y, y_pred, sample_weight)` gives the data loss; the model's own losses
    (regularizers, `add_loss`) are added, as Keras does.
    """
    steps = []
    for x, y, sw in batches:

        def loss_of(x=x, y=y, sw=sw):
            pred = model(x, training=True)
            loss = loss_fn(y, pred, sw)
            if model.losses:
                loss = loss + (
                    tf.add_n(model.losses) if BACKEND == "tensorflow" else sum(model.losses)
                )
            return loss

        _, grads = grads_of(loss_of, model.trainable_weights)
        steps.append([ops.convert_to_numpy(g) for g in grads])
        with no_grad():
            optimizer.apply_gradients(zip(grads, model.trainable_weights, strict=True))
    return steps


def mse(y, pred, sw=None):
    """Keras' `mse` with sum_over_batch_size reduction, written out."""
    if BACKEND != "tensorflow":
        y, pred = ops.convert_to_tensor(y), ops.convert_to_tensor(pred)
        per_sample = ops.mean(ops.square(y - pred), axis=-1)
        if sw is not None:
            per_sample = per_sample * ops.reshape(ops.cast(sw, per_sample.dtype), (-1,))
        return ops.sum(per_sample) / per_sample.shape[0]
    per_sample = tf.reduce_mean(tf.square(y - pred), axis=-1)
    if sw is not None:
        per_sample = per_sample * tf.reshape(tf.cast(sw, per_sample.dtype), (-1,))
    return tf.reduce_sum(per_sample) / tf.cast(tf.shape(per_sample)[0], per_sample.dtype)


def batches_of(x, y, batch_size, sw=None):
    out = []
    for i in range(0, len(x), batch_size):
        out.append(
            (
                x[i : i + batch_size],
                y[i : i + batch_size],
                None if sw is None else sw[i : i + batch_size],
            )
        )
    return out


def reference_bins(g, bins_per_decade):
    """Histogram counts by searching the float32 edges, one element at a time:
    independent of the log10 in the step. Magnitudes below the smallest normal
    float32 count as zeros (`gradwatch.stats.histogram_bins`)."""
    k = 16 * bins_per_decade
    edges = (10.0 ** (-12 + np.arange(k + 1) / bins_per_decade)).astype(np.float32)
    g = np.asarray(g, np.float32).ravel()
    out = np.empty(g.size, np.int64)
    for n, v in enumerate(g):
        if not np.isfinite(v):
            out[n] = 2 * k + 1
        elif abs(v) < np.finfo(np.float32).tiny:
            out[n] = k
        else:
            j = int(np.clip(np.searchsorted(edges, abs(v), side="right") - 1, 0, k - 1))
            out[n] = k - 1 - j if v < 0 else k + 1 + j
    return np.bincount(out, minlength=2 * k + 2)


def log10_counts(g, bins_per_decade):
    """A NumPy histogram of log10 |g| over the finite non-zero elements, the
    out-of-range ones folded into the end bins (TensorBoard's buckets)."""
    g = np.asarray(g, np.float64).ravel()
    g = np.abs(g[np.isfinite(g) & (g != 0)])
    k = 16 * bins_per_decade
    edges = -12 + np.arange(k + 1) / bins_per_decade
    x = np.clip(np.log10(g), edges[0], edges[-1] - 1e-9)
    return np.histogram(x, bins=edges)[0]


def clipped_by_hand(grads, clipnorm=None, global_clipnorm=None, clipvalue=None):
    """The norms after Keras' documented clipping, written out in NumPy."""
    norms = np.array([np.linalg.norm(g) for g in grads])
    if clipnorm is not None:  # each gradient scaled to norm at most clipnorm
        return norms * clipnorm / np.maximum(norms, clipnorm)
    if global_clipnorm is not None:  # all scaled together to global norm at most clipnorm
        total = np.sqrt(np.sum(norms**2))
        return norms * global_clipnorm / max(total, global_clipnorm)
    if clipvalue is not None:  # each element clipped to [-clipvalue, clipvalue]
        return np.array([np.linalg.norm(np.clip(g, -clipvalue, clipvalue)) for g in grads])
    return norms


def cosine(a, b):
    """The cosine of two arrays, in float64."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
