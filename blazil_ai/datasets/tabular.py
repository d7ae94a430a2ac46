"""Tables in any of the field's formats: CSV, Parquet (a file or a directory of parts), Feather/Arrow IPC, JSONL,
a ``pandas.DataFrame`` or a ``pyarrow.Table``, all turned into the same :class:`~blazil_ai.datasets.csvtable.Table`.

The format is chosen by extension (``.csv``, ``.parquet``/``.pq``, ``.feather``/``.arrow``/``.ipc``,
``.jsonl``/``.ndjson``) or by ``format=``. Bytes always come through the project's reader (io_uring or the
thread pool): a Parquet or Arrow file is opened through :class:`ReaderFile`, a pyarrow-compatible file whose
reads are :meth:`Reader.read_range` calls handed to pyarrow as ``pa.py_buffer``; JSONL is read whole and
given to ``pyarrow.json`` as a ``pa.BufferReader``. Decoding is pyarrow's; CSV keeps its line-numbered reader.

Column typing matches the CSV reader: numbers (int, float, bool, decimal) become float64 with nulls as NaN,
strings (and dictionary-encoded strings, pandas categoricals) become str arrays with nulls as ``""``,
timestamps and dates become float epoch seconds. A column named in ``numeric`` that holds strings, or a
nested/binary column that would be used, is an error naming the column, the expected and the found type.
Rows are named by line for text formats and by 0-based row index for the others.

Parquet row groups and Arrow record batches are *blocks*: :class:`BlockSource` reads one at a time, so a
data set larger than memory can be served block by block (see ``FeaturesDataset(memory_budget=...)``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from blazil_ai.datasets.csvtable import Table, read_csv
from blazil_ai.datasets.reader import Reader, default_reader
from blazil_ai.errors import ConfigError, DataError

FORMATS = ("csv", "parquet", "feather", "jsonl")
EXTENSIONS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".feather": "feather", ".arrow": "feather",
              ".ipc": "feather", ".jsonl": "jsonl", ".ndjson": "jsonl"}
FRAME = "frame"  # an in-memory pandas.DataFrame or pyarrow.Table


def is_frame(source: Any) -> bool:
    """Whether ``source`` is an in-memory table (a pandas DataFrame or a pyarrow Table), not a path."""
    mod = type(source).__module__
    return mod.startswith("pandas") or mod.startswith("pyarrow")


def source_name(source: Any) -> str:
    """How errors and summaries name the source: its path, or ``<pandas.DataFrame>`` / ``<pyarrow.Table>``."""
    if is_frame(source):
        return "<pandas.DataFrame>" if type(source).__module__.startswith("pandas") else "<pyarrow.Table>"
    return os.fspath(source)


def _parts(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.suffix in (".parquet", ".pq") and p.is_file())


def detect_format(source: Any, format: str | None = None) -> str:
    """``csv``, ``parquet``, ``feather``, ``jsonl`` (by ``format=`` or the extension) or ``frame``."""
    if is_frame(source):
        return FRAME
    if format is not None:
        fmt = format.lower().lstrip(".")
        fmt = {"arrow": "feather", "ipc": "feather", "pq": "parquet", "ndjson": "jsonl"}.get(fmt, fmt)
        if fmt not in FORMATS:
            raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
        return fmt
    path = Path(source)
    if path.is_dir():
        if _parts(path):
            return "parquet"
        raise DataError("directory holds no .parquet parts (pass format= or a file)", path=str(path))
    found = EXTENSIONS.get(path.suffix.lower())
    if found is None:
        raise DataError(f"cannot tell the format from the extension {path.suffix!r}; use one of "
                        f"{', '.join(sorted(EXTENSIONS))} or pass format= ({', '.join(FORMATS)})", path=str(path))
    return found


class ReaderFile(io.RawIOBase):
    """A read-only, seekable file whose reads go through the project's :class:`Reader` (pyarrow-compatible).

    Each ``read(n)`` is one ``Reader.read_range`` (io_uring or ``preadv`` blocks in flight); pyarrow gets
    the bytes as a buffer without a copy. With Parquet's ``pre_buffer`` the column chunks of a row group
    arrive as a few large coalesced reads.
    """

    def __init__(self, path: str | Path, reader: Reader | None = None) -> None:
        super().__init__()
        self.name = os.fspath(path)
        self._reader = reader or default_reader()
        try:
            self._size = os.stat(self.name).st_size
        except OSError as e:
            raise DataError(f"cannot open: {e.strerror}", path=self.name) from None
        self._pos = 0
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def size(self) -> int:
        """File size in bytes (taken at open)."""
        return self._size

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, size: int | None = -1) -> memoryview:  # type: ignore[override]
        n = self._size - self._pos if size is None or size < 0 else min(size, self._size - self._pos)
        if n <= 0:
            return memoryview(b"")
        data = self._reader.read_range(self.name, self._pos, n)
        self._pos += n
        self.bytes_read += n
        return data.data

    def readinto(self, b: Any) -> int:  # type: ignore[override]
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


def _arrow_error(e: BaseException, path: str, what: str) -> DataError:
    if isinstance(e, DataError):
        return e
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return DataError(f"{what}: {msg}", path=path)


class BlockSource:
    """A table read one block at a time: Parquet row groups (of one file or all parts of a directory),
    Arrow IPC record batches, or a single block for JSONL and in-memory tables."""

    def __init__(self, source: Any, format: str | None = None, reader: Reader | None = None) -> None:
        self.format = detect_format(source, format)
        if self.format == "csv":
            raise ConfigError("CSV is read by read_csv (line-numbered), not block by block")
        self.name = source_name(source)
        self.unit = "line" if self.format == "jsonl" else "row"
        self._reader = reader or default_reader()
        self._table: Any = None
        self._files: list[tuple[Any, int, str]] = []  # per block: (opened file, index inside it, file name)
        self.lines: np.ndarray | None = None  # JSONL: file line of each row
        # Decode a row group on Arrow's thread pool; a memory-bounded reader turns it off (each pool thread's
        # allocator keeps its own freed pages, which a budget would have to count).
        self.use_threads = True
        self.paths: list[Path] = []
        if self.format == FRAME:
            self._table = _frame_to_arrow(source)
            self.schema = self._table.schema
            self.block_rows = np.asarray([self._table.num_rows], dtype=np.int64)
            self.block_bytes = np.asarray([self._table.nbytes], dtype=np.int64)
        elif self.format == "jsonl":
            self.paths = [Path(source)]
            self._table, self.lines = _read_jsonl(Path(source), self._reader)
            self.schema = self._table.schema
            self.block_rows = np.asarray([self._table.num_rows], dtype=np.int64)
            self.block_bytes = np.asarray([self._table.nbytes], dtype=np.int64)
        elif self.format == "parquet":
            self._open_parquet(Path(source))
        else:
            self._open_feather(Path(source))
        self.block_start = np.concatenate([[0], np.cumsum(self.block_rows)]).astype(np.int64)
        self.num_rows = int(self.block_start[-1])

    # -- opening -------------------------------------------------------------------------------------
    def _open_parquet(self, path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if path.is_dir():
            parts = _parts(path)
            if not parts:
                raise DataError("directory holds no .parquet parts", path=str(path))
        elif path.is_file():
            parts = [path]
        else:
            raise DataError("no such file", path=str(path))
        rows: list[int] = []
        sizes: list[int] = []
        self.schema = None
        for part in parts:
            try:
                # Page checksums, where the writer stored them, are verified: flipped bits are named, not read.
                pf = pq.ParquetFile(pa.PythonFile(ReaderFile(part, self._reader), mode="r"), pre_buffer=True,
                                    page_checksum_verification=True)
                schema = pf.schema_arrow
            except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a damaged footer
                raise _arrow_error(e, str(part), "not a readable Parquet file") from None
            if self.schema is None:
                self.schema = schema
            elif not schema.equals(self.schema):
                diff = _schema_diff(self.schema, schema)
                raise DataError(f"part's columns differ from {parts[0].name}'s: {diff}", path=str(part))
            meta = pf.metadata
            for i in range(meta.num_row_groups):
                rg = meta.row_group(i)
                rows.append(rg.num_rows)
                sizes.append(rg.total_byte_size)
                self._files.append((pf, i, str(part)))
        self.paths = parts
        self.block_rows = np.asarray(rows, dtype=np.int64)
        self.block_bytes = np.asarray(sizes, dtype=np.int64)

    def _open_feather(self, path: Path) -> None:
        import pyarrow as pa
        import pyarrow.ipc as ipc

        if not path.is_file():
            raise DataError("no such file", path=str(path))
        try:
            f = ipc.open_file(pa.PythonFile(ReaderFile(path, self._reader), mode="r"))
            self.schema = f.schema
            rows, sizes = [], []
            for i in range(f.num_record_batches):  # one batch at a time: row counts are in each batch's header
                rb = f.get_batch(i)
                rows.append(rb.num_rows)
                sizes.append(rb.nbytes)
                del rb
                self._files.append((f, i, str(path)))
        except Exception as e:
            raise _arrow_error(e, str(path), "not a readable Arrow/Feather file") from None
        self.paths = [path]
        self.block_rows = np.asarray(rows, dtype=np.int64)
        self.block_bytes = np.asarray(sizes, dtype=np.int64)

    # -- reading -------------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        """Row groups (or record batches) in the source."""
        return len(self.block_rows)

    @property
    def columns(self) -> list[str]:
        """Column names in file order."""
        return list(self.schema.names)

    def read_block(self, i: int, columns: Sequence[str] | None = None) -> Any:
        """Block ``i`` (only ``columns`` when given) as a ``pyarrow.Table``."""
        import pyarrow as pa

        cols = list(columns) if columns is not None else None
        if self._table is not None:
            return self._table if cols is None else self._table.select(cols)
        f, j, where = self._files[i]
        try:
            if self.format == "parquet":
                return f.read_row_group(j, columns=cols, use_threads=self.use_threads)
            rb = f.get_batch(j)
            t = pa.Table.from_batches([rb])
            return t if cols is None else t.select(cols)
        except Exception as e:
            raise _arrow_error(e, where, f"cannot decode {'row group' if self.format == 'parquet' else 'record batch'}"
                                         f" {j}") from None

    def read_all(self, columns: Sequence[str] | None = None) -> Any:
        """Every block concatenated (the whole table in memory)."""
        import pyarrow as pa

        if self._table is not None:
            return self.read_block(0, columns)
        blocks = [self.read_block(i, columns) for i in range(self.num_blocks)]
        if not blocks:
            return self.schema.empty_table() if columns is None else self.schema.empty_table().select(list(columns))
        return pa.concat_tables(blocks)

    def row_labels(self, start: int, stop: int) -> np.ndarray:
        """Lines (JSONL) or row indices of rows ``start..stop-1``."""
        if self.lines is not None:
            return self.lines[start:stop]
        return np.arange(start, stop, dtype=np.int64)

    def fingerprint(self) -> dict[str, Any] | None:
        """Size and SHA-256 of the source's bytes (None for an in-memory table)."""
        return file_fingerprint(self.paths) if self.paths else None


