"""The gradwatch log file format: a store written as CSV or Parquet, read back into a store.

Also the layout of a streamed log's directory (`GradWatch(path=...)`): one hive
partition of Parquet part files per worker and run.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradwatch._logdata.frames import (
    histogram_rows,
    scalar_table,
    stat_frame,
    values_frame,
    variables_index,
)
from gradwatch._logdata.resume import Anchor, add_anchor, cutoffs
from gradwatch._logdata.store import NOISE_RAW, SCALARS, Store
from gradwatch._logdata.tail import read_frames, tail_files, tail_number
from gradwatch._ui.paths import as_path, writable_file
from gradwatch.stats import histogram_bin_count

FORMAT = "gradwatch-log"
VERSION = 2  # 2: the per-step scalars (loss, learning rate, applied) as rows without a variable
READS = (1, 2)  # the versions this gradwatch reads
_CSV_MARK = "# " + FORMAT + " "
COLUMNS = ("step", "epoch", "batch", "variable", "stat", "index", "value")
REPLICA_COLUMNS = ("step", "epoch", "batch", "replica", "variable", "stat", "index", "value")
_VALUE_STAT = "grad"  # the `stat` of rows that hold kept tensor elements
_HIST_STAT = "hist"  # the `stat` of histogram rows: `index` is the bin, `value` the count
# The `stat` of a step's raw noise-scale estimate rows (`NOISE_RAW`), no variable. They are
# listed among the metadata's `scalars`, which a gradwatch that does not know them skips.
NOISE_STATS = tuple(f"noise_{name}" for name in NOISE_RAW)


def _metadata(store: Store) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "variables": list(store.variables),
        "stats": list(store.stats),
        "shapes": {k: list(v) for k, v in store.shapes.items()},
        "bins_per_decade": store.bins_per_decade,
        "disconnected": list(store.disconnected),
        "alerts": [[step, key, kind, value] for (step, key, kind), value in store.alerts.items()],
        "skipped": sorted(store.skipped),
        "skipped_by_gradwatch": sorted(store.guarded),
        "examples": _example_rows(store),
        "origins": [[step, *origin] for step, origin in store.origins.items()],
        "per_replica": store.per_replica,
        # The noise rows' names only where there are some: a log without stays as before.
        "scalars": [*SCALARS, *(NOISE_STATS if store.noise_blocks else ())],
    }


def _example_rows(store: Store) -> list[list]:
    """`log.examples` as `[step, row, sample (None: unknown), loss, grad_norm]` rows: in
    the metadata, where JSON keeps a sample index's every digit and a float64 exact."""
    return [
        [step, int(row), None if sample < 0 else int(sample), float(loss), float(norm)]
        for step, ex in store.examples.items()
        for row, sample, loss, norm in zip(
            ex.rows, ex.samples, ex.losses, ex.grad_norms, strict=True
        )
    ]


def _table(store: Store) -> pd.DataFrame:
    """One long table: stat rows (index empty), kept elements ('grad'), histogram bins
    ('hist'), and the step's scalars ('loss', 'learning_rate', 'applied': variable
    and index empty).

    A log with per-replica stats has a `replica` column too, after `batch`: empty on
    the global gradient's rows (and on kept elements, bins and scalars), the
    replica's number on its local-gradient stats.
    """
    stats = stat_frame(store)
    values = values_frame(store)
    cats = [*store.stats, _VALUE_STAT, _HIST_STAT, *SCALARS, *NOISE_STATS]
    frames = [
        pd.DataFrame(
            {
                "step": stats["step"],
                "epoch": stats["epoch"],
                "batch": stats["batch"],
                "variable": stats["variable"],
                "stat": pd.Categorical(stats["stat"].astype(object), categories=cats),
                "index": pd.array([pd.NA] * len(stats), dtype="Int64"),
                "value": stats["value"],
            }
        ),
        pd.DataFrame(
            {
                "step": values["step"],
                "epoch": values["epoch"],
                "batch": values["batch"],
                "variable": values["variable"],
                "stat": pd.Categorical([_VALUE_STAT] * len(values), categories=cats),
                "index": values["index"].astype("Int64"),
                "value": values["value"],
            }
        ),
    ]
    if store.bins_per_decade is not None:
        hist = histogram_rows(store)
        frames.append(hist.assign(stat=pd.Categorical([_HIST_STAT] * len(hist), categories=cats)))
    if store.scalar_blocks:
        frames.append(_scalar_rows(store, cats))
    if store.noise_blocks:
        frames.append(_noise_rows(store, cats))
    if not store.per_replica:
        return pd.concat(frames, ignore_index=True)[list(COLUMNS)]
    frames[0]["replica"] = stats["replica"].array
    for frame in frames[1:]:
        frame["replica"] = pd.array([pd.NA] * len(frame), dtype="Int64")
    return pd.concat(frames, ignore_index=True)[list(REPLICA_COLUMNS)]


