"""The examples behind a step: each example's loss and the norm of its own gradient in
one batch, on the weights from before the step (`log.examples`).

Like the replay of `gradwatch._forensics.replay`, this runs the model in a
`keras.StatelessScope`: nothing of the model changes (weights, optimizer, metrics,
random state, a BatchNormalization's moving statistics).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import keras
import numpy as np
from keras import ops

from gradwatch._backend import NAME as BACKEND
from gradwatch._backend import current as _backend
from gradwatch._forensics.replay import Batch, batch_loss, check_trainable, own_method

#: The ways each example's gradient is taken, tried in this order until one runs:
#: vectorised over the rows in one compiled call (JAX `vmap`, `torch.func.vmap`,
#: TensorFlow's `vectorized_map` under XLA), a compiled loop over the rows (JAX
#: `lax.map`, TensorFlow `map_fn`; PyTorch's loop is eager), an eager loop (a model that
#: cannot be traced, such as one that reads a tensor's value in Python).
PATHS = ("vectorized", "loop", "eager")
Path = Literal["vectorized", "loop", "eager"]


def unsupported(model: Any) -> str | None:
    """Why each example's gradient cannot be taken in `model`'s steps, or None where it can.

    Example:

    ```python
    unsupported(model)  # None
    unsupported(gan)    # 'GAN has its own `train_step`, which computes its loss: ...'
    ```
    """
    if not isinstance(model, keras.Model):
        return f"`model` must be a Keras model. Received: model of type {type(model).__name__}"
    if not _backend.RECORDS:
        return f"each example's gradient cannot be taken on the {BACKEND} backend."
    if own_method(model, "train_step"):
        return (
            f"{type(model).__name__} has its own `train_step`, which computes its loss: "
            "each example's gradient is taken of the loss that the stock `train_step` "
            "trains on (the model's `compute_loss`)."
        )
    if not model.built:
        return f"the model {model.name!r} is not built: it has no weights yet."
    return None


@dataclass
class _Compiled:
    """A model's compiled per-row functions, made once for its variables and loss."""

    key: tuple
    functions: dict[str, Callable] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)  # the rows each was compiled for
    path: str = PATHS[0]  # the first path not known to fail for this model


# Where a model keeps its `_Compiled` (in its `__dict__`, out of Keras' tracking: the
# compiled functions refer to the model, so a weak mapping from it would keep it alive).
_ATTRIBUTE = "_gradwatch_examples"


