"""Progress bars for the long conversions and reports of the command line (tqdm, if installed)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# A bar shows only once its work has taken this long, so quick runs stay quiet.
DELAY_S = 0.5


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass


@contextmanager
def progress_bar(total: int, desc: str, unit: str = "it", enabled: bool = True) -> Iterator[Any]:
    """A tqdm bar on stderr, or a silent stand-in when `enabled` is False.

    The bar appears after `DELAY_S` seconds, and only on a terminal.

    Args:
        total: The amount of work, in `unit`s.
        desc: The label in front of the bar.
        unit: What is counted. Defaults to `"it"`.
        enabled: Whether to show a bar. Defaults to `True`.

    Without tqdm installed there is no bar: the silent stand-in, and no error.

    Example:

    ```python
    with progress_bar(len(steps), "tensorboard", unit="step") as bar:
        for chunk in chunks:
            bar.update(len(chunk))
    ```
    """
    if not enabled:
        yield _Silent()
        return
    try:
        from tqdm import tqdm
    except ImportError:  # a progress bar is a nicety, never a requirement
        yield _Silent()
        return
    # disable=None: no bar when stderr is not a terminal (pipes, CI logs).
    with tqdm(
        total=total, desc=desc, unit=unit, file=sys.stderr, delay=DELAY_S, disable=None, leave=False
    ) as bar:
        yield bar
