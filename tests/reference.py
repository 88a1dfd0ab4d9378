"""Independent references: NumPy stats and a plain tf.GradientTape training loop."""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def np_stats(g) -> dict[str, float]:
    """The stats catalogue, written out in NumPy from the README's definitions."""
    g = np.asarray(g, dtype=np.float64).ravel()
    finite = g[np.isfinite(g)]
    notnan = g[~np.isnan(g)]
    n = g.size
    return {
        "norm": float(np.sqrt(np.sum(finite**2))),
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
        with tf.GradientTape() as tape:
            pred = model(x, training=True)
            loss = loss_fn(y, pred, sw)
            if model.losses:
                loss = loss + tf.add_n(model.losses)
        grads = tape.gradient(loss, model.trainable_weights)
        steps.append([np.asarray(g) for g in grads])
        optimizer.apply_gradients(zip(grads, model.trainable_weights, strict=True))
    return steps


def mse(y, pred, sw=None):
    """Keras' `mse` with sum_over_batch_size reduction, written out."""
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
