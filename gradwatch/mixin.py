"""Capture: the train_step mixin that records what the optimizer applies, by variable."""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np

from gradwatch._backend import current as _backend
from gradwatch._step import Record, Records, Watcher

_local = threading.local()
_patch_lock = threading.Lock()


def _compiling() -> bool:
    """True while `torch.compile` traces: gradwatch then stays out of the traced step."""
    return _backend.compiling()


class _ModelState:
    """gradwatch's per-model state, kept out of Keras' and TF's object tracking."""

    def __init__(self) -> None:
        self.counter: Any = None  # steps over the model's life (the backend's counter)
        self.watches: list[Any] = []  # attached GradWatch callbacks
        # The watches that the current train function was (or will be) traced with.
        self.traced_with: tuple[Any, ...] = ()
        # False while a train function traced without capture runs (see `gate`).
        self.capturing = True
        # Host-side gating for `every > 1`: (with capture, without, traced_with).
        self.gate: tuple[Any, Any, tuple[Any, ...]] | None = None
        self.next_step = 0  # host's count of the next step, while gating

    @property
    def active(self) -> list[Any]:
        """The watches that the step being traced records for."""
        return self.watches if self.capturing else []

    @property
    def listening(self) -> list[Any]:
        """The watches that see the step's gradients: recording ones, and alarms on every step."""
        return [w for w in self.watches if self.capturing or w.checks_every_step]


def model_state(model: Any) -> _ModelState:
    """The model's gradwatch state; a plain object so that saving never sees it."""
    state = model.__dict__.get("_gradwatch_state")
    if state is None:
        state = _ModelState()
        object.__setattr__(model, "_gradwatch_state", state)
    return state


class _StepScope:
    """What one trace of one train step recorded: gradients by variable id."""

    def __init__(self) -> None:
        self.grads: Records = {}
        # id(optimizer) -> (loss-scale optimizer, its `iterations` before the update)
        self.loss_scaled: dict[int, tuple[Any, Any]] = {}
        # PyTorch `jit_compile=True`: whether the stock step ran (its `.grad`s are read).
        self.stock = False
        # JAX: the stateless step's input state (trainable, non-trainable, optimizer and
        # metrics variables), which `record_gradients` reads the step's values from.
        self.state: tuple | None = None

    def skipped(self) -> Any:
        """A bool tensor: did a loss-scale optimizer skip this step's update? None without one.

        Read after `apply_gradients`: a `LossScaleOptimizer` that finds non-finite
        gradients lowers its scale and leaves `iterations` where it was.
        """
        if not self.loss_scaled:
            return None
        return _backend.skipped_update(self.loss_scaled.values())


def _scopes() -> dict[int, _StepScope]:
    # Thread-local: under tf.distribute each replica traces the step in its own thread.
    if not hasattr(_local, "scopes"):
        _local.scopes = {}
    return _local.scopes


def _counted(fn: Callable) -> Callable:
    """Wraps a train_step so that each step is counted and its records committed once."""

    @functools.wraps(fn)
    def train_step(self, *args, **kwargs):
        if _compiling():  # PyTorch `jit_compile=True`: recorded around the compiled step
            return fn(self, *args, **kwargs)
        scopes = _scopes()
        if id(self) in scopes:  # super().train_step() from an overriding train_step
            return fn(self, *args, **kwargs)
        if not _backend.RECORDS:  # a backend gradwatch does not record
            return fn(self, *args, **kwargs)
        if keras.backend.backend() == "jax":
            return _jax_counted(fn, self, *args, **kwargs)
        scope = scopes[id(self)] = _StepScope()
        try:
            outputs = fn(self, *args, **kwargs)
        finally:
            del scopes[id(self)]
        if keras.backend.backend() == "torch":
            import torch

            # The stats read gradients and weights; they must not join autograd's graph.
            with torch.no_grad():
                _commit(self, scope)
        else:
            _commit(self, scope)
        return outputs

    train_step._gradwatch_counted = True
    return train_step


