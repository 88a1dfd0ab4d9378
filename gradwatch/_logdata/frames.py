"""The long, tidy pandas frames of a store, built when first asked for and cached in it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from gradwatch._logdata.store import SCALARS, Store
from gradwatch.stats import HIST_SIGNS, histogram_bins

STAT_COLUMNS = ("step", "epoch", "batch", "variable", "stat", "value")
REPLICA_STAT_COLUMNS = ("step", "epoch", "batch", "replica", "variable", "stat", "value")
VALUE_COLUMNS = ("step", "epoch", "batch", "variable", "index", "value")
HISTOGRAM_COLUMNS = ("step", "variable", "lo", "hi", "sign", "count")
SCALAR_COLUMNS = ("step", "epoch", "batch", *SCALARS)


def steps(store: Store) -> np.ndarray:
    """The recorded step numbers, sorted, as an int64 array."""

    def build() -> np.ndarray:
        blocks = (
            *store.stat_blocks,
            *store.hist_blocks,
            *store.value_blocks,
            *store.replica_blocks,
            *store.scalar_blocks,
        )
        parts = [b.steps for b in blocks]
        return np.unique(np.concatenate(parts)) if parts else np.zeros((0,), np.int64)

    return store.cached("steps", build)


def stat_frame(store: Store) -> pd.DataFrame:
    """The stats, one row per step, variable and stat (see `GradientLog.frame`)."""
    return store.cached("frame", lambda: _build_stat_frame(store))


def _build_stat_frame(store: Store) -> pd.DataFrame:
    ns = len(store.stats)
    per_replica = store.per_replica
    names = REPLICA_STAT_COLUMNS if per_replica else STAT_COLUMNS
    cols: dict[str, list[np.ndarray]] = {c: [] for c in names}
    for b in store.stat_blocks:
        k, nv = b.data.shape[0], b.data.shape[1]
        per_step = nv * ns
        cols["step"].append(np.repeat(b.steps, per_step))
        cols["epoch"].append(np.repeat(b.epochs, per_step))
        cols["batch"].append(np.repeat(b.batches, per_step))
        cols["variable"].append(np.tile(np.repeat(b.codes, ns), k))
        cols["stat"].append(np.tile(np.arange(ns, dtype=np.int32), k * nv))
        cols["value"].append(b.data.reshape(-1))
        if per_replica:
            cols["replica"].append(np.full(k * per_step, -1, np.int64))
    if not per_replica:
        return _assemble(store, cols, {"stat": store.stats}, names)
    for b in store.replica_blocks:
        k, nr, nv = b.data.shape[:3]
        per_step = nr * nv * ns
        cols["step"].append(np.repeat(b.steps, per_step))
        cols["epoch"].append(np.repeat(b.epochs, per_step))
        cols["batch"].append(np.repeat(b.batches, per_step))
        cols["replica"].append(np.tile(np.repeat(np.arange(nr), nv * ns), k))
        cols["variable"].append(np.tile(np.repeat(b.codes, ns), k * nr))
        cols["stat"].append(np.tile(np.arange(ns, dtype=np.int32), k * nr * nv))
        cols["value"].append(b.data.reshape(-1))
    frame = _assemble(store, cols, {"stat": store.stats}, names)
    # Global rows (-1) first within each step; a stable sort keeps variable order.
    replica = frame["replica"].to_numpy()
    order = np.lexsort((replica, frame["step"].to_numpy()))
    frame = frame.iloc[order].reset_index(drop=True)
    ids = pd.array(replica[order], dtype="Int64")
    ids[replica[order] < 0] = pd.NA
    frame["replica"] = ids
    return frame


def scalar_table(store: Store) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The scalars as stored, sorted by step: `({"step", "epoch", "batch"}: int64,
    float32 (k, len(SCALARS)))`, NaN where a step had none."""
    blocks = store.scalar_blocks
    ints = {
        name: np.concatenate([getattr(b, attr) for b in blocks])
        if blocks
        else np.zeros((0,), np.int64)
        for name, attr in (("step", "steps"), ("epoch", "epochs"), ("batch", "batches"))
    }
    data = (
        np.concatenate([b.data for b in blocks])
        if blocks
        else np.zeros((0, len(SCALARS)), np.float32)
    )
    order = np.argsort(ints["step"], kind="stable")
    return {name: values[order] for name, values in ints.items()}, data[order]


