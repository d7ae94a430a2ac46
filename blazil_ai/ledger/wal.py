"""The write-ahead log: every create batch, as its raw 128-byte records, checksummed, before it is acked.

A log is a directory of segment files ``wal-<first seq>.log``. Each segment is a journal
(:mod:`blazil_ai.ledger.journal`): entries of a 48-byte header (magic ``BLW2``, kind, seq, timestamp,
record count, payload length, the durable mark, payload and header checksums) followed by the batch's
records. ``timestamp`` is the first timestamp the engine gave the batch, so replaying it rebuilds exactly
the same state.

A batch is acknowledged only once a later fsynced write (the next batch, or a ``SEAL`` entry) records it
as durable. Recovery:

* a torn tail of the newest segment (bytes of a write nobody was told about) is dropped; the ledger
  logs the file, offset and entries it dropped and cuts the file there (a read-only open only reports it);
* any other bad entry, anywhere, is damage to acknowledged data: opening stops with a DataError naming
  the file and byte offset. ``blazil ledger verify`` reports it; ``blazil ledger repair`` drops it on request.

Which segments must exist is recorded in the ledger's ``MANIFEST`` (:mod:`blazil_ai.ledger.manifest`).
"""

from __future__ import annotations

import logging
import os
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from blazil_ai.errors import DataError
from blazil_ai.ledger import journal
from blazil_ai.ledger.journal import KIND_SEAL, Damage, fsync_dir

log = logging.getLogger(__name__)

MAGIC = 0x32574C42  # "BLW2"
OLD_MAGIC = b"BLW1"
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


def encode(kind: int, seq: int, timestamp: int, records: np.ndarray, durable: int = 0) -> tuple[bytes, memoryview]:
    """Header bytes and payload view of one entry (the payload is the records' own buffer, not a copy)."""
    payload = memoryview(np.ascontiguousarray(records).view(np.uint8))  # type: ignore[arg-type]
    return journal.encode(MAGIC, kind, seq, timestamp, len(records), payload, durable), payload


def segment_name(first_seq: int) -> str:
    """File name of the segment whose first entry is ``first_seq``."""
    return f"wal-{first_seq:020d}.log"


def segments(directory: Path) -> list[tuple[int, Path]]:
    """(first seq, path) of each segment, oldest first."""
    out = []
    for p in directory.iterdir():
        m = _SEGMENT.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


@dataclass(slots=True)
class SegmentScan:
    """What one segment holds: its intact entries, the first damage if any, and where its entries end."""

    path: Path
    entries: list[WalEntry]
    damage: Damage | None
    end: int


def scan_segment(path: Path) -> SegmentScan:
    """Read one segment without changing it."""
    data = path.read_bytes()
    if data[:4] == OLD_MAGIC:
        raise DataError("write-ahead log segment is in the format of an earlier version (BLW1); this version "
                        "reads BLW2 only: open the ledger with the version that wrote it and export it",
                        path=str(path))
    frames, damage, end = journal.scan(data, MAGIC)
    entries = []
    for f in frames:
        if f.kind == KIND_SEAL:
            continue
        if len(f.payload) != f.count * 128:
            # the checksums held, so the writer itself wrote a bad entry: never a torn write
            raise DataError(f"write-ahead log entry at byte offset {f.offset} holds {len(f.payload)} bytes for "
                            f"{f.count} records", path=str(path))
        entries.append(WalEntry(f.kind, f.seq, f.timestamp, f.payload))
    return SegmentScan(path, entries, damage, end)


def refuse(damage: Damage, path: Path) -> DataError:
    """The error that stops an open at damaged acknowledged data."""
    why = ("the file was cut short" if damage.truncated else
           f"an entry after it proves the log was written and acknowledged up to offset {damage.proven_durable}")
    return DataError(f"write-ahead log is damaged at byte offset {damage.offset} ({damage.problem}); {why}, so "
                     "this is not a torn write. The ledger will not open: restore it from a backup, or run "
                     "'blazil ledger repair' to drop the damaged entry and everything after it", path=str(path))


def read_segment(path: Path, last: bool, writable: bool = True) -> tuple[list[WalEntry], int]:
    """Entries of one segment and where they end; a torn tail of the newest segment is dropped (overwritten
    with zeros when writable) and logged, any other damage raises."""
    s = scan_segment(path)
    if s.damage is not None and (not last or not s.damage.torn):
        raise refuse(s.damage, path)
    if s.damage is not None:
        lost = [e.seq for e in s.damage.later_entries if e.kind != KIND_SEAL]
        log.warning("%s; dropped%s (never acknowledged)%s", s.damage.describe(path),
                    f" entries seq {min(lost)}..{max(lost)}" if lost else " them",
                    "" if writable else " [read-only: file left as is]")
        if writable:
            journal.clear_tail(path, s.damage.offset)
    return s.entries, s.end


