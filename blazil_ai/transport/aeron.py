"""Aeron channels (``aeron:ipc``, ``aeron:udp?endpoint=host:port``) over Aeron's C client and media driver.

The driver (``aeronmd``), the C client (``libaeron.so``) and our binding (``_blazil_aeron``, cffi in API mode
over ``aeronc.h``) are built by ``scripts/build_aeron.sh`` into ``.cache/aeron`` (``BLAZIL_AERON_HOME``
overrides). Messages use the same frames as every channel (:mod:`blazil_ai.transport.framing`); a frame longer
than one Aeron message (an eighth of the term length) travels as a sequence of chunks and arrives whole.

>>> with MediaDriver() as driver:                                       # doctest: +SKIP
...     sub = AeronSubscription("aeron:ipc", 1)
...     pub = AeronPublication("aeron:ipc", 1)
...     pub.send({"op": "hello"}, [np.arange(4)])
...     sub.receive(timeout=1.0).meta
{'op': 'hello'}

Which media driver a channel uses: the ``aeron_dir=`` option, else ``AERON_DIR``, else the last
:class:`MediaDriver` started by this process, else Aeron's default directory.

Beyond the common interface: ``AeronPublication.offer_frames`` / ``offer_batch`` offer many encoded frames in
one native call, and ``AeronSubscription.poll_frames`` returns whole frames without decoding them (the fast
path for many small messages). Waits run in native code with the GIL released; on ``aeron:ipc`` a waiting
subscriber sleeps on a futex "doorbell" that publications ring, so idle costs nothing and a message wakes it
at once. A killed media driver turns every call into a :class:`TransportError` within about 100 ms (its pid
is watched) or ``driver_timeout`` seconds (Aeron's keepalive, default 5 s) where the pid cannot be seen.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from blazil_ai.files import sweep_stale, temp_prefix
from blazil_ai.transport import framing
from blazil_ai.transport.base import OfferStatus, Publication, Subscription, TransportError
from blazil_ai.transport.framing import DEFAULT_MAX_MESSAGE_SIZE, FrameError, Message

log = logging.getLogger(__name__)

_REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DRIVER_TIMEOUT_S = 5.0  # the client's own check on the driver's keepalive (Aeron's default is 10 s)
DEFAULT_TERM_LENGTH = 4 * 1024 * 1024  # UDP: small terms for small hosts; longer frames travel as chunks
# IPC: a publication may run term/2 ahead of its subscriber, so 8 MiB lets one 3.5 MiB frame be offered
# before the subscriber polls (as a TCP socket's buffers would); still 8x below Aeron's 64 MiB default.
DEFAULT_IPC_TERM_LENGTH = 8 * 1024 * 1024
_FRAGMENT_LIMIT = 256
_WAIT_SLICE_MS = 250  # blocking waits return to Python this often, so Ctrl-C and close() get through


def aeron_home() -> Path:
    """Where the Aeron build lives: ``$BLAZIL_AERON_HOME`` or ``<repo>/.cache/aeron``."""
    env = os.environ.get("BLAZIL_AERON_HOME")
    return Path(env) if env else _REPO_ROOT / ".cache" / "aeron"


def aeronmd_path() -> Path:
    """The media driver executable of the build."""
    return aeron_home() / "bin" / "aeronmd"


_native: ModuleType | None = None
_native_lock = threading.Lock()


def _load() -> ModuleType:
    global _native
    if _native is not None:
        return _native
    with _native_lock:
        if _native is None:
            home = aeron_home()
            found = sorted((home / "py").glob("_blazil_aeron*.so"))
            if not found:
                raise TransportError(f"the Aeron binding is not built (no _blazil_aeron*.so in {home / 'py'}); "
                                     "run scripts/build_aeron.sh (or scripts/setup.sh), or use a tcp:// URI")
            spec = importlib.util.spec_from_file_location("_blazil_aeron", found[0])
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            except ImportError as e:
                raise TransportError(f"cannot load the Aeron binding {found[0]}: {e}") from e
            _native = module
    return _native


def unavailable_reason() -> str | None:
    """Why Aeron cannot be used here (build missing or unloadable), or None when it can."""
    if not aeronmd_path().is_file():
        return f"no Aeron media driver at {aeronmd_path()} (run scripts/build_aeron.sh)"
    try:
        _load()
    except TransportError as e:
        return str(e)
    return None


class Availability(NamedTuple):
    """Whether Aeron can be used here: true in a boolean context, and unpacks as ``ok, reason``."""

    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


def available() -> Availability:
    """Whether the Aeron build (driver and binding) is there and loads: ``if available()`` or ``ok, why = ...``."""
    why = unavailable_reason()
    return Availability(why is None, why or "")


def aeron_version() -> str:
    """The version of the Aeron C client the binding is linked with."""
    m = _load()
    return str(m.ffi.string(m.lib.blz_aeron_version()).decode())


# ------------------------------------------------------------------------------------------------ media driver

_last_started_dir: str | None = None


def default_dir() -> str:
    """The media driver directory a channel uses when none is given."""
    if os.environ.get("AERON_DIR"):
        return os.environ["AERON_DIR"]
    if _last_started_dir:
        return _last_started_dir
    user = os.environ.get("USER") or str(os.getuid())
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.join(base, f"aeron-{user}")


def _sysctl_int(path: str, default: int, cap: int) -> int:
    try:
        with open(path) as f:
            return min(int(f.read().strip()), cap)
    except (OSError, ValueError):
        return default


def driver_env(aeron_dir: str, term_length: int = DEFAULT_TERM_LENGTH,
               ipc_term_length: int = DEFAULT_IPC_TERM_LENGTH) -> dict[str, str]:
    """The settings a Blazil AI media driver runs with (a small host: one shared thread that backs off)."""
    rcvbuf = _sysctl_int("/proc/sys/net/core/rmem_max", 2 << 20, cap=2 << 20)
    return {
        "AERON_DIR": aeron_dir,
        # The default DEDICATED mode spins three agent threads; SHARED runs them on one thread that backs off.
        "AERON_THREADING_MODE": "SHARED",
        "AERON_SHARED_IDLE_STRATEGY": "backoff",
        "AERON_TERM_BUFFER_LENGTH": str(term_length),
        "AERON_IPC_TERM_BUFFER_LENGTH": str(ipc_term_length),
        # IPC needs no network MTU: fewer, larger fragments make long frames cheaper.
        "AERON_IPC_MTU_LENGTH": "65504",
        # UDP: a receiver window of term/2 (Aeron's default is 128 KiB) backed by socket buffers as large as
        # the kernel allows, up to 2 MiB; large frames over UDP ran about twice as fast with it here.
        "AERON_SOCKET_SO_RCVBUF": str(rcvbuf),
        "AERON_SOCKET_SO_SNDBUF": str(_sysctl_int("/proc/sys/net/core/wmem_max", 2 << 20, cap=2 << 20)),
        "AERON_RCV_INITIAL_WINDOW_LENGTH": str(min(term_length // 2, rcvbuf)),
        "AERON_DIR_DELETE_ON_START": "true",
        "AERON_DIR_DELETE_ON_SHUTDOWN": "true",
        "AERON_PRINT_CONFIGURATION": "false",
    }


def _exit_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child receive SIGTERM when this process dies (Linux), or None.

    A driver whose owner was killed (SIGKILL, OOM) would otherwise run on with nobody to stop it.
    Linux ties the signal to the thread that forks, so it is set only from the main thread, which
    lives as long as the process.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork: the child only calls it
    pr_set_pdeathsig = 1
    sigterm = int(signal.SIGTERM)

    def child() -> None:
        prctl(pr_set_pdeathsig, sigterm)

    return child


def check_driver_dir(aeron_dir: str | os.PathLike[str]) -> None:
    """Refuse a driver directory that holds anything but a media driver's files.

    ``aeronmd`` deletes its directory, with all it holds, on start and on shutdown. Only a new folder,
    an empty one, or one with Aeron's own ``cnc.dat`` (a driver that ran or runs there) may be given.
    """
    p = Path(aeron_dir)
    if p.is_symlink() or (p.exists() and not p.is_dir()):
        raise TransportError(f"Aeron directory {p} is not a folder; give a new folder for the media driver")
    if p.is_dir() and not (p / "cnc.dat").exists() and any(p.iterdir()):
        raise TransportError(f"Aeron directory {p} holds files that are not a media driver's (no cnc.dat); the "
                             "driver deletes its folder on start and stop, so give a new or empty folder")


class MediaDriver:
    """An ``aeronmd`` process in a private directory (or, with :meth:`attach`, one that already runs).

    ``start()`` waits until a client can connect; ``stop()`` asks the driver to shut down and removes the
    directory. Started drivers become this process's default for channels opened without ``aeron_dir``.
    """

    def __init__(self, aeron_dir: str | os.PathLike[str] | None = None, *, term_length: int = DEFAULT_TERM_LENGTH,
                 ipc_term_length: int = DEFAULT_IPC_TERM_LENGTH, env: Mapping[str, str] | None = None,
                 ready_timeout: float = 15.0) -> None:
        if aeron_dir is None:
            base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
            aeron_dir = os.path.join(base, f"blazil-aeron-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.dir = str(aeron_dir)
        self.term_length = term_length
        self.ipc_term_length = ipc_term_length
        self.extra_env = dict(env or {})
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.attached = False
        self._log_dir: str | None = None

    @classmethod
    def attach(cls, aeron_dir: str | os.PathLike[str] | None = None, timeout: float = 5.0) -> MediaDriver:
        """Use a media driver that already runs in ``aeron_dir`` (default: ``AERON_DIR``); check it answers."""
        d = cls(aeron_dir if aeron_dir is not None else default_dir())
        d.attached = True
        _Client.probe(d.dir, timeout)
        return d

    @property
    def pid(self) -> int | None:
        """The driver's process id (None when attached or not started)."""
        return self.process.pid if self.process is not None else None

    @property
    def log_path(self) -> Path | None:
        """Where the driver's stdout and stderr go."""
        return Path(self._log_dir) / "aeronmd.log" if self._log_dir else None

    def is_running(self) -> bool:
        """Whether the started driver process is alive."""
        return self.process is not None and self.process.poll() is None

    def start(self) -> MediaDriver:
        """Start ``aeronmd`` and wait until it accepts clients."""
        global _last_started_dir
        if self.attached or self.process is not None:
            return self
        exe = aeronmd_path()
        if not exe.is_file():
            raise TransportError(f"no Aeron media driver at {exe}: run scripts/build_aeron.sh")
        check_driver_dir(self.dir)
        _load()
        env = dict(os.environ)
        env.update(driver_env(self.dir, self.term_length, self.ipc_term_length))
        env.update(self.extra_env)
        sweep_stale("aeronmd-log")  # left by an owner that was killed
        self._log_dir = tempfile.mkdtemp(prefix=temp_prefix("aeronmd-log"))
        assert self.log_path is not None
        with open(self.log_path, "wb") as logf:
            # its own process group: a Ctrl-C meant for us must not kill the driver under our clients
            self.process = subprocess.Popen([str(exe)], env=env, stdout=logf, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            preexec_fn=_exit_with_parent())
        _drivers.add(self)
        deadline = time.monotonic() + self.ready_timeout
        cnc = Path(self.dir) / "cnc.dat"
        while True:
            if self.process.poll() is not None:
                raise TransportError(f"aeronmd exited with status {self.process.returncode} while starting in "
                                     f"{self.dir}: {self._log_tail()}")
            if cnc.exists():
                try:
                    _Client.probe(self.dir, max(0.5, deadline - time.monotonic()))
                    break
                except TransportError:
                    if time.monotonic() > deadline:
                        raise
            if time.monotonic() > deadline:
                self.stop()
                raise TransportError(f"aeronmd did not become ready in {self.ready_timeout:.0f} s ({self.dir})")
            time.sleep(0.01)
        _last_started_dir = self.dir
        log.info("Aeron media driver pid %d ready in %s", self.process.pid, self.dir)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Shut the driver down (SIGTERM, then SIGKILL after ``timeout`` s) and remove its directory."""
        global _last_started_dir
        p = self.process
        if p is None:
            return
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.process = None
        _drivers.discard(self)
        shutil.rmtree(self.dir, ignore_errors=True)
        if self._log_dir:
            shutil.rmtree(self._log_dir, ignore_errors=True)
        if _last_started_dir == self.dir:
            _last_started_dir = None

    def kill(self) -> None:
        """Kill the driver at once (SIGKILL), as a crash would; the directory stays for inspection."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:] if self.log_path else ""
        except OSError:
            return ""

    def __enter__(self) -> MediaDriver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if not self.attached:
            self.stop()


