"""The Aeron media driver: an ``aeronmd`` process this process starts and stops, or one it attaches to.

>>> with MediaDriver() as driver:                                       # doctest: +SKIP
...     print(driver.dir, driver.pid)

A driver started here runs in a private directory (deleted on start and stop, so only a new, empty or
driver's own folder is accepted), with settings for a small host (one shared agent thread that backs
off), and receives SIGTERM when this process dies. The last one started becomes this process's default
for channels opened without ``aeron_dir`` (see :func:`default_dir`).
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Callable, Mapping
from pathlib import Path

from blazil_ai.files import sweep_stale, temp_prefix
from blazil_ai.transport.aeron_binding import AeronClient, ClosedAtExit, aeronmd_path, load_binding
from blazil_ai.transport.base import TransportError

log = logging.getLogger(__name__)

DEFAULT_TERM_LENGTH = 4 * 1024 * 1024  # UDP: small terms for small hosts; longer frames travel as chunks
# IPC: a publication may run term/2 ahead of its subscriber, so 8 MiB lets one 3.5 MiB frame be offered
# before the subscriber polls (as a TCP socket's buffers would); still 8x below Aeron's 64 MiB default.
DEFAULT_IPC_TERM_LENGTH = 8 * 1024 * 1024

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
        AeronClient.probe(d.dir, timeout)
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
        load_binding()
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
                    AeronClient.probe(self.dir, max(0.5, deadline - time.monotonic()))
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


_drivers: ClosedAtExit[MediaDriver] = ClosedAtExit(MediaDriver.stop)  # stopped when this process exits
