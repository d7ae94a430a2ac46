"""``blazil models build``: build each model type from offline data into the models directory.

With no ``--data``, the sample sets are generated once into ``$BLAZIL_HOME/samples`` (seeded, so a
clean clone rebuilds the same models), and each model trains on its type's sample set.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from blazil_ai.errors import ConfigError
from blazil_ai.models.store import MODEL_TYPES, blazil_home, models_dir

log = logging.getLogger(__name__)

# Where each type's data sits inside a samples root written by blazil_ai.datasets.samples.make_samples.
SAMPLE_LAYOUT = {"text": "text/messages.csv", "timeseries": "timeseries/series.csv",
                 "features": "features/transactions.csv", "fraud": "features/transactions.csv",
                 "audio": "audio", "detection": "detection"}


def samples_root() -> Path:
    """Default samples directory, ``$BLAZIL_HOME/samples``."""
    return blazil_home() / "samples"


def resolve_data(model_type: str, data: str | Path | None, seed: int = 0) -> Path:
    """The data a model type trains on: ``data`` (a file, a type directory, or a samples root) or the samples."""
    rel = SAMPLE_LAYOUT[model_type]
    if data is None:
        root = samples_root()
        if not (root / rel).exists():
            from blazil_ai.datasets.samples import make_samples

            log.warning("no samples in %s; generating them (seed %d)", root, seed)
            make_samples(root, seed=seed)
        return root / rel
    p = Path(data)
    if not p.exists():
        raise ConfigError(f"--data {p} does not exist")
    if p.is_dir() and (p / rel).exists():
        return p / rel
    if p.is_dir() and rel.endswith(".csv") and (p / rel).with_suffix(".parquet").exists():
        return (p / rel).with_suffix(".parquet")  # a samples root written with --format parquet
    return p


def build_model(model_type: str, data: str | Path | None = None, out: str | Path | None = None, *, seed: int = 0,
                **opts: Any) -> Path:
    """Build ``model_type`` into ``out`` (default the models directory); returns the ONNX file."""
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"unknown model type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}")
    out_dir = Path(out) if out is not None else models_dir()
    if model_type == "text":
        from blazil_ai.models.text import build_text_model

        return build_text_model(out_dir)
    src = resolve_data(model_type, data, seed)
    if model_type == "fraud":
        from blazil_ai.models.fraud import train_fraud_model

        return train_fraud_model(src, out_dir, seed=seed, **opts)
    if model_type == "timeseries":
        from blazil_ai.models.timeseries import train_forecaster

        return train_forecaster(src, out_dir, seed=seed, **opts)
    if model_type == "audio":
        from blazil_ai.models.audio import train_audio_model

        return train_audio_model(src, out_dir, seed=seed, **opts)
    from blazil_ai.models.detector import train_detector

    return train_detector(src, out_dir, seed=seed, **opts)