_drivers: weakref.WeakSet[MediaDriver] = weakref.WeakSet()


# ----------------------------------------------------------------------------------------------------- clients

class _Client:
    """One Aeron client (connection to a media driver) per directory, shared by this process's channels."""

    _by_dir: dict[str, _Client] = {}
    _lock = threading.Lock()

    def __init__(self, aeron_dir: str, driver_timeout: float) -> None:
        m = _load()
        self.ffi, self.lib = m.ffi, m.lib
        self.dir = aeron_dir
        if not (Path(aeron_dir) / "cnc.dat").exists():
            raise TransportError(f"no Aeron media driver runs in {aeron_dir} (no cnc.dat): start one with "
                                 "`blazil transport driver` or MediaDriver(), or set AERON_DIR")
        err = self.ffi.new("char[]", 1024)
        ptr = self.lib.blz_client_open(aeron_dir.encode(), int(driver_timeout * 1000), err, 1024)
        if ptr == self.ffi.NULL:
            raise TransportError(f"cannot connect to the Aeron media driver in {aeron_dir}: "
                                 f"{self.ffi.string(err).decode(errors='replace')}")
        self.ptr: Any = ptr
        self.refs = 0

    @classmethod
    def acquire(cls, aeron_dir: str, driver_timeout: float = DEFAULT_DRIVER_TIMEOUT_S) -> _Client:
        with cls._lock:
            c = cls._by_dir.get(aeron_dir)
            if c is not None and c.lib.blz_client_check(c.ptr) != 0:
                del cls._by_dir[aeron_dir]  # its driver is gone: new channels get a fresh client
                c = None
            if c is None:
                c = cls(aeron_dir, driver_timeout)
                cls._by_dir[aeron_dir] = c
            c.refs += 1
            return c

    def release(self) -> None:
        with self._lock:
            self.refs -= 1
            if self.refs > 0:
                return
            if self._by_dir.get(self.dir) is self:
                del self._by_dir[self.dir]
            ptr, self.ptr = self.ptr, None
        if ptr is not None:
            self.lib.blz_client_close(ptr)

    @classmethod
    def probe(cls, aeron_dir: str, timeout: float) -> None:
        """Connect and disconnect once: raises TransportError unless a live driver runs in ``aeron_dir``."""
        cls.acquire(aeron_dir, timeout).release()

    def last_error(self) -> str:
        buf = self.ffi.new("char[]", 1024)
        self.lib.blz_client_last_error(self.ptr, buf, 1024)
        return str(self.ffi.string(buf).decode(errors="replace"))

    def gone_error(self, what: str) -> TransportError:
        detail = self.last_error() or "no keepalive from the media driver"
        return TransportError(f"{what}: the Aeron media driver in {self.dir} is gone ({detail})", OfferStatus.CLOSED)


