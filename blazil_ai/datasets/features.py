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
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from blazil_ai.datasets.base import Batch, Dataset, class_ids
from blazil_ai.datasets.csvtable import SkippedRow
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
    source: dict[str, Any] | None = None  # fingerprint of the data it was fitted on (path, bytes, sha256)

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
                  lines: np.ndarray | None = None, unit: str = "line") -> np.ndarray:
        """The float32 feature matrix (rows x n_features) of ``columns`` (arrays, lists or one record of scalars).

        ``lines`` names each row in errors: file lines (``unit="line"``) or row indices (``unit="row"``).
        """
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
                where = {unit: int(lines[bad])} if lines is not None else {"row": bad}
                raise DataError(f"not a number: {cols[name][bad]!r}", path=path, field=name, **where) from None
            bad_mask = ~np.isfinite(x)
            if bad_mask.any():
                if self.nan_policy == "impute":
                    x = np.where(bad_mask, self.fill[j], x)
                else:
                    i = int(np.argmax(bad_mask))
                    at = {unit: int(lines[i])} if lines is not None else {"row": i}
                    raise DataError(f"non-finite value {x[i]} (nan_policy={self.nan_policy!r}; "
                                    "use 'impute' or 'skip' to accept it)", path=path, field=name, **at)
            out[:, j] = (x - self.center[j]) / self.scale[j]
        col = len(self.numeric)
        for name in self.categorical:
            cats = self.categories[name]
            ids = _category_ids(cols[name].astype(str), cats)
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


def _category_ids(values: np.ndarray, cats: list[str]) -> np.ndarray:
    """Position of each value in ``cats`` (``len(cats)``, the other slot, when absent), vectorised."""
    if not cats:
        return np.zeros(len(values), dtype=np.int64)
    arr = np.asarray(cats, dtype=str)
    order = np.argsort(arr, kind="stable")
    ranked = arr[order]
    pos = np.minimum(np.searchsorted(ranked, values), len(cats) - 1)
    ids = order[pos].astype(np.int64)
    ids[ranked[pos] != values] = len(cats)
    return ids


def _is_number(v: Any) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


_libc: Any = None


def _release_freed() -> None:
    """Hand freed heap memory back to the OS (glibc keeps freed blocks of the sizes a row group decodes to, so
    RSS would creep above the budget while live memory stays within it); a no-op elsewhere."""
    global _libc
    if _libc is None:
        import ctypes
        import ctypes.util

        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc = lib if hasattr(lib, "malloc_trim") else False
        except OSError:
            _libc = False
    if _libc:
        _libc.malloc_trim(0)
    import pyarrow as pa

    pa.default_memory_pool().release_unused()  # mimalloc/jemalloc keep freed pages per thread otherwise


def _flag_label(name: str) -> bool:
    """A label named like a flag (``is_fraud``, ``has_chargeback``) holds 0/1 only."""
    return name.startswith(("is_", "has_"))


def _check_options(split: str, nan_policy: str, on_error: str, val_fraction: float, memory_budget: int | None
                   ) -> None:
    from blazil_ai.datasets.csvtable import ON_ERROR

    if split not in ("train", "val", "all"):
        raise ConfigError(f"split must be train, val or all, got {split!r}")
    if nan_policy not in NAN_POLICIES:
        raise ConfigError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    if on_error not in ON_ERROR:
        raise ConfigError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if memory_budget is not None and memory_budget < 1 << 20:
        raise ConfigError(f"memory_budget must be at least 1 MiB, got {memory_budget}")


