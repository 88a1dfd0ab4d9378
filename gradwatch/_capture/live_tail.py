"""The writer of a streamed run's live tail (`gradwatch._logdata.tail`): every
`TAIL_SECONDS` of wall clock, the steps drained since its last frame, appended next to
the run's parts; deleted once a part holds them.

So `gradwatch serve` shows a step a few seconds after it ends, while the parts stay
`flush_every` steps long, and a crash loses no step that reached the tail.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path
from typing import Any

from gradwatch._logdata import files as _files
from gradwatch._logdata.store import Store
from gradwatch._logdata.tail import append_frame, frame_bytes, tail_file

#: Seconds of wall clock between two frames of the live tail (and two drains that it asks for).
TAIL_SECONDS = 2.0
#: Seconds between two frames at most, however long a frame takes to write (see `LiveTail`).
TAIL_MAX_SECONDS = 5.0
#: A frame waits at least this many times as long as the last one took to write, so that
#: the tail costs a wide model (hundreds of variables) about 5% of its time at most.
TAIL_SPACING = 20


class LiveTail:
    """One run's live tail: which steps it holds, when it last wrote, where.

    A frame is due `seconds` after the last one, or `TAIL_SPACING` times as long as that
    one took to write where that is longer, up to `TAIL_MAX_SECONDS`.

    Args:
        seconds: The wall-clock time between frames. Defaults to `None`: `TAIL_SECONDS`
            (`math.inf`: no tail).
    """

    def __init__(self, seconds: float | None = None):
        self.seconds = float(TAIL_SECONDS if seconds is None else seconds)
        self.file: Path | None = None  # the current tail file, once written
        self.next_step: int | None = None  # the first step not yet in it (None: any)
        self.asked = self.written = time.monotonic()
        self.failed = False
        self.took = 0.0  # seconds the last frame took to write

    def interval(self) -> float:
        """Seconds from one frame to the next."""
        return max(self.seconds, min(TAIL_MAX_SECONDS, TAIL_SPACING * self.took))

    def due(self) -> bool:
        """Whether the steps should be drained now for the tail (then not again for
        `interval()`)."""
        if self.failed or time.monotonic() - self.asked < self.interval():
            return False
        self.asked = time.monotonic()
        return True

    def ready(self) -> bool:
        """Whether `seconds` have passed since the last frame (and the tail works)."""
        return not self.failed and time.monotonic() - self.written >= self.interval()

    def write(self, store: Store, directory: Path, extra: dict[str, Any], steps: Any) -> None:
        """Appends the store's steps not yet in the tail, if `ready`; `steps` are the
        store's recorded steps, sorted."""
        if not self.ready() or not len(steps):
            return
        if self.next_step is not None and steps[-1] < self.next_step:
            return
        self.written = time.monotonic()
        since = store if self.next_step is None else store.since(self.next_step)
        try:
            if self.file is None:
                self.file = tail_file(directory, len(_files.part_files(directory)))
            append_frame(self.file, frame_bytes(_files.part_table(since, extra)))
        except OSError as e:
            self.failed = True  # the parts go on: a step waits for its part, as without a tail
            warnings.warn(
                f"GradWatch could not write the live tail to '{directory}' ({e}); it stops "
                "writing it, and the parts and `watch.log` keep every step.",
                stacklevel=4,
            )
            return
        self.next_step = int(steps[-1]) + 1
        self.took = time.monotonic() - self.written

    def drop(self) -> None:
        """Deletes the tail once a part holds its steps (or the run ends)."""
        if self.file is not None:
            with contextlib.suppress(OSError):  # a stale tail is skipped by the readers
                self.file.unlink(missing_ok=True)
        self.file, self.next_step = None, None
