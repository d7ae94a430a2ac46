"""Aeron channels (``aeron:ipc``, ``aeron:udp?endpoint=host:port``) over Aeron's C client and media driver.

Messages use the same frames as every channel (:mod:`blazil_ai.transport.framing`); a frame longer than one
Aeron message (an eighth of the term length) travels as a sequence of chunks and arrives whole. The build
is found and loaded by :mod:`blazil_ai.transport.aeron_binding`; the driver runs under
:class:`~blazil_ai.transport.media_driver.MediaDriver`.

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

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from blazil_ai.transport import framing
from blazil_ai.transport.aeron_binding import DEFAULT_DRIVER_TIMEOUT_S, AeronClient, ClosedAtExit
from blazil_ai.transport.base import MessageCount, OfferStatus, Publication, Subscription, TransportError
from blazil_ai.transport.framing import DEFAULT_MAX_MESSAGE_SIZE, FrameError, Message
from blazil_ai.transport.media_driver import default_dir

log = logging.getLogger(__name__)

_FRAGMENT_LIMIT = 256
_WAIT_SLICE_MS = 250  # blocking waits return to Python this often, so Ctrl-C and close() get through

# Closed when this process exits: an unclosed client would leave an IPC publication stalled for the
# driver's liveness timeout (~10 s).
_channels: ClosedAtExit[_AeronChannel] = ClosedAtExit(lambda ch: ch.close())


class _AeronChannel:
    """What an Aeron publication and subscription share: options, the driver's client, the native object."""

    uri: str
    stream_id: int
    _ptr: Any
    _client: Any
    _messages: MessageCount  # set by Publication / Subscription

    def _open_client(self, options: dict[str, Any]) -> AeronClient:
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
        client = AeronClient.acquire(str(aeron_dir or default_dir()), driver_timeout)
        _channels.add(self)
        return client

    def _adopt(self, client: AeronClient, ptr: Any, err: Any, set_doorbell: Any, without_bell: str,
               close_native: Callable[[Any], Any]) -> None:
        """Take the native channel just opened (or raise its error), and set up its IPC doorbell."""
        if ptr == client.ffi.NULL:
            client.release()
            raise self._error(client, err)
        self._client, self._ptr = client, ptr
        self._close_native = close_native
        self._ffi, self._lib = client.ffi, client.lib
        bell = self._doorbell_path(client)
        if bell is not None and set_doorbell(ptr, bell) != 0:
            log.warning("%s stream %d: no doorbell at %s; %s", self.uri, self.stream_id, bell, without_bell)

    def close(self) -> None:
        """Release the channel: its native object and this process's share of the driver's client.

        Further offers return ``CLOSED`` and polls raise :class:`TransportError`; closing again does nothing.
        """
        self._messages.report()
        self._release()

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

    def _doorbell_path(self, client: AeronClient) -> bytes | None:
        # IPC only: the publications and subscriptions of one stream on one host share a futex "doorbell"
        # (see blazil_aeron.c); over UDP the remote sender cannot ring it and the subscriber polls.
        if not self.uri.startswith("aeron:ipc"):
            return None
        return os.path.join(client.dir, f"blazil-doorbell-{self.stream_id}").encode()

    def _error(self, client: AeronClient, err: Any) -> TransportError:
        return TransportError(f"{self.uri} stream {self.stream_id}: "
                              f"{client.ffi.string(err).decode(errors='replace')}")


class AeronPublication(_AeronChannel, Publication):
    """The sending end of an Aeron channel. ``offer`` never blocks unless given a ``timeout``.

    A dead media driver is not a passing state: offers then raise :class:`TransportError` naming it.
    """

    def __init__(self, uri: str, stream_id: int = 1, **options: Any) -> None:
        super().__init__("aeron")
        self.uri, self.stream_id = uri, int(stream_id)
        self._client: AeronClient | None = None
        self._ptr: Any = None
        client = self._open_client(dict(options))
        err = client.ffi.new("char[]", 1024)
        ptr = client.lib.blz_pub_open(client.ptr, uri.encode(), self.stream_id, int(self.open_timeout * 1000),
                                      err, 1024)
        self._adopt(client, ptr, err, client.lib.blz_pub_set_doorbell, "subscribers will poll",
                    client.lib.blz_pub_close)
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
            return self._offer_native(self._lib.blz_pub_offer_bytes, frame, len(frame), wait_ms, wait_connect)
        ffi = self._ffi
        iov = ffi.new("aeron_iovec_t[]", len(parts))
        keep = []
        for i, p in enumerate(parts):
            buf = ffi.from_buffer("uint8_t[]", p)  # the caller's numpy memory, not a copy
            keep.append(buf)
            iov[i].iov_base = buf
            iov[i].iov_len = len(buf)
        return self._offer_native(self._lib.blz_pub_offerv, iov, len(parts), wait_ms, wait_connect)

    def _offer_native(self, offer: Callable[..., int], *args: Any) -> OfferStatus:
        """One native offer of one message, under the lock; counted when accepted."""
        with self._lock:
            if self._ptr is None:
                return OfferStatus.CLOSED
            r = offer(self._ptr, *args)
            if r >= 0:
                self._messages.add(1)
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
            self._messages.add(n)
        if r < 0 and n < len(lens):
            self._status(r)  # raises if the driver is gone; other refusals just end the batch
        return n

    @property
    def is_connected(self) -> bool:
        """Whether a subscriber is connected now."""
        with self._lock:
            return self._ptr is not None and bool(self._lib.blz_pub_is_connected(self._ptr))



class AeronSubscription(_AeronChannel, Subscription):
    """The receiving end of an Aeron channel: whole frames, reassembled and decoded.

    ``peer`` of a delivered message is ``session:<id>``, the Aeron session of the publication that sent it.
    """

    def __init__(self, uri: str, stream_id: int = 1, **options: Any) -> None:
        super().__init__("aeron")
        self.uri, self.stream_id = uri, int(stream_id)
        self._client: AeronClient | None = None
        self._ptr: Any = None
        self._peers: dict[int, str] = {}
        self.decode_errors = 0
        client = self._open_client(dict(options))
        err = client.ffi.new("char[]", 1024)
        ptr = client.lib.blz_sub_open(client.ptr, uri.encode(), self.stream_id, self.max_message_size,
                                      int(self.open_timeout * 1000), err, 1024)
        self._adopt(client, ptr, err, client.lib.blz_sub_set_doorbell, "waiting by polling",
                    client.lib.blz_sub_close)

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
            self._ready.append(msg)

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
        if not delivered:
            self._messages.report()  # idle: the counter catches up
        return delivered

    def receive(self, timeout: float | None = None) -> Message | None:
        """Wait up to ``timeout`` seconds (None = forever) for one message; the wait runs in native code."""
        if self._ready:
            return self._next_ready()
        self._messages.report()  # about to wait: the counter catches up
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
            if self._ready:
                return self._next_ready()
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
            if r:
                self._messages.add(r)
            else:
                self._messages.report()
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
