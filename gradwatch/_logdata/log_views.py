"""What a `GradientLog` derives from its stats and histograms (one stat as a wide frame,
per layer, the global norm, the summary, the doctor's findings, and the histograms) and
from its events (the alerts, the skipped steps and their origins, the examples behind a
step).

Mixins of `GradientLog` (`gradwatch.log`), over the store it holds in `_store`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from gradwatch._logdata.frames import (
    bins,
    histogram_table,
    histograms_frame,
    stat_matrix,
    stat_steps,
)
from gradwatch._logdata.noise import noise_frame
from gradwatch._logdata.store import EXAMPLE_COLUMNS, ORIGIN_COLUMNS, Store
from gradwatch._logdata.views import by_layer, global_norms, summary
from gradwatch._stats.specs import SPECS
from gradwatch.diagnose import Signals, run_rules


class StatViews:
    """The stats as wide frames, and what derives from them (a `GradientLog` mixin)."""

    _store: Store

    # (`GradientLog` defines these.)
    frame: pd.DataFrame
    replicas: list[int]
    examples: pd.DataFrame

    def stat(self, name: str, replica: int | None = None) -> pd.DataFrame:
        """One stat as a wide frame: index `step`, one column per variable in model order.

        Args:
            name: A recorded stat, e.g. `"norm"`.
            replica: `None` for the global gradient, or a replica's number for the
                stats of its local gradient (`GradWatch(per_replica=True)`).
                Defaults to `None`.

        Raises:
            KeyError: If the stat, or the replica, was not recorded.

        Example:

        ```python
        log.stat("norm").tail()
        log.stat("norm", replica=1)  # with GradWatch(per_replica=True)
        ```
        """
        self._check_stat(name)
        frame = self.frame
        mask = (frame["stat"] == name).to_numpy()
        if replica is not None:
            if isinstance(replica, bool) or replica not in self.replicas:
                raise KeyError(
                    f"No stats of replica {replica!r} were recorded. Recorded replicas: "
                    f"{self.replicas} (record them with GradWatch(per_replica=True))."
                )
            mask = mask & (frame["replica"] == replica).fillna(False).to_numpy(bool)
        elif self._store.per_replica:
            mask = mask & frame["replica"].isna().to_numpy()
        sub = frame[mask]
        wide = sub.pivot(index="step", columns="variable", values="value")
        present = set(sub["variable"].astype(object))
        keys = [k for k in self._store.variables if k in present]
        wide = wide.reindex(columns=pd.Index(keys, dtype=object, name="variable"))
        return wide

    def _check_stat(self, name: Any) -> None:
        if not isinstance(name, str) or name not in self._store.stats:
            hint = (
                f" It is a known stat; record it with GradWatch(stats=[..., {name!r}])."
                if name in SPECS
                else ""
            )
            raise KeyError(
                f"The stat {name!r} was not recorded.{hint} Recorded: {list(self._store.stats)}"
            )

    def global_norm(self) -> pd.Series:
        """The global gradient norm per step, over the variables that have a `norm`.

        `sqrt(sum_v norm_v**2)`: the norm that `global_clipnorm` clips, when all
        trainable variables are watched. Disconnected variables (NaN rows) are
        left out, as the optimizer leaves out their `None` gradients, and so is
        a variable whose gradient had no finite element at that step (its
        `norm` is NaN). A step where no variable has a norm gives NaN, not 0.

        Example:

        ```python
        log.global_norm().plot()
        ```
        """
        wide = self.stat("norm")
        return pd.Series(
            global_norms(wide.to_numpy(np.float64)), index=wide.index, name="global_norm"
        )

    def by_layer(self, stat: str) -> pd.DataFrame:
        """One stat aggregated per layer: index `step`, one column per layer.

        A layer is a key without its last `/` part (`net/dense/kernel` belongs
        to `net/dense`; a later update in a step, `net/dense/kernel@1`, to
        `net/dense@1`). The aggregate is exact for the layer's variables taken
        together as one tensor: `norm`, `clipped_norm`, `weight_norm` and `update_norm` combine
        as `sqrt(sum x**2)`; `min`, `max` and `abs_max` as min/max; `nonfinite`
        as a sum; `mean` and `zero_frac` as a mean weighted by element count;
        `std` by pooling with `mean` (which must be recorded too); and
        `update_ratio` as the layer's `update_norm / weight_norm`. `cos_prev`
        does not combine from per-variable values and is refused. (Each stat's
        pooling is its spec's, `gradwatch._stats.specs.SPECS`.)

        Raises:
            KeyError: If `stat` was not recorded, or a stat its pooling reads was
                not (`std` needs `mean`; `update_ratio` needs `update_norm` and
                `weight_norm`).
            ValueError: If `stat` does not combine per layer (`cos_prev`).

        Example:

        ```python
        log.by_layer("norm")
        ```
        """
        self._check_stat(stat)
        spec = SPECS.get(stat)
        if spec is None or spec.pool is None:
            raise ValueError(
                f"`{stat}` cannot be aggregated per layer from per-variable values; "
                f"query it per variable with log.stat({stat!r})."
            )
        missing = [name for name in spec.pool_reads if name not in self._store.stats]
        if missing:
            names = ", ".join(f"`{name}`" for name in missing)
            raise KeyError(f"Pooling `{stat}` per layer needs {names} recorded too.")
        wide = self.stat(stat).astype(np.float64)
        sizes = pd.Series({k: float(self._store.size(k)) for k in wide.columns})
        frames: dict[str, pd.DataFrame] = {}

        def other(name: str) -> pd.DataFrame:  # each once, not once per layer
            if name not in frames:
                frames[name] = self.stat(name).astype(np.float64)
            return frames[name]

        return by_layer(wide, sizes, stat, other)

    def summary(self) -> pd.DataFrame:
        """One row per variable: first, last, median and max norm, non-finite count, and
        the first step with a non-finite gradient element.

        Needs `norm` recorded; `nonfinite` and `first_nonfinite_step` need
        `nonfinite` (they are NaN / missing without it). `nonfinite` is the total
        over the recorded steps.

        Example:

        ```python
        log.summary().sort_values("max_norm")
        ```
        """
        nonfinite = self.stat("nonfinite") if "nonfinite" in self._store.stats else None
        return summary(self.stat("norm"), nonfinite)

    @property
    def noise_scale(self) -> pd.DataFrame:
        """The gradient noise scale B_simple (McCandlish et al. 2018, appendix A.1) at
        each step that has an estimate, as a frame.

        Columns: `step`, `small_batch`, `big_batch` (int64), and float64
        `g_small_sq` and `g_big_sq` (the squared norms of a gradient over
        `small_batch` samples, or the mean of several such, and of one over
        `big_batch`, over the watched variables), `g_sq` (the estimate of
        |G|^2 they give), `s` (of tr(Sigma), the per-example gradient
        noise) and `b_simple` (the moving average of `s` over that of `g_sq`,
        decay 0.995 per estimate). One row per step with an estimate, sorted
        by step; empty without one.

        The estimates come from each replica's gradient against the global one
        under `tf.distribute`, from the micro-batch gradients against their mean
        with `gradient_accumulation_steps` (at the steps that apply), and from
        the batch's two halves against the whole with
        `GradWatch(noise_scale_every=N)`. See `docs/guide.md`.

        Example:

        ```python
        watch = gradwatch.GradWatch()
        model.fit(x, y, batch_size=32, callbacks=[watch])  # under a MirroredStrategy
        watch.log.noise_scale[["step", "big_batch", "b_simple"]].tail()
        ```
        """
        return noise_frame(self._store)

    def diagnose(self, **thresholds: float) -> pd.DataFrame:
        """What looks wrong in this run, where, and what to try: one row per finding.

        Runs the rules of `docs/diagnose.md` (NaN/Inf gradients, loss-scale
        skips, exploding, vanishing and dead gradients, disconnected
        variables, update ratios, clipping, oscillation) over the recorded
        stats, vectorised over the dense blocks. A rule whose stat was not
        recorded gives one `info` row that names the stat to record.

        Args:
            **thresholds: Any of `gradwatch.diagnose.THRESHOLDS` by name, e.g.
                `exploding_norm=1e5`; the others keep their published defaults.

        Returns:
            A frame with the columns `severity` (`"error"`, `"warning"` or
            `"info"`), `finding` (a name from `gradwatch.diagnose.FINDINGS`),
            `variables` (a list of keys, or layer names where a whole layer is
            concerned, in model order), `first_step` and `last_step` (nullable
            Int64), `evidence` and `advice` (text), most severe first.

        Raises:
            TypeError: For an unknown threshold name or a value that is not a number.
            ValueError: For a threshold value out of range.

        Example:

        ```python
        findings = log.diagnose()
        findings[findings["severity"] == "error"]
        log.diagnose(update_ratio_high=0.05)
        ```
        """
        store = self._store
        skipped = set(store.skipped)
        alerts = [(s, k, v) for (s, k, kind), v in store.alerts.items() if kind == "nonfinite"]
        spikes = [
            (s, kind, v)
            for (s, _, kind), v in store.alerts.items()
            if kind in ("spike", "loss_spike")
        ]
        scalars = self.scalars
        not_applied = scalars["step"][scalars["applied"].eq(False).fillna(False)]
        steps = stat_steps(store)
        by_step = scalars.set_index("step")
        signals = Signals(
            steps=steps,
            variables=store.variables,
            shapes=store.shapes,
            stat=lambda name: stat_matrix(store, name),
            skipped=sorted(skipped),
            guarded=sorted(store.guarded),
            origins=[(step, *o) for step, o in store.origins.items()],
            accumulated=sorted(set(not_applied.tolist()) - skipped),
            disconnected=store.disconnected,
            nonfinite_alerts=alerts,
            spike_alerts=spikes,
            noise_scale=self.noise_scale,
            examples=self.examples,
            scalars={
                name: by_step[name].reindex(steps).to_numpy(np.float32)
                for name in ("loss", "learning_rate", "spike")
            },
        )
        return run_rules(signals, **thresholds)


class HistogramViews:
    """The recorded gradient histograms (a `GradientLog` mixin)."""

    _store: Store

    key: Callable[[str], str]  # (`GradientLog` defines it.)

    @property
    def histograms(self) -> pd.DataFrame:
        """The recorded gradient histograms as a long frame, empty bins left out.

        Columns: `step`, `variable` (Categorical), `lo` and `hi` (float64, the
        bin's bounds on |g|: `lo <= |g| < hi`), `sign` (Categorical: `"-"`,
        `"0"`, `"+"`, `"nonfinite"`) and `count` (int64). The bins are those of
        `gradwatch.stats.histogram_bins`; the counts of a variable at a step sum
        to its number of elements.
        """
        return histograms_frame(self._store)

    def histogram(self, variable: str, step: int) -> pd.DataFrame:
        """The full histogram of one variable's gradient at one step, empty bins included.

        Args:
            variable: A key or an unambiguous suffix.
            step: A recorded step number.

        Returns:
            A frame with the columns `lo`, `hi`, `sign` and `count`, one row per bin.

        Raises:
            KeyError: If no histograms were recorded, the variable had none, or
                the step was not recorded.

        Example:

        ```python
        h = log.histogram("dense/kernel", step=0)
        h[h["count"] > 0]
        ```
        """
        store = self._store
        lo, hi, sign = bins(store)
        key = self.key(variable)
        found, seen = find_cell(store.hist_blocks, store.codes[key], step)
        if found is not None:
            b, col, row = found
            counts = b.data[row, col].astype(np.int64)
            return histogram_table(
                store, {"lo": [lo], "hi": [hi], "sign": [sign], "count": [counts]}
            )
        if not seen:
            raise KeyError(
                f"No histogram of {key!r} was recorded: it is not among the variables "
                "selected with `variables=`."
            )
        steps = np.unique(np.concatenate([b.steps for b in store.hist_blocks]))
        raise KeyError(
            f"Step {step!r} of {key!r} was not recorded. Recorded: {len(steps)} steps "
            f"from {steps[0]} to {steps[-1]}."
        )


def find_cell(blocks: Sequence[Any], code: int, step: int) -> tuple[tuple | None, bool]:
    """((block, column of the variable, row of the step) or None, whether any block has it)."""
    seen = False
    for b in blocks:
        cols = np.nonzero(b.codes == code)[0]
        if not len(cols):
            continue
        seen = True
        rows = np.nonzero(b.steps == step)[0]
        if len(rows):
            return (b, int(cols[0]), int(rows[0])), True
    return None, seen


class EventViews:
    """The alerts, the skipped steps and where their NaN/Inf was born (a `GradientLog`
    mixin)."""

    _store: Store

    @property
    def alerts(self) -> pd.DataFrame:
        """Every alert: columns `step`, `variable`, `kind` and `value`, sorted by step.

        `kind` is `"nonfinite"` (value: the number of NaN/Inf elements),
        `"max_norm"` or `"min_norm"` (value: the norm). Recorded steps give every
        alert; steps that `every` skips give the first alert of each kind.
        """
        rows = sorted(self._store.alerts.items(), key=lambda kv: kv[0])
        return pd.DataFrame(
            {
                "step": np.asarray([k[0] for k, _ in rows], np.int64),
                "variable": [k[1] for k, _ in rows],
                "kind": [k[2] for k, _ in rows],
                "value": np.asarray([v for _, v in rows], np.float64),
            }
        )

    def first_nonfinite(self) -> tuple[int, list[str]] | None:
        """The first step with a NaN or Inf gradient element and the variables that had one,
        or `None`.

        Example:

        ```python
        log.first_nonfinite()  # (1234, ['net/dense/kernel'])
        ```
        """
        alerts = self._store.alerts
        steps = [k[0] for k in alerts if k[2] == "nonfinite"]
        if not steps:
            return None
        first = min(steps)
        keys = {k[1] for k in alerts if k[2] == "nonfinite" and k[0] == first}
        return first, [k for k in self._store.variables if k in keys]

    @property
    def skipped_steps(self) -> np.ndarray:
        """The recorded steps whose update was skipped, sorted: by a
        `LossScaleOptimizer`, or by `GradWatch(on_nonfinite="skip")` (or
        `"stop"`, `"raise"`).

        Under mixed precision the optimizer skips a step whose scaled
        gradients overflowed, and lowers its loss scale. The step's gradients
        are recorded as they were (with their NaN/Inf counts in `alerts`), but
        they never reached the weights, so `on_nonfinite` does not act on them.
        A step that `on_nonfinite` kept from the model is recorded the same
        way, and `on_nonfinite` acts on it (its NaN came from the data or the
        model, not from a loss scale).

        Example:

        ```python
        log.skipped_steps  # array([0, 1])
        ```
        """
        return np.asarray(sorted(self._store.skipped), np.int64)

    @property
    def kept_steps(self) -> np.ndarray:
        """Of `skipped_steps`, the steps whose update `GradWatch(on_nonfinite=...)`
        kept from the model (`"skip"`, `"stop"`, `"raise"`); the others a
        `LossScaleOptimizer` skipped. Logs saved before gradwatch recorded this read
        with none (every skipped step counted as the optimizer's).

        Example:

        ```python
        log.skipped_steps, log.kept_steps  # (array([0, 1, 9]), array([9]))
        ```
        """
        return np.asarray(sorted(self._store.guarded), np.int64)

    @property
    def origins(self) -> pd.DataFrame:
        """Where the first NaN or Inf of a step that `on_nonfinite` kept from the model
        was born: one row per traced step (the first such step of a run), found by
        replaying its batch on the weights from before it.

        Columns: `step`; `stage` (`"input"`, `"target"`, `"forward"`, `"loss"`,
        `"backward"`, or `None` where the step could not be replayed: `detail` says
        why); `layer` (the layer's key prefix, as in variable keys, or `None`); `op`
        (on TensorFlow, the op type, or `None`); `rows` (the batch rows, a tuple);
        `samples` (their indices in the training data where `fit` was given arrays
        with `shuffle=False`, a tuple, else `None`); `detail` (one sentence). Empty,
        with these columns, when nothing was traced.

        Example:

        ```python
        log.origins
        #    step    stage           layer   op  rows samples                  detail
        # 0     9  forward  net/log_sum_1  Log  (3,)   (291,)  The output of `net/...
        ```
        """
        items = list(self._store.origins.items())
        columns = list(zip(*[v for _, v in items], strict=True)) or [()] * 6
        frame = {"step": np.asarray([k for k, _ in items], np.int64)}
        for name, column in zip(ORIGIN_COLUMNS[1:], columns, strict=True):
            frame[name] = pd.Series(list(column), dtype=object)
        return pd.DataFrame(frame, columns=list(ORIGIN_COLUMNS))

    @property
    def examples(self) -> pd.DataFrame:
        """The examples behind a step: each example's loss and gradient norm in the
        steps whose batch gradwatch replayed (`GradWatch(examples_every=...)`, a
        spiking step, a step that `on_nonfinite` kept from the model), on the weights
        from before that step's update.

        Columns: `step`; `row` (the example's row in the step's batch); `sample` (its
        index in the training data where `fit` was given arrays with
        `shuffle=False`, else `<NA>`; nullable Int64); `loss` (its own loss, the
        model's training loss on it alone, regularization included); `grad_norm`
        (the L2 norm, over the watched variables, of that loss's gradient: the
        gradient of that example as if the batch held it alone). One row per
        example, by step and then in batch order; empty, with these columns, where
        no step was replayed. `log.diagnose()` names the examples whose `grad_norm`
        is far above their batch's median (finding `examples`).

        Example:

        ```python
        ex = log.examples
        ex[ex["step"] == 120].nlargest(3, "grad_norm")
        #      step  row  sample      loss  grad_norm
        # 7     120    7    7687  912.0312   1804.112
        ```
        """
        items = list(self._store.examples.items())
        if not items:
            return pd.DataFrame(
                {
                    "step": np.zeros(0, np.int64),
                    "row": np.zeros(0, np.int64),
                    "sample": pd.array([], dtype="Int64"),
                    "loss": np.zeros(0, np.float64),
                    "grad_norm": np.zeros(0, np.float64),
                },
                columns=list(EXAMPLE_COLUMNS),
            )
        samples = np.concatenate([ex.samples for _, ex in items])
        return pd.DataFrame(
            {
                "step": np.concatenate([np.full(len(ex.rows), s, np.int64) for s, ex in items]),
                "row": np.concatenate([ex.rows for _, ex in items]),
                "sample": pd.arrays.IntegerArray(samples, samples < 0),
                "loss": np.concatenate([ex.losses for _, ex in items]),
                "grad_norm": np.concatenate([ex.grad_norms for _, ex in items]),
            },
            columns=list(EXAMPLE_COLUMNS),
        )
