"""Reading many files at once: io_uring through ``liburing``, or a thread pool of ``os.preadv``.

Both readers return a ``FileBatch``: the files' bytes packed into one preallocated numpy buffer with
offsets, so decoding works on zero-copy views. The io_uring reader keeps up to ``depth`` files in flight
and does the whole open -> read -> close inside the ring: one submission opens a chunk of files, the
next one reads each straight into its slice of the buffer with a hard-linked close behind it, and
completions are matched to files by ``user_data``. The thread reader does the same with ``os.preadv``
in a pool, for kernels or sandboxes where io_uring is missing or refused.

``open_reader()`` picks the backend once per process: ``BLAZIL_IO=uring`` or ``threads`` forces one,
otherwise io_uring is probed (ring set-up plus a no-op round trip) and the choice is logged once.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from blazil_ai.errors import ConfigError, DataError

log = logging.getLogger(__name__)

BACKENDS = ("uring", "threads")
_CLOSE = 1 << 40  # user_data tag of the close that follows a read
# One large file. From the page cache, 8 MiB reads with 4 in flight copy fastest. From disk, concurrent
# reads at scattered offsets defeat the kernel's sequential read-ahead (measured on a virtio disk with an
# 8 MiB read-ahead window: ~30% below `dd`), so a file that is not cached is read in order, 1 MiB at a
# time, and the read-ahead keeps the device busy. A non-blocking probe read of the first block tells which.
_BLOCK = 8 << 20
_FILE_DEPTH = 4
_COLD_BLOCK = 1 << 20
_COLD_DEPTH = 1


def _open_target(path: str | Path, out: np.ndarray | None) -> tuple[str, int, int, np.ndarray, memoryview]:
    """Open ``path`` for a whole-file read into ``out`` (allocated when None); the caller closes the descriptor."""
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise DataError(f"cannot open: {e.strerror}", path=name) from None
    try:
        size = os.fstat(fd).st_size
        out = np.empty(size, dtype=np.uint8) if out is None else out
        if out.nbytes < size:
            raise ValueError(f"out has {out.nbytes} bytes, file has {size}")
    except BaseException:
        os.close(fd)
        raise
    return name, fd, size, out, out.reshape(-1).view(np.uint8).data


def _is_cached(fd: int, mv: memoryview, size: int, base: int = 0) -> bool:
    """Whether the span's first block is in the page cache (RWF_NOWAIT read); the probe's bytes are kept."""
    n = min(size, _BLOCK)
    try:
        return n == 0 or os.preadv(fd, [mv[:n]], base, os.RWF_NOWAIT) == n
    except (BlockingIOError, OSError, AttributeError):
        return False


class FileBatch:
    """The bytes of several files in one buffer: ``batch[i]`` is a zero-copy uint8 view of file ``i``."""

    __slots__ = ("paths", "buffer", "offsets")

    def __init__(self, paths: list[str], buffer: np.ndarray, offsets: np.ndarray) -> None:
        self.paths = paths
        self.buffer = buffer
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.buffer[self.offsets[i]:self.offsets[i + 1]]

    @property
    def nbytes(self) -> int:
        """Total bytes read."""
        return int(self.offsets[-1])


def _prepare(paths: Sequence[str | Path], sizes: Sequence[int] | np.ndarray | None) -> tuple[list[str], np.ndarray]:
    names = [os.fspath(p) for p in paths]
    if sizes is None:
        sz = []
        for name in names:
            try:
                sz.append(os.stat(name).st_size)
            except OSError as e:
                raise DataError(f"cannot read: {e.strerror}", path=name) from None
        sizes = sz
    if len(sizes) != len(names):
        raise ValueError(f"{len(names)} paths but {len(sizes)} sizes")
    offsets = np.zeros(len(names) + 1, dtype=np.int64)
    np.cumsum(np.asarray(sizes, dtype=np.int64), out=offsets[1:])
    return names, offsets


def _short_read_error(path: str, got: int, want: int) -> DataError:
    return DataError(f"short read: got {got} of {want} bytes (file truncated or changed while reading)", path=path)


class Reader:
    """Reads whole files (``read_files``) or one large file (``read_file``) with many reads in flight."""

    backend = ""
    depth = 0

    def read_files(self, paths: Sequence[str | Path], sizes: Sequence[int] | np.ndarray | None = None) -> FileBatch:
        """The full contents of each file (``sizes`` from a directory scan saves a stat per file)."""
        raise NotImplementedError

    def read_file(self, path: str | Path, out: np.ndarray | None = None) -> np.ndarray:
        """One file into ``out`` (or a new uint8 array), read in 8 MiB blocks, several in flight."""
        name, fd, size, out, mv = _open_target(path, out)
        try:
            self._read_span(name, fd, 0, size, mv)
            return out
        finally:
            os.close(fd)

    def read_range(self, path: str | Path, offset: int, size: int) -> np.ndarray:
        """``size`` bytes of a file from ``offset`` (a Parquet row group, an Arrow record batch) as a new uint8 array.

        Reading past the end of the file is an error naming the file (a truncated file), never a short array.
        """
        name = os.fspath(path)
        if offset < 0 or size < 0:
            raise ValueError(f"bad range offset={offset} size={size}")
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise DataError(f"cannot open: {e.strerror}", path=name) from None
        try:
            out = np.empty(size, dtype=np.uint8)
            self._read_span(name, fd, offset, size, out.data)
            return out
        finally:
            os.close(fd)

    def _read_span(self, name: str, fd: int, base: int, size: int, mv: memoryview) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release the ring or the threads."""

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ThreadReader(Reader):
    """The fallback: a thread pool calling ``os.preadv`` into slices of the batch buffer."""

    backend = "threads"

    def __init__(self, depth: int = 16) -> None:
        self.depth = depth
        self._pool = ThreadPoolExecutor(depth, thread_name_prefix="blazil-read")

    @staticmethod
    def _read_one(path: str, view: memoryview, offset: int = 0, fd: int | None = None) -> None:
        own = fd is None
        try:
            if own:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            assert fd is not None
            done, want = 0, len(view)
            while done < want:
                n = os.preadv(fd, [view[done:]], offset + done)
                if n == 0:
                    raise _short_read_error(path, done, want)
                done += n
        except OSError as e:
            raise DataError(f"cannot read: {e.strerror}", path=path) from None
        finally:
            if own and fd is not None:
                os.close(fd)

    def read_files(self, paths: Sequence[str | Path], sizes: Sequence[int] | np.ndarray | None = None) -> FileBatch:
        """The full contents of each file, read by the pool."""
        names, offsets = _prepare(paths, sizes)
        buf = np.empty(int(offsets[-1]), dtype=np.uint8)
        mv = buf.data
        futures = [self._pool.submit(self._read_one, name, mv[offsets[i]:offsets[i + 1]])
                   for i, name in enumerate(names)]
        for f in futures:
            f.result()  # re-raises the DataError of the first failing file, in file order
        return FileBatch(names, buf, offsets)

    def _read_span(self, name: str, fd: int, base: int, size: int, mv: memoryview) -> None:
        """8 MiB blocks on the pool when cached; otherwise in order so the kernel's read-ahead works."""
        if not _is_cached(fd, mv, size, base):
            self._read_one(name, mv[:size], base, fd)  # in order: the kernel's read-ahead does the rest
            return
        futures = [self._pool.submit(self._read_one, name, mv[o:min(o + _BLOCK, size)], base + o, fd)
                   for o in range(_BLOCK, size, _BLOCK)]  # block 0 came with the probe
        for f in futures:
            f.result()

    def close(self) -> None:
        """Stop the pool."""
        self._pool.shutdown(wait=True)


