"""How the read side writes names and numbers in a sentence: the doctor's evidence, the
report's verdict, the end-of-`fit` summary and a log's notebook view."""

from __future__ import annotations

from collections.abc import Sequence


def name_list(names: Sequence[str], most: int) -> str:
    """The first `most` names, comma-separated, then how many are left out.

    Example:

    >>> name_list(["a", "b", "c", "d"], most=2)
    'a, b and 2 more'
    >>> name_list(["a", "b"], most=2)
    'a, b'
    """
    shown = ", ".join(names[:most])
    more = len(names) - most
    return f"{shown} and {more} more" if more > 0 else shown


def short_number(value: float) -> str:
    """A number to three significant digits, as the doctor and the report write them.

    Example:

    >>> short_number(0.000123456), short_number(2.0), short_number(1.5e7)
    ('0.000123', '2', '1.5e+07')
    """
    return f"{value:.3g}"


_STAGE_WORDS = {
    "input": "in the input `x`",
    "target": "in the targets (`y` or the sample weights)",
    "forward": "in the forward pass of layer {layer}",
    "loss": "in the loss",
    "backward": "in the backward pass of layer {layer}",
}


def origin_text(origin: tuple | None) -> str:
    """Where a step's first NaN/Inf was born, from a `log.origins` row's `(stage, layer,
    op, rows, samples, detail)`: "born in the forward pass of layer net/log (op Log),
    rows [3]"; "" without a row.

    >>> origin_text(("forward", "net/log", "Log", (3,), None, "..."))
    'born in the forward pass of layer net/log (op Log), rows [3]'
    >>> origin_text(("input", None, None, (0, 2), (64, 66), "..."))
    'born in the input `x`, rows [0, 2] (samples [64, 66])'
    >>> origin_text((None, None, None, (), None, "Step 4 could not be replayed: ..."))
    'not replayed (Step 4 could not be replayed: ...)'
    """
    if origin is None:
        return ""
    stage, layer, op, rows, samples, detail = origin
    if stage is None:
        return f"not replayed ({detail.rstrip('.')})"
    where = _STAGE_WORDS[stage].format(layer=layer)
    if stage == "backward" and layer is None:
        where = "in the backward pass of the loss"
    text = "born " + where + ("" if op is None else f" (op {op})")
    if rows:
        text += f", rows {list(rows)}"
        if samples is not None:
            text += f" (samples {list(samples)})"
    return text
