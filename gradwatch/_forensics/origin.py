"""Where a batch's first NaN or Inf was born: the replay's answer, without Keras."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: The stages of a step, in the order the replay looks at them.
Stage = Literal["input", "target", "forward", "loss", "backward"]
STAGES: tuple[str, ...] = ("input", "target", "forward", "loss", "backward")


@dataclass(frozen=True)
class NonfiniteOrigin:
    """Where the first NaN or Inf of a training step's batch was born.

    `gradwatch.trace_nonfinite` returns one. Its fields:

    Attributes:
        stage: `"input"` (in `x`), `"target"` (in `y` or the sample weights),
            `"forward"` (a layer's output, its inputs finite), `"loss"` (finite
            predictions, non-finite loss) or `"backward"` (forward and loss finite, a
            gradient non-finite); `None` where the replay could not find it (a model
            whose own `train_step` computes the loss: see `detail`).
        layer: The layer's key prefix, as in variable keys (`net/encoder/attn`), down
            to the innermost layer; `None` for `input`, `target` and `loss`, and for a
            `backward` source in the loss function itself.
        op: On TensorFlow, the type of the first op within the layer (or the loss)
            that made a NaN or Inf (`Log`, `RealDiv`, `SqrtGrad`); `None` where it
            cannot be found, and on JAX and PyTorch.
        rows: The batch rows holding the non-finite values at the source (for
            `loss`, the rows whose own loss is non-finite); empty where the values
            at the source have no batch axis.
        samples: The rows' indices in the training data, where they are known; else
            `None`.
        detail: One sentence: counts of NaN and Inf, and what the source's input
            holds on those rows.

    Example:

    ```python
    origin = gradwatch.trace_nonfinite(model, x_batch, y_batch)
    origin.stage, origin.layer, origin.op, origin.rows
    # ('forward', 'net/log_features', 'Log', (3,))
    ```
    """

    stage: Stage | None
    layer: str | None
    op: str | None
    rows: tuple[int, ...]
    samples: tuple[int, ...] | None
    detail: str
