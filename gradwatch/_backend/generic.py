"""Any other Keras backend (NumPy, OpenVINO): gradwatch does not record there
(`GradWatch` refuses it when training starts), but the public stats functions
(`gradwatch.stats.compute_stats`, `compute_histograms`) work, in `keras.ops`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from keras import ops

RECORDS = False  # GradWatch records on this backend
INDEX_DTYPE = "int64"
STATE_IN_STEP = False
APPLY_METHOD = None


def host_copy(x: Any) -> np.ndarray:
    return np.array(ops.convert_to_numpy(x))


def compiling() -> bool:
    return False


def cond(pred: Any, true_fn: Callable[[], Any], false_fn: Callable[[], Any]) -> Any:
    return ops.cond(pred, true_fn, false_fn)


OWN_TRAIN_STEP = False
GATES_IN_STEP = False


def make_train_function(model: Any, make: Callable, force: bool, custom: bool, capture: Any) -> Any:
    """Keras' train function, as it is."""
    return make(force)