def step_counter(model: Any) -> Any:
    state = model_state(model)
    if state.counter is None:
        state.counter = _backend.new_counter()
    return state.counter


def _own_metrics(model: Any) -> list[Any]:
    """JAX: gradwatch's device state (step counter, ring buffers, alarms), which travels
    in the stateless step's metrics state; none on the other backends."""
    if not _backend.STATE_IN_STEP:
        return []
    state = model_state(model)
    own = [] if state.counter is None else _backend.counter_metrics(state.counter)
    for watch in state.watches:
        own += watch.state_metrics()
    return own


def _ensure_jax_counter(model: Any) -> None:
    """JAX: creates the step counter before Keras gathers the step's state, so that
    steps run without a `GradWatch` are counted too (a train function made before
    it existed is made anew)."""
    if keras.backend.backend() == "jax" and model_state(model).counter is None:
        step_counter(model)
        model.train_function = None


def _commit(model: Any, scope: _StepScope) -> None:
    counter = step_counter(model)
    step = counter.read_value()
    state = model_state(model)
    watches = state.active
    if watches and not scope.grads:
        warnings.warn(
            f"The `train_step` of {type(model).__name__} recorded no gradients, so GradWatch "
            "has nothing to log. A custom `train_step` must call "
            "`self.record_gradients(grads, variables)` with the gradients it applies.",
            stacklevel=2,
        )
    listening = state.listening
    skipped = scope.skipped() if listening and scope.grads else None
    local = scope.grads
    records = _backend.global_records(local) if listening and local else local
    for watch in listening:
        watch.check_step(model, step, records, skipped)
    for watch in watches:
        watch.capture_step(model, step, records, skipped, local)
    counter.assign_add(1)


def _loss_scale(optimizer: Any) -> Any:
    """The factor the loss was multiplied by, or None when the loss is not scaled."""
    if optimizer is None:
        return None
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) or (
        getattr(optimizer, "loss_scale_factor", None) is not None
    ):
        # Read before `apply`, which may change a dynamic scale.
        return _backend.float32(optimizer.scale_loss(1.0))
    return None


class _ApplyInterceptor:
    """Routes the optimizer's apply method through a recorder while a stock step runs.

    The method is `apply_gradients(grads_and_vars)` on TensorFlow and
    `apply(grads, trainable_variables)` on PyTorch, as each stock step calls it.
    """

    def __init__(self, optimizer: Any, model: Any):
        self.optimizer = optimizer
        self.model = model
        self.method = _backend.APPLY_METHOD

    def __enter__(self) -> None:
        with _patch_lock:
            opt = self.optimizer
            hooks = opt.__dict__.get("_gradwatch_hooks")
            if hooks is None:
                hooks = {}
                original = getattr(opt, self.method)

                def apply_gradients(grads_and_vars, *args, **kwargs):
                    grads_and_vars = list(grads_and_vars)
                    hook = hooks.get(threading.get_ident())
                    if hook is not None:
                        hook(grads_and_vars)
                    return original(grads_and_vars, *args, **kwargs)

                def apply(grads, trainable_variables=None, *args, **kwargs):
                    hook = hooks.get(threading.get_ident())
                    if hook is not None and trainable_variables is not None:
                        grads = list(grads)
                        hook(list(zip(grads, trainable_variables, strict=True)))
                    return original(grads, trainable_variables, *args, **kwargs)

                patched = apply_gradients if self.method == "apply_gradients" else apply
                object.__setattr__(opt, "_gradwatch_hooks", hooks)
                object.__setattr__(opt, self.method, patched)
            hooks[threading.get_ident()] = self._record

    def _record(self, grads_and_vars: list) -> None:
        grads = [g for g, _ in grads_and_vars]
        variables = [v for _, v in grads_and_vars]
        self.model.record_gradients(grads, variables, optimizer=self.optimizer)

    def __exit__(self, *exc: Any) -> None:
        with _patch_lock:
            opt = self.optimizer
            hooks = opt.__dict__["_gradwatch_hooks"]
            hooks.pop(threading.get_ident(), None)
            if not hooks:
                object.__delattr__(opt, self.method)
                object.__delattr__(opt, "_gradwatch_hooks")