def _scalar_rows(store: Store, cats: list[str]) -> pd.DataFrame:
    """The scalars as rows, step by step: the name in `stat`, no variable, no index."""
    ints, data = scalar_table(store)
    n, m = len(data), len(SCALARS)
    return pd.DataFrame(
        {
            "step": np.repeat(ints["step"], m),
            "epoch": np.repeat(ints["epoch"], m),
            "batch": np.repeat(ints["batch"], m),
            "variable": pd.Categorical.from_codes(
                np.full(n * m, -1, np.int32), categories=variables_index(store)
            ),
            "stat": pd.Categorical(list(SCALARS) * n, categories=cats),
            "index": pd.array([pd.NA] * (n * m), dtype="Int64"),
            "value": data.reshape(-1),
        }
    )


def _noise_rows(store: Store, cats: list[str]) -> pd.DataFrame:
    """The raw noise-scale estimates as rows, as written (`NOISE_STATS`, no variable)."""
    blocks = store.noise_blocks
    m = len(NOISE_STATS)
    steps = np.concatenate([b.steps for b in blocks])
    n = len(steps)
    return pd.DataFrame(
        {
            "step": np.repeat(steps, m),
            "epoch": np.repeat(np.concatenate([b.epochs for b in blocks]), m),
            "batch": np.repeat(np.concatenate([b.batches for b in blocks]), m),
            "variable": pd.Categorical.from_codes(
                np.full(n * m, -1, np.int32), categories=variables_index(store)
            ),
            "stat": pd.Categorical(list(NOISE_STATS) * n, categories=cats),
            "index": pd.array([pd.NA] * (n * m), dtype="Int64"),
            "value": np.concatenate([b.data for b in blocks]).reshape(-1),
        }
    )


def _check_target(path: Any) -> Path:
    return writable_file(as_path(path), "the gradwatch log")


def _atomic_write(path: Path, write) -> None:
    """Writes through a temporary file in the same directory, so no half file is left.

    The temporary file is made as `open` makes a file (mode 0o666 less the umask), not
    as `tempfile.mkstemp` does (0o600), so that the log has the modes of any file the
    user writes: readable by a TensorBoard server or a colleague where the umask allows.
    """
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as e:
        raise OSError(
            f"Cannot write the gradwatch log to '{path}': {e.strerror or e}. Check that "
            "the directory is writable."
        ) from e
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(f"Cannot write the gradwatch log to '{path}': {e.strerror or e}.") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_csv(store: Store, path: Any) -> None:
    """Writes a store as CSV: a `# gradwatch-log {json}` first line, then the long table."""
    path = _check_target(path)
    table = _table(store)

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            f.write(_CSV_MARK + json.dumps(_metadata(store)) + "\n")
            # %.9g round-trips float32 exactly.
            table.to_csv(f, index=False, float_format="%.9g")

    _atomic_write(path, write)


def write_parquet(store: Store, path: Any, extra: dict[str, Any] | None = None) -> None:
    """Writes a store as Parquet, with the metadata (and `extra` entries, a streamed
    part's `anchors` and `resumed`) under the schema key `gradwatch`."""
    import pyarrow.parquet as pq

    path = _check_target(path)
    table = part_table(store, extra)
    _atomic_write(path, lambda tmp: pq.write_table(table, tmp, **_PARQUET_OPTIONS))


def part_table(store: Store, extra: dict[str, Any] | None = None) -> Any:
    """A store as the pyarrow table of a Parquet file or a tail's frame: the long table,
    and the metadata (with `extra`) under the schema key `gradwatch`."""
    import pyarrow as pa

    table = pa.Table.from_pandas(_table(store), preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[b"gradwatch"] = json.dumps({**_metadata(store), **(extra or {})}).encode()
    return table.replace_schema_metadata(meta)


# Compact on disk: dictionary-encoded names, delta-encoded integer columns (steps
# run in order, so deltas are small), byte-stream-split floats, zstd.
_PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "use_dictionary": ["variable", "stat"],
    "column_encoding": {
        "step": "DELTA_BINARY_PACKED",
        "epoch": "DELTA_BINARY_PACKED",
        "batch": "DELTA_BINARY_PACKED",
        "index": "DELTA_BINARY_PACKED",
        "value": "BYTE_STREAM_SPLIT",
    },
}


PART_PREFIX = "part-"
WORKER_KEY = "worker"  # hive partition keys of a streamed log: worker=<k>/run=<id>/
RUN_KEY = "run"


def new_run_id() -> str:
    """A unique run id that sorts in time order: UTC time to the microsecond, then
    six random hex digits (two runs started in the same microsecond stay apart)."""
    now = datetime.datetime.now(datetime.UTC)
    return now.strftime("%Y%m%dT%H%M%S%fZ") + "-" + secrets.token_hex(3)


def run_directory(path: Path, worker: int, run: str) -> Path:
    """The hive partition that one worker's run streams its parts into."""
    return path / f"{WORKER_KEY}={worker}" / f"{RUN_KEY}={run}"


