"""Where built models live: ``$BLAZIL_HOME/models`` (default ``~/.cache/blazil/models``).

A model is an ONNX file plus sidecar files sharing its stem: ``fraud.onnx``, ``fraud.norm.json``
(input normalisation), ``fraud.metrics.json`` (quality on held-out data, how it was built).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from blazil_ai.errors import ConfigError

MODEL_TYPES = ("text", "fraud", "timeseries", "audio", "detection")


def blazil_home() -> Path:
    """The project's cache root: ``$BLAZIL_HOME`` or ``~/.cache/blazil``."""
    env = os.environ.get("BLAZIL_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "blazil"


def models_dir() -> Path:
    """The default directory for built models."""
    return blazil_home() / "models"


def model_file(model_type: str, where: str | Path | None = None) -> Path:
    """The ONNX file for ``model_type`` in ``where`` (a directory or a file; default :func:`models_dir`)."""
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"unknown model type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}")
    base = Path(where) if where is not None else models_dir()
    path = base if base.suffix == ".onnx" else base / f"{model_type}.onnx"
    if not path.is_file():
        raise ConfigError(f"no {model_type} model at {path}; build it with 'blazil models build --type {model_type}'"
                          + (f" --out {base}" if where is not None and base.suffix != ".onnx" else ""))
    return path


def sidecar(model_path: str | Path, kind: str) -> Path:
    """The sidecar file ``<stem>.<kind>.json`` next to a model file."""
    p = Path(model_path)
    return p.with_name(f"{p.stem}.{kind}.json")


def write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_json(path: Path) -> Any:
    """Read a sidecar JSON file, with a clear error if it is missing or broken."""
    from blazil_ai.errors import DataError

    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"missing sidecar file {path}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg}", path=str(path), line=e.lineno) from e


def save_onnx(model: Any, path: Path, info: dict[str, Any]) -> Path:
    """Save an ``onnx.ModelProto`` with the project's metadata (``blazil`` JSON property), atomically."""
    import onnx

    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key = "blazil"
    entry.value = json.dumps(info, sort_keys=True)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)
    return path
