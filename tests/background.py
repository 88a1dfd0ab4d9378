"""Long test runs in child processes: started only for the tests that are selected, and
ended with the pytest session, however it ends (a failure under `-x`, Ctrl-C, an error,
even a killed pytest)."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from typing import IO

# Tests of this module set it to a file that gets one line per started process ("key pid",
# and "waiting:key pid" once a test waits for it), so that they can check from outside that
# the process is gone.
LOG_ENV = "GRADWATCH_TEST_BACKGROUND_LOG"
#: In a pytest-xdist worker: the folder where the controller publishes the long runs it
#: started (`Runs.publish`); None in a pytest without workers, which starts its own.
SHARED: str | None = None
_PR_SET_PDEATHSIG = 1

try:  # loaded before any fork: the child only calls into it
    _libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
except OSError:  # pragma: no cover - no C library to load
    _libc = None


def _in_child() -> None:
    # Runs in the child before exec. Lower priority, so that the tests that measure or
    # wait stay responsive; killed by the kernel if pytest dies without cleaning up.
    os.nice(10)
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Runs:
    """Child processes by key, with their output in temporary files."""

    def __init__(self) -> None:
        self._running: dict[str, tuple[subprocess.Popen, IO[str], IO[str]]] = {}
        atexit.register(self.stop_all)

    def start(self, key: str, argv: Sequence[str], env: Mapping[str, str], cwd: str) -> None:
        """Starts `argv` under `key`, unless a run of that key is going already."""
        if key in self._running:
            return
        # Read by `wait`; closed there or by `stop_all`.
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # noqa: SIM115
        process = subprocess.Popen(
            list(argv),
            env=dict(env),
            stdout=out,
            stderr=err,
            text=True,
            cwd=cwd,
            # Its own process group, so that `stop_all` also ends what it started
            # (torch.compile's worker processes, say).
            start_new_session=True,
            preexec_fn=_in_child,
        )
        self._running[key] = (process, out, err)
        _log(key, process.pid)

    def publish(self, key: str, path: str) -> None:
        """When the run of `key` ends, writes its exit status and output to `path` (JSON,
        written whole by a rename): how a pytest-xdist worker's test gets a run that the
        controller started (`collect`)."""

        def report() -> None:
            with contextlib.suppress(KeyError, ValueError):  # stopped by `stop_all`
                done = self.wait(key, timeout=None)
                partial = path + ".partial"
                with open(partial, "w") as f:
                    json.dump([done.returncode, done.stdout, done.stderr], f)
                os.replace(partial, path)

        threading.Thread(target=report, name=f"report {key}", daemon=True).start()

    def poll(self, key: str) -> int | None:
        """The exit status of the run of `key`, or None while it runs."""
        return self._running[key][0].poll()

    def send_signal(self, key: str, signum: int) -> None:
        """Sends `signum` to the run of `key` itself (not to what it started)."""
        process = self._running[key][0]
        if process.poll() is None:
            process.send_signal(signum)

    def wait(self, key: str, timeout: float | None) -> subprocess.CompletedProcess:
        """Waits for the run of `key` (killed after `timeout` seconds) and returns it."""
        process, out, err = self._running[key]
        _log(f"waiting:{key}", process.pid)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read())
            f.close()
        del self._running[key]
        return subprocess.CompletedProcess(process.args, process.returncode, *texts)

    def stop_all(self) -> None:
        """Ends every run still going, with the processes it started."""
        while self._running:
            _, (process, out, err) = self._running.popitem()
            _kill_group(process)
            out.close()
            err.close()


def collect(path: str, timeout: float) -> subprocess.CompletedProcess | None:
    """The run that another process published to `path` (`Runs.publish`), once it ended;
    None if it did not within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return None
        time.sleep(0.5)  # polls a file the run's end writes; not a guess at its length
    with open(path) as f:
        returncode, stdout, stderr = json.load(f)
    return subprocess.CompletedProcess([path], returncode, stdout, stderr)


def _log(event: str, pid: int) -> None:
    if os.environ.get(LOG_ENV):
        with open(os.environ[LOG_ENV], "a") as f:
            f.write(f"{event} {pid}\n")


def _kill_group(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            process.wait()
    # What the run started may outlive it in the group; end that too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


RUNS = Runs()
