"""TensorBoard summaries, read back with TensorBoard's own event reader."""

import keras
import numpy as np
import pytest
from models import data, pair
from reference import log10_counts
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

import gradwatch
from gradwatch import tensorboard as tb
from gradwatch._logdata.tb_summary import step_summaries


def _read(logdir):
    """{tag: {step: ndarray, "plugin": name}} from the event files under `logdir`."""
    acc = event_accumulator.EventAccumulator(
        str(logdir), size_guidance={event_accumulator.TENSORS: 0}
    )
    acc.Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        out[tag] = {e.step: tensor_util.make_ndarray(e.tensor_proto) for e in acc.Tensors(tag)}
        out[tag]["plugin"] = acc.SummaryMetadata(tag).plugin_data.plugin_name
    return out


def test_write_tensorboard_scalars_equal_the_logs_norms(fitted, tmp_path):
    log = fitted[0].log
    assert tb.write_tensorboard(log, tmp_path / "tb") == tmp_path / "tb"
    events = _read(tmp_path / "tb")
    norm = log.stat("norm")
    for key in log.variables:
        scalars = events["norm/" + key]
        assert scalars.pop("plugin") == "scalars"
        assert sorted(scalars) == log.steps.tolist()
        for step, value in scalars.items():
            assert value.dtype == np.float32 and value.shape == ()
            assert value == norm.loc[step, key]  # float32 written as float32: exact
    glob = events["global_norm"]
    glob.pop("plugin")
    expected = np.sqrt((norm.to_numpy(np.float64) ** 2).sum(axis=1))
    np.testing.assert_allclose([glob[s] for s in norm.index], expected, rtol=1e-6)


def test_write_tensorboard_histograms_match_numpy_on_kept_gradients(fitted, tmp_path):
    log = fitted[0].log  # keeps the full gradients of out/*
    tb.write_tensorboard(log, tmp_path)
    events = _read(tmp_path)
    for key in log.value_variables:
        hist = events["log10_abs_grad/" + key]
        assert hist.pop("plugin") == "histograms"
        assert sorted(hist) == log.steps.tolist()
        for step, buckets in hist.items():
            assert buckets.shape == (16 * log.bins_per_decade, 3)
            np.testing.assert_allclose(buckets[0, :2], [-12, -12 + 1 / log.bins_per_decade])
            expected = log10_counts(log.gradient(key, step), log.bins_per_decade)
            np.testing.assert_array_equal(buckets[:, 2], expected)


def test_write_tensorboard_needs_norm_or_histograms(tmp_path):
    log = gradwatch.GradientLog(stats=("mean",))
    with pytest.raises(ValueError, match=r"neither the `norm` stat nor histograms"):
        tb.write_tensorboard(log, tmp_path)


def test_gradwatch_tensorboard_dir_writes_blocks_at_the_logs_steps(tmp_path, monkeypatch):
    calls, closes = [], []
    write, close = tb.TensorBoardWriter.write, tb.TensorBoardWriter.close

    def counting(self, steps, *args, **kwargs):
        calls.append(len(steps))
        return write(self, steps, *args, **kwargs)

    def counting_close(self):
        closes.append(len(calls))
        return close(self)

    monkeypatch.setattr(tb.TensorBoardWriter, "write", counting)
    monkeypatch.setattr(tb.TensorBoardWriter, "close", counting_close)
    x, y = data(n=48)
    model, _ = pair()
    model.compile(keras.optimizers.Adam(0.01), "mse", steps_per_execution=2)
    watch = gradwatch.GradWatch(histogram=True, tensorboard_dir=tmp_path / "live")
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, callbacks=[watch], verbose=0)
    log = watch.log
    # Fed the drained blocks (one per epoch here), never one step at a time.
    assert calls == [6, 6]
    assert closes == [2]  # closed once, at train end, after both blocks
    live = _read(tmp_path / "live")
    for key in log.variables:
        norms = live["norm/" + key]
        assert sorted(s for s in norms if s != "plugin") == list(range(12))
        np.testing.assert_array_equal(
            [norms[s] for s in log.steps], log.stat("norm")[key].to_numpy()
        )
    # The command line's export of the same log writes the same summaries.
    tb.write_tensorboard(log, tmp_path / "export")
    exported = _read(tmp_path / "export")
    assert exported.keys() == live.keys()
    for tag in live:
        assert exported[tag].keys() == live[tag].keys()
        for step in live[tag]:
            np.testing.assert_array_equal(exported[tag][step], live[tag][step])


