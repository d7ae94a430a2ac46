"""The Aeron build: where it lives, loading our binding to Aeron's C client, and one client per driver.

The driver (``aeronmd``), the C client (``libaeron.so``) and our binding (``_blazil_aeron``, cffi in API mode
over ``aeronc.h``) are built by ``scripts/build_aeron.sh`` into ``.cache/aeron`` (``BLAZIL_AERON_HOME``
overrides). :mod:`blazil_ai.transport.media_driver` runs the driver, :mod:`blazil_ai.transport.aeron` the
channels; both connect to a driver through the :class:`AeronClient` this module keeps per directory.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, Generic, NamedTuple, TypeVar

from blazil_ai.transport.base import OfferStatus, TransportError

_REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DRIVER_TIMEOUT_S = 5.0  # the client's own check on the driver's keepalive (Aeron's default is 10 s)


def aeron_home() -> Path:
    """Where the Aeron build lives: ``$BLAZIL_AERON_HOME`` or ``<repo>/.cache/aeron``."""
    env = os.environ.get("BLAZIL_AERON_HOME")
    return Path(env) if env else _REPO_ROOT / ".cache" / "aeron"


def aeronmd_path() -> Path:
    """The media driver executable of the build."""
    return aeron_home() / "bin" / "aeronmd"


_native: ModuleType | None = None
_native_lock = threading.Lock()


def load_binding() -> ModuleType:
    """The cffi binding to Aeron's C client (loaded once); TransportError saying what is missing otherwise."""
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
        load_binding()
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
    m = load_binding()
    return str(m.ffi.string(m.lib.blz_aeron_version()).decode())


class AeronClient:
    """One Aeron client (connection to a media driver) per directory, shared by this process's channels."""

    _by_dir: dict[str, AeronClient] = {}
    _lock = threading.Lock()

    def __init__(self, aeron_dir: str, driver_timeout: float) -> None:
        m = load_binding()
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
    def acquire(cls, aeron_dir: str, driver_timeout: float = DEFAULT_DRIVER_TIMEOUT_S) -> AeronClient:
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


def _forget_after_fork() -> None:
    # A forked child inherits the parent's client structs but not their conductor threads: it must open its own.
    AeronClient._by_dir.clear()
    AeronClient._lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


T = TypeVar("T")


class ClosedAtExit(Generic[T]):
    """The open objects of one kind (channels, drivers) this process must close when it exits.

    A forked child forgets them: they belong to its parent. Sets made later are closed first at exit, so
    the channels (their module imports the drivers' one) go before the media drivers under them.
    """

    def __init__(self, close: Callable[[T], object]) -> None:
        self._items: weakref.WeakSet[Any] = weakref.WeakSet()
        self._close = close
        os.register_at_fork(after_in_child=self._items.clear)
        atexit.register(self.close_all)

    def add(self, item: T) -> None:
        """Remember an object just opened."""
        self._items.add(item)

    def discard(self, item: T) -> None:
        """Forget an object closed by its owner."""
        self._items.discard(item)

    def close_all(self) -> None:
        """Close every object still open (errors are ignored: the process is ending)."""
        for item in list(self._items):
            with contextlib.suppress(Exception):
                self._close(item)
