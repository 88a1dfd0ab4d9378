"""The replay of the first step that `on_nonfinite` kept from the model, in `fit`: the
row of `log.origins` that names where its first NaN or Inf was born."""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
import numpy as np

from gradwatch._forensics.origin import NonfiniteOrigin
from gradwatch._forensics.replay import Batch, data_origin, replay

_TRACE_HINT = (
    "replay a batch with `gradwatch.trace_nonfinite(model, x, y)` on weights from "
    "before the step (a checkpoint)"
)

#: The `detail` of a step whose batch did not reach the host.
NO_BATCH = (
    "Step {step} could not be replayed: its batch did not reach the host (TensorFlow "
    "keeps it on the device in an XLA-compiled step, `jit_compile=True`, and under "
    "`tf.distribute`); to find the source, " + _TRACE_HINT + "."
)
#: The `detail` of a step whose execution's later steps changed the weights.
MOVED = (
    "The input and the targets are finite; the forward pass, the loss and the "
    "gradients of step {step} could not be replayed on the weights of that step: later "
    "steps of its execution (`steps_per_execution`) updated them; to find the source, "
    + _TRACE_HINT
    + "."
)


def untraced(step: int) -> NonfiniteOrigin:
    """The origin row of a kept step whose batch did not reach the host."""
    return NonfiniteOrigin(None, None, None, (), None, NO_BATCH.format(step=step))


def trace_kept(
    model: Any,
    kept: tuple[int, Any, Any, Any],
    intact: bool,
    batch_size: int | None,
    epoch_start: int,
) -> NonfiniteOrigin:
    """Replays the kept batch `(step, x, y, sample_weight)`: in full where the model's
    weights are those from before the step (`intact`), else its input and targets only
    (they do not depend on the weights). `samples` are the rows' indices in the
    training data where `fit` batched arrays in order (`batch_size`, else None).

    Example:

    ```python
    trace_kept(model, watch.skipped_batch, True, 32, 0).stage  # 'forward'
    ```
    """
    step, x, y, sample_weight = kept
    to_tensor = lambda part: (  # noqa: E731
        None
        if part is None
        else keras.tree.map_structure(
            lambda t: t if t is None else keras.ops.convert_to_tensor(t), part
        )
    )
    x, y, sample_weight = to_tensor(x), to_tensor(y), to_tensor(sample_weight)
    n = int(np.shape(keras.tree.flatten(x)[0])[0])
    batch = Batch(x, y, sample_weight, n)
    if intact:
        origin = replay(model, batch)
        if origin is None:
            origin = NonfiniteOrigin(
                None,
                None,
                None,
                (),
                None,
                f"The replay of step {step}'s batch on the weights from before it found "
                "its input, outputs, loss and gradients finite (a random op, such as "
                "dropout, drew otherwise in the step).",
            )
    else:
        origin = data_origin("input", {"x": x}, n) or data_origin(
            "target", {"y": y, "sample_weight": sample_weight}, n
        )
        if origin is None:
            origin = NonfiniteOrigin(None, None, None, (), None, MOVED.format(step=step))
    if batch_size is not None and origin.rows:
        first = (step - epoch_start) * batch_size
        origin = dataclasses.replace(origin, samples=tuple(first + r for r in origin.rows))
    return origin
