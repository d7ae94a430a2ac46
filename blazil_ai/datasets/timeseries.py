"""Time series windows from a CSV: a timestamp column, feature columns and one or more target columns.

Layout: ``series.csv`` with a header; ``timestamp`` is ISO 8601 (``2025-01-01T00:00:00Z``) or epoch
seconds, strictly increasing. Each sample is a window: ``x`` holds ``input_length`` rows of the inputs
(features, then the targets' own history), ``y`` the next ``horizon`` rows of the targets; windows start
every ``stride`` rows.

Splits are by time: the first ``1 - val_fraction - test_fraction`` of the rows train, then validation,
then test; no window crosses a split boundary. Z-score normalisation is fitted on the training rows only;
``normalization=None`` fits it in memory and writes nothing, a path loads it (refused by name when fitted on an
earlier version of this same source) or fits and saves it there with the source's fingerprint, and a mapping
read from such a file (a model's ``timeseries.norm.json``) is applied as given.

Sources: a CSV, Parquet (file or directory of parts), Feather/Arrow or JSONL file, or a ``pandas.DataFrame`` /
``pyarrow.Table``; a timestamp column may be text (ISO 8601 or epoch seconds), a number, or a timestamp type.

Stated policies: ``missing`` (empty or NaN cells): ``error`` (default, names line and field), ``ffill``
(carry the last value forward) or ``interpolate`` (linear in time). ``gaps`` (a step more than 1.5x the
median step): ``error`` (default, names the line) or ``split`` (windows never span a gap).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from blazil_ai.datasets.base import Batch, Dataset
from blazil_ai.errors import ConfigError, DataError

MISSING = ("error", "ffill", "interpolate")
GAPS = ("error", "split")


def _parse_time(text: str) -> float:
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    stamp = dt.datetime.fromisoformat(text)
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.UTC)
    return stamp.timestamp()


def _check_options(missing: str, gaps: str, split: str, input_length: int, horizon: int, stride: int,
                   val_fraction: float, test_fraction: float) -> None:
    if missing not in MISSING:
        raise ConfigError(f"missing must be one of {MISSING}, got {missing!r}")
    if gaps not in GAPS:
        raise ConfigError(f"gaps must be one of {GAPS}, got {gaps!r}")
    if split not in ("train", "val", "test", "all"):
        raise ConfigError(f"split must be train, val, test or all, got {split!r}")
    if input_length < 1 or horizon < 1 or stride < 1:
        raise ConfigError("input_length, horizon and stride must all be >= 1")
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ConfigError("val_fraction and test_fraction must be >= 0 and sum to less than 1")


def _window_starts(n: int, bounds: tuple[int, int], gap_after: np.ndarray, span: int, stride: int) -> np.ndarray:
    """Window starts: the whole window (input + horizon) stays in one split and one unbroken stretch."""
    seg_id = np.zeros(n, dtype=np.int64)
    if len(gap_after):
        seg_id[gap_after + 1] = 1
        seg_id = np.cumsum(seg_id)
    lo, hi = bounds
    starts = np.arange(lo, max(lo, hi - span + 1), stride)
    if len(starts):
        starts = starts[seg_id[starts] == seg_id[starts + span - 1]]
    return starts.astype(np.int64)


class TimeSeriesDataset(Dataset):
    """Sliding windows ``x`` [B, L, F] -> ``y`` [B, H, T] over a normalised multivariate series."""

    kind = "timeseries"

    def __init__(self, path: Any, *, timestamp: str = "timestamp", target: str | Sequence[str] = "target",
                 features: Sequence[str] | None = None, input_length: int = 24, horizon: int = 1, stride: int = 1,
                 split: str = "train", val_fraction: float = 0.15, test_fraction: float = 0.15,
                 missing: str = "error", gaps: str = "error",
                 normalization: str | Path | Mapping[str, Any] | None = None,
                 refit: bool = False, on_error: str = "error", format: str | None = None) -> None:
        from blazil_ai.datasets.tabular import detect_format, read_table, source_name

        self.source = path
        self.format = detect_format(path, format)
        self.path = Path(source_name(path))
        _check_options(missing, gaps, split, input_length, horizon, stride, val_fraction, test_fraction)
        targets = [target] if isinstance(target, str) else list(target)
        table = read_table(path, format=self.format, required=[timestamp, *targets],
                           text=[timestamp] if self.format == "csv" else (),
                           numeric=None if features is None else [*features, *targets], on_error=on_error)
        cols = table.columns
        self.unit = table.unit
        if features is None:
            features = [k for k in table.numeric if k not in targets and k != timestamp]
        for name in [*features, *targets]:
            if name not in cols or cols[name].dtype.kind != "f":
                raise DataError(f"column {name!r} is missing or not numeric", path=str(self.path), field=name,
                                **({"line": 1} if self.unit == "line" else {}))
        lines = table.lines
        n = len(lines)
        if n == 0:
            raise DataError("no data rows", path=str(self.path))
        times = self._times(table, timestamp)
        step, gap_after = self._steps(times, table, timestamp, gaps)
        inputs = [*features, *targets]
        values = np.stack([cols[k] for k in inputs], axis=1)  # (n, F)
        bad = ~np.isfinite(values)
        if bad.any():
            if missing == "error":
                i, j = (int(a[0]) for a in np.nonzero(bad))
                raise DataError("missing or non-finite value (missing='ffill' or 'interpolate' to fill it)",
                                path=str(self.path), field=inputs[j], **table.where(i))
            values = self._fill(values, bad, times, missing)
        self.missing_filled = int(bad.sum())
        n_train = int(n * (1 - val_fraction - test_fraction))
        n_val = int(n * val_fraction)
        bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n),
                  "all": (0, n)}[split]
        self.mean, self.std = self._normalisation(normalization, refit, inputs, values[:n_train])
        self.values = ((values - self.mean) / self.std).astype(np.float32)
        span = input_length + horizon
        self.starts = _window_starts(n, bounds, gap_after, span, stride)
        self.inputs, self.features, self.targets = inputs, list(features), targets
        self.input_length, self.horizon, self.stride, self.split = input_length, horizon, stride, split
        self.times, self.lines, self.step_seconds, self.gaps_found = times, lines, step, len(gap_after)
        self._target_cols = np.array([inputs.index(t) for t in targets])
        self._x_offsets = np.arange(input_length)
        self._y_offsets = np.arange(input_length, span)

    def _times(self, table: Any, timestamp: str) -> np.ndarray:
        """The timestamp column as epoch seconds; an empty or unreadable one is named by line."""
        col = table.columns[timestamp]
        if col.dtype.kind == "f":  # a number or a timestamp type: epoch seconds already
            if not np.all(np.isfinite(col)):
                i = int(np.argmax(~np.isfinite(col)))
                raise DataError("empty timestamp", path=str(self.path), field=timestamp, **table.where(i))
            return col
        times = np.empty(len(col))
        for i, text in enumerate(col.tolist()):
            try:
                times[i] = _parse_time(text)
            except ValueError:
                raise DataError(f"not a timestamp: {text!r}", path=str(self.path), field=timestamp,
                                **table.where(i)) from None
        return times

    def _steps(self, times: np.ndarray, table: Any, timestamp: str, gaps: str) -> tuple[float, np.ndarray]:
        """(the usual step in seconds, the rows after which a gap opens); refuses time that does not increase,
        and any gap unless ``gaps='split'``."""
        steps = np.diff(times)
        if (steps <= 0).any():
            i = int(np.argmax(steps <= 0)) + 1
            raise DataError("timestamp does not increase (duplicate or out of order)", path=str(self.path),
                            field=timestamp, **table.where(i))
        step = float(np.median(steps)) if len(steps) else 1.0
        gap_after = np.flatnonzero(steps > 1.5 * step)
        if len(gap_after) and gaps == "error":
            i = int(gap_after[0]) + 1
            raise DataError(f"gap in the series: {steps[i - 1]:.0f} s after the previous row, usual step {step:.0f} s "
                            "(gaps='split' keeps windows inside the unbroken stretches)",
                            path=str(self.path), field=timestamp, **table.where(i))
        return step, gap_after

    def _normalisation(self, normalization: str | Path | Mapping[str, Any] | None, refit: bool, inputs: list[str],
                       train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) per input: as given, loaded from the file, or fitted on the training rows (and saved when
        a path was named)."""
        self.norm_path: Path | None = None
        if isinstance(normalization, Mapping):
            return self._check_norm(normalization, inputs, "the given normalization")
        if normalization is not None and Path(normalization).exists() and not refit:
            self.norm_path = Path(normalization)
            return self._load_norm(inputs)
        if len(train) < 2:
            raise DataError(f"training split has {len(train)} rows; too few to fit normalisation",
                            path=str(self.path))
        mean, std = train.mean(axis=0), train.std(axis=0)
        std = np.where(std > 1e-12, std, 1.0)
        if normalization is not None:  # asked for by path: save it, with what it was fitted on
            self.norm_path = Path(normalization)
            self._save_norm(inputs, mean, std)
        return mean, std

    @staticmethod
    def _fill(values: np.ndarray, bad: np.ndarray, times: np.ndarray, policy: str) -> np.ndarray:
        values = values.copy()
        for j in range(values.shape[1]):
            ok = ~bad[:, j]
            if not ok.any():
                raise DataError(f"input column {j} has no finite values")
            if policy == "interpolate":
                values[:, j] = np.interp(times, times[ok], values[ok, j])
            else:
                idx = np.where(ok, np.arange(len(ok)), 0)
                np.maximum.accumulate(idx, out=idx)
                first = int(np.argmax(ok))
                idx[:first] = first  # nothing to carry before the first value: use it backwards
                values[:, j] = values[idx, j]
        return values

    def _save_norm(self, inputs: list[str], mean: np.ndarray, std: np.ndarray) -> None:
        from blazil_ai.datasets.tabular import source_fingerprint

        assert self.norm_path is not None
        data = {"format": "blazil-timeseries-norm", "version": 1, "columns": inputs,
                "mean": mean.tolist(), "std": std.tolist(), "source": source_fingerprint(self.source, self.format)}
        self.norm_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.norm_path.with_suffix(self.norm_path.suffix + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.norm_path)

    def _load_norm(self, inputs: list[str]) -> tuple[np.ndarray, np.ndarray]:
        from blazil_ai.datasets.tabular import check_fresh

        assert self.norm_path is not None
        try:
            data = json.loads(self.norm_path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"not valid JSON: {e.msg}", path=str(self.norm_path), line=e.lineno) from None
        except OSError as e:
            raise DataError(f"cannot read: {e.strerror}", path=str(self.norm_path)) from None
        out = self._check_norm(data, inputs, str(self.norm_path))
        check_fresh(data.get("source"), self.source, self.norm_path)
        return out

    @staticmethod
    def _check_norm(data: Any, inputs: list[str], where: str) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(data, Mapping) or data.get("format") != "blazil-timeseries-norm":
            raise DataError("not a time series normalisation file", path=where)
        if data.get("columns") != inputs:
            raise DataError(f"normalisation was fitted for columns {data.get('columns')}, data has {inputs} "
                            "(refit=True fits anew)", path=where, field="columns")
        mean, std = np.asarray(data["mean"], dtype=np.float64), np.asarray(data["std"], dtype=np.float64)
        if mean.shape != (len(inputs),) or std.shape != (len(inputs),) or not np.all(np.isfinite(std)):
            raise DataError("mean/std do not match the columns", path=where, field="mean")
        return mean, std

    def __len__(self) -> int:
        return len(self.starts)

    def get_batch(self, indices: np.ndarray) -> Batch:
        """Input windows, target horizons and the first row of each window."""
        s = self.starts[indices]
        x = self.values[s[:, None] + self._x_offsets]
        y = self.values[s[:, None] + self._y_offsets][:, :, self._target_cols]
        return {"x": x, "y": y, "start": s}

    def denormalize(self, y: np.ndarray) -> np.ndarray:
        """Targets back in their original units."""
        t = self._target_cols
        return y * self.std[t] + self.mean[t]

    def summary(self) -> dict[str, Any]:
        """Rows, windows, columns, step, gaps and filled values."""
        s = super().summary()
        s.update({"split": self.split, "rows": len(self.values), "inputs": self.inputs, "targets": self.targets,
                  "input_length": self.input_length, "horizon": self.horizon, "stride": self.stride,
                  "step_seconds": self.step_seconds, "gaps": self.gaps_found, "missing_filled": self.missing_filled,
                  "format": self.format, "normalization_file": str(self.norm_path) if self.norm_path else None})
        return s
