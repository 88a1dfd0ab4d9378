"""TensorFlow: keeping a non-finite step's update from the model (the gate of each
`apply`, the snapshots that a step's later non-finite gradient puts back, the host
copy of the kept batch), the gradients and first non-finite op of a replay, each
example's gradient in a batch (`row_gradients`); and `cond`, a branch that costs nothing
where it is not taken. Re-exported by `gradwatch._backend.tensorflow`, the backend's one
module."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from keras import ops

from gradwatch._capture.step import StepScope
from gradwatch._lazy import tf


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


def all_finite(grads: Sequence[Any]) -> Any:
    """A bool tensor: every element of every gradient is finite (an `IndexedSlices`'
    rows). One reduction each, as a `LossScaleOptimizer` checks its gradients."""
    flags = [
        tf.reduce_all(tf.math.is_finite(g.values if isinstance(g, tf.IndexedSlices) else g))
        for g in grads
    ]
    return tf.reduce_all(tf.stack(flags))


def logical_and(a: Any, b: Any) -> Any:
    return tf.logical_and(a, b)


def logical_not(a: Any) -> Any:
    return tf.logical_not(a)


def _replicas() -> Any:
    """The replica context of a step that several replicas run, else None."""
    context = tf.distribute.get_replica_context()
    if not tf.distribute.has_strategy() or context is None:
        return None
    return context if context.num_replicas_in_sync > 1 else None


def agree_across_replicas(finite: Any) -> Any:
    """Under `tf.distribute`: finite on every replica (one scalar all-reduce), so that
    every replica takes the same branch; else `finite`."""
    context = _replicas()
    if context is None:
        return finite
    bad = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(tf.logical_not(finite), tf.int32))
    return tf.equal(bad, 0)


def _cross_replica_branch(
    context: Any, predicate: Any, fn: Callable[..., None], args: Sequence[Any]
) -> None:
    """Under `tf.distribute`: `fn(distribution, *args)` in the cross-replica context
    (`merge_call`), in a branch taken where `predicate` holds. Every replica holds the
    same `predicate` (`agree_across_replicas`), so the first one's decides."""

    def cross(distribution: Any, predicate: Any, *args: Any) -> None:
        first = distribution.experimental_local_results(predicate)[0]

        def taken() -> Any:
            fn(distribution, *args)
            return tf.constant(True)

        tf.cond(first, taken, lambda: tf.constant(False))

    context.merge_call(cross, args=(predicate, *args))


def gated_apply(
    model: Any, finite: Any, apply: Callable, args: tuple, skip: Callable[[], None]
) -> None:
    """Runs `apply(*args)` (an optimizer's `apply`) where `finite` holds, else `skip()`.

    A branch of the step; under `tf.distribute` it is taken in the cross-replica
    context, with `apply` run for each replica, as a `LossScaleOptimizer` does: a
    branch in the replica context cannot hold the optimizer's `merge_call`."""
    if tf.executing_eagerly():  # `run_eagerly=True`
        if bool(finite):
            apply(*args)
        else:
            skip()
        return
    context = _replicas()
    if context is not None:

        def each_replica(distribution: Any, *args: Any) -> None:
            distribution.extended.call_for_each_replica(apply, args=args)

        _cross_replica_branch(context, finite, each_replica, args)
        return

    def taken() -> Any:
        apply(*args)
        return tf.constant(True)

    def skipped() -> Any:
        skip()
        return tf.constant(False)

    cond(finite, taken, skipped)


def snapshots_free() -> bool:
    """Whether a snapshot of variables costs nothing unless it is restored: in a traced
    step (a read nothing uses is pruned), not eagerly (`run_eagerly=True`)."""
    return not tf.executing_eagerly()


def restore_where(model: Any, predicate: Any, saved: Sequence[tuple[Any, Any]]) -> None:
    """Where `predicate` holds, puts each variable of `saved` back to its value there:
    a branch of the step; under `tf.distribute` taken in the cross-replica context, each
    replica's variable from its own value, as `gated_apply` applies."""
    if tf.executing_eagerly():
        if bool(predicate):
            for variable, value in saved:
                variable.assign(value)
        return
    context = _replicas()
    if context is not None:

        def each_replica(distribution: Any, *values: Any) -> None:
            for (variable, _), value in zip(saved, values, strict=True):
                distribution.extended.update(
                    variable.value, lambda v, x: v.assign(x), args=(value,), group=False
                )

        _cross_replica_branch(context, predicate, each_replica, [v for _, v in saved])
        return

    def taken() -> Any:
        for variable, value in saved:
            variable.assign(value)
        return tf.constant(True)

    cond(predicate, taken, lambda: tf.constant(False))


