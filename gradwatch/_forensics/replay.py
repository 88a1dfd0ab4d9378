"""The replay of one batch, eagerly and layer by layer, that finds where its first NaN or
Inf is born (`gradwatch.trace_nonfinite`)."""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from keras import ops

from gradwatch._backend import NAME as BACKEND
from gradwatch._backend import current as _backend
from gradwatch._forensics.origin import NonfiniteOrigin

# ------------------------------------------------- the hook on every layer's `__call__`
# Keras has no forward hooks, so the replay wraps `keras.layers.Layer.__call__` for its
# own length. The wrapper serves only the thread that replays: other threads' layers run
# Keras' own `__call__` (one attribute read more).
_LOCAL = threading.local()
_LOCK = threading.Lock()
_installed: list[Any] = []  # Keras' own `__call__`, while one replay or more are running


@dataclass
class _Call:
    """One call of a layer in the replay's forward pass."""

    index: int  # in the order the calls began
    layer: Any
    key: str
    parent: int | None  # the call it ran in
    args: tuple = ()
    kwargs: dict | None = None
    outputs: Any = None
    finished: int = -1  # in the order the calls returned: inner layers first


class _Recorder:
    """Notes each layer's call, its inputs and outputs (the forward pass), or adds each
    call's probes to its inputs and outputs (the gradient pass: the gradient with respect
    to a probe is the gradient that flows there)."""

    def __init__(self, keys: dict[int, str], probes: dict[int, tuple[list, list]] | None = None):
        self.keys = keys
        self.probes = probes
        self.calls: list[_Call] = []
        self.stack: list[int] = []
        self.returned = 0

    def call(self, original: Callable, layer: Any, args: tuple, kwargs: dict) -> Any:
        index = len(self.calls)
        parent = self.stack[-1] if self.stack else None
        key = self.keys.get(id(layer))
        if key is None:  # a layer made in a call: below its caller
            key = layer.name if parent is None else f"{self.calls[parent].key}/{layer.name}"
        call = _Call(index, layer, key, parent)
        self.calls.append(call)
        probes = self.probes.get(index) if self.probes is not None else None
        if probes is not None:
            args, kwargs = _add_probes((args, kwargs), probes[0])
        else:
            call.args, call.kwargs = args, kwargs
        self.stack.append(index)
        try:
            outputs = original(layer, *args, **kwargs)
        finally:
            self.stack.pop()
        call.finished, self.returned = self.returned, self.returned + 1
        if probes is not None:
            return _add_probes(outputs, probes[1])
        call.outputs = outputs
        return outputs


@contextlib.contextmanager
def _hooked(recorder: _Recorder) -> Iterator[None]:
    with _LOCK:
        if not _installed:
            original = keras.layers.Layer.__call__
            _installed.append(original)

            @functools.wraps(original)
            def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
                active = getattr(_LOCAL, "recorder", None)
                if active is None:
                    return original(self, *args, **kwargs)
                return active.call(original, self, args, kwargs)

            keras.layers.Layer.__call__ = __call__
        else:
            _installed.append(_installed[0])
    previous = getattr(_LOCAL, "recorder", None)
    _LOCAL.recorder = recorder
    try:
        yield
    finally:
        _LOCAL.recorder = previous
        with _LOCK:
            original = _installed.pop()
            if not _installed:
                keras.layers.Layer.__call__ = original


@contextlib.contextmanager
def _unhooked() -> Iterator[None]:
    """Layers run as Keras runs them (a rerun of one layer, looking for the op)."""
    previous = getattr(_LOCAL, "recorder", None)
    _LOCAL.recorder = None
    try:
        yield
    finally:
        _LOCAL.recorder = previous


