"""The base of the metrics that carry gradwatch's device state."""

from __future__ import annotations

from typing import Any

import keras


class StateMetric(keras.metrics.Metric):
    """A metric that only carries gradwatch's device state: the train step writes its
    variables directly, it reports nothing, and Keras' per-epoch reset leaves it as it is
    (so it travels in JAX's stateless state and survives `reset_metrics`)."""

    def update_state(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(f"{type(self).__name__} is written by the train step.")

    def result(self) -> dict:
        return {}

    def reset_state(self) -> None:
        pass
