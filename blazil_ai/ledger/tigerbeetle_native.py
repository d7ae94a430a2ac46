"""Raw batches to TigerBeetle's native client library (``libtb_client``, shipped inside the official ``tigerbeetle``
package): one packet per batch, the batch's numpy buffer handed over as it is, many packets in flight.

The official Python client turns every event into a dataclass, validates its fields in Python and packs it into a
ctypes array; its results come back the same way. Our records are TigerBeetle's 128-byte layouts already
(``TRANSFER_DTYPE``, ``ACCOUNT_DTYPE``), so this path gives the library the array's memory and copies each reply
into one numpy array with one ``memmove``: no Python object per event either way.
"""

from __future__ import annotations

import ctypes
import itertools
import threading
from concurrent.futures import Future
from typing import Any

import numpy as np

from blazil_ai.errors import BlazilError, ConfigError
from blazil_ai.ledger.types import OPERATIONS, Operation


class TigerBeetleError(BlazilError):
    """The native client refused or failed a request (the message names the reason)."""


class NativeClient:
    """A ``tb_client`` session to a cluster; ``submit`` takes raw event bytes and returns a future of raw results."""

    def __init__(self, cluster_id: int, addresses: str) -> None:
        try:
            from tigerbeetle import bindings
            from tigerbeetle.lib import c_uint128
        except ImportError as e:  # pragma: no cover - the package is a dependency
            raise ConfigError("the 'tigerbeetle' package (which ships the native client library) is not installed") \
                from e
        self._b = bindings
        self._client = bindings.CClient()
        self._lock = threading.Lock()
        self._inflight: dict[int, tuple[Any, Any, Future[np.ndarray], np.dtype]] = {}
        self._keys = itertools.count(1)
        self._closed = False
        self._on_completion = bindings.OnCompletion(self._completed)  # kept alive as long as the client
        cluster = c_uint128.from_param(cluster_id)
        self._cluster = cluster
        status = bindings.tb_client_init(ctypes.byref(self._client),
                                         ctypes.cast(ctypes.byref(cluster), ctypes.POINTER(ctypes.c_uint8 * 16)),
                                         addresses.encode("ascii"), len(addresses), 0, self._on_completion)
        if status != bindings.InitStatus.SUCCESS:
            reason = bindings.InitStatus(status).name
            raise ConfigError(f"tigerbeetle://{addresses}: the client cannot start ({reason})")

    def submit(self, op: Operation, data: np.ndarray | bytes) -> Future[np.ndarray]:
        """Send one request whose body is ``data`` (records or a filter's bytes); the future gives the reply as an
        array of the operation's result records."""
        buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else np.ascontiguousarray(data)
        fut: Future[np.ndarray] = Future()
        if self._closed:
            fut.set_exception(TigerBeetleError("the TigerBeetle client is closed"))
            return fut
        b = self._b
        packet = b.CPacket()
        key = next(self._keys)
        packet.user_data = key
        packet.data = buf.ctypes.data if buf.nbytes else None
        packet.data_size = buf.nbytes
        packet.user_tag = 0
        packet.operation = int(op)
        packet.status = b.PacketStatus.OK
        with self._lock:
            self._inflight[key] = (packet, buf, fut, OPERATIONS[op].result)
        state = b.tb_client_submit(ctypes.byref(self._client), ctypes.byref(packet))
        if state != b.ClientStatus.OK:
            with self._lock:
                self._inflight.pop(key, None)
            fut.set_exception(TigerBeetleError("the TigerBeetle client is closed"))
        return fut

    def _completed(self, _ctx: int, packet: Any, _timestamp: int, result: int, length: int) -> None:
        # Called on the library's thread; the reply's memory is valid only during the call: copy it out.
        try:
            key = packet[0].user_data
            status = packet[0].status
            with self._lock:
                _, _, fut, dtype = self._inflight.pop(key)
            if status != self._b.PacketStatus.OK:
                name = self._b.PacketStatus(status).name
                fut.set_exception(TigerBeetleError(f"TigerBeetle refused the request: {name}"))
                return
            out = np.empty(length // dtype.itemsize, dtype=dtype)
            if length:
                ctypes.memmove(out.ctypes.data, result, length)
            fut.set_result(out)
        except Exception as e:  # never let an exception unwind into the C library
            try:
                fut.set_exception(e)
            except Exception:  # noqa: S110 - the future is already settled or was never found
                pass

    def in_flight(self) -> int:
        """Requests sent and not yet answered."""
        with self._lock:
            return len(self._inflight)

    def close(self) -> None:
        """End the session (requests still in flight fail with CLIENT_SHUTDOWN)."""
        if self._closed:
            return
        self._closed = True
        self._b.tb_client_deinit(ctypes.byref(self._client))
