"""CSV tables read with line numbers, so every bad row is reported by file and line (or skipped and counted).

Column types: a column named in ``numeric`` must parse as float in every row; with ``numeric=None`` the
types are inferred from the first 200 data rows (a column is numeric when most of its values there parse
as float, empty counting as missing), and then every row that breaks the column's type is an error (or
skipped) like any other.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from blazil_ai.datasets.reader import default_reader
from blazil_ai.errors import DataError

ON_ERROR = ("error", "skip")
_INFER_ROWS = 200
_MISSING = {"", "nan", "NaN", "NA", "null", "None"}


@dataclass(slots=True)
class SkippedRow:
    """A row left out under the ``skip`` policy, with the reason."""

    line: int
    reason: str


@dataclass(slots=True)
class Table:
    """Columns of one CSV file: numeric columns as float64 arrays, the others as str arrays."""

    path: Path
    columns: dict[str, np.ndarray]
    lines: np.ndarray  # file line of each kept row (or its row index), so later checks can still name it
    skipped: list[SkippedRow] = field(default_factory=list)
    unit: str = "line"  # "line" for text files (CSV, JSONL), "row" (0-based index) for Parquet, Arrow, frames

    def __len__(self) -> int:
        return len(self.lines)

    def where(self, i: int) -> dict[str, int]:
        """``line=`` or ``row=`` of kept row ``i``, for DataError."""
        return {self.unit: int(self.lines[i])}

    @property
    def numeric(self) -> list[str]:
        """Names of the numeric columns."""
        return [k for k, v in self.columns.items() if v.dtype.kind == "f"]

    @property
    def categorical(self) -> list[str]:
        """Names of the text (categorical) columns."""
        return [k for k, v in self.columns.items() if v.dtype.kind != "f"]


def _decode_utf8(data: np.ndarray, path: str) -> str:
    """The bytes of a text file as str; bytes that are not UTF-8 are named by line."""
    raw = data.tobytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"not UTF-8 text: {e.reason} at byte {e.start}", path=path, line=line) from None


def _to_float(text: str) -> float:
    text = text.strip()
    if text in _MISSING:
        return math.nan
    return float(text)


def _is_float(text: str) -> bool:
    try:
        _to_float(text)
        return True
    except ValueError:
        return False


def read_csv(path: str | Path, *, required: Sequence[str] = (), numeric: Iterable[str] | None = None,
             text: Iterable[str] = (), on_error: str = "error") -> Table:
    """Read a CSV with a header row; bad rows raise DataError (file, line, field) or are skipped and counted."""
    path = Path(path)
    if on_error not in ON_ERROR:
        raise DataError(f"on_error must be one of {ON_ERROR}, got {on_error!r}", path=str(path))
    if not path.is_file():
        raise DataError("no such file", path=str(path))
    f = io.StringIO(_decode_utf8(default_reader().read_file(path), str(path)), newline="")
    reader = csv.reader(f)
    header = _read_header(reader, path, required)
    skipped: list[SkippedRow] = []
    rows, lines = _read_rows(reader, len(header), path, on_error, skipped)
    num_cols = _numeric_columns(header, rows, numeric, set(text), path)
    values, keep_rows, keep_lines = _parse_numbers(header, rows, lines, num_cols, path, on_error, skipped)
    columns: dict[str, np.ndarray] = {}
    for j, name in enumerate(header):
        if j in values:
            columns[name] = np.asarray(values[j], dtype=np.float64)
        else:
            columns[name] = np.asarray([r[j] for r in keep_rows], dtype=str)
    return Table(path=path, columns=columns, lines=np.asarray(keep_lines, dtype=np.int64), skipped=skipped)


def _read_header(reader: Any, path: Path, required: Sequence[str]) -> list[str]:
    """The header's column names; refuses an empty file, duplicate names and missing required columns."""
    try:
        header = next(reader)
    except StopIteration:
        raise DataError("empty file (no header row)", path=str(path), line=1) from None
    except csv.Error as e:
        raise DataError(f"unreadable header: {e}", path=str(path), line=1) from None
    header = [h.strip() for h in header]
    if len(set(header)) != len(header):
        raise DataError(f"duplicate column names in header {header}", path=str(path), line=1)
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"missing column(s) {missing}; header has {header}", path=str(path), line=1,
                        field=missing[0])
    return header


def _read_rows(reader: Any, width: int, path: Path, on_error: str, skipped: list[SkippedRow]
               ) -> tuple[list[list[str]], list[int]]:
    """(rows, their line numbers): blank lines pass, a row of the wrong width is an error or skipped."""
    rows: list[list[str]] = []
    lines: list[int] = []
    try:
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) != width:
                reason = f"expected {width} fields, found {len(row)}"
                if on_error == "error":
                    raise DataError(reason, path=str(path), line=line)
                skipped.append(SkippedRow(line, reason))
                continue
            rows.append(row)
            lines.append(line)
    except csv.Error as e:
        raise DataError(f"malformed CSV: {e}", path=str(path), line=reader.line_num) from None
    return rows, lines


def _numeric_columns(header: list[str], rows: list[list[str]], numeric: Iterable[str] | None, text_cols: set[str],
                     path: Path) -> list[int]:
    """Indices of the numeric columns: those named, or (None) those mostly numbers in the first rows."""
    if numeric is None:
        probe = rows[:_INFER_ROWS]
        return [j for j, name in enumerate(header)
                if name not in text_cols and probe and 2 * sum(_is_float(r[j]) for r in probe) > len(probe)]
    wanted = set(numeric)
    unknown = wanted - set(header)
    if unknown:
        raise DataError(f"numeric column(s) {sorted(unknown)} not in header {header}", path=str(path), line=1)
    return [j for j, name in enumerate(header) if name in wanted]


def _parse_numbers(header: list[str], rows: list[list[str]], lines: list[int], num_cols: list[int], path: Path,
                   on_error: str, skipped: list[SkippedRow]
                   ) -> tuple[dict[int, list[float]], list[list[str]], list[int]]:
    """(numeric values per column, the rows kept, their lines): a field that is not a number is an error or
    skips its row."""
    values: dict[int, list[float]] = {j: [] for j in num_cols}
    keep_rows: list[list[str]] = []
    keep_lines: list[int] = []
    for row, line in zip(rows, lines):
        parsed: dict[int, float] = {}
        bad = None
        for j in num_cols:
            try:
                parsed[j] = _to_float(row[j])
            except ValueError:
                bad = (j, f"not a number: {row[j]!r}")
                break
        if bad is not None:
            if on_error == "error":
                raise DataError(bad[1], path=str(path), line=line, field=header[bad[0]])
            skipped.append(SkippedRow(line, f"field {header[bad[0]]!r}: {bad[1]}"))
            continue
        for j, v in parsed.items():
            values[j].append(v)
        keep_rows.append(row)
        keep_lines.append(line)
    return values, keep_rows, keep_lines


def write_csv(path: str | Path, columns: Mapping[str, Any]) -> Path:
    """Write equal-length columns as a CSV with a header row (floats to 13 significant digits)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(columns)
    cols = []
    for name in names:
        col = np.asarray(columns[name])
        if col.dtype.kind == "f":
            cols.append([f"{v:.13g}" for v in col.tolist()])
        else:
            cols.append([str(v) for v in col.tolist()])
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(names)
        w.writerows(zip(*cols))
    return path
