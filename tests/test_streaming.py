"""GradWatch(path=...): streaming the log to a Parquet dataset while training runs."""

import runpy
import shutil
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest
from models import data, pair

import gradwatch

# Run again on plain models (tests/test_backends.py).
pytestmark = pytest.mark.plain_models


def _fit(watch, epochs=5, n=400, spe=1):
    x, y = data(n=n)
    model, _ = pair()
    model.compile(keras.optimizers.SGD(0.05), "mse", steps_per_execution=spe)
    model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, callbacks=[watch], verbose=0)
    return model


@pytest.mark.parametrize("spe", [1, 4])
def test_streamed_log_reads_back_equal_to_the_in_memory_log(tmp_path, spe):
    kwargs = {"stats": ("norm", "max", "nonfinite"), "values": "out/bias", "histogram": 2}
    memory = gradwatch.GradWatch(**kwargs)
    _fit(memory, spe=spe)
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(1234)
    streamed = gradwatch.GradWatch(**kwargs, path=tmp_path / "run", flush_every=60)
    _fit(streamed, spe=spe)
    assert len(memory.log) == 250
    # One run of one worker: run/worker=0/run=<id>/part-*.parquet
    (worker,) = (tmp_path / "run").iterdir()
    (run,) = worker.iterdir()
    assert worker.name == "worker=0" and run.name.startswith("run=")
    parts = sorted(p.name for p in run.iterdir())
    assert len(parts) >= 4 and all(p.startswith("part-") for p in parts)
    assert gradwatch.read_log(tmp_path / "run") == memory.log
    assert streamed.log == memory.log
    # Any Parquet reader sees one table over the parts.
    table = ds.dataset(tmp_path / "run", format="parquet").to_table()
    log = memory.log
    # Stat rows, kept elements, histogram bins, and each step's loss, learning rate,
    # whether it applied, its global norm and spike code.
    assert table.num_rows == (
        len(log.frame) + len(log.values_frame) + len(log.histograms) + 5 * len(log.scalars)
    )
    assert len(log.scalars) == 250 and not log.scalars["loss"].isna().any()


def test_streaming_keeps_memory_bounded(tmp_path):
    watch = gradwatch.GradWatch(stats="norm", path=tmp_path / "run", flush_every=20)
    held = []
    probe = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: held.append(len(watch._log))
    )
    x, y = data(n=400)
    model, _ = pair()
    model.compile("sgd", "mse")
    model.fit(x, y, batch_size=8, epochs=4, callbacks=[watch, probe], verbose=0)
    assert max(held) < 20  # never more than one part's worth waits in memory
    assert len(watch.log) == 200


def test_streaming_appends_across_fits_and_watches(tmp_path):
    x, y = data(n=40)
    model, _ = pair()
    model.compile("sgd", "mse")
    first = gradwatch.GradWatch(stats="norm", path=tmp_path / "run", flush_every=3)
    model.fit(x, y, batch_size=8, epochs=2, callbacks=[first], verbose=0)
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[first], verbose=0)
    second = gradwatch.GradWatch(stats="norm", path=tmp_path / "run")
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[second], verbose=0)
    np.testing.assert_array_equal(gradwatch.read_log(tmp_path / "run").steps, np.arange(20))
    other = gradwatch.GradWatch(stats=("norm", "max"), path=tmp_path / "run")
    with pytest.raises(ValueError, match=r"already holds a gradwatch log with stats=\['norm'\]"):
        model.fit(x, y, batch_size=8, callbacks=[other], verbose=0)


def test_failed_writes_warn_and_keep_every_step_in_memory(tmp_path):
    target = tmp_path / "run"
    watch = gradwatch.GradWatch(stats="norm", path=target, flush_every=5)
    vandal = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: shutil.rmtree(target) if epoch == 0 else None
    )
    x, y = data(n=80)
    model, _ = pair()
    model.compile("sgd", "mse")
    with pytest.warns(UserWarning, match=r"could not write to '.*run'.*keeps recording in memory"):
        model.fit(x, y, batch_size=8, epochs=3, callbacks=[watch, vandal], verbose=0)
    # Epoch 0 was written (and then deleted); epochs 1 and 2 are all in memory.
    np.testing.assert_array_equal(watch.log.steps, np.arange(10, 30))


def test_path_arguments_are_checked(tmp_path):
    with pytest.raises(TypeError, match="Received: path=3"):
        gradwatch.GradWatch(path=3)
    with pytest.raises(ValueError, match="Received: flush_every=0"):
        gradwatch.GradWatch(path=tmp_path, flush_every=0)
    with pytest.raises(TypeError, match=r"Received: flush_every=2\.5"):
        gradwatch.GradWatch(path=tmp_path, flush_every=2.5)
    afile = tmp_path / "file"
    afile.write_text("x")
    x, y = data(n=8)
    model, _ = pair()
    model.compile("sgd", "mse")
    with pytest.raises(ValueError, match="is a file"):
        model.fit(x, y, callbacks=[gradwatch.GradWatch(path=afile)], verbose=0)


def test_read_log_on_a_directory_without_parts(tmp_path):
    with pytest.raises(ValueError, match="no gradwatch part files"):
        gradwatch.read_log(tmp_path)


def test_appended_log_keeps_the_alerts_of_every_run(tmp_path):
    x, y = data(n=40)
    model, _ = pair()
    model.compile("sgd", "mse")
    # Every norm is above 1e-9: the first run alerts at each of its steps, the second never.
    first = gradwatch.GradWatch(
        stats="norm", path=tmp_path / "run", max_norm=1e-9, on_threshold="ignore"
    )
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[first], verbose=0)
    expected = first.log.alerts
    assert len(expected) == 5 * 4
    second = gradwatch.GradWatch(stats="norm", path=tmp_path / "run")
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[second], verbose=0)
    # The newest part is the second run's; the first run's alerts live in older parts.
    pd.testing.assert_frame_equal(gradwatch.read_log(tmp_path / "run").alerts, expected)