def part_files(directory: Path) -> list[Path]:
    """The part files directly in one directory, in writing order."""
    return sorted(directory.glob(f"{PART_PREFIX}*.parquet"))


def dataset_parts(path: Path) -> dict[int, list[Path]]:
    """The part files of a streamed log, by worker, each worker's in writing order.

    Runs sort by their id, which starts with the time. The parts of an older,
    flat log directory (`part-*.parquet` directly in `path`) count as worker
    0's first run.
    """
    out: dict[int, list[Path]] = {}
    flat = part_files(path)
    if flat:
        out[0] = flat
    for directory in sorted(path.glob(f"{WORKER_KEY}=*")):
        try:
            worker = int(directory.name.split("=", 1)[1])
        except ValueError:
            continue
        runs = sorted(r for r in directory.glob(f"{RUN_KEY}=*") if r.is_dir())
        parts = [p for r in runs for p in part_files(r)]
        if parts:
            out.setdefault(worker, []).extend(parts)
    return dict(sorted(out.items()))


def append_part(store: Store, directory: Path, extra: dict[str, Any] | None = None) -> Path:
    """Writes the steps held in a store as the next part file in `directory`.

    Each part is a complete Parquet file with the log's metadata, written
    through a temporary file and renamed, so a crash never leaves half a part.
    A streamed run's part also has in its metadata (`extra`):

    - `anchors`: `[step, iteration]` pairs read since the run's previous part (the
      model's next step and its optimizer's `iterations`, at one moment);
    - `resumed`: `[step, iteration]` where the run went on from a model restored to
      an earlier iteration than the log's history had reached; the rows of the runs
      before it from `step` on are superseded.
    """
    parts = part_files(directory)
    number = int(parts[-1].stem[len(PART_PREFIX) :]) + 1 if parts else 0
    target = directory / f"{PART_PREFIX}{number:06d}.parquet"
    write_parquet(store, target, extra)
    return target


def streamed_metadata(path: Path, worker: int = 0) -> dict | None:
    """The metadata of the newest part of a worker's streamed log (of any worker if
    that one has none yet), or None if there are no parts."""
    by_worker = dataset_parts(path)
    parts = by_worker.get(worker) or next(iter(by_worker.values()), None)
    return _read_parquet(parts[-1], table=False)[0] if parts else None


def streamed_last_step(path: Path, worker: int = 0) -> int | None:
    """The last step of a worker's streamed log, over all of its runs (the steps that a
    resumed run superseded left out), or None if it has no rows."""
    return streamed_history(path, worker).last_step


@dataclass
class StreamedHistory:
    """What a run appended to a streamed log goes on from: the log's history, without
    the steps that a resumed run superseded."""

    last_step: int | None = None
    anchors: list[Anchor] = field(default_factory=list)  # (step, iteration), in step order
    skipped: set[int] = field(default_factory=set)  # steps a loss-scale optimizer skipped


def streamed_history(path: Path, worker: int = 0) -> StreamedHistory:
    """The history of a worker's streamed log: its last step, anchors and skipped steps.
    Read from the parts' metadata and column statistics where they have them."""
    history = StreamedHistory()
    runs, read = _read_runs(streamed_sources(path).get(worker, []))
    metas = [[m for m, _ in run] for run in read]
    for run, run_metas, cut in zip(runs, metas, _run_cutoffs(metas), strict=True):
        for part, meta in zip(run, run_metas, strict=True):
            for step, iteration in meta.get("anchors", []):
                if step < cut:
                    add_anchor(history.anchors, (step, iteration))
            history.skipped.update(s for s in meta.get("skipped", []) if s < cut)
            last = _last_step(part, cut)
            if last is not None and (history.last_step is None or last > history.last_step):
                history.last_step = last
    return history


def streamed_sources(path: Path) -> dict[int, list[list[Path]]]:
    """What a streamed log's directory holds, by worker: each run's files in writing
    order (its parts, then its live tail where that holds steps no part has yet: the
    steps since the last part of a run still going, or of one that crashed), the runs
    in time order."""
    by_worker = {w: _runs(parts) for w, parts in dataset_parts(path).items()}
    for directory in sorted(path.glob(f"{WORKER_KEY}=*/{RUN_KEY}=*")):
        tails = tail_files(directory)
        if not tails:
            continue
        try:
            worker = int(directory.parent.name.split("=", 1)[1])
        except ValueError:
            continue
        runs = by_worker.setdefault(worker, [])
        run = next((r for r in runs if r[0].parent == directory), None)
        if run is None:
            run = []
            runs.append(run)
        # A tail whose number is below the run's part count is stale: its steps are
        # in the part written before the writer could delete it.
        live = [t for t in tails if tail_number(t) == len(run)]
        run.extend(live[-1:])
    return {
        w: sorted((r for r in runs if r), key=lambda r: r[0].parent.name)
        for w, runs in sorted(by_worker.items())
        if any(runs)
    }