class GradWatchMixin:
    """Lets a `GradWatch` callback see every gradient the optimizer applies.

    Put it first among the bases of a Keras model. The stock `train_step` is
    left untouched: while a `GradWatch` is attached, the gradients passed to
    `optimizer.apply_gradients` are recorded on the way, inside the compiled
    step, keyed by variable path. They include regularizers and `add_loss`
    terms, are taken before clipping, and are divided by any loss scale.
    Without a `GradWatch` attached, the step is the stock one plus a step
    counter.

    A custom `train_step` (a GAN, several tapes) calls
    `self.record_gradients(grads, variables)` to feed the same log.

    Example:

    ```python
    class Net(gradwatch.GradWatchMixin, keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(1)

        def call(self, x):
            return self.dense(x)

    model = Net()
    model.compile(optimizer="sgd", loss="mse")
    watch = gradwatch.GradWatch()
    model.fit(x, y, callbacks=[watch])
    watch.log.stat("norm")
    ```
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("train_step")
        if step is not None and not getattr(step, "_gradwatch_counted", False):
            cls.train_step = _counted(step)

    @_counted
    def train_step(self, *args: Any) -> Any:
        # `(data)` on TensorFlow and PyTorch, the stateless `(state, data)` on JAX.
        if _compiling():
            # PyTorch `jit_compile=True`: `torch.compile` traces the stock step alone, and
            # `_torch_compiled_step` records around it.
            if type(self).train_step is not GradWatchMixin.train_step:
                _outside_compile(_note_stock_step)(self)  # from a custom step's super()
            return super().train_step(*args)
        if keras.backend.backend() == "jax" and model_state(self).watches:
            return _jax_train_step(self, *args)
        if not model_state(self).listening or not _backend.APPLY_METHOD:
            return super().train_step(*args)
        with _ApplyInterceptor(self.optimizer, self):
            return super().train_step(*args)

    @property
    def metrics(self) -> list[Any]:
        return super().metrics + _own_metrics(self)

    @property
    def metrics_names(self) -> list[str]:
        own = {id(m) for m in _own_metrics(self)}
        return [m.name for m in self.metrics if id(m) not in own]

    def fit(self, *args: Any, **kwargs: Any) -> Any:
        """Runs `keras.Model.fit` with the `GradWatch` callbacks among `callbacks` attached.

        The capture is traced into the train function, so it is traced anew
        only when the set of watches changes. On any exit, the watches drain
        what they captured and detach.
        """
        state = model_state(self)
        _ensure_jax_counter(self)
        watches = _watches_in(_bound_callbacks(args, kwargs))
        if watches != state.traced_with:
            self.train_function = None  # Keras makes and traces a new one
            state.traced_with = watches
        state.watches = list(watches)
        try:
            return super().fit(*args, **kwargs)
        finally:
            # on_train_end is skipped when fit raises (KeyboardInterrupt too):
            # copy out what the device recorded, and detach.
            for watch in list(model_state(self).watches):
                watch.release(self)

    def make_train_function(self, force: bool = False) -> Any:
        """Keras' train function; on PyTorch with `jit_compile=True`, gradwatch records
        around the `torch.compile`d step rather than inside it."""
        if keras.backend.backend() != "torch" or not self.jit_compile:
            return super().make_train_function(force)
        if self.train_function is not None and not force:
            return self.train_function
        super().make_train_function(force=True)
        self.train_function = _torch_compiled_step(self, self.train_function)
        return self.train_function

    def train_on_batch(self, *args: Any, **kwargs: Any) -> Any:
        """Runs `keras.Model.train_on_batch`, without capture (no callbacks run here)."""
        state = model_state(self)
        _ensure_jax_counter(self)
        if state.traced_with:
            self.train_function = None
            state.traced_with = ()
        return super().train_on_batch(*args, **kwargs)

    def record_gradients(
        self,
        grads: Sequence[Any],
        variables: Sequence[Any],
        optimizer: Any = None,
    ) -> None:
        """Records gradients from a custom `train_step`.

        Call it once per variable and step, with the gradients you pass to
        `apply_gradients`, before you apply them (the update stats read the
        weights here). Without a `GradWatch` attached it does nothing.

        Args:
            grads: Gradients, one per variable; `None` for a disconnected one.
            variables: The model's trainable variables they belong to.
            optimizer: The optimizer that applies the gradients. If its
                `scale_loss` scaled the loss, the gradients are divided by its
                loss scale, and its clipping gives the `clipped_norm` stat.
                Defaults to `None` (gradients are taken as they are, and
                `clipped_norm` equals `norm`).

        Example:

        ```python
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                loss = self.compute_loss(x, y, self(x, training=True))
            grads = tape.gradient(loss, self.trainable_weights)
            self.record_gradients(grads, self.trainable_weights)
            self.optimizer.apply_gradients(zip(grads, self.trainable_weights))
            return {"loss": loss}
        ```

        On JAX the step is stateless; record before `stateless_apply`, and
        return the state as usual (gradwatch reads the loss scale and the
        weights from the step's input state):

        ```python
        def train_step(self, state, data):
            trainable, non_trainable, optimizer_vars, metrics_vars = state
            (loss, non_trainable), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                trainable, non_trainable, data
            )
            self.record_gradients(grads, self.trainable_variables, optimizer=self.optimizer)
            trainable, optimizer_vars = self.optimizer.stateless_apply(
                optimizer_vars, grads, trainable
            )
            return {"loss": loss}, (trainable, non_trainable, optimizer_vars, metrics_vars)
        ```
        """
        if _compiling():
            # PyTorch `jit_compile=True`, from a custom step: recorded outside the
            # compiled graph (a graph break), on the step's real tensors.
            return _outside_compile(GradWatchMixin.record_gradients)(
                self, grads, variables, optimizer
            )
        scope = _scopes().get(id(self))
        if scope is None:
            raise RuntimeError(
                "`record_gradients` records for the step being run, so call it inside "
                f"`train_step` of {type(self).__name__}, during `fit` or `train_on_batch`."
            )
        watches = model_state(self).listening
        if not watches:
            return
        grads, variables = list(grads), list(variables)
        if len(grads) != len(variables):
            raise ValueError(
                "`grads` and `variables` must have the same length. "
                f"Received: len(grads)={len(grads)}, len(variables)={len(variables)}"
            )
        if scope.state is not None:
            # JAX: read the loss scale, `iterations` and the weights from the step's
            # input state, not from the variables (stale, or purged, while it runs).
            with _jax_step_scope(self, scope.state):
                pending = _before_update(self, scope, variables, optimizer, watches)
        else:
            pending = _before_update(self, scope, variables, optimizer, watches)
        _add_records(scope, grads, variables, *pending)


def _before_update(
    model: Any, scope: _StepScope, variables: list, optimizer: Any, watches: list
) -> tuple:
    """What is read before the optimizer applies the gradients of `variables`: the loss
    scale, and the weights (for the update stats). Notes a loss-scale optimizer's
    `iterations` in `scope`. Returns `(scale, weights before or None each, optimizer)`."""
    scale = _loss_scale(optimizer)
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) and (
        scope.state is None or _in_state(model, optimizer.iterations)
    ):
        before = _backend.iterations_now(optimizer)
        scope.loss_scaled.setdefault(id(optimizer), (optimizer, before))
    befores: list[Any] = [None] * len(variables)
    if any(w.needs_weights for w in watches):
        befores = [_backend.weights_before(v) for v in variables]
    return scale, befores, optimizer


def _add_records(
    scope: _StepScope, grads: list, variables: list, scale: Any, befores: list, optimizer: Any
) -> None:
    """Adds one step's gradients to `scope`, with what `_before_update` read."""
    for grad, var, before in zip(grads, variables, befores, strict=True):
        if id(var) in scope.grads:
            raise ValueError(
                f"The gradient of {var.path!r} was recorded twice in one step. "
                "Call `record_gradients` once per variable and step, with the "
                "gradient that is applied."
            )
        grad = _backend.as_recorded(grad, var)
        scope.grads[id(var)] = Record(var, grad, scale, before, optimizer)


def _outside_compile(fn: Callable) -> Callable:
    """PyTorch: `fn`, run eagerly at a graph break when called from `torch.compile`d code."""
    import torch

    return torch._dynamo.disable(fn)


def _note_stock_step(model: Any) -> None:
    """Notes that the stock step ran inside a custom one (`super().train_step`)."""
    scope = _scopes().get(id(model))
    if scope is not None:
        scope.stock = True


def _torch_compiled_step(model: Any, compiled: Callable) -> Callable:
    """The train function on PyTorch with `jit_compile=True`: Keras' `torch.compile`d
    step, unchanged, with the recording done around it, outside the compiled code.

    The stock step hands `optimizer.apply` each variable's `.grad`, and leaves it there
    (the next step's `zero_grad` clears it); the optimizer does not change it in place.
    So the gradients are read after the step, and what must be read before the update
    (the loss scale, the weights for the update stats) is read before the step. A
    custom step's `record_gradients` runs at a graph break, on the step's tensors; if
    it calls `super().train_step`, the stock step is recorded as above.
    """
    import torch

    custom = type(model).train_step is not GradWatchMixin.train_step

    def train_function(data: Any) -> Any:
        scopes = _scopes()
        scope = scopes[id(model)] = _StepScope()
        scope.stock = not custom
        try:
            watches = model_state(model).listening
            variables = list(model.trainable_weights)
            pending = None
            before = _StepScope()  # what the stock step's records read before it
            if watches and variables:
                with torch.no_grad():
                    pending = _before_update(model, before, variables, model.optimizer, watches)
            outputs = compiled(data)
            if pending is not None and scope.stock:
                for key, entry in before.loss_scaled.items():
                    scope.loss_scaled.setdefault(key, entry)
                grads = [v.value.grad for v in variables]
                _add_records(scope, grads, variables, *pending)
        finally:
            del scopes[id(model)]
        with torch.no_grad():
            _commit(model, scope)
        return outputs

    return train_function


def _jax_counted(fn: Callable, model: Any, state: Any, data: Any, **kwargs: Any) -> Any:
    """Runs a stateless JAX `train_step(state, data)` and adds the count and the capture.

    Whatever the step is (gradwatch's, the stock one, or a user's), its input state is
    where `record_gradients` reads the loss scale and the weights before the update,
    and its returned state is where the step counter, the ring buffer and the alarm
    (metrics) are advanced and written, in a `StatelessScope` over that state.
    """
    counter = model_state(model).counter
    if counter is None:
        # No counter in the state (the train function was made outside `fit`): run as is.
        return fn(model, state, data, **kwargs)
    scopes = _scopes()
    scope = scopes[id(model)] = _StepScope()
    scope.state = tuple(state)
    try:
        logs, new_state = fn(model, state, data, **kwargs)
    finally:
        del scopes[id(model)]
    trainable, non_trainable, optimizer_vars, metrics_vars = new_state
    refs = model.metrics_variables
    if len(refs) != len(metrics_vars):
        raise RuntimeError(
            f"The `train_step` of {type(model).__name__} returned "
            f"{len(metrics_vars)} metrics variables, and the model has {len(refs)}. "
            "Return the state as `(trainable_variables, non_trainable_variables, "
            "optimizer_variables, metrics_variables)`, with every metrics variable."
        )
    optimizer = getattr(model, "optimizer", None)
    mapping = [
        *zip(refs, metrics_vars, strict=True),
        *zip(model.trainable_variables, trainable, strict=True),  # after the update
        *zip(model.non_trainable_variables, non_trainable, strict=True),
    ]
    if optimizer is not None and optimizer_vars:
        mapping += list(zip(optimizer.variables, optimizer_vars, strict=True))
    with keras.StatelessScope(state_mapping=mapping) as written:
        _commit(model, scope)
    metrics_vars = [
        value if (new := written.get_current_value(ref)) is None else new
        for ref, value in zip(refs, metrics_vars, strict=True)
    ]
    return logs, (trainable, non_trainable, optimizer_vars, metrics_vars)


def _jax_step_scope(model: Any, state: tuple) -> Any:
    """A `StatelessScope` that reads the optimizer's and the trainable variables from
    the input state of the JAX step being traced."""
    trainable, _, optimizer_vars, _ = state
    mapping = list(zip(model.trainable_variables, trainable, strict=True))
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and optimizer_vars:
        mapping += list(zip(optimizer.variables, optimizer_vars, strict=True))
    return keras.StatelessScope(state_mapping=mapping)


def _jax_train_step(model: Any, state: Any, data: Any) -> Any:
    """The stock JAX `train_step(state, data)`, plus `record_gradients`, in the same step.

    The gradients, the optimizer update and the metrics are computed exactly as the
    stock step computes them. JAX differentiates a variable that the loss does not
    depend on to zeros; such variables are found while tracing, from the loss's jaxpr,
    and recorded as disconnected (`None`), as TensorFlow reports them. The optimizer
    still gets the zeros, as in the stock step.
    """
    import jax
    from keras.src.trainers.data_adapters import data_adapter_utils

    trainable, non_trainable, optimizer_vars, metrics_vars = state
    x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
    args = (trainable, non_trainable, metrics_vars, x, y, sample_weight, optimizer_vars)

    def loss_and_updates(tv, ntv, mv, x, y, sw, ov):
        return model.compute_loss_and_updates(
            tv, ntv, mv, x, y, sw, training=True, optimizer_variables=ov
        )

    connected = _reaches_loss(loss_and_updates, args, len(trainable))
    grad_fn = jax.value_and_grad(model.compute_loss_and_updates, has_aux=True)
    (_, aux), grads = grad_fn(
        trainable,
        non_trainable,
        metrics_vars,
        x,
        y,
        sample_weight,
        training=True,
        optimizer_variables=optimizer_vars,
    )
    (unscaled_loss, y_pred, non_trainable, metrics_vars) = aux
    optimizer = model.optimizer
    recorded = [g if used else None for g, used in zip(grads, connected, strict=True)]
    model.record_gradients(recorded, model.trainable_variables, optimizer=optimizer)
    trainable, optimizer_vars = optimizer.stateless_apply(optimizer_vars, grads, trainable)
    logs, metrics_vars = model._update_metrics_variables(
        metrics_vars, unscaled_loss, x, y, y_pred, sample_weight
    )
    return logs, (trainable, non_trainable, optimizer_vars, metrics_vars)


def _reaches_loss(loss_fn: Callable, args: tuple, n: int) -> list[bool]:
    """Whether the loss (the first output of `loss_fn(*args)`) depends on each of the
    first `n` array leaves of `args`, found from its jaxpr while tracing.

    A backward walk from the loss marks every input of an equation with a used
    output as used. Higher-order primitives (`jit`, `cond`, `while`, custom
    derivatives) are taken whole, so an input is never wrongly called unused;
    only `stop_gradient` cuts the walk, as it cuts TensorFlow's gradient.
    """
    import jax
    from jax.extend.core import Var

    def spec(a: Any) -> Any:
        return jax.ShapeDtypeStruct(np.shape(a), a.dtype)

    def loss_only(*a: Any) -> Any:
        return loss_fn(*a)[0]

    closed = jax.make_jaxpr(loss_only)(*jax.tree.map(spec, args))
    jaxpr = closed.jaxpr
    used = {v for v in jaxpr.outvars if isinstance(v, Var)}
    for eqn in reversed(jaxpr.eqns):
        if eqn.primitive.name == "stop_gradient":
            continue
        if any(v in used for v in eqn.outvars):
            used.update(v for v in eqn.invars if isinstance(v, Var))
    return [v in used for v in jaxpr.invars[:n]]


def _in_state(model: Any, variable: Any) -> bool:
    """JAX: whether `variable` is one of the compiled optimizer's, so in the step's state."""
    optimizer = getattr(model, "optimizer", None)
    return optimizer is not None and any(v is variable for v in optimizer.variables)


def _register(cls: type) -> type:
    return keras.saving.register_keras_serializable(package="gradwatch")(cls)


@_register
class Sequential(GradWatchMixin, keras.Sequential):
    """A `keras.Sequential` whose gradients a `GradWatch` can record.

    Example:

    ```python
    model = gradwatch.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    ```
    """


@_register
class Model(GradWatchMixin, keras.Model):
    """A functional (or subclassable) `keras.Model` whose gradients a `GradWatch` can record.

    Example:

    ```python
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(1)(inputs)
    model = gradwatch.Model(inputs, outputs)
    ```
    """


def _bound_callbacks(args: tuple, kwargs: dict) -> Any:
    if "callbacks" in kwargs:
        return kwargs["callbacks"]
    # keras.Model.fit(x, y, batch_size, epochs, verbose, callbacks, ...)
    return args[5] if len(args) > 5 else None


def _watches_in(callbacks: Any) -> tuple[Any, ...]:
    """The GradWatch callbacks in a list or CallbackList, in order, without repeats."""
    items = getattr(callbacks, "callbacks", callbacks) or []
    return tuple(dict.fromkeys(c for c in items if isinstance(c, Watcher)))


def _with_capture(state: _ModelState, fn: Any, capturing: bool) -> Any:
    """A train function that traces (and runs) with capture on or off."""

    def train_function(iterator: Any) -> Any:
        state.capturing = capturing
        try:
            return fn(iterator)
        finally:
            state.capturing = True

    return train_function


def setup_gate(model: Any) -> None:
    """Prepares host-side gating when no attached watch records every step.

    With `steps_per_execution=1` the host knows which step runs next, so steps
    that no watch records run a train function traced without capture: they pay
    nothing, not even a branch. Called at the start of training.
    """
    state = model_state(model)
    spe = int(model.steps_per_execution)
    if keras.backend.backend() == "jax":
        # The step gates itself (see `stateless_cond`). Two train functions cannot be had
        # here: Keras jits the same bound `train_step` for both, JAX's trace cache hands
        # the second the first one's trace, and every step was recorded.
        state.gate = None
        return
    if spe != 1 or not state.watches or any(w.every == 1 for w in state.watches):
        state.gate = None
        return
    if state.gate is None or state.gate[2] != state.traced_with:
        if model.train_function is None:
            model.make_train_function()
        with_capture = model.train_function
        model.make_train_function(force=True)
        without = model.train_function
        state.gate = (
            _with_capture(state, with_capture, True),
            _with_capture(state, without, False),
            state.traced_with,
        )
    state.next_step = 0 if state.counter is None else int(state.counter.numpy())


def gate_next_step(model: Any) -> None:
    """Before an execution: picks the train function for the step about to run."""
    state = model_state(model)
    if state.gate is None:
        return
    step = state.next_step
    state.next_step += 1
    wanted = any(w.wants_step(step) for w in state.watches)
    model.train_function = state.gate[0] if wanted else state.gate[1]
