"""Capture: the train_step mixin that records what the optimizer applies, by variable."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import keras

from gradwatch._backend import current as _backend
from gradwatch._capture import counting as _capture
from gradwatch._capture.counting import add_records, before_update, counted, next_step, step_counter
from gradwatch._capture.step import (
    ModelState,
    Watcher,
    model_state,
    own_state_hidden,
    release_watches,
    scopes,
)

_patch_lock = threading.Lock()


def _own_metrics(model: Any) -> list[Any]:
    """JAX: gradwatch's device state (step counter, ring buffers, alarms), which travels
    in the train step's metrics state; none on the other backends, and none while the
    model evaluates (a test step neither writes nor returns it)."""
    if not _backend.STATE_IN_STEP:
        return []
    state = model_state(model)
    if state.own_hidden:
        return []
    own = [] if state.counter is None else _backend.counter_metrics(state.counter)
    for watch in state.watches:
        own += watch.state_metrics()
    return own


def _ensure_counter(model: Any) -> None:
    """Where the step counter travels in the step's state (JAX): creates it before Keras
    gathers that state, so that steps run without a `GradWatch` are counted too (a train
    function made before it existed is made anew). Where the step runs eagerly (PyTorch),
    also made here: it starts at the optimizer's `iterations` before any update."""
    if _backend.EAGER and model_state(model).counter is None:
        step_counter(model)
    if _backend.STATE_IN_STEP and model_state(model).counter is None:
        step_counter(model)
        model.train_function = None


def optimizers_of(model: Any) -> list[Any]:
    """The model's optimizers: `model.optimizer` and any optimizer among its attributes
    (a GAN's `d_optimizer` and `g_optimizer`), once each."""
    found: dict[int, Any] = {}
    for value in [getattr(model, "optimizer", None), *vars(model).values()]:
        if isinstance(value, keras.optimizers.Optimizer):
            found.setdefault(id(value), value)
    return list(found.values())


def applying_optimizer(model: Any) -> Any:
    """The optimizer that applies gradients recorded without `optimizer=`, where it can
    be known: the model's own when it has no other. None with several (a GAN's)."""
    found = optimizers_of(model)
    return found[0] if len(found) == 1 else None


