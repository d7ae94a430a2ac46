"""The project's exception types: each carries the context (file, line, field, id) that names the fault."""

from __future__ import annotations


class BlazilError(Exception):
    """Base of every error Blazil AI raises on purpose."""


class ConfigError(BlazilError):
    """A setting, flag or file the user named is missing or wrong."""


class DataError(BlazilError):
    """Bad input data; the message names the file, line and field where it was found."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None, row: int | None = None) -> None:
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        if row is not None:  # tables without lines (Parquet, Arrow, a DataFrame): the 0-based row index
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{': '.join([', '.join(where), message]) if where else message}")
        self.path = path
        self.line = line
        self.row = row
        self.field = field
