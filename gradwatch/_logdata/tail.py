"""A streamed run's live tail: the rows recorded since its last Parquet part, appended
every few seconds to one file next to the parts, so that `gradwatch serve` shows a step
soon after it ends, and a crash loses no step that reached it.

The file `_tail-<n>.arrows` (n: the number of the part its rows go into) is a run of
frames, each `MAGIC`, the payload's length (8 bytes, little-endian) and an Arrow IPC
stream: a part's table of the steps since the previous frame, with the log's metadata
under the schema key `gradwatch`, as a part has it. It is only appended to; a part
written makes it stale, and the writer deletes it then. Its name starts with `_`, which
pyarrow's and Spark's dataset readers skip, so the directory stays a Parquet dataset.
A frame cut short (the process killed while writing it) ends the file for a reader.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TAIL_PREFIX = "_tail-"
TAIL_SUFFIX = ".arrows"
MAGIC = b"GWTF"
_HEAD = len(MAGIC) + 8


def tail_file(directory: Path, number: int) -> Path:
    """The tail of a run directory whose rows go into part `number`."""
    return directory / f"{TAIL_PREFIX}{number:06d}{TAIL_SUFFIX}"


def tail_number(path: Path) -> int | None:
    """The part number in a tail file's name, or None for another file."""
    name = path.name
    if not (name.startswith(TAIL_PREFIX) and name.endswith(TAIL_SUFFIX)):
        return None
    digits = name[len(TAIL_PREFIX) : -len(TAIL_SUFFIX)]
    return int(digits) if digits.isdigit() else None


def tail_files(directory: Path) -> list[Path]:
    """The tail files directly in a run directory, by part number."""
    found = directory.glob(f"{TAIL_PREFIX}*{TAIL_SUFFIX}")
    found = [p for p in found if tail_number(p) is not None]
    return sorted(found, key=lambda p: tail_number(p) or 0)


def frame_bytes(table: Any) -> bytes:
    """One frame: a pyarrow table (with its schema's metadata) as a framed IPC stream."""
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    payload = sink.getvalue().to_pybytes()
    return MAGIC + len(payload).to_bytes(8, "little") + payload


def append_frame(path: Path, frame: bytes) -> None:
    """Appends one frame to a tail file (made if missing), in one write, and flushes it
    to the operating system (a crash of the process loses nothing written)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        view = memoryview(frame)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def read_frames(path: Path, offset: int = 0) -> tuple[list[Any], int]:
    """The whole frames of a tail file from byte `offset` on, as pyarrow tables, and the
    offset after the last whole one (where the next read starts). A missing file has
    none; a frame cut short or damaged ends the read."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    tables, end = [], 0
    for table, size in _frames(data):
        tables.append(table)
        end += size
    return tables, offset + end


def _frames(data: bytes) -> Iterator[tuple[Any, int]]:
    import pyarrow as pa

    at = 0
    while len(data) - at >= _HEAD and data[at : at + len(MAGIC)] == MAGIC:
        size = int.from_bytes(data[at + len(MAGIC) : at + _HEAD], "little")
        if len(data) - at - _HEAD < size:
            return  # being written, or cut short by a crash
        try:
            payload = pa.py_buffer(data[at + _HEAD : at + _HEAD + size])
            table = pa.ipc.open_stream(payload).read_all()
        except (pa.ArrowInvalid, OSError):
            return
        yield table, _HEAD + size
        at += _HEAD + size