# ------------------------------------------------- tensors, their rows and finiteness
def _is_float(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    if dtype is None or not hasattr(x, "shape") or isinstance(x, keras.Variable):
        return False
    try:
        return keras.backend.is_float_dtype(keras.backend.standardize_dtype(dtype))
    except ValueError:  # a dtype Keras does not know (strings)
        return False


def _floats(structure: Any) -> list[Any]:
    return [leaf for leaf in keras.tree.flatten(structure) if _is_float(leaf)]


def _numpy(x: Any) -> np.ndarray:
    a = np.asarray(ops.convert_to_numpy(x))
    return a if a.dtype.kind == "f" else a.astype(np.float32)  # bfloat16


def _add_probes(structure: Any, probes: Sequence[Any]) -> Any:
    """`structure` with each float tensor `t` replaced by `t + probe`, in order."""
    leaves = keras.tree.flatten(structure)
    it = iter(probes)
    out = []
    for leaf in leaves:
        if _is_float(leaf):
            probe = next(it, None)
            if probe is not None and tuple(probe.shape) == tuple(leaf.shape):
                mask = getattr(leaf, "_keras_mask", None)
                leaf = ops.add(leaf, probe)
                if mask is not None:
                    with contextlib.suppress(AttributeError):
                        leaf._keras_mask = mask
        out.append(leaf)
    return keras.tree.pack_sequence_as(structure, out)


@dataclass
class _Scan:
    """Where a set of arrays holds NaN and Inf."""

    nan: int
    inf: int
    rows: tuple[int, ...]  # the batch rows holding one, among the arrays with a batch axis

    @property
    def finite(self) -> bool:
        return self.nan == 0 and self.inf == 0

    def counts(self) -> str:
        return f"{self.nan} NaN and {self.inf} Inf"


def _scan(arrays: Sequence[Any], n: int) -> _Scan:
    nan = inf = 0
    rows: set[int] = set()
    for x in arrays:
        if x is None:
            continue
        a = _numpy(x)
        bad = ~np.isfinite(a)
        if not bad.any():
            continue
        nan += int(np.isnan(a).sum())
        inf += int(np.isinf(a).sum())
        if a.ndim >= 1 and a.shape[0] == n:
            rows.update(np.flatnonzero(bad.reshape(n, -1).any(axis=1)).tolist())
    return _Scan(nan, inf, tuple(sorted(rows)))


def _rows_text(rows: Sequence[int]) -> str:
    if not rows:
        return "no single row (the values there have no batch axis)"
    if len(rows) == 1:
        return f"row {rows[0]}"
    shown = [str(r) for r in rows[:8]]
    if len(rows) > 8:
        return f"{len(rows)} rows ({', '.join(shown)}, ...)"
    return f"rows {', '.join(shown[:-1])} and {shown[-1]}"


def _values_text(arrays: Sequence[Any], rows: Sequence[int], n: int) -> str:
    """What the arrays hold on `rows`: "all zeros", "from -1 to 2", "no finite value"."""
    values = []
    for x in arrays:
        a = _numpy(x)
        if rows and a.ndim >= 1 and a.shape[0] == n:
            a = a[list(rows)]
        values.append(a.ravel())
    flat = np.concatenate(values) if values else np.zeros(0)
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return "no finite value"
    if not flat.any():
        return "all zeros"
    return f"from {float(flat.min()):.4g} to {float(flat.max()):.4g}"


def _input_text(arrays: Sequence[Any], rows: Sequence[int], n: int) -> str:
    """`its input there ...`: "is all zeros", "ranges from -1 to 2", "holds no finite value"."""
    text = _values_text(arrays, rows, n)
    if text == "all zeros":
        return "is all zeros"
    return f"ranges {text}" if text.startswith("from") else f"holds {text}"


def _row(structure: Any, i: int) -> Any:
    return keras.tree.map_structure(lambda t: t if t is None else t[i : i + 1], structure)


# ------------------------------------------------- the model: its layers and its step
def layer_keys(model: Any) -> dict[int, str]:
    """Each layer's key prefix, by `id`: the model's name, then the layer names down to
    it (`net/encoder/attn`), as variable keys have them (`gradwatch.keys.model_paths`)."""
    keys = {id(model): model.name}

    def walk(layer: Any, prefix: str) -> None:
        subs = getattr(layer, "_flatten_layers", lambda **_: [])(
            include_self=False, recursive=False
        )
        for sub in subs:
            if id(sub) not in keys:
                keys[id(sub)] = prefix + sub.name
                walk(sub, keys[id(sub)] + "/")

    walk(model, model.name + "/")
    return keys


def _own_weights(layer: Any) -> list[Any]:
    """The layer's trainable variables that none of its sublayers holds."""
    subs = layer._flatten_layers(include_self=False, recursive=False)
    inner = {id(v) for sub in subs for v in sub.weights}
    return [v for v in layer.trainable_weights if id(v) not in inner]


def own_method(model: Any, method: str) -> bool:
    """Whether the model's class (or a base of it) has a `method` of its own: one that
    neither Keras nor gradwatch wrote (gradwatch's wrappers unwrapped)."""
    for cls in type(model).__mro__:
        fn = cls.__dict__.get(method)
        if fn is None:
            continue
        module = getattr(inspect.unwrap(fn), "__module__", None) or ""
        if module.split(".")[0] not in ("keras", "gradwatch"):
            return True
    return False


def _with_training(layer: Any, kwargs: dict) -> dict:
    """A rerun's arguments: `training=True` where the call inherited it from its caller."""
    if "training" in getattr(layer, "_call_context_args", ()) and "training" not in kwargs:
        return {**kwargs, "training": True}
    return kwargs


# ------------------------------------------------- the replay
@dataclass
class Batch:
    """One batch as the step gets it: `x`, `y`, `sample_weight`, and its row count."""

    x: Any
    y: Any
    sample_weight: Any
    n: int


def batch_of(x: Any, y: Any, sample_weight: Any) -> Batch:
    """A batch handed to the host (NumPy, nested as `fit` gave it) as tensors."""

    def tensor(part: Any) -> Any:
        if part is None:
            return None
        return keras.tree.map_structure(
            lambda t: t if t is None else keras.ops.convert_to_tensor(t), part
        )

    n = int(np.shape(keras.tree.flatten(x)[0])[0])
    return Batch(tensor(x), tensor(y), tensor(sample_weight), n)


def check_trainable(model: Any, variables: Sequence[Any]) -> None:
    """Raises where one of `variables` is not a trainable variable of `model`."""
    known = {id(v) for v in model.trainable_variables}
    strangers = [getattr(v, "path", repr(v)) for v in variables if id(v) not in known]
    if strangers:
        raise ValueError(
            f"`variables` must be trainable variables of {type(model).__name__}. "
            f"Received: {strangers[:5]}"
        )


def replay(model: Any, batch: Batch) -> NonfiniteOrigin | None:
    """Replays `batch` on the model's current weights and names where its first NaN or
    Inf is born; None where the step's loss and gradients are finite. Nothing of the
    model changes: the replay runs in a `keras.StatelessScope`."""
    for stage, parts in (
        ("input", {"x": batch.x}),
        ("target", {"y": batch.y, "sample_weight": batch.sample_weight}),
    ):
        if origin := data_origin(stage, parts, batch.n):
            return origin
    keys = layer_keys(model)
    with keras.StatelessScope(collect_losses=True):
        recorder = _Recorder(keys)
        with _hooked(recorder):
            y_pred = _call_model(model, batch)
        if origin := _forward_origin(recorder.calls, batch.n):
            return origin
        if own_method(model, "train_step"):
            return NonfiniteOrigin(
                None,
                None,
                None,
                (),
                None,
                "The input and every layer's output are finite; the loss and the backward "
                f"pass could not be replayed: {type(model).__name__} has its own "
                "`train_step`, which computes them.",
            )
        if batch.y is None and getattr(model, "_compile_loss", None) is not None:
            return None  # without targets, the compiled loss cannot be computed
        loss = batch_loss(model, batch, y_pred)
        if not _scan([loss], batch.n).finite:
            return _loss_origin(model, batch, y_pred, loss)
    return _backward_origin(model, batch, recorder.calls, keys)


def _call_model(model: Any, batch: Batch) -> Any:
    try:
        return model(batch.x, training=True)
    except Exception as e:  # the user's model on the user's batch: say which
        shapes = [tuple(t.shape) for t in keras.tree.flatten(batch.x)]
        raise ValueError(
            f"The model could not be called on `x`: {type(e).__name__}: {e} "
            f"Received: x with shapes {shapes}. Pass one batch of what `model.fit` "
            "gets as `x` (its first axis the batch)."
        ) from e


def batch_loss(model: Any, batch: Batch, y_pred: Any, row: int | None = None) -> Any:
    """The model's training loss on `batch` (`_compute_loss`: the compiled loss with the
    batch's sample weights, plus regularizers and `add_loss` terms), or on its `row` alone."""
    x, y, sw = batch.x, batch.y, batch.sample_weight
    if row is not None:
        x, y, y_pred, sw = (_row(part, row) for part in (x, y, y_pred, sw))
    return model._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sw, training=True)


