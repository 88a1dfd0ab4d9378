"""GradWatch(track=...): MLflow and W&B get every recorded step's global norm, loss,
learning rate and per-layer norms in the user's run, and the findings and the report at
the end of `fit`; read back from the trackers' own stores (MLflow's SQLite store, W&B's
offline run files), against the log."""

import json
import struct
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from components import HANG, require
from models import data, layers

import gradwatch
from gradwatch.findings import count_line, findings_text

LAYERS = ("net/hidden", "net/out")
pytestmark = [
    # MLflow's SQL store asks SQLAlchemy 2.1 for a loader strategy it deprecates.
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated"),
]


def installed(name):
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def model_and_data():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(layers(), name="net")
    model.compile(keras.optimizers.Adam(0.01), "mse")
    return model, *data()  # 5 batches of 8: steps 0-4 in epoch 0, 5-9 in epoch 1


def expected_metrics(log):
    """What the trackers must hold, computed here from the log: the global norm
    (`log.global_norm()`), the loss and the learning rate (`log.scalars`), and each
    layer's norm by hand from its variables' norms (the key's path less its last part)."""
    scalars = log.scalars.set_index("step")
    norms = log.stat("norm")
    out = {
        "gradwatch/global_norm": log.global_norm().astype(float),
        "gradwatch/loss": scalars["loss"].astype(float),
        "gradwatch/learning_rate": scalars["learning_rate"].astype(float),
    }
    for layer in LAYERS:
        columns = [k for k in norms.columns if k.rpartition("/")[0] == layer]
        assert len(columns) == 2  # kernel and bias
        squares = norms[columns].astype(float) ** 2
        out[f"gradwatch/norm/{layer}"] = np.sqrt(squares.sum(axis=1))
    return out


def assert_same_series(got, expected, name):
    """`got` {step: value} against the log's series: every step, the log's values."""
    steps = expected.index.to_numpy()
    assert sorted(got) == steps.tolist(), name
    values = np.array([got[s] for s in steps])
    if name.startswith("gradwatch/norm/"):  # summed here in another order
        np.testing.assert_allclose(values, expected.to_numpy(), rtol=1e-12, err_msg=name)
    else:
        np.testing.assert_array_equal(values, expected.to_numpy(), err_msg=name)


# ----------------------------------------------------------------------------- MLflow


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """A local SQLite tracking store, its artifacts under the test's directory."""
    require(installed("mlflow") and installed("sqlalchemy"), "mlflow is not installed")
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    experiment = mlflow.create_experiment("gradwatch", artifact_location=str(root / "artifacts"))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_EXPERIMENT_ID", experiment)  # where a run starts
        yield mlflow, root
        if mlflow.active_run() is not None:
            mlflow.end_run()
    mlflow.set_tracking_uri(before)


@pytest.fixture(scope="module")
def mlflow_fit(mlflow_store):
    mlflow, _ = mlflow_store
    model, x, y = model_and_data()
    with mlflow.start_run() as run:
        watch = gradwatch.GradWatch(track="mlflow")
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, callbacks=[watch], verbose=0)
    return watch.log, run.info.run_id, mlflow.MlflowClient()


def test_mlflow_gets_every_steps_norms_loss_and_learning_rate(mlflow_fit):
    log, run_id, client = mlflow_fit
    assert len(log) == 10
    for name, series in expected_metrics(log).items():
        history = client.get_metric_history(run_id, name)
        got = {m.step: m.value for m in history}
        assert len(history) == len(got)  # each step once
        assert_same_series(got, series, name)
    names = set(client.get_run(run_id).data.metrics)
    assert {n for n in names if n.startswith("gradwatch/")} == set(expected_metrics(log))


