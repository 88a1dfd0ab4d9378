import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

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
