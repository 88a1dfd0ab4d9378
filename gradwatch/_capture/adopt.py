"""GradWatch on any Keras model. For the length of a training, a `GradWatch` swaps
the model's class for a subclass that mixes in `GradWatchMixin`, with the same name,
module and Keras registration, and gives the class back when its watches detach
(`_step.restore_class`). The model's name, weights, and so its trained numbers, are
those of the plain model.

The swap happens inside Keras' `fit`, in `on_train_begin`, and Keras calls no callback
when `fit` raises: `guard_fit` wraps `keras.Model.fit` so that, however it ends, the
watches of a model adopted in it write out what they recorded and detach."""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from gradwatch._backend import current as _backend
from gradwatch._capture.counting import counted
from gradwatch._capture.step import model_state, release_watches
from gradwatch.mixin import ApplyInterceptor, GradWatchMixin, optimizers_of, setup_gate

_CLASSES: weakref.WeakKeyDictionary[type, type] = weakref.WeakKeyDictionary()


def adopt(model: Any) -> bool:
    """Swaps a plain model's class for its recording subclass; False if the model
    already mixes in `GradWatchMixin` (nothing to do)."""
    if isinstance(model, GradWatchMixin):
        return False
    cls = type(model)
    object.__setattr__(model, "__class__", adopted_class(cls))
    state = model_state(model)
    state.adopted_from = cls
    # Keras made its train function at the start of this fit; the same one as at the last
    # watched fit means no compile since, so the functions traced then still hold.
    if model.train_function is not state.stock_function:
        state.captured, state.gate = {}, None
    state.stock_function = _backend.stock_train_function(model, model.train_function)
    return True


def join(model: Any, watch: Any) -> None:
    """Attaches `watch` to the model's watches where the model's own `fit` did not (a
    plain model, or `fit` of a class that overrides it), with the train function traced
    for the watches now attached (the one traced before for them, on an adopted model);
    and sets up the gating of `every` for them all."""
    state = model_state(model)
    joined = watch not in state.watches
    if joined:
        state.watches.append(watch)
        state.traced_with = tuple(state.watches)
        adopted = state.adopted_from is not None
        if adopted and state.traced_with in state.captured:
            model.train_function = state.captured[state.traced_with]  # traced before
        else:
            model.make_train_function(force=True)
            if adopted:
                state.captured[state.traced_with] = model.train_function
    if state.watches[0] is watch or joined:
        setup_gate(model)  # again when a watch joins: the gate serves them all


def guard_fit() -> None:
    """Wraps `keras.Model.fit`, once per process, so that a model adopted during a
    `fit` is released on any exit from it: every step its watches recorded (also
    those still on the device) written out, and its class and train function given
    back. Called when a `GradWatch` is made, so before any `fit` it can join.

    Example:

    ```python
    guard_fit()  # in GradWatch.__init__
    ```
    """
    fit = keras.Model.fit
    if getattr(fit, "_gradwatch_guard", False):
        return
    keras.Model.fit = _guarded(fit)


def _guarded(fit: Callable) -> Callable:
    """`fit`, and then the release of the watches that adopted the model in it."""

    signature = inspect.signature(fit)

    @functools.wraps(fit)
    def guarded_fit(self: Any, *args: Any, **kwargs: Any) -> Any:
        self.__dict__[FIT_BATCH_SIZE] = _ordered_batch_size(signature, self, args, kwargs)
        if isinstance(self, GradWatchMixin):
            # The mixin's own `fit` releases its watches around this call (also those
            # of a plain model adopted before it).
            return fit(self, *args, **kwargs)
        try:
            history = fit(self, *args, **kwargs)
        except BaseException as e:
            if _adopted(self):
                release_watches(self, error=e)
            raise
        # `on_train_end` released them, unless a `fit` that overrides Keras' one ended
        # without calling it.
        if _adopted(self):
            release_watches(self)
        return history

    guarded_fit._gradwatch_guard = True  # type: ignore[attr-defined]
    return guarded_fit


#: The model's attribute holding, during `fit`, the batch size of arrays that `fit`
#: batches in order (`shuffle=False`), or None: a replayed row's index in the data.
FIT_BATCH_SIZE = "_gradwatch_fit_batch_size"


def _ordered_batch_size(signature: Any, model: Any, args: tuple, kwargs: dict) -> int | None:
    """The batch size where `fit` was given arrays (NumPy arrays or tensors, or lists or
    dicts of them) with `shuffle=False` and every epoch starting at their first row (no
    `steps_per_epoch`), so that step `s` of an epoch holds its rows `s * batch_size` on;
    else None."""
    try:
        bound = signature.bind(model, *args, **kwargs).arguments
    except TypeError:
        return None
    x = bound.get("x")
    shuffle = bound.get("shuffle", True)
    if x is None or shuffle is not False or bound.get("steps_per_epoch") is not None:
        return None
    leaves = keras.tree.flatten(x)
    if not leaves or not all(isinstance(t, np.ndarray) or keras.ops.is_tensor(t) for t in leaves):
        return None
    batch_size = bound.get("batch_size")
    return 32 if batch_size is None else int(batch_size)  # `fit`'s default


def _adopted(model: Any) -> bool:
    """Whether a `GradWatch` adopted the model (and has not released it yet)."""
    state = model.__dict__.get("_gradwatch_state")
    return state is not None and state.adopted_from is not None


def adopted_class(cls: type) -> type:
    """`cls` with `GradWatchMixin` first among its bases, made once per class.

    A custom `train_step` of `cls` is counted, and the gradients it hands to any of
    the model's optimizers (`apply`, which `apply_gradients` calls) are recorded,
    except for the variables it records itself.
    """
    if cls in _CLASSES:
        return _CLASSES[cls]
    namespace: dict[str, Any] = {
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
    }
    if cls.train_step is not keras.Model.train_step:
        namespace["train_step"] = counted(_intercepting(cls.train_step))
    sub = type(cls.__name__, (GradWatchMixin, cls), namespace)
    _copy_registration(cls, sub)
    _CLASSES[cls] = sub
    return sub


def _intercepting(step: Callable) -> Callable:
    """A custom train step with the optimizers' `apply` recorded on the way."""

    @functools.wraps(step)
    def train_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not model_state(self).listening or not _backend.APPLY_METHOD or _backend.compiling():
            return step(self, *args, **kwargs)
        with contextlib.ExitStack() as stack:
            for optimizer in optimizers_of(self):
                stack.enter_context(
                    ApplyInterceptor(optimizer, self, method="apply", skip_recorded=True)
                )
            return step(self, *args, **kwargs)

    return train_step


def _copy_registration(cls: type, sub: type) -> None:
    """Saving during training (a `ModelCheckpoint`) names the plain class: a class
    registered with `keras.saving.register_keras_serializable` keeps its name."""
    name = keras.saving.get_registered_name(cls)
    if name == cls.__name__:
        return
    try:
        from keras.src.saving import object_registration
    except ImportError:  # pragma: no cover - Keras moved its registry
        return
    object_registration.GLOBAL_CUSTOM_NAMES[sub] = name