_channels: weakref.WeakSet[_AeronChannel] = weakref.WeakSet()


class _AeronChannel:
    uri: str
    stream_id: int
    _ptr: Any
    _client: Any

    def _open_client(self, options: dict[str, Any]) -> _Client:
        aeron_dir = options.pop("aeron_dir", None)
        driver = options.pop("driver", None)
        if aeron_dir is None and driver is not None:
            aeron_dir = driver.dir
        driver_timeout = float(options.pop("driver_timeout", DEFAULT_DRIVER_TIMEOUT_S))
        self.open_timeout = float(options.pop("timeout", 5.0))
        self.max_message_size = int(options.pop("max_message_size", DEFAULT_MAX_MESSAGE_SIZE))
        if options:
            raise TransportError(f"{self.uri}: unknown option(s) {sorted(options)} for an Aeron channel "
                                 "(known: aeron_dir, driver, timeout, driver_timeout, max_message_size)")
        if not self.uri.startswith(("aeron:ipc", "aeron:udp")):
            raise TransportError(f"{self.uri!r}: expected aeron:ipc or aeron:udp?endpoint=host:port")
        if self.uri.startswith("aeron:udp") and "endpoint=" not in self.uri and "control=" not in self.uri:
            raise TransportError(f"{self.uri!r}: an aeron:udp channel needs endpoint=host:port")
        self._lock = threading.RLock()
        self._pid = os.getpid()
        client = _Client.acquire(str(aeron_dir or default_dir()), driver_timeout)
        _channels.add(self)
        return client

    def _adopt(self, client: _Client, ptr: Any, err: Any, set_doorbell: Any, without_bell: str) -> None:
        """Take the native channel just opened (or raise its error), and set up its IPC doorbell."""
        if ptr == client.ffi.NULL:
            client.release()
            raise self._error(client, err)
        self._client, self._ptr = client, ptr
        self._ffi, self._lib = client.ffi, client.lib
        bell = self._doorbell_path(client)
        if bell is not None and set_doorbell(ptr, bell) != 0:
            log.warning("%s stream %d: no doorbell at %s; %s", self.uri, self.stream_id, bell, without_bell)

    def _close_native(self, ptr: Any) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        """Close the native channel and drop the shared client (once; never for a copy inherited by fork)."""
        lock = getattr(self, "_lock", None)
        if lock is None:
            return
        with lock:
            ptr, self._ptr = self._ptr, None
            client, self._client = self._client, None
        if getattr(self, "_pid", None) != os.getpid():
            return  # inherited through fork: the native objects belong to the parent's client
        if ptr is not None:
            self._close_native(ptr)
        if client is not None:
            client.release()
        _channels.discard(self)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._release()

    def _doorbell_path(self, client: _Client) -> bytes | None:
        # IPC only: the publications and subscriptions of one stream on one host share a futex "doorbell"
        # (see blazil_aeron.c); over UDP the remote sender cannot ring it and the subscriber polls.
        if not self.uri.startswith("aeron:ipc"):
            return None
        return os.path.join(client.dir, f"blazil-doorbell-{self.stream_id}").encode()

    def _error(self, client: _Client, err: Any) -> TransportError:
        return TransportError(f"{self.uri} stream {self.stream_id}: "
                              f"{client.ffi.string(err).decode(errors='replace')}")

    def close(self) -> None:  # overridden
        raise NotImplementedError


