"""The gradient noise scale's small and big batches from one batch on the host: the
gradients of its two halves against the whole batch's (`GradWatch(noise_scale_every=N)`).

Like the replay of `gradwatch._forensics.replay`, this runs the model in a
`keras.StatelessScope`: nothing of the model changes (weights, optimizer, metrics,
random state, a BatchNormalization's moving statistics).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from gradwatch._backend import NAME as BACKEND
from gradwatch._backend import current as _backend
from gradwatch._forensics.replay import Batch, check_trainable, own_method


def halves_sq_norms(
    model: Any,
    batch: Batch,
    variables: Sequence[Any],
    weights: Mapping[int, np.ndarray] | None = None,
) -> tuple[int, int, float, float] | None:
    """The raw noise-scale estimate of one batch: `(small_batch, big_batch, g_small_sq,
    g_big_sq)`, over `variables`.

    The batch of `n` rows is cut into its first `h = n // 2` rows and the next `h`;
    `g_small_sq` is the mean of the squared norms of those halves' gradients, and
    `g_big_sq` the squared norm of the whole batch's (all `n` rows: with an odd `n`
    the last row is in neither half, which leaves both estimates unbiased). Each
    gradient is that of the loss the model trains on (its compiled loss, as a mean
    over the rows it is given, plus regularizers and `add_loss` terms), in training
    mode, at `weights`. The norms are summed in float64.

    Args:
        model: A compiled Keras model, with the stock `train_step`.
        batch: The step's batch (`x`, `y`, `sample_weight`, `n` rows), as NumPy
            arrays or tensors.
        variables: The trainable variables whose gradients' norms are summed (the
            watched ones).
        weights: The values of trainable variables, by `id(variable)`, to compute
            at (the weights before the step's update); a trainable variable not in
            it is taken as it is now. Defaults to `None`: every one as it is now.

    Returns:
        `(h, n, g_small_sq, g_big_sq)`; None for a batch of one row, which has no
        halves.

    Raises:
        ValueError: For a model whose own `train_step` computes the loss, which
            this cannot replay; for a variable not among the model's trainable ones.

    Example:

    ```python
    batch = Batch(x, y, None, n=len(x))
    small, big, g_small_sq, g_big_sq = halves_sq_norms(model, batch, model.trainable_variables)
    ```
    """
    if own_method(model, "train_step"):
        raise ValueError(
            f"The noise scale's halves cannot be computed for {type(model).__name__}: it "
            "has its own `train_step`, which computes the loss. Use the noise scale of "
            "`gradient_accumulation_steps` or `tf.distribute` instead."
        )
    trainable = list(model.trainable_variables)
    check_trainable(model, variables)
    n = int(batch.n)
    if n < 2:
        return None
    h = n // 2
    weights = weights or {}
    values = [
        ops.convert_to_tensor(weights[id(v)]) if id(v) in weights else v.value for v in trainable
    ]
    wanted = {id(v) for v in variables}
    first = _sq_norm(model, _rows(batch, 0, h), trainable, values, wanted)
    second = _sq_norm(model, _rows(batch, h, 2 * h), trainable, values, wanted)
    whole = _sq_norm(model, batch, trainable, values, wanted)
    return h, n, (first + second) / 2, whole


def _rows(batch: Batch, start: int, stop: int) -> Batch:
    def cut(part: Any) -> Any:
        return keras.tree.map_structure(lambda t: None if t is None else t[start:stop], part)

    return Batch(cut(batch.x), cut(batch.y), cut(batch.sample_weight), stop - start)


def _sq_norm(
    model: Any, batch: Batch, trainable: list[Any], values: list[Any], wanted: set[int]
) -> float:
    """The squared norm, over the `wanted` variables, of the gradient of the model's
    training loss on `batch` at `values`."""

    def loss_of(_: list[Any], current: list[Any]) -> Any:
        mapping = list(zip(trainable, current, strict=True))
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True):
            y_pred = model(batch.x, training=True)
            return model._compute_loss(
                x=batch.x,
                y=batch.y,
                y_pred=y_pred,
                sample_weight=batch.sample_weight,
                training=True,
            )

    grads = _backend.gradients_of(loss_of, [], values)
    if grads is None:
        raise ValueError(f"The noise scale's halves cannot be computed on the {BACKEND} backend.")
    total = 0.0
    for variable, g in zip(trainable, grads[1], strict=True):
        if id(variable) in wanted and g is not None:
            g = np.asarray(ops.convert_to_numpy(g), np.float64)
            total += float(np.sum(g * g))
    return total
