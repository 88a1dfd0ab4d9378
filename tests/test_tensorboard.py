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
    calls = []
    write = tb.TensorBoardWriter.write

    def counting(self, steps, *args, **kwargs):
        calls.append(len(steps))
        return write(self, steps, *args, **kwargs)

    monkeypatch.setattr(tb.TensorBoardWriter, "write", counting)
    x, y = data(n=48)
    model, _ = pair()
    model.compile(keras.optimizers.Adam(0.01), "mse", steps_per_execution=2)
    watch = gradwatch.GradWatch(histogram=True, tensorboard_dir=tmp_path / "live")
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, callbacks=[watch], verbose=0)
    log = watch.log
    # Fed the drained blocks (one per epoch here), never one step at a time.
    assert calls == [6, 6]
    assert watch._tensorboard._writer is None  # closed at train end
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
