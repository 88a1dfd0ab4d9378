"""What `gradwatch serve` shows of a log it follows: read incrementally (each part once,
the live tail from where the last read stopped), summarised by layer, and downsampled to
a bounded number of points per series, so that a page stays small at any length of run.
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from gradwatch._logdata import files as _files
from gradwatch._logdata.store import SCALARS, Store
from gradwatch._logdata.tail import read_frames, tail_number
from gradwatch._logdata.views import layer_of_key
from gradwatch._ui.text import name_list, short_number

#: Points per series on the page at most (loss, learning rate, global norm): longer
#: series are cut into this many runs of steps.
MAX_POINTS = 2000
#: Step columns of the per-layer norms and the heatmap at most.
LAYER_POINTS = 500
#: Seconds between two runs of the doctor over the whole log, at least.
DOCTOR_SECONDS = 5.0
#: Seconds a poll reads parts at most (a long log is read over several polls).
READ_SECONDS = 1.0
#: Alerts on the page at most (the newest).
MAX_ALERTS = 200
_PAGE_SCALARS = ("loss", "learning_rate", "global_norm")
#: Spike steps on the page at most (the newest).
MAX_SPIKES = 200


class Columns:
    """Rows of numbers by step that grow at the end (an array that doubles)."""

    def __init__(self, width: int):
        self.n = 0
        self.steps = np.zeros(1024, np.int64)
        self.data = np.full((1024, width), np.nan, np.float32)

    def add(self, steps: np.ndarray, rows: np.ndarray) -> None:
        k = len(steps)
        if self.n + k > len(self.steps):
            size = max(2 * len(self.steps), self.n + k)
            self.steps = np.resize(self.steps, size)
            data = np.full((size, self.data.shape[1]), np.nan, np.float32)
            data[: self.n] = self.data[: self.n]
            self.data = data
        self.steps[self.n : self.n + k] = steps
        self.data[self.n : self.n + k, : rows.shape[1]] = rows
        self.n += k

    def widen(self, width: int) -> None:
        if width > self.data.shape[1]:
            data = np.full((len(self.data), width), np.nan, np.float32)
            data[:, : self.data.shape[1]] = self.data
            self.data = data

    def last(self) -> int | None:
        return int(self.steps[self.n - 1]) if self.n else None


class Summary:
    """The page's series of one stretch of a log: the scalars by step, and each layer's
    gradient norm by step (the square root of the sum of its variables' squared norms)."""

    def __init__(self, layers: list[str] | None = None):
        self.layers: list[str] = list(layers or [])
        self.scalars = Columns(len(SCALARS))
        self.norms = Columns(len(self.layers))

    def add(self, store: Store) -> None:
        for b in store.scalar_blocks:
            self.scalars.add(b.steps, b.data)
        if "norm" not in store.stats:
            return
        j = store.stats.index("norm")
        index = {name: i for i, name in enumerate(self.layers)}
        for b in store.stat_blocks:
            names = [layer_of_key(store.variables[c]) for c in b.codes]
            for name in names:
                if name not in index:
                    index[name] = len(self.layers)
                    self.layers.append(name)
            self.norms.widen(len(self.layers))
            which = np.asarray([index[n] for n in names], np.int64)
            order = np.argsort(which, kind="stable")
            starts = np.flatnonzero(np.r_[True, np.diff(which[order]) != 0])
            squares = np.square(b.data[:, order, j].astype(np.float64))
            sums = np.add.reduceat(squares, starts, axis=1) if len(order) else squares
            rows = np.full((len(b.steps), len(self.layers)), np.nan, np.float32)
            rows[:, which[order][starts]] = np.sqrt(sums)
            self.norms.add(b.steps, rows)


class Follower:
    """A log that `gradwatch serve` follows: a file (read again when it changes) or a
    streamed log's directory, of which each `poll` reads only what is new: the parts
    not read yet, then the live tail from where the last poll stopped.

    Args:
        path: The log: a file, or the directory given to `GradWatch(path=...)`.
    """

    def __init__(self, path: Path):
        self.path = path
        self.version = 0  # grows with each change of what the page shows
        self.error: str | None = None  # the last poll's error, shown on the page
        self._reset()

    def _reset(self) -> None:
        self.store: Store | None = None  # the parts read, superseded rows left out
        self.parts = Summary()
        self.seen: list[Path] = []  # the parts read, in order
        self.stamp: Any = None  # a file log's (size, mtime) when read
        self.runs = 0  # the runs of the streamed log at the last poll
        # The parts (and crashed runs' tails) listed and not read yet, each with its
        # run's first superseded step, and whether it is a tail.
        self.queue: list[tuple[Path, float, bool]] = []
        self._reset_tail(None)

    def _reset_tail(self, file: Path | None) -> None:
        self.tail_file, self.tail_offset = file, 0
        self.tail: Store | None = None
        self.tail_summary = Summary(self.parts.layers)

    # -------------------------------------------------------------- reading
    def poll(self) -> bool:
        """Reads what is new; whether anything changed."""
        try:
            changed = self._poll_file() if not self.path.is_dir() else self._poll_directory()
            self.error = None
        except (OSError, ValueError) as e:
            changed, self.error = self.error != str(e), str(e)
        if changed:
            self.version += 1
        return changed

    def _poll_file(self) -> bool:
        stat = self.path.stat()
        stamp = (stat.st_size, stat.st_mtime_ns)
        if stamp == self.stamp:
            return False
        self._reset()
        self.store = _files.read_store(self.path)
        self.parts.add(self.store)
        self.stamp = stamp
        return True

    def _poll_directory(self) -> bool:
        by_worker = _files.streamed_sources(self.path)
        if not by_worker:
            return False
        worker = min(by_worker)
        runs = by_worker[worker]
        parts = [p for run in runs for p in run if tail_number(p) is None]
        tail = runs[-1][-1] if tail_number(runs[-1][-1]) is not None else None
        newest = runs[-1][0].parent
        listed = [*self.seen, *(p for p, _, _ in self.queue)]
        fresh = parts[len(listed) :]
        grown = parts[: len(listed)] == listed and all(p.parent == newest for p in fresh)
        changed = False
        if not grown or self.runs not in (0, len(runs)) or (not self.runs and len(runs) > 1):
            # A run began, or parts went: read it all again, as `read_log` reads it.
            self._reset()
            sources = _files.visible_sources(self.path, worker)
            live = sources[-1][0] if sources and tail_number(sources[-1][0]) is not None else None
            self.queue = [(p, cut, tail_number(p) is not None) for p, cut in sources if p != live]
            changed = True
        else:
            self.queue.extend((p, math.inf, False) for p in fresh)
        self.runs = len(runs)
        changed = self._poll_tail(tail) or changed
        # The parts not read yet, for `READ_SECONDS` at most: the page shows the log
        # growing while a long one is read, and the live tail meanwhile.
        end = time.monotonic() + READ_SECONDS
        while self.queue and time.monotonic() < end:
            source, cut, crashed = self.queue.pop(0)
            if crashed:  # an earlier run's tail, left by a crash: as a part of its run
                for table in read_frames(source)[0]:
                    self._add_part(_files.frame_store(source, table), cut)
            else:
                self._add_part(_files.part_store(source), cut)
                self.seen.append(source)
            changed = True
        return changed

    def _add_part(self, store: Store, cut: float = math.inf) -> None:
        if cut < math.inf:
            store.split_from(int(cut))  # superseded by a later run
        last = _last(self.parts)
        if last is not None:
            store = store.split_from(last + 1)  # what the tail showed before is in the part
        if self.store is None:
            self.store = Store(store.stats, store.bins_per_decade, store.per_replica)
        self.store.extend(store)
        self.parts.add(store)

    def _poll_tail(self, file: Path | None) -> bool:
        if file != self.tail_file:
            self._reset_tail(file)
            changed = True
        else:
            changed = False
        if file is None:
            return changed
        tables, self.tail_offset = read_frames(file, self.tail_offset)
        for table in tables:
            store = _files.frame_store(file, table)
            last = _last(self.tail_summary)
            last = _last(self.parts) if last is None else last
            if last is not None:
                store = store.split_from(last + 1)
            if self.tail is None:
                self.tail = Store(store.stats, store.bins_per_decade, store.per_replica)
            self.tail.extend(store)
            self.tail_summary.add(store)
            changed = True
        return changed

    # -------------------------------------------------------------- the page
    def log_store(self) -> Store | None:
        """The whole log read so far (the parts and the tail), as a store of its own."""
        if self.store is None:
            return None if self.tail is None else self.tail.snapshot()
        store = self.store.snapshot()
        last = _last(self.parts)
        if self.tail is not None:
            store.extend(self.tail if last is None else self.tail.since(last + 1))
        return store

    def layer_norms(self) -> tuple[list[str], tuple[np.ndarray, np.ndarray]]:
        """The layers, and their norms by step (the parts', then the tail's later steps)."""
        layers = max(self.parts.layers, self.tail_summary.layers, key=len)
        after = _last(self.parts)
        after = -1 if after is None else after
        return layers, _joined(self.parts.norms, self.tail_summary.norms, len(layers), after)

    def series(self) -> dict[str, Any]:
        """The page's series: the scalars (`MAX_POINTS` at most) and the per-layer norms
        (`LAYER_POINTS` at most), the parts' and then the tail's steps."""
        layers = max(self.parts.layers, self.tail_summary.layers, key=len)
        after = _last(self.parts)
        after = -1 if after is None else after
        s_steps, s_data = _joined(
            self.parts.scalars, self.tail_summary.scalars, len(SCALARS), after
        )
        n_steps, n_data = _joined(self.parts.norms, self.tail_summary.norms, len(layers), after)
        columns = [SCALARS.index(name) for name in _PAGE_SCALARS]
        steps, data = _downsample(s_steps, s_data[:, columns], MAX_POINTS, np.fmax)
        scalars = {"step": steps.tolist()}
        for i, name in enumerate(_PAGE_SCALARS):
            scalars[name] = _numbers(data[:, i])
        steps_l, norms = _downsample(n_steps, n_data, LAYER_POINTS, np.fmax)
        last = [int(s_steps[-1])] if len(s_steps) else []
        last = last + ([int(n_steps[-1])] if len(n_steps) else [])
        final = n_data[-1] if len(n_data) else np.zeros(0)
        spike = s_data[:, SCALARS.index("spike")]
        spikes = s_steps[np.nan_to_num(spike) > 0][-MAX_SPIKES:]
        return {
            "last_step": max(last) if last else None,
            "steps_recorded": int(max(len(s_steps), len(n_steps))),
            "parts_to_read": len(self.queue),
            "layers": layers,
            "layer_last": _numbers(final),
            "scalars": scalars,
            "spikes": spikes.tolist(),
            "norms": {"step": steps_l.tolist(), "layers": [_numbers(c) for c in norms.T]},
        }


def _last(summary: Summary) -> int | None:
    """The last step a summary holds, or None."""
    last = [x for x in (summary.scalars.last(), summary.norms.last()) if x is not None]
    return max(last) if last else None


def _joined(a: Columns, b: Columns, width: int, after: int) -> tuple[np.ndarray, np.ndarray]:
    """Two stretches of columns, `width` columns wide: `a`, then `b`'s steps after `after`."""
    later = b.steps[: b.n] > after
    k = int(later.sum())
    out_steps = np.concatenate([a.steps[: a.n], b.steps[: b.n][later]])
    out = np.full((a.n + k, width), np.nan, np.float32)
    out[: a.n, : min(width, a.data.shape[1])] = a.data[: a.n, :width]
    out[a.n :, : min(width, b.data.shape[1])] = b.data[: b.n][later, :width]
    return out_steps, out


def _downsample(steps: np.ndarray, data: np.ndarray, most: int, reduce: Any):
    """At most `most` rows: runs of consecutive steps, each shown at its last step with
    `reduce` of its finite values (NaN where it has none)."""
    if len(steps) <= most:
        return steps, data
    starts = np.unique(np.linspace(0, len(steps), most, endpoint=False).astype(np.int64))
    ends = np.r_[starts[1:], len(steps)] - 1
    finite = np.where(np.isfinite(data), data, np.nan)
    return steps[ends], reduce.reduceat(finite, starts, axis=0)


def _numbers(values: np.ndarray) -> list[float | None]:
    """JSON numbers, None for NaN and Inf (JSON has neither)."""
    out = np.asarray(values, np.float64).astype(object)
    out[~np.isfinite(np.asarray(values, np.float64))] = None
    return out.tolist()


class Doctor:
    """The doctor's findings and the verdict on a followed log: run in a thread of its
    own on a snapshot of the log, so that a request never waits for it; at most every
    `DOCTOR_SECONDS`, and idle at least twice as long as its last run took, so that it
    takes a third of a core at most on a log too long to diagnose in a few seconds."""

    def __init__(self, seconds: float = DOCTOR_SECONDS):
        self.seconds = seconds
        self.result: dict[str, Any] | None = None
        self.started = -math.inf
        self.thread: threading.Thread | None = None
        self.version = -1  # the follower's version it last ran on
        self.took = 0.0  # seconds its last run took

    def maybe_run(self, follower: Follower) -> None:
        busy = self.thread is not None and self.thread.is_alive()
        now = time.monotonic()
        wait = max(self.seconds, 3 * self.took)
        behind = bool(follower.queue)  # the whole log first: findings on part of it mislead
        if busy or behind or follower.version == self.version or now - self.started < wait:
            return
        store = follower.log_store()
        if store is None:
            return
        layers, norms = follower.layer_norms()
        self.started, self.version = now, follower.version
        args = (store, layers, norms)
        self.thread = threading.Thread(target=self._run, args=args, daemon=True)
        self.thread.start()

    def _run(self, store: Store, layers: list[str], norms: tuple[np.ndarray, np.ndarray]) -> None:
        from gradwatch.log import from_store
        from gradwatch.report import verdict

        start = time.monotonic()
        log = from_store(store)
        try:
            findings = log.diagnose()
            if store.scalar_blocks:
                # The verdict from the log's events and steps; its fact on the layers'
                # median norms from the summary (the report's builds the log's frames,
                # gigabytes at 500 variables x 100,000 steps).
                events = store.since(2**62)
                for b in store.scalar_blocks:
                    events.append_scalars(b.steps, b.epochs, b.batches, b.data)
                said = verdict(from_store(events), _leads(findings))
                extremes = _extremes(layers, *norms, log.alerts)
                if extremes:
                    said.facts.append(extremes)
            else:  # a log without scalars (format 1): as the report does
                said = verdict(log, _leads(findings))
        except Exception as e:  # shown on the page; the server goes on
            self.result = {"error": f"The doctor failed: {type(e).__name__}: {e}"}
            return
        steps = log.steps
        self.result = {
            "step": int(steps[-1]) if len(steps) else None,
            "verdict": {"level": said.level, "sentence": said.sentence, "facts": said.facts},
            "findings": [
                {k: _plain(row[k]) for k in findings.columns} for _, row in findings.iterrows()
            ],
            "alerts": _alerts(log),
            "origins": [
                {k: _plain(v) for k, v in row.items()} for _, row in log.origins.iterrows()
            ],
        }
        self.took = time.monotonic() - start


def _extremes(layers: list[str], steps: np.ndarray, norms: np.ndarray, alerts: Any) -> str:
    """Which layer had the largest and which the smallest median gradient norm, over the
    steps without NaN/Inf gradients (the report's fact, from the summary)."""
    bad = alerts.loc[alerts["kind"] == "nonfinite", "step"].to_numpy()
    finite = norms[~np.isin(steps, bad)]
    rows = finite if len(finite) else norms
    if len(layers) < 2 or not len(rows):
        return ""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a layer without a value
        median = np.nanmedian(np.where(np.isfinite(rows), rows, np.nan), axis=0)
    known = np.flatnonzero(np.isfinite(median))
    if len(known) < 2:
        return ""
    top = known[np.argmax(median[known])]
    low = known[np.argmin(median[known])]
    largest = f"Largest median gradient norm: {short_number(median[top])} in layer {layers[top]}"
    if median[low] > 0:
        times = short_number(median[top] / median[low])
        return (
            f"{largest}; smallest: {short_number(median[low])} in {layers[low]} "
            f"({times} times smaller)."
        )
    return f"{largest}; smallest: 0 in {layers[low]}."


def _leads(findings: Any) -> Any:
    """The doctor's errors and warnings as the verdict's findings (as the HTML report
    leads with them): a level and a sentence."""
    import pandas as pd

    rows = findings[findings["severity"].isin(["error", "warning"])]
    sentences = [
        f"{finding} in {name_list(list(variables), 3)}: {evidence}"
        if len(variables)
        else f"{finding}: {evidence}"
        for finding, variables, evidence in zip(
            rows["finding"], rows["variables"], rows["evidence"], strict=True
        )
    ]
    level = rows["severity"].map({"error": "problem", "warning": "warning"})
    return pd.DataFrame({"severity": level, "finding": sentences})


def _alerts(log: Any) -> dict[str, Any]:
    frame = log.alerts
    rows = frame.tail(MAX_ALERTS).iloc[::-1]
    return {
        "count": len(frame),
        "rows": [{k: _plain(v) for k, v in row.items()} for _, row in rows.iterrows()],
    }


def _plain(value: Any) -> Any:
    """A value of a frame as JSON holds it."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, (int, str, bool)):
        return value
    try:
        import pandas as pd

        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return str(value)
