"""`gradwatch serve`'s HTTP server: the page, plotly.js and the log's state as JSON, from
Python's standard library (`http.server`), on one thread per request; a follower thread
reads the log (`gradwatch._ui.live.Follower`) and the doctor runs in a thread of its own.
"""

from __future__ import annotations

import errno
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from gradwatch._ui.live import Doctor, Follower
from gradwatch._ui.live_page import page
from gradwatch._ui.plotly_js import plotly_js

#: The port `gradwatch serve` listens on unless told (TensorBoard's 6006, plus one).
DEFAULT_PORT = 6007
#: Seconds between two reads of the log, at least.
POLL_SECONDS = 1.0


class LiveState:
    """What the server answers with: the follower's series and the doctor's result, made
    into JSON once per change (`version`), by the follower thread."""

    def __init__(self, path: Path, poll_seconds: float = POLL_SECONDS):
        self.path = path
        self.poll_seconds = poll_seconds
        self.follower = Follower(path)
        self.doctor = Doctor()
        self.body = b""
        self.version = -1
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self._made: tuple[int, Any] = (-2, None)
        self.thread = threading.Thread(target=self._follow, name="gradwatch-follow", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _follow(self) -> None:
        while True:
            try:
                self.update()
            except Exception as e:  # a bug: shown on the page, and the server reads on
                error = f"gradwatch serve failed to read the log (a bug): {e!r}"
                with self.lock:
                    self.version += 1
                    self.body = json.dumps({"version": self.version, "error": error}).encode()
                self._made = (-2, None)
            if self.stop.wait(0 if self.follower.queue else self.poll_seconds):
                return

    def update(self) -> None:
        """Reads what is new, starts the doctor where due, and makes the JSON anew where
        something changed."""
        self.follower.poll()
        self.doctor.maybe_run(self.follower)
        made = (self.follower.version, self.doctor.result)
        if made[0] == self._made[0] and made[1] is self._made[1]:
            return
        state = {
            "path": str(self.path),
            "version": 0,
            "error": self.follower.error,
            "doctor": self.doctor.result,
            **self.follower.series(),
        }
        with self.lock:
            self.version += 1
            state["version"] = self.version
            self.body = json.dumps(state, separators=(",", ":")).encode()
            self._made = made

    def answer(self, since: int | None) -> bytes:
        with self.lock:
            if since is not None and since == self.version:
                return json.dumps({"version": self.version, "same": True}).encode()
            return self.body


def _handler(state: LiveState, html: bytes) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "gradwatch"

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path in ("/", "/index.html"):
                self._send(html, "text/html; charset=utf-8")
            elif url.path == "/plotly.min.js":
                self._send(plotly_js().encode(), "text/javascript; charset=utf-8", cache=True)
            elif url.path == "/api/state":
                since = parse_qs(url.query).get("since", [None])[0]
                try:
                    version = None if since is None else int(since)
                except ValueError:
                    version = None
                self._send(state.answer(version), "application/json")
            else:
                self.send_error(404, "Not found: gradwatch serve has /, /api/state")

        def _send(self, body: bytes, kind: str, cache: bool = False) -> None:
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per poll would flood the terminal

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def make_server(path: Path, host: str, port: int) -> tuple[ThreadingHTTPServer, LiveState]:
    """The server, bound to `host:port`, and the state it serves (not started).

    Raises:
        OSError: If the port is taken or the host cannot be bound, saying which and how
            to pick another.
    """
    plotly_js()  # a missing plotly is an ImportError now, not a broken page later
    state = LiveState(path)
    html = page(str(path)).encode()
    try:
        server = _Server((host, port), _handler(state, html))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise OSError(
                f"Port {port} on {host} is in use (by another server, or another "
                f"`gradwatch serve`). Pick a free one with --port, e.g. --port {port + 1}."
            ) from e
        raise OSError(
            f"Cannot listen on {host}:{port}: {e.strerror or e}. Check --host and --port."
        ) from e
    return server, state


def serve(path: Path, host: str, port: int) -> None:
    """Serves the live page of the log at `path` until Ctrl-C."""
    server, state = make_server(path, host, port)
    bound = server.server_address[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"gradwatch serve: following {path}")
    print(f"Open http://{shown}:{bound}/ (Ctrl-C to stop)", flush=True)
    state.start()
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        print("gradwatch serve: stopped.", flush=True)
    finally:
        # The follower's and the doctor's threads are daemons: a long read or diagnosis
        # does not hold the exit up.
        state.stop.set()
        server.server_close()
