"""What one training step hands the watches: a record per variable."""

from __future__ import annotations

import dataclasses
from typing import Any


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
