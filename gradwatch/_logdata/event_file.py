"""A TensorBoard event file: its name, its first event, the records appended to it and
flushed. The I/O half of `gradwatch.tensorboard` (`_tb_summary` builds the events)."""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gradwatch._logdata.tb_summary import file_version_event

_file_numbers = itertools.count()


class EventFile:
    """An event file in `logdir`, created (with the directory) on the first `write`,
    written with TensorBoard's own record writer, as `torch.utils.tensorboard` writes
    them. After `close`, a later `write` starts a new file.

    Example:

    ```python
    events = EventFile(Path("runs/tb"))
    events.write([summary_event(0, summary, time.time())])
    events.close()
    ```
    """

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self._writer: Any = None

    @property
    def is_open(self) -> bool:
        return self._writer is not None

    def write(self, events: Iterable[Any]) -> None:
        """Appends the events, then flushes the file so that a running TensorBoard sees them."""
        writer = self._open()
        for event in events:
            writer.write(event.SerializeToString())
        writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _open(self) -> Any:
        if self._writer is None:
            start = file_version_event(time.time())  # first: names the install line if missing
            from tensorboard.summary.writer.record_writer import RecordWriter

            self.logdir.mkdir(parents=True, exist_ok=True)
            # TensorBoard's naming: `events.out.tfevents.<time>.<host>.<pid>.<n>`; the
            # counter keeps two files of one process apart within a second.
            name = "events.out.tfevents.%010d.%s.%s.%s" % (  # noqa: UP031
                time.time(),
                socket.gethostname(),
                os.getpid(),
                next(_file_numbers),
            )
            self._writer = RecordWriter(open(self.logdir / name, "wb"))  # noqa: SIM115
            self._writer.write(start.SerializeToString())
        return self._writer
