"""Reading and writing gradient logs: CSV and Parquet files that `read_log` reads back."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gradwatch._logdata import files as _files
from gradwatch._logdata.files import (
    COLUMNS,
    FORMAT,
    PART_PREFIX,
    REPLICA_COLUMNS,
    RUN_KEY,
    VERSION,
    WORKER_KEY,
    dataset_parts,
    new_run_id,
    part_files,
    run_directory,
    streamed_last_step,
    streamed_metadata,
)
from gradwatch.log import GradientLog, from_store, store_of

__all__ = [
    "COLUMNS",
    "FORMAT",
    "PART_PREFIX",
    "REPLICA_COLUMNS",
    "RUN_KEY",
    "VERSION",
    "WORKER_KEY",
    "append_part",
    "dataset_parts",
    "new_run_id",
    "part_files",
    "read_log",
    "run_directory",
    "streamed_last_step",
    "streamed_metadata",
    "write_csv",
    "write_parquet",
]


def read_log(path: Any, worker: int | None = None) -> GradientLog:
    """Reads a log written by `GradientLog.to_csv`, `GradientLog.to_parquet` or streamed
    by `GradWatch(path=...)`.

    Args:
        path: A file, whose format is told by its content, not its name; or the
            directory of a streamed log: a hive-partitioned Parquet dataset
            `worker=<k>/run=<id>/part-*.parquet` (every run appended to it), or
            an older flat directory of `part-*.parquet` files.
        worker: For a streamed log, whose partition to read. Every worker
            records the same global gradients, so one partition is the whole
            log. Defaults to `None`: the lowest worker present (0, the chief,
            for a log that only the chief wrote, and for a single process).

    Returns:
        A `GradientLog` equal to the one written.

    Raises:
        OSError: If the file cannot be read.
        ValueError: If the file is not a gradwatch log; the message says what
            is missing.

    Example:

    ```python
    log.to_parquet("grads.parquet")
    same = gradwatch.read_log("grads.parquet")
    assert same == log
    ```
    """
    return from_store(_files.read_store(path, worker))


def write_csv(log: GradientLog, path: Any) -> None:
    """Writes `log` as CSV: a `# gradwatch-log {json}` first line, then the long table.

    The same as `log.to_csv(path)`.

    Example:

    ```python
    write_csv(log, "grads.csv")
    ```
    """
    _files.write_csv(store_of(log), path)


def write_parquet(log: GradientLog, path: Any) -> None:
    """Writes `log` as Parquet, with the metadata under the schema key `gradwatch`.

    The same as `log.to_parquet(path)`.

    Example:

    ```python
    write_parquet(log, "grads.parquet")
    ```
    """
    _files.write_parquet(store_of(log), path)


def append_part(log: GradientLog, directory: str | os.PathLike) -> Path:
    """Writes the steps held in `log` as the next part file in `directory`.

    Each part is a complete Parquet file with the log's metadata, written
    through a temporary file and renamed, so a crash never leaves half a part.

    Example:

    ```python
    append_part(log, run_directory(Path("runs/grads"), worker=0, run=new_run_id()))
    ```
    """
    return _files.append_part(store_of(log), Path(directory))