def data_origin(stage: str, parts: dict[str, Any], n: int) -> NonfiniteOrigin | None:
    for name, part in parts.items():
        found = _scan(_floats(part), n)
        if not found.finite:
            return NonfiniteOrigin(
                stage,  # type: ignore[arg-type]
                None,
                None,
                found.rows,
                None,
                f"`{name}` holds {found.counts()}, in {_rows_text(found.rows)}.",
            )
    return None


def _forward_origin(calls: list[_Call], n: int) -> NonfiniteOrigin | None:
    """The first layer to return a NaN or Inf from finite inputs: inner layers return
    before the layers that call them, so the innermost one is named."""
    for call in sorted(calls, key=lambda c: c.finished):
        if call.finished < 0:
            continue
        inputs = _floats((call.args, call.kwargs))
        out = _scan(_floats(call.outputs), n)
        if out.finite or not _scan(inputs, n).finite:
            continue
        weights = _own_weights(call.layer)
        bad_weights = [v for v in weights if not _scan([v.value], 0).finite]
        detail = (
            f"The output of `{call.key}` holds {out.counts()}, in {_rows_text(out.rows)}, "
            f"from finite inputs; its input there {_input_text(inputs, out.rows, n)}"
        )
        op = None
        if bad_weights:
            names = ", ".join(f"`{v.name}`" for v in bad_weights)
            detail += f"; its weights {names} hold NaN or Inf (from an earlier step)"
        else:
            op = _forward_op(call)
        return NonfiniteOrigin("forward", call.key, op, out.rows, None, detail + ".")
    return None