def _schema_diff(a: Any, b: Any) -> str:
    sa = {f.name: str(f.type) for f in a}
    sb = {f.name: str(f.type) for f in b}
    for name in sa:
        if name not in sb:
            return f"column {name!r} missing"
        if sa[name] != sb[name]:
            return f"column {name!r} is {sb[name]}, expected {sa[name]}"
    extra = [n for n in sb if n not in sa]
    return f"extra column(s) {extra}" if extra else "column order differs"


def file_fingerprint(paths: Sequence[str | Path]) -> dict[str, Any]:
    """``{"path", "bytes", "sha256"}`` of one file or of a directory's parts (names and bytes, in order)."""
    h = hashlib.sha256()
    total = 0
    for p in paths:
        h.update(os.fspath(Path(p).name).encode() + b"\0")
        try:
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                    total += len(chunk)
        except OSError as e:
            raise DataError(f"cannot read: {e.strerror}", path=str(p)) from None
    first = Path(paths[0]).resolve()
    where = first.parent if len(paths) > 1 else first
    return {"path": str(where), "bytes": total, "sha256": h.hexdigest()}


def source_fingerprint(source: Any, format: str | None = None) -> dict[str, Any] | None:
    """The fingerprint of a data source on disk (a file, or a directory's Parquet parts); None for a frame."""
    if is_frame(source):
        return None
    path = Path(source)
    if path.is_dir():
        parts = _parts(path)
        if not parts:
            return None
        fp = file_fingerprint(parts)
        fp["path"] = str(path.resolve())
        return fp
    return file_fingerprint([path])


