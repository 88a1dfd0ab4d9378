"""Experiment trackers as sinks (`GradWatch(track=...)`): MLflow and W&B get, in the run
the user has open, each recorded step's global norm, loss, learning rate and per-layer
norms, and at the end of each `fit` the doctor's findings and the HTML report.

Each tracker's library is imported only when `track` names it (the `mlflow` and `wandb`
extras). A tracker that fails warns once and gets nothing more in that `fit`; training
goes on, and `watch.log` keeps every step.
"""

from __future__ import annotations

import glob
import importlib
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradwatch._logdata.views import global_norms, layer_of_key
from gradwatch.sinks import SinkBlock

#: The trackers `track` takes, each the name of its library and of its extra.
TRACKERS = ("mlflow", "wandb")
#: What each tracker is sent under: `gradwatch/<name>`, and `gradwatch/norm/<layer>`.
PREFIX = "gradwatch/"
# MLflow takes names of these characters alone (its portable set, without Windows' colon).
_NOT_MLFLOW = re.compile(r"[^/\w.\- ]")
# MLflow takes at most 1000 metrics in one `log_batch`.
_MLFLOW_BATCH = 1000


def check_track(value: Any) -> tuple[str, ...]:
    """`GradWatch(track=...)`: None, a tracker's name, or a list or tuple of them; each
    tracker's library importable (else an ImportError naming its extra)."""
    accepted = f"None, {' or '.join(map(repr, TRACKERS))}, or a list of them"
    if value is None:
        return ()
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"`track` must be {accepted}. Received: track={value!r}")
    for name in names:
        if name not in TRACKERS:
            raise ValueError(
                f"`track` names an unknown tracker {name!r}. Received: track={value!r}. "
                f"Accepted: {accepted}."
            )
    if len(set(names)) < len(names):
        raise ValueError(
            f"`track` names a tracker twice, which would get every step twice. "
            f"Received: track={value!r}. Name each once."
        )
    for name in names:
        library(name)
    return tuple(names)


def library(name: str) -> Any:
    """The tracker's library, imported (only `track` imports it)."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(
            f"GradWatch(track={name!r}) needs the `{name}` package, which could not be "
            f"imported ({e}). Install it with: pip install 'gradwatch[{name}]'"
        ) from e


def make_trackers(watch: Any, log_of: Callable[[], Any]) -> list[Tracker]:
    """The trackers of `watch.track`, in its order; `log_of()` gives the watch's log."""
    stats = list(watch.stats)
    if watch.track and "norm" not in stats:
        warnings.warn(
            f"GradWatch(track={list(watch.track)}) sends no per-layer norms and no HTML "
            f"report without the `norm` stat (stats={stats}); it sends the loss, the "
            "learning rate, the global norm where the spike judge has it (on_spike other "
            "than 'ignore') and the findings. Add 'norm' to `stats` for the rest.",
            stacklevel=3,
        )
    kinds = {"mlflow": MlflowTracker, "wandb": WandbTracker}
    return [kinds[name](log_of) for name in watch.track]


