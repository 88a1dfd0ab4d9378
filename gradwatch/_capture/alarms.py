"""The alarms of a watch: NaN/Inf gradients and norms beyond `max_norm`/`min_norm`.

Two sources feed them: the recorded stats of each drained block (free, where every
step is recorded), and the every-step check in the step (`gradwatch._stats.derived`),
whose device values (`Alarm`) are polled after each execution. What trips becomes
alerts in the store, and a warning, a stop or an error, by policy.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

from gradwatch._backend import current as _backend
from gradwatch._capture.state_metric import StateMetric
from gradwatch._logdata.store import SCALARS, Store
from gradwatch._ui.text import origin_text
from gradwatch.buffer import Drained

#: What a watch does when an alarm trips (`on_threshold`).
AlarmPolicy = Literal["ignore", "warn", "stop", "raise"]
POLICIES = ("ignore", "warn", "stop", "raise")
#: What a watch does with a step whose gradients hold NaN/Inf (`on_nonfinite`): also
#: `"skip"`, which keeps the step's update from the model and trains on.
NonfinitePolicy = Literal["ignore", "warn", "skip", "stop", "raise"]
NONFINITE_POLICIES = ("ignore", "warn", "skip", "stop", "raise")
#: The `on_nonfinite` policies that keep a non-finite step's update from the model.
KEEPS_MODEL = ("skip", "stop", "raise")


class Alarm(StateMetric):
    """The every-step check's device values: how many steps tripped each check, and
    the first such step with each variable's sum of squares there. A metric, so that
    on JAX its variables travel in the stateless step's state; each backend makes
    the values (`current.alarm_cell`)."""

    def __init__(self, n: int):
        super().__init__(name="gradwatch_alarm")
        self.n = n  # rows of the plan it checks
        index = _backend.INDEX_DTYPE

        def cell(shape, dtype, name, value=0):
            return _backend.alarm_cell(self, shape, dtype, value, name)

        self.tripped = cell((2,), index, "tripped")  # [nonfinite, threshold]
        self.nonfinite_step = cell((), index, "nonfinite_step", -1)
        self.nonfinite_sq = cell((n,), "float32", "nonfinite_sq")
        self.threshold_step = cell((), index, "threshold_step", -1)
        self.threshold_sq = cell((n,), "float32", "threshold_sq")


class Alarms:
    """A watch's alarm policy and what it has seen.

    Args:
        on_nonfinite, on_threshold: The policies (see `GradWatch`).
        max_norm, min_norm: The norm thresholds, or None.
        every: The watch's `every`.
        stats: The watch's stats.
    """

    def __init__(self, on_nonfinite, on_threshold, max_norm, min_norm, every, stats, spikes=None):
        self.on_nonfinite = on_nonfinite
        # The spike judge (`_capture.spikes.SpikeJudge`), or None.
        self.spikes = spikes
        self.on_threshold = on_threshold
        self.max_norm = max_norm
        self.min_norm = min_norm
        self.thresholds = max_norm is not None or min_norm is not None
        # Where the recorded stats see every step, a warning can come from them, at no
        # cost in the step; stop and raise, and steps that `every` skips, need the
        # check that runs in every step.
        self.nonfinite_from_stats = every == 1 and "nonfinite" in stats
        self.threshold_from_stats = every == 1 and "norm" in stats
        self.stats = tuple(stats)
        # A policy that ends `fit` when its check trips.
        self.ends_fit = (
            on_nonfinite in ("stop", "raise")
            or (self.thresholds and on_threshold in ("stop", "raise"))
            or (spikes is not None and spikes.policy in ("stop", "raise"))
        )
        self.checks_every_step = (
            self.ends_fit
            or (on_nonfinite in ("warn", "skip") and not self.nonfinite_from_stats)
            or (self.thresholds and on_threshold == "warn" and not self.threshold_from_stats)
        )
        self.alarm: Alarm | None = None
        # `step -> (stage, layer, op, rows, samples, detail)` of a replayed kept step,
        # or None (set by the watch).
        self.origin_of: Callable[[int], tuple | None] = lambda step: None
        self._warned: set[str] = set()
        # A spike that stops training was polled: the watch drains, for its alert.
        self.spike_pending = False
        self._seen = {"nonfinite": 0, "threshold": 0}
        self._pending: list[str] = []
        self._error: FloatingPointError | None = None

    def alarm_for(self, n: int) -> Alarm:
        """The every-step check's device values, made on first use (out of the graph),
        and again for a plan of another size (what was seen stays seen)."""
        if self.alarm is None or self.alarm.n != n:
            with _backend.lift():
                self.alarm = Alarm(n)
        return self.alarm

    # ------------------------------------------------------------ from the stats
    def from_block(self, block: Drained, keys: list[str], store: Store) -> None:
        """Alerts for each drained (step, variable) whose recorded stats trip a check,
        and a warning where the stats see every step."""
        if "nonfinite" in self.stats:  # every recorded step with NaN/Inf is an alert
            # ...but one that a loss-scale optimizer skipped never reached the weights
            # (one that `on_nonfinite="skip"` kept back is acted on: it was the data's).
            first, found = self._stat_alerts(
                block, keys, store, "nonfinite", lambda v: v > 0, "nonfinite", ~block.loss_scaled
            )
            policy = self.on_nonfinite
            if found and policy in ("warn", "skip") and self.nonfinite_from_stats:
                counts = {k: int(v) for k, v in found.items()}
                self.act(policy, nonfinite_message(first, counts, policy, self.origin_of(first)))
        if self.thresholds and "norm" in self.stats:
            beyond = np.vectorize(self.beyond, otypes=[bool])
            if "nonfinite" in self.stats:
                # A gradient with NaN/Inf elements is a non-finite alert, not a threshold one.
                clean = block.stats[:, :, self.stats.index("nonfinite")] == 0
                tripped = lambda v: beyond(v) & clean  # noqa: E731
            else:
                tripped = beyond
            first, found = self._stat_alerts(block, keys, store, "norm", tripped, self.kind)
            if found and self.on_threshold == "warn" and self.threshold_from_stats:
                self.act("warn", self.threshold_message(first, found))

        self._spike_alerts(block, store)

    def _spike_alerts(self, block: Drained, store: Store) -> None:
        """Alerts for the drained steps that the spike judge found spiking, and the
        first of each kind acted on by `on_spike`."""
        if self.spikes is None or not self.spikes.active:
            return
        rows = self.spikes.alerts(block.steps, block.scalars, list(SCALARS))
        store.add_alerts(rows)
        for kind in ("spike", "loss_spike"):
            first = next((r for r in rows if r[2] == kind), None)
            if first is not None:
                self.act(self.spikes.policy, self.spikes.message(first[0], kind, first[3]))

    def _stat_alerts(
        self, block, keys, store, stat, tripped, kind, acted=None
    ) -> tuple[int, dict[str, float]]:
        """Adds an alert for each drained (step, variable) whose `stat` trips; returns the
        first such step among the `acted` ones (a bool per step; default all) and its values
        by variable (empty when none tripped)."""
        values = block.stats[:, :, self.stats.index(stat)]
        step_i, var_i = np.nonzero(tripped(values))
        rows = [
            (int(block.steps[a]), keys[b], kind(v) if callable(kind) else kind, v)
            for a, b in zip(step_i, var_i, strict=True)
            for v in [float(values[a, b])]
        ]
        store.add_alerts(rows)
        if acted is not None:
            rows = [r for r, a in zip(rows, step_i, strict=True) if acted[a]]
        if not rows:
            return -1, {}
        first = rows[0][0]
        return first, {r[1]: r[3] for r in rows if r[0] == first}

    # ------------------------------------------------------ from the step's check
    @property
    def polls(self) -> bool:
        """Whether `poll` reads anything: a check that runs in every step, or a spike
        policy that ends `fit`."""
        spikes = self.spikes
        return self.alarm is not None or (spikes is not None and spikes.policy in ("stop", "raise"))

    def poll(self, model: Any) -> None:
        """Reads the check counters (one small read). May run on Keras' worker thread, so
        it only notes what tripped and sets `stop_training`; `handle` does the rest."""
        spikes = self.spikes
        if spikes is not None and spikes.policy in ("stop", "raise") and spikes.poll(model):
            model.stop_training = True
            self.spike_pending = True
        alarm = self.alarm
        if alarm is None or not _backend.sync_state(model, alarm.tripped):
            return
        tripped = alarm.tripped.numpy()
        for kind, n, policy in (
            ("nonfinite", tripped[0], self.on_nonfinite),
            ("threshold", tripped[1], self.on_threshold),
        ):
            if n and not self._seen[kind]:
                self._seen[kind] = int(n)
                self._pending.append(kind)
                if policy in ("stop", "raise"):
                    model.stop_training = True

    def handle(
        self, keys: list[str], store: Store, counts: Callable[[int, list[str]], dict]
    ) -> None:
        """On the main thread: records the alerts noted by `poll` and acts on them.
        `counts(step, keys)` gives the NaN/Inf counts of a step where they are recorded."""
        alarm = self.alarm
        if alarm is None:
            return
        while self._pending:
            kind = self._pending.pop(0)
            if kind == "nonfinite":
                step = int(alarm.nonfinite_step.numpy())
                sq = alarm.nonfinite_sq.numpy()
                bad = [k for k, v in zip(keys, sq, strict=True) if not np.isfinite(v)]
                found = counts(step, bad)
                store.add_alerts([(step, k, "nonfinite", found.get(k, np.nan)) for k in bad])
                policy = self.on_nonfinite
                self.act(
                    policy, nonfinite_message(step, found or bad, policy, self.origin_of(step))
                )
            else:
                step = int(alarm.threshold_step.numpy())
                norms = np.sqrt(alarm.threshold_sq.numpy().astype(np.float64))
                out = {k: float(v) for k, v in zip(keys, norms, strict=True) if self.beyond(v)}
                store.add_alerts([(step, k, self.kind(v), v) for k, v in out.items()])
                self.act(self.on_threshold, self.threshold_message(step, out))

    # ------------------------------------------------------------------ acting
    def beyond(self, norm: float) -> bool:
        """Whether a norm trips `max_norm` or `min_norm`. A non-finite norm never does:
        its gradient is reported as non-finite (`on_nonfinite`)."""
        if not np.isfinite(norm):
            return False
        return (self.max_norm is not None and norm > self.max_norm) or (
            self.min_norm is not None and norm < self.min_norm
        )

    def kind(self, norm: float) -> str:
        return "max_norm" if self.max_norm is not None and norm > self.max_norm else "min_norm"

    def threshold_message(self, step: int, norms: dict) -> str:
        return (
            f"Gradient norms beyond max_norm={self.max_norm}/min_norm={self.min_norm} "
            f"at step {step}: {norms}."
        )

    def act(self, policy: str, message: str) -> None:
        if policy in ("warn", "skip"):
            kind = message.split(" ", 1)[0]  # one warning per kind of alert
            if kind not in self._warned:
                self._warned.add(kind)
                warnings.warn("GradWatch: " + message, stacklevel=2)
        elif policy == "stop":
            # As Keras' TerminateOnNaN: say why training ends, where the progress bar is.
            _print_msg(f"GradWatch: {message} Terminating training.")
        elif policy == "raise":
            self._error = FloatingPointError("GradWatch: " + message)

    def take_error(self) -> FloatingPointError | None:
        """The pending error of a `"raise"` policy, once."""
        error, self._error = self._error, None
        return error


def _print_msg(message: str) -> None:
    """Prints as Keras' callbacks do: to stdout, or to absl's log where Keras'
    interactive logging is off (`keras.config.disable_interactive_logging`)."""
    from keras.src.utils import io_utils

    io_utils.print_msg(message)


def nonfinite_message(
    step: int, found: dict | list, policy: str = "warn", origin: tuple | None = None
) -> str:
    """The one line that names a non-finite step, where its first NaN/Inf was born
    (`origin`, a `log.origins` row without its step, where it was replayed), says what
    became of its update under `policy`, and how to keep the model and find the
    source."""
    what = (
        f"{found} (NaN/Inf element counts)"
        if isinstance(found, dict)
        else f"{found} (record the `nonfinite` stat at that step for element counts)"
    )
    source = (
        "To find the source, replay that step's batch: `gradwatch.trace_nonfinite(model, x, y)`."
    )
    if policy == "skip":
        then = (
            "Its update was skipped (on_nonfinite='skip'): the weights and the "
            "optimizer's state are those from before it, and training goes on."
        )
    elif policy in ("stop", "raise"):
        then = "Its update was skipped: the model keeps the weights of its last finite step."
    else:
        then = (
            "The update was applied, so the weights may hold NaN/Inf now. To keep the "
            "model, pass on_nonfinite='skip' (or 'stop')."
        )
    if origin is not None:
        source = "Details: `log.origins`."
        where = origin_text(origin)
        return f"Non-finite gradients at step {step}, {where}: {what}. {then} {source}"
    return f"Non-finite gradients at step {step}: {what}. {then} {source}"
