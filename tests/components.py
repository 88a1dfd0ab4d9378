"""Components the tests declare (Chromium, the JAX and PyTorch backends): a missing one
is a skip with its reason on a developer's machine, and a failure in CI (`CI=true`),
where `.ci/run` installs them all, so that a green CI never stands for a skipped part."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

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


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
# Without these Chromium tries to reach the network at start-up, and hangs where it is closed.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def chromium(folder: Path, what: str) -> Any:
    """A headless Chromium driven by selenium (a test extra), in a 1400 x 900 window, with
    a new profile in `folder`; required (see `require`) for checking `what` in a browser.
    The caller quits it."""
    require(
        bool(CHROMIUM and CHROMEDRIVER),
        f"Chromium and chromedriver are not installed, so {what} is not checked in a "
        "browser; install the Debian packages chromium and chromium-driver (.ci/run does).",
    )
    from selenium import webdriver  # a test extra: pip install '.[test]'
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(dir=folder)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1400,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(HANG)
    driver.set_script_timeout(HANG)
    return driver
