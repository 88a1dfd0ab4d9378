"""The optimizer's state that the optimizer health stats read before the update
(`StateBefore`): its step count, its gradient accumulator and its second-moment slots,
found as Keras keeps them (`keras/src/optimizers/adam.py`, `nadam.py`, `lamb.py`,
`adamax.py`, `rmsprop.py`). `gradwatch._stats.optimizer_health` computes the stats."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import keras


@dataclasses.dataclass(frozen=True)
class StateBefore:
    """What is read of the optimizer before it updates one variable.

    `optimizer` is the one that holds the slots (a `LossScaleOptimizer`'s inner one),
    `variable` the variable it updates, `step` its raw step count (`_iterations`:
    micro-steps with gradient accumulation), `accumulated` the variable's gradient
    accumulator (None without accumulation), `family` the optimizer's second-moment
    family (`family`; None: it keeps none), and `values` the slots that the stats read
    (`slot_names`, second moment first) before the update.
    """

    optimizer: Any
    variable: Any
    step: Any
    accumulated: Any
    family: str | None
    slot_names: tuple[str, ...]
    values: tuple[Any, ...]

    def slots(self) -> list[Any]:
        """The slot variables of `values` (the optimizer is built once it has updated)."""
        index = self.optimizer._get_variable_index(self.variable)
        return [getattr(self.optimizer, name)[index] for name in self.slot_names]


def family(optimizer: Any) -> tuple[str, tuple[str, ...]] | None:
    """The second-moment family of `optimizer` and the names of the slot lists the stats
    read (second moment first), as Keras keeps them; None for one without a second moment.

    Adam and AdamW divide by `sqrt(v) + eps` ("adam"; with `amsgrad`, by the running
    maximum `v_hat`); Nadam and Lamb by `sqrt(v / (1 - beta_2**t)) + eps` ("nadam");
    Adamax by `u + eps`, `u` an infinity norm ("adamax"); RMSprop by `sqrt(v + eps)`
    ("rmsprop"; centered, by `sqrt(v - a**2 + eps)`).
    """
    o = keras.optimizers
    if isinstance(optimizer, o.Adam):  # AdamW too
        if optimizer.amsgrad:
            return "amsgrad", ("_velocities", "_velocity_hats")
        return "adam", ("_velocities",)
    if isinstance(optimizer, (o.Nadam, o.Lamb)):
        return "nadam", ("_velocities",)
    if isinstance(optimizer, o.Adamax):
        return "adamax", ("_u",)
    if isinstance(optimizer, o.RMSprop):
        if optimizer.centered:
            return "centered", ("_velocities", "_average_gradients")
        return "rmsprop", ("_velocities",)
    return None


def innermost(optimizer: Any) -> Any:
    """The optimizer that holds the slots and counts the steps: a `LossScaleOptimizer`'s
    inner one."""
    while isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return optimizer


def read_before(
    optimizer: Any, variable: Any, readable: Callable[[Any], bool], copy: Callable[[Any], Any]
) -> StateBefore | None:
    """The optimizer's state for `variable` before its update, read with `copy` (the
    backend's `weights_before`); None where the optimizer is unknown, does not apply
    `variable`, or the step cannot read its state (`readable`)."""
    opt = innermost(optimizer)
    if opt is None or not hasattr(opt, "_iterations") or not readable(opt._iterations):
        return None
    found = family(opt)
    kind, names = (None, ()) if found is None else found
    accumulates = bool(opt.gradient_accumulation_steps)
    if not opt.built:
        # Its first update builds it (an eager step, a custom step's other optimizer):
        # every slot, the step count and the accumulator start at zero.
        zeros = keras.ops.zeros(variable.shape, "float32")
        step = keras.ops.convert_to_tensor(0, "int32")
        return StateBefore(
            opt, variable, step, zeros if accumulates else None, kind, names, (zeros,) * len(names)
        )
    try:
        index = opt._get_variable_index(variable)
    except (KeyError, AttributeError):  # not a variable it applies
        return None
    accumulated = copy(opt._accumulated_gradients[index]) if accumulates else None
    values = tuple(copy(getattr(opt, name)[index]) for name in names)
    return StateBefore(opt, variable, copy(opt._iterations), accumulated, kind, names, values)
