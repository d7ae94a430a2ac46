"""Text classification: a CSV with text and label columns, or a directory with one subdirectory per class.

Layouts:

* ``messages.csv`` with a header naming the text and label columns (``text``, ``label`` by default);
* ``dir/<class>/*.txt``: one sample per file, the class is the subdirectory's name;
* the same two columns in Parquet (file or directory of parts), Feather/Arrow, JSONL, or a
  ``pandas.DataFrame`` / ``pyarrow.Table`` (by extension or ``format=``).

Texts are tokenised once at open with a Hugging Face ``tokenizers`` ``tokenizer.json`` (given, or found
next to the CSV / inside the directory), truncated and padded to ``max_length``. Batches:
``input_ids`` and ``attention_mask`` (int64, [B, max_length]) and ``label`` (int64, classes sorted by name).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from blazil_ai.datasets.base import Batch, Dataset, class_ids
from blazil_ai.errors import ConfigError, DataError


class TextDataset(Dataset):
    """Tokenised texts with class labels."""

    kind = "text"

    def __init__(self, path: Any, *, tokenizer: str | Path | None = None, text_column: str = "text",
                 label_column: str = "label", max_length: int = 64, on_error: str = "error",
                 classes: list[str] | None = None, format: str | None = None) -> None:
        from tokenizers import Tokenizer

        from blazil_ai.datasets.tabular import _parts, is_frame, read_table, source_name

        self.path = Path(source_name(path))
        if max_length < 2:
            raise ConfigError(f"max_length must be >= 2, got {max_length}")
        self.skipped: list[str] = []
        frame = is_frame(path)
        if not frame and format is None and self.path.is_dir() and not _parts(self.path):
            texts, labels = self._read_dir()
            tok_default = self.path / "tokenizer.json"
        elif frame or self.path.exists():
            table = read_table(path, format=format, required=[text_column, label_column],
                               text=[text_column, label_column], numeric=(), on_error=on_error,
                               ignore=lambda c: c not in (text_column, label_column))
            self.skipped = [f"{table.unit} {s.line}: {s.reason}" for s in table.skipped]
            texts = table.columns[text_column].tolist()
            labels = table.columns[label_column]
            empty = (np.char.str_len(labels.astype(str)) == 0) | (np.char.str_len(np.char.strip(
                table.columns[text_column].astype(str))) == 0)
            if empty.any() and on_error == "skip":  # empty text or label: left out and counted
                for i in np.flatnonzero(empty).tolist():
                    which = label_column if not labels[i] else text_column
                    self.skipped.append(f"{table.unit} {int(table.lines[i])}: field {which!r}: empty field")
                texts = [t for t, e in zip(texts, empty.tolist()) if not e]
                labels = labels[~empty]
            elif (np.char.str_len(labels.astype(str)) == 0).any():  # an empty text is a text; no label is an error
                i = int(np.argmax(np.char.str_len(labels.astype(str)) == 0))
                raise DataError("empty label (on_error='skip' leaves such rows out)", path=str(self.path),
                                field=label_column, **table.where(i))
            tok_default = (self.path if self.path.is_dir() else self.path.parent) / "tokenizer.json"
        else:
            raise DataError("no such file or directory", path=str(self.path))
        if not texts:
            raise DataError("no samples", path=str(self.path))
        tok_path = Path(tokenizer) if tokenizer is not None else tok_default
        if not tok_path.is_file():
            raise ConfigError(f"tokenizer file {tok_path} not found; pass tokenizer=PATH to a tokenizer.json")
        try:
            self.tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as e:  # tokenizers raises its own exception type for a malformed file
            raise DataError(f"cannot load tokenizer: {e}", path=str(tok_path)) from None
        pad = self.tokenizer.token_to_id("[PAD]")
        pad = 0 if pad is None else pad
        self.tokenizer.enable_truncation(max_length=max_length)
        self.tokenizer.enable_padding(length=max_length, pad_id=pad, pad_token=self.tokenizer.id_to_token(pad) or "")
        enc = self.tokenizer.encode_batch(texts)
        self.input_ids = np.asarray([e.ids for e in enc], dtype=np.int64)
        self.attention_mask = np.asarray([e.attention_mask for e in enc], dtype=np.int64)
        self.labels, self.classes = class_ids(np.asarray(labels), classes)
        if classes is not None and (self.labels < 0).any():
            i = int(np.argmax(self.labels < 0))
            raise DataError(f"label {labels[i]!r} is not one of {classes}", path=str(self.path), field=label_column)
        self.texts = texts
        self.max_length = max_length
        self.tokenizer_path = tok_path

    def _read_dir(self) -> tuple[list[str], np.ndarray]:
        texts: list[str] = []
        labels: list[str] = []
        class_dirs = sorted(p for p in self.path.iterdir() if p.is_dir())
        if not class_dirs:
            raise DataError("directory has no class subdirectories", path=str(self.path))
        for d in class_dirs:
            for f in sorted(d.glob("*.txt")):
                try:
                    texts.append(f.read_text(encoding="utf-8").strip())
                except UnicodeDecodeError as e:
                    raise DataError(f"not UTF-8 text: {e.reason}", path=str(f)) from None
                labels.append(d.name)
        return texts, np.asarray(labels, dtype=str)

    def __len__(self) -> int:
        return len(self.labels)

    def get_batch(self, indices: np.ndarray) -> Batch:
        """Token ids, attention masks and labels."""
        return {"input_ids": self.input_ids[indices], "attention_mask": self.attention_mask[indices],
                "label": self.labels[indices]}

    def summary(self) -> dict[str, Any]:
        """Counts per class, truncation and padding statistics."""
        s = super().summary()
        lengths = self.attention_mask.sum(axis=1)
        counts = np.bincount(self.labels, minlength=len(self.classes))
        s.update({"classes": {c: int(n) for c, n in zip(self.classes, counts.tolist())},
                  "max_length": self.max_length, "tokenizer": str(self.tokenizer_path),
                  "vocab_size": self.tokenizer.get_vocab_size(),
                  "tokens_mean": float(lengths.mean()), "truncated": int((lengths >= self.max_length).sum()),
                  "skipped": {"count": len(self.skipped), "first": self.skipped[:5]}})
        return s
