"""Derived views of a log, computed from its per-variable frames: the per-layer
aggregate and the per-variable summary (`GradientLog.by_layer`, `GradientLog.summary`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from gradwatch._stats.specs import SPECS


def layer_of_key(key: str) -> str:
    """The layer of a variable key: the key without its last `/` part (`net/dense/kernel`
    belongs to `net/dense`); a key without `/` is its own layer. A later update of the
    variable in a step (`d/kernel@1`) belongs to that update of the layer (`d@1`)."""
    head, sep, leaf = key.rpartition("/")
    if not sep:
        return key
    update = _update_of(leaf)
    return f"{head}@{update}" if update else head


def leaf_of_key(key: str) -> str:
    """The variable's own name in a key: its last `/` part without the `#n` of a repeated
    path or the `@n` of a later update (`net/d/kernel#1@2` is a `kernel`)."""
    leaf = key.rpartition("/")[2]
    update = _update_of(leaf)
    if update:
        leaf = leaf[: -len(update) - 1]
    return leaf.split("#", 1)[0]


def _update_of(leaf: str) -> str:
    """The `n` of a later update's `@n` at the end of a key's last part, or `""`."""
    _, at, update = leaf.rpartition("@")
    return update if at and update.isdigit() else ""


def by_layer(
    wide: pd.DataFrame,
    sizes: pd.Series,
    stat: str,
    other: Callable[[str], pd.DataFrame] | None = None,
) -> pd.DataFrame:
    """`stat` per layer from its per-variable frame `wide` (float64, one column per
    key), pooled as its spec says (`SPECS[stat].pool`): exact for the layer's
    variables taken together as one tensor. `sizes` are the element counts by key;
    `other(name)` is the per-variable frame of another recorded stat that the pooling
    reads (`pool_reads`: `std` pools with `mean`)."""
    pool = SPECS[stat].pool
    if pool is None:
        raise ValueError(f"`{stat}` has no per-layer pooling.")
    layer_of = {k: layer_of_key(k) for k in wide.columns}
    layers = list(dict.fromkeys(layer_of.values()))
    out = {}
    for layer in layers:
        cols = [k for k in wide.columns if layer_of[k] == layer]

        def layer_part(name: str, cols: list[str] = cols) -> pd.DataFrame:
            if other is None:
                raise KeyError(f"Pooling `{stat}` per layer needs `{name}`.")
            return other(name)[cols]

        out[layer] = pool(wide[cols], sizes[cols], layer_part)
    frame = pd.DataFrame(out)
    frame.columns = pd.Index(layers, dtype=object, name="layer")
    return frame


def summary(norm: pd.DataFrame, nonfinite: pd.DataFrame | None) -> pd.DataFrame:
    """One row per variable of `norm` (the `norm` stat frame): first, last, median and
    max norm, and from `nonfinite` (or missing without it) the total count of
    non-finite elements and the first step with one."""
    out = pd.DataFrame(index=pd.Index(list(norm.columns), dtype=object, name="variable"))
    ordered = norm.sort_index()
    out["first_norm"] = ordered.apply(lambda c: c.dropna().iloc[0] if c.notna().any() else np.nan)
    out["last_norm"] = ordered.apply(lambda c: c.dropna().iloc[-1] if c.notna().any() else np.nan)
    out["median_norm"] = ordered.median()
    out["max_norm"] = ordered.max()
    if nonfinite is not None:
        bad = nonfinite.reindex(columns=norm.columns)
        out["nonfinite"] = bad.sum().astype(np.int64)
        first = [(bad[c] > 0).idxmax() if (bad[c] > 0).any() else pd.NA for c in bad.columns]
        out["first_nonfinite_step"] = pd.array(first, dtype="Int64")
    else:
        out["nonfinite"] = pd.array([pd.NA] * len(out), dtype="Int64")
        out["first_nonfinite_step"] = pd.array([pd.NA] * len(out), dtype="Int64")
    return out


def global_norms(norms: np.ndarray) -> np.ndarray:
    """The global gradient norm of each step: `sqrt(sum_v norm_v**2)` over each row.

    NaN norms are left out: a disconnected variable's, and the norm of a gradient
    with no finite element (a variable's `norm` is over its finite elements). A
    step whose every norm is NaN gives NaN, not 0: no gradient was seen there.
    `GradientLog.global_norm` and the doctor's global norm are this function.

    Args:
        norms: Per-variable gradient norms, shape `(k, n)`.

    Returns:
        A float64 array of shape `(k,)`.

    Example:

    >>> global_norms(np.array([[3.0, 4.0], [np.nan, 2.0], [np.nan, np.nan]])).tolist()
    [5.0, 2.0, nan]
    """
    norms = np.asarray(norms, np.float64)
    with np.errstate(invalid="ignore"):
        squares = np.where(np.isnan(norms), 0.0, norms**2)
    has_norm = (~np.isnan(norms)).any(axis=1)
    return np.where(has_norm, np.sqrt(squares.sum(axis=1)), np.nan)