def visible_sources(path: Path, worker: int) -> list[tuple[Path, float]]:
    """A worker's parts and live tails in writing order, each with its run's first
    superseded step (`math.inf`: none): read one by one, each without its rows from
    that step on, they hold what `read_log` reads (for a reader that cannot hold the
    whole long table at once). Reads the parts' metadata only."""
    out: list[tuple[Path, float]] = []
    runs = streamed_sources(path).get(worker, [])
    metas = [
        [_read_parquet(p, table=False)[0] for p in run if tail_number(p) is None] for run in runs
    ]
    for run, cut in zip(runs, _run_cutoffs(metas), strict=True):
        out.extend((p, cut) for p in run)
    return out


def read_tail(path: Path) -> tuple[dict, pd.DataFrame] | None:
    """A live tail's steps as one part: the newest frame's metadata (which holds the
    others') and every frame's rows; None where it has no whole frame."""
    tables, _ = read_frames(path)
    if not tables:
        return None
    return frames_table(path, tables)


def frames_table(path: Path, tables: Sequence[Any]) -> tuple[dict, pd.DataFrame]:
    """The metadata and rows of a tail's frames (pyarrow tables, in writing order)."""
    meta = _frame_meta(path, tables[-1])
    frames = [t.to_pandas().astype({"variable": object, "stat": object}) for t in tables]
    return meta, pd.concat(frames, ignore_index=True)


def frame_store(path: Path, table: Any) -> Store:
    """One tail frame (or a part's pyarrow table) as a store."""
    return _from_table(path, _frame_meta(path, table), table.to_pandas())


def part_store(path: Path) -> Store:
    """One part file as a store."""
    return _from_table(path, *_read_parquet(path))


def _frame_meta(path: Path, table: Any) -> dict:
    raw = (table.schema.metadata or {}).get(b"gradwatch")
    if raw is None:
        raise ValueError(f"'{path}' has a frame without the 'gradwatch' metadata.")
    return _parse_meta(path, raw.decode())


def _read_runs(
    runs: Sequence[Sequence[Path]],
) -> tuple[list[list[Path]], list[list[tuple[dict, pd.DataFrame]]]]:
    """The runs' files with their metadata and rows, without a live tail that holds no
    whole frame yet (made, its first frame being written)."""
    kept: list[list[Path]] = []
    read: list[list[tuple[dict, pd.DataFrame]]] = []
    for run in runs:
        files, tables = [], []
        for path in run:
            one = _read_parquet(path) if tail_number(path) is None else read_tail(path)
            if one is not None:
                files.append(path)
                tables.append(one)
        if files:
            kept.append(files)
            read.append(tables)
    return kept, read


def _runs(parts: Sequence[Path]) -> list[list[Path]]:
    """A worker's parts (in writing order) grouped by run (the directory they are in)."""
    runs: list[list[Path]] = []
    for part in parts:
        if runs and runs[-1][0].parent == part.parent:
            runs[-1].append(part)
        else:
            runs.append([part])
    return runs


def _run_cutoffs(metas: Sequence[Sequence[dict]]) -> list[float]:
    """Each run's first superseded step (`math.inf`: none), from the runs' metadata."""
    resumed = [next((m["resumed"][0] for m in ms if m.get("resumed")), None) for ms in metas]
    return cutoffs(resumed)


def _last_step(part: Path, cut: float) -> int | None:
    """The last step of a part (or a live tail) before `cut`, or None if it has none."""
    import pyarrow.parquet as pq

    if tail_number(part) is not None:
        read = read_tail(part)
        steps = np.zeros(0, np.int64) if read is None else read[1]["step"].to_numpy()
        steps = steps[steps < cut]
        return int(steps.max()) if len(steps) else None
    try:
        meta = pq.ParquetFile(part).metadata
        column = meta.schema.names.index("step")
        stats = [meta.row_group(i).column(column).statistics for i in range(meta.num_row_groups)]
        if all(s is not None and s.has_min_max for s in stats) and all(s.max < cut for s in stats):
            highs = [int(s.max) for s in stats]
        else:
            highs = pq.read_table(part, columns=["step"]).column("step").to_pylist()
    except Exception as e:  # pyarrow raises its own error types for bad files
        raise ValueError(f"'{part}' is not a readable Parquet file: {e}") from e
    highs = [h for h in highs if h < cut]
    return max(highs) if highs else None


def read_store(path: Any, worker: int | None = None) -> Store:
    """Reads a log file, or a streamed log's directory, into a store (see `read_log`)."""
    path = as_path(path)
    if not path.exists():
        raise FileNotFoundError(f"No gradwatch log at '{path}': the file does not exist.")
    if path.is_dir():
        return _read_streamed(path, worker)
    if worker is not None:
        raise ValueError(
            f"`worker` picks a partition of a streamed log directory, but '{path}' is a "
            f"file. Received: worker={worker!r}. Leave `worker` out for a file."
        )
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PAR1":
        meta, table = _read_parquet(path)
    else:
        meta, table = _read_csv(path)
    return _from_table(path, meta, table)


