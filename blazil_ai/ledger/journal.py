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

Like TigerBeetle's data file, a journal file is preallocated: it grows in whole blocks of zeros
(:data:`BLOCK`) ahead of its entries, and the writer always leaves a zero header after the last entry. A
crash never shrinks a file, so a file that ends inside or right after its entries was cut short after the
fact (a truncation loses acknowledged entries): that is refused too, never taken for a torn write. A
torn tail found at open is overwritten with zeros, so the next write starts on a clean end.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

HEADER = struct.Struct("<IHHQQIIQII")
KIND_SEAL = 0x7FFF
BLOCK = 1 << 20  # a journal file grows by this many zero bytes at a time


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
    truncated: bool = False  # the file ends inside (or right after) its entries: cut short after the fact
    written_end: int = 0  # just past the last non-zero byte of the file

    @property
    def torn(self) -> bool:
        """True when the damage is the unacknowledged tail of the last write (safe to drop)."""
        return not self.truncated and self.proven_durable <= self.offset

    @property
    def dropped_bytes(self) -> int:
        """Written bytes a repair (or, for a torn tail, recovery) drops."""
        return max(0, self.written_end - self.offset)

    def describe(self, path: Path | str) -> str:
        """One line naming the file, the offset and the fault."""
        if self.truncated:
            return (f"{path}: truncated at byte offset {self.offset} ({self.problem}): a crash never shrinks a "
                    "journal file, so acknowledged entries after this offset may be gone")
        if self.torn:
            return (f"{path}: torn write at byte offset {self.offset} ({self.problem}): unacknowledged bytes of "
                    "the last write")
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


def scan(data: bytes, magic: int, start: int = 0) -> tuple[list[Frame], Damage | None, int]:
    """Intact entries from ``start`` up to the first bad one, that damage (None if the file is whole), and the
    offset where the entries end."""
    frames: list[Frame] = []
    off, size = start, len(data)
    zeros = np.frombuffer(data, dtype=np.uint8)
    if size == start:
        return frames, None, off  # a file created but never grown (a crash right after its creation)
    while True:
        if size - off < HEADER.size:
            if zeros[off:].any() or off == size:
                return frames, Damage(off, "the file ends inside or right after its entries", size, 0, [], True,
                                      size), off
            return frames, None, off
        if not zeros[off: off + HEADER.size].any():
            if not zeros[off:].any():
                return frames, None, off  # the zero tail: the end of the entries
            return frames, _damage(data, magic, off, "unwritten header before written bytes"), off
        h = _header_at(data, off, magic)
        if h is None:
            problem = "bad magic" if HEADER.unpack_from(data, off)[0] != magic else "header checksum mismatch"
            return frames, _damage(data, magic, off, problem), off
        _m, kind, _f, seq, ts, count, plen, durable, pcrc, _hc = h
        end = off + HEADER.size + plen
        if end > size:
            return frames, Damage(off, "entry runs past the end of the file", size, 0, [], True, size), off
        if zlib.crc32(data[off + HEADER.size: end]) != pcrc:
            return frames, _damage(data, magic, off, "payload checksum mismatch"), off
        frames.append(Frame(off, kind, seq, ts, count, durable, data[off + HEADER.size: end]))
        off = end


def _damage(data: bytes, magic: int, off: int, problem: str) -> Damage:
    """Look past the bad entry for intact headers, and the highest durable mark they record."""
    nz = np.flatnonzero(np.frombuffer(data, dtype=np.uint8)[off:])
    d = Damage(off, problem, len(data), 0, written_end=off + int(nz[-1]) + 1 if len(nz) else off)
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


class JournalFile:
    """Appends entries at the end of a journal file's entries, growing it in zero blocks ahead of them."""

    def __init__(self, path: Path, magic: int, end: int, fsync: bool = True) -> None:
        self.path = path
        self.magic = magic
        self.fsync = fsync
        self.fd = os.open(path, os.O_RDWR)
        self.size = os.fstat(self.fd).st_size
        self.end = self.synced = end  # where the next entry goes; bytes known to be on disk

    @staticmethod
    def create(path: Path, prefix: bytes = b"") -> None:
        """A new journal file: ``prefix`` (a file magic) and a block of zeros, on disk before it is used."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, prefix)
            os.ftruncate(fd, BLOCK)
            os.fsync(fd)
        except BaseException:
            path.unlink(missing_ok=True)  # a full disk: leave no half-made file
            raise
        finally:
            os.close(fd)
        fsync_dir(path.parent)

    def append(self, parts: list[bytes | memoryview]) -> None:
        """Write entries (header, payload, ...) after the last one; a zero header always stays after them."""
        total = sum(len(p) for p in parts)
        need = self.end + total + 2 * HEADER.size  # room for a seal and the zero header after it
        if need > self.size:
            self.size = -(-need // BLOCK) * BLOCK
            os.ftruncate(self.fd, self.size)
        written = os.pwritev(self.fd, parts, self.end)
        if written < total:  # a short write: finish the rest byte-exactly
            flat = b"".join(bytes(p) for p in parts)
            while written < total:
                written += os.pwrite(self.fd, flat[written:], self.end + written)
        self.end += total

    def seal(self) -> None:
        """Append a SEAL entry: everything synced so far is durable (and may be acknowledged)."""
        self.append([encode(self.magic, KIND_SEAL, 0, 0, 0, b"", self.synced)])

    def sync(self) -> None:
        """Make everything appended durable (fdatasync; the file's size goes with its data)."""
        if self.fsync:
            os.fdatasync(self.fd)
        self.synced = self.end

    def close(self) -> None:
        """Close the file."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def clear_tail(path: Path, offset: int, magic: int | None = None, durable: int = 0) -> None:
    """Overwrite everything from ``offset`` to the end of the file with zeros (dropping a torn tail, or, for a
    repair, damaged entries), keep the zero tail, and optionally seal what stays (``magic``); then fsync."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(offset)
        left = size - offset
        while left > 0:
            n = min(left, BLOCK)
            f.write(b"\0" * n)
            left -= n
        end = offset
        if magic is not None:
            f.seek(offset)
            seal = encode(magic, KIND_SEAL, 0, 0, 0, b"", durable)
            f.write(seal)
            end += len(seal)
        want = -(-(end + HEADER.size) // BLOCK) * BLOCK
        if want > size:
            f.truncate(want)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(directory: Path) -> None:
    """Make a directory's entries (created, renamed, removed files) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | Callable[[BinaryIO], None]) -> None:
    """Write ``path`` (bytes, or a function writing to the open file) through a temporary file, fsync and
    rename; a failure (a full disk) leaves no temporary file behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