class AeronPublication(_AeronChannel, Publication):
    """The sending end of an Aeron channel. ``offer`` never blocks unless given a ``timeout``.

    A dead media driver is not a passing state: offers then raise :class:`TransportError` naming it.
    """

    def __init__(self, uri: str, stream_id: int = 1, **options: Any) -> None:
        self.uri, self.stream_id = uri, int(stream_id)
        self._client: _Client | None = None
        self._ptr: Any = None
        client = self._open_client(dict(options))
        err = client.ffi.new("char[]", 1024)
        ptr = client.lib.blz_pub_open(client.ptr, uri.encode(), self.stream_id, int(self.open_timeout * 1000),
                                      err, 1024)
        self._adopt(client, ptr, err, client.lib.blz_pub_set_doorbell, "subscribers will poll")
        self.max_message_length = int(self._lib.blz_pub_max_message(ptr))
        self.session_id = int(self._lib.blz_pub_session_id(ptr))

    def _status(self, r: int) -> OfferStatus:
        lib = self._lib
        if r >= 0:
            return OfferStatus.OK
        if r == lib.AERON_PUBLICATION_BACK_PRESSURED:
            return OfferStatus.BACK_PRESSURED
        if r == lib.AERON_PUBLICATION_NOT_CONNECTED:
            return OfferStatus.NOT_CONNECTED
        assert self._client is not None
        if r == lib.BLZ_DRIVER_GONE or (r == lib.AERON_PUBLICATION_CLOSED and lib.blz_client_check(self._client.ptr)):
            raise self._client.gone_error(f"{self.uri} stream {self.stream_id}")
        if r == lib.AERON_PUBLICATION_CLOSED:
            return OfferStatus.CLOSED
        if r == lib.AERON_PUBLICATION_MAX_POSITION_EXCEEDED:
            raise TransportError(f"{self.uri} stream {self.stream_id}: the publication reached its maximum "
                                 "position; open a new one", OfferStatus.CLOSED)
        raise TransportError(f"{self.uri} stream {self.stream_id}: offer failed (Aeron code {r}): "
                             f"{self._client.last_error()}", OfferStatus.CLOSED)

    def offer(self, meta: Mapping[str, Any] | None = None, arrays: Sequence[np.ndarray] = (), *,
              timeout: float = 0.0) -> OfferStatus:
        """Offer one message; with ``timeout`` > 0 wait (GIL released) for room or a subscriber."""
        parts = framing.encode(meta, arrays, self.max_message_size)
        wait_ms, wait_connect = int(timeout * 1000), 1 if timeout > 0 else 0
        if len(parts) == 1:
            # small: framing.encode joined the frame into one buffer (cheaper than an iovec list through cffi)
            frame = parts[0]
            with self._lock:
                if self._ptr is None:
                    return OfferStatus.CLOSED
                r = self._lib.blz_pub_offer_bytes(self._ptr, frame, len(frame), wait_ms, wait_connect)
            return self._status(r)
        ffi = self._ffi
        iov = ffi.new("aeron_iovec_t[]", len(parts))
        keep = []
        for i, p in enumerate(parts):
            buf = ffi.from_buffer("uint8_t[]", p)  # the caller's numpy memory, not a copy
            keep.append(buf)
            iov[i].iov_base = buf
            iov[i].iov_len = len(buf)
        with self._lock:
            if self._ptr is None:
                return OfferStatus.CLOSED
            r = self._lib.blz_pub_offerv(self._ptr, iov, len(parts), wait_ms, wait_connect)
        return self._status(r)

    def offer_batch(self, messages: Sequence[Message | bytes | bytearray], *, timeout: float = 0.0) -> int:
        """Offer many messages in one native call; return how many were accepted (stops at the first refusal).

        Items may be :class:`Message` objects or frames already encoded with ``framing.encode_bytes`` (the
        fast path for many small messages: encode once, offer often).
        """
        frames = [m if isinstance(m, bytes | bytearray) else framing.encode_bytes(m.meta, m.arrays,
                                                                                 self.max_message_size)
                  for m in messages]
        if not frames:
            return 0
        blob = b"".join(frames)
        lens = np.fromiter(map(len, frames), dtype=np.uint64, count=len(frames))
        return self.offer_frames(blob, lens, timeout=timeout)

    def offer_frames(self, blob: bytes | bytearray | memoryview | np.ndarray, lengths: np.ndarray, *,
                     timeout: float = 0.0) -> int:
        """Offer encoded frames laid end to end in ``blob`` (``lengths[i]`` bytes each); return how many went."""
        lens = np.ascontiguousarray(lengths, dtype=np.uint64)
        ffi = self._ffi
        accepted = ffi.new("size_t *")
        with self._lock:
            if self._ptr is None:
                return 0
            r = self._lib.blz_pub_offer_many(self._ptr, ffi.from_buffer("uint8_t[]", blob),
                                             ffi.from_buffer("uint64_t[]", lens), len(lens), int(timeout * 1000),
                                             1 if timeout > 0 else 0, accepted)
        n = int(accepted[0])
        if r < 0 and n < len(lens):
            self._status(r)  # raises if the driver is gone; other refusals just end the batch
        return n

    @property
    def is_connected(self) -> bool:
        """Whether a subscriber is connected now."""
        with self._lock:
            return self._ptr is not None and bool(self._lib.blz_pub_is_connected(self._ptr))

    def _close_native(self, ptr: Any) -> None:
        self._lib.blz_pub_close(ptr)

    def close(self) -> None:
        """Release the publication; further offers return ``CLOSED``."""
        self._release()