def to_host(model: Any, keep: Callable[..., None], step: Any, leaves: Sequence[Any]) -> None:
    """Calls `keep(step, *leaves)` on the host with NumPy arrays, from the branch of the
    step being traced (a `numpy_function`, run only where the branch is taken). Not in an
    XLA-compiled step (`jit_compile=True`), where a host call cannot run, nor under
    `tf.distribute` (each replica holds a part of the batch), nor for composite tensors."""
    if not all(isinstance(x, tf.Tensor) for x in leaves):
        return
    if tf.executing_eagerly():
        keep(step.numpy(), *(x.numpy() for x in leaves))
        return
    if model.jit_compile or _replicas() is not None:
        return

    def call(step: Any, *arrays: Any) -> Any:
        keep(step, *arrays)
        return np.int64(0)

    tf.numpy_function(call, [step, *leaves], tf.int64, stateful=True)


def undo_step(model: Any, scope: StepScope, finite: Any, skip: Callable[[], None]) -> None:
    """Not used: each `apply` is gated in the step (`gated_apply`)."""


def new_flag() -> Any:
    """A bool variable of the step (`read_value()`, `assign`), made out of the graph."""
    with tf.init_scope():
        return tf.Variable(False, trainable=False, name="gradwatch_halted")


# ------------------------------------------------- the replay of a batch (`_forensics`)
def gradients_of(
    fn: Callable[[list[Any], list[Any]], Any], probes: Sequence[Any], values: Sequence[Any]
) -> tuple[list[Any], list[Any]]:
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        probes = [tf.identity(p) for p in probes]
        values = [tf.identity(v) for v in values]
        tape.watch([*probes, *values])
        loss = fn(probes, values)
    grads = tape.gradient(loss, [*probes, *values])
    grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
    return grads[: len(probes)], grads[len(probes) :]


# What `enable_check_numerics` raises with: `... in output 0 of eagerly-executing op "Log" ...`.
_CHECK_NUMERICS_OP = re.compile(r'Detected Infinity or NaN in output \d+ of [\w-]+ op "([^"]+)"')


def first_nonfinite_op(fn: Callable[[], Any]) -> str | None:
    # Per thread, and only for the length of `fn`: every eager op's float outputs are
    # checked, and the first one holding a NaN or Inf raises with the op's type.
    tf.debugging.enable_check_numerics()
    try:
        fn()
    except tf.errors.InvalidArgumentError as e:
        found = _CHECK_NUMERICS_OP.search(e.message)
        return found.group(1) if found else None
    finally:
        tf.debugging.disable_check_numerics()
    return None


def row_gradients(
    loss_of: Callable[[list[Any], list[Any], Any], Any],
    reduce: Callable[[Any, list[Any]], Any],
    vectorized: bool,
) -> Callable[[list[Any], list[Any], Any], Any]:
    def one(values: list[Any], others: list[Any], row: Any) -> Any:
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            values = [tf.identity(v) for v in values]
            tape.watch(values)
            loss = loss_of(values, others, row)
        grads = tape.gradient(loss, values)
        grads = [
            tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)  # IndexedSlices
            for v, g in zip(values, grads, strict=True)
        ]
        return reduce(loss, grads)

    if vectorized:
        # Under XLA only: TF 2.21's own kernels for what `pfor` makes of Keras'
        # `EinsumDense` (so `MultiHeadAttention`) corrupt memory (`free(): invalid
        # pointer`, wrong values, a crash), on the CPU; XLA compiles the same graph right.
        @tf.function(jit_compile=True)
        def mapped(values: list[Any], others: list[Any], rows: Any) -> Any:
            return tf.vectorized_map(lambda row: one(values, others, row), rows)

    else:

        @tf.function
        def mapped(values: list[Any], others: list[Any], rows: Any) -> Any:
            first = one(values, others, tuple(part[0] for part in rows))
            signature = tuple(tf.TensorSpec(t.shape, t.dtype) for t in first)
            return tf.map_fn(
                lambda row: one(values, others, row), rows, fn_output_signature=signature
            )

    def run(values: list[Any], others: list[Any], rows: Any) -> Any:
        # pfor falls back to a loop for an op it cannot vectorise (the filter gradient
        # of a convolution) and logs a warning for each: the result is the same.
        logger = tf.get_logger()
        level = logger.level
        logger.setLevel("ERROR")
        try:
            return mapped(list(values), list(others), tuple(rows))
        finally:
            logger.setLevel(level)

    return run
