"""What one training step hands the watches (a record per variable), and the step's
machinery that the backend modules share: the model's state, the step scope, the
`Capture` protocol. A leaf: it imports no gradwatch module, so that the backend
modules can import it."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable


@dataclasses.dataclass(frozen=True)
class Record:
    """One variable's gradient in one step, with what was read before the update.

    `grad` is None for a variable the loss does not depend on. `scale` is the loss
    scale the gradient is multiplied by (None: not scaled), `before` the weights
    before the update (None unless a watch needs them), and `optimizer` the one
    that applies the gradient (None: unknown). `update` counts the variable's
    earlier updates in the same step (a critic updated 3 times: 0, 1, 2).
    `accumulated` is, with `gradient_accumulation_steps`, the optimizer's sum of the
    earlier micro-steps' gradients (unscaled), read before the update (None: none).
    `state` is the optimizer's state before the update (`_stats.optimizer_health.StateBefore`;
    None unless a watch needs it, or where it cannot be read).
    """

    variable: Any
    grad: Any
    scale: Any = None
    before: Any = None
    optimizer: Any = None
    update: int = 0
    accumulated: Any = None
    state: Any = None

    def with_grad(self, grad: Any) -> Record:
        """The same record with another gradient (the global one, under a strategy)."""
        return dataclasses.replace(self, grad=grad)


# record_key(variable, update) -> its record, in the order recorded.
Records = dict[Any, Record]


def record_key(variable: Any, update: int = 0) -> Any:
    """The key of a variable's record in `Records`: `id(variable)` for its first update
    in the step, `(id(variable), update)` for a later one."""
    return id(variable) if update == 0 else (id(variable), update)


def update_counts(records: Records) -> dict[int, int]:
    """How many updates the variables recorded more than once in the step had, by
    `id(variable)`. Reads the keys alone: it runs at every step on PyTorch."""
    counts: dict[int, int] = {}
    for key in records:
        if type(key) is tuple:  # a later update: (id(variable), update)
            var, update = key
            if update >= counts.get(var, 1):
                counts[var] = update + 1
    return counts


@runtime_checkable
class Watcher(Protocol):
    """What the capture (`gradwatch._capture.counting`, `gradwatch.mixin`) asks of each attached
    watch; `GradWatch` is the one implementation. Package-internal: not part of the
    public API."""

    every: int  # records the steps that are multiples of it
    stats: tuple[str, ...]  # the stats it records (their `needs` say what is read before)
    checks_every_step: bool  # runs checks at every step, also at unrecorded ones
    needs_weights: bool  # needs the weights before the update (the update stats)
    keeps_model: bool  # keeps a step's update from the model (non-finite gradients, spikes)
    on_nonfinite: str  # its policy for non-finite gradients
    on_spike: str  # its policy for spikes ("ignore": it judges none)
    replays: bool  # replays some steps on the host (`_capture.handoff`)
    examples_every: int | None  # also replays every n-th step for its examples
    noise_scale_every: int | None  # also replays every n-th step for the noise scale

    def watched_ids(self, model: Any) -> frozenset[int]:
        """The ids of the model's variables whose gradients this watch checks."""

    def keep_skipped_batch(self, step: int, x: Any, y: Any, sample_weight: Any) -> None:
        """On the host: the batch of a step whose update was kept from the model."""

    def wants_step(self, step: int) -> bool:
        """Whether the step needs capture (host-side gating, `steps_per_execution=1`)."""

    def check_step(self, model: Any, step: Any, records: Records, skipped: Any) -> None:
        """Adds the every-step checks to the step being traced or run."""

    def capture_step(
        self,
        model: Any,
        step: Any,
        records: Records,
        skipped: Any,
        local: Records | None,
        scalars: tuple[Any, ...] = (None, None, None, None),
    ) -> None:
        """Adds the capture of the step being traced or run: stats into the ring buffer.
        `scalars` are the step's `(loss, learning_rate, applies, batch_size)` tensors
        (None: not seen)."""

    def queue_replay(self, replay: Any) -> None:
        """On the host: a step handed over for a replay (`_capture.handoff.Replay`)."""

    def judge_spikes(self, model: Any, scope: StepScope, records: Records, local: Any) -> None:
        """Judges the step's global norm and loss for spikes, once per step, into
        `scope.spikes` (`local`: this replica's records under `tf.distribute`, or None)."""

    def state_metrics(self) -> list[Any]:
        """The metrics that carry this watch's device state (JAX: in the step's state)."""

    def release(self, model: Any) -> None:
        """Drains what is left and detaches from `model`; safe to call twice."""


