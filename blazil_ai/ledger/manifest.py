"""The ledger's MANIFEST: which checkpoint and which log segments make up a ledger directory.

A directory is a ledger only if it holds a ``MANIFEST`` (written by ``blazil ledger format`` or
``connect(path, create=True)``). The manifest is JSON with its own crc32, replaced atomically (temporary
file, fsync, rename) after each checkpoint. It names:

* the checkpoint (seq, file name, size and crc32 of the whole file), or none;
* the log segments that continue from it (their first seq), which must all exist;
* for a shard, the ledger it belongs to (``ledger_id``), its index and the shard count, so a missing,
  swapped or extra shard folder, or a wrong ``shards.json``, is refused by name.

So a deleted checkpoint, a deleted or replaced segment, a damaged checkpoint and a foreign shard folder
are each detected at open, instead of opening a ledger that silently lacks data.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from blazil_ai.errors import DataError
from blazil_ai.ledger.journal import write_atomic

NAME = "MANIFEST"
LAYOUT = "shards.json"  # what makes a folder a sharded ledger (written by ledger/shards.py)
FORMAT = "blazil-ledger"
VERSION = 2


@dataclass(slots=True)
class Manifest:
    """The contents of one MANIFEST."""

    ledger_id: str
    role: str = "ledger"  # "ledger" (a shard or a single-shard ledger) or "coordinator"
    shard: int | None = None
    shards: int | None = None
    checkpoint: dict[str, Any] | None = None  # {"seq", "name", "bytes", "crc32"}
    segments: list[int] = field(default_factory=lambda: [1])

    @property
    def checkpoint_seq(self) -> int:
        """Seq of the checkpoint (0 when there is none)."""
        return int(self.checkpoint["seq"]) if self.checkpoint else 0


def _body(m: Manifest) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, **asdict(m)}


def write(directory: Path, m: Manifest) -> None:
    """Replace the directory's manifest atomically."""
    body = _body(m)
    text = json.dumps(body, sort_keys=True)
    body["crc32"] = zlib.crc32(text.encode())
    write_atomic(directory / NAME, (json.dumps(body, sort_keys=True, indent=1) + "\n").encode())


def read(directory: Path) -> Manifest:
    """The directory's manifest, checked; DataError naming the file when it is missing or damaged."""
    path = directory / NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError("MANIFEST is missing: the ledger's list of checkpoints and log segments is gone, so "
                        "what it holds cannot be checked", path=str(path)) from None
    try:
        body = json.loads(raw)
        crc = body.pop("crc32")
        if zlib.crc32(json.dumps(body, sort_keys=True).encode()) != crc:
            raise ValueError("checksum mismatch")
        if body.pop("format") != FORMAT:
            raise ValueError("not a ledger manifest")
        version = body.pop("version")
        if version != VERSION:
            raise ValueError(f"format version {version}, this version reads {VERSION}")
        m = Manifest(**body)
        if not m.segments or any(not isinstance(s, int) or s < 1 for s in m.segments):
            raise ValueError("no log segments listed")
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # json.JSONDecodeError is a ValueError
        raise DataError(f"MANIFEST is damaged ({e})", path=str(path)) from e
    return m


def is_ledger(directory: Path) -> bool:
    """Whether the directory was formatted as a ledger (single-shard, shard or coordinator)."""
    return (directory / NAME).exists()


def new_id() -> str:
    """A fresh ledger id (shards carry it to prove they belong together)."""
    return os.urandom(16).hex()


def file_crc(path: Path) -> tuple[int, int]:
    """(size, crc32) of a whole file."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, crc
