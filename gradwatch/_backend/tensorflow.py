"""TensorFlow: gradwatch's device state and ring-buffer writes, in TF's own ops (the
graph the TensorFlow tests pin), inside the compiled step."""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from keras import ops

from gradwatch import _kernels
from gradwatch._lazy import tf
from gradwatch._step import Records
from gradwatch.sparse import SparseGradient, dense

RECORDS = True  # GradWatch records on this backend
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


# Whether gradwatch's device state travels in the step's state (as metrics).
STATE_IN_STEP = False
# The optimizer method that the stock `train_step` hands the gradients to.
APPLY_METHOD = "apply_gradients"


def new_counter() -> Any:
    """The model's step counter: a variable, built lazily inside the first trace
    (init_scope lifts it out of the graph)."""
    with tf.init_scope():
        return tf.Variable(0, dtype=tf.int64, trainable=False, name="gradwatch_step")


def counter_metrics(counter: Any) -> list[Any]:
    return []


def skipped_update(loss_scaled: Iterable[tuple[Any, Any]]) -> Any:
    """A bool tensor: did a loss-scale optimizer leave `iterations` where it was?"""
    return tf.reduce_any(
        tf.stack(
            [tf.equal(tf.convert_to_tensor(opt.iterations), before) for opt, before in loss_scaled]
        )
    )


def iterations_now(optimizer: Any) -> Any:
    return tf.convert_to_tensor(optimizer.iterations)


def weights_before(variable: Any) -> Any:
    return tf.convert_to_tensor(variable)


def as_recorded(grad: Any, variable: Any) -> Any:
    """The gradient as gradwatch keeps it: an `IndexedSlices` as its touched rows
    (repeats summed, as the dense gradient has them), so that a large table is not
    densified at every step."""
    if isinstance(grad, tf.IndexedSlices):
        return SparseGradient.from_indexed_slices(grad, tuple(variable.shape))
    return grad


def float32(x: Any) -> Any:
    return tf.cast(x, tf.float32)


def global_records(records: Records) -> Records:
    """The records with each replica's local gradient replaced by the global one.

    Under `tf.distribute` the step runs once per replica, and each replica hands
    the optimizer its local gradient, already divided by the number of replicas;
    the optimizer sums them over the replicas. The sum is the gradient of the
    global batch. This all-reduce is for the stats alone: the optimizer keeps
    the local gradients, and does its own all-reduce. Without a strategy, or
    with one replica, the records are returned as they are.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return records
    keys = [k for k, record in records.items() if record.grad is not None]
    if not keys:
        return records
    # One batched all-reduce, as the optimizer does its own.
    # (A sparse gradient is made dense here: replicas touch different rows.)
    summed = context.all_reduce(tf.distribute.ReduceOp.SUM, [dense(records[k].grad) for k in keys])
    out = dict(records)
    for k, grad in zip(keys, summed, strict=True):
        out[k] = records[k].with_grad(grad)
    return out


def compiling() -> bool:
    """Whether `torch.compile` is tracing (never, here)."""
    return False


def cond(pred: Any, true_fn: Callable[[], Any], false_fn: Callable[[], Any]) -> Any:
    """`ops.cond`, kept as one function call on TensorFlow graphs.

    `tf.cond` in a `tf.function` is lowered to Switch/Merge, and every op of the
    branch not taken is still visited; for the rarely taken exact path that is
    a cost on every step. Unlowered, the branch not taken costs nothing.
    """
    if not tf.executing_eagerly():
        try:
            from tensorflow.python.ops import cond_v2
        except ImportError:  # pragma: no cover - private module moved
            return ops.cond(pred, true_fn, false_fn)
        return cond_v2.indexed_case(
            tf.cast(pred, tf.int32), [false_fn, true_fn], lower_using_switch_merge=False
        )
    return ops.cond(pred, true_fn, false_fn)


def when(predicate: Any, fn: Callable[[], None], variables: Sequence[Any]) -> None:
    """Runs `fn`, which assigns some of `variables`, only where `predicate` holds:
    a branch in the step, on the traced step number."""

    def taken() -> Any:
        fn()
        return tf.constant(True)

    cond(predicate, taken, lambda: tf.constant(False))


def stats_table(tensors: Sequence[Any], stats: tuple[str, ...]) -> None:
    """None: `compute_stats`' shared algorithm serves TensorFlow."""
    return None


def row_sums_of_squares(x: Any, source: Any = None) -> Any:
    """Each row's sum of squares of a 2-D float32 tensor; a single row in one L2Loss op."""
    # On a single tensor, L2Loss reads the tensor itself (`source`, the tensor the row
    # was reshaped from), so that the same op in GradWatch's every-step check is the
    # same node and computed once.
    if x.shape[0] == 1:
        return ops.reshape(sum_of_squares(x if source is None else source), (1,))
    return ops.sum(ops.square(x), axis=1)