def _forward_op(call: _Call) -> str | None:
    """TensorFlow: the first op of the call's rerun on its recorded inputs that makes a
    NaN or Inf."""
    kwargs = _with_training(call.layer, call.kwargs or {})
    with _unhooked():
        return _backend.first_nonfinite_op(lambda: call.layer(*call.args, **kwargs))


def _loss_origin(model: Any, batch: Batch, y_pred: Any, loss: Any) -> NonfiniteOrigin:
    value = float(_numpy(loss))
    added = [t for t in model.losses if not _scan([t], 0).finite]
    if added:
        return NonfiniteOrigin(
            "loss",
            None,
            None,
            (),
            None,
            f"The loss is {value}: {len(added)} of the model's added losses (`add_loss`, "
            "regularizers) hold NaN or Inf.",
        )
    # Each row's own loss, the loss function called on that row alone: also where the
    # loss averages the batch.
    rows = tuple(
        i for i in range(batch.n) if not _scan([batch_loss(model, batch, y_pred, i)], 0).finite
    )
    if not rows:
        return NonfiniteOrigin(
            "loss",
            None,
            None,
            (),
            None,
            f"The loss is {value}, but each row's own loss is finite: the batch's loss "
            "overflows only together.",
        )
    op = _backend.first_nonfinite_op(lambda: batch_loss(model, batch, y_pred, rows[0]))
    preds = _values_text(_floats(y_pred), rows, batch.n)
    targets = _values_text(_floats(batch.y), rows, batch.n)
    return NonfiniteOrigin(
        "loss",
        None,
        op,
        rows,
        None,
        f"The loss is {value}: the loss of {_rows_text(rows)} alone is not finite, from "
        f"finite predictions (there: {preds}; the targets there: {targets}).",
    )


