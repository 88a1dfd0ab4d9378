"""The checks of a path that gradwatch reads or writes, with errors that say what to do.

Standard library only (no `typing`): the command line imports it before `--help`.
"""

from __future__ import annotations

import os
from pathlib import Path


def as_path(value: object, argument: str = "path") -> Path:
    """`value` as a `Path`; a TypeError that names `argument` when it is not a path.

    Example:

    >>> as_path("runs/grads.parquet").name
    'grads.parquet'
    >>> as_path(3, "logdir")
    Traceback (most recent call last):
    ...
    TypeError: `logdir` must be a str or os.PathLike. Received: logdir=3
    """
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(
            f"`{argument}` must be a str or os.PathLike. Received: {argument}={value!r}"
        )
    return Path(value)


def writable_file(path: Path, what: str) -> Path:
    """`path`, checked before any work is done: its directory exists and it is no directory.

    Args:
        path: The file to write.
        what: What is written there, for the message (`"the gradwatch log"`).

    Raises:
        FileNotFoundError: If the directory does not exist.
        IsADirectoryError: If `path` is a directory.

    Example:

    >>> writable_file(Path("no/such/dir/report.html"), "the report")
    Traceback (most recent call last):
    ...
    FileNotFoundError: Cannot write the report to 'no/such/dir/report.html': the directory 'no/such/dir' does not exist. Create it first, or choose another path.
    """  # noqa: E501
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"Cannot write {what} to '{path}': the directory '{path.parent}' does not exist. "
            "Create it first, or choose another path."
        )
    if path.is_dir():
        raise IsADirectoryError(f"Cannot write {what} to '{path}': it is a directory.")
    return path