class UringReader(Reader):
    """io_uring reader: open, read and close in the ring, ``depth`` files in flight, one buffer per batch."""

    backend = "uring"

    def __init__(self, depth: int = 64) -> None:
        import liburing

        if not 1 <= depth <= 4096:
            raise ConfigError(f"queue depth must be in [1, 4096], got {depth}")
        self._L = liburing
        self.depth = depth
        self._ring = liburing.Ring()
        self._cqe = liburing.Cqe()
        self._lock = threading.Lock()  # one ring, one submitter at a time
        self._open = False
        try:
            liburing.io_uring_queue_init(2 * depth, self._ring, 0)  # 2 entries per file: read + close
        except Exception as e:
            if isinstance(e, OSError):
                raise
            # Any other set-up failure the binding raises becomes the OSError that open_reader falls back on.
            raise OSError(errno.ENOSYS, f"io_uring set-up failed: {e}") from e
        self._open = True
        # A no-op round trip: some sandboxes allow the set-up call but refuse io_uring_enter.
        sqe = liburing.io_uring_get_sqe(self._ring)
        liburing.io_uring_prep_nop(sqe)
        sqe.user_data = 7
        liburing.io_uring_submit_and_wait(self._ring, 1)
        self._reap(1, lambda ud, res: None)

    def _reap(self, want: int, handle) -> None:
        L, ring, cqe = self._L, self._ring, self._cqe
        got = 0
        interrupted: BaseException | None = None
        while got < want:
            n = 0
            for _ in L.CqeIter(ring, cqe):
                entry = cqe[0]
                try:
                    res = entry.res
                except OSError as e:  # the binding raises for negative results; keep them as -errno
                    res = -(e.errno or errno.EIO)
                handle(entry.user_data, res)
                n += 1
            if n:
                L.io_uring_cq_advance(ring, n)  # CqeIter only looks; the ring needs to be told we consumed
                got += n
                continue
            try:
                L.io_uring_wait_cqe(ring, cqe)
            except InterruptedError:
                continue
            except BaseException as e:
                # The kernel may still be writing into buffers the caller would free on the way out
                # (Ctrl-C here): wait for every submitted operation, then raise.
                interrupted = interrupted or e
        if interrupted is not None:
            raise interrupted

    def read_files(self, paths: Sequence[str | Path], sizes: Sequence[int] | np.ndarray | None = None) -> FileBatch:
        """The full contents of each file, opened, read and closed inside the ring."""
        names, offsets = _prepare(paths, sizes)
        buf = np.empty(int(offsets[-1]), dtype=np.uint8)
        mv = buf.data
        errors: dict[int, str] = {}
        with self._lock:
            for start in range(0, len(names), self.depth):
                self._read_chunk(names, offsets, mv, range(start, min(start + self.depth, len(names))), errors)
                if errors:
                    break
        if errors:
            first = min(errors)
            raise DataError(errors[first], path=names[first])
        return FileBatch(names, buf, offsets)

    def _read_chunk(self, names: list[str], offsets: np.ndarray, mv: memoryview, chunk: range,
                    errors: dict[int, str]) -> None:
        L, ring = self._L, self._ring
        flags = L.O_RDONLY | L.O_CLOEXEC
        for i in chunk:
            sqe = L.io_uring_get_sqe(ring)
            L.io_uring_prep_open(sqe, names[i], flags)  # the kernel copies the path at submit time
            sqe.user_data = i
        L.io_uring_submit(ring)
        fds: dict[int, int] = {}

        def on_open(ud: int, res: int) -> None:
            if res < 0:
                errors[ud] = f"cannot open: {os.strerror(-res)}"
            else:
                fds[ud] = res

        try:
            self._reap(len(chunk), on_open)
        except BaseException:
            for fd in fds.values():  # interrupted before the reads: do not leak the descriptors
                os.close(fd)
            raise
        keep = []  # the Iovec objects must outlive the reads that point into them
        n_ops = 0
        for i, fd in fds.items():
            want = int(offsets[i + 1] - offsets[i])
            if want:
                sqe = L.io_uring_get_sqe(ring)
                iov = L.Iovec([mv[offsets[i]:offsets[i + 1]]])
                keep.append(iov)
                L.io_uring_prep_readv(sqe, fd, iov, 0)
                sqe.user_data = i
                sqe.flags |= L.IOSQE_IO_HARDLINK  # the close runs even when the read fails or is short
                n_ops += 1
            sqe = L.io_uring_get_sqe(ring)
            L.io_uring_prep_close(sqe, fd)
            sqe.user_data = _CLOSE | i
            n_ops += 1
        if not n_ops:
            return
        L.io_uring_submit(ring)
        short: dict[int, int] = {}

        def on_read(ud: int, res: int) -> None:
            if ud & _CLOSE:
                return
            want = int(offsets[ud + 1] - offsets[ud])
            if res < 0:
                errors[ud] = f"cannot read: {os.strerror(-res)}"
            elif res < want:
                short[ud] = res

        self._reap(n_ops, on_read)
        for i, got in short.items():
            # A regular file may return less than asked only at EOF, but finish with preadv to be sure.
            want = int(offsets[i + 1] - offsets[i])
            try:
                ThreadReader._read_one(names[i], mv[offsets[i] + got:offsets[i + 1]], got)
            except DataError:
                errors[i] = f"short read: got {got} of {want} bytes (file truncated or changed while reading)"
        del keep

    def _read_span(self, name: str, fd: int, base: int, size: int, mv: memoryview) -> None:
        """8 MiB blocks, 4 in flight, when cached; otherwise in order so the kernel's read-ahead works."""
        L, ring = self._L, self._ring
        hot = _is_cached(fd, mv, size, base)
        block, depth = (_BLOCK, min(self.depth, _FILE_DEPTH)) if hot else (_COLD_BLOCK, _COLD_DEPTH)
        blocks = list(range(0, size, block))
        iovs: dict[int, object] = {}
        failed: list[str] = []
        completed = [0]
        in_flight = 0
        nxt = 1 if hot and size else 0  # the probe already read block 0

        def on_done(ud: int, res: int) -> None:
            completed[0] += 1
            want = min(block, size - blocks[ud])
            if res < 0:
                failed.append(f"cannot read at offset {base + blocks[ud]}: {os.strerror(-res)}")
            elif res < want:
                failed.append(f"short read at offset {base + blocks[ud]}: got {res} of {want} bytes")
            iovs.pop(ud, None)

        with self._lock:
            while nxt < len(blocks) or in_flight:
                queued = 0
                while nxt < len(blocks) and in_flight + queued < depth:
                    o = blocks[nxt]
                    iov = L.Iovec([mv[o:min(o + block, size)]])
                    iovs[nxt] = iov
                    sqe = L.io_uring_get_sqe(ring)
                    L.io_uring_prep_readv(sqe, fd, iov, base + o)
                    sqe.user_data = nxt
                    nxt += 1
                    queued += 1
                if queued:
                    L.io_uring_submit(ring)
                    in_flight += queued
                # Reap at least one (and whatever else is ready), then refill the queue.
                completed[0] = 0
                try:
                    self._reap(1, on_done)
                except BaseException:
                    left = in_flight - completed[0]
                    if left > 0:  # reads still target `out`, which may be freed once we raise
                        self._reap(left, on_done)
                    raise
                in_flight -= completed[0]
        if failed:
            raise DataError(failed[0], path=name)

    def close(self) -> None:
        """Tear the ring down."""
        with self._lock:
            if self._open:
                self._L.io_uring_queue_exit(self._ring)
                self._open = False

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