class ModelState:
    """gradwatch's per-model state, kept out of Keras' and TF's object tracking."""

    def __init__(self) -> None:
        self.counter: Any = None  # steps over the model's life (the backend's counter)
        # Where the counter starts when it is made, if not at `iterations` (a log that
        # the model's steps are appended to already holds those).
        self.start_at: int | None = None
        # (next step, optimizer iterations) pairs read on the host: where the counter
        # stood against `iterations` (see `gradwatch._logdata.resume`).
        self.anchors: list[tuple[int, int]] = []
        self.watches: list[Any] = []  # attached GradWatch callbacks
        # The watches that the current train function was (or will be) traced with.
        self.traced_with: tuple[Any, ...] = ()
        # False while a train function traced without capture runs (see `gate`).
        self.capturing = True
        # Host-side gating for `every > 1`: (with capture, without, traced_with).
        self.gate: tuple[Any, Any, tuple[Any, ...]] | None = None
        self.next_step = 0  # host's count of the next step, while gating
        # A plain model's own class while a GradWatch records it (see `gradwatch._capture.adopt`).
        self.adopted_from: type | None = None
        # A plain model's train functions across its fits: Keras' stock one of the current
        # compile, and those traced with the capture, by the watches they record for.
        self.stock_function: Any = None
        self.captured: dict[tuple[Any, ...], Any] = {}
        # JAX: >0 while `metrics_variables` leaves gradwatch's device state out: while
        # the model evaluates (a test step neither writes nor returns it), and while a
        # train step runs (it gets and returns the variables of `metrics` alone).
        self.own_hidden = 0
        # TensorFlow: where the step's stateful random ops are in their streams, shared by
        # every train function traced for the model (see `_backend.tensorflow`).
        self.random_streams: dict[Any, Any] = {}
        # Where a watch stops training at a non-finite step: set once a step's update
        # was kept from the model, so that no later step of the `fit` applies.
        self.halt: Any = None
        # The gated `apply` calls of the model's last step (None: no step seen yet): an
        # eager step snapshots the variables of all but the last of them.
        self.applies_per_step: int | None = None

    @property
    def active(self) -> list[Any]:
        """The watches that the step being traced records for."""
        return self.watches if self.capturing else []

    @property
    def listening(self) -> list[Any]:
        """The watches that see the step's gradients: recording ones, and alarms on every step."""
        return [w for w in self.watches if self.capturing or w.checks_every_step]


@contextlib.contextmanager
def own_state_hidden(model: Any) -> Iterator[None]:
    """Leaves gradwatch's device state out of the model's `metrics_variables` (JAX)."""
    state = model_state(model)
    state.own_hidden += 1
    try:
        yield
    finally:
        state.own_hidden -= 1


def model_state(model: Any) -> ModelState:
    """The model's gradwatch state; a plain object so that saving never sees it."""
    state = model.__dict__.get("_gradwatch_state")
    if state is None:
        state = ModelState()
        object.__setattr__(model, "_gradwatch_state", state)
    return state


class StepScope:
    """What one trace of one train step recorded: gradients by variable id."""

    def __init__(self) -> None:
        self.grads: Records = {}
        self.updates: dict[int, int] = {}  # id(variable) -> its records in `grads`
        # id(variable) -> its records so far: by the step's own `record_gradients`
        # calls, and seen at an optimizer's apply (see `mixin.ApplyInterceptor`).
        self.by_hand: dict[int, int] = {}
        self.applied: dict[int, int] = {}
        # id(optimizer) -> (a loss-scale optimizer's step counter (`_capture.micro_steps`),
        # its value before the update)
        self.loss_scaled: dict[int, tuple[Any, Any]] = {}
        # PyTorch `jit_compile=True`: whether the stock step ran (its `.grad`s are read).
        self.stock = False
        # JAX: the stateless step's input state (trainable, non-trainable, optimizer and
        # metrics variables), which `record_gradients` reads the step's values from.
        self.state: tuple | None = None
        # The step's loss, as handed to the model's loss tracker (the last one handed),
        # the learning rate of the first optimizer, and whether its `apply` updates the
        # weights (not with gradient accumulation's accumulate-only steps); None: not seen.
        self.loss: Any = None
        self.learning_rate: Any = None
        self.applies: Any = None
        # id(variable) -> the optimizer's accumulated gradient before the update
        # (`gradient_accumulation_steps`), read at the steps that may apply.
        self.accumulated: dict[int, Any] = {}
        # Where a watch keeps non-finite updates from the model (`_capture.guard`): the
        # finiteness of the step's watched gradients so far (None: not checked), whether
        # an `apply` is being gated now, and the step's data (its batch, for a replay).
        self.finite: Any = None
        self.guarding = False
        self.halt_read = False  # the stop flag (`_capture.guard.halt_flag`) was read
        # Each gated `apply` of the step, in order: the (variable, value before) pairs
        # of what it updates, or None where no snapshot was taken (see `_capture.guard`).
        self.snapshots: list[list[tuple[Any, Any]] | None] = []
        self.data: Any = None
        # Each judging watch's spike verdict of the step, by `id(watch)`: `(global norm,
        # loss, flags)` (`_capture.spikes`); and whether a watch kept the update back
        # for a spike (a bool tensor; None: no watch does).
        self.spikes: dict[int, tuple[Any, Any, Any]] = {}
        self.spiked: Any = None
        self.handed = False  # the step went to the host for a replay (`_capture.handoff`)