class ApplyInterceptor:
    """Routes the optimizer's apply method through a recorder while a stock step runs.

    The method is `apply_gradients(grads_and_vars)` on TensorFlow and
    `apply(grads, trainable_variables)` on PyTorch, as each stock step calls it.
    """

    def __init__(
        self, optimizer: Any, model: Any, method: str | None = None, skip_recorded: bool = False
    ):
        self.optimizer = optimizer
        self.model = model
        self.method = method or _backend.APPLY_METHOD
        # A custom step may record some variables itself; the optimizer then gets the rest.
        self.skip_recorded = skip_recorded
        self.hooks_name = f"_gradwatch_hooks_{self.method}"

    def __enter__(self) -> None:
        with _patch_lock:
            opt = self.optimizer
            hooks = opt.__dict__.get(self.hooks_name)
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
                object.__setattr__(opt, self.hooks_name, hooks)
                # An `apply` already patched (`_capture.guard.ApplyGuard`) comes back on exit.
                object.__setattr__(opt, f"{self.hooks_name}_prior", opt.__dict__.get(self.method))
                object.__setattr__(opt, self.method, patched)
            hooks[threading.get_ident()] = self._record

    def _record(self, grads_and_vars: list) -> None:
        scope = scopes().get(id(self.model))
        if self.skip_recorded and scope is not None:
            # The step's own `record_gradients` call before this apply recorded these
            # already; an apply it did not record (a critic's next update) is recorded.
            kept = []
            for g, v in grads_and_vars:
                seen = scope.applied.get(id(v), 0)
                scope.applied[id(v)] = seen + 1
                if seen >= scope.by_hand.get(id(v), 0):
                    kept.append((g, v))
            grads_and_vars = kept
        if not grads_and_vars:
            return
        grads = [g for g, _ in grads_and_vars]
        variables = [v for _, v in grads_and_vars]
        _record_in_step(self.model, grads, variables, self.optimizer, by_hand=False)

    def __exit__(self, *exc: Any) -> None:
        with _patch_lock:
            opt = self.optimizer
            hooks = opt.__dict__[self.hooks_name]
            hooks.pop(threading.get_ident(), None)
            if not hooks:
                prior = opt.__dict__[f"{self.hooks_name}_prior"]
                if prior is None:
                    object.__delattr__(opt, self.method)
                else:
                    object.__setattr__(opt, self.method, prior)
                object.__delattr__(opt, self.hooks_name)
                object.__delattr__(opt, f"{self.hooks_name}_prior")


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
            cls.train_step = counted(step)

    @counted
    def train_step(self, *args: Any) -> Any:
        # `(data)` on TensorFlow and PyTorch, the stateless `(state, data)` on JAX.
        if _backend.compiling():
            # PyTorch `jit_compile=True`: `torch.compile` traces the stock step alone, and
            # the backend's train function records around it.
            if type(self).train_step is not GradWatchMixin.train_step:
                _backend.note_stock_step(self)  # from a custom step's super()
            return super().train_step(*args)
        if _backend.OWN_TRAIN_STEP and model_state(self).watches:
            return _backend.train_step(self, *args)
        if not model_state(self).listening or not _backend.APPLY_METHOD:
            return super().train_step(*args)
        with ApplyInterceptor(self.optimizer, self):
            return super().train_step(*args)

    # JAX: gradwatch's device state travels in the train step's metrics state, after the
    # model's own metrics variables. It stays out of `metrics`, which users iterate (a
    # custom step updating each of `self.metrics`, or a `metrics` property of its own);
    # `_backend.run_step` hands the step only the variables of `metrics`.
    @property
    def metrics_variables(self) -> list[Any]:
        own = [v for m in _own_metrics(self) for v in m.variables]
        return super().metrics_variables + own

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        """Runs `keras.Model.evaluate`; gradwatch's device state stays out of the test
        step's state."""
        with own_state_hidden(self):
            return super().evaluate(*args, **kwargs)

    def test_on_batch(self, *args: Any, **kwargs: Any) -> Any:
        """Runs `keras.Model.test_on_batch`; as `evaluate`."""
        with own_state_hidden(self):
            return super().test_on_batch(*args, **kwargs)

    def fit(self, *args: Any, **kwargs: Any) -> Any:
        """Runs `keras.Model.fit` with the `GradWatch` callbacks among `callbacks` attached.

        The capture is traced into the train function, so it is traced anew
        only when the set of watches changes. On any exit, also an exception,
        the watches drain what they captured, write it out and detach.
        """
        state = model_state(self)
        _ensure_counter(self)
        watches = _watches_in(_bound_callbacks(args, kwargs))
        if watches != state.traced_with:
            self.train_function = None  # Keras makes and traces a new one
            state.traced_with = watches
        state.watches = list(watches)
        # Keras skips `on_train_end` when `fit` raises (`KeyboardInterrupt`, `SystemExit`
        # too): copy out what the device recorded, write it out, and detach, on any exit.
        try:
            history = super().fit(*args, **kwargs)
        except BaseException as e:
            release_watches(self, error=e)
            _anchor(self, state)
            raise
        release_watches(self)
        _anchor(self, state)
        return history

    def make_train_function(self, force: bool = False) -> Any:
        """Keras' train function, as the backend makes it (on PyTorch with
        `jit_compile=True`, gradwatch records around the `torch.compile`d step rather
        than inside it)."""
        custom = type(self).train_step is not GradWatchMixin.train_step
        return _backend.make_train_function(
            self, super().make_train_function, force, custom, _capture
        )

    def train_on_batch(self, *args: Any, **kwargs: Any) -> Any:
        """Runs `keras.Model.train_on_batch`, without capture (no callbacks run here)."""
        state = model_state(self)
        _ensure_counter(self)
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

        Call it with the gradients you pass to `apply_gradients`, before you
        apply them (the update stats read the weights here), once per update:
        a variable recorded again in the same step (a critic updated several
        times) is its next update, logged as `key@1`, `key@2`, ... beside
        `key`. Without a `GradWatch` attached it does nothing.

        Args:
            grads: Gradients, one per variable; `None` for a disconnected one.
            variables: The model's trainable variables they belong to.
            optimizer: The optimizer that applies the gradients. If its
                `scale_loss` scaled the loss, the gradients are divided by its
                loss scale, and its clipping gives the `clipped_norm` stat.
                Defaults to `None`: the gradients are taken as they are
                (not unscaled), and `clipped_norm` follows the clipping of
                `self.optimizer` where it is the model's only optimizer; with
                several (a GAN's), `clipped_norm` equals `norm`, with a warning.

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
        if _backend.compiling():
            # PyTorch `jit_compile=True`, from a custom step: recorded outside the
            # compiled graph (a graph break), on the step's real tensors.
            return _backend.outside_compile(GradWatchMixin.record_gradients)(
                self, grads, variables, optimizer
            )
        _record_in_step(self, grads, variables, optimizer, by_hand=True)


def _record_in_step(
    model: Any, grads: Sequence[Any], variables: Sequence[Any], optimizer: Any, by_hand: bool
) -> None:
    """`record_gradients`: from the step's own call (`by_hand`), or from an optimizer's
    apply that `ApplyInterceptor` saw."""
    scope = scopes().get(id(model))
    if scope is None:
        raise RuntimeError(
            "`record_gradients` records for the step being run, so call it inside "
            f"`train_step` of {type(model).__name__}, during `fit` or `train_on_batch`."
        )
    watches = model_state(model).listening
    if not watches:
        return
    grads, variables = list(grads), list(variables)
    if len(grads) != len(variables):
        raise ValueError(
            "`grads` and `variables` must have the same length. "
            f"Received: len(grads)={len(grads)}, len(variables)={len(variables)}"
        )
    if by_hand:
        for v in variables:
            scope.by_hand[id(v)] = scope.by_hand.get(id(v), 0) + 1
    # JAX: the loss scale, `iterations` and the weights are read from the step's
    # input state, not from the variables (stale, or purged, while it runs).
    with _backend.input_scope(model, scope):
        scale, befores, _, states = before_update(model, scope, variables, optimizer, watches)
    # Without `optimizer=`, the gradients are taken as they are (no loss scale), but
    # the model's own optimizer, when it has no other, is the one that clips them.
    clips = optimizer if optimizer is not None else applying_optimizer(model)
    add_records(scope, grads, variables, scale, befores, clips, states)


def record_gradients(
    model: Any, grads: Sequence[Any], variables: Sequence[Any], optimizer: Any = None
) -> None:
    """Records gradients from the custom `train_step` of any Keras model, with or
    without `GradWatchMixin`: `GradWatchMixin.record_gradients` as a function.

    Where the step hands its gradients to an optimizer's `apply` or `apply_gradients`,
    a `GradWatch` records them without this call; call it where gradwatch cannot see
    them, such as a stateless JAX step (`stateless_apply`). Without a `GradWatch`
    attached it does nothing.

    Args:
        model: The model whose step is running (`self` in `train_step`).
        grads: Gradients, one per variable; `None` for a disconnected one.
        variables: The model's trainable variables they belong to.
        optimizer: The optimizer that applies the gradients (see
            `GradWatchMixin.record_gradients`). Defaults to `None`.

    Example:

    ```python
    def train_step(self, state, data):
        ...
        gradwatch.record_gradients(self, grads, self.trainable_variables, self.optimizer)
        trainable, optimizer_vars = self.optimizer.stateless_apply(
            optimizer_vars, grads, trainable
        )
    ```
    """
    if isinstance(model, GradWatchMixin):
        GradWatchMixin.record_gradients(model, grads, variables, optimizer)
    # Otherwise no GradWatch records this model (a watch adopts it for its training).


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


def _with_capture(state: ModelState, fn: Any, capturing: bool) -> Any:
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
    if _backend.GATES_IN_STEP:  # the step gates itself (host gating cannot work there)
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
    state.next_step = next_step(model)


def gate_next_step(model: Any) -> None:
    """Before an execution: picks the train function for the step about to run."""
    state = model_state(model)
    if state.gate is None:
        return
    step = state.next_step
    state.next_step += 1
    wanted = any(w.wants_step(step) for w in state.watches)
    model.train_function = state.gate[0] if wanted else state.gate[1]


def resync_gate(model: Any, step: int) -> None:
    """At the start of an epoch: the host's count of the next step is the model's own.

    The host counts an execution at each `on_train_batch_begin`, but at the end of a
    dataset of unknown cardinality Keras calls it once more for the call that finds no
    data, which runs no step."""
    state = model_state(model)
    if state.gate is not None:
        state.next_step = step


def _anchor(model: Any, state: Any) -> None:
    """Where the model's step count stands after a `fit`, for the next one's resume rules."""
    if state.counter is not None:
        _capture.anchor(model)