_default: Reader | None = None
_default_lock = threading.Lock()


def open_reader(backend: str | None = None, depth: int = 64) -> Reader:
    """A new reader: ``backend`` uring/threads, else ``BLAZIL_IO``, else io_uring if it works here."""
    choice = (backend or os.environ.get("BLAZIL_IO") or "auto").lower()
    if choice not in (*BACKENDS, "auto"):
        raise ConfigError(f"BLAZIL_IO / backend must be one of uring, threads, auto; got {choice!r}")
    if choice == "threads":
        return ThreadReader(min(depth, 16))
    try:
        return UringReader(depth)
    except (ImportError, OSError) as e:
        if choice == "uring":
            raise ConfigError(f"io_uring was requested (BLAZIL_IO=uring) but is unavailable: {e}") from e
        _log_fallback(e)
        return ThreadReader(min(depth, 16))


_logged = False


def _log_fallback(e: BaseException) -> None:
    global _logged
    if not _logged:
        log.warning("io_uring unavailable (%s); reading with a thread pool of os.preadv", e)
        _logged = True


def default_reader() -> Reader:
    """The process-wide reader the dataset types share (created on first use in each process, logged once)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = open_reader()
            log.info("file reader: %s (queue depth %d)", _default.backend, _default.depth)
        return _default


def _after_fork_in_child() -> None:
    # A ring shared with the parent would mix both processes' completions (e.g. torch DataLoader
    # workers forked from a process that already read): the child starts its own on first use.
    global _default, _default_lock
    _default = None
    _default_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