def _frame_to_arrow(frame: Any) -> Any:
    import pyarrow as pa

    if isinstance(frame, pa.Table):
        return frame
    if isinstance(frame, pa.RecordBatch):
        return pa.Table.from_batches([frame])
    try:
        return pa.Table.from_pandas(frame, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as e:
        # A column of mixed Python objects: name it.
        col = next((c for c in getattr(frame, "columns", []) if _bad_object_column(frame[c])), None)
        raise DataError(f"cannot convert the DataFrame: {e}", path="<pandas.DataFrame>",
                        field=str(col) if col is not None else None) from None


def _bad_object_column(series: Any) -> bool:
    import pyarrow as pa

    try:
        pa.array(series, from_pandas=True)
        return False
    except Exception:
        return True


def _read_jsonl(path: Path, reader: Reader) -> tuple[Any, np.ndarray]:
    import pyarrow as pa
    import pyarrow.json as pj

    if not path.is_file():
        raise DataError("no such file", path=str(path))
    data = reader.read_file(path)
    # Line number of every non-blank line: pyarrow skips blank lines, so row i is the i-th non-blank line.
    nl = np.flatnonzero(data == 10)
    starts = np.concatenate([[0], nl + 1])
    ends = np.concatenate([nl, [len(data)]])
    content = (data != 32) & (data != 9) & (data != 13) & (data != 10)
    csum = np.concatenate([[0], np.cumsum(content, dtype=np.int64)])
    nonblank = csum[ends] - csum[starts] > 0
    lines = (np.flatnonzero(nonblank) + 1).astype(np.int64)
    try:
        table = pj.read_json(pa.BufferReader(pa.py_buffer(data)),
                             read_options=pj.ReadOptions(block_size=max(1 << 20, min(len(data) + 1, 64 << 20))))
    except Exception as e:
        raise _jsonl_error(path, data, e) from None
    if table.num_rows != len(lines):
        raise DataError(f"{len(lines)} non-blank lines but pyarrow read {table.num_rows} rows", path=str(path))
    return table, lines


def _jsonl_error(path: Path, data: np.ndarray, e: BaseException) -> DataError:
    """Name the first line Python's json cannot read (or that is not an object); else pyarrow's message."""
    text = data.tobytes()
    for number, raw in enumerate(text.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as je:
            reason = je.msg if isinstance(je, json.JSONDecodeError) else f"not UTF-8: {je.reason}"
            return DataError(f"not valid JSON: {reason}", path=str(path), line=number)
        if not isinstance(obj, dict):
            return DataError(f"expected a JSON object per line, found {type(obj).__name__}", path=str(path),
                             line=number)
    return _arrow_error(e, str(path), "cannot read JSONL")


# -- typed columns ------------------------------------------------------------------------------------
def _kind(t: Any) -> str:
    """``num``, ``text``, ``time`` or ``bad`` for an Arrow type."""
    import pyarrow.types as at

    if at.is_dictionary(t):
        return _kind(t.value_type)
    if at.is_integer(t) or at.is_floating(t) or at.is_boolean(t) or at.is_decimal(t):
        return "num"
    if at.is_string(t) or at.is_large_string(t) or (hasattr(at, "is_string_view") and at.is_string_view(t)):
        return "text"
    if at.is_timestamp(t) or at.is_date(t):
        return "time"
    if at.is_null(t):
        return "num"  # a column of nulls only: NaN, the NaN policy decides
    return "bad"


def _type_name(t: Any) -> str:
    import pyarrow.types as at

    if at.is_dictionary(t):
        return f"dictionary<{t.value_type}>"
    return str(t)


def _to_numpy(col: Any, kind: str) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    if kind == "num":
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        x = pc.cast(col, pa.float64(), safe=False)
        return np.asarray(x.to_numpy(zero_copy_only=False), dtype=np.float64)  # nulls are NaN
    if kind == "time":
        if pa.types.is_date(col.type):
            days = pc.cast(pc.cast(col, pa.date32()), pa.int32())
            return np.asarray(pc.cast(days, pa.float64()).to_numpy(zero_copy_only=False)) * 86400.0
        unit = {"s": 1.0, "ms": 1e3, "us": 1e6, "ns": 1e9}[col.type.unit]
        ints = pc.cast(col, pa.int64())
        return np.asarray(pc.cast(ints, pa.float64()).to_numpy(zero_copy_only=False)) / unit
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    filled = pc.fill_null(col, "")
    if isinstance(filled, pa.ChunkedArray):
        filled = filled.combine_chunks()
    # Through a dictionary: the distinct strings become numpy text once, the rows are one gather.
    enc = pc.dictionary_encode(filled)
    words = np.asarray(enc.dictionary.to_numpy(zero_copy_only=False), dtype=str)
    if len(words) == 0:
        return np.asarray([""] * len(filled), dtype=str)
    return words[np.asarray(enc.indices.to_numpy(zero_copy_only=False), dtype=np.int64)]


def column_kinds(schema: Any, *, name: str, required: Sequence[str] = ()) -> dict[str, str]:
    """``{column: num|text|time|bad}`` from a schema; DataError when a required column is missing."""
    kinds = {f.name: _kind(f.type) for f in schema}
    missing = [c for c in required if c not in kinds]
    if missing:
        raise DataError(f"missing column(s) {missing}; the table has {list(kinds)}", path=name, field=missing[0])
    return kinds


def check_fresh(saved: dict[str, Any] | None, source: Any, fitted_file: str | Path) -> None:
    """Refuse a saved transform fitted on an earlier version of this same source (by its fingerprint)."""
    if not saved or is_frame(source):
        return
    here = Path(source).resolve()
    if saved.get("path") != str(here):
        return  # fitted on other data (a model's transform applied to new data): used as given
    now = source_fingerprint(source)
    if now is not None and now.get("sha256") != saved.get("sha256"):
        raise DataError(f"stale: fitted on an earlier version of {source} ({saved.get('bytes')} bytes then, "
                        f"{now['bytes']} now); fit it again (refit=True, or delete this file)", path=str(fitted_file))


def arrow_columns(table: Any, *, name: str, required: Sequence[str] = (), numeric: Iterable[str] | None = None,
                  text: Iterable[str] = (), ignore: Callable[[str], bool] | None = None) -> dict[str, np.ndarray]:
    """Columns of a ``pyarrow.Table`` as numpy arrays typed like :func:`read_csv`'s; DataError names the column."""
    have = list(table.column_names)
    if len(set(have)) != len(have):
        dup = sorted({c for c in have if have.count(c) > 1})
        raise DataError(f"duplicate column names {dup}", path=name)
    missing = [c for c in required if c not in have]
    if missing:
        raise DataError(f"missing column(s) {missing}; the table has {have}", path=name, field=missing[0])
    wanted = None if numeric is None else set(numeric)
    if wanted is not None:
        unknown = sorted(wanted - set(have))
        if unknown:
            raise DataError(f"numeric column(s) {unknown} not in the table's columns {have}", path=name,
                            field=unknown[0])
    text_cols = set(text)
    out: dict[str, np.ndarray] = {}
    for field in table.schema:
        col_name = field.name
        if ignore is not None and ignore(col_name) and col_name not in required and col_name not in text_cols \
                and (wanted is None or col_name not in wanted):
            continue
        kind = _kind(field.type)
        col = table.column(col_name)
        if kind == "bad":
            raise DataError(f"column {col_name!r} has the unsupported type {_type_name(field.type)} (nested, binary "
                            "or other non-scalar columns cannot be features; leave it out with exclude= or select "
                            "columns explicitly)", path=name, field=col_name)
        if col_name in text_cols:
            if kind == "text":
                out[col_name] = _to_numpy(col, "text")
            else:  # as the CSV reader would see it: the value's text
                values = col.to_pylist()
                out[col_name] = np.asarray(["" if v is None else _num_text(v) for v in values], dtype=str)
            continue
        if wanted is not None:
            if col_name in wanted:
                if kind == "text":
                    raise DataError(f"column {col_name!r}: expected a number, found {_type_name(field.type)}",
                                    path=name, field=col_name)
                out[col_name] = _to_numpy(col, kind)
            elif kind in ("text", "time"):  # a timestamp stays epoch seconds (time series read it so)
                out[col_name] = _to_numpy(col, kind)
            else:
                out[col_name] = np.asarray([_num_text(v) for v in col.to_pylist()], dtype=str)
            continue
        out[col_name] = _to_numpy(col, kind)
    return out


def _num_text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def read_table(source: Any, *, format: str | None = None, required: Sequence[str] = (),
               numeric: Iterable[str] | None = None, text: Iterable[str] = (), on_error: str = "error",
               ignore: Callable[[str], bool] | None = None, reader: Reader | None = None) -> Table:
    """A whole table from any supported source, typed and named like :func:`read_csv`'s result."""
    fmt = detect_format(source, format)
    if fmt == "csv":
        return read_csv(source, required=required, numeric=numeric, text=text, on_error=on_error)
    src = BlockSource(source, fmt, reader)
    keep = set(required) | set(text) | set(numeric or ())
    wanted = [c for c in src.columns if ignore is None or not ignore(c) or c in keep]
    table = src.read_all(wanted)  # columns left out are never decoded
    columns = arrow_columns(table, name=src.name, required=required, numeric=numeric, text=text, ignore=ignore)
    return Table(path=Path(src.name), columns=columns, lines=src.row_labels(0, src.num_rows), unit=src.unit)


def write_table(path: str | Path, columns: Any, format: str | None = None) -> Path:
    """Write columns (a dict of arrays, a DataFrame or a pyarrow Table) as CSV, Parquet, Feather or JSONL
    (by ``format`` or the extension), atomically: a temp file in the same folder, renamed on success."""
    import pyarrow as pa

    path = Path(path)
    fmt = detect_format(path, format) if format or path.suffix else "csv"
    if fmt == FRAME:
        raise ConfigError(f"cannot write to {path}")
    if isinstance(columns, dict):
        table = pa.table({k: np.asarray(v) for k, v in columns.items()})
    else:
        table = _frame_to_arrow(columns)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            pq.write_table(table, tmp, write_page_checksum=True)
        elif fmt == "feather":
            import pyarrow.feather as feather

            feather.write_feather(table, tmp)
        elif fmt == "jsonl":
            with open(tmp, "w", encoding="utf-8") as f:
                for row in table.to_pylist():
                    f.write(json.dumps(row) + "\n")
        else:
            from blazil_ai.datasets.csvtable import write_csv

            write_csv(tmp, {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