# ------------------------------------------------- the backward pass
def _backward_origin(
    model: Any, batch: Batch, calls: list[_Call], keys: dict[int, str]
) -> NonfiniteOrigin | None:
    """Replays the step's gradient with a zero probe added to each layer call's inputs
    and outputs: the gradient with respect to an output's probe is the gradient the
    call received, the one with respect to an input's probe the gradient the call
    passes back (through it alone)."""
    flat: list[Any] = []
    spans: dict[int, tuple[int, int, int]] = {}
    for call in calls:
        start = len(flat)
        flat += [ops.zeros_like(t) for t in _floats((call.args, call.kwargs))]
        middle = len(flat)
        flat += [ops.zeros_like(t) for t in _floats(call.outputs)]
        spans[call.index] = (start, middle, len(flat))
    variables = list(model.trainable_variables)

    def loss_of(probes: list[Any], values: list[Any]) -> Any:
        per_call = {i: (probes[a:b], probes[b:c]) for i, (a, b, c) in spans.items()}
        mapping = list(zip(variables, values, strict=True))
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True):
            with _hooked(_Recorder(keys, per_call)):
                y_pred = model(batch.x, training=True)
            return batch_loss(model, batch, y_pred)

    grads = _backend.gradients_of(loss_of, flat, [v.value for v in variables])
    if grads is None:
        return NonfiniteOrigin(
            None,
            None,
            None,
            (),
            None,
            "The input, every layer's output and the loss are finite; the backward pass "
            f"cannot be replayed on the {BACKEND} backend.",
        )
    by_probe, by_value = grads
    by_variable = {id(v): g for v, g in zip(variables, by_value, strict=True)}
    if all(_scan([g], 0).finite for g in [*by_probe, *by_value]):
        return None
    n = batch.n

    def scan(span: slice) -> _Scan:
        return _scan(by_probe[span], n)

    received = {c.index: scan(slice(*spans[c.index][1:])) for c in calls}
    top = [c for c in calls if c.parent is None]
    for call in top:
        if not received[call.index].finite:  # the loss function's gradient
            return _loss_gradient_origin(model, batch, call, received[call.index])
    found: dict[int, tuple[_Scan, list[Any]]] = {}
    for call in calls:
        if not received[call.index].finite:
            continue
        passed = scan(slice(*spans[call.index][:2]))
        weights = [v for v in _own_weights(call.layer) if id(v) in by_variable]
        bad = [v for v in weights if not _scan([by_variable[id(v)]], 0).finite]
        if not passed.finite or bad:
            found[call.index] = (passed, bad)
    # The innermost: a call with a named call inside it leaves the naming to that one;
    # of the rest, the one that returned last is the first that walking back meets.
    outer = set()
    for index in found:
        parent = calls[index].parent
        while parent is not None:
            outer.add(parent)
            parent = calls[parent].parent
    inner = [calls[i] for i in found if i not in outer]
    if not inner:
        bad_keys = [v.path for v in variables if not _scan([by_variable[id(v)]], 0).finite]
        return NonfiniteOrigin(
            "backward",
            None,
            None,
            (),
            None,
            f"The gradients of {bad_keys} are not finite, but no layer passes back a "
            "NaN or Inf from a finite gradient.",
        )
    call = max(inner, key=lambda c: c.finished)
    passed, bad = found[call.index]
    inputs = _floats((call.args, call.kwargs))
    parts = []
    if not passed.finite:
        parts.append(
            f"the gradient with respect to its input holds {passed.counts()}, in "
            f"{_rows_text(passed.rows)}"
        )
    if bad:
        names = ", ".join(f"`{v.name}`" for v in bad)
        parts.append(f"the gradient with respect to its weights {names} is not finite")
    rows = passed.rows
    detail = (
        f"Forward and loss are finite; in `{call.key}`, {' and '.join(parts)}, while the "
        f"gradient it received is finite; its input there {_input_text(inputs, rows, n)}."
    )
    op = _layer_gradient_op(call, by_probe[spans[call.index][1] : spans[call.index][2]])
    return NonfiniteOrigin("backward", call.key, op, rows, None, detail)


