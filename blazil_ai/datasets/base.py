"""The dataset interface every type implements, and ``open_dataset`` that picks the type by name."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from blazil_ai.errors import ConfigError

Batch = dict[str, np.ndarray]

TYPES = {
    "text": "blazil_ai.datasets.text:TextDataset",
    "timeseries": "blazil_ai.datasets.timeseries:TimeSeriesDataset",
    "features": "blazil_ai.datasets.features:FeaturesDataset",
    "audio": "blazil_ai.datasets.audio:AudioDataset",
    "detection": "blazil_ai.datasets.detection:DetectionDataset",
}


class Dataset:
    """A sized collection of samples that hands out whole batches by index.

    A subclass validates its files on construction (raising DataError that names file and line),
    and implements ``__len__`` and ``get_batch(indices) -> dict of numpy arrays`` with the batch
    dimension first. Per-batch work (one call for many samples) is what lets file-backed types keep
    many reads in flight.
    """

    kind: ClassVar[str] = ""
    path: Path

    def __init__(self, path: str | Path, **opts: Any) -> None:
        self.path = Path(path)

    def __len__(self) -> int:
        raise NotImplementedError

    def get_batch(self, indices: np.ndarray) -> Batch:
        """The samples at ``indices`` stacked into one batch."""
        raise NotImplementedError

    def __getitem__(self, i: int) -> Batch:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        batch = self.get_batch(np.array([i % len(self)], dtype=np.int64))
        return {k: v[0] for k, v in batch.items()}

    def summary(self) -> dict[str, Any]:
        """Counts, shapes and classes, for ``blazil data inspect``."""
        first = self.get_batch(np.arange(min(2, len(self)), dtype=np.int64)) if len(self) else {}
        return {"type": self.kind, "path": str(self.path), "samples": len(self),
                "fields": {k: {"dtype": str(v.dtype), "shape": list(v.shape[1:])} for k, v in first.items()}}

    def check_all(self, progress: bool = False) -> None:
        """Decode every sample once (open only checks what is cheap), raising DataError on the first bad one."""
        from tqdm import tqdm

        step = 256
        with tqdm(total=len(self), unit="sample", desc=f"checking {self.kind}", disable=not progress,
                  file=sys.stderr) as bar:
            for s in range(0, len(self), step):
                batch = self.get_batch(np.arange(s, min(s + step, len(self)), dtype=np.int64))
                bar.update(len(next(iter(batch.values()))) if batch else 0)


def dataset_class(kind: str) -> type[Dataset]:
    """The Dataset subclass registered for ``kind``."""
    if kind not in TYPES:
        raise ConfigError(f"unknown dataset type {kind!r}; choose one of {sorted(TYPES)}")
    module, name = TYPES[kind].split(":")
    return getattr(importlib.import_module(module), name)


def open_dataset(kind: str, path: str | Path, **opts: Any) -> Dataset:
    """Open and validate a data set of type ``kind`` (text, timeseries, features, audio, detection)."""
    return dataset_class(kind)(path, **opts)


def class_ids(labels: np.ndarray, classes: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Map label strings to ids in sorted class order (or the given order)."""
    names = [str(x) for x in labels.tolist()]
    if classes is None:
        classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    return np.asarray([index.get(n, -1) for n in names], dtype=np.int64), classes
