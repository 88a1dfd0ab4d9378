"""What one training step hands the watches: a record per variable."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable


@dataclasses.dataclass(frozen=True)
class Record:
    """One variable's gradient in one step, with what was read before the update.

    `grad` is None for a variable the loss does not depend on. `scale` is the loss
    scale the gradient is multiplied by (None: not scaled), `before` the weights
    before the update (None unless a watch needs them), and `optimizer` the one
    that applies the gradient (None: unknown).
    """

    variable: Any
    grad: Any
    scale: Any = None
    before: Any = None
    optimizer: Any = None

    def with_grad(self, grad: Any) -> Record:
        """The same record with another gradient (the global one, under a strategy)."""
        return dataclasses.replace(self, grad=grad)


# id(variable) -> its record, in the order recorded.
Records = dict[int, Record]


@runtime_checkable
class Watcher(Protocol):
    """What the capture (`gradwatch.mixin`) asks of each attached watch; `GradWatch`
    is the one implementation. Package-internal: not part of the public API."""

    every: int  # records the steps that are multiples of it
    checks_every_step: bool  # runs checks at every step, also at unrecorded ones
    needs_weights: bool  # needs the weights before the update (the update stats)

    def wants_step(self, step: int) -> bool:
        """Whether the step needs capture (host-side gating, `steps_per_execution=1`)."""

    def check_step(self, model: Any, step: Any, records: Records, skipped: Any) -> None:
        """Adds the every-step checks to the step being traced or run."""

    def capture_step(
        self, model: Any, step: Any, records: Records, skipped: Any, local: Records | None
    ) -> None:
        """Adds the capture of the step being traced or run: stats into the ring buffer."""

    def state_metrics(self) -> list[Any]:
        """The metrics that carry this watch's device state (JAX: in the step's state)."""

    def release(self, model: Any) -> None:
        """Drains what is left and detaches from `model`; safe to call twice."""
