"""GradWatch(sinks=[...]): the user's own sinks get every drained block and are closed
once per `fit`, also when it raises."""

import keras
import numpy as np
import pytest
from models import FailAt, data, layers, pair
from reference import batches_of, mse, skip_unless_supported, tape_gradients

import gradwatch

KEYS = ["net/hidden/kernel", "net/hidden/bias", "net/out/kernel", "net/out/bias"]


class Recorder:
    """A sink that keeps what it is handed, and the order of the calls."""

    def __init__(self):
        self.blocks, self.calls = [], []

    def write(self, block):
        self.blocks.append(block)
        self.calls.append("write")

    def close(self):
        self.calls.append("close")

    def joined(self, field, name=None):
        """One field of every block, concatenated along the steps."""
        parts = [
            getattr(b, field) if name is None else getattr(b, field)[name] for b in self.blocks
        ]
        return np.concatenate(parts)


@pytest.mark.parametrize(("spe", "every"), [(1, 1), (2, 2)])
@pytest.mark.backends
@pytest.mark.plain_models
def test_sinks_get_every_recorded_step_in_order_as_the_log_has_it(spe, every):
    skip_unless_supported(spe)
    x, y = data()  # 5 batches of 8: steps 0-4 in epoch 0, 5-9 in epoch 1
    model, plain = pair()
    model.compile(keras.optimizers.SGD(0.1), "mse", steps_per_execution=spe)
    sink = Recorder()
    stats = ("norm", "mean", "max", "nonfinite")
    watch = gradwatch.GradWatch(
        stats=stats, values="out/kernel", histogram=2, every=every, sinks=[sink]
    )
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, callbacks=[watch], verbose=0)

    assert sink.calls[-1] == "close" and sink.calls.count("close") == 1
    assert len(sink.blocks) >= 2  # one per epoch at least: drained at each epoch's end
    log = watch.log
    steps = np.arange(0, 10, every)
    np.testing.assert_array_equal(sink.joined("steps"), steps)
    np.testing.assert_array_equal(log.steps, steps)
    rows = log.scalars.set_index("step")
    for block in sink.blocks:
        assert block.keys == tuple(KEYS)
        assert block.bins_per_decade == 2
        assert set(rows.loc[block.steps, "epoch"]) == {block.epoch}
        np.testing.assert_array_equal(block.batches, rows.loc[block.steps, "batch"])
    for name in stats:
        np.testing.assert_array_equal(sink.joined("stats", name), log.stat(name)[KEYS])
    for name in ("loss", "learning_rate"):
        np.testing.assert_array_equal(sink.joined("scalars", name), rows[name].to_numpy())
    np.testing.assert_array_equal(sink.joined("scalars", "applied"), 1.0)
    np.testing.assert_array_equal(sink.joined("skipped"), False)
    kept = sink.joined("values", "net/out/kernel")
    assert kept.shape == (len(steps), 4, 2)
    for step, kernel in zip(steps, kept, strict=True):
        np.testing.assert_array_equal(kernel, log.gradient("net/out/kernel", step))
        for j, key in enumerate(KEYS):
            np.testing.assert_array_equal(
                sink.joined("histograms")[step // every, j], log.histogram(key, step)["count"]
            )
    # The log, and so what the sinks got, against a plain tape loop over the same batches.
    grads = tape_gradients(plain, keras.optimizers.SGD(0.1), batches_of(x, y, 8) * 2, mse)
    for step, norms in zip(steps, sink.joined("stats", "norm"), strict=True):
        expected = [np.linalg.norm(g) for g in grads[step]]
        np.testing.assert_allclose(norms, expected, rtol=1e-5)
        np.testing.assert_allclose(kept[step // every], grads[step][2], rtol=1e-5, atol=1e-7)
    # A sink cannot change what the next one, or the log, gets.
    block = sink.blocks[0]
    with pytest.raises(ValueError, match="read-only"):
        block.stats["norm"][0, 0] = 0.0
    with pytest.raises(TypeError):
        block.stats["norm"] = np.zeros(1)
    assert log.stat("norm").iloc[0, 0] == block.stats["norm"][0, 0] > 0


@pytest.mark.backends
def test_sinks_are_closed_once_per_fit_also_when_fit_raises_on_a_plain_model():
    x, y = data()
    model = keras.Sequential(layers(), name="net")  # nothing but a GradWatch
    model.compile(keras.optimizers.SGD(0.1), "mse")
    sink = Recorder()
    watch = gradwatch.GradWatch(stats="norm", sinks=[sink])
    # Step 7 is epoch 1's third: epoch 0 drained at its end, 5-7 still on the device.
    with pytest.raises(RuntimeError, match="step 7"):
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, callbacks=[watch, FailAt(7)])
    assert sink.calls == ["write", "write", "close"]
    np.testing.assert_array_equal(sink.joined("steps"), np.arange(8))
    np.testing.assert_array_equal(watch.log.steps, np.arange(8))
    assert type(model) is keras.Sequential  # released: the crash path ran
    # A later fit with the same watch writes to the sink again, and closes it again.
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[watch], verbose=0)
    assert sink.calls == ["write", "write", "close", "write", "close"]
    np.testing.assert_array_equal(sink.joined("steps"), np.arange(13))


class Broken(Recorder):
    """Raises in its second `write`, or in `close`."""

    def __init__(self, fail_in):
        super().__init__()
        self.fail_in = fail_in

    def write(self, block):
        super().write(block)
        if self.fail_in == "write" and len(self.blocks) == 2:
            raise ConnectionError("the tracker is down")

    def close(self):
        super().close()
        if self.fail_in == "close":
            raise ConnectionError("the tracker is down")


@pytest.mark.parametrize("fail_in", ["write", "close"])
def test_sinks_a_raising_sink_warns_once_and_training_goes_on(fail_in):
    x, y = data()
    model, _ = pair()
    model.compile("sgd", "mse")
    broken, healthy = Broken(fail_in), Recorder()
    watch = gradwatch.GradWatch(stats="norm", sinks=[broken, healthy])
    with pytest.warns(UserWarning) as caught:
        model.fit(x, y, batch_size=8, epochs=3, shuffle=False, callbacks=[watch], verbose=0)
    messages = [str(w.message) for w in caught if "sink" in str(w.message)]
    assert len(messages) == 1, messages
    assert f"raised ConnectionError in `{fail_in}`: the tracker is down" in messages[0]
    assert "`watch.log` keeps every step" in messages[0]
    # The broken sink got no block after its error, and was closed all the same.
    writes = 2 if fail_in == "write" else 3
    assert broken.calls == ["write"] * writes + ["close"]
    assert healthy.calls == ["write"] * 3 + ["close"]
    np.testing.assert_array_equal(healthy.joined("steps"), np.arange(15))
    np.testing.assert_array_equal(watch.log.steps, np.arange(15))


class OldStyle:
    def write(self, block, keys):
        pass

    def close(self):
        pass


class NoClose:
    def write(self, block):
        pass


_BAD_SINKS = {
    "one-sink": (lambda r: r, TypeError, r"must be a list of sinks.*pass sinks=\[sink\]"),
    "a-string": (lambda r: "tb", TypeError, r"must be a list.*Received: sinks='tb'"),
    "no-methods": (
        lambda r: [object()],
        TypeError,
        r"object lacks `write` and `close`\. Received: sinks\[0\]=<object",
    ),
    "no-close": (lambda r: [r, NoClose()], TypeError, r"NoClose lacks `close`.*sinks\[1\]"),
    "a-class": (lambda r: [Recorder], TypeError, r"not classes.*sinks=\[Recorder\(\)\]"),
    "two-arguments": (
        lambda r: [OldStyle()],
        TypeError,
        r"OldStyle\.write cannot take it\. Define it as `def write\(self, block\)",
    ),
    "twice": (lambda r: [r, r], ValueError, r"same sink twice.*sinks\[1\]"),
}


@pytest.mark.parametrize("case", _BAD_SINKS.values(), ids=_BAD_SINKS.keys())
def test_gradwatch_sinks_argument_is_checked_in_init(case):
    make, error, match = case
    with pytest.raises(error, match=match):
        gradwatch.GradWatch(sinks=make(Recorder()))


def test_gradwatch_sinks_accepts_a_list_tuple_or_none_and_shows_in_the_repr():
    sink = Recorder()
    assert gradwatch.GradWatch(sinks=(sink,)).sinks == [sink]
    assert gradwatch.GradWatch(sinks=None).sinks == [] == gradwatch.GradWatch(sinks=[]).sinks
    assert "sinks=" not in repr(gradwatch.GradWatch())
    assert isinstance(sink, gradwatch.Sink)  # the protocol, without subclassing it