def encode_entries(entries: list[tuple[int, int, int, np.ndarray]]) -> Callable[[int], list[bytes | memoryview]]:
    """Checksum the payloads of (kind, seq, timestamp, records) entries now; the returned function builds the
    write (headers and payloads) once the durable mark is known, under the log's lock."""
    payloads = [memoryview(np.ascontiguousarray(r).view(np.uint8)) for _k, _s, _t, r in entries]  # type: ignore[arg-type]
    crcs = [zlib.crc32(p) for p in payloads]

    def build(durable: int) -> list[bytes | memoryview]:
        parts: list[bytes | memoryview] = []
        for (kind, seq, ts, records), payload, crc in zip(entries, payloads, crcs):
            parts.append(journal.encode(MAGIC, kind, seq, ts, len(records), payload, durable, crc))
            parts.append(payload)
        return parts
    return build


class WriteAheadLog:
    """Appends entries to the current segment; ``sync()`` makes everything appended durable."""

    def __init__(self, directory: str | os.PathLike[str], fsync: bool = True, writable: bool = True) -> None:
        self.directory = Path(directory)
        self.fsync = fsync
        self.writable = writable
        self._file: journal.JournalFile | None = None
        self.segment_path: Path | None = None
        self.first_seq = 1  # first seq of the current segment
        self._end = 0  # where the entries of the newest segment read by recover() end
        self._previous: tuple[Path, int, int] | None = None  # the segment before the last rotation

    @property
    def synced(self) -> int:
        """Bytes of the current segment known to be on disk (the durable mark of the next write)."""
        return self._file.synced if self._file is not None else 0

    @property
    def bytes_written(self) -> int:
        """Bytes of entries in the current segment."""
        return self._file.end if self._file is not None else 0

    def recover(self, after_seq: int, listed: list[int]) -> Iterator[WalEntry]:
        """Entries after the checkpoint at ``after_seq``, in order: the segments from ``listed[0]`` (as the
        MANIFEST names them) must all be there and continue seq by seq from ``after_seq + 1``."""
        on_disk = segments(self.directory)
        names = {first for first, _p in on_disk}
        for first in listed:
            if first not in names:
                raise DataError(f"log segment {segment_name(first)} named by the MANIFEST is missing; the ledger "
                                "will not open (its entries are gone)", path=str(self.directory / segment_name(first)))
        use = [(first, p) for first, p in on_disk if first >= listed[0]]
        expected = after_seq + 1
        for i, (first, path) in enumerate(use):
            if first != expected:
                raise DataError(f"log segment starts at seq {first} but the log continues at seq {expected}: the "
                                f"segment holding seq {expected} is missing", path=str(path))
            entries, self._end = read_segment(path, last=i == len(use) - 1, writable=self.writable)
            for entry in entries:
                if entry.seq != expected:
                    raise DataError(f"write-ahead log skips from seq {expected - 1} to {entry.seq}", path=str(path))
                expected += 1
                yield entry
            self.first_seq = first
        self.segment_path = use[-1][1] if use else None

    def open_segment(self) -> None:
        """Append to the newest segment recovery read."""
        assert self.segment_path is not None, "recover() first"
        self.close()
        self._file = journal.JournalFile(self.segment_path, MAGIC, self._end, self.fsync)

    def rotate(self, first_seq: int) -> None:
        """Close the current segment and start a new one at ``first_seq`` (after a checkpoint)."""
        assert self.segment_path is not None
        path = self.directory / segment_name(first_seq)
        journal.JournalFile.create(path)  # first: if it fails, the current segment stays open
        self._previous = (self.segment_path, self.first_seq, self.bytes_written)
        self.close()
        self.segment_path, self.first_seq, self._end = path, first_seq, 0
        self.open_segment()

    def rotate_back(self) -> None:
        """Undo the last rotation (nothing was appended since): the new, empty segment is removed."""
        assert self._previous is not None and self.segment_path is not None
        self.close()
        self.segment_path.unlink(missing_ok=True)
        self.segment_path, self.first_seq, self._end = self._previous
        self.open_segment()

    def unlisted(self, listed: list[int]) -> list[int]:
        """Segments newer than the MANIFEST's last one."""
        return [first for first, _p in segments(self.directory) if first > listed[-1]]

    def drop_before(self, first_seq: int) -> None:
        """Delete segments older than ``first_seq`` (covered by the checkpoint the MANIFEST names)."""
        for start, path in segments(self.directory):
            if start < first_seq and path != self.segment_path:
                path.unlink()
        fsync_dir(self.directory)

    def append(self, parts: list[bytes | memoryview]) -> None:
        """Write encoded entries (header, payload, header, payload, ...) to the current segment."""
        assert self._file is not None, "open_segment() first"
        self._file.append(parts)

    def seal(self) -> None:
        """Append a SEAL entry recording everything synced so far as durable (acknowledgeable)."""
        assert self._file is not None, "open_segment() first"
        self._file.seal()

    def sync(self) -> None:
        """Make every appended entry durable (fdatasync)."""
        if self._file is not None:
            self._file.sync()

    def commit(self, kind: int, seq: int, timestamp: int, records: np.ndarray) -> None:
        """Append one entry, fsync, seal and fsync again: on return it is durable and provably so."""
        self.append(encode_entries([(kind, seq, timestamp, records)])(self.synced))
        self.sync()
        self.seal()
        self.sync()

    def close(self) -> None:
        """Close the current segment file."""
        if self._file is not None:
            self._file.close()
            self._file = None
