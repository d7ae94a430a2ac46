"""Tabular features (fraud, anomaly, intrusion): a CSV of numeric and categorical columns with a label.

Layout: one CSV with a header row. The label column is named by ``label`` (default ``is_fraud``).
Text columns are categorical (one-hot encoded, unseen values go to an ``__other__`` slot); numeric
columns are scaled by ``method``: ``zscore`` (mean/std), ``minmax`` (to [0, 1] on train) or
``robust`` (median/IQR). Columns matching ``exclude`` (ids, timestamps, ``fraud_pattern``) are kept
out of the features. The first ``1 - val_fraction`` of the rows are the training split, the rest
validation (row order is time order for transaction logs, so validation is the future).

The scaling and encoding are fitted on the training rows only and saved as JSON (by default next to
the CSV as ``<name>.transform.json``); inference reloads it with ``FeatureTransform.load``.

NaN and infinity policy (``nan_policy``): ``error`` (default; names file, line and field),
``impute`` (replace with the training median of the column) or ``skip`` (drop the row, counted).
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from blazil_ai.datasets.base import Batch, Dataset, class_ids
from blazil_ai.datasets.csvtable import SkippedRow, read_csv
from blazil_ai.errors import ConfigError, DataError

METHODS = ("zscore", "minmax", "robust")
NAN_POLICIES = ("error", "impute", "skip")
DEFAULT_EXCLUDE = ("id", "*_id", "timestamp", "time", "date", "fraud_pattern")
OTHER = "__other__"
FORMAT_VERSION = 1


@dataclass(slots=True)
class FeatureTransform:
    """Scaling of numeric columns and one-hot encoding of categorical ones, fitted on training rows."""

    numeric: list[str]
    categorical: list[str]
    method: str = "zscore"
    center: list[float] = field(default_factory=list)
    scale: list[float] = field(default_factory=list)
    fill: list[float] = field(default_factory=list)  # training medians, used by the impute policy
    categories: dict[str, list[str]] = field(default_factory=dict)
    nan_policy: str = "error"
    label: str | None = None
    classes: list[str] | None = None

    @classmethod
    def fit(cls, columns: Mapping[str, Any], *, numeric: Sequence[str] | None = None,
            categorical: Sequence[str] | None = None, method: str = "zscore", nan_policy: str = "error",
            label: str | None = None, max_categories: int = 64) -> FeatureTransform:
        """Fit on training columns; numeric/categorical default to the float and text columns (minus the label)."""
        if method not in METHODS:
            raise ConfigError(f"normalisation method must be one of {METHODS}, got {method!r}")
        if nan_policy not in NAN_POLICIES:
            raise ConfigError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
        cols = {k: np.asarray(v) for k, v in columns.items()}
        if numeric is None:
            numeric = [k for k, v in cols.items() if v.dtype.kind in "fiub" and k != label]
        if categorical is None:
            categorical = [k for k, v in cols.items() if v.dtype.kind in "USO" and k != label]
        center, scale, fill = [], [], []
        for name in numeric:
            if name not in cols:
                raise DataError(f"numeric column {name!r} missing; have {sorted(cols)}", field=name)
            x = cols[name].astype(np.float64)
            finite = x[np.isfinite(x)]
            if finite.size == 0:
                raise DataError("no finite values to fit on", field=name)
            med = float(np.median(finite))
            if method == "zscore":
                c, s = float(finite.mean()), float(finite.std())
            elif method == "minmax":
                c, s = float(finite.min()), float(finite.max() - finite.min())
            else:
                q1, q3 = np.percentile(finite, [25, 75])
                c, s = med, float(q3 - q1)
            center.append(c)
            scale.append(s if s > 1e-12 else 1.0)  # a constant column maps to 0 instead of dividing by 0
            fill.append(med)
        categories: dict[str, list[str]] = {}
        for name in categorical:
            if name not in cols:
                raise DataError(f"categorical column {name!r} missing; have {sorted(cols)}", field=name)
            values, counts = np.unique(cols[name].astype(str), return_counts=True)
            top = values[np.argsort(-counts, kind="stable")][:max_categories]
            categories[name] = sorted(str(v) for v in top)
        classes = None
        if label is not None and label in cols and cols[label].dtype.kind in "USO":
            classes = sorted(set(cols[label].astype(str).tolist()))
        return cls(numeric=list(numeric), categorical=list(categorical), method=method, center=center,
                   scale=scale, fill=fill, categories=categories, nan_policy=nan_policy, label=label,
                   classes=classes)

    @property
    def feature_names(self) -> list[str]:
        """Names of the output matrix's columns, in order."""
        names = list(self.numeric)
        for name in self.categorical:
            names += [f"{name}={v}" for v in self.categories[name]] + [f"{name}={OTHER}"]
        return names

    @property
    def n_features(self) -> int:
        """Width of the output matrix."""
        return len(self.numeric) + sum(len(v) + 1 for v in self.categories.values())

    def transform(self, columns: Mapping[str, Any], *, path: str | None = None,
                  lines: np.ndarray | None = None) -> np.ndarray:
        """The float32 feature matrix (rows x n_features) of ``columns`` (arrays, lists or one record of scalars)."""
        cols = {k: np.atleast_1d(np.asarray(v)) for k, v in columns.items()}
        n = None
        for name in [*self.numeric, *self.categorical]:
            if name not in cols:
                raise DataError(f"column {name!r} missing from input; have {sorted(cols)}", path=path, field=name)
            n = len(cols[name]) if n is None else n
            if len(cols[name]) != n:
                raise DataError(f"column {name!r} has {len(cols[name])} rows, expected {n}", path=path, field=name)
        n = n or 0
        out = np.zeros((n, self.n_features), dtype=np.float32)
        for j, name in enumerate(self.numeric):
            try:
                x = cols[name].astype(np.float64)
            except ValueError:
                bad = next(i for i, v in enumerate(cols[name].tolist()) if not _is_number(v))
                raise DataError(f"not a number: {cols[name][bad]!r}", path=path,
                                line=int(lines[bad]) if lines is not None else None, field=name) from None
            bad_mask = ~np.isfinite(x)
            if bad_mask.any():
                if self.nan_policy == "impute":
                    x = np.where(bad_mask, self.fill[j], x)
                else:
                    i = int(np.argmax(bad_mask))
                    where = f"line {int(lines[i])}" if lines is not None else f"row {i}"
                    raise DataError(f"non-finite value {x[i]} at {where} (nan_policy={self.nan_policy!r}; "
                                    "use 'impute' or 'skip' to accept it)", path=path,
                                    line=int(lines[i]) if lines is not None else None, field=name)
            out[:, j] = (x - self.center[j]) / self.scale[j]
        col = len(self.numeric)
        for name in self.categorical:
            cats = self.categories[name]
            index = {c: i for i, c in enumerate(cats)}
            ids = np.fromiter((index.get(v, len(cats)) for v in cols[name].astype(str).tolist()), np.int64, n)
            out[np.arange(n), col + ids] = 1.0
            col += len(cats) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what ``save`` writes)."""
        return {"format": "blazil-feature-transform", "version": FORMAT_VERSION, **asdict(self),
                "feature_names": self.feature_names}

    def save(self, path: str | Path) -> Path:
        """Write the fitted transform as JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)  # atomic: a reader never sees half a file
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureTransform:
        """Read a transform written by ``save``."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError("no such transform file", path=str(path)) from None
        except json.JSONDecodeError as e:
            raise DataError(f"not valid JSON: {e.msg}", path=str(path), line=e.lineno) from None
        if not isinstance(data, dict) or data.get("format") != "blazil-feature-transform":
            raise DataError("not a feature transform file (format field missing)", path=str(path))
        if data.get("version") != FORMAT_VERSION:
            raise DataError(f"unsupported version {data.get('version')}", path=str(path), field="version")
        known = {f for f in cls.__dataclass_fields__}  # type: ignore[attr-defined]
        try:
            t = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as e:
            raise DataError(f"bad transform file: {e}", path=str(path)) from None
        if len(t.center) != len(t.numeric) or len(t.scale) != len(t.numeric) or set(t.categories) != set(t.categorical):
            raise DataError("inconsistent transform file (lengths of numeric/center/scale differ)", path=str(path))
        return t


def _is_number(v: Any) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


class FeaturesDataset(Dataset):
    """Rows of a features CSV as ``{"x": float32 [B, F], "y": label [B], "index": row [B]}`` batches."""

    kind = "features"

    def __init__(self, path: str | Path, *, label: str = "is_fraud", numeric: Sequence[str] | None = None,
                 categorical: Sequence[str] | None = None, exclude: Sequence[str] = DEFAULT_EXCLUDE,
                 method: str = "zscore", nan_policy: str = "error", on_error: str = "error",
                 split: str = "train", val_fraction: float = 0.2,
                 transform: str | Path | FeatureTransform | None = None, refit: bool = False) -> None:
        self.path = Path(path)
        if split not in ("train", "val", "all"):
            raise ConfigError(f"split must be train, val or all, got {split!r}")
        if nan_policy not in NAN_POLICIES:
            raise ConfigError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
        forced_text = set(categorical or ())
        table = read_csv(self.path, required=[label], text=forced_text | {label} if categorical else (),
                         numeric=None, on_error=on_error)
        self.skipped: list[SkippedRow] = list(table.skipped)
        if len(table) == 0:
            raise DataError("no data rows", path=str(self.path))
        cols = table.columns

        def excluded(name: str) -> bool:
            return name == label or any(fnmatch.fnmatch(name, pat) for pat in exclude)

        num = list(numeric) if numeric is not None else [k for k in table.numeric if not excluded(k)]
        cat = list(categorical) if categorical is not None else [k for k in table.categorical if not excluded(k)]
        for name in num:
            if name not in cols:
                raise DataError(f"numeric column {name!r} not in header", path=str(self.path), line=1, field=name)
            if cols[name].dtype.kind != "f":
                bad = next(i for i, v in enumerate(cols[name].tolist()) if not _is_number(v))
                raise DataError(f"not a number: {cols[name][bad]!r}", path=str(self.path),
                                line=int(table.lines[bad]), field=name)
        lines = table.lines
        if nan_policy == "skip" and num:
            finite = np.all(np.stack([np.isfinite(cols[k]) for k in num]), axis=0)
            for i in np.flatnonzero(~finite).tolist():
                name = next(k for k in num if not np.isfinite(cols[k][i]))
                self.skipped.append(SkippedRow(int(lines[i]), f"field {name!r}: non-finite value {cols[name][i]}"))
            cols = {k: v[finite] for k, v in cols.items()}
            lines = lines[finite]
        n = len(lines)
        n_train = n if val_fraction == 0 else max(1, int(math.floor(n * (1 - val_fraction))))
        rows = {"train": np.arange(n_train), "val": np.arange(n_train, n), "all": np.arange(n)}[split]

        self.transform_path: Path | None = None
        if isinstance(transform, FeatureTransform):
            self.transform = transform
        else:
            self.transform_path = Path(transform) if transform is not None else \
                self.path.with_name(self.path.stem + ".transform.json")
            if self.transform_path.exists() and not refit:
                self.transform = FeatureTransform.load(self.transform_path)
            else:
                # Fit on training rows only; "skip" was applied above, so fit sees what training sees.
                fit_policy = "impute" if nan_policy == "impute" else "error"
                train_cols = {k: cols[k][:n_train] for k in num + cat + [label]}
                try:
                    self.transform = FeatureTransform.fit(train_cols, numeric=num, categorical=cat, method=method,
                                                          nan_policy=fit_policy, label=label)
                except DataError as e:
                    if e.path is not None:
                        raise
                    raise DataError(f"fitting the normalisation on the training rows: {e}",
                                    path=str(self.path)) from e
                self.transform.save(self.transform_path)
        # This data set's policy applies to its own rows; a copy leaves the caller's (or saved) transform as it was.
        self.transform = replace(self.transform, nan_policy="impute" if nan_policy == "impute" else "error")
        self.label = label
        used = self.transform.numeric + self.transform.categorical
        self.x = self.transform.transform({k: cols[k][rows] for k in used}, path=str(self.path), lines=lines[rows])
        y = cols[label][rows]
        if y.dtype.kind == "f":
            if not np.all(np.isfinite(y)):
                i = int(np.argmax(~np.isfinite(y)))
                raise DataError("label is not finite", path=str(self.path), line=int(lines[rows][i]), field=label)
            self.y = y.astype(np.int64) if np.all(y == np.round(y)) else y.astype(np.float32)
            self.classes = [str(c) for c in np.unique(self.y).tolist()] if self.y.dtype.kind == "i" else None
        else:
            self.y, self.classes = class_ids(y, self.transform.classes)
        self.rows = rows
        self.lines = lines[rows]
        self.split = split

    def __len__(self) -> int:
        return len(self.rows)

    def get_batch(self, indices: np.ndarray) -> Batch:
        """Feature rows, labels and CSV row positions."""
        return {"x": self.x[indices], "y": self.y[indices], "index": self.rows[indices]}

    def summary(self) -> dict[str, Any]:
        """Counts, feature width, class balance and skipped rows."""
        s = super().summary()
        s.update({"split": self.split, "features": self.transform.n_features, "numeric": self.transform.numeric,
                  "categorical": self.transform.categorical, "label": self.label,
                  "transform_file": str(self.transform_path) if self.transform_path else None,
                  "skipped": {"count": len(self.skipped),
                              "first": [f"line {r.line}: {r.reason}" for r in self.skipped[:5]]}})
        if self.y.dtype.kind == "i":
            vals, counts = np.unique(self.y, return_counts=True)
            s["label_counts"] = {str(v): int(c) for v, c in zip(vals.tolist(), counts.tolist())}
        return s