def _read_streamed(directory: Path, worker: int | None = None) -> Store:
    if worker is not None and (
        isinstance(worker, bool) or not isinstance(worker, (int, np.integer)) or worker < 0
    ):
        raise TypeError(f"`worker` must be an integer >= 0, or None. Received: worker={worker!r}")
    by_worker = streamed_sources(directory)
    if not by_worker:
        raise ValueError(
            f"'{directory}' is a directory with no gradwatch part files ({PART_PREFIX}*.parquet, "
            f"directly or under {WORKER_KEY}=<k>/{RUN_KEY}=<id>/). Pass a log file, or the "
            "directory given to GradWatch(path=...)."
        )
    if worker is None:
        worker = min(by_worker)
    if worker not in by_worker:
        raise ValueError(
            f"'{directory}' holds no log of worker {worker}. Received: worker={worker}. "
            f"Workers with a log there: {list(by_worker)}."
        )
    runs, read = _read_runs(by_worker[worker])
    if not runs:
        raise ValueError(f"'{directory}' holds no whole part or frame of worker {worker} yet.")
    metas = [[m for m, _ in run] for run in read]
    visible: list[tuple[Path, dict, pd.DataFrame]] = []
    superseded = []
    for run, run_read, cut in zip(runs, read, _run_cutoffs(metas), strict=True):
        kept = [
            (p, *_rows_before(m, t, cut, True)) for p, (m, t) in zip(run, run_read, strict=True)
        ]
        visible.extend(kept)
        if cut < math.inf:
            later = [
                (p, *_rows_before(m, t, cut, False))
                for p, (m, t) in zip(run, run_read, strict=True)
            ]
            if any(len(t) for _, _, t in later):
                superseded.append(later)
    store = _joined(directory, visible)
    for later in superseded:
        store.add_superseded(_joined(directory, later))
    return store


def _rows_before(meta: dict, table: Any, cut: float, before: bool) -> tuple[dict, Any]:
    """A part's rows (and alerts and skipped steps) of the steps before `cut`, or from
    `cut` on (`before=False`)."""
    if cut == math.inf:
        return (meta, table) if before else (meta, table.iloc[:0])
    keep = (lambda s: s < cut) if before else (lambda s: s >= cut)
    meta = {
        **meta,
        "alerts": [a for a in meta.get("alerts", []) if keep(a[0])],
        "skipped": [s for s in meta.get("skipped", []) if keep(s)],
        "skipped_by_gradwatch": [s for s in meta.get("skipped_by_gradwatch", []) if keep(s)],
        "origins": [o for o in meta.get("origins", []) if keep(o[0])],
        "examples": [e for e in meta.get("examples", []) if keep(e[0])],
    }
    return meta, table[keep(table["step"].to_numpy())]


def _joined(directory: Path, parts: Sequence[tuple[Path, dict, Any]]) -> Store:
    """One store from parts of a streamed log: `(path, metadata, table)` in writing order."""
    metas = [m for _, m, _ in parts]
    tables = [t for _, _, t in parts]
    meta = dict(metas[-1])
    # Within a run variables only grow, but runs appended to one log may name other
    # variables (a model changed between them): each part names its own.
    # The newest part's order is the model's (a run's trainable set may have grown).
    meta["variables"] = list(
        dict.fromkeys([*metas[-1]["variables"], *(k for m in metas for k in m["variables"])])
    )
    for p, m, _ in parts:
        if m["stats"] != meta["stats"] or m.get("bins_per_decade") != meta.get("bins_per_decade"):
            raise ValueError(
                f"The part '{p}' records other stats than the newest part of '{directory}': "
                f"{m['stats']} against {meta['stats']}. A streamed log holds one set of stats."
            )
        meta["shapes"] = {**m["shapes"], **meta["shapes"]}
    # A resumed log's newest part knows only its own run's alerts: merge them all.
    meta["alerts"] = [a for m in metas for a in m.get("alerts", [])]
    meta["skipped"] = sorted({s for m in metas for s in m.get("skipped", [])})
    meta["skipped_by_gradwatch"] = sorted(
        {s for m in metas for s in m.get("skipped_by_gradwatch", [])}
    )
    meta["origins"] = [o for m in metas for o in m.get("origins", [])]
    meta["examples"] = _joined_examples(metas)
    meta["disconnected"] = list(dict.fromkeys(k for m in metas for k in m.get("disconnected", [])))
    meta["scalars"] = list(dict.fromkeys(k for m in metas for k in m.get("scalars", [])))
    table = pd.concat(
        [t.astype({"variable": object, "stat": object}) for t in tables], ignore_index=True
    )
    return _from_table(directory, meta, table)


