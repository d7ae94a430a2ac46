"""``blazil models build``: build each model type from offline data into the models directory.

With no ``--data``, the sample sets are generated once into ``$BLAZIL_HOME/samples`` (seeded, so a
clean clone rebuilds the same models), and each model trains on its type's sample set.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from blazil_ai.errors import ConfigError
from blazil_ai.files import TMP_TAG, check_output_dir, publish, staged_dir
from blazil_ai.models.store import MODEL_TYPES, blazil_home, models_dir, read_json, sidecar

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


def degenerate(model_type: str, metrics: dict[str, Any]) -> str | None:
    """Why a model's held-out figures show it learned nothing useful, or None when they do not."""
    if model_type == "fraud":
        held = metrics.get("held_out", {})
        f1, auc = held.get("f1"), held.get("roc_auc")
        if f1 is not None and f1 <= 0.0:
            return f"held-out f1 {f1} (it flags no fraud at the 0.5 threshold)"
        if auc is not None and not auc > 0.5:
            return f"held-out roc_auc {auc} (no better than chance)"
    elif model_type == "timeseries":
        if metrics.get("mae") is not None and metrics.get("naive_mae") is not None \
                and not metrics["mae"] < metrics["naive_mae"]:
            return f"mae {metrics['mae']:.4g} is no better than the naive forecast's {metrics['naive_mae']:.4g}"
    elif model_type == "audio":
        classes = metrics.get("classes") or []
        acc = metrics.get("accuracy")
        if acc is not None and classes and not acc > 1.0 / len(classes):
            return f"accuracy {acc:.3f} is no better than chance over {len(classes)} classes"
    elif model_type == "detection":
        m_ap = metrics.get("detection", {}).get("map50")
        if m_ap is not None and not m_ap > 0.0:
            return f"map50 {m_ap} (it finds nothing)"
    return None


def _is_model_file(p: Path) -> bool:
    """Files a build writes (``fraud.onnx``, ``fraud.norm.json``, ...) and its interrupted temporaries."""
    return p.name.split(".", 1)[0] in MODEL_TYPES or p.name.startswith(TMP_TAG)


def build_model(model_type: str, data: str | Path | None = None, out: str | Path | None = None, *, seed: int = 0,
                force: bool = False, **opts: Any) -> Path:
    """Build ``model_type`` into ``out`` (default the models directory); returns the ONNX file.

    The model is built in a temporary folder beside ``out`` and its files move into ``out`` only when the
    build succeeded: a failed build changes nothing. A new model whose held-out figures are degenerate
    (see :func:`degenerate`) does not replace a working one unless ``force``; ``out`` must hold only
    models (or be new or empty) unless ``force``.
    """
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"unknown model type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}")
    out_dir = check_output_dir(out if out is not None else models_dir(), force=force, option="--out",
                               ours=_is_model_file)
    with staged_dir(out_dir) as stage:
        built = _build_into(model_type, data, stage, seed, **opts)
        new_metrics = read_json(sidecar(built, "metrics"))
        problem = degenerate(model_type, new_metrics)
        target = out_dir / built.name
        if problem:
            old_metrics_path = sidecar(target, "metrics")
            old_ok = target.is_file() and old_metrics_path.is_file() and \
                degenerate(model_type, read_json(old_metrics_path)) is None
            if old_ok and not force:
                raise ConfigError(f"the new {model_type} model is degenerate: {problem}; kept the working model "
                                  f"{target} (pass --force to replace it anyway)")
            log.warning("the new %s model is degenerate: %s", model_type, problem)
        publish(stage, out_dir, last=built.name)  # sidecars first, the .onnx last
    return target


def _build_into(model_type: str, data: str | Path | None, out_dir: Path, seed: int, **opts: Any) -> Path:
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
