"""Holding Ctrl-C back while recorded steps move from the device to the log and its files.

A `KeyboardInterrupt` raised between the copy of the ring buffer and the store's
append, or in the middle of a part's write, would lose steps that the device no
longer holds. `deferred_interrupt()` takes SIGINT's handler for the length of such a
section and hands a SIGINT that came in it to the handler it replaced on the way out:
Ctrl-C still stops the training, a few milliseconds later, with every step kept."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Runs the body with SIGINT held back, then delivers one that came meanwhile.

    Only the main thread can set a signal handler; elsewhere, or where SIGINT's handler
    is not a Python callable (ignored, or the process default), the body runs as is.
    Nested sections hold the signal until the outermost one ends.

    Example:

    >>> with deferred_interrupt():
    ...     moved = sum(range(4))  # a SIGINT here is raised after the block
    >>> moved
    6
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):
        yield
        return
    received: list[tuple[int, FrameType | None]] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        received.append((signum, frame))

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            previous(*received[0])
