"""Datasets: an io_uring reader, a resumable loader, and five dataset types (text, timeseries, features,
audio, detection).

>>> from blazil_ai.datasets import open_dataset, Loader
>>> ds = open_dataset("features", "samples/features/transactions.csv")
>>> for batch in Loader(ds, batch_size=256, shuffle=True, seed=0):
...     batch["x"], batch["y"]  # numpy arrays

Names are imported lazily so ``blazil --help`` does not pay for numpy.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "open_dataset": "blazil_ai.datasets.base",
    "Dataset": "blazil_ai.datasets.base",
    "TYPES": "blazil_ai.datasets.base",
    "Loader": "blazil_ai.datasets.loader",
    "TorchLoader": "blazil_ai.datasets.loader",
    "FeatureTransform": "blazil_ai.datasets.features",
    "make_samples": "blazil_ai.datasets.samples",
    "simulate_transactions": "blazil_ai.datasets.transactions",
    "open_reader": "blazil_ai.datasets.reader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'blazil_ai.datasets' has no attribute {name!r}")
