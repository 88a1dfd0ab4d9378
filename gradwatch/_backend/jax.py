"""JAX: gradwatch's device state travels in the stateless step's state; writes are
assignments within the step's `StatelessScope`."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
from keras import ops

INDEX_DTYPE = "int32"  # JAX runs without 64-bit types unless asked


def host_copy(x: Any) -> np.ndarray:
    return np.array(ops.convert_to_numpy(x))


def read_rows(variable: Any, idx: np.ndarray) -> np.ndarray:
    return host_copy(variable.value)[idx]


def lift() -> Any:
    return contextlib.nullcontext()


def slot_of(count: Any, capacity: int) -> Any:
    return ops.cast(count.value % capacity, "int32")


def write_slot(variable: Any, slot: Any, value: Any) -> None:
    # Stateless: a dynamic-update-slice, assigned within the step's StatelessScope.
    value = ops.reshape(ops.cast(value, variable.dtype), (1, *variable.shape[1:]))
    start = (slot,) + (0,) * (len(variable.shape) - 1)
    variable.assign(ops.slice_update(variable.value, start, value))


def advance(count: Any) -> None:
    count.assign(count.value + ops.ones((), count.dtype))