def _joined_examples(metas: Sequence[dict]) -> list[list]:
    """The parts' example rows, each step's from the last part that has it."""
    by_step: dict[int, list] = {}
    for meta in metas:
        part: dict[int, list] = {}
        for row in meta.get("examples", []):
            part.setdefault(row[0], []).append(row)
        by_step.update(part)
    return [row for rows in by_step.values() for row in rows]


def _read_parquet(path: Path, table: bool = True) -> tuple[dict, pd.DataFrame | None]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as e:  # pyarrow raises its own error types for bad files
        raise ValueError(f"'{path}' is not a readable Parquet file: {e}") from e
    raw = (schema.metadata or {}).get(b"gradwatch")
    if raw is None:
        raise ValueError(
            f"'{path}' is a Parquet file but not a gradwatch log: its schema has no "
            "'gradwatch' metadata. Write logs with `GradientLog.to_parquet`."
        )
    meta = _parse_meta(path, raw.decode())
    return meta, pq.read_table(path).to_pandas() if table else None


def _read_csv(path: Path) -> tuple[dict, pd.DataFrame]:
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
            if not first.startswith(_CSV_MARK):
                raise ValueError(
                    f"'{path}' is not a gradwatch log: its first line should start with "
                    f"'{_CSV_MARK.strip()}' followed by the log's metadata. Write logs "
                    "with `GradientLog.to_csv` or `GradientLog.to_parquet`."
                )
            meta = _parse_meta(path, first[len(_CSV_MARK) :])
            table = pd.read_csv(
                f,
                dtype={
                    "variable": object,
                    "stat": object,
                    "index": "Int64",
                    "replica": "Int64",
                    "value": np.float32,
                },
                keep_default_na=False,
                na_values={"value": ["", "nan", "NaN"], "index": [""], "replica": [""]},
            )
    except UnicodeDecodeError as e:
        raise ValueError(f"'{path}' is not a gradwatch log: it is not a text file.") from e
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise ValueError(f"'{path}' is not a gradwatch log: its table cannot be parsed: {e}") from e
    return meta, table


def _parse_meta(path: Path, text: str) -> dict:
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"'{path}' is not a gradwatch log: its metadata is not JSON ({e}).") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"'{path}' is not a gradwatch log: its metadata has no format '{FORMAT}'.")
    if meta.get("version") not in READS:
        raise ValueError(
            f"'{path}' is a gradwatch log of version {meta.get('version')!r}; this gradwatch "
            f"reads versions {', '.join(map(str, READS))}. Upgrade gradwatch to read it."
        )
    missing = [k for k in ("variables", "stats", "shapes") if k not in meta]
    if missing:
        raise ValueError(f"'{path}' is not a complete gradwatch log: its metadata lacks {missing}.")
    return meta


def _store_from_meta(path: Path, meta: dict, table: pd.DataFrame) -> Store:
    """An empty store with the variables, stats and events (alerts, skipped steps,
    origins) that the metadata of the log at `path` lists."""
    variables, stats = list(meta["variables"]), list(meta["stats"])
    bins = meta.get("bins_per_decade")
    per_replica = bool(meta.get("per_replica", False))
    if per_replica and "replica" not in table.columns:
        raise ValueError(
            f"'{path}' is not a complete gradwatch log: its metadata says it has "
            "per-replica stats, but it lacks the column 'replica'."
        )
    store = Store(stats, bins_per_decade=bins, per_replica=per_replica)
    store.add_variables(variables, [meta["shapes"].get(k, ()) for k in variables])
    store.add_disconnected([k for k in meta.get("disconnected", []) if k in variables])
    try:
        store.add_alerts([tuple(a) for a in meta.get("alerts", [])])
    except (TypeError, ValueError) as e:
        raise ValueError(f"'{path}' has malformed alerts in its metadata: {e}") from e
    try:
        store.add_skipped(meta.get("skipped", []))
    except (TypeError, ValueError) as e:
        raise ValueError(f"'{path}' has malformed skipped steps in its metadata: {e}") from e
    try:
        # Older files do not say who skipped a step: a loss-scale optimizer, as then.
        store.add_guarded(meta.get("skipped_by_gradwatch", []))
        for step, stage, layer, op, rows, samples, detail in meta.get("origins", []):
            store.add_origin(step, stage, layer, op, rows, samples, detail)
    except (TypeError, ValueError) as e:
        raise ValueError(f"'{path}' has malformed origins in its metadata: {e}") from e
    try:
        _examples_from_rows(store, meta.get("examples", []))
    except (TypeError, ValueError) as e:
        raise ValueError(f"'{path}' has malformed examples in its metadata: {e}") from e
    return store


def _examples_from_rows(store: Store, rows: Sequence[Sequence]) -> None:
    """Adds the metadata's example rows to the store, step by step."""
    by_step: dict[int, list[Sequence]] = {}
    for row in rows:
        if len(row) != 5:
            raise ValueError(f"an example row has {len(row)} fields, not 5: {row!r}")
        by_step.setdefault(int(row[0]), []).append(row)
    for step, group in by_step.items():
        _, r, sample, loss, norm = zip(*group, strict=True)
        store.add_examples(step, r, sample, loss, norm)


