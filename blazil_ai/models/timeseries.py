"""The time series forecaster: a ridge regression over the whole input window, as a two-node ONNX graph.

Input ``x`` [batch, L, F] float32 is a window of the normalised series as the time series dataset
gives it (features then targets' history); output ``y`` [batch, H, T] float32 is the next H steps of
the targets, normalised (``timeseries.norm.json`` holds the mean/std to undo that). The ridge penalty
is chosen on the validation split; the reported errors are on the later test split, next to the naive
forecast that repeats the last observed target value.

>>> path = train_forecaster("samples/timeseries/series.csv", ".cache/models")   # doctest: +SKIP
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from blazil_ai.errors import DataError
from blazil_ai.models.store import models_dir, save_onnx, sidecar, write_json

ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0)


def _design(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x.reshape(len(x), -1).astype(np.float64), np.ones((len(x), 1))], axis=1)


def fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge weights [L*F, H*T] and bias [H*T] for windows ``x`` [n, L, F] -> ``y`` [n, H, T]."""
    a = _design(x)
    reg = alpha * np.eye(a.shape[1])
    reg[-1, -1] = 0.0  # the bias is not penalised
    coef = np.linalg.solve(a.T @ a + reg, a.T @ y.reshape(len(y), -1).astype(np.float64))
    return coef[:-1].astype(np.float32), coef[-1].astype(np.float32)


def forecaster_graph(w: np.ndarray, b: np.ndarray, input_length: int, n_inputs: int, horizon: int,
                     n_targets: int) -> Any:
    """ONNX graph: Flatten -> Gemm -> Reshape to [batch, horizon, targets]."""
    from onnx import TensorProto, helper, numpy_helper

    from blazil_ai.models.graphs import make_model

    nodes = [helper.make_node("Flatten", ["x"], ["flat"], axis=1),
             helper.make_node("Gemm", ["flat", "w", "b"], ["yflat"]),
             helper.make_node("Reshape", ["yflat", "yshape"], ["y"])]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"),
             numpy_helper.from_array(np.array([-1, horizon, n_targets], np.int64), "yshape")]
    return make_model(nodes, inits,
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", input_length, n_inputs])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", horizon, n_targets])],
                      "forecaster")


def _all(ds: Any) -> dict[str, np.ndarray]:
    return ds.get_batch(np.arange(len(ds), dtype=np.int64))


def train_forecaster(series_csv: str | Path, out_dir: str | Path | None = None, seed: int = 0, *,
                     input_length: int = 24, horizon: int = 1, target: str = "target") -> Path:
    """Train on ``series_csv``; write timeseries.onnx + .norm.json + .metrics.json and return the .onnx."""
    from blazil_ai.datasets.timeseries import TimeSeriesDataset
    from blazil_ai.models.session import Session

    out = Path(out_dir) if out_dir is not None else models_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "timeseries.onnx"
    norm = sidecar(path, "norm")
    t0 = time.perf_counter()
    common: dict[str, Any] = {"target": target, "input_length": input_length, "horizon": horizon}
    train = TimeSeriesDataset(series_csv, split="train", normalization=norm, refit=True, **common)
    val = TimeSeriesDataset(series_csv, split="val", normalization=norm, **common)
    test = TimeSeriesDataset(series_csv, split="test", normalization=norm, **common)
    for name, ds in (("train", train), ("val", val), ("test", test)):
        if len(ds) < 10:
            raise DataError(f"the {name} split has only {len(ds)} windows of {input_length}+{horizon} rows",
                            path=str(series_csv))
    tr, va, te = _all(train), _all(val), _all(test)

    def mae(ds: Any, pred: np.ndarray, y: np.ndarray) -> float:
        return float(np.abs(ds.denormalize(pred) - ds.denormalize(y)).mean())

    best: tuple[float, float, np.ndarray, np.ndarray] | None = None
    for alpha in ALPHAS:
        w, b = fit_ridge(tr["x"], tr["y"], alpha)
        pred = (va["x"].reshape(len(va["x"]), -1) @ w + b).reshape(va["y"].shape)
        score = mae(val, pred, va["y"])
        if best is None or score < best[0]:
            best = (score, alpha, w, b)
    assert best is not None
    _, alpha, w, b = best
    n_inputs, n_targets = tr["x"].shape[2], tr["y"].shape[2]
    info = {"type": "timeseries", "inputs": train.inputs, "targets": train.targets, "input_length": input_length,
            "horizon": horizon, "model": "ridge", "alpha": alpha}
    save_onnx(forecaster_graph(w, b, input_length, n_inputs, horizon, n_targets), path, info)

    (pred,) = Session(path).run({"x": te["x"]})
    tcols = train._target_cols
    naive = np.repeat(te["x"][:, -1:, tcols], horizon, axis=1)
    model_mae, naive_mae = mae(test, pred, te["y"]), mae(test, naive, te["y"])
    write_json(sidecar(path, "metrics"), {
        "model": "ridge over the flattened window", "alpha": alpha, "source": str(series_csv), "seed": seed,
        "input_length": input_length, "horizon": horizon, "targets": train.targets,
        "mae": model_mae, "naive_mae": naive_mae, "improvement_vs_naive": 1 - model_mae / naive_mae,
        "rmse": float(np.sqrt(((test.denormalize(pred) - test.denormalize(te["y"])) ** 2).mean())),
        "naive_rmse": float(np.sqrt(((test.denormalize(naive) - test.denormalize(te["y"])) ** 2).mean())),
        "val_mae": best[0], "windows": {"train": len(train), "val": len(val), "test": len(test)},
        "evaluated_on": "test split (the last 15% of rows, after validation)",
        "train_seconds": round(time.perf_counter() - t0, 2),
    })
    return path


class Forecaster:
    """A loaded forecaster: normalised windows in, forecasts in original units out."""

    def __init__(self, session: Any, norm: dict[str, Any]) -> None:
        self.session = session
        info = session.info
        cols = norm["columns"]
        idx = [cols.index(t) for t in info.get("targets", cols[-1:])]
        self.mean = np.asarray(norm["mean"], dtype=np.float64)[idx]
        self.std = np.asarray(norm["std"], dtype=np.float64)[idx]

    @classmethod
    def load(cls, model: str | Path | None = None, backend: str = "onnxruntime", **kw: Any) -> Forecaster:
        """Open timeseries.onnx (file or directory) with its norm file."""
        from blazil_ai.models.session import Session
        from blazil_ai.models.store import model_file, read_json

        path = model_file("timeseries", model)
        return cls(Session(path, backend, **kw), read_json(sidecar(path, "norm")))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Forecasts [n, H, T] in the targets' original units for normalised windows ``x`` [n, L, F]."""
        (y,) = self.session.run({"x": x})
        return y * self.std + self.mean


