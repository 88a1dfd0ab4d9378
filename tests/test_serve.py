"""`gradwatch serve` and the live tail it follows: a real training streams in a
subprocess, the command serves in another, and headless Chromium reads the page."""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from components import HANG, chromium

import gradwatch
from gradwatch._logdata import files
from gradwatch._logdata.store import SCALARS, Store
from gradwatch._logdata.tail import append_frame, frame_bytes, tail_file
from gradwatch._logdata.views import layer_of_key
from gradwatch._ui import live
from gradwatch._ui.live_server import make_server
from gradwatch.cli import main

ROOT = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).with_name("serve_run.py")


def _child(mode: str, out: Path) -> subprocess.Popen:
    env = dict(os.environ, KERAS_BACKEND="tensorflow", PYTHONPATH=str(ROOT))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return subprocess.Popen(
        [sys.executable, str(CHILD), mode, str(out)],
        env=env,
        cwd=str(ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait(condition, what: str, proc: subprocess.Popen | None = None):
    """Polls `condition` until it is truthy; fails after `HANG` seconds (a hang, never
    slowness) or where `proc` ended with an error first."""
    end = time.monotonic() + HANG
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() not in (None, 0):
            pytest.fail(f"{what}: the subprocess failed:\n{proc.stdout.read()}")
        time.sleep(0.1)
    pytest.fail(f"Gave up waiting for {what}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = chromium(tmp_path_factory.mktemp("chromium"), "the live page")
    yield driver
    driver.quit()


def _page(driver) -> dict:
    """What the page shows: the last step, and each layer's norm at it."""
    return driver.execute_script(
        """
        const rows = [...document.querySelectorAll('#layers tbody tr')];
        return {
          step: document.getElementById('step').textContent,
          layers: rows.map((r) => r.cells[0].textContent),
          norms: rows.map((r) => r.cells[1].dataset.value),
          charts: document.querySelectorAll('.js-plotly-plot').length,
          verdict: document.getElementById('sentence').textContent,
        };
        """
    )


def _layer_norms(log) -> dict[str, float]:
    """Each layer's gradient norm at the log's last step, from its variables' norms."""
    norm = log.stat("norm")
    last = norm.iloc[-1]
    out: dict[str, float] = {}
    for key, value in last.items():
        out[layer_of_key(key)] = out.get(layer_of_key(key), 0.0) + float(value) ** 2
    return {k: math.sqrt(v) for k, v in out.items()}


def test_serve_follows_a_training_that_streams_in_another_process(browser, tmp_path):
    log_dir = tmp_path / "log"
    log_dir.mkdir()  # `serve` starts before the training writes its first step
    port = _free_port()
    train = _child("live", tmp_path)
    server = subprocess.Popen(
        [sys.executable, "-m", "gradwatch", "serve", str(log_dir), "--port", str(port)],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        assert url in server.stdout.readline() + server.stdout.readline()
        browser.get(url)
        # With the default `flush_every`, no part is written before the end: a step on
        # the page while the training runs came from the live tail.
        first = _wait(lambda: (p := _page(browser))["step"].isdigit() and p, "a step", train)
        assert train.poll() is None and not list(log_dir.rglob("part-*"))
        assert list(log_dir.rglob("_tail-000000.arrows"))
        assert set(first["layers"]) == {"net/hidden", "net/out"}
        (tmp_path / "go").touch()  # the training ends a few steps later
        assert train.wait(timeout=HANG) == 0, train.stdout.read()
        memory = gradwatch.read_log(tmp_path / "memory.parquet")
        last = int(memory.steps[-1])
        assert last > int(first["step"])
        final = _wait(lambda: (p := _page(browser))["step"] == str(last) and p, "the last step")
        # The finished log: the page's numbers are the log's, and `read_log` reads the
        # same history as without a tail: one part, and no tail left.
        expected = _layer_norms(memory)
        shown = dict(zip(final["layers"], map(float, final["norms"]), strict=True))
        assert shown.keys() == expected.keys()
        for layer, value in expected.items():
            assert shown[layer] == pytest.approx(value, rel=1e-5)
        assert final["charts"] == 4
        assert [p.name for p in log_dir.rglob("*.*")] == ["part-000000.parquet"]
        assert gradwatch.read_log(log_dir) == memory
        assert _wait(lambda: "No problem found" in _page(browser)["verdict"], "the verdict")
        server.send_signal(signal.SIGINT)  # Ctrl-C stops it cleanly
        assert server.wait(timeout=HANG) == 0
        assert "stopped" in server.stdout.read()
    finally:
        for proc in (train, server):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()


@pytest.fixture(scope="module", autouse=True)
def crashed(tmp_path_factory):
    """The crashed training, started with the module so that it runs beside the others."""
    out = tmp_path_factory.mktemp("crash")
    with _child("crash", out) as train:
        yield out, train
        if train.poll() is None:
            train.kill()


def test_read_log_recovers_the_tail_of_a_crashed_run(crashed):
    tmp_path, train = crashed
    assert train.wait(timeout=HANG) == 0, train.stdout.read()
    # No part was written (flush_every=1000): only the tail holds the steps.
    assert not list((tmp_path / "log").rglob("part-*"))
    (tail,) = (tmp_path / "log").rglob("_tail-000000.arrows")
    recovered = gradwatch.read_log(tmp_path / "log")
    reference = gradwatch.read_log(tmp_path / "ref")  # a part at every drain of the same fit
    steps = recovered.steps
    assert len(steps) and steps.tolist() == list(range(len(steps)))
    common = np.intersect1d(steps, reference.steps)
    assert len(common) >= 1
    np.testing.assert_array_equal(
        recovered.stat("norm").loc[common].to_numpy(), reference.stat("norm").loc[common].to_numpy()
    )
    np.testing.assert_array_equal(
        recovered.scalars.set_index("step").loc[common, "loss"].to_numpy(),
        reference.scalars.set_index("step").loc[common, "loss"].to_numpy(),
    )
    # A half-written frame at the end (a crash while writing it) is left out.
    whole = tail.read_bytes()
    first = 12 + int.from_bytes(whole[4:12], "little")  # its magic, length and payload
    tail.write_bytes(whole + whole[: first - 1])
    assert gradwatch.read_log(tmp_path / "log") == recovered


def _synthetic(start: int, steps: int, rng) -> Store:
    """`steps` recorded steps from `start` of three variables in two layers, written
    with the store's own writers."""
    store = Store(("norm", "nonfinite"))
    keys = ["m/a/kernel", "m/a/bias", "m/b/kernel"]
    codes = store.add_variables(keys, [(3, 2), (2,), (2, 1)])
    step = np.arange(start, start + steps)
    data = np.zeros((steps, 3, 2), np.float32)
    data[:, :, 0] = rng.lognormal(size=(steps, 3))
    scalars = np.full((steps, len(SCALARS)), np.nan, np.float32)
    scalars[:, SCALARS.index("loss")] = rng.random(steps)
    scalars[:, SCALARS.index("global_norm")] = np.sqrt((data[:, :, 0] ** 2).sum(1))
    scalars[:, SCALARS.index("spike")] = 0
    store.append(
        step, np.zeros(steps), step, codes, data, codes[:0], np.zeros((steps, 0)), scalars=scalars
    )
    return store


def _caught_up(follower: live.Follower) -> bool:
    """Polls until the follower has read every part listed (a poll reads parts for
    `READ_SECONDS` at most); whether anything changed."""
    changed = follower.poll()
    while follower.queue:
        changed = follower.poll() or changed
    return changed


def test_follower_reads_only_what_is_new_and_downsamples_by_layer(tmp_path):
    rng = np.random.default_rng(0)
    run = files.run_directory(tmp_path, 0, files.new_run_id())
    run.mkdir(parents=True)
    stores = [_synthetic(i * 1500, 1500, rng) for i in range(3)]
    for store in stores[:2]:
        files.append_part(store, run)
    # The third stretch comes as the live tail, in two frames, then as a part.
    head = stores[2].since(3000)
    head.split_from(3700)
    tail = tail_file(run, 2)
    append_frame(tail, frame_bytes(files.part_table(head)))
    follower = live.Follower(tmp_path)
    assert _caught_up(follower) and follower.series()["last_step"] == 3699
    version = follower.version
    assert not follower.poll() and follower.version == version  # nothing new, nothing read
    offset = follower.tail_offset
    append_frame(tail, frame_bytes(files.part_table(stores[2].since(3700))))
    assert _caught_up(follower) and follower.tail_offset > offset and len(follower.seen) == 2
    series = follower.series()
    assert series["last_step"] == 4499 and series["steps_recorded"] == 4500
    files.append_part(stores[2], run)  # the part; the tail is stale until deleted
    assert _caught_up(follower) and len(follower.seen) == 3 and follower.tail is None
    tail.unlink()
    assert not follower.poll()
    # The page's series against NumPy over the written log.
    log = gradwatch.read_log(tmp_path)
    series = follower.series()
    norm = log.stat("norm").to_numpy(np.float64)
    layers = {"m/a": norm[:, :2], "m/b": norm[:, 2:]}
    assert series["layers"] == list(layers)
    scalars = series["scalars"]
    assert len(scalars["step"]) == live.MAX_POINTS and scalars["step"][-1] == 4499
    loss = log.scalars["loss"].to_numpy()
    bounds = np.searchsorted(log.steps, scalars["step"], side="right")
    expected = [loss[a:b].max() for a, b in zip([0, *bounds[:-1]], bounds, strict=True)]
    np.testing.assert_allclose(scalars["loss"], expected, rtol=1e-6)
    norms = series["norms"]
    assert len(norms["step"]) == live.LAYER_POINTS and norms["step"][-1] == 4499
    bounds = np.searchsorted(log.steps, norms["step"], side="right")
    for (name, block), shown in zip(layers.items(), norms["layers"], strict=True):
        whole = np.sqrt((block**2).sum(1))
        want = [whole[a:b].max() for a, b in zip([0, *bounds[:-1]], bounds, strict=True)]
        np.testing.assert_allclose(shown, want, rtol=1e-5, err_msg=name)
        assert series["layer_last"][series["layers"].index(name)] == pytest.approx(whole[-1])


def test_serve_shows_a_finished_log_file(browser, tmp_path):
    rng = np.random.default_rng(1)
    log = gradwatch.log.from_store(_synthetic(0, 40, rng))
    path = tmp_path / "grads.parquet"
    log.to_parquet(path)
    server, state = make_server(path, "127.0.0.1", 0)
    state.start()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        browser.get(f"http://127.0.0.1:{server.server_address[1]}/")
        page = _wait(lambda: (p := _page(browser))["step"] == "39" and p, "the page")
        shown = dict(zip(page["layers"], map(float, page["norms"]), strict=True))
        expected = _layer_norms(gradwatch.read_log(path))
        assert shown == pytest.approx(expected, rel=1e-6)
        # Nothing came from anywhere but the server.
        fetched = browser.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
        )
        origin = f"http://127.0.0.1:{server.server_address[1]}/"
        assert fetched and all(u.startswith(origin) for u in fetched)
    finally:
        state.stop.set()
        server.shutdown()
        server.server_close()


def test_serve_missing_path_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["serve", str(missing)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"gradwatch serve: error: No gradwatch log at '.*nowhere'", err)
    assert "GradWatch(path=...)" in err


def test_serve_port_in_use_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "log").mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(tmp_path / "log"), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"Port {port} on 127.0.0.1 is in use" in err and "--port" in err
