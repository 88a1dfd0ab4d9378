"""The interface each backend module implements (`gradwatch/_backend/<name>.py`).

A backend module is a plain module with these names; this Protocol documents them and
lets a type checker hold each module to them.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import numpy as np

from gradwatch._capture.step import Capture, StepScope


class Backend(Protocol):
    """What shared code asks of the backend."""

    RECORDS: bool  # GradWatch records on it (False: `generic`, the stats functions only)
    INDEX_DTYPE: str  # dtype of step numbers and counters on the device

    def host_copy(self, x: Any) -> np.ndarray:
        """A NumPy copy of a tensor (the device copy may be written again in place)."""

    def read_rows(self, variable: Any, idx: np.ndarray) -> np.ndarray:
        """Rows `idx` of a buffer variable, copied to the host."""

    def lift(self) -> AbstractContextManager:
        """Where device state made while a step is traced is created (out of the graph)."""

    def slot_of(self, count: Any, capacity: int) -> Any:
        """The ring-buffer slot that the `count`-th write goes to, as the device holds it."""

    def write_slot(self, variable: Any, slot: Any, value: Any) -> None:
        """Writes `value` into row `slot` of `variable`, cast to its dtype and reshaped
        to a row's shape (a kept gradient is written flat)."""

    def advance(self, count: Any) -> None:
        """Adds one to the ring buffer's write counter."""

    STATE_IN_STEP: bool  # gradwatch's device state travels in the step's state (metrics)
    APPLY_METHOD: str | None  # the optimizer method the stock step hands the gradients to

    def compiling(self) -> bool:
        """Whether `torch.compile` is tracing the step (gradwatch records around it)."""

    def new_counter(self, start: int = 0) -> Any:
        """The model's step counter, at `start`: `read_value()`, `assign_add(n)`, `numpy()`."""

    def counter_metrics(self, counter: Any) -> list[Any]:
        """The metrics that carry the counter in the step's state (JAX), else none."""

    def skipped_update(self, loss_scaled: Any) -> Any:
        """Whether a loss-scale optimizer skipped the update: its step count unchanged
        across it, from `(counter variable, its value before)` pairs."""

    def counter_now(self, counter: Any) -> Any:
        """The value of an optimizer's step counter (a variable), read before the update."""

    def weights_before(self, variable: Any) -> Any:
        """The weights before the update (a copy where the update is in place)."""

    def as_recorded(self, grad: Any, variable: Any) -> Any:
        """The gradient as gradwatch keeps it (TensorFlow: `IndexedSlices` as rows)."""

    def float32(self, x: Any) -> Any:
        """`x` cast to float32."""

    def global_records(self, records: Any) -> Any:
        """The records with each replica's local gradient replaced by the global one."""

    # The step: how it is run, counted and recorded.
    OWN_TRAIN_STEP: bool  # with watches attached, `train_step` replaces the stock step (JAX)
    GATES_IN_STEP: bool  # the step gates `every > 1` itself; no host-side gating (JAX)

    def run_step(
        self, fn: Callable, model: Any, commit: Callable, *args: Any, **kwargs: Any
    ) -> Any:
        """Runs `fn(model, *args, **kwargs)`, a train step, in a step scope, then `commit`s it."""

    def train_step(self, model: Any, *args: Any) -> Any:
        """The stock step with the recording in it, where `OWN_TRAIN_STEP` (else it raises)."""

    def input_scope(self, model: Any, scope: StepScope) -> AbstractContextManager:
        """Where `record_gradients` reads what precedes the update (JAX: the step's input state)."""

    def readable_in_step(self, model: Any, scope: StepScope, variable: Any) -> bool:
        """Whether the step can read `variable` (JAX: only the variables of its state)."""

    def make_train_function(
        self, model: Any, make: Callable, force: bool, custom: bool, capture: Capture
    ) -> Any:
        """Keras' train function from `make(force)`, as gradwatch runs it (PyTorch jit: wrapped)."""

    def outside_compile(self, fn: Callable) -> Callable:
        """`fn`, run eagerly at a graph break when called from `torch.compile`d code."""

    def note_stock_step(self, model: Any) -> None:
        """From a compiled custom step: notes that it ran the stock one (`super().train_step`)."""

    def stock_train_function(self, model: Any, fn: Any) -> Any:
        """Keras' own train function of a plain model, as gradwatch gives it back after a
        watched fit (TensorFlow: its step's random ops go on where the watched steps'
        left off)."""

    # Keeping a non-finite step's update from the model (`gradwatch._capture.guard`).
    def all_finite(self, grads: Sequence[Any]) -> Any:
        """Whether every element of every gradient is finite (PyTorch: a host bool)."""

    def logical_and(self, a: Any, b: Any) -> Any:
        """`a and b`, on bools of the step."""

    def logical_not(self, a: Any) -> Any:
        """`not a`, on a bool of the step."""

    def agree_across_replicas(self, finite: Any) -> Any:
        """`finite` on every replica (TensorFlow under `tf.distribute`: all-reduced)."""

    def gated_apply(
        self, model: Any, finite: Any, apply: Callable, args: tuple, skip: Callable[[], None]
    ) -> None:
        """Runs `apply(*args)` (an optimizer's `apply`) where `finite` holds, else `skip()`."""

    def to_host(
        self, model: Any, keep: Callable[..., None], step: Any, leaves: Sequence[Any]
    ) -> None:
        """Calls `keep(step, *leaves)` on the host with NumPy arrays, from the step (where
        it can: not from TensorFlow's XLA-compiled step, nor under `tf.distribute`)."""

    def snapshots_free(self) -> bool:
        """Whether a snapshot of variables in the step costs nothing unless it is restored
        (a traced TensorFlow step prunes a read that nothing uses)."""

    def restore_where(self, model: Any, predicate: Any, saved: Sequence[tuple[Any, Any]]) -> None:
        """Where `predicate` holds, puts each variable of `saved` back to its value there
        (the earlier updates of a step that several optimizers apply)."""

    def undo_step(
        self, model: Any, scope: StepScope, finite: Any, skip: Callable[[], None]
    ) -> None:
        """Where `finite` is false, undoes the update of a step that has no `apply` to gate
        (JAX's stateless step), and calls `skip()`."""

    def new_flag(self) -> Any:
        """A bool of the step (`read_value()`, `assign`), or None where none is needed."""

    # The stats (`gradwatch._stats.compute`): the fast paths each backend has of its own.

    def stats_table(self, tensors: Sequence[Any], stats: tuple[str, ...]) -> Any | None:
        """`compute_stats`' table from a kernel of the backend's own (PyTorch), else None."""

    def sum_of_squares(self, g: Any) -> Any:
        """`sum(g**2)` in float32, as a scalar (TensorFlow: one L2Loss op)."""

    def total_sum_of_squares(self, grads: Sequence[Any]) -> Any | None:
        """The sum of squares of all of `grads` as one float32 scalar, from a kernel of
        the backend's own (PyTorch: one call for all tensors), else None."""

    def row_sums_of_squares(self, x: Any, source: Any = None) -> Any:
        """Each row's sum of squares of a 2-D float32 `x` (`source`: a single row's tensor)."""

    def traced_for_xla(self, flag: bool) -> AbstractContextManager:
        """Tells `sum_of_squares` whether the step being traced is compiled with XLA."""

    def unscaled_float32(self, g: Any, scale: Any = None) -> Any:
        """`g` in float32, divided by `scale` if given; a `SparseGradient` stays sparse."""

    def fused(self, fn: Callable[..., Any], key: Any) -> Callable[..., Any]:
        """`fn` compiled into fused kernels, once per `key` (TensorFlow: XLA), else `fn`."""

    def bin_index(self, x: Any, bins_per_decade: int) -> Any:
        """The histogram bin of each element of a flat float32 tensor."""

    def bincount(self, idx: Any, length: int) -> Any:
        """How often each of `0 .. length - 1` occurs in the int32 tensor `idx` (int32)."""

    def sparse_sums(self, g: Any) -> dict[str, Any]:
        """The exact path's sums (`EXACT_SUMS`) of a `SparseGradient`, from its rows
        (TensorFlow, which makes them)."""

    # Control flow in the step.
    def cond(self, pred: Any, true_fn: Callable[[], Any], false_fn: Callable[[], Any]) -> Any:
        """`ops.cond` (TensorFlow graphs: unlowered, so the branch not taken costs nothing)."""

    def when(self, predicate: Any, fn: Callable[[], None], variables: Sequence[Any]) -> None:
        """Runs `fn`, which assigns some of `variables`, only where `predicate` holds."""

    def traced_once(self, key: Hashable, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """`fn` of one 2-D float32 tensor, as the backend best reuses it: on TensorFlow a
        function traced once per process for every shape (`key` names it), so that each
        call adds one op to a traced step; elsewhere `fn` itself."""

    # What a watch computes in the step beyond one gradient's stats (`gradwatch._stats.derived`).
    OPS: Any  # the array functions of the derived stats (stack, sqrt, where, read, assign, ...)
    CHECK_OPS: Any  # the same for the every-step check (PyTorch: NumPy, on the host)
    EAGER: bool  # the capture runs on host values, outside any traced step (PyTorch)
    DISTRIBUTES: bool  # tf.distribute: the step runs once per replica (`per_replica`)

    def squares_by_row(self, grads: Sequence[Any], rows: Sequence[int], n: int) -> Any:
        """The every-step check's input: `n` rows' sums of squares, 0 where `rows` has none."""

    def alarm_cell(
        self, owner: Any, shape: tuple[int, ...], dtype: str, value: float, name: str
    ) -> Any:
        """One of the every-step check's values (`numpy()`, `assign`), owned by `owner`."""

    def sync_state(self, model: Any, variable: Any) -> bool:
        """Makes the model's device state readable; False if `variable` has no value."""

    def all_gather(self, x: Any) -> Any:
        """`x` from every replica, stacked on axis 0 (one replica: `x`)."""

    def all_reduce_sum(self, xs: list[Any]) -> list[Any]:
        """Each of `xs` summed over the replicas, in one batched all-reduce."""

    def num_replicas(self, model: Any) -> int:
        """The replicas that run each step."""

    def worker_of(self, model: Any) -> tuple[int, bool]:
        """This process's worker index and whether it is the chief (writes the log)."""

    def check_strategy(self, model: Any) -> None:
        """Refuses a distribution strategy gradwatch cannot record under."""

    # The replay of one batch that finds where a NaN or Inf is born (`gradwatch._forensics`).
    def gradients_of(
        self,
        fn: Callable[[list[Any], list[Any]], Any],
        probes: Sequence[Any],
        values: Sequence[Any],
    ) -> tuple[list[Any], list[Any]] | None:
        """The gradients of the scalar `fn(probes, values)` with respect to each of `probes`
        and `values` (tensors), run eagerly (a gradient is None where nothing flows); None
        where the backend cannot differentiate."""

    def first_nonfinite_op(self, fn: Callable[[], Any]) -> str | None:
        """The type of the first op that makes a NaN or Inf while `fn()` runs eagerly
        (TensorFlow: `enable_check_numerics`), else None."""

    # Each example's gradient in one batch (`gradwatch._forensics.examples`).
    def row_gradients(
        self,
        loss_of: Callable[[list[Any], list[Any], Any], Any],
        reduce: Callable[[Any, list[Any]], Any],
        vectorized: bool,
    ) -> Callable[[list[Any], list[Any], Any], Any] | None:
        """A compiled function of `(values, others, rows)` that, for each row of `rows`
        (a tuple of tensors, the rows on their first axis), takes the scalar
        `loss_of(values, others, row)` and its gradients with respect to `values` (zeros
        where nothing flows), and returns `reduce(loss, grads)` (a tuple of tensors),
        stacked over the rows. `vectorized`: mapped over the rows in one vectorised call
        (JAX `vmap`, `torch.func.vmap`, TensorFlow's `vectorized_map` under XLA); else a
        loop over the rows (compiled where the backend compiles). None where the backend
        cannot differentiate."""
