"""TensorFlow: gradwatch's device state and ring-buffer writes, in TF's own ops (the
graph the TensorFlow tests pin), inside the compiled step."""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from keras import ops

from gradwatch._backend import generic
from gradwatch._backend import tensorflow_skip as _skip
from gradwatch._capture.step import Records, model_state, run_in_scope
from gradwatch._lazy import tf
from gradwatch._stats import kernels as _kernels
from gradwatch.sparse import SparseGradient, dense

RECORDS = True  # GradWatch records on this backend

# The same as on the backends gradwatch does not record (`generic`).
input_scope = generic.input_scope
make_train_function = generic.make_train_function
note_stock_step = generic.note_stock_step
outside_compile = generic.outside_compile
readable_in_step = generic.readable_in_step
stats_table = generic.stats_table
total_sum_of_squares = generic.total_sum_of_squares

# Keeping a step's update from the model, the gradients of a replay and of each example
# in a batch; and `cond`.
agree_across_replicas = _skip.agree_across_replicas
all_finite = _skip.all_finite
cond = _skip.cond
first_nonfinite_op = _skip.first_nonfinite_op
gated_apply = _skip.gated_apply
gradients_of = _skip.gradients_of
logical_and = _skip.logical_and
logical_not = _skip.logical_not
new_flag = _skip.new_flag
restore_where = _skip.restore_where
row_gradients = _skip.row_gradients
snapshots_free = _skip.snapshots_free
to_host = _skip.to_host
undo_step = _skip.undo_step

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
# gradwatch's state is made before the first trace where it can be: `tf.function`
# traces a function that creates variables twice.
PREMAKES_STATE = True
# The optimizer method that the stock `train_step` hands the gradients to.
APPLY_METHOD = "apply_gradients"


def new_counter(start: int = 0) -> Any:
    """The model's step counter: a variable, built lazily inside the first trace
    (init_scope lifts it out of the graph)."""
    with tf.init_scope():
        return tf.Variable(start, dtype=tf.int64, trainable=False, name="gradwatch_step")


def counter_metrics(counter: Any) -> list[Any]:
    return []


def skipped_update(loss_scaled: Iterable[tuple[Any, Any]]) -> Any:
    """A bool tensor: did a loss-scale optimizer leave its step count where it was?"""
    return tf.reduce_any(
        tf.stack([tf.equal(tf.convert_to_tensor(count), before) for count, before in loss_scaled])
    )


def counter_now(counter: Any) -> Any:
    return tf.convert_to_tensor(counter)


def weights_before(variable: Any) -> Any:
    return tf.convert_to_tensor(variable)


def as_recorded(grad: Any, variable: Any) -> Any:
    """The gradient as gradwatch keeps it: an `IndexedSlices` as its touched rows
    (repeats summed, as the dense gradient has them), so that a large table is not
    densified at every step; a dense one with its variable's shape.

    A gradient has its variable's shape, but the traced graph may not know it: a table
    sliced to the batch's sequence length (`ops.slice`, as KerasHub's position
    embeddings do) has a `Pad` for its gradient, whose static shape is `(None, None)`
    when the sequence length is known at run time only. The stats, kept tensors and
    histograms then read the variable's shape, which Keras always knows.
    """
    if isinstance(grad, tf.IndexedSlices):
        return SparseGradient.from_indexed_slices(grad, tuple(variable.shape))
    if tf.is_tensor(grad) and not grad.shape.is_fully_defined():
        return tf.ensure_shape(grad, variable.shape)
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


_TRACED_ONCE: dict[Hashable, Any] = {}


