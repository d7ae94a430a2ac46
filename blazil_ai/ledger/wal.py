"""The write-ahead log: every create batch, as its raw 128-byte records, checksummed, before it is acked.

A log is a directory of segment files ``wal-<first seq>.log``. Each entry is a 40-byte header followed
by the batch's records::

    magic u32 | kind u16 | reserved u16 | seq u64 | timestamp u64 | count u32 | payload_len u32 | crc32 u32 | pad u32

``crc32`` covers the first 32 header bytes and the payload. ``timestamp`` is the first timestamp the
engine gave the batch, so replaying it rebuilds exactly the same state.

Recovery: an entry cut short at the end of the newest segment (a write torn by a crash, never acked
because the fsync had not returned) is dropped and the file truncated there. A bad entry anywhere else
means the log is corrupt: opening stops with a DataError naming the file and byte offset.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from blazil_ai.errors import DataError

MAGIC = 0x31574C42  # "BLW1"
HEADER = struct.Struct("<IHHQQIIII")
KIND_ACCOUNTS = 1
KIND_TRANSFERS = 2
_SEGMENT = re.compile(r"^wal-(\d{20})\.log$")


@dataclass(slots=True)
class WalEntry:
    """One logged batch."""

    kind: int
    seq: int
    timestamp: int
    payload: bytes


def encode(kind: int, seq: int, timestamp: int, records: np.ndarray) -> tuple[bytes, memoryview]:
    """Header bytes and payload view of one entry (the payload is the records' own buffer, not a copy)."""
    payload = memoryview(np.ascontiguousarray(records).view(np.uint8))  # type: ignore[arg-type]
    head = HEADER.pack(MAGIC, kind, 0, seq, timestamp, len(records), len(payload), 0, 0)
    crc = zlib.crc32(payload, zlib.crc32(head[:32]))
    return HEADER.pack(MAGIC, kind, 0, seq, timestamp, len(records), len(payload), crc, 0), payload


def segments(directory: Path) -> list[tuple[int, Path]]:
    """(first seq, path) of each segment, oldest first."""
    out = []
    for p in directory.iterdir():
        m = _SEGMENT.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def read_segment(path: Path, last: bool) -> Iterator[WalEntry]:
    """Entries of one segment; a torn tail of the newest segment is truncated, other damage raises."""
    data = path.read_bytes()
    off = 0
    size = len(data)
    while off < size:
        problem = None
        if size - off < HEADER.size:
            problem = "truncated header"
        else:
            magic, kind, _r, seq, ts, count, plen, crc, _p = HEADER.unpack_from(data, off)
            end = off + HEADER.size + plen
            if magic != MAGIC:
                problem = "bad magic"
            elif end > size:
                problem = "truncated payload"
            elif plen != count * 128:
                problem = "payload length does not match the record count"
            else:
                payload = data[off + HEADER.size: end]
                if zlib.crc32(payload, zlib.crc32(data[off: off + 32])) != crc:
                    problem = "checksum mismatch"
        if problem is not None:
            torn = last and (problem.startswith("truncated") or (problem == "checksum mismatch" and end == size))
            if torn:
                with open(path, "r+b") as f:
                    f.truncate(off)
                    os.fsync(f.fileno())
                return
            raise DataError(f"write-ahead log is corrupt at byte offset {off} ({problem}); the ledger will not "
                            "open: restore the directory from a backup or remove the damaged segment knowingly",
                            path=str(path))
        yield WalEntry(kind, seq, ts, payload)
        off = end


class WriteAheadLog:
    """Appends entries to the current segment; ``sync()`` makes everything appended durable."""

    def __init__(self, directory: str | os.PathLike[str], fsync: bool = True) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._fd: int | None = None
        self.bytes_written = 0
        self.segment_path: Path | None = None

    def recover(self, after_seq: int) -> Iterator[WalEntry]:
        """Entries with seq greater than ``after_seq``, in order, checking continuity."""
        segs = segments(self.directory)
        expected = None
        for i, (_first, path) in enumerate(segs):
            for entry in read_segment(path, last=i == len(segs) - 1):
                if expected is not None and entry.seq != expected:
                    raise DataError(f"write-ahead log skips from seq {expected - 1} to {entry.seq}",
                                    path=str(path))
                expected = entry.seq + 1
                if entry.seq > after_seq:
                    yield entry

    def open_segment(self, first_seq: int) -> None:
        """Start appending to the segment for ``first_seq`` (the newest existing one is reused)."""
        self.close()
        segs = segments(self.directory)
        path = segs[-1][1] if segs else self.directory / f"wal-{first_seq:020d}.log"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.segment_path = path
        self.bytes_written = os.fstat(self._fd).st_size
        _fsync_dir(self.directory)

    def rotate(self, first_seq: int) -> None:
        """Close the current segment and start a new one at ``first_seq`` (after a checkpoint)."""
        self.close()
        path = self.directory / f"wal-{first_seq:020d}.log"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.segment_path = path
        self.bytes_written = 0
        _fsync_dir(self.directory)

    def drop_before(self, first_seq: int) -> None:
        """Delete segments whose entries all precede ``first_seq`` (covered by a checkpoint)."""
        segs = segments(self.directory)
        for i, (_start, path) in enumerate(segs):
            nxt = segs[i + 1][0] if i + 1 < len(segs) else None
            if nxt is not None and nxt <= first_seq and path != self.segment_path:
                path.unlink()
        _fsync_dir(self.directory)

    def append(self, parts: list[bytes | memoryview]) -> None:
        """Write encoded entries (header, payload, header, payload, ...) to the current segment."""
        assert self._fd is not None, "open_segment() first"
        total = sum(len(p) for p in parts)
        written = os.writev(self._fd, parts)
        while written < total:  # writev may write less than asked; finish the rest byte-exactly
            flat = b"".join(bytes(p) for p in parts)[written:]
            written += os.write(self._fd, flat)
        self.bytes_written += total

    def sync(self) -> None:
        """Make every appended entry durable (fdatasync)."""
        if self.fsync and self._fd is not None:
            os.fdatasync(self._fd)

    def close(self) -> None:
        """Close the current segment file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