def _two_runs(path, **kwargs):
    """Two GradWatch runs into one directory (a resumed training), 5 + 5 steps."""
    x, y = data(n=40)
    model, _ = pair()
    model.compile("sgd", "mse")
    for _ in range(2):
        watch = gradwatch.GradWatch(stats=("norm", "max"), path=path, flush_every=3, **kwargs)
        model.fit(x, y, batch_size=8, epochs=1, callbacks=[watch], verbose=0)
    return gradwatch.read_log(path)


def test_streamed_log_is_a_hive_dataset_that_pyarrow_pandas_and_duckdb_read(tmp_path):
    import duckdb

    path = tmp_path / "run"
    log = _two_runs(path)
    np.testing.assert_array_equal(log.steps, np.arange(10))
    runs = sorted(p.name for p in (path / "worker=0").iterdir())
    assert len(runs) == 2 and all(r.startswith("run=") for r in runs)
    n_rows = len(log.frame) + 5 * len(log.scalars)  # stat rows, then the 5 scalars
    assert len(log.scalars) == 10
    norms = log.stat("norm")

    table = ds.dataset(path, format="parquet", partitioning="hive").to_table()
    assert table.num_rows == n_rows
    assert set(table.column("worker").to_pylist()) == {0}
    assert sorted(set(table.column("run").to_pylist())) == [r[len("run=") :] for r in runs]

    frame = pd.read_parquet(path)
    assert len(frame) == n_rows and set(frame["worker"].astype(int)) == {0}
    wide = frame[frame["stat"] == "norm"].pivot(index="step", columns="variable", values="value")
    np.testing.assert_array_equal(wide[norms.columns].to_numpy(), norms.to_numpy())

    files = str(path / "**" / "*.parquet")
    con = duckdb.connect()
    got = con.execute(
        "SELECT step, variable, value FROM read_parquet($files, hive_partitioning = true) "
        "WHERE stat = 'norm' AND worker = 0 ORDER BY step, variable",
        {"files": files},
    ).df()
    assert len(got) == norms.size
    want = norms.stack().rename("value").reset_index().sort_values(["step", "variable"])
    np.testing.assert_array_equal(got["value"].to_numpy(), want["value"].to_numpy())
    (count,) = con.execute(
        "SELECT count(DISTINCT run) FROM read_parquet($files, hive_partitioning = true)",
        {"files": files},
    ).fetchone()
    assert count == 2


def test_read_log_reads_an_old_flat_directory_and_runs_appended_to_it(tmp_path):
    from gradwatch import io

    path = tmp_path / "run"
    path.mkdir()
    x, y = data(n=40)
    model, _ = pair()
    model.compile("sgd", "mse")
    first = gradwatch.GradWatch(stats="norm")
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[first], verbose=0)
    io.append_part(first.log, path)  # parts straight in the directory: the older layout
    assert [p.name for p in path.iterdir()] == ["part-000000.parquet"]
    assert gradwatch.read_log(path) == first.log
    second = gradwatch.GradWatch(stats="norm", path=path)
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[second], verbose=0)
    log = gradwatch.read_log(path)
    np.testing.assert_array_equal(log.steps, np.arange(10))
    np.testing.assert_array_equal(log.stat("norm").loc[:4], first.log.stat("norm"))


def test_read_log_worker_argument_is_checked(tmp_path):
    log = _two_runs(tmp_path / "run")
    assert gradwatch.read_log(tmp_path / "run", worker=0) == log
    with pytest.raises(ValueError, match=r"no log of worker 1\. Received: worker=1\. .*\[0\]"):
        gradwatch.read_log(tmp_path / "run", worker=1)
    with pytest.raises(TypeError, match="Received: worker='0'"):
        gradwatch.read_log(tmp_path / "run", worker="0")
    log.to_parquet(tmp_path / "g.parquet")
    with pytest.raises(ValueError, match=r"is a file\. Received: worker=0"):
        gradwatch.read_log(tmp_path / "g.parquet", worker=0)


def test_appending_with_other_per_replica_setting_is_a_value_error(tmp_path):
    _two_runs(tmp_path / "run", per_replica=True)
    x, y = data(n=8)
    model, _ = pair()
    model.compile("sgd", "mse")
    other = gradwatch.GradWatch(stats=("norm", "max"), path=tmp_path / "run")
    with pytest.raises(
        ValueError, match=r"per_replica=True, which this GradWatch .*per_replica=False"
    ):
        model.fit(x, y, batch_size=8, callbacks=[other], verbose=0)


def test_duckdb_example_queries_a_streamed_log(tmp_path, capsys):
    example = runpy.run_path(
        str(Path(__file__).resolve().parent.parent / "examples" / "duckdb_query.py")
    )
    path = tmp_path / "grads"
    out = example["main"](str(path))
    assert "Largest gradient norm" in capsys.readouterr().out
    log = gradwatch.read_log(path)
    assert len(log) == 24  # 8 steps a epoch: two epochs, then one more in a second run
    norms = log.stat("norm").astype(np.float64)
    largest = out["largest_norms"].set_index("variable")
    for key in log.variables:
        assert largest.loc[key, "max_norm"] == pytest.approx(norms[key].max(), rel=1e-6)
        assert largest.loc[key, "at_step"] == norms[key].idxmax()
    glob = out["global_norm"]
    np.testing.assert_array_equal(glob["step"], log.steps)
    np.testing.assert_allclose(glob["global_norm"], log.global_norm(), rtol=1e-6)
    assert glob["run"].nunique() == 2
