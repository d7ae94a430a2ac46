"""Append-only journal files: framed, checksummed entries that tell a torn write from damaged acknowledged data.

The ledger's write-ahead log segments and the fraud service's decision log are journals. Each entry is a
48-byte header and a payload::

    magic u32 | kind u16 | flags u16 | seq u64 | timestamp u64 | count u32 | payload_len u32 |
    durable u64 | payload_crc u32 | header_crc u32

``header_crc`` (crc32 of the first 44 bytes) lets a reader trust the header on its own, so a damaged
entry cannot hide the entries after it behind a wrong length: the reader finds them again by their magic
and header checksum. ``durable`` is how many bytes of the file had been fsynced when the write holding
the entry began: everything before that offset was on disk, complete, before this entry was written.

A writer acknowledges nothing until a *later* fsynced write records it as durable (in its ``durable``
field); with no more work to write, it appends a ``SEAL`` entry (no payload) and fsyncs it. Recovery then
tells the two faults apart:

* **torn write**: the first bad byte lies at or beyond every ``durable`` mark found after it. The bytes
  there belonged to a write whose fsync had not returned (or had not been recorded), so nothing in it was
  acknowledged. It is dropped, and the caller logs what was dropped.
* **damage to acknowledged data**: some entry after the bad one records a ``durable`` mark beyond it, so
  the damaged bytes were on disk and sealed before. The journal refuses to open, naming file and offset.

This is TigerBeetle's rule for its write-ahead log (a prepare may be truncated only when no later record
proves it was written), with the proof kept inside the journal instead of a second ring of headers.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

HEADER = struct.Struct("<IHHQQIIQII")
KIND_SEAL = 0x7FFF


@dataclass(slots=True)
class Frame:
    """One intact entry."""

    offset: int
    kind: int
    seq: int
    timestamp: int
    count: int
    durable: int
    payload: bytes

    @property
    def end(self) -> int:
        """Offset just past this entry."""
        return self.offset + HEADER.size + len(self.payload)


@dataclass(slots=True)
class Damage:
    """The first bad entry of a journal file and what the entries after it prove about it."""

    offset: int
    problem: str
    size: int  # file size
    proven_durable: int  # the highest ``durable`` mark recorded by an intact header after the damage
    later_entries: list[Frame] = field(default_factory=list)  # intact entries found after the damage

    @property
    def torn(self) -> bool:
        """True when the damage is the unacknowledged tail of the last write (safe to drop)."""
        return self.proven_durable <= self.offset

    @property
    def dropped_bytes(self) -> int:
        """Bytes a repair (or, for a torn tail, recovery) cuts off."""
        return self.size - self.offset

    def describe(self, path: Path | str) -> str:
        """One line naming the file, the offset and the fault."""
        if self.torn:
            return (f"{path}: torn write at byte offset {self.offset} ({self.problem}): {self.dropped_bytes} "
                    f"unacknowledged bytes at the end of the file")
        return (f"{path}: damaged at byte offset {self.offset} ({self.problem}); an entry after it proves bytes "
                f"up to offset {self.proven_durable} were written and acknowledged")


def encode(magic: int, kind: int, seq: int, timestamp: int, count: int, payload: bytes | memoryview,
           durable: int, payload_crc: int | None = None) -> bytes:
    """Header bytes of one entry (the payload is written after it as is)."""
    crc = zlib.crc32(payload) if payload_crc is None else payload_crc
    head = HEADER.pack(magic, kind, 0, seq, timestamp, count, len(payload), durable, crc, 0)
    return head[:44] + struct.pack("<I", zlib.crc32(head[:44]))


def _header_at(data: bytes | memoryview, off: int, magic: int) -> tuple[int, ...] | None:
    if len(data) - off < HEADER.size:
        return None
    fields = HEADER.unpack_from(data, off)
    if fields[0] != magic or zlib.crc32(data[off: off + 44]) != fields[9]:
        return None
    return fields  # type: ignore[no-any-return]


def scan(data: bytes, magic: int, start: int = 0) -> tuple[list[Frame], Damage | None]:
    """Intact entries from ``start`` up to the first bad one, and that damage (None if the file is whole)."""
    frames: list[Frame] = []
    off, size = start, len(data)
    while off < size:
        problem = None
        h = _header_at(data, off, magic)
        if h is None:
            if size - off < HEADER.size:
                problem = "truncated header"
            elif HEADER.unpack_from(data, off)[0] != magic:
                problem = "bad magic"
            else:
                problem = "header checksum mismatch"
        else:
            _m, kind, _f, seq, ts, count, plen, durable, pcrc, _hc = h
            end = off + HEADER.size + plen
            if end > size:
                problem = "truncated payload"
            elif zlib.crc32(data[off + HEADER.size: end]) != pcrc:
                problem = "payload checksum mismatch"
            else:
                frames.append(Frame(off, kind, seq, ts, count, durable, data[off + HEADER.size: end]))
                off = end
                continue
        return frames, _damage(data, magic, off, problem)
    return frames, None


def _damage(data: bytes, magic: int, off: int, problem: str) -> Damage:
    """Look past the bad entry for intact headers, and the highest durable mark they record."""
    d = Damage(off, problem, len(data), 0)
    key = struct.pack("<I", magic)
    pos = data.find(key, off + 1)
    while pos != -1:
        h = _header_at(data, pos, magic)
        if h is not None:
            d.proven_durable = max(d.proven_durable, int(h[7]))
            end = pos + HEADER.size + int(h[6])
            if end <= len(data) and zlib.crc32(data[pos + HEADER.size: end]) == h[8]:
                d.later_entries.append(Frame(pos, h[1], h[3], h[4], h[5], h[7], data[pos + HEADER.size: end]))
                pos = data.find(key, end)
                continue
        pos = data.find(key, pos + 1)
    return d


def truncate(path: Path, offset: int) -> None:
    """Cut a journal file at ``offset`` and make the new length durable."""
    with open(path, "r+b") as f:
        f.truncate(offset)
        os.fsync(f.fileno())


def fsync_dir(directory: Path) -> None:
    """Make a directory's entries (created, renamed, removed files) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` through a temporary file, fsync and rename; a failure leaves no temporary file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