_local = threading.local()


def scopes() -> dict[int, StepScope]:
    """The scopes of the steps being traced or run, by `id(model)`."""
    # Thread-local: under tf.distribute each replica traces the step in its own thread.
    if not hasattr(_local, "scopes"):
        _local.scopes = {}
    return _local.scopes


def run_in_scope(fn: Callable, model: Any, *args: Any, **kwargs: Any) -> tuple[Any, StepScope]:
    """Runs `fn(model, *args, **kwargs)` in a new scope of `model`'s step; returns its
    outputs and the scope, with what `record_gradients` added to it."""
    all_scopes = scopes()
    scope = all_scopes[id(model)] = StepScope()
    scope.data = args[-1] if args else kwargs.get("data")
    try:
        outputs = fn(model, *args, **kwargs)
    finally:
        del all_scopes[id(model)]
    return outputs, scope


class Capture(Protocol):
    """What a backend's step code asks of the capture (`gradwatch._capture.counting`, which it
    cannot import: the capture imports the backend). Package-internal."""

    def commit(self, model: Any, scope: StepScope) -> None:
        """Hands the step's records to the watches, and counts the step."""

    def before_update(
        self, model: Any, scope: StepScope, variables: list, optimizer: Any, watches: list
    ) -> tuple:
        """What the records of `variables` read before the update: `(scale, befores,
        optimizer, states)`, for `add_records`."""

    def add_records(
        self,
        scope: StepScope,
        grads: list,
        variables: list,
        scale: Any,
        befores: list,
        optimizer: Any,
        states: list | None = None,
    ) -> None:
        """Adds one step's gradients to `scope`, with what `before_update` read."""

    def undo_point(self, model: Any) -> list[tuple[Any, Any]] | None:
        """Copies of the variables a compiled step updates, where a watch keeps the
        model (None: nothing copied)."""

    def undo_if_nonfinite(self, model: Any, scope: StepScope, saved: list) -> None:
        """After a compiled step: puts `saved` back where its watched gradients are not
        finite."""


def restore_class(model: Any) -> None:
    """Gives a model that a `GradWatch` adopted its own class back, and Keras' stock train
    function of its compile (a later `fit` without a watch runs it). The functions traced
    with the capture are kept for the next watched `fit` (`captured`). Does nothing for a
    model that was not adopted."""
    state = model_state(model)
    cls = state.adopted_from
    if cls is None:
        return
    object.__setattr__(model, "__class__", cls)
    state.adopted_from = None
    # Keep what this fit's watches used (they may record the next fit too), no more.
    final, state.traced_with = state.traced_with, ()
    state.captured = {k: f for k, f in state.captured.items() if final[: len(k)] == k}
    ours = {id(f) for f in state.captured.values()}
    if state.gate is not None:
        ours |= {id(state.gate[0]), id(state.gate[1])}
    if id(model.train_function) in ours:
        model.train_function = state.stock_function
    else:  # made elsewhere (a compile, or another fit, since): let Keras make it anew
        model.train_function = None
        state.captured, state.gate = {}, None


def release_watches(model: Any, error: BaseException | None = None) -> None:
    """At the end of `fit`: every watch of `model` drains what the device still holds,
    writes it out and detaches; then an adopted model gets its class back.

    `error` is the exception that ends `fit` (None: it ended normally). It goes on
    propagating: a watch that fails to release then warns rather than raising over it.
    Otherwise the first such failure is raised once every watch has been released.
    """
    state = model_state(model)
    failure: Exception | None = None
    try:
        for watch in list(state.watches):
            try:
                watch.release(model)
            except Exception as e:
                if error is None:
                    failure = failure or e
                    continue
                warnings.warn(
                    f"GradWatch could not write out its log while `fit` ended with "
                    f"{type(error).__name__} ({e!r}); `watch.log` holds what it recorded.",
                    stacklevel=3,
                )
    finally:
        for watch in list(state.watches):  # any that failed: detached all the same
            state.watches.remove(watch)
        restore_class(model)
    if failure is not None:
        raise failure