def _layer_gradient_op(call: _Call, cotangent: list[Any]) -> str | None:
    """TensorFlow: the first op of the call's rerun, forward or backward, that makes a
    NaN or Inf, from the gradient it received."""
    weights = _own_weights(call.layer)
    inputs = _floats((call.args, call.kwargs))
    kwargs = _with_training(call.layer, call.kwargs or {})

    def pulled(probes: list[Any], values: list[Any]) -> Any:
        mapping = list(zip(weights, values, strict=True))
        with keras.StatelessScope(state_mapping=mapping):
            args, kw = _add_probes((call.args, kwargs), probes)
            outputs = _floats(call.layer(*args, **kw))
        return sum(
            ops.sum(ops.multiply(o, ops.stop_gradient(ops.cast(g, o.dtype))))
            for o, g in zip(outputs, cotangent, strict=False)
            if g is not None
        )

    with _unhooked():
        return _backend.first_nonfinite_op(
            lambda: _backend.gradients_of(
                pulled, [ops.zeros_like(t) for t in inputs], [v.value for v in weights]
            )
        )


def _loss_gradient_origin(model: Any, batch: Batch, call: _Call, got: _Scan) -> NonfiniteOrigin:
    """The loss is finite, its gradient with respect to the predictions is not."""
    y_pred = call.outputs

    def loss_of(probes: list[Any], values: list[Any]) -> Any:
        with keras.StatelessScope():
            return batch_loss(model, batch, _add_probes(y_pred, probes))

    preds = [ops.zeros_like(t) for t in _floats(y_pred)]
    with _unhooked():
        op = _backend.first_nonfinite_op(lambda: _backend.gradients_of(loss_of, preds, []))
    return NonfiniteOrigin(
        "backward",
        None,
        op,
        got.rows,
        None,
        f"Forward and loss are finite; the loss's gradient with respect to the predictions "
        f"holds {got.counts()}, in {_rows_text(got.rows)} (the predictions there: "
        f"{_values_text(_floats(y_pred), got.rows, batch.n)}).",
    )


