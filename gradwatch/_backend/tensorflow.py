"""TensorFlow: gradwatch's device state and ring-buffer writes, in TF's own ops (the
graph the TensorFlow tests pin), inside the compiled step."""

from __future__ import annotations

from typing import Any

import numpy as np
from keras import ops

from gradwatch._lazy import tf

INDEX_DTYPE = "int64"


def host_copy(x: Any) -> np.ndarray:
    return np.array(ops.convert_to_numpy(x))


def read_rows(variable: Any, idx: np.ndarray) -> np.ndarray:
    # Gathered on the device: a kept tensor's buffer can be large.
    return tf.gather(variable.value, tf.constant(idx, tf.int32)).numpy()


def lift() -> Any:
    # State made inside the first trace (a subclassed model builds there) is lifted out.
    return tf.init_scope()


def slot_of(count: Any, capacity: int) -> Any:
    return tf.cast(count.value % capacity, tf.int32)[None]


def write_slot(variable: Any, slot: Any, value: Any) -> None:
    var = variable.value
    value = tf.reshape(tf.cast(value, var.dtype), var.shape[1:])[None]
    if isinstance(var, tf.distribute.DistributedValues):
        # Distributed variables reject sparse updates: assign the whole buffer.
        var.assign(tf.tensor_scatter_nd_update(var, slot[:, None], value))
    else:
        # A sparse in-place update; it compiles once under XLA, whatever the slot.
        var.scatter_update(tf.IndexedSlices(value, slot))


def advance(count: Any) -> None:
    count.value.assign_add(1)
