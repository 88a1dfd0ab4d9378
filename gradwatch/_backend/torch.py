"""PyTorch: the step runs eagerly; gradwatch writes its device state in place, in raw
torch ops (each `keras.ops` call costs a Python layer on top of the dispatch)."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
from keras import ops

INDEX_DTYPE = "int64"


def host_copy(x: Any) -> np.ndarray:
    # Without the NumPy 2 copy warning that `ops.convert_to_numpy` gives on a torch tensor.
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy().copy()
    return np.array(ops.convert_to_numpy(x))


def read_rows(variable: Any, idx: np.ndarray) -> np.ndarray:
    return host_copy(variable.value)[idx]


def lift() -> Any:
    return contextlib.nullcontext()


def slot_of(count: Any, capacity: int) -> Any:
    # Stays a device tensor, so that writing never waits on the device.
    return (count.value % capacity).reshape(1)


def write_slot(variable: Any, slot: Any, value: Any) -> None:
    var = variable.value
    if isinstance(value, (bool, int, np.integer, np.bool_)):  # a host number (step, flag)
        var.index_fill_(0, slot, int(value))
        return
    value = ops.convert_to_tensor(value).to(var.dtype)
    var.index_copy_(0, slot, value.reshape(1, *var.shape[1:]))


def advance(count: Any) -> None:
    count.value.add_(1)