def _from_table(path: Path, meta: dict, table: pd.DataFrame) -> Store:
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(
            f"'{path}' is not a complete gradwatch log: it lacks the columns {missing}. "
            f"Expected: {list(COLUMNS)}"
        )
    store = _store_from_meta(path, meta, table)
    variables, stats = store.variables, store.stats
    bins, per_replica = store.bins_per_decade, store.per_replica
    names = [n for n in meta.get("scalars", []) if n not in stats]
    if names:
        is_scalar = table["stat"].astype(object).isin(names).to_numpy()
        scalar_rows = table[is_scalar]
        is_noise = scalar_rows["stat"].astype(object).isin(NOISE_STATS).to_numpy()
        _scalar_blocks_from_rows(path, store, scalar_rows[~is_noise])
        _noise_blocks_from_rows(path, store, scalar_rows[is_noise])
        table = table[~is_scalar]
    codes = {k: i for i, k in enumerate(variables)}
    stat_codes = {s: i for i, s in enumerate(stats)}
    var = table["variable"].astype(object).to_numpy()
    stat = table["stat"].astype(object).to_numpy()
    unknown = sorted(set(var) - set(codes), key=str)
    if unknown:
        raise ValueError(f"'{path}' names variables that its metadata lacks: {unknown[:5]}.")
    unknown = sorted(set(stat) - set(stat_codes) - {_VALUE_STAT, _HIST_STAT}, key=str)
    if unknown:
        raise ValueError(f"'{path}' names stats that its metadata lacks: {unknown[:5]}.")
    step, epoch, batch, value = _columns(
        table, f"'{path}' has a step, epoch, batch or value that is not a number."
    )
    var_code = np.asarray([codes[v] for v in var], np.int32)
    is_value = stat == _VALUE_STAT
    is_hist = stat == _HIST_STAT
    s = ~(is_value | is_hist)
    if per_replica:
        replica = table["replica"].to_numpy(dtype=np.int64, na_value=-1)
        local = s & (replica >= 0)
        s = s & (replica < 0)
        _replica_blocks_from_rows(
            path,
            store,
            step[local],
            epoch[local],
            batch[local],
            replica[local],
            var_code[local],
            np.asarray([stat_codes[x] for x in stat[local]], np.int32),
            value[local],
        )
    _blocks_from_rows(
        store,
        step[s],
        epoch[s],
        batch[s],
        var_code[s],
        np.asarray([stat_codes[x] for x in stat[s]], np.int32),
        value[s],
        kind="stats",
    )
    if is_hist.any():
        if bins is None:
            raise ValueError(
                f"'{path}' has histogram rows but no `bins_per_decade` in its metadata."
            )
        _hist_blocks_from_rows(
            store,
            step[is_hist],
            epoch[is_hist],
            batch[is_hist],
            var_code[is_hist],
            table["index"][is_hist].to_numpy(dtype=np.int64, na_value=-1),
            value[is_hist],
        )
    index = table["index"][is_value].to_numpy(dtype=np.int64, na_value=-1)
    _blocks_from_rows(
        store,
        step[is_value],
        epoch[is_value],
        batch[is_value],
        var_code[is_value],
        index,
        value[is_value],
        kind="values",
    )
    return store


def _scalar_blocks_from_rows(path: Path, store: Store, rows: pd.DataFrame) -> None:
    """Rebuilds the scalars, one row per step (NaN where a step has no row for one);
    names this gradwatch does not know are left out."""
    if not len(rows):
        return
    step, epoch, batch, value = _columns(
        rows, f"'{path}' has a scalar row whose step or value is not a number."
    )
    name = rows["stat"].astype(object).to_numpy()
    steps, first = np.unique(step, return_index=True)
    data = np.full((len(steps), len(SCALARS)), np.nan, np.float32)
    for j, scalar in enumerate(SCALARS):
        mine = name == scalar
        data[np.searchsorted(steps, step[mine]), j] = value[mine]
    store.append_scalars(steps, epoch[first], batch[first], data)


def _noise_blocks_from_rows(path: Path, store: Store, rows: pd.DataFrame) -> None:
    """Rebuilds the raw noise-scale estimates, in the order written (each a run of
    `NOISE_STATS` rows of one step)."""
    if not len(rows):
        return
    step, epoch, batch, value = _columns(
        rows, f"'{path}' has a noise-scale row whose step or value is not a number."
    )
    name = rows["stat"].astype(object).to_numpy()
    m = len(NOISE_STATS)
    whole = len(step) % m == 0 and all(
        (name[j::m] == stat).all() and (step[j::m] == step[::m]).all()
        for j, stat in enumerate(NOISE_STATS)
    )
    if not whole:
        raise ValueError(
            f"'{path}' has noise-scale rows that do not come in whole estimates: each "
            f"step's {', '.join(NOISE_STATS)}, in that order."
        )
    store.add_noise_rows(step[::m], epoch[::m], batch[::m], value.reshape(-1, m))