class FeaturesDataset(Dataset):
    """Rows of a features table as ``{"x": float32 [B, F], "y": label [B], "index": row [B]}`` batches.

    ``path`` is a CSV, Parquet (file or directory of parts), Feather/Arrow or JSONL file (by extension or
    ``format=``), or an in-memory ``pandas.DataFrame`` / ``pyarrow.Table``; every source gives the same
    batches for the same data.

    ``transform``: None fits the scaling and encoding on the training rows in memory and writes nothing; a
    :class:`FeatureTransform` is applied as given; a path is loaded when the file exists (refused by name
    when it was fitted on an earlier version of this same source; ``refit=True`` fits again) and otherwise
    fitted and saved there, with the source's fingerprint.

    ``memory_budget`` (bytes): a Parquet or Arrow source whose decoded size would exceed it is served one
    row group (record batch) at a time, with at most ``memory_budget`` bytes of decoded blocks kept; the
    :class:`~blazil_ai.datasets.loader.Loader` then shuffles whole row groups and rows within them, shards
    by rank over that order and resumes exactly, as for an in-memory table.
    """

    kind = "features"

    def __init__(self, path: Any, *, label: str = "is_fraud", numeric: Sequence[str] | None = None,
                 categorical: Sequence[str] | None = None, exclude: Sequence[str] = DEFAULT_EXCLUDE,
                 method: str = "zscore", nan_policy: str = "error", on_error: str = "error",
                 split: str = "train", val_fraction: float = 0.2,
                 transform: str | Path | FeatureTransform | None = None, refit: bool = False,
                 format: str | None = None, memory_budget: int | None = None) -> None:
        from blazil_ai.datasets.tabular import BlockSource, detect_format, source_name

        self.source = path
        self.format = detect_format(path, format)
        self.path = Path(source_name(path))
        _check_options(split, nan_policy, on_error, val_fraction, memory_budget)
        self.label, self.split, self.on_error = label, split, on_error
        self.memory_budget = memory_budget
        self._cache: OrderedDict[int, Batch] = OrderedDict()
        self._cache_bytes = 0
        self.peak_cache_bytes = 0
        self.blocks: np.ndarray | None = None  # local index bounds of row groups, when served block by block

        def excluded(name: str) -> bool:
            return name == label or any(fnmatch.fnmatch(name, pat) for pat in exclude)

        self._excluded = excluded
        src = None
        if self.format in ("parquet", "feather") and memory_budget is not None:
            src = BlockSource(path, self.format)
            if int(src.block_bytes.sum()) * 4 <= memory_budget:  # Parquet's sizes are encoded: leave room
                src = None  # fits: the whole table in memory is simpler and as fast
        if src is not None:
            self._init_blocks(src, numeric, categorical, method, nan_policy, val_fraction, transform, refit)
        else:
            self._init_table(numeric, categorical, method, nan_policy, val_fraction, transform, refit)

    def _init_table(self, numeric: Sequence[str] | None, categorical: Sequence[str] | None, method: str,
                    nan_policy: str, val_fraction: float, transform: str | Path | FeatureTransform | None,
                    refit: bool) -> None:
        """Read the whole table, drop the rows the policies skip, fit or load the transform, keep the split."""
        from blazil_ai.datasets.tabular import read_table

        label, excluded = self.label, self._excluded
        forced = set(numeric or ()) | set(categorical or ())  # named columns are read even when excluded
        table = read_table(self.source, format=self.format, required=[label],
                           text=set(categorical or ()) | {label} if categorical else (), numeric=None,
                           on_error=self.on_error, ignore=lambda c: excluded(c) and c not in forced)
        self.unit = table.unit
        self.skipped: list[SkippedRow] = list(table.skipped)
        if len(table) == 0:
            raise DataError("no data rows", path=str(self.path))
        cols = table.columns
        num, cat = self._select(cols, numeric, categorical)
        self._check_numeric(table, num)
        lines = table.lines
        keep = self._keep_mask(cols, num, cat, nan_policy, lines)
        if keep is not None:
            cols = {k: v[keep] for k, v in cols.items()}
            lines = lines[keep]
        n = len(lines)
        if n == 0:
            raise DataError("no data rows left after skipping bad ones", path=str(self.path))
        n_train = n if val_fraction == 0 else max(1, int(math.floor(n * (1 - val_fraction))))
        rows = {"train": np.arange(n_train), "val": np.arange(n_train, n), "all": np.arange(n)}[self.split]
        fit_policy = "impute" if nan_policy == "impute" else "error"
        self._set_transform(transform, refit, lambda: FeatureTransform.fit(
            {k: cols[k][:n_train] for k in num + cat + [label]}, numeric=num, categorical=cat, method=method,
            nan_policy=fit_policy, label=label), nan_policy)
        used = self.transform.numeric + self.transform.categorical
        part = slice(int(rows[0]), int(rows[-1]) + 1) if len(rows) else slice(0, 0)  # contiguous: views
        self.x = self.transform.transform({k: cols[k][part] for k in used}, path=str(self.path), lines=lines[part],
                                          unit=self.unit)
        self.y, self.classes = self._labels(cols[label][part], lines[part])
        self.rows = rows
        self.lines = lines[part]

    def _check_numeric(self, table: Any, num: list[str]) -> None:
        """Each numeric feature column exists and holds numbers; the first that does not is named."""
        cols = table.columns
        for name in num:
            if name not in cols:
                raise DataError(f"numeric column {name!r} not in the table's columns {list(cols)}",
                                path=str(self.path), field=name, **({"line": 1} if self.unit == "line" else {}))
            if cols[name].dtype.kind != "f" and self.format != "csv":  # a typed column: its type is wrong
                raise DataError(f"column {name!r}: expected a number, found string", path=str(self.path), field=name)
            if cols[name].dtype.kind != "f":
                bad = next((i for i, v in enumerate(cols[name].tolist()) if not _is_number(v)), 0)
                raise DataError(f"not a number: {cols[name].tolist()[bad]!r}", path=str(self.path), field=name,
                                **table.where(bad))

    # -- shared by both modes ------------------------------------------------------------------------
    def _select(self, cols: Mapping[str, Any], numeric: Sequence[str] | None,
                categorical: Sequence[str] | None) -> tuple[list[str], list[str]]:
        """Numeric and categorical feature columns from explicit lists or the columns' types."""
        def kind(v: Any) -> str:
            return v if isinstance(v, str) else ("f" if np.asarray(v).dtype.kind == "f" else "U")

        num = list(numeric) if numeric is not None else \
            [k for k, v in cols.items() if kind(v) == "f" and not self._excluded(k)]
        cat = list(categorical) if categorical is not None else \
            [k for k, v in cols.items() if kind(v) != "f" and not self._excluded(k)]
        return num, cat

    def _keep_mask(self, cols: Mapping[str, np.ndarray], num: list[str], cat: list[str], nan_policy: str,
                   lines: np.ndarray) -> np.ndarray | None:
        """Rows to keep: ``nan_policy='skip'`` drops non-finite features; ``on_error='skip'`` drops rows with an
        empty or non-finite feature or label, or a flag label other than 0/1 (each counted with its reason)."""
        skip_errors = self.on_error == "skip"
        check_num = list(num) if nan_policy == "skip" or (skip_errors and nan_policy == "error") else []
        checks: list[tuple[str, np.ndarray, str]] = []
        for k in check_num:
            checks.append((k, ~np.isfinite(cols[k]), "empty or non-finite value"))
        if skip_errors:
            for k in cat:
                checks.append((k, np.char.str_len(cols[k].astype(str)) == 0, "empty field"))
            y = cols[self.label]
            if y.dtype.kind == "f":
                checks.append((self.label, ~np.isfinite(y), "empty or non-finite label"))
                if _flag_label(self.label):
                    checks.append((self.label, np.isfinite(y) & (y != 0) & (y != 1), "flag label is not 0 or 1"))
            else:
                checks.append((self.label, np.char.str_len(y.astype(str)) == 0, "empty label"))
        if not checks:
            return None
        keep = np.ones(len(lines), dtype=bool)
        for _, bad, _ in checks:
            keep &= ~bad
        for i in np.flatnonzero(~keep).tolist():
            name, _, reason = next(c for c in checks if c[1][i])
            self.skipped.append(SkippedRow(int(lines[i]), f"field {name!r}: {reason}: {cols[name][i]!r}"))
        return keep

    def _set_transform(self, transform: str | Path | FeatureTransform | None, refit: bool,
                       fit: Callable[[], FeatureTransform], nan_policy: str) -> None:
        from blazil_ai.datasets.tabular import check_fresh, source_fingerprint

        self.transform_path: Path | None = None
        if isinstance(transform, FeatureTransform):
            self.transform = transform
        elif transform is not None and Path(transform).exists() and not refit:
            self.transform_path = Path(transform)
            self.transform = FeatureTransform.load(self.transform_path)
            check_fresh(self.transform.source, self.source, self.transform_path)
        else:
            # Fit on training rows only; "skip" was applied above, so fit sees what training sees.
            try:
                self.transform = fit()
            except DataError as e:
                if e.path is not None:
                    raise
                raise DataError(f"fitting the normalisation on the training rows: {e}", path=str(self.path)) from e
            if transform is not None:  # asked for by path: save it, with what it was fitted on
                self.transform_path = Path(transform)
                self.transform.source = source_fingerprint(self.source, self.format)
                self.transform.save(self.transform_path)
        # This data set's policy applies to its own rows; a copy leaves the caller's (or saved) transform as it was.
        self.transform = replace(self.transform, nan_policy="impute" if nan_policy == "impute" else "error")

    def _labels(self, y: np.ndarray, lines: np.ndarray) -> tuple[np.ndarray, list[str] | None]:
        """Labels as class ids (text), int64 (whole numbers) or float32, with the class names; a 0/1 flag checked."""
        label, unit = self.label, self.unit
        if y.dtype.kind == "f":
            if not np.all(np.isfinite(y)):
                i = int(np.argmax(~np.isfinite(y)))
                raise DataError("label is empty or not finite (on_error='skip' leaves such rows out)",
                                path=str(self.path), field=label, **{unit: int(lines[i])})
            if _flag_label(label) and not np.all((y == 0) | (y == 1)):
                i = int(np.argmax((y != 0) & (y != 1)))
                raise DataError(f"label {label!r} is a 0/1 flag, found {y[i]:g}", path=str(self.path), field=label,
                                **{unit: int(lines[i])})
            if not np.all(y == np.round(y)):
                return y.astype(np.float32), None
            out = y.astype(np.int64)
            return out, [str(c) for c in np.unique(out).tolist()]
        return class_ids(y, self.transform.classes)

    def __len__(self) -> int:
        return len(self.rows) if self.blocks is None else int(self.blocks[-1])

    def get_batch(self, indices: np.ndarray) -> Batch:
        """Feature rows, labels and row positions (in the table after skipped rows)."""
        if self.blocks is None:
            return {"x": self.x[indices], "y": self.y[indices], "index": self.rows[indices]}
        return self._gather(np.asarray(indices, dtype=np.int64))

    def row_names(self, index: np.ndarray) -> np.ndarray:
        """The file line (CSV, JSONL) or 0-based row (Parquet, Arrow, a frame) of each ``index`` of a batch."""
        if self.blocks is None:
            return self.lines[np.searchsorted(self.rows, index)]
        return self._row_labels(np.asarray(index, dtype=np.int64))

    def summary(self) -> dict[str, Any]:
        """Counts, feature width, class balance and skipped rows."""
        s = super().summary()
        s.update({"format": self.format, "split": self.split, "features": self.transform.n_features,
                  "numeric": self.transform.numeric, "categorical": self.transform.categorical, "label": self.label,
                  "transform_file": str(self.transform_path) if self.transform_path else None,
                  "skipped": {"count": len(self.skipped),
                              "first": [f"{self.unit} {r.line}: {r.reason}" for r in self.skipped[:5]]}})
        if self.blocks is not None:
            s["row_groups"] = len(self.blocks) - 1
            s["memory_budget"] = self.memory_budget
        if self.blocks is None and self.y.dtype.kind == "i":
            vals, counts = np.unique(self.y, return_counts=True)
            s["label_counts"] = {str(v): int(c) for v, c in zip(vals.tolist(), counts.tolist())}
        return s

    # -- block by block (Parquet row groups, Arrow record batches) ---------------------------------------
    def _init_blocks(self, src: Any, numeric: Sequence[str] | None, categorical: Sequence[str] | None,
                     method: str, nan_policy: str, val_fraction: float, transform: Any, refit: bool) -> None:
        from blazil_ai.datasets.tabular import arrow_columns, column_kinds

        self._src = src
        src.use_threads = False
        self.unit = src.unit
        self.skipped = []
        kinds = column_kinds(src.schema, name=str(self.path), required=[self.label])
        label = self.label
        num, cat = self._select({k: ("f" if v in ("num", "time") else "U") for k, v in kinds.items()
                                 if k != label}, numeric, categorical)
        for name in num + cat:
            if name not in kinds:
                raise DataError(f"column {name!r} not in the table's columns {list(kinds)}", path=str(self.path),
                                field=name)
            if kinds[name] == "bad":
                raise DataError(f"column {name!r} has the unsupported type {src.schema.field(name).type}",
                                path=str(self.path), field=name)
            if name in num and kinds[name] == "text":
                raise DataError(f"column {name!r}: expected a number, found {src.schema.field(name).type}",
                                path=str(self.path), field=name)
        self._num, self._cat = num, cat
        self._nan_policy = nan_policy
        label_text = kinds[label] == "text" or label in set(categorical or ())

        def column(name: str, b: int, text: bool = False) -> np.ndarray:
            t = src.read_block(b, [name])
            return arrow_columns(t, name=str(self.path), text=[name] if text else (),
                                 numeric=None if text else [name])[name]

        # A row group must fit the budget with room to decode the next: measure the largest one's decoded
        # size from the first's bytes per row, and refuse rather than quietly exceed the budget.
        nb = src.num_blocks
        used_cols = list(dict.fromkeys([*num, *cat, label]))
        first = src.read_block(0, used_cols)
        per_row = first.nbytes / max(1, first.num_rows)
        del first
        biggest = int(np.argmax(src.block_rows))
        need = per_row * int(src.block_rows[biggest]) * 2  # the Arrow table and its numpy columns together
        budget = self.memory_budget or 0
        if need > budget / 2:
            raise ConfigError(
                f"{self.path}: row group {biggest} ({int(src.block_rows[biggest])} rows) decodes to about "
                f"{need / 2**20:.1f} MiB, more than half of memory_budget={budget / 2**20:.1f} MiB; "
                "raise the budget or rewrite the file with smaller row groups "
                "(pyarrow.parquet.write_table(..., row_group_size=N))")
        # Pass 1, block by block, a few columns at a time: rows to keep (only when a policy skips rows), and the
        # label checked and typed as in memory (finite, 0/1 for a flag, whole numbers -> int64 classes).
        skipping = nan_policy == "skip" or self.on_error == "skip"
        keep = np.ones(src.num_rows, dtype=bool) if skipping else None
        counts = []
        whole, values = True, set()
        for b in range(nb):
            s, e = int(src.block_start[b]), int(src.block_start[b + 1])
            cols = {k: column(k, b) for k in (num if skipping else [])}
            if self.on_error == "skip":
                cols.update({k: column(k, b, True) for k in cat})
            cols[label] = column(label, b, label_text)
            lines_b = src.row_labels(s, e)
            mask = self._keep_mask(cols, num, cat, nan_policy, lines_b) if skipping else None
            y = cols[label]
            if mask is not None and keep is not None:
                keep[s:e] = mask
                y, lines_b = y[mask], lines_b[mask]
            if y.dtype.kind == "f":
                out, _ = self._labels(y, lines_b)  # raises DataError naming the row
                whole = whole and out.dtype.kind == "i"
                if whole:
                    values.update(np.unique(out).tolist())
            counts.append(len(y))
            del cols, y
        self._keep = keep
        kept_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._kept_start = kept_start
        n = int(kept_start[-1])
        if n == 0:
            raise DataError("no data rows", path=str(self.path))
        n_train = n if val_fraction == 0 else max(1, int(math.floor(n * (1 - val_fraction))))
        lo, hi = {"train": (0, n_train), "val": (n_train, n), "all": (0, n)}[self.split]
        self._lo = lo

        def kept_column(name: str, b: int, text: bool = False) -> np.ndarray:
            s, e = int(src.block_start[b]), int(src.block_start[b + 1])
            col = column(name, b, text)
            return col if keep is None else col[keep[s:e]]

        def train_blocks() -> list[tuple[int, int]]:
            """(block, kept rows of it that are training rows)."""
            return [(b, int(min(kept_start[b + 1], n_train) - kept_start[b])) for b in range(nb)
                    if kept_start[b] < n_train]

        label_float = not label_text and kinds[label] in ("num", "time")
        self._integral = whole if label_float else None
        self._classes_num = [str(v) for v in sorted(values)] if label_float and whole else None

        fit_policy = "impute" if nan_policy == "impute" else "error"

        def fit() -> FeatureTransform:
            """The same fit as in memory, one column of the training rows at a time (categories counted per block)."""
            tb = train_blocks()
            t = FeatureTransform(numeric=list(num), categorical=list(cat), method=method, nan_policy=fit_policy,
                                 label=label)
            if method not in METHODS:
                raise ConfigError(f"normalisation method must be one of {METHODS}, got {method!r}")
            for k in num:
                one = FeatureTransform.fit({k: np.concatenate([kept_column(k, b)[:m] for b, m in tb])}, numeric=[k],
                                           categorical=[], method=method, nan_policy=fit_policy)
                t.center += one.center
                t.scale += one.scale
                t.fill += one.fill
            for k in cat:
                counts: dict[str, int] = {}
                for b, m in tb:
                    vals, cnt = np.unique(kept_column(k, b, True)[:m], return_counts=True)
                    for v, c in zip(vals.tolist(), cnt.tolist()):
                        counts[v] = counts.get(v, 0) + c
                values = np.asarray(sorted(counts), dtype=str)
                order = np.argsort(-np.asarray([counts[v] for v in values.tolist()]), kind="stable")
                t.categories[k] = sorted(str(v) for v in values[order][:64])
            if label_text:
                t.classes = sorted({str(v) for b, m in tb for v in kept_column(label, b, True)[:m].tolist()})
            return t

        self._set_transform(transform, refit, fit, nan_policy)
        self.classes = self._classes_num if self._integral is not None else self.transform.classes
        _release_freed()
        # Local index bounds of each block inside this split.
        bounds = np.clip(kept_start, lo, hi) - lo
        self.blocks = np.concatenate([[0], bounds[1:][np.diff(bounds) > 0]]).astype(np.int64)
        self._label_text = label_text

    def _decode_block(self, b: int) -> Batch:
        """Block ``b``'s kept rows: x, y, their kept-table positions and row labels (cached, LRU, in budget)."""
        from blazil_ai.datasets.tabular import arrow_columns

        hit = self._cache.get(b)
        if hit is not None:
            self._cache.move_to_end(b)
            return hit
        src = self._src
        s, e = int(src.block_start[b]), int(src.block_start[b + 1])
        keep = self._keep[s:e] if self._keep is not None else None
        used = self.transform.numeric + self.transform.categorical
        t = src.read_block(b, list(dict.fromkeys([*used, self.label])))
        cols = arrow_columns(t, name=str(self.path), numeric=self.transform.numeric,
                             text=[*self.transform.categorical, *([self.label] if self._label_text else [])])
        del t
        lines = src.row_labels(s, e)
        if keep is not None and not keep.all():
            lines = lines[keep]
            cols = {k: v[keep] for k, v in cols.items()}
        x = self.transform.transform({k: cols[k] for k in used}, path=str(self.path), lines=lines, unit=self.unit)
        y_raw = cols[self.label]
        if y_raw.dtype.kind == "f":
            y = y_raw.astype(np.int64) if self._integral else y_raw.astype(np.float32)
        else:
            y, _ = class_ids(y_raw, self.transform.classes)
        out = {"x": x, "y": y}
        size = sum(v.nbytes for v in out.values())
        # A quarter of the budget for decoded blocks kept between batches; the rest is for decoding the next one
        # (the Arrow table of a row group, its numpy columns and the feature matrix exist together for a moment).
        budget = (self.memory_budget or 0) // 4
        while self._cache and self._cache_bytes + size > budget:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= sum(v.nbytes for v in old.values())
        self._cache[b] = out
        self._cache_bytes += size
        _release_freed()
        self.peak_cache_bytes = max(self.peak_cache_bytes, self._cache_bytes)
        return out

    def _locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        g = indices + self._lo  # kept-table position
        b = np.searchsorted(self._kept_start, g, side="right") - 1
        return b, g - self._kept_start[b]

    def _gather(self, indices: np.ndarray) -> Batch:
        blocks, local = self._locate(indices)
        width = self.transform.n_features
        x = np.empty((len(indices), width), dtype=np.float32)
        y: np.ndarray | None = None
        for b in np.unique(blocks).tolist():
            sel = blocks == b
            dec = self._decode_block(b)
            x[sel] = dec["x"][local[sel]]
            if y is None:
                y = np.empty(len(indices), dtype=dec["y"].dtype)
            y[sel] = dec["y"][local[sel]]
        assert y is not None or not len(indices)
        return {"x": x, "y": y if y is not None else np.empty(0, np.int64), "index": indices + self._lo}

    def _row_labels(self, index: np.ndarray) -> np.ndarray:
        blocks, local = self._locate(index - self._lo)
        out = np.empty(len(index), dtype=np.int64)
        for b in np.unique(blocks).tolist():
            sel = blocks == b
            s, e = int(self._src.block_start[b]), int(self._src.block_start[b + 1])
            names = self._src.row_labels(s, e)
            out[sel] = (names if self._keep is None else names[self._keep[s:e]])[local[sel]]
        return out
