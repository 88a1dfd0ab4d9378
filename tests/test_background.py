"""The long background runs of tests/test_backends.py: started only for selected tests, and
never outliving pytest, however it ends. Each case runs pytest itself in a subprocess and
looks at the processes it started from outside."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from background import LOG_ENV
from components import HANG, ctrl_c_raises, require

ROOT = Path(__file__).resolve().parent.parent
# Bounds on hangs only, never on speed: a loaded machine may take minutes to start pytest
# and TensorFlow, and the tests wait for what they wait for, not for a fixed time.
# One of the long runs: the core tests under PyTorch (minutes when left alone).
CORE_TORCH = ["tests/test_backends.py", "-k", "core_suite and torch or fails_first"]


def _pytest(args, log, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, **{LOG_ENV: str(log)})
    return subprocess.Popen(
        # One interpreter (`-n 0`): the runs it starts are the ones looked at.
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=ctrl_c_raises,
        **kwargs,
    )


def _started(log: Path) -> dict[str, int]:
    if not log.exists():
        return {}
    return {key: int(pid) for key, pid in (line.split() for line in log.read_text().splitlines())}


def _wait_until_started(log: Path, process: subprocess.Popen, timeout: float = HANG) -> int:
    """The process group of the core-torch run, once a test is waiting for it.

    Waiting for the test, not only for the start: a signal that lands while the session is
    still between collection and the test (in a fixture's `gc.collect()`, say) can be raised
    inside an object's `__del__`, where Python reports it as unraisable and goes on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "waiting:core-torch" in _started(log):
            return _started(log)["core-torch"]
        assert process.poll() is None, process.communicate()[0]
        time.sleep(0.2)
    _end(process)
    raise AssertionError(f"no test waited for a background run within {timeout} s")


def _end(process: subprocess.Popen) -> str:
    """Kills `process` if it is still going, and returns its output."""
    process.kill()
    return process.communicate()[0]


def _living(group: int) -> list[int]:
    """The processes of process group `group` that are not zombies (a zombie has ended;
    only its parent's bookkeeping is left)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # pid (comm) state ppid pgrp ...; comm may hold spaces, so split after ")".
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended while being read
        if int(fields[2]) == group and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _assert_gone(group: int, timeout: float = HANG) -> None:
    deadline = time.monotonic() + timeout
    while _living(group) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _living(group) == [], f"processes of the background run {group} outlived pytest"


@pytest.fixture
def torch_installed():
    require(importlib.util.find_spec("torch") is not None, "PyTorch is not installed")
    require(Path("/proc/self/stat").exists(), "no /proc to look at processes in")


@pytest.mark.parametrize(
    "args",
    [
        ["--collect-only", *CORE_TORCH],
        ["tests/test_backends.py", "-k", "no_test_has_this_name"],
    ],
    ids=["collect-only", "all-deselected"],
)
def test_background_runs_start_only_for_selected_tests(torch_installed, tmp_path, args):
    log = tmp_path / "started.txt"
    process = _pytest(args, log)
    try:
        out, _ = process.communicate(timeout=HANG)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"pytest still ran after {HANG} s:\n{_end(process)}") from None
    assert "test_backends.py" in out or " deselected" in out, out  # it collected them
    assert _started(log) == {}


def test_background_run_ends_when_a_failure_stops_the_session(torch_installed, tmp_path):
    # `-x`: the failing test runs first (tests/test_backends.py always runs last), the
    # session stops there, and the run started at collection must end with it.
    failing = tmp_path / "test_fails_first.py"
    failing.write_text("def test_fails():\n    assert False\n")
    log = tmp_path / "started.txt"
    process = _pytest(["-x", str(failing), *CORE_TORCH], log)
    try:
        out, _ = process.communicate(timeout=HANG)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"pytest still ran after {HANG} s:\n{_end(process)}") from None
    assert process.returncode == 1, out
    assert "1 failed" in out
    _assert_gone(_started(log)["core-torch"])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "killed"])
def test_background_run_ends_when_pytest_is_interrupted_or_killed(torch_installed, tmp_path, sig):
    log = tmp_path / "started.txt"
    process = _pytest(CORE_TORCH, log)
    group = _wait_until_started(log, process)
    assert _living(group)  # the run is going while its test waits for it
    process.send_signal(sig)
    try:
        # Ending takes what it takes under load (stopping the run, TensorFlow's exit): the
        # bound is for a pytest that never ends.
        out, _ = process.communicate(timeout=HANG)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"pytest still ran {HANG} s after {sig.name}:\n{_end(process)}"
        ) from None
    if sig == signal.SIGINT:
        assert "KeyboardInterrupt" in out, out
    _assert_gone(group)
