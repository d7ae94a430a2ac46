"""One durable ledger (one shard): engine + write-ahead log + checkpoints, driven through a ring buffer.

Requests from any thread are published into a :class:`~blazil_ai.ledger.ring.RingBuffer`. The engine
thread takes everything published as one batch, applies it, and hands the encoded log entries to the
log thread through a second ring. The log thread writes all entries it has, fsyncs once (group commit)
and only then completes the requests' futures, reads included, so nothing is answered before it is
durable. While the log thread waits for the disk, the engine thread already works on the next batch.

The threads hand work over through the GIL; a process that runs the ledger under load acks sooner with a
shorter switch interval (``sys.setswitchinterval(0.0002)``; ``blazil ledger serve`` sets it). A library
does not change that process-wide setting on its own.

A batch is acknowledged once a later fsynced write records it as durable: under load the next batch's
write does (no extra fsync), otherwise a small SEAL entry (:mod:`blazil_ai.ledger.journal`). That is what
lets recovery tell a torn, unacknowledged tail from damage to acknowledged data.

The directory must have been created as a ledger (``blazil ledger format`` or ``create=True``); its
``MANIFEST`` names the checkpoint and the log segments, so a missing one is refused by name. A read-only
open (``read_only=True``; ``blazil ledger inspect``) writes nothing, not even the ``LOCK`` file.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from blazil_ai import metrics
from blazil_ai.errors import BlazilError, ConfigError, DataError
from blazil_ai.ledger import checkpoint as ckpt
from blazil_ai.ledger import manifest as mf
from blazil_ai.ledger.engine import Engine, check_capacity
from blazil_ai.ledger.ring import RingBuffer, RingClosed
from blazil_ai.ledger.types import LocalOp, Operation, as_account_array, as_transfer_array, backend_op, own_records
from blazil_ai.ledger.wal import KIND_ACCOUNTS, KIND_TRANSFERS, WriteAheadLog, encode_entries

# A write spread over shards: its records, then each event's timestamp offset (u32), the count in the last 4 bytes.
SPREAD = 6
KIND_ACCOUNTS_SPREAD, KIND_TRANSFERS_SPREAD = KIND_ACCOUNTS + SPREAD, KIND_TRANSFERS + SPREAD


def _spread(records: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    n = len(records)
    tail = np.zeros(-(-(4 * n + 4) // 128) * 128, dtype=np.uint8)
    tail[: 4 * n] = offsets.astype("<u4").view(np.uint8)
    tail[-4:] = np.array([n], dtype="<u4").view(np.uint8)
    return np.concatenate([np.ascontiguousarray(records).view(np.uint8).ravel(), tail]).view("V128")


def _unspread(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = rows.reshape(-1)
    n = int(flat[-4:].view("<u4")[0])
    return rows[:n], flat[n * 128: n * 128 + 4 * n].view("<u4").astype(np.int64)

log = logging.getLogger(__name__)

_BATCH_SECONDS = metrics.histogram("ledger", "batch_latency", "seconds", "Request latency, submit to durable ack",
                                   labels=("op",))
_EVENTS = metrics.counter("ledger", "events", "total", "Events applied", labels=("op",))
_FSYNCS = metrics.counter("ledger", "fsyncs", "total", "Log fsyncs (group commits)")
_REPLAYED = metrics.counter("ledger", "replayed_entries", "total", "Log entries replayed at open")

WAL_KIND = {Operation.CREATE_ACCOUNTS: KIND_ACCOUNTS, Operation.CREATE_TRANSFERS: KIND_TRANSFERS}
Request = Operation | LocalOp
Done = tuple[Future[Any], Any, Request, float, int]  # (future, result or exception, request, t0, events)


class LedgerClosed(BlazilError):
    """The ledger was closed or failed; no more requests are taken."""


class LocalLedger:
    """A durable single-shard ledger in ``directory`` (made by ``format_ledger`` or ``create=True``)."""

    def __init__(self, directory: str | os.PathLike[str], *, clock: Callable[[], int] = time.time_ns,
                 fsync: bool = True, checkpoint_bytes: int = 256 << 20, ring_size: int = 1024,
                 capacity: int = 1 << 16, read_only: bool = False, create: bool = False) -> None:
        self.directory = Path(directory)
        self.read_only = read_only
        check_capacity(capacity)  # before anything is written
        if create and not read_only and not mf.is_ledger(self.directory):
            format_ledger(self.directory)
        check_ledger_dir(self.directory)
        self._lock_fd = lock_directory(self.directory, read_only)
        try:
            self.manifest = mf.read(self.directory)
            self.engine = Engine(clock=clock, capacity=capacity)
            self.seq = 0
            if self.manifest.checkpoint:
                c = self.manifest.checkpoint
                self.seq = ckpt.load(self.engine, self.directory / c["name"], int(c["seq"]), int(c["bytes"]),
                                     int(c["crc32"]))
            self.checkpoint_seq = self.seq
            self.wal = WriteAheadLog(self.directory, fsync=fsync, writable=not read_only)
            replayed = 0
            for entry in self.wal.recover(self.seq, self.manifest.segments):
                records = np.frombuffer(entry.payload, dtype=np.uint8).reshape(-1, 128)
                offsets = None
                if entry.kind in (KIND_ACCOUNTS_SPREAD, KIND_TRANSFERS_SPREAD):
                    records, offsets = _unspread(records)
                if entry.kind in (KIND_ACCOUNTS, KIND_ACCOUNTS_SPREAD):
                    self.engine.create_accounts(as_account_array(records.view("V128").ravel()), entry.timestamp,
                                                offsets)
                else:
                    self.engine.create_transfers(as_transfer_array(records.view("V128").ravel()), entry.timestamp,
                                                 offsets)
                self.seq = entry.seq
                replayed += 1
            _REPLAYED.inc(replayed)
            self.replayed = replayed
            if not read_only:
                self._tidy()
                self.wal.open_segment()
        except BaseException:
            os.close(self._lock_fd)
            raise
        self.checkpoint_bytes = checkpoint_bytes
        self._failed: BaseException | None = None
        self._closed = False
        self._ring: RingBuffer[tuple[Request, Any, Future[Any], float, tuple[Any, Any]]] = RingBuffer(ring_size)
        self._log_ring: RingBuffer[tuple[list[Any], list[Done]]] = RingBuffer(ring_size)
        self._wal_lock = threading.Lock()
        self._engine_thread = threading.Thread(target=self._engine_loop, name="ledger-engine", daemon=True)
        self._log_thread = threading.Thread(target=self._log_loop, name="ledger-log", daemon=True)
        self._engine_thread.start()
        self._log_thread.start()

    # ---------------------------------------------------------------- requests

    def submit(self, op: Request | str, arg: Any, timestamp: int | None = None, offsets: np.ndarray | None = None
               ) -> Future[Any]:
        """Queue one request; the future completes once it (and everything before it) is durable. A write may
        name its first timestamp and each event's offset from it (a sharded ledger stamps each event of one
        request by its place in the request, whichever shard it lands on)."""
        op = backend_op(op)
        if self._failed is not None:
            raise LedgerClosed(f"ledger failed: {self._failed}")
        if self._closed:
            raise LedgerClosed("ledger is closed")
        if self.read_only and op.writes:
            raise LedgerClosed(f"ledger {self.directory} is open read-only; {op.key} is refused")
        if op in WAL_KIND:
            # Own the records: the caller may reuse its array while the batch waits in the ring.
            arg = own_records(as_transfer_array(arg) if op is Operation.CREATE_TRANSFERS else as_account_array(arg))
        fut: Future[Any] = Future()
        try:
            self._ring.publish((op, arg, fut, time.perf_counter(), (timestamp, offsets)))
        except RingClosed as e:
            raise LedgerClosed("ledger is closed") from e
        return fut

    def call(self, op: Request | str, arg: Any = None) -> Any:
        """Submit and wait for the result."""
        return self.submit(op, arg).result()

    def create_accounts(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(engine status codes, timestamps) once the batch is durable."""
        return self.call(Operation.CREATE_ACCOUNTS, batch)  # type: ignore[no-any-return]

    def create_transfers(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(engine status codes, timestamps) once the batch is durable."""
        return self.call(Operation.CREATE_TRANSFERS, batch)  # type: ignore[no-any-return]

    def checkpoint(self) -> int:
        """Write a checkpoint now; returns its log sequence."""
        return self.call(LocalOp.CHECKPOINT, None)  # type: ignore[no-any-return]

    # ---------------------------------------------------------------- threads

    def _engine_loop(self) -> None:
        eng = self.engine
        for reqs in self._ring.batches():
            parts: list[Any] = []
            done: list[Done] = []
            for op, arg, fut, t0, stamp in reqs:
                try:
                    if op in WAL_KIND:
                        first, offsets = stamp
                        span = len(arg) if offsets is None or not len(arg) else int(offsets[-1]) + 1
                        base = eng.next_timestamps(span) if first is None else max(first, eng.last_timestamp + 1)
                        if op is Operation.CREATE_TRANSFERS:
                            result = eng.create_transfers(arg, base, offsets)
                        else:
                            result = eng.create_accounts(arg, base, offsets)
                        self.seq += 1
                        if offsets is None:  # encoded (crc32) by the log thread
                            parts.append((WAL_KIND[op], self.seq, base, arg))
                        else:
                            parts.append((WAL_KIND[op] + SPREAD, self.seq, base, _spread(arg, offsets)))
                        done.append((fut, result, op, t0, len(arg)))
                    elif op is LocalOp.CHECKPOINT:
                        ahead, parts, done = (parts, done), [], []
                        self._flush_log(*ahead)
                        done.append((fut, self._checkpoint(), op, t0, 0))
                    else:
                        eng.expire_pending(eng.clock())
                        done.append((fut, self._read(op, arg), op, t0, 0))
                except Exception as e:  # a bad request fails alone; the engine state is unchanged by it
                    done.append((fut, e, op, t0, 0))
            self._log_ring.publish((parts, done))
            if self.wal.bytes_written >= self.checkpoint_bytes and self._failed is None:
                try:
                    self._flush_log([], [])
                    self._checkpoint()
                except Exception as e:  # the log still holds everything; keep serving
                    log.error("checkpoint of %s failed, the log keeps growing: %s", self.directory, e)

    def _flush_log(self, parts: list[Any], done: list[Any]) -> None:
        barrier: Future[Any] = Future()
        self._log_ring.publish((parts, [*done, (barrier, None, LocalOp.BARRIER, 0.0, 0)]))
        barrier.result()

    def _checkpoint(self) -> int:
        """Checkpoint, start a new segment, name both in the MANIFEST, then drop what they replace."""
        with self._wal_lock:
            seq, old = self.seq, self.manifest
            if old.checkpoint and seq == old.checkpoint_seq:
                return seq  # nothing logged since the last checkpoint
            path = ckpt.save(self.engine, self.directory, seq)
            rotated = False
            try:
                size, crc = mf.file_crc(path)
                if seq + 1 != self.wal.first_seq:
                    self.wal.rotate(seq + 1)
                    rotated = True
                m = mf.Manifest(old.ledger_id, old.role, old.shard, old.shards,
                                {"seq": seq, "name": path.name, "bytes": size, "crc32": crc}, [seq + 1])
                mf.write(self.directory, m)
            except BaseException:
                # Nothing was appended since the rotation: go back to the old segment and checkpoint.
                if rotated:
                    self.wal.rotate_back()
                path.unlink(missing_ok=True)
                raise
            self.manifest = m
            self.checkpoint_seq = seq
            self._tidy()
        return seq

    def _tidy(self) -> None:
        """Remove checkpoints and segments the MANIFEST no longer names, and temporary files of a failed write."""
        keep = self.manifest.checkpoint["name"] if self.manifest.checkpoint else None
        for _seq, path in ckpt.checkpoints(self.directory):
            if path.name != keep:
                path.unlink()
        for p in self.directory.glob(".*.tmp"):
            p.unlink()
        self.wal.drop_before(self.manifest.segments[0])
        adopted = self.wal.unlisted(self.manifest.segments)
        if adopted:  # a checkpoint that stopped before its MANIFEST: name its segment now
            self.manifest.segments = [*self.manifest.segments, *adopted]
            mf.write(self.directory, self.manifest)

    def _read(self, op: Request, arg: Any) -> Any:
        eng = self.engine
        if op is LocalOp.BARRIER:  # answered once everything queued before it is applied and durable
            return None
        if op is LocalOp.TOTALS:
            return eng.totals()
        if op is LocalOp.EXPIRE:
            return eng.expire_pending(eng.clock() if arg is None else arg)
        return getattr(eng, op.key)(arg)  # the engine's read methods are named as the client's

    def _log_loop(self) -> None:
        for items in self._log_ring.batches():
            unsealed = self._write_log(items, [])
            while unsealed:  # written and fsynced, not yet sealed: look for more to write without waiting
                try:
                    items = self._log_ring.take(timeout=0)
                except RingClosed:
                    items = []
                unsealed = self._write_log(items, unsealed)  # none: seal at once

    def _write_log(self, items: list[Any], unsealed: list[Done]) -> list[Done]:
        """Write and fsync ``items``' entries (or a seal), which makes ``unsealed`` acknowledged; completes what
        may be answered and returns the requests written now that wait for the next write to seal them."""
        entries = [entry for item in items for entry in item[0]]
        done = [d for item in items for d in item[1]]
        if entries or unsealed:
            if self._failed is None:
                try:
                    # crc32 of the payloads releases the GIL: it overlaps the engine's next batch
                    encoded = encode_entries(entries)
                    with self._wal_lock:
                        if entries:
                            self.wal.append(encoded(self.wal.synced))
                        else:
                            self.wal.seal()
                        self.wal.sync()
                    _FSYNCS.inc()
                except OSError as e:
                    # Applied in memory but not durable: nothing more may be acked from this process.
                    self._failed = e
                    log.critical("write-ahead log of %s failed, ledger stops: %s", self.directory, e)
            self._complete(unsealed)
            unsealed = []
            if entries:
                unsealed, done = done, []
        self._complete(done)
        return unsealed

    def _complete(self, done: list[Done]) -> None:
        now = time.perf_counter()
        for fut, result, op, t0, n in done:
            if self._failed is not None and (n or op in (LocalOp.BARRIER, LocalOp.CHECKPOINT)):
                fut.set_exception(LedgerClosed(f"write-ahead log failed: {self._failed}"))
            elif isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)
                if n:
                    _EVENTS.labels(op.key).inc(n)
                    _BATCH_SECONDS.labels(op.key).observe(now - t0)

    def close(self, checkpoint: bool = False) -> None:
        """Finish queued requests, optionally checkpoint, stop the threads and release the directory."""
        if self._closed:
            return
        if checkpoint and self._failed is None and not self.read_only:
            self.checkpoint()
        self._closed = True
        self._ring.close()
        self._engine_thread.join()
        self._log_ring.close()
        self._log_thread.join()
        self.wal.close()
        os.close(self._lock_fd)

    def __enter__(self) -> LocalLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_ledger_dir(directory: Path) -> None:
    """ConfigError naming the folder unless it holds a ledger (a typo must not look like an empty ledger)."""
    if not directory.exists():
        raise ConfigError(f"ledger directory {directory} does not exist; create a ledger with "
                          f"'blazil ledger format {directory}' or connect(path, create=True)")
    if not directory.is_dir():
        raise ConfigError(f"ledger path {directory} is not a directory")
    if mf.is_ledger(directory):
        return
    if (directory / mf.LAYOUT).exists():
        raise ConfigError(f"{directory} is a sharded ledger; open it with connect() or ShardedLedger")
    segs = sorted(directory.glob("wal-*.log"))
    if segs and segs[0].read_bytes()[:4] == b"BLW1":
        raise DataError("written by an earlier version (log format BLW1, no MANIFEST); this version cannot open "
                        "it: read it with the version that wrote it", path=str(directory))
    if segs or any(directory.glob("checkpoint-*.npz")):
        mf.read(directory)  # raises: a ledger's files without their MANIFEST
    raise ConfigError(f"{directory} is not a ledger (no MANIFEST); create one with 'blazil ledger format "
                      f"{directory}' or connect(path, create=True)")


def lock_directory(directory: Path, read_only: bool) -> int:
    """Hold the directory's LOCK (shared and without creating it when read-only); returns the descriptor."""
    lock = directory / "LOCK"
    try:
        if read_only:
            fd = os.open(lock if lock.exists() else directory, os.O_RDONLY)
        else:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"ledger directory {directory} cannot be opened for writing ({e.strerror}); "
                          "open it read-only (blazil ledger inspect / verify, or read_only=True)") from e
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError as e:
        os.close(fd)
        raise ConfigError(f"ledger directory {directory} is already open in another process") from e
    return fd


def format_ledger(directory: str | os.PathLike[str], *, role: str = "ledger", ledger_id: str | None = None,
                  shard: int | None = None, shards: int | None = None) -> mf.Manifest:
    """Create an empty ledger in ``directory`` (made if missing; an existing one must be empty)."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise ConfigError(f"ledger path {d} exists and is not a directory")
    if d.exists() and any(d.iterdir()):
        raise ConfigError(f"{d} is not empty; a ledger is created only in a new or empty folder")
    d.mkdir(parents=True, exist_ok=True)
    from blazil_ai.ledger.journal import JournalFile
    from blazil_ai.ledger.wal import segment_name

    JournalFile.create(d / segment_name(1))
    m = mf.Manifest(ledger_id or mf.new_id(), role, shard, shards)
    mf.write(d, m)  # last: a folder without a MANIFEST is not a ledger yet
    return m
