"""The Keras backend that gradwatch runs on, chosen once, here: the one place that asks
`keras.backend.backend()`. Shared code calls `current` (a module with the functions of
`gradwatch._backend.base.Backend`) and never asks which backend it is."""

from __future__ import annotations

import importlib
from types import ModuleType

import keras

NAME: str = keras.backend.backend()
SUPPORTED = ("tensorflow", "jax", "torch")

# On a backend gradwatch does not record, `generic` (its `RECORDS` is False, and
# training with a GradWatch is refused when it starts).
current: ModuleType = importlib.import_module(
    f"gradwatch._backend.{NAME if NAME in SUPPORTED else 'generic'}"
)