def scalar_frame(store: Store) -> pd.DataFrame:
    """The loss, learning rate and applied flag, one row per step (see
    `GradientLog.scalars`); `applied` as a nullable boolean (`<NA>`: not known)."""

    def build() -> pd.DataFrame:
        ints, data = scalar_table(store)
        frame: dict[str, Any] = dict(ints)
        frame.update({name: data[:, j] for j, name in enumerate(SCALARS)})
        applied = frame["applied"]
        flags = pd.array(applied != 0, dtype="boolean")
        flags[np.isnan(applied)] = pd.NA
        frame["applied"] = flags
        return pd.DataFrame(frame, columns=list(SCALAR_COLUMNS))

    return store.cached("scalars", build)


def values_frame(store: Store) -> pd.DataFrame:
    """The kept tensors, one row per step and element (see `GradientLog.values_frame`)."""

    def build() -> pd.DataFrame:
        cols: dict[str, list[np.ndarray]] = {c: [] for c in VALUE_COLUMNS}
        variables = store.variables
        for b in store.value_blocks:
            k = b.data.shape[0]
            sizes = [store.size(variables[c]) for c in b.codes]
            per_step = int(sum(sizes))
            cols["step"].append(np.repeat(b.steps, per_step))
            cols["epoch"].append(np.repeat(b.epochs, per_step))
            cols["batch"].append(np.repeat(b.batches, per_step))
            cols["variable"].append(np.tile(np.repeat(b.codes, sizes), k))
            index = np.concatenate([np.arange(s, dtype=np.int64) for s in sizes])
            cols["index"].append(np.tile(index, k))
            cols["value"].append(b.data.reshape(-1))
        return _assemble(store, cols, {}, VALUE_COLUMNS)

    return store.cached("values_frame", build)


def histograms_frame(store: Store) -> pd.DataFrame:
    """The histograms, empty bins left out (see `GradientLog.histograms`)."""

    def build() -> pd.DataFrame:
        lo, hi, sign = bins(store)
        cells = _histogram_cells(store)
        j = cells["bin"]
        cols = {"step": cells["step"], "variable": cells["variable"], "lo": lo[j], "hi": hi[j]}
        cols.update(sign=sign[j], count=cells["count"])
        return histogram_table(store, {name: [values] for name, values in cols.items()})

    return store.cached("histograms", build)


def histogram_rows(store: Store) -> pd.DataFrame:
    """The histograms' non-empty bins as rows of the file format: `step`, `epoch`, `batch`,
    `variable` (Categorical), the bin's number in `index` (Int64) and its count in `value`
    (float32)."""
    cells = _histogram_cells(store)
    return pd.DataFrame(
        {
            "step": cells["step"],
            "epoch": cells["epoch"],
            "batch": cells["batch"],
            "variable": pd.Categorical.from_codes(
                cells["variable"], categories=variables_index(store)
            ),
            "index": pd.array(cells["bin"], dtype="Int64"),
            "value": cells["count"].astype(np.float32),
        }
    )