def test_gradwatch_tensorboard_dir_is_checked_in_init(tmp_path):
    with pytest.raises(TypeError, match=r"`tensorboard_dir` must be a directory path.*=3"):
        gradwatch.GradWatch(tensorboard_dir=3)
    with pytest.raises(ValueError, match=r"records neither.*tensorboard_dir='tb'"):
        gradwatch.GradWatch(stats=("mean",), tensorboard_dir="tb")
    # Histograms alone are something to write: accepted, the directory kept as a Path
    # (nothing is written before training).
    watch = gradwatch.GradWatch(stats=("mean",), histogram=True, tensorboard_dir=str(tmp_path))
    assert watch.tensorboard_dir == tmp_path and list(tmp_path.iterdir()) == []
    assert watch.stats == ("mean",) and watch.histogram == 4


def test_gradwatch_tensorboard_write_failure_warns_and_training_goes_on(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    watch = gradwatch.GradWatch(stats="norm", tensorboard_dir=blocker / "tb")
    x, y = data(n=32)
    model, _ = pair()
    model.compile("sgd", "mse")
    with pytest.warns(UserWarning, match=r"could not write TensorBoard summaries to '.*a-file"):
        model.fit(x, y, batch_size=8, epochs=2, callbacks=[watch], verbose=0)
    np.testing.assert_array_equal(watch.log.steps, np.arange(8))


def _values(summary):
    """{tag: (plugin name, value proto)} of a Summary."""
    return {v.tag: (v.metadata.plugin_data.plugin_name, v) for v in summary.value}


def test_step_summaries_hold_hand_computed_norms_and_global_norm():
    norms = np.array([[3.0, 4.0], [np.nan, 1.0]])  # "a" had no gradient at step 8
    (s7, first), (s8, second) = step_summaries([7, 8], ["a", "b"], norms)
    assert (s7, s8) == (7, 8)
    first, second = _values(first), _values(second)
    # 5 = sqrt(3**2 + 4**2); at step 8 over the variables with a norm alone.
    assert {t: v.tensor.float_val[0] for t, (_, v) in first.items()} == {
        "norm/a": 3.0,
        "norm/b": 4.0,
        "global_norm": 5.0,
    }
    assert {t: v.tensor.float_val[0] for t, (_, v) in second.items()} == {
        "norm/b": 1.0,
        "global_norm": 1.0,
    }
    # The plugin rides on each tag's first value only, and not at all where described.
    assert {t: p for t, (p, _) in first.items()} == dict.fromkeys(first, "scalars")
    assert {t: p for t, (p, _) in second.items()} == dict.fromkeys(second, "")
    ((_, again),) = step_summaries([9], ["a", "b"], norms[:1], described={"norm/a"})
    assert {t: p for t, (p, _) in _values(again).items()} == {
        "norm/a": "",
        "norm/b": "scalars",
        "global_norm": "scalars",
    }


def test_step_summaries_histograms_fold_signs_into_log10_magnitude_buckets():
    # 1 bin per decade: bins 0-15 negative (most negative first), 16 zeros, 17-32
    # positive (smallest first), 33 NaN/Inf.
    hist = np.zeros((1, 3, 34), np.int64)
    hist[0, 0, [15, 17, 32, 16, 33]] = [2, 1, 3, 4, 1]  # |g| in [1e-12, 1e-11) x3, [1e3, 1e4) x3
    hist[0, 1, 16] = 6  # only zeros: empty buckets
    # "u": no element at all (no histogram recorded for it at that step): left out.
    ((_, summary),) = step_summaries([0], ["w", "z", "u"], histograms=hist, bins_per_decade=1)
    values = _values(summary)
    assert list(values) == ["log10_abs_grad/w", "log10_abs_grad/z"]
    zeros = np.frombuffer(values["log10_abs_grad/z"][1].tensor.tensor_content, "<f8")
    np.testing.assert_array_equal(zeros.reshape(16, 3)[:, 2], 0)
    plugin, value = values["log10_abs_grad/w"]
    assert plugin == "histograms" and "log10 |g|" in value.metadata.summary_description
    buckets = np.frombuffer(value.tensor.tensor_content, "<f8").reshape(16, 3)
    assert [d.size for d in value.tensor.tensor_shape.dim] == [16, 3]
    np.testing.assert_array_equal(buckets[:, 0], np.arange(-12, 4))
    np.testing.assert_array_equal(buckets[:, 1], np.arange(-11, 5))
    np.testing.assert_array_equal(buckets[:, 2], [3] + [0] * 14 + [3])


def test_step_summaries_refuse_rows_that_do_not_match_the_steps():
    with pytest.raises(ValueError, match=r"`norms` needs one row per step: 2 steps.*\(1, 1\)"):
        step_summaries([0, 1], ["a"], norms=np.ones((1, 1)))
    with pytest.raises(ValueError, match="`histograms` need `bins_per_decade`"):
        step_summaries([0], ["a"], histograms=np.ones((1, 1, 34)))