def _blocks_from_rows(store, step, epoch, batch, var, inner, value, kind) -> None:
    """Rebuilds dense blocks from long rows, one block per run of steps with equal layout."""
    if len(step) == 0:
        return
    order = np.lexsort((inner, var, step))
    step, epoch, batch, var, inner, value = (
        a[order] for a in (step, epoch, batch, var, inner, value)
    )
    uniq, starts = np.unique(step, return_index=True)
    bounds = [*starts.tolist(), len(step)]
    run: list[int] = []
    layout = None

    def flush() -> None:
        if not run:
            return
        first, k = bounds[run[0]], len(run)
        width = bounds[run[0] + 1] - first
        rows = slice(first, bounds[run[-1] + 1])
        data = value[rows].reshape(k, width)
        idx = [bounds[i] for i in run]
        if kind == "stats":
            ns = len(store.stats)
            codes = var[first : first + width : ns]
            store.append(
                step[idx],
                epoch[idx],
                batch[idx],
                codes,
                data.reshape(k, -1, ns),
                np.zeros((0,), np.int32),
                np.zeros((k, 0), np.float32),
            )
        else:
            codes = np.asarray(list(dict.fromkeys(var[first : first + width].tolist())), np.int32)
            store.append(
                step[idx],
                epoch[idx],
                batch[idx],
                np.zeros((0,), np.int32),
                np.zeros((k, 0, len(store.stats)), np.float32),
                codes,
                data,
            )

    for i in range(len(uniq)):
        rows = slice(bounds[i], bounds[i + 1])
        this = (var[rows].tobytes(), inner[rows].tobytes())
        if this != layout:
            flush()
            run, layout = [], this
        run.append(i)
    flush()


def _replica_blocks_from_rows(path, store, step, epoch, batch, replica, var, stat, value) -> None:
    """Rebuilds per-replica stat blocks from long rows, one block per run of steps with
    equal layout (replicas, variables and stats)."""
    if len(step) == 0:
        return
    ns = len(store.stats)
    order = np.lexsort((stat, var, replica, step))
    step, epoch, batch, replica, var, stat, value = (
        a[order] for a in (step, epoch, batch, replica, var, stat, value)
    )
    uniq, starts = np.unique(step, return_index=True)
    bounds = [*starts.tolist(), len(step)]
    runs: list[list[int]] = []
    layout = None
    for i in range(len(uniq)):
        rows = slice(bounds[i], bounds[i + 1])
        this = (replica[rows].tobytes(), var[rows].tobytes(), stat[rows].tobytes())
        if this != layout:
            runs.append([])
            layout = this
        runs[-1].append(i)
    for run in runs:
        first, k = bounds[run[0]], len(run)
        width = bounds[run[0] + 1] - first
        ids = np.unique(replica[first : first + width])
        n_replicas = len(ids)
        n_vars = width // max(n_replicas * ns, 1)
        if not np.array_equal(ids, np.arange(n_replicas)) or n_replicas * n_vars * ns != width:
            raise ValueError(
                f"'{path}' has per-replica rows at step {step[first]} that do not form whole "
                "replicas 0, 1, ... with every stat of each variable."
            )
        data = value[first : bounds[run[-1] + 1]].reshape(k, n_replicas, n_vars, ns)
        idx = [bounds[i] for i in run]
        store.append_replicas(
            step[idx], epoch[idx], batch[idx], var[first : first + width : ns][:n_vars], data
        )


def _hist_blocks_from_rows(store, step, epoch, batch, var, bin_index, count) -> None:
    """Rebuilds histogram blocks from the non-empty bins in the file."""
    n_bins = histogram_bin_count(store.bins_per_decade)
    if bin_index.min() < 0 or bin_index.max() >= n_bins:
        raise ValueError(f"A histogram row has a bin outside 0..{n_bins - 1}.")
    steps, first = np.unique(step, return_index=True)
    codes = np.unique(var).astype(np.int32)
    data = np.zeros((len(steps), len(codes), n_bins), np.int32)
    data[np.searchsorted(steps, step), np.searchsorted(codes, var), bin_index] = count
    store.append(
        steps,
        epoch[first],
        batch[first],
        codes,
        np.zeros((len(steps), len(codes), 0), np.float32),
        np.zeros((0,), np.int32),
        np.zeros((len(steps), 0), np.float32),
        hist=data,
    )


def _columns(table: Any, message: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A long table's step, epoch and batch (int64) and value (float32) columns; a
    ValueError with `message` where one is not a number."""
    try:
        return (
            table["step"].to_numpy(np.int64),
            table["epoch"].to_numpy(np.int64),
            table["batch"].to_numpy(np.int64),
            table["value"].to_numpy(np.float32),
        )
    except (TypeError, ValueError) as e:
        raise ValueError(message) from e