# ------------------------------------------------- the public function
def trace_nonfinite(
    model: Any, x: Any, y: Any = None, sample_weight: Any = None
) -> NonfiniteOrigin | None:
    """Replays one batch on the model's current weights and names where its first NaN
    or Inf is born.

    The batch runs eagerly, as the stock `train_step` runs it (`training=True`, the
    model's compiled loss), with every layer's call watched: first `x`, then `y` and
    `sample_weight`, then each layer's output (the innermost layer whose output holds a
    NaN or Inf while its inputs were finite), then the loss (and each row's own loss),
    then the gradients (walking back from the loss, the innermost layer whose gradient
    with respect to its input or its weights is not finite while the gradient it
    received was). Nothing of the model changes: no weight, no moving statistic, no
    random generator's state, no metric.

    Without `y`, a model compiled with a loss is traced up to its outputs. A model
    whose own `train_step` computes its loss is traced up to its outputs too; where
    those are finite, the result's `stage` is `None` and its `detail` says that the
    loss and the backward pass could not be replayed.

    Args:
        model: A built Keras model (compiled with a loss, to trace the loss and the
            gradients).
        x: One batch of inputs, as `model.fit` gets it: an array or tensor, or a
            list or dict of them, whose first axis is the batch.
        y: The batch's targets, or `None`. Defaults to `None`.
        sample_weight: The batch's sample weights, or `None`. Defaults to `None`.

    Returns:
        A `NonfiniteOrigin` (`stage`, `layer`, `op`, `rows`, `samples`, `detail`), or
        `None` where the batch's input, outputs, loss and gradients are all finite.

    Raises:
        TypeError: If `model` is not a Keras model, or the batch is not arrays or
            tensors.
        ValueError: If the model is not built, `y` is given to a model without a
            loss, the parts of the batch differ in their number of rows, or the model
            cannot be called on `x`.

    Example:

    ```python
    model.fit(x, y, batch_size=32, callbacks=[keras.callbacks.TerminateOnNaN()])
    origin = gradwatch.trace_nonfinite(model, x[288:320], y[288:320])
    origin.stage, origin.layer, origin.op, origin.rows
    # ('forward', 'net/log_features', 'Log', (12,))
    print(origin.detail)
    # The output of `net/log_features` holds 0 NaN and 3 Inf, in row 12, from finite
    # inputs; its input there is all zeros.
    ```
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            "`model` must be a Keras model (`keras.Model`, `keras.Sequential` or a "
            f"subclass). Received: model of type {type(model).__name__}"
        )
    if not model.built:
        raise ValueError(
            "`model` is not built, so it has no weights to replay the batch on. Build it "
            "first: call it on a batch, or train it. Received: an unbuilt "
            f"{type(model).__name__} named {model.name!r}"
        )
    has_loss = (
        getattr(model, "_compile_loss", None) is not None
        or own_method(model, "compute_loss")
        or own_method(model, "train_step")
    )
    if y is not None and not has_loss:
        raise ValueError(
            "`y` was given, but the model has no loss to compute with it: compile it "
            "with one (`model.compile(optimizer, loss=...)`), or leave `y` out to trace "
            f"the input and the forward pass only. Received: model.loss={model.loss!r}"
        )
    parts = {
        "x": _batch_part(x, "x", required=True),
        "y": _batch_part(y, "y"),
        "sample_weight": _batch_part(sample_weight, "sample_weight"),
    }
    shapes = {
        name: [tuple(t.shape) for t in keras.tree.flatten(part)]
        for name, part in parts.items()
        if part is not None
    }
    sizes = {s[0] for part in shapes.values() for s in part}
    if len(sizes) != 1:
        raise ValueError(
            "`x`, `y` and `sample_weight` must hold the same number of rows (their first "
            f"axis, the batch). Received shapes: {shapes}"
        )
    batch = Batch(parts["x"], parts["y"], parts["sample_weight"], sizes.pop())
    return replay(model, batch)


def _batch_part(value: Any, name: str, required: bool = False) -> Any:
    """A part of the batch, its NumPy arrays made tensors, checked to be a batch."""
    if value is None:
        if required:
            raise ValueError(f"`{name}` is required: one batch of the model's inputs.")
        return None
    hint = ""
    if hasattr(value, "__iter__") and not hasattr(value, "shape"):
        hint = " (a dataset or generator: pass one batch of it, e.g. `next(iter(data))`)"
    leaves = []
    for leaf in keras.tree.flatten(value):
        if isinstance(leaf, (np.ndarray, np.generic)) or ops.is_tensor(leaf):
            leaf = ops.convert_to_tensor(leaf)
        else:
            raise TypeError(
                f"`{name}` must be one batch: a NumPy array or a tensor, or a list, tuple "
                f"or dict of them, as `model.fit` takes{hint}. Received: {name} of type "
                f"{type(value).__name__}"
                + ("" if leaf is value else f", holding a {type(leaf).__name__}")
            )
        if len(leaf.shape) == 0:
            raise ValueError(
                f"`{name}` must be a batch, its first axis the rows. Received: a scalar in {name}"
            )
        leaves.append(leaf)
    return keras.tree.pack_sequence_as(value, leaves)