def step_metrics(block: SinkBlock, layers: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """What a tracker gets of a block: each name's value at each of its steps, float64
    `(k,)`: the global norm (`log.global_norm()`, or the spike judge's without the `norm`
    stat), the loss, the learning rate, and each layer's norm (`sqrt` of the sum of its
    variables' squared norms, NaN ones left out as `log.global_norm()` leaves them).

    Example:

    >>> block = SinkBlock(
    ...     steps=np.array([0]), epoch=0, batches=np.array([0]),
    ...     keys=("m/d/kernel", "m/d/bias"), stats={"norm": np.array([[3.0, 4.0]], "float32")},
    ... )
    >>> metrics = step_metrics(block, {"m/d": [0, 1]})
    >>> {name: v.tolist() for name, v in metrics.items()}  # doctest: +NORMALIZE_WHITESPACE
    {'gradwatch/global_norm': [5.0], 'gradwatch/loss': [nan],
     'gradwatch/learning_rate': [nan], 'gradwatch/norm/m/d': [5.0]}
    """
    norms = block.stats.get("norm")
    scalars = block.scalars
    out: dict[str, np.ndarray] = {}
    if norms is not None:
        out[PREFIX + "global_norm"] = global_norms(norms)
    elif "global_norm" in scalars and not np.isnan(scalars["global_norm"]).all():
        out[PREFIX + "global_norm"] = np.asarray(scalars["global_norm"], np.float64)
    for name in ("loss", "learning_rate"):
        out[PREFIX + name] = np.asarray(scalars[name], np.float64)
    if norms is not None:
        for layer, columns in layers.items():
            out[f"{PREFIX}norm/{layer}"] = global_norms(norms[:, columns])
    return out


def layer_columns(keys: Sequence[str]) -> dict[str, list[int]]:
    """Each layer's columns among `keys`, the layers in the order of their first key."""
    layers: dict[str, list[int]] = {}
    for j, key in enumerate(keys):
        layers.setdefault(layer_of_key(key), []).append(j)
    return layers


def verdict(findings: Any) -> str:
    """The doctor's verdict in one word: the most severe finding's severity (`"error"`,
    `"warning"`, `"info"`), or `"ok"` where there is none."""
    from gradwatch.diagnose import SEVERITIES  # most severe first

    present = set(findings["severity"])
    return next((s for s in SEVERITIES if s in present), "ok")


class Tracker:
    """A tracker as a sink: `begin` at the start of each `fit` finds the run, `write`
    sends each block's steps, `close` the findings and the report. The library's
    errors warn once and stop the tracker for the rest of the `fit`."""

    name = ""

    def __init__(self, log_of: Callable[[], Any]):
        self.log_of = log_of
        self.failed = False
        self.active = False  # between `begin` and `close`
        self._layers: tuple[tuple[str, ...], dict[str, list[int]]] = ((), {})

    def begin(self) -> None:
        self.failed = False
        self.open_run()
        self.active = True

    def write(self, block: SinkBlock) -> None:
        if not self.active or self.failed or not len(block):
            return
        if self._layers[0] != block.keys:
            self._layers = (block.keys, layer_columns(block.keys))
        metrics = step_metrics(block, self._layers[1])
        try:
            self.send(block.steps, metrics)
        except Exception as e:  # the tracker's library: training goes on without it
            self._failed("could not log the recorded steps", e)

    def close(self) -> None:
        if not self.active:
            return
        self.active = False
        if self.failed:
            return
        try:
            self.flush()
        except Exception as e:
            self._failed("could not log the recorded steps", e)
            return
        log = self.log_of()
        if not len(log):
            return
        try:
            findings = log.diagnose()
        except Exception as e:  # as at the end of `fit`: never costs the training its end
            warnings.warn(
                f"GradWatch could not diagnose the run for {self.title}: {e!r}; it sends "
                "no findings and no report.",
                stacklevel=3,
            )
            return
        from gradwatch.findings import count_line, findings_json, findings_text

        summary = {PREFIX + "verdict": verdict(findings), PREFIX + "findings": count_line(findings)}
        texts = {"findings.txt": findings_text(findings), "findings.json": findings_json(findings)}
        with tempfile.TemporaryDirectory(prefix="gradwatch-") as directory:
            files = {}
            for name, text in texts.items():
                files[name] = Path(directory) / name
                files[name].write_text(text, encoding="utf-8")
            report = Path(directory) / "report.html"
            if self.make_report(log, report):
                files["report.html"] = report
            try:
                self.send_end(summary, files)
            except Exception as e:  # the tracker's library
                self._failed("could not send the findings and the report", e)

    def make_report(self, log: Any, path: Path) -> bool:
        """Writes the HTML report to `path`; where it cannot be made (no `norm` stat, no
        matplotlib), warns and returns False: the rest is sent all the same."""
        if "norm" not in log.stat_names:
            return False  # said when the watch was made (`make_trackers`)
        try:
            from gradwatch.report import write_report

            write_report(log, path, title="gradwatch report")
        except Exception as e:
            warnings.warn(
                f"GradWatch could not make the HTML report for {self.title} ({e!r}); "
                "it sends the steps and the findings without it.",
                stacklevel=4,
            )
            return False
        return True

    @property
    def title(self) -> str:
        return {"mlflow": "MLflow", "wandb": "W&B"}[self.name]

    def _failed(self, what: str, e: Exception) -> None:
        self.failed = True
        warnings.warn(
            f"GradWatch {what} to {self.title}: {type(e).__name__}: {e}. It sends "
            f"nothing more to {self.title} in this `fit`; training goes on, and "
            "`watch.log` keeps every step.",
            stacklevel=4,
        )

    # What each tracker does.
    def open_run(self) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Waits for the steps sent in the background; raises the tracker's error."""

    def send(self, steps: np.ndarray, metrics: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def send_end(self, summary: dict[str, str], files: dict[str, Path]) -> None:
        """The end of a `fit`: the verdict and the count of findings (tags, summary),
        and the files (`findings.txt`, `findings.json`, `report.html`) under `gradwatch/`."""
        raise NotImplementedError


class MlflowTracker(Tracker):
    """Logs into MLflow's active run; without one, starts one as `mlflow.log_metric`
    does (`mlflow.start_run()`) and leaves it active. A name's characters that MLflow
    does not take (`@`, `#`) become `.`.

    The steps go through MLflow's asynchronous logging (`log_batch(synchronous=False)`),
    so that its store's writes run beside the training; one block at a time is in
    flight: the next one, and the end of `fit`, first wait for it (and raise its error).
    """

    name = "mlflow"

    def __init__(self, log_of: Callable[[], Any]):
        super().__init__(log_of)
        self.mlflow = library("mlflow")
        self.client: Any = None
        self.run_id = ""
        self.pending: list[Any] = []  # the `RunOperations` of the block in flight

    def open_run(self) -> None:
        mlflow = self.mlflow
        run = mlflow.active_run() or mlflow.start_run()
        self.run_id = run.info.run_id
        self.client = mlflow.MlflowClient()

    def send(self, steps: np.ndarray, metrics: dict[str, np.ndarray]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [
            Metric(mlflow_name(name), float(v), now, int(step))
            for name, values in metrics.items()
            for step, v in zip(steps.tolist(), values.tolist(), strict=True)
        ]
        self.flush()
        self.pending = [
            self.client.log_batch(
                self.run_id, metrics=rows[i : i + _MLFLOW_BATCH], synchronous=False
            )
            for i in range(0, len(rows), _MLFLOW_BATCH)
        ]

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        for operations in pending:
            operations.wait()

    def send_end(self, summary: dict[str, str], files: dict[str, Path]) -> None:
        for name, value in summary.items():  # tags: `gradwatch.verdict`, `gradwatch.findings`
            self.client.set_tag(self.run_id, name.replace("/", "."), value)
        for path in files.values():
            self.client.log_artifact(self.run_id, str(path), "gradwatch")


def mlflow_name(name: str) -> str:
    """The name as MLflow takes it: each character it does not take becomes `.`.

    Example:

    >>> mlflow_name("gradwatch/norm/model/dense@1")
    'gradwatch/norm/model/dense.1'
    """
    return _NOT_MLFLOW.sub(".", name)


class WandbTracker(Tracker):
    """Logs into `wandb.run`, which must be open (`wandb.init()`) when the watch is made
    and at the start of each `fit`, as W&B's own Keras callbacks ask. Each recorded step
    is one `run.log` row with `gradwatch/step`, the x-axis of every `gradwatch/*` metric
    (`define_metric`), so that gradwatch's steps never clash with W&B's own `_step`."""

    name = "wandb"

    def __init__(self, log_of: Callable[[], Any]):
        super().__init__(log_of)
        self.wandb = library("wandb")
        self.run: Any = None
        self.current_run()  # W&B's Keras callbacks ask for the run when they are made

    def current_run(self) -> Any:
        run = self.wandb.run
        if run is None:
            raise RuntimeError(
                "GradWatch(track='wandb') logs into the open W&B run, and there is none. "
                "Call `wandb.init()` before making the GradWatch and before `fit`, as "
                "W&B's Keras callbacks ask."
            )
        return run

    def open_run(self) -> None:
        run = self.current_run()
        run.define_metric(PREFIX + "step")
        run.define_metric(PREFIX + "*", step_metric=PREFIX + "step")
        self.run = run

    def send(self, steps: np.ndarray, metrics: dict[str, np.ndarray]) -> None:
        names = list(metrics)
        columns = [metrics[n].tolist() for n in names]
        for i, step in enumerate(steps.tolist()):
            row: dict[str, Any] = {PREFIX + "step": step}
            row.update((n, c[i]) for n, c in zip(names, columns, strict=True))
            self.run.log(row)

    def send_end(self, summary: dict[str, str], files: dict[str, Path]) -> None:
        run = self.run
        run.summary.update(summary)
        # Into the run's files directory, which W&B stores (offline too) and uploads.
        directory = Path(run.dir) / "gradwatch"
        directory.mkdir(parents=True, exist_ok=True)
        for name, path in files.items():
            target = directory / name
            shutil.copyfile(path, target)
            run.save(glob.escape(str(target)), base_path=run.dir, policy="now")
