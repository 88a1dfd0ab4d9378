import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from reference import np_stats, reference_bins

import gradwatch
from gradwatch.log import GradientLog, store_of


def _odd_log():
    """A log with NaN, ±Inf, a disconnected row and two variable layouts."""
    log = GradientLog(stats=("norm", "max"))
    store = store_of(log)
    a = store.add_variables(["m/a", "m/b"], [(2,), (1, 3)])
    stats = np.array(
        [[[1.0, np.nan], [np.inf, -np.inf]], [[np.nan, np.nan], [0.5, 3e-8]]], np.float32
    )
    values = np.array([[1.0, np.nan, 2.0, 3.0, -np.inf], [0.0, 1e-30, 4.0, 5.0, 6.0]], np.float32)
    store.append(np.array([0, 1]), np.zeros(2), np.array([0, 1]), a, stats, a, values)
    c = store.add_variables(["m/c"], [()])
    store.append(
        np.array([5]),
        np.array([1]),
        np.array([0]),
        c,
        np.ones((1, 1, 2), np.float32),
        c,
        np.ones((1, 1), np.float32),
    )
    return log


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_round_trip_of_a_fitted_log(fitted, tmp_path, suffix):
    log = fitted[0].log
    path = tmp_path / f"grads.{suffix}"
    getattr(log, f"to_{suffix}")(path)
    back = gradwatch.read_log(path)
    assert back == log
    np.testing.assert_array_equal(back.gradient("out/kernel", 4), log.gradient("out/kernel", 4))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_round_trip_keeps_nan_inf_and_layouts(tmp_path, suffix):
    log = _odd_log()
    path = tmp_path / f"odd.{suffix}"
    getattr(log, f"to_{suffix}")(path)
    back = gradwatch.read_log(path)
    assert back == log
    assert back.variables == ["m/a", "m/b", "m/c"]
    assert back.shapes == {"m/a": (2,), "m/b": (1, 3), "m/c": ()}
    np.testing.assert_array_equal(back.gradient("m/b", 0), [[2.0, 3.0, -np.inf]])
    assert back.gradient("m/c", 5).shape == ()


def _read_plainly(path, suffix):
    """The written table, read without gradwatch: pandas for CSV, skipping the metadata
    line that docs/reference.md ("Files") documents (not `comment="#"`: keys may hold `#1`),
    and pyarrow for Parquet."""
    if suffix == "csv":
        with open(path, encoding="utf-8") as f:
            first = f.readline()
        assert first.startswith("# gradwatch-log {")
        table = pd.read_csv(path, skiprows=1, dtype={"variable": str, "stat": str})
        return json.loads(first[len("# gradwatch-log ") :]), table
    table = pq.read_table(path)
    return json.loads(table.schema.metadata[b"gradwatch"]), table.to_pandas()


def _rows(frame, columns):
    frame = frame[columns].astype({"variable": str, "stat": str})
    return frame.sort_values(columns[:-1], kind="stable").reset_index(drop=True)


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_written_files_hold_the_fitted_runs_values_for_plain_readers(fitted, tmp_path, suffix):
    log = fitted[0].log
    path = tmp_path / f"grads.{suffix}"
    getattr(log, f"to_{suffix}")(path)
    meta, table = _read_plainly(path, suffix)
    assert list(table.columns) == ["step", "epoch", "batch", "variable", "stat", "index", "value"]
    assert meta["variables"] == log.variables
    assert meta["stats"] == list(log.stat_names)
    table["stat"] = table["stat"].astype(str)
    # Stat rows (empty index): exactly the log's frame, float32 values bit for bit
    # (NaN cos_prev at step 0, +inf update_ratio of the zero biases included).
    scalar_names = ["loss", "learning_rate", "applied", "global_norm", "spike"]
    stat_rows = table[~table["stat"].isin(["grad", "hist", *scalar_names])]
    assert stat_rows["index"].isna().all()
    # Scalar rows: no variable, no index, the log's loss, learning rate, whether the
    # step applied (1.0 or 0.0), its global norm and spike code at each step.
    scalar_rows = table[table["stat"].isin(scalar_names)]
    assert meta["scalars"] == scalar_names
    assert scalar_rows["variable"].isna().all() and scalar_rows["index"].isna().all()
    wide = scalar_rows.pivot(index="step", columns="stat", values="value")
    for name in scalar_names:
        np.testing.assert_array_equal(
            wide[name].to_numpy(np.float32), log.scalars[name].to_numpy(np.float32), err_msg=name
        )
    assert set(wide["applied"]) == {1.0}
    cols = ["step", "epoch", "batch", "variable", "stat", "value"]
    ours, theirs = _rows(stat_rows.astype({"value": np.float32}), cols), _rows(log.frame, cols)
    assert len(ours) == 6 * 4 * len(gradwatch.STATS)  # steps x variables x stats
    for c in cols:
        np.testing.assert_array_equal(ours[c].to_numpy(), theirs[c].to_numpy(), err_msg=c)
    # Every row, kept elements and histogram bins too, carries its step's epoch and batch
    # (steps 0-2 are epoch 0, batches 0-2; steps 3-5 epoch 1).
    np.testing.assert_array_equal(table["epoch"], table["step"] // 3)
    np.testing.assert_array_equal(table["batch"], table["step"] % 3)
    assert set(table["step"]) == set(range(6))
    # Kept gradient elements: the log's tensors, flat in C order.
    grads = table[table["stat"] == "grad"]
    assert sorted(set(grads["variable"].astype(str))) == ["net/out/bias", "net/out/kernel"]
    hists = table[table["stat"] == "hist"]
    for step in range(6):
        for key in ("net/out/kernel", "net/out/bias"):
            rows = grads[(grads["step"] == step) & (grads["variable"] == key)]
            rows = rows.sort_values("index")
            shape = tuple(meta["shapes"][key])
            np.testing.assert_array_equal(rows["index"].to_numpy(), np.arange(np.prod(shape)))
            g = rows["value"].to_numpy(np.float32).reshape(shape)
            np.testing.assert_array_equal(g, log.gradient(key, step))
            # The file's own stat rows are the NumPy stats of its own gradient rows.
            here = stat_rows[(stat_rows["step"] == step) & (stat_rows["variable"] == key)]
            got = dict(zip(here["stat"], here["value"].astype(np.float64), strict=True))
            for name, value in np_stats(g).items():
                assert got[name] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, key, name)
            # And its histogram rows (bin number, count) are the reference binning of them.
            h = hists[(hists["step"] == step) & (hists["variable"] == key)]
            counts = np.zeros(2 * 16 * meta["bins_per_decade"] + 2)
            counts[h["index"].to_numpy(np.int64)] = h["value"].to_numpy()
            np.testing.assert_array_equal(counts, reference_bins(g, meta["bins_per_decade"]))