def traced_once(key: Hashable, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`fn` as one `tf.function` per process, traced once for any 2-D float32 input:
    called in a traced step it is one op, however many tensors it serves and however
    often the step is traced (the exact path of every group of every step's stats)."""
    function = _TRACED_ONCE.get(key)
    if function is None:
        function = _TRACED_ONCE[key] = tf.function(
            fn, input_signature=[tf.TensorSpec([None, None], tf.float32)], autograph=False
        )
    return function


def when(predicate: Any, fn: Callable[[], None], variables: Sequence[Any]) -> None:
    """Runs `fn`, which assigns some of `variables`, only where `predicate` holds:
    a branch in the step, on the traced step number."""

    def taken() -> Any:
        fn()
        return tf.constant(True)

    cond(predicate, taken, lambda: tf.constant(False))


# ------------------------------------------------- the array functions of the step
class Ops:
    """The array functions that shared code computes its derived stats and checks
    with (`gradwatch._stats.derived`), in TF's own ops: the graph the TensorFlow tests pin."""

    # The stats table is sliced into columns and restacked in the stats' order.
    restack = True

    @staticmethod
    def stack(xs: Sequence[Any], axis: int = 0) -> Any:
        return tf.stack(xs, axis=axis)

    @staticmethod
    def concat(xs: Sequence[Any]) -> Any:
        return tf.concat(xs, axis=0)

    @staticmethod
    def flat(x: Any) -> Any:
        return tf.reshape(x, (-1,))

    @staticmethod
    def split(x: Any, sizes: Sequence[int]) -> list[Any]:
        return tf.split(x, sizes)

    @staticmethod
    def sum(x: Any) -> Any:
        return tf.reduce_sum(x)

    @staticmethod
    def sqrt(x: Any) -> Any:
        return tf.sqrt(x)

    @staticmethod
    def maximum(a: Any, b: Any) -> Any:
        return tf.maximum(a, b)

    @staticmethod
    def minimum(a: Any, b: Any) -> Any:
        return tf.minimum(a, b)

    @staticmethod
    def clip(x: Any, lo: float, hi: float) -> Any:
        return tf.clip_by_value(x, lo, hi)

    @staticmethod
    def full(shape: Sequence[int], value: float) -> Any:
        return tf.fill(shape, tf.constant(value, tf.float32))

    @staticmethod
    def zeros(shape: Sequence[int]) -> Any:
        return tf.zeros(shape, tf.float32)

    @staticmethod
    def nan() -> Any:
        return tf.constant(math.nan, tf.float32)

    @staticmethod
    def where(cond: Any, a: Any, b: Any) -> Any:
        return tf.where(cond, a, b)

    @staticmethod
    def equal(a: Any, b: Any) -> Any:
        return tf.equal(a, b)

    @staticmethod
    def cast(x: Any, dtype: Any) -> Any:
        return tf.cast(x, dtype)

    @staticmethod
    def read(variable: Any) -> Any:
        """A variable's value, read in the step (after the update, where it ran)."""
        return tf.convert_to_tensor(variable)

    @staticmethod
    def assign(variable: Any, value: Any) -> None:
        variable.value.assign(value)

    # The every-step check.
    @staticmethod
    def false() -> Any:
        return tf.constant(False)

    @staticmethod
    def any(x: Any) -> Any:
        return tf.reduce_any(x)

    @staticmethod
    def isfinite(x: Any) -> Any:
        return tf.math.is_finite(x)

    @staticmethod
    def logical_not(x: Any) -> Any:
        return tf.logical_not(x)

    @staticmethod
    def logical_and(a: Any, b: Any) -> Any:
        return a & b

    @staticmethod
    def logical_or(a: Any, b: Any) -> Any:
        return a | b

    @staticmethod
    def false_like(x: Any) -> Any:
        return tf.zeros_like(x, tf.bool)

    @staticmethod
    def note_first(tripped: Any, step_var: Any, sq_var: Any, step: Any, sq: Any) -> None:
        """Keeps the step and the sums of squares of the first step that `tripped`.
        Branchless: a branch taking every gradient costs more than these small ops."""
        first = tripped & (step_var.read_value() < 0)
        step_var.assign(tf.where(first, step, step_var.read_value()))
        sq_var.assign(tf.where(first, sq, sq_var.read_value()))

    @staticmethod
    def count_tripped(variable: Any, flags: Sequence[Any]) -> None:
        variable.assign_add(tf.cast(tf.stack(flags), tf.int64))


OPS = CHECK_OPS = Ops


def squares_by_row(grads: Sequence[Any], rows: Sequence[int], n: int) -> Any:
    """The every-step check's input: each of `n` rows' sum of squares, 0 where `rows`
    has no gradient. The same L2Loss ops as the stats kernel's, so that grappler
    computes them once."""
    index = tf.constant([[j] for j in rows], tf.int32)
    return tf.scatter_nd(index, tf.stack([sum_of_squares(g) for g in grads]), [n])


def alarm_cell(owner: Any, shape: tuple[int, ...], dtype: str, value: float, name: str) -> Any:
    """One of the every-step check's device values: a variable, out of the graph."""
    with tf.init_scope():
        return tf.Variable(
            np.full(shape, value, dtype), dtype=dtype, trainable=False, name=f"gradwatch_{name}"
        )


# The capture runs on host values, outside any traced step (PyTorch).
EAGER = False
# `per_replica`: tf.distribute runs the step once per replica.
DISTRIBUTES = True


def sync_state(model: Any, variable: Any) -> bool:
    """Makes the model's device state readable; False if `variable` has no value."""
    return True


def all_gather(x: Any) -> Any:
    """`x` from every replica, stacked on axis 0 in replica order (one replica: `x`)."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return x
    return context.all_gather(x, axis=0)


def all_reduce_sum(xs: list[Any]) -> list[Any]:
    """Each of `xs` summed over the replicas, in one batched all-reduce."""
    context = tf.distribute.get_replica_context()
    return context.all_reduce(tf.distribute.ReduceOp.SUM, xs)


def num_replicas(model: Any) -> int:
    return int(model.distribute_strategy.num_replicas_in_sync)


def worker_of(model: Any) -> tuple[int, bool]:
    """This process's worker index in the cluster and whether it is the chief.

    Without a multi-worker strategy: worker 0, the chief. With one, the index of
    `TF_CONFIG`'s task among all tasks, a `chief` task first, then the `worker`
    tasks; without a `chief` task, worker 0 is the chief (as in Keras).
    """
    strategy = model.distribute_strategy
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return 0, True
    resolver = strategy.cluster_resolver
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type in (None, "chief"):
        return 0, True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    index = int(task_id or 0) + (1 if has_chief else 0)
    return index, index == 0


def _sync_strategies() -> tuple[type, ...]:
    """Strategies whose replicas run the step in sync and sum their gradients; gradwatch
    records the global gradient under these."""
    return (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy)


def check_strategy(model: Any) -> None:
    """Refuses, before any step runs, what gradwatch cannot record correctly under
    `tf.distribute`, and what Keras itself cannot train (it would fail mid-step;
    across workers, a failed worker can leave the others waiting)."""
    import keras

    strategy = model.distribute_strategy
    name = type(strategy).__name__
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        name = "MultiWorkerMirroredStrategy"  # not its internal class's name
    if not isinstance(strategy, _sync_strategies()):
        if isinstance(strategy, tf.distribute.OneDeviceStrategy) or (
            strategy is tf.distribute.get_strategy() and not tf.distribute.has_strategy()
        ):
            return  # one replica: its gradient is the global one
        raise NotImplementedError(
            "gradwatch records the global gradient under MirroredStrategy and "
            "MultiWorkerMirroredStrategy (and without a strategy, or with "
            f"OneDeviceStrategy). Received: a model built under {name}. Train it "
            "without a GradWatch, or under one of those strategies."
        )
    spe = int(model.steps_per_execution)
    jit = bool(model.jit_compile)
    if spe > 1 or jit:
        raise ValueError(
            f"Keras {keras.version()} cannot train a model under {name} with "
            "`steps_per_execution > 1` or `jit_compile=True`: the compiled step fails "
            "inside Keras, with or without gradwatch. Received: "
            f"steps_per_execution={spe}, jit_compile={jit}. Compile the model with "
            "`steps_per_execution=1, jit_compile=False` to train it with a GradWatch."
        )


def run_step(fn: Callable, model: Any, commit: Callable, *args: Any, **kwargs: Any) -> Any:
    """Runs (traces) one counted step, and commits its records into it. The step's
    unseeded stateful random ops continue one stream per op across the model's traced
    train functions (see `continued_random_streams`).

    The count and the writes wait for the step's data: see `after_data`."""
    with continued_random_streams(model):
        outputs, scope = run_in_scope(fn, model, *args, **kwargs)
    with after_data(args, kwargs):
        commit(model, scope)
    return outputs


def after_data(*data: Any) -> Any:
    """A scope whose ops run only once the step's input tensors are there.

    Keras' TensorFlow trainer calls the step on `iterator.get_next()` with
    `steps_per_execution=1`, and at the end of a dataset of unknown cardinality (a
    generator, a `filter`) that raises `OutOfRangeError`. The step's function is inlined
    into the caller's graph, so an op of the step that reads no data (the step
    counter's increment, the write of the step number) may run before the failed fetch
    stops the graph: a step that never ran would be counted and written. (Under XLA the
    step is one op, which waits for its inputs; with `steps_per_execution > 1` Keras
    runs it in a branch taken only once data was fetched.)
    """
    tensors = [t for t in tf.nest.flatten(data, expand_composites=True) if isinstance(t, tf.Tensor)]
    if not tensors or tf.executing_eagerly():
        return contextlib.nullcontext()
    return tf.control_dependencies(tensors)


# ------------------------------------------- stateful random ops in the traced step
# A stateful random op (`tf.random.normal` in a GAN's step; seeded from the global seed
# alone) keeps its stream in its kernel, one per traced function. Plain Keras traces
# one train function per compile, and the stream goes on across steps and fits. gradwatch
# traces more (with and without capture for `every`, anew when the watches change):
# each would restart the stream (u0, u0, u1, u1 for u0, u1, u2, u3). So while gradwatch
# traces a step, each such op is made its stateless twin on the same Philox key and
# counter, the counter kept in a variable that every traced function of the model
# shares: the numbers are bitwise those of the stateful op, continued.
_STATELESS_TWIN = {
    "random_standard_normal": "stateless_random_normal_v2",
    "random_uniform": "stateless_random_uniform_v2",
    "truncated_normal": "stateless_truncated_normal_v2",
    "random_uniform_int": "stateless_random_uniform_int_v2",
}
# Each call of a stateful Philox op reserves 256 samples per element of its output
# (`GuardedPhiloxRandom::ReserveRandomOutputs(n, 256)` in TensorFlow's kernels).
_SAMPLES_PER_ELEMENT = 256
_PHILOX = 1  # `tf.random.Algorithm.PHILOX`
_tracing = threading.local()
_install_lock = threading.Lock()
_installed: list[bool] = []


@contextlib.contextmanager
def continued_random_streams(model: Any) -> Iterator[None]:
    """While a step of `model` is traced: its stateful random ops continue the model's
    streams. Not under XLA (which has random numbers of its own) or a strategy (one
    kernel per replica); an op run eagerly (`run_eagerly=True`: a new op, and seed, at
    every call) runs as it is."""
    if bool(getattr(model, "jit_compile", False)) or _distributed(model):
        yield
        return
    _install()
    outer = getattr(_tracing, "model", None)
    _tracing.model = model
    try:
        yield
    finally:
        _tracing.model = outer


def _distributed(model: Any) -> bool:
    """Whether the model trains under a `tf.distribute` strategy (asked also outside its
    scope, where Keras' stock train function is called)."""
    if tf.distribute.has_strategy():
        return True
    strategy = getattr(model, "distribute_strategy", None)
    return strategy is not None and strategy is not tf.distribute.get_strategy()


def stock_train_function(model: Any, fn: Any) -> Any:
    """Keras' own train function of a plain model that gradwatch gives back after a
    watched fit: traced (where it is first traced later) with the random streams of the
    watched steps, so that a later fit without a watch draws on where they left off."""
    if fn is None or getattr(fn, "_gradwatch_streams", False):
        return fn

    def train_function(*args: Any, **kwargs: Any) -> Any:
        with continued_random_streams(model):
            return fn(*args, **kwargs)

    train_function._gradwatch_streams = True  # type: ignore[attr-defined]
    return train_function


def _install() -> None:
    """Routes TensorFlow's stateful random ops through `_continued`, once per process;
    outside a step that gradwatch traces, they run as they are."""
    if _installed:
        return
    with _install_lock:
        if _installed:
            return
        try:
            from tensorflow.python.ops import gen_random_ops, gen_stateless_random_ops_v2
        except ImportError:  # pragma: no cover - private modules moved: ops run as they are
            _installed.append(False)
            return
        if not all(hasattr(gen_stateless_random_ops_v2, t) for t in _STATELESS_TWIN.values()):
            _installed.append(False)  # pragma: no cover
            return
        for name in _STATELESS_TWIN:
            original = getattr(gen_random_ops, name)
            setattr(gen_random_ops, name, _continued(name, original))
        _installed.append(True)


def _continued(name: str, original: Callable) -> Callable:
    import inspect

    from tensorflow.python.ops import gen_stateless_random_ops_v2

    twin = getattr(gen_stateless_random_ops_v2, _STATELESS_TWIN[name])
    signature = inspect.signature(original)

    def op(*args: Any, **kwargs: Any) -> Any:
        model = getattr(_tracing, "model", None)
        if model is None or tf.executing_eagerly():
            return original(*args, **kwargs)
        a = signature.bind(*args, **kwargs).arguments
        seed, seed2 = int(a.get("seed", 0) or 0), int(a.get("seed2", 0) or 0)
        if seed == 0 and seed2 == 0:  # no seed at all: random from run to run anyway
            return original(*args, **kwargs)
        shape = a["shape"]
        position = _stream(model, seed, seed2)
        key = tf.constant([seed], tf.uint64)
        counter = tf.stack(
            [tf.cast(position.read_value(), tf.uint64), tf.constant(seed2, tf.uint64)]
        )
        if name == "random_uniform_int":
            out = twin(shape, key, counter, _PHILOX, a["minval"], a["maxval"])
        else:
            out = twin(shape, key, counter, _PHILOX, dtype=a["dtype"])
        n = tf.reduce_prod(tf.cast(shape, tf.int64))
        position.assign_add(n * _SAMPLES_PER_ELEMENT)
        return out

    op.__wrapped__ = original
    return op


def _stream(model: Any, seed: int, seed2: int) -> Any:
    """The position of one op's stream: one per op seeds and input signature of the
    traced function, as plain Keras has one kernel per op of each traced signature
    (a last, smaller batch traces anew, and its ops start afresh there too)."""
    graph = tf.compat.v1.get_default_graph()
    key = (seed, seed2, repr(getattr(graph, "structured_input_signature", None)))
    streams = model_state(model).random_streams
    if key not in streams:
        with tf.init_scope():
            streams[key] = tf.Variable(0, dtype=tf.int64, trainable=False, name="gradwatch_rng")
    return streams[key]


OWN_TRAIN_STEP = False  # the stock step is recorded at `APPLY_METHOD`


def train_step(model: Any, *args: Any) -> Any:
    """Not used: the stock step is recorded at `APPLY_METHOD` (`OWN_TRAIN_STEP` is False)."""
    raise NotImplementedError(
        "gradwatch records the stock TensorFlow step at its `apply_gradients`"
    )


GATES_IN_STEP = False  # the host picks a train function with or without capture


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


def sparse_sums(g: SparseGradient) -> dict[str, Any]:
    """The exact path's sums (`EXACT_SUMS`) of a sparse gradient's dense equivalent, from
    its touched rows alone: the untouched elements are zeros that count in `n` but add
    nothing to the sums."""
    x = tf.reshape(tf.cast(g.rows, tf.float32), (-1,))
    valid = tf.reshape(g.valid(), (-1,))
    zeros = g.implicit_zeros()
    finite = ops.isfinite(x) & valid
    notnan = ops.logical_not(ops.isnan(x)) & valid
    n_finite = ops.sum(ops.cast(finite, "float32")) + zeros
    xf = ops.where(finite, x, 0.0)
    total = ops.sum(xf)
    mean = total / ops.maximum(n_finite, 1.0)  # 0 where no element is finite
    spread = ops.sum(ops.square(ops.where(finite, x - mean, 0.0))) + zeros * ops.square(mean)
    # tf's reductions: Keras' refuse an empty tensor (a step that touched no row).
    lo = tf.reduce_min(ops.where(notnan, x, math.inf))
    hi = tf.reduce_max(ops.where(notnan, x, -math.inf))
    some_zero = zeros > 0
    abs_max = tf.reduce_max(ops.where(notnan, ops.abs(x), -1.0))
    n_valid = ops.sum(ops.cast(valid, "float32"))
    return {
        "n": float(g.size),
        "n_finite": n_finite,
        "n_nonfinite": n_valid - (n_finite - zeros),
        "n_notnan": ops.sum(ops.cast(notnan, "float32")) + zeros,
        "n_zero": ops.sum(ops.cast(ops.equal(x, 0.0) & valid, "float32")) + zeros,
        "sum": total,
        "sum_sq": ops.sum(ops.square(xf)),
        "spread": spread,
        "min": ops.where(some_zero, ops.minimum(lo, 0.0), lo),
        "max": ops.where(some_zero, ops.maximum(hi, 0.0), hi),
        "abs_max": ops.where(some_zero, ops.maximum(abs_max, 0.0), abs_max),
    }