class AeronSubscription(_AeronChannel, Subscription):
    """The receiving end of an Aeron channel: whole frames, reassembled and decoded.

    ``peer`` of a delivered message is ``session:<id>``, the Aeron session of the publication that sent it.
    """

    def __init__(self, uri: str, stream_id: int = 1, **options: Any) -> None:
        self.uri, self.stream_id = uri, int(stream_id)
        self._client: _Client | None = None
        self._ptr: Any = None
        self._pending: collections.deque[Message] = collections.deque()
        self._peers: dict[int, str] = {}
        self.decode_errors = 0
        client = self._open_client(dict(options))
        err = client.ffi.new("char[]", 1024)
        ptr = client.lib.blz_sub_open(client.ptr, uri.encode(), self.stream_id, self.max_message_size,
                                      int(self.open_timeout * 1000), err, 1024)
        self._adopt(client, ptr, err, client.lib.blz_sub_set_doorbell, "waiting by polling")

    def _check(self, r: int) -> None:
        if r >= 0:
            return
        assert self._client is not None
        if r == self._lib.BLZ_DRIVER_GONE:
            raise self._client.gone_error(f"{self.uri} stream {self.stream_id}")
        if r == self._lib.BLZ_NO_MEMORY:
            raise TransportError(f"{self.uri} stream {self.stream_id}: out of memory while reassembling")
        raise TransportError(f"{self.uri} stream {self.stream_id}: poll failed: {self._client.last_error()}")

    def _take(self, n: int) -> None:
        """Decode the batch the last native poll gathered (valid until the next poll)."""
        msgs = self._lib.blz_sub_messages(self._ptr)
        for i in range(n):
            m = msgs[i]
            frame = bytearray(self._ffi.buffer(m.data, m.len))
            try:
                msg = framing.decode(frame, self.max_message_size)
            except FrameError as e:
                self.decode_errors += 1
                log.error("%s stream %d: dropping a bad frame from session %d: %s", self.uri, self.stream_id,
                          m.session_id, e)
                continue
            peer = self._peers.get(m.session_id)
            if peer is None:
                peer = self._peers[m.session_id] = f"session:{m.session_id}"
            msg.peer = peer
            self._pending.append(msg)

    def _deliver(self, handler: Callable[[Message], None], limit: int) -> int:
        n = 0
        while n < limit and self._pending:
            handler(self._pending.popleft())
            n += 1
        return n

    def poll(self, handler: Callable[[Message], None], limit: int = 64) -> int:
        """Deliver up to ``limit`` whole messages to ``handler``; return how many were delivered."""
        delivered = self._deliver(handler, limit)
        while delivered < limit:
            with self._lock:
                if self._ptr is None:
                    raise TransportError(f"{self.uri} stream {self.stream_id}: subscription is closed")
                r = self._lib.blz_sub_poll(self._ptr, _FRAGMENT_LIMIT)
                self._check(r)
                if r == 0:
                    break
                self._take(r)
            delivered += self._deliver(handler, limit - delivered)
        return delivered

    def receive(self, timeout: float | None = None) -> Message | None:
        """Wait up to ``timeout`` seconds (None = forever) for one message; the wait runs in native code."""
        if self._pending:
            return self._pending.popleft()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining_ms = _WAIT_SLICE_MS if deadline is None else \
                min(_WAIT_SLICE_MS, max(0, int((deadline - time.monotonic()) * 1000)))
            with self._lock:
                if self._ptr is None:
                    raise TransportError(f"{self.uri} stream {self.stream_id}: subscription is closed")
                r = self._lib.blz_sub_wait(self._ptr, _FRAGMENT_LIMIT, remaining_ms)
                self._check(r)
                if r > 0:
                    self._take(r)
            if self._pending:
                return self._pending.popleft()
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def poll_frames(self, fragment_limit: int = 4096, timeout: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Raw path for high rates: the whole frames of one native poll, end to end, and their lengths.

        With ``timeout`` > 0, wait (in native code, GIL released) up to that long for at least one frame.
        Frames are checked for the magic and a sane size, not decoded (``framing.decode`` does that).
        Do not mix with ``poll``/``receive`` on the same subscription.
        """
        with self._lock:
            if self._ptr is None:
                raise TransportError(f"{self.uri} stream {self.stream_id}: subscription is closed")
            if timeout > 0:
                r = self._lib.blz_sub_wait(self._ptr, fragment_limit, max(1, int(timeout * 1000)))
            else:
                r = self._lib.blz_sub_poll(self._ptr, fragment_limit)
            self._check(r)
            total = int(self._lib.blz_sub_batch_bytes(self._ptr)) if r else 0
            data = np.empty(total, dtype=np.uint8)
            lens = np.empty(r, dtype=np.uint64)
            if r:
                self._lib.blz_sub_copy_batch(self._ptr, self._ffi.from_buffer("uint8_t[]", data),
                                             self._ffi.from_buffer("uint64_t[]", lens))
        return data, lens

    @property
    def is_connected(self) -> bool:
        """Whether at least one publication is connected."""
        with self._lock:
            return self._ptr is not None and bool(self._lib.blz_sub_is_connected(self._ptr))

    @property
    def dropped(self) -> int:
        """Frames dropped: bad magic, oversize, or chunk sequences left unfinished by their sender."""
        with self._lock:
            native = int(self._lib.blz_sub_dropped(self._ptr)) if self._ptr is not None else 0
        return native + self.decode_errors

    def _close_native(self, ptr: Any) -> None:
        self._lib.blz_sub_close(ptr)

    def close(self) -> None:
        """Stop receiving and release the channel."""
        self._release()


def _forget_after_fork() -> None:
    # A forked child inherits the parent's client structs but not their conductor threads: it must open its own.
    _Client._by_dir.clear()
    _Client._lock = threading.Lock()
    _channels.clear()
    _drivers.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


@atexit.register
def _close_all() -> None:
    # Unclosed clients would leave an IPC publication stalled for the driver's liveness timeout (~10 s).
    for ch in list(_channels):
        with contextlib.suppress(Exception):
            ch.close()
    for d in list(_drivers):
        with contextlib.suppress(Exception):
            d.stop()