def _histogram_cells(store: Store) -> dict[str, np.ndarray]:
    """The non-empty bins of every histogram block, in block order: `step`, `epoch`,
    `batch`, `variable` (codes, int32), `bin` and `count` (int64)."""
    parts: dict[str, list[np.ndarray]] = {
        c: [] for c in ("step", "epoch", "batch", "variable", "bin", "count")
    }
    for b in store.hist_blocks:
        i, v, j = np.nonzero(b.data)
        parts["step"].append(b.steps[i])
        parts["epoch"].append(b.epochs[i])
        parts["batch"].append(b.batches[i])
        parts["variable"].append(b.codes[v])
        parts["bin"].append(j.astype(np.int64))
        parts["count"].append(b.data[i, v, j].astype(np.int64))
    dtypes = {"variable": np.int32}
    return {
        name: np.concatenate(arrays).astype(dtypes.get(name, np.int64), copy=False)
        if arrays
        else np.zeros((0,), dtypes.get(name, np.int64))
        for name, arrays in parts.items()
    }


def bins(store: Store) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The histogram bins `(lo, hi, sign code)`; a KeyError when none were recorded."""
    if store.bins_per_decade is None:
        raise KeyError("No histograms were recorded. Record them with GradWatch(histogram=True).")
    lo, hi, sign = histogram_bins(store.bins_per_decade)
    codes = np.asarray([HIST_SIGNS.index(x) for x in sign], np.int8)
    return lo, hi, codes


def histogram_table(store: Store, cols: dict[str, list[np.ndarray]]) -> pd.DataFrame:
    """A histogram frame from column parts; `sign` (and `variable`) as codes."""
    dtypes = {"lo": np.float64, "hi": np.float64, "sign": np.int8, "variable": np.int32}
    data = {
        name: np.concatenate(parts) if parts else np.zeros((0,), dtypes.get(name, np.int64))
        for name, parts in cols.items()
    }
    if "variable" in data:
        data["variable"] = pd.Categorical.from_codes(
            data["variable"], categories=variables_index(store)
        )
    data["sign"] = pd.Categorical.from_codes(data["sign"], categories=list(HIST_SIGNS))
    return pd.DataFrame(data)


def variables_index(store: Store) -> pd.Index:
    """The variables' keys as the categories of a `variable` column."""
    return pd.Index(store.variables, dtype=object)


def _assemble(
    store: Store,
    cols: dict[str, list[np.ndarray]],
    categories: dict[str, Sequence[str]],
    names: Sequence[str],
) -> pd.DataFrame:
    dtypes = {"value": np.float32, "variable": np.int32, "stat": np.int32}
    data: dict[str, Any] = {}
    for name in names:
        parts = cols[name]
        arr = np.concatenate(parts) if parts else np.zeros((0,), dtypes.get(name, np.int64))
        if name == "variable":
            data[name] = pd.Categorical.from_codes(arr, categories=variables_index(store))
        elif name in categories:
            data[name] = pd.Categorical.from_codes(arr, categories=list(categories[name]))
        else:
            data[name] = arr
    return pd.DataFrame(data)


def stat_matrix(store: Store, name: str) -> np.ndarray | None:
    """One stat of the global gradient as a dense `(steps, variables)` float32 matrix.

    Rows follow `steps(store)` restricted to the stat blocks' steps (see
    `stat_steps`), columns `store.variables`; NaN where a variable was not
    recorded. `None` when the stat was not recorded.
    """
    if name not in store.stats:
        return None
    j = store.stats.index(name)
    rows = stat_steps(store)
    out = np.full((len(rows), len(store.variables)), np.nan, np.float32)
    everything = np.arange(len(store.variables))
    for b in store.stat_blocks:
        r = np.searchsorted(rows, b.steps)
        contiguous = len(r) and r[-1] - r[0] == len(r) - 1
        if contiguous and np.array_equal(b.codes, everything):
            out[r[0] : r[-1] + 1] = b.data[:, :, j]  # the common block: a slice, no gather
        else:
            out[r[:, None], b.codes[None, :]] = b.data[:, :, j]
    return out


def stat_steps(store: Store) -> np.ndarray:
    """The steps that the stat blocks hold, sorted and unique."""

    def build() -> np.ndarray:
        parts = [b.steps for b in store.stat_blocks]
        return np.unique(np.concatenate(parts)) if parts else np.zeros((0,), np.int64)

    return store.cached("stat_steps", build)
