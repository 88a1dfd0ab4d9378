"""Components the tests declare (Chromium, the JAX and PyTorch backends): a missing one
is a skip with its reason on a developer's machine, and a failure in CI (`CI=true`),
where `.ci/run` installs them all, so that a green CI never stands for a skipped part."""

from __future__ import annotations

import os
import signal

import pytest

#: Seconds after which a test gives up on a child process, a page or a run that never ends.
#: It bounds a hang only, never the work: under a loaded machine a training subprocess takes
#: minutes, and a test must not fail because the machine is slow. CI's own time limit is
#: the outer bound.
HANG = 1200


def in_ci() -> bool:
    """Whether the tests run in CI: the `CI` variable that CI services set, e.g. `CI=true`."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(installed: bool, reason: str) -> None:
    """Skips the calling test for `reason` unless `installed`; fails it instead in CI."""
    if installed:
        return
    if in_ci():
        pytest.fail(f"{reason} (CI=true: every declared component must be installed)")
    pytest.skip(reason)


def ctrl_c_raises() -> None:
    """Makes SIGINT raise KeyboardInterrupt, also where the test runner was started with
    SIGINT ignored (a shell's `cmd &` does that, and a child inherits it). Also as a
    `preexec_fn`: the child's new program then starts with SIGINT's default action."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