_xla = threading.local()


@contextlib.contextmanager
def traced_for_xla(flag: bool) -> Iterator[None]:
    """Tells `sum_of_squares` that the step being traced is compiled with XLA."""
    before = getattr(_xla, "on", False)
    _xla.on = bool(flag)
    try:
        yield
    finally:
        _xla.on = before


def sum_of_squares(g: Any) -> Any:
    """`sum(g**2)` as a scalar in one L2Loss op (one pass, XLA-compatible)."""
    g = tf.cast(g, tf.float32)
    if getattr(_xla, "on", False):
        # XLA's CPU backend runs a reduction with the square fused into it several
        # times slower than a plain sum: keep the square a separate pass (the MLP's
        # jit row measured 1.36x -> 1.23x).
        try:
            from tensorflow.compiler.tf2xla.python import xla
        except ImportError:  # pragma: no cover - private module moved
            return 2.0 * tf.nn.l2_loss(g)
        (squares,) = xla.optimization_barrier([tf.square(g)])
        return tf.reduce_sum(squares)
    return 2.0 * tf.nn.l2_loss(g)


def unscaled_float32(g: Any, scale: Any = None) -> Any:
    """`g` in float32, divided by a loss scale if one is given; sparse stays sparse."""

    def fn(x):
        x = tf.cast(x, tf.float32)
        return x if scale is None else x / scale

    return g.map(fn) if isinstance(g, SparseGradient) else fn(g)


_FUSED: dict[Any, Any] = {}


def fused(fn: Callable[..., Any], key: Any) -> Callable[..., Any]:
    """`fn` compiled with XLA (once per `key`), also inside a step that is not.

    XLA fuses the dozen elementwise ops of the histogram's binning into one pass over
    the elements, which measured 5x faster on the CPU than running them one by one.
    """
    if key not in _FUSED:
        _FUSED[key] = tf.function(fn, jit_compile=True, autograph=False)
    return _FUSED[key]


def bincount(idx: Any, length: int) -> Any:
    """How often each of `0 .. length - 1` occurs in the int32 tensor `idx`."""
    # A bincount: on the CPU an unsorted segment sum of ones was 20x slower.
    return tf.raw_ops.DenseBincount(
        input=idx, size=length, weights=tf.zeros([0], tf.int32), binary_output=False
    )


bin_index = _kernels.bin_index


def sparse_stats(g: SparseGradient) -> dict[str, Any]:
    """Every stat of a sparse gradient's dense equivalent, from its touched rows alone:
    the untouched elements are zeros that count in `n` but add nothing to the sums."""
    nan = math.nan
    x = tf.reshape(tf.cast(g.rows, tf.float32), (-1,))
    valid = tf.reshape(g.valid(), (-1,))
    zeros = g.implicit_zeros()
    n = float(g.size)
    finite = ops.isfinite(x) & valid
    notnan = ops.logical_not(ops.isnan(x)) & valid
    n_finite = ops.sum(ops.cast(finite, "float32")) + zeros
    none_left = ops.sum(ops.cast(notnan, "float32")) + zeros == 0
    xf = ops.where(finite, x, 0.0)
    safe_n = ops.maximum(n_finite, 1.0)
    mean = ops.where(n_finite == 0, nan, ops.sum(xf) / safe_n)
    m0 = ops.nan_to_num(mean)
    spread = ops.sum(ops.square(ops.where(finite, x - m0, 0.0))) + zeros * ops.square(m0)
    # tf's reductions: Keras' refuse an empty tensor (a step that touched no row).
    lo = tf.reduce_min(ops.where(notnan, x, math.inf))
    hi = tf.reduce_max(ops.where(notnan, x, -math.inf))
    some_zero = zeros > 0
    lo = ops.where(some_zero, ops.minimum(lo, 0.0), lo)
    hi = ops.where(some_zero, ops.maximum(hi, 0.0), hi)
    abs_max = tf.reduce_max(ops.where(notnan, ops.abs(x), -1.0))
    abs_max = ops.where(some_zero, ops.maximum(abs_max, 0.0), abs_max)
    n_valid = ops.sum(ops.cast(valid, "float32"))
    return {
        "norm": ops.sqrt(ops.sum(ops.square(xf))),
        "mean": mean,
        "std": ops.where(n_finite == 0, nan, ops.sqrt(spread / safe_n)),
        "min": ops.where(none_left, nan, lo),
        "max": ops.where(none_left, nan, hi),
        "abs_max": ops.where(none_left, nan, abs_max),
        "nonfinite": n_valid - (n_finite - zeros),
        "zero_frac": (ops.sum(ops.cast(ops.equal(x, 0.0) & valid, "float32")) + zeros) / n,
    }
