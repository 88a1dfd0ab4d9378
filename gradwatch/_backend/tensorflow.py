"""TensorFlow: gradwatch's device state and ring-buffer writes, in TF's own ops (the
graph the TensorFlow tests pin), inside the compiled step."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from keras import ops

from gradwatch._lazy import tf
from gradwatch._step import Capture, Records, StepScope, run_in_scope
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


def run_step(fn: Callable, model: Any, commit: Callable, *args: Any, **kwargs: Any) -> Any:
    """Runs (traces) one counted step, and commits its records into it."""
    outputs, scope = run_in_scope(fn, model, *args, **kwargs)
    commit(model, scope)
    return outputs


OWN_TRAIN_STEP = False  # the stock step is recorded at `APPLY_METHOD`


def train_step(model: Any, *args: Any) -> Any:
    """Not used: the stock step is recorded at `APPLY_METHOD` (`OWN_TRAIN_STEP` is False)."""
    raise NotImplementedError(
        "gradwatch records the stock TensorFlow step at its `apply_gradients`"
    )


GATES_IN_STEP = False  # the host picks a train function with or without capture


def input_scope(model: Any, scope: StepScope) -> Any:
    """No scope: the step reads the variables themselves."""
    return contextlib.nullcontext()


def readable_in_step(model: Any, scope: StepScope, variable: Any) -> bool:
    """Every variable: the traced step reads the variables themselves."""
    return True


def make_train_function(
    model: Any, make: Callable, force: bool, custom: bool, capture: Capture
) -> Any:
    """Keras' train function, as it is: the step records inside it (XLA too)."""
    return make(force)


def outside_compile(fn: Callable) -> Callable:
    """`fn` itself: nothing compiles around the step here (`compiling()` is False)."""
    return fn


def note_stock_step(model: Any) -> None:
    """Nothing to note: the stock step is recorded at `APPLY_METHOD`."""