def test_mlflow_gets_the_findings_and_the_report(mlflow_fit, tmp_path):
    log, run_id, client = mlflow_fit
    findings = log.diagnose()
    severities = set(findings["severity"])
    expected = next((s for s in ("error", "warning", "info") if s in severities), "ok")
    tags = client.get_run(run_id).data.tags
    assert tags["gradwatch.verdict"] == expected
    assert tags["gradwatch.findings"] == count_line(findings)
    files = {f.path for f in client.list_artifacts(run_id, "gradwatch")}
    assert files == {
        "gradwatch/findings.txt",
        "gradwatch/findings.json",
        "gradwatch/report.html",
    }
    local = Path(client.download_artifacts(run_id, "gradwatch", str(tmp_path)))
    assert (local / "findings.txt").read_text() == findings_text(findings)
    assert [f["finding"] for f in json.loads((local / "findings.json").read_text())] == list(
        findings["finding"]
    )
    page = (local / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "net/hidden/kernel" in page


class DeleteRun(keras.callbacks.Callback):
    """Deletes MLflow's active run at the start of an epoch, once the steps logged so far
    are in the store (MLflow logs them in the background): the store then refuses it."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch, self.run_id = epoch, None

    def on_epoch_begin(self, epoch, logs=None):
        import mlflow

        if epoch == self.epoch:
            self.run_id = mlflow.active_run().info.run_id
            mlflow.flush_async_logging()
            mlflow.MlflowClient().delete_run(self.run_id)


def test_mlflow_without_a_run_starts_one_and_a_failed_store_warns_once(mlflow_store):
    mlflow, _ = mlflow_store
    assert mlflow.active_run() is None
    model, x, y = model_and_data()
    watch = gradwatch.GradWatch(track="mlflow")
    delete = DeleteRun(epoch=1)
    with pytest.warns(UserWarning, match="could not log the recorded steps to MLflow") as caught:
        model.fit(x, y, batch_size=8, epochs=3, shuffle=False, callbacks=[watch, delete], verbose=0)
    assert sum("MLflow" in str(w.message) for w in caught) == 1
    # MLflow's convention: logging without an active run starts one, left active.
    run = mlflow.active_run()
    assert run is not None and run.info.run_id == delete.run_id
    mlflow.MlflowClient().restore_run(delete.run_id)  # a deleted run cannot be ended
    mlflow.end_run()
    # Training went on, and the log kept every step; MLflow got the first epoch's.
    assert watch.log.steps.tolist() == list(range(15))
    history = mlflow.MlflowClient().get_metric_history(delete.run_id, "gradwatch/global_norm")
    assert sorted(m.step for m in history) == [0, 1, 2, 3, 4]


def test_mlflow_without_the_norm_stat_gets_the_scalars_and_the_findings(mlflow_store):
    mlflow, _ = mlflow_store
    model, x, y = model_and_data()
    with pytest.warns(UserWarning, match=r"sends no per-layer norms and no HTML report without"):
        watch = gradwatch.GradWatch(stats=["max", "nonfinite"], track="mlflow")
    with mlflow.start_run() as run:
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, callbacks=[watch], verbose=0)
    client, run_id = mlflow.MlflowClient(), run.info.run_id
    scalars = watch.log.scalars.set_index("step")
    assert scalars.index.tolist() == [0, 1, 2, 3, 4]
    # The global norm is the spike judge's, as `log.scalars` has it.
    for name in ("global_norm", "loss", "learning_rate"):
        got = {m.step: m.value for m in client.get_metric_history(run_id, f"gradwatch/{name}")}
        assert_same_series(got, scalars[name].astype(float), name)
    assert not any(n.startswith("gradwatch/norm/") for n in client.get_run(run_id).data.metrics)
    files = {f.path for f in client.list_artifacts(run_id, "gradwatch")}
    assert files == {"gradwatch/findings.txt", "gradwatch/findings.json"}  # no report


# -------------------------------------------------------------------------------- W&B


def wandb_records(run_dir):
    """The records of a run's `.wandb` transaction log, as W&B writes it: a LevelDB log
    (32 KiB blocks of records, each a CRC, a length, a type and data; a record split over
    blocks is FIRST, MIDDLE..., LAST) after a 7-byte header, each record a `Record` proto."""
    from wandb.proto import wandb_internal_pb2

    (path,) = Path(run_dir).glob("run-*.wandb")
    data, block, head = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    records, pending, pos = [], b"", head
    while pos + head <= len(data):
        room = block - pos % block
        if room < head:  # the block's trailer
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + head])
        if kind == 0:  # zero padding to the end of the block
            pos += room
            continue
        chunk, pos = data[pos + head : pos + head + length], pos + head + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def item_key(item):
    return item.key or "/".join(item.nested_key)


def wandb_history(records):
    """Each history row of the transaction log, as {key: value}."""
    return [
        {item_key(i): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]


@pytest.fixture(scope="module")
def wandb_env(tmp_path_factory):
    require(installed("wandb"), "wandb is not installed")
    import wandb

    root = tmp_path_factory.mktemp("wandb")
    with pytest.MonkeyPatch.context() as env:
        # Offline: the run's files stay under `root`, and nothing reaches the network.
        for name, value in {
            "WANDB_MODE": "offline",
            "WANDB_DIR": str(root),
            "WANDB_SILENT": "true",
            "WANDB_CONFIG_DIR": str(root / "config"),
            "WANDB_CACHE_DIR": str(root / "cache"),
            "WANDB_DATA_DIR": str(root / "data"),
        }.items():
            env.setenv(name, value)
        yield wandb, root
        wandb.teardown()  # stops W&B's service process


def wandb_init(wandb, root):
    settings = wandb.Settings(
        mode="offline",
        silent=True,
        console="off",  # leaves pytest's capture of stdout alone
        disable_git=True,
        save_code=False,
        x_disable_stats=True,
        x_disable_machine_info=True,
        init_timeout=HANG,  # bounds a hang, never the work
        finish_timeout=HANG,
        finish_timeout_raises=True,
    )
    return wandb.init(project="gradwatch", dir=str(root), settings=settings)


@pytest.fixture(scope="module")
def wandb_fit(wandb_env):
    wandb, root = wandb_env
    model, x, y = model_and_data()
    run = wandb_init(wandb, root)
    try:
        run.log({"mine": 1.0})  # the user's own row comes before gradwatch's
        watch = gradwatch.GradWatch(track="wandb")
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, callbacks=[watch], verbose=0)
    finally:
        run.finish()
    run_dir = Path(run.dir).parent
    return watch.log, run_dir, wandb_records(run_dir)


def test_wandb_gets_every_steps_norms_loss_and_learning_rate(wandb_fit):
    log, _, records = wandb_fit
    rows = [r for r in wandb_history(records) if "gradwatch/step" in r]
    assert [r["gradwatch/step"] for r in rows] == log.steps.tolist()
    expected = expected_metrics(log)
    for name, series in expected.items():
        got = {r["gradwatch/step"]: r[name] for r in rows}
        assert_same_series(got, series, name)
    for row in rows:
        assert {k for k in row if k.startswith("gradwatch/")} == {"gradwatch/step", *expected}
    # gradwatch's step is the x-axis of its metrics (its own, beside W&B's `_step`).
    metrics = [r.metric for r in records if r.WhichOneof("record_type") == "metric"]
    assert any(m.glob_name == "gradwatch/*" and m.step_metric == "gradwatch/step" for m in metrics)


def test_wandb_gets_the_findings_and_the_report(wandb_fit):
    log, run_dir, records = wandb_fit
    findings = log.diagnose()
    severities = set(findings["severity"])
    expected = next((s for s in ("error", "warning", "info") if s in severities), "ok")
    summary = {
        item_key(u): json.loads(u.value_json)
        for r in records
        if r.WhichOneof("record_type") == "summary"
        for u in r.summary.update
    }
    assert summary["gradwatch/verdict"] == expected
    assert summary["gradwatch/findings"] == count_line(findings)
    saved = {
        f.path for r in records if r.WhichOneof("record_type") == "files" for f in r.files.files
    }
    assert {"gradwatch/findings.txt", "gradwatch/findings.json", "gradwatch/report.html"} <= saved
    files = run_dir / "files" / "gradwatch"
    assert (files / "findings.txt").read_text() == findings_text(findings)
    page = (files / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "net/hidden/kernel" in page


class FinishRun(keras.callbacks.Callback):
    """Finishes W&B's run at the start of an epoch, as a user's code might."""

    def __init__(self, run, epoch):
        super().__init__()
        self.run, self.epoch = run, epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            self.run.finish()


def test_wandb_run_finished_while_training_warns_once_and_training_goes_on(wandb_env):
    wandb, root = wandb_env
    model, x, y = model_and_data()
    run = wandb_init(wandb, root)
    watch = gradwatch.GradWatch(track="wandb")
    try:
        with pytest.warns(UserWarning, match="could not log the recorded steps to W&B") as caught:
            model.fit(
                x, y, batch_size=8, epochs=3, shuffle=False, verbose=0,
                callbacks=[watch, FinishRun(run, epoch=1)],
            )  # fmt: skip
    finally:
        run.finish()  # where the callback did not (a second finish does nothing)
    assert sum("W&B" in str(w.message) for w in caught) == 1
    assert watch.log.steps.tolist() == list(range(15))
    rows = [r for r in wandb_history(wandb_records(Path(run.dir).parent)) if "gradwatch/step" in r]
    assert [r["gradwatch/step"] for r in rows] == [0, 1, 2, 3, 4]  # the first epoch's
    # The next `fit` looks for the run again, and there is none.
    assert wandb.run is None
    with pytest.raises(RuntimeError, match=r"Call `wandb.init\(\)` before"):
        model.fit(x, y, batch_size=8, epochs=1, callbacks=[watch], verbose=0)
    assert watch.log.steps.tolist() == list(range(15))


def test_wandb_without_a_run_is_an_error_that_says_to_call_init(wandb_env):
    wandb, _ = wandb_env
    assert wandb.run is None
    with pytest.raises(RuntimeError, match=r"Call `wandb.init\(\)` before"):
        gradwatch.GradWatch(track="wandb")


# ------------------------------------------------------------------------ the argument


@pytest.mark.parametrize(
    ("track", "error", "match"),
    [
        ("neptune", ValueError, r"unknown tracker 'neptune'. Received: track='neptune'"),
        (["mlflow", "mlflow"], ValueError, r"names a tracker twice"),
        (("wandb", 3), TypeError, r"Received: track=\('wandb', 3\)"),
        ({"mlflow"}, TypeError, r"must be None, 'mlflow' or 'wandb', or a list of them"),
    ],
)
def test_track_refuses_what_it_cannot_take(track, error, match):
    with pytest.raises(error, match=match):
        gradwatch.GradWatch(track=track)


@pytest.mark.parametrize("name", ["mlflow", "wandb"])
def test_track_without_the_library_names_the_extra(name, monkeypatch):
    # `None` in sys.modules makes Python's import raise ImportError, as if not installed.
    monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=rf"pip install 'gradwatch\[{name}\]'"):
        gradwatch.GradWatch(track=name)


def test_a_watch_without_track_imports_no_tracker(monkeypatch):
    for name in ("mlflow", "wandb"):
        monkeypatch.setitem(sys.modules, name, None)  # importing either would raise
    model, x, y = model_and_data()
    watch = gradwatch.GradWatch()
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[watch], verbose=0)
    assert len(watch.log) == 5