def example_gradients(
    model: Any,
    batch: Batch,
    variables: Sequence[Any],
    weights: Mapping[int, np.ndarray] | None = None,
    path: Path | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each example's loss in `batch`, and the L2 norm of its own gradient over `variables`.

    Example `i`'s loss is the model's training loss (the stock step's `compute_loss`:
    the compiled loss with the example's sample weight, plus the regularizers' and
    `add_loss` terms) on row `i` alone, as a batch of one, in training mode, at
    `weights`; its gradient is that loss's gradient, as if the batch held example `i`
    alone. For a model without layers that couple the rows of a batch and with a loss
    that is the mean over the rows (Keras' default reduction, `"sum_over_batch_size"`,
    sample weights included), the mean over the rows of these gradients is the step's
    gradient, and the mean of these losses the step's loss: the regularization terms
    count in full in each example's loss, as they do in the batch's.

    Where the step's gradient is not that mean, each example's gradient is still its
    own loss's, alone:
    - a BatchNormalization in training mode normalizes a batch of one by that row
      alone (its output is then its `beta`), so its gradient differs from what the
      row got in the batch;
    - dropout and other random layers draw their own masks, not the step's;
    - a loss with another reduction (`"sum"`) or that is not a sum over rows.

    The model does not change: its variables are read, never written (the replay
    runs in a `keras.StatelessScope`). The gradients are taken vectorised over the
    rows where the backend can (see `PATHS`), else in a loop; the compiled function
    is kept for the model's next call, and a smaller batch is padded to the rows it
    was compiled for (padded rows are dropped), so that it is compiled once.

    Args:
        model: A built, compiled Keras model with the stock `train_step`.
        batch: The step's batch (`x`, `y`, `sample_weight`, `n` rows; NumPy arrays or
            tensors, nested structures allowed, the rows on the first axis).
        variables: The trainable variables over which each gradient's norm is taken
            (the watched ones).
        weights: The values of the trainable variables, by `id(variable)`, to compute
            at (the weights before the step's update); a trainable variable not in it
            is taken as it is now. Defaults to `None`: every one as it is now.
        path: One of `PATHS` to use alone; `None` tries them in order and keeps, for
            the model's later calls, the first that runs. Defaults to `None`.

    Returns:
        `(losses, grad_norms)`: two float64 arrays of `n` values (NaN where an
        example's gradient holds a NaN, Inf where it overflows). Norms are taken in
        float64 from float32 gradients, scaled so that they do not overflow.

    Raises:
        ValueError: For a model that `unsupported` names a reason for, a variable
            that is not one of the model's trainable ones, an empty `variables`, or
            a weight whose shape is not its variable's.

    Example:

    ```python
    batch = Batch(x[:64], y[:64], None, n=64)
    losses, norms = example_gradients(model, batch, model.trainable_variables)
    np.argsort(norms)[-3:]  # the rows that pull the hardest
    ```
    """
    reason = unsupported(model)
    if reason is not None:
        raise ValueError(f"The examples behind a step cannot be computed: {reason}")
    if path is not None and path not in PATHS:
        raise ValueError(f"`path` must be one of {PATHS} or None. Received: path={path!r}")
    trainable = list(model.trainable_variables)
    check_trainable(model, variables)
    watched = list({id(v): v for v in variables}.values())
    if not watched:
        raise ValueError("`variables` is empty: name the variables whose gradient norm to take.")
    n = int(batch.n)
    if n == 0:
        return np.zeros(0), np.zeros(0)
    _backend.sync_state(model, model.variables[0])  # JAX: mid-epoch, the state is off the model
    wanted = {id(v) for v in watched}
    rest = [v for v in [*trainable, *model.non_trainable_variables] if id(v) not in wanted]
    weights = weights or {}
    values = [_value(v, weights) for v in watched]
    others = [_value(v, weights) for v in rest]
    structure = (batch.x, batch.y, batch.sample_weight)
    leaves = keras.tree.flatten(structure)
    present = [i for i, leaf in enumerate(leaves) if leaf is not None]
    host = [np.asarray(ops.convert_to_numpy(leaves[i])) for i in present]
    # The batch's layout alone (a compiled function is kept: not the batch's arrays).
    skeleton = keras.tree.map_structure(lambda _: None, structure)
    n_leaves = len(leaves)

    def loss_of(values: list[Any], others: list[Any], row: Sequence[Any]) -> Any:
        full: list[Any] = [None] * n_leaves
        for i, part in zip(present, row, strict=True):
            full[i] = ops.expand_dims(part, 0)
        x, y, sample_weight = keras.tree.pack_sequence_as(skeleton, full)
        mapping = [*zip(watched, values, strict=True), *zip(rest, others, strict=True)]
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True):
            y_pred = model(x, training=True)
            loss = batch_loss(model, Batch(x, y, sample_weight, 1), y_pred)
        return ops.cast(loss, "float32")

    layout = repr(keras.tree.map_structure(lambda t: t is not None, structure))
    compiled = _compiled(model, watched, rest, layout)
    tried = [path] if path is not None else list(PATHS[PATHS.index(compiled.path) :])
    for attempt in tried:
        try:
            if attempt == "eager":
                losses, norms = _eager(loss_of, values, others, host)
            else:
                losses, norms = _compiled_call(compiled, attempt, loss_of, values, others, host)
        except Exception:
            # A model the path cannot trace or vectorise: the next path, kept for the
            # model's later calls. The last path's error is the model's own.
            if attempt == tried[-1]:
                raise
            continue
        if path is None:
            compiled.path = attempt
        return losses, norms
    raise AssertionError("unreachable")  # pragma: no cover


def _value(variable: Any, weights: Mapping[int, np.ndarray]) -> Any:
    if id(variable) not in weights:
        return ops.convert_to_tensor(variable.value)
    value = np.asarray(weights[id(variable)])
    if tuple(value.shape) != tuple(variable.shape):
        raise ValueError(
            f"The weight given for `{variable.path}` must have its shape "
            f"{tuple(variable.shape)}. Received: shape={tuple(value.shape)}"
        )
    return ops.convert_to_tensor(value, dtype=variable.dtype)


def _compiled(model: Any, watched: list[Any], rest: list[Any], layout: str) -> _Compiled:
    """The model's compiled functions for these variables, its loss and the batch's
    layout (its structure, which parts are None), made anew when they change (a layer
    unfrozen, the model compiled again)."""
    key = (
        tuple(id(v) for v in watched),
        tuple(id(v) for v in rest),
        id(getattr(model, "_compile_loss", None)),
        layout,
    )
    entry = model.__dict__.get(_ATTRIBUTE)
    if entry is None or entry.key != key:
        entry = model.__dict__[_ATTRIBUTE] = _Compiled(key)
    return entry


def _compiled_call(
    compiled: _Compiled,
    path: str,
    loss_of: Callable,
    values: list[Any],
    others: list[Any],
    host: list[np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    n = len(host[0])
    function = compiled.functions.get(path)
    if function is None:
        function = _backend.row_gradients(loss_of, _reduce, path == "vectorized")
        compiled.functions[path] = function
    # A compiled function is made for its row count: a smaller batch (the epoch's
    # last) is padded with copies of its first row, dropped from the result.
    size = max(n, compiled.rows.get(path, 0))
    rows = tuple(ops.convert_to_tensor(_padded(a, size)) for a in host)
    loss, peaks, sums, nans = (
        np.asarray(ops.convert_to_numpy(t), np.float64)[:n] for t in function(values, others, rows)
    )
    compiled.rows[path] = size
    return loss, _norms(peaks, sums, nans)


def _padded(a: np.ndarray, size: int) -> np.ndarray:
    if len(a) == size:
        return a
    return np.concatenate([a, np.repeat(a[:1], size - len(a), axis=0)])


def _reduce(loss: Any, grads: list[Any]) -> tuple[Any, Any, Any, Any]:
    """One row's loss and, for each variable, what its gradient's norm is made of: the
    largest magnitude, the sum of squares scaled by it (which does not overflow), and
    the count of NaN elements."""
    peaks, sums, nans = [], [], []
    for g in grads:
        g = ops.reshape(ops.cast(g, "float32"), (-1,))
        if not int(np.prod(g.shape)):
            g = ops.zeros((1,), "float32")
        nan = ops.isnan(g)
        magnitude = ops.where(nan, 0.0, ops.abs(g))
        peak = ops.max(magnitude)
        scale = ops.where(ops.logical_and(peak > 0, ops.isfinite(peak)), peak, 1.0)
        peaks.append(peak)
        sums.append(ops.sum(ops.square(magnitude / scale)))
        nans.append(ops.sum(ops.cast(nan, "float32")))
    return ops.cast(loss, "float32"), ops.stack(peaks), ops.stack(sums), ops.stack(nans)


def _norms(peaks: np.ndarray, sums: np.ndarray, nans: np.ndarray) -> np.ndarray:
    """Each row's norm over the variables from `_reduce`'s parts `(rows, variables)`,
    in float64: NaN where a gradient held a NaN, Inf where one overflowed."""
    with np.errstate(invalid="ignore", over="ignore"):
        each = peaks * np.sqrt(sums)  # each variable's norm
        top = each.max(axis=1, keepdims=True)
        scale = np.where((top > 0) & np.isfinite(top), top, 1.0)
        norms = scale[:, 0] * np.sqrt(np.sum(np.square(each / scale), axis=1))
    norms = np.where(np.isinf(top[:, 0]), np.inf, norms)
    return np.where(nans.sum(axis=1) > 0, np.nan, norms)


def _eager(
    loss_of: Callable, values: list[Any], others: list[Any], host: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Row by row, op by op, with the replay's own gradient (`gradients_of`)."""
    losses, norms = [], []
    for i in range(len(host[0])):
        row = [ops.convert_to_tensor(a[i]) for a in host]
        found = _backend.gradients_of(lambda _, v, row=row: loss_of(v, others, row), [], values)
        if found is None:  # pragma: no cover - `unsupported` refuses such a backend
            raise ValueError(f"Gradients cannot be taken on the {BACKEND} backend.")
        total = 0.0
        for g in found[1]:
            if g is not None:
                g = np.asarray(ops.convert_to_numpy(g), np.float64)
                total += float(np.sum(g * g))
        # Its own call: inside the gradient, JAX's loss is a tracer.
        losses.append(float(ops.convert_to_numpy(loss_of(values, others, row))))
        norms.append(math.sqrt(total) if math.isfinite(total) else total)
    return np.asarray(losses, np.float64), np.asarray(norms, np.float64)
