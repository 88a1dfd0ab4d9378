"""`GradientLog`: the recorded history, held as dense blocks, queried as tidy pandas frames."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from gradwatch.keys import match_patterns, resolve_key
from gradwatch.stats import STATS

STAT_COLUMNS = ("step", "epoch", "batch", "variable", "stat", "value")
VALUE_COLUMNS = ("step", "epoch", "batch", "variable", "index", "value")


@dataclass
class _StatBlock:
    steps: np.ndarray  # int64 (k,)
    epochs: np.ndarray  # int64 (k,)
    batches: np.ndarray  # int64 (k,)
    codes: np.ndarray  # int32 (n_variables,): positions in GradientLog.variables
    data: np.ndarray  # float32 (k, n_variables, n_stats)


@dataclass
class _ValueBlock:
    steps: np.ndarray
    epochs: np.ndarray
    batches: np.ndarray
    codes: np.ndarray  # int32 (n_kept,)
    # float32 (k, sum of sizes): each step's kept tensors, flattened, in code order
    data: np.ndarray


class GradientLog:
    """The gradient history of a training run: per-step stats and kept tensors.

    While training, a `GradWatch` appends dense numpy blocks; pandas frames are
    built only when asked for. Variables are named by key (`variable.path`, with
    `#1`, `#2`, ... on duplicates), and anywhere a variable is named, an
    unambiguous suffix on `/` boundaries works too (`dense/kernel`).

    Args:
        stats: The stat names recorded, in column order. Defaults to the
            default stats of `GradWatch`.

    Example:

    ```python
    watch = gradwatch.GradWatch(values="dense/kernel")
    model.fit(x, y, callbacks=[watch])
    log = watch.log
    log.stat("norm").tail()           # one column per variable
    log.gradient("dense/kernel", step=0)
    log.to_parquet("grads.parquet")
    ```
    """

    def __init__(self, stats: Sequence[str] = ("norm", "mean", "std", "min", "max", "nonfinite")):
        self._stats = tuple(stats)
        self._variables: list[str] = []
        self._codes: dict[str, int] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._blocks: list[_StatBlock] = []
        self._value_blocks: list[_ValueBlock] = []
        self._cache: dict[str, Any] = {}

    # ----------------------------------------------------------------- writing
    def _add_variables(self, keys: Sequence[str], shapes: Sequence[Sequence[int]]) -> np.ndarray:
        """Registers keys (new ones go last) and returns their codes."""
        for key, shape in zip(keys, shapes, strict=True):
            if key not in self._codes:
                self._codes[key] = len(self._variables)
                self._variables.append(key)
            self._shapes[key] = tuple(int(d) for d in shape)
        return np.asarray([self._codes[k] for k in keys], dtype=np.int32)

    def _append(
        self,
        steps: np.ndarray,
        epochs: np.ndarray,
        batches: np.ndarray,
        stat_codes: np.ndarray,
        stats: np.ndarray,
        value_codes: np.ndarray,
        values: np.ndarray,
    ) -> None:
        """Appends k recorded steps: stats `(k, n_vars, n_stats)`, values `(k, total)`."""
        if len(steps) == 0:
            return
        steps = np.asarray(steps, np.int64)
        epochs = np.asarray(epochs, np.int64)
        batches = np.asarray(batches, np.int64)
        # Blocks keep their variables in code order, so that frames are canonical.
        if len(stat_codes):
            perm = np.argsort(stat_codes, kind="stable")
            self._blocks.append(
                _StatBlock(steps, epochs, batches, stat_codes[perm], stats[:, perm, :])
            )
        if len(value_codes):
            sizes = [self._size(self._variables[c]) for c in value_codes]
            offsets = np.concatenate([[0], np.cumsum(sizes)])
            perm = np.argsort(value_codes, kind="stable")
            cols = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in perm]).astype(
                np.int64
            )
            self._value_blocks.append(
                _ValueBlock(steps, epochs, batches, value_codes[perm], values[:, cols])
            )
        self._cache.clear()

    # ---------------------------------------------------------------- metadata
    @property
    def variables(self) -> list[str]:
        """The keys of the recorded variables, in model order."""
        return list(self._variables)

    @property
    def stat_names(self) -> tuple[str, ...]:
        """The names of the recorded stats, in column order."""
        return self._stats

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each recorded variable, by key."""
        return dict(self._shapes)

    @property
    def steps(self) -> np.ndarray:
        """The recorded step numbers, sorted, as an int64 array."""
        if "steps" not in self._cache:
            parts = [b.steps for b in self._blocks] + [b.steps for b in self._value_blocks]
            self._cache["steps"] = (
                np.unique(np.concatenate(parts)) if parts else np.zeros((0,), np.int64)
            )
        return self._cache["steps"]

    @property
    def value_variables(self) -> list[str]:
        """The keys whose full gradient tensors were kept (`values=`), in model order."""
        codes = set()
        for b in self._value_blocks:
            codes.update(int(c) for c in b.codes)
        return [k for k in self._variables if self._codes[k] in codes]

    def __len__(self) -> int:
        return len(self.steps)

    def __repr__(self) -> str:
        steps = self.steps
        span = f"steps {steps[0]}..{steps[-1]}" if len(steps) else "no steps"
        return (
            f"GradientLog({len(steps)} recorded steps, {span}, "
            f"{len(self._variables)} variables, stats={list(self._stats)})"
        )

    # ------------------------------------------------------------------ frames
    @property
    def frame(self) -> pd.DataFrame:
        """The stats as a long, tidy frame.

        Columns: `step` (int64), `epoch` (int64), `batch` (int64), `variable`
        (Categorical of keys in model order), `stat` (Categorical), `value`
        (float32). One row per step, variable and stat, sorted by step.
        """
        if "frame" not in self._cache:
            self._cache["frame"] = self._build_frame()
        return self._cache["frame"]

    def _build_frame(self) -> pd.DataFrame:
        ns = len(self._stats)
        cols: dict[str, list[np.ndarray]] = {c: [] for c in STAT_COLUMNS}
        for b in self._blocks:
            k, nv = b.data.shape[0], b.data.shape[1]
            per_step = nv * ns
            cols["step"].append(np.repeat(b.steps, per_step))
            cols["epoch"].append(np.repeat(b.epochs, per_step))
            cols["batch"].append(np.repeat(b.batches, per_step))
            cols["variable"].append(np.tile(np.repeat(b.codes, ns), k))
            cols["stat"].append(np.tile(np.arange(ns, dtype=np.int32), k * nv))
            cols["value"].append(b.data.reshape(-1))
        return self._assemble(cols, {"stat": self._stats}, STAT_COLUMNS)

    @property
    def values_frame(self) -> pd.DataFrame:
        """The kept gradient tensors (`values=`) as a long, tidy frame.

        Columns: `step`, `epoch`, `batch`, `variable` (Categorical), `index`
        (int64, the element's flat position in C order), `value` (float32).
        """
        if "values_frame" not in self._cache:
            cols: dict[str, list[np.ndarray]] = {c: [] for c in VALUE_COLUMNS}
            for b in self._value_blocks:
                k = b.data.shape[0]
                sizes = [self._size(self._variables[c]) for c in b.codes]
                per_step = int(sum(sizes))
                cols["step"].append(np.repeat(b.steps, per_step))
                cols["epoch"].append(np.repeat(b.epochs, per_step))
                cols["batch"].append(np.repeat(b.batches, per_step))
                cols["variable"].append(np.tile(np.repeat(b.codes, sizes), k))
                index = np.concatenate([np.arange(s, dtype=np.int64) for s in sizes])
                cols["index"].append(np.tile(index, k))
                cols["value"].append(b.data.reshape(-1))
            self._cache["values_frame"] = self._assemble(cols, {}, VALUE_COLUMNS)
        return self._cache["values_frame"]

    def _size(self, key: str) -> int:
        return int(np.prod(self._shapes[key], dtype=np.int64))

    def _assemble(
        self, cols: dict[str, list[np.ndarray]], categories: dict[str, Sequence[str]], names
    ) -> pd.DataFrame:
        dtypes = {"value": np.float32, "variable": np.int32, "stat": np.int32}
        data: dict[str, Any] = {}
        for name in names:
            parts = cols[name]
            arr = np.concatenate(parts) if parts else np.zeros((0,), dtypes.get(name, np.int64))
            if name == "variable":
                data[name] = pd.Categorical.from_codes(arr, categories=self._variables_index())
            elif name in categories:
                data[name] = pd.Categorical.from_codes(arr, categories=list(categories[name]))
            else:
                data[name] = arr
        return pd.DataFrame(data)

    def _variables_index(self) -> pd.Index:
        return pd.Index(self._variables, dtype=object)

    # ----------------------------------------------------------------- queries
    def key(self, name: str) -> str:
        """The full key that `name` (a key or an unambiguous suffix) refers to.

        Example:

        ```python
        log.key("dense/kernel")  # 'sequential/dense/kernel'
        ```
        """
        return resolve_key(name, self._variables)

    def stat(self, name: str) -> pd.DataFrame:
        """One stat as a wide frame: index `step`, one column per variable in model order.

        Args:
            name: A recorded stat, e.g. `"norm"`.

        Raises:
            KeyError: If the stat was not recorded.

        Example:

        ```python
        log.stat("norm").tail()
        ```
        """
        self._check_stat(name)
        sub = self.frame[self.frame["stat"] == name]
        wide = sub.pivot(index="step", columns="variable", values="value")
        keys = [k for k in self._variables if k in set(sub["variable"].astype(object))]
        wide = wide.reindex(columns=pd.Index(keys, dtype=object, name="variable"))
        return wide

    def _check_stat(self, name: Any) -> None:
        if not isinstance(name, str) or name not in self._stats:
            hint = (
                f" It is a known stat; record it with GradWatch(stats=[..., {name!r}])."
                if name in STATS
                else ""
            )
            raise KeyError(
                f"The stat {name!r} was not recorded.{hint} Recorded: {list(self._stats)}"
            )

    def select(
        self,
        variables: str | re.Pattern | Sequence[str | re.Pattern] | None = None,
        stats: str | Sequence[str] | None = None,
        steps: int | slice | Sequence[int] | None = None,
    ) -> pd.DataFrame:
        """A filtered copy of `frame`.

        Args:
            variables: Glob(s) or `re.Pattern`(s) matched against keys as in
                `GradWatch(variables=...)`. Defaults to `None` (all).
            stats: A stat name or a list of them. Defaults to `None` (all).
            steps: A step, a list of steps, or a `slice(start, stop, every)`
                over step numbers, half-open as in Python. Defaults to `None`
                (all).

        Returns:
            The matching rows of `frame`, with a fresh index.

        Example:

        ```python
        log.select(variables="dense*", stats="norm", steps=slice(0, 100))
        ```
        """
        frame = self.frame
        mask = np.ones(len(frame), dtype=bool)
        if variables is not None:
            keys = match_patterns(variables, self._variables, "variables")
            mask &= frame["variable"].isin(keys).to_numpy()
        if stats is not None:
            names = [stats] if isinstance(stats, str) else stats
            if not isinstance(names, Sequence) or isinstance(names, bytes):
                raise TypeError(
                    f"`stats` must be a stat name or a list of them. Received: stats={stats!r}"
                )
            for name in names:
                self._check_stat(name)
            mask &= frame["stat"].isin(list(names)).to_numpy()
        if steps is not None:
            mask &= _step_mask(frame["step"].to_numpy(), steps)
        return frame[mask].reset_index(drop=True)

    def gradient(self, variable: str, step: int) -> np.ndarray:
        """The full gradient tensor of one variable at one step.

        Needs the variable to have been kept with `GradWatch(values=...)`.

        Args:
            variable: A key or an unambiguous suffix, e.g. `"dense/kernel"`.
            step: A recorded step number.

        Returns:
            A float32 array in the variable's shape.

        Raises:
            KeyError: If the tensor was not kept, or the step was not recorded.

        Example:

        ```python
        log.gradient("dense/kernel", step=0)
        ```
        """
        key = self.key(variable)
        code = self._codes[key]
        kept = False
        for b in self._value_blocks:
            hit = np.nonzero(b.codes == code)[0]
            if not len(hit):
                continue
            kept = True
            rows = np.nonzero(b.steps == step)[0]
            if len(rows):
                sizes = [self._size(self._variables[c]) for c in b.codes]
                start = int(sum(sizes[: hit[0]]))
                flat = b.data[rows[0], start : start + sizes[hit[0]]]
                return flat.reshape(self._shapes[key]).copy()
        if not kept:
            raise KeyError(
                f"The gradient tensor of {key!r} was not kept; only its stats were "
                f"recorded. Keep it with GradWatch(values={key!r}) (or a glob such as "
                f"values='*'). Kept: {self.value_variables}"
            )
        raise KeyError(f"Step {step!r} of {key!r} was not recorded. {self._range_text(code)}")

    def _range_text(self, code: int) -> str:
        steps = np.unique(
            np.concatenate(
                [b.steps for b in self._value_blocks if code in b.codes]
                or [np.zeros((0,), np.int64)]
            )
        )
        if not len(steps):
            return "No steps were recorded."
        every = np.unique(np.diff(steps))
        stride = f", every {every[0]} steps" if len(every) == 1 else ""
        return f"Recorded: {len(steps)} steps from {steps[0]} to {steps[-1]}{stride}."

    # ----------------------------------------------------------------- export
    def to_csv(self, path: Any) -> None:
        """Writes the log to a CSV file that `gradwatch.read_log` reads back.

        Example:

        ```python
        log.to_csv("grads.csv")
        ```
        """
        from gradwatch.io import write_csv

        write_csv(self, path)

    def to_parquet(self, path: Any) -> None:
        """Writes the log to a Parquet file that `gradwatch.read_log` reads back.

        Example:

        ```python
        log.to_parquet("grads.parquet")
        ```
        """
        from gradwatch.io import write_parquet

        write_parquet(self, path)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GradientLog):
            return NotImplemented
        return (
            self._stats == other._stats
            and self._variables == other._variables
            and self._shapes == other._shapes
            and self.frame.equals(other.frame)
            and self.values_frame.equals(other.values_frame)
        )

    __hash__ = None  # type: ignore[assignment]


def _step_mask(step: np.ndarray, steps: Any) -> np.ndarray:
    if isinstance(steps, slice):
        for part in ("start", "stop", "step"):
            value = getattr(steps, part)
            if value is not None and not isinstance(value, (int, np.integer)):
                raise TypeError(f"A `steps` slice takes integers. Received: steps={steps!r}")
        if steps.step is not None and steps.step < 1:
            raise ValueError(f"A `steps` slice's step must be >= 1. Received: steps={steps!r}")
        lo = -np.inf if steps.start is None else steps.start
        hi = np.inf if steps.stop is None else steps.stop
        mask = (step >= lo) & (step < hi)
        if steps.step is not None:
            base = 0 if steps.start is None else steps.start
            mask &= (step - base) % steps.step == 0
        return mask
    if isinstance(steps, (int, np.integer)) and not isinstance(steps, bool):
        return step == steps
    if isinstance(steps, Sequence) and all(
        isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in steps
    ):
        return np.isin(step, np.asarray(list(steps), dtype=np.int64))
    raise TypeError(
        "`steps` must be an int, a list of ints, or a slice such as slice(0, 100). "
        f"Received: steps={steps!r}"
    )