def test_parquet_is_readable_by_pyarrow_with_dictionary_columns(fitted, tmp_path):
    path = tmp_path / "g.parquet"
    fitted[0].log.to_parquet(path)
    table = pq.read_table(path)
    assert table.column_names == ["step", "epoch", "batch", "variable", "stat", "index", "value"]
    assert pa.types.is_dictionary(table.schema.field("variable").type)
    assert pa.types.is_dictionary(table.schema.field("stat").type)
    meta = json.loads(table.schema.metadata[b"gradwatch"])
    assert meta["format"] == "gradwatch-log" and meta["variables"][0] == "net/hidden/kernel"


def test_write_into_missing_directory_is_an_oserror_naming_the_path(fitted, tmp_path):
    target = tmp_path / "nope" / "g.csv"
    with pytest.raises(OSError, match=r"nope/g\.csv.*does not exist"):
        fitted[0].log.to_csv(target)
    with pytest.raises(OSError, match=r"nope/g\.parquet"):
        fitted[0].log.to_parquet(tmp_path / "nope" / "g.parquet")
    assert len(fitted[0].log) == 6  # nothing recorded is lost


def test_write_into_unwritable_place_is_an_oserror(fitted):
    with pytest.raises(OSError, match=r"/proc/gradwatch\.csv"):
        fitted[0].log.to_csv("/proc/gradwatch.csv")


def test_write_onto_a_directory_is_an_oserror(fitted, tmp_path):
    with pytest.raises(OSError, match="is a directory"):
        fitted[0].log.to_parquet(tmp_path)


def test_read_log_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.parquet.*does not exist"):
        gradwatch.read_log(tmp_path / "missing.parquet")


def test_read_log_rejects_files_that_are_not_gradwatch_logs(tmp_path):
    plain = tmp_path / "plain.csv"
    plain.write_text("step,value\n0,1.0\n")
    with pytest.raises(ValueError, match="not a gradwatch log: its first line"):
        gradwatch.read_log(plain)
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"step": [0]}), other)
    with pytest.raises(ValueError, match="no 'gradwatch' metadata"):
        gradwatch.read_log(other)
    binary = tmp_path / "bin.csv"
    binary.write_bytes(os.urandom(64) + b"\xff\xfe")
    with pytest.raises(ValueError, match="not a gradwatch log"):
        gradwatch.read_log(binary)
    broken = tmp_path / "broken.csv"
    broken.write_text('# gradwatch-log {"format": "gradwatch-log", "version": 1, "variables": []')
    with pytest.raises(ValueError, match="metadata is not JSON"):
        gradwatch.read_log(broken)
    cols = tmp_path / "cols.csv"
    meta = {"format": "gradwatch-log", "version": 1, "variables": [], "stats": [], "shapes": {}}
    cols.write_text("# gradwatch-log " + json.dumps(meta) + "\nstep,value\n0,1\n")
    with pytest.raises(ValueError, match=r"lacks the columns \['epoch', 'batch', 'variable'"):
        gradwatch.read_log(cols)
    newer = tmp_path / "newer.csv"
    newer.write_text("# gradwatch-log " + json.dumps({**meta, "version": 99}) + "\n")
    with pytest.raises(ValueError, match="version 99"):
        gradwatch.read_log(newer)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_log_files_get_the_modes_of_any_file_the_user_writes(fitted, tmp_path, umask):
    from models import data, pair

    old = os.umask(umask)
    try:
        expected = 0o666 & ~umask  # what `open(..., "w")` makes under this umask
        with open(tmp_path / "plain.txt", "w"):
            pass
        assert os.stat(tmp_path / "plain.txt").st_mode & 0o777 == expected
        fitted[0].log.to_csv(tmp_path / "log.csv")
        fitted[0].log.to_parquet(tmp_path / "log.parquet")
        x, y = data(n=8)
        model, _ = pair()
        model.compile("sgd", "mse")
        model.fit(
            x, y, batch_size=4, callbacks=[gradwatch.GradWatch(path=tmp_path / "s")], verbose=0
        )
    finally:
        os.umask(old)
    written = [tmp_path / "log.csv", tmp_path / "log.parquet"]
    written += sorted((tmp_path / "s").rglob("part-*.parquet"))
    assert len(written) == 3
    assert {str(p): os.stat(p).st_mode & 0o777 for p in written} == {
        str(p): expected for p in written
    }
    assert not list(tmp_path.rglob("*.tmp"))
