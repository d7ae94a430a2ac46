"""TCP channels (``tcp://host:port``) and TLS with client certificates (``tcps://host:port``).

The subscription listens on ``host:port`` and any number of publications connect to it. Nothing runs
in the background: ``poll`` accepts connections, reads what the kernel holds and decodes whole frames,
so a subscriber that stops polling stops reading, the kernel's socket buffers fill up and the
publishers see ``BACK_PRESSURED`` once their own bounded buffer is full.

Each connection opens with a hello frame carrying the stream id; a publication for another stream, a
frame that breaks the wire format, or a client without a valid certificate closes that one connection
with a logged error naming the peer and the fault. The subscription keeps serving its other peers,
and a frame is handed to the application only once it has arrived whole and decoded cleanly.

A subscription may answer a message over the connection it came on (``reply``), and a publication reads
those answers (``receive``), which also tells it when the connection is lost. Every limit applied to a
peer is in ``framing.LIMITS``: before its hello a peer may send no frame larger than a hello, a large
frame's buffer grows with the bytes that arrive, and running out of descriptors pauses accepting (with
back-off) rather than stopping the subscription.

TLS options (keyword arguments or URI query parameters): ``certfile``, ``keyfile``, ``cafile``. The
subscription requires a client certificate signed by ``cafile``; the publication verifies the server
against ``cafile`` (and its host name unless ``check_hostname=0``).
"""

from __future__ import annotations

import collections
import errno
import logging
import math
import os
import select
import selectors
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from blazil_ai import metrics
from blazil_ai.transport import framing
from blazil_ai.transport.base import OfferStatus, Publication, Subscription, TransportError
from blazil_ai.transport.framing import DEFAULT_MAX_MESSAGE_SIZE, HEADER_SIZE, LIMITS, FrameError, Message

log = logging.getLogger(__name__)

_HELLO_KEY = "$hello"
_FULL_ROUND_S = 0.001  # poll() on a sole connection reads it directly, and looks at everything else this often
# receive() on a sole connection can poll it this long before it sleeps (opt-in): a message that arrives
# meanwhile costs neither side a wake-up, which halves a ping-pong's round trip on loopback; but a spinning
# reader of a busy stream reads one message per system call and slows a fast sender down (measured with
# benchmarks/transport.py), so the default is to sleep at once.
_SPIN_NS = int(float(os.environ.get("BLAZIL_TCP_SPIN_US", "0")) * 1000)
_MAX_WAIT_MS = 2**31 - 1  # the native wait takes a C int
_LIVENESS_CHECK_S = 0.01  # how often an idle-reading publication peeks for the peer having gone away
_RECONNECT_BACKOFF_S = (0.05, 1.0)
_ACCEPT_BACKOFF_S = (0.05, 1.0)  # out of descriptors: stop accepting this long (doubling), keep serving the rest
_ACCEPT_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_IOV_MAX = 1024

_native_read: Any = framing.native.read_frames if framing.native is not None else None
_native_send: Any = framing.native.send_frame if framing.native is not None else None
_native_parse: Any = framing.native.parse_frames if framing.native is not None else None
_OK = OfferStatus.OK
_frame_errors = metrics.counter("transport", "frame_errors", "total",
                                "Connections closed for a bad frame or handshake", ["transport", "fault"])
_connections = metrics.gauge("transport", "connections", "", "Open inbound connections", ["transport"])
_accept_paused = metrics.counter("transport", "accept_paused", "total",
                                 "Times a listener stopped accepting for a while (out of descriptors)", ["transport"])


@dataclass(slots=True)
class _Endpoint:
    scheme: str
    host: str
    port: int
    options: dict[str, str]


def parse_uri(uri: str) -> _Endpoint:
    """Split ``tcp://host:port?k=v`` into its parts, with a clear error for anything else."""
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme not in ("tcp", "tcps"):
        raise TransportError(f"{uri!r}: expected tcp:// or tcps://")
    try:
        port = parsed.port
    except ValueError as e:
        raise TransportError(f"{uri!r}: bad port: {e}") from e
    if not parsed.hostname or port is None:
        raise TransportError(f"{uri!r}: expected tcp://host:port")
    options = dict(urllib.parse.parse_qsl(parsed.query))
    return _Endpoint(parsed.scheme, parsed.hostname, port, options)


def _tls_settings(ep: _Endpoint, kw: dict[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {**ep.options, **{k: v for k, v in kw.items() if v is not None}}
    if ep.scheme == "tcps":
        for name in ("certfile", "keyfile", "cafile"):
            if not merged.get(name):
                raise TransportError(f"tcps:// needs {name}= (as an option or in the URI query)")
    return merged


def _tls_context(protocol: ssl._SSLMethod, opts: Mapping[str, Any]) -> ssl.SSLContext:
    """TLS 1.2 or later, our certificate and key, and the CA that signs the other side's."""
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(opts["certfile"], opts["keyfile"])
    ctx.load_verify_locations(cafile=opts["cafile"])
    return ctx


def _server_context(opts: Mapping[str, Any]) -> ssl.SSLContext:
    ctx = _tls_context(ssl.PROTOCOL_TLS_SERVER, opts)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _client_context(opts: Mapping[str, Any]) -> ssl.SSLContext:
    ctx = _tls_context(ssl.PROTOCOL_TLS_CLIENT, opts)
    ctx.check_hostname = str(opts.get("check_hostname", "1")).lower() not in ("0", "false", "no")
    return ctx


@dataclass(slots=True, eq=False)
class _Conn:
    sock: socket.socket
    peer: str
    fd: int  # the socket's descriptor: the key in TcpSubscription._conns and what the native read uses
    handshaking: bool = False
    hello_done: bool = False
    rbuf: bytearray = field(default_factory=lambda: bytearray(LIMITS.read_chunk))
    rstart: int = 0
    rend: int = 0
    header: tuple[int, int, int] | None = None
    # A frame too large for rbuf is read straight into its own buffer, which grows as the frame's bytes
    # arrive (see _grow_body): a header alone never makes the receiver commit memory for what it promises.
    body: bytearray | None = None
    body_filled: int = 0
    out: collections.deque[memoryview] = field(default_factory=collections.deque)  # replies the kernel has not taken
    out_bytes: int = 0


def _copy_unsent(parts: Sequence[bytes | memoryview], skip: int, out: collections.deque[memoryview]) -> int:
    """Queue copies of what the kernel did not take (the first ``skip`` bytes went); return the bytes queued.

    Copies, because the caller may reuse its arrays once its send returns."""
    queued = 0
    for p in parts:
        if skip >= len(p):
            skip -= len(p)
            continue
        chunk = memoryview(bytes(memoryview(p)[skip:]))
        skip = 0
        out.append(chunk)
        queued += len(chunk)
    return queued


def _grow_body(conn: _Conn) -> None:
    """Make room in a large frame's buffer for its next bytes: at most double what has arrived."""
    assert conn.body is not None and conn.header is not None
    size = len(conn.body)
    target = min(conn.header[2], max(2 * size, LIMITS.body_step))
    conn.body.extend(bytes(target - size))


class _Reader:
    """Reading frames off connections: the receiving half both ends of a TCP channel share.

    A subscription reads its publishers' frames with it, a publication the replies its subscriber sends
    back. Subclasses say what a fault and a closed connection mean (``_fault``, ``_drop``).
    """

    uri: str
    stream_id: int
    max_message_size: int
    _ready: collections.deque[Message]

    def _fault(self, conn: _Conn, fault: str, detail: str) -> None:
        raise NotImplementedError

    def _drop(self, conn: _Conn) -> None:
        raise NotImplementedError

    def _read(self, conn: _Conn) -> None:
        """Read what is available on one connection and decode every whole frame in it."""
        sock = conn.sock
        for _ in range(64):  # bounded, so one busy peer cannot starve the others
            if len(self._ready) >= LIMITS.ready_high:
                return  # the rest waits in the kernel (epoll reports it again): memory stays bounded
            try:
                if conn.body is not None:
                    if conn.body_filled == len(conn.body):
                        _grow_body(conn)
                    n = sock.recv_into(memoryview(conn.body)[conn.body_filled:])
                else:
                    if conn.rend == len(conn.rbuf):
                        self._compact(conn)
                        if conn.rend == len(conn.rbuf):  # full of one frame that is still arriving
                            self._grow(conn)
                    room = len(conn.rbuf) - conn.rend
                    n = sock.recv_into(memoryview(conn.rbuf)[conn.rend:])
                    if n == room:
                        self._grow(conn)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except (ssl.SSLError, OSError) as e:
                self._read_failed(conn, e.errno if isinstance(e, OSError) else None, str(e))
                return
            if n == 0:
                self._disconnected(conn)
                return
            if conn.body is not None:
                conn.body_filled += n
                assert conn.header is not None
                if conn.body_filled == conn.header[2]:
                    if not self._finish_frame(conn, conn.body):
                        return
                    conn.body, conn.header = None, None
            else:
                conn.rend += n
                if not self._parse(conn):
                    return
            if conn.body is None and conn.rend - conn.rstart < HEADER_SIZE and n < len(conn.rbuf) // 2:
                return  # drained what the kernel had

    @staticmethod
    def _grow(conn: _Conn) -> None:
        """A read filled the buffer: a busy peer. Double it (up to the cap) to read more per system call."""
        if len(conn.rbuf) < LIMITS.read_chunk_max:
            conn.rbuf.extend(bytes(len(conn.rbuf)))

    def _read_failed(self, conn: _Conn, err: int | None, detail: str) -> None:
        if err in (errno.ECONNRESET, errno.EPIPE):
            self._disconnected(conn)
        else:
            self._fault(conn, "io", f"read failed: {detail}")

    def _disconnected(self, conn: _Conn) -> None:
        partial = conn.body is not None or conn.rend > conn.rstart
        if partial:
            self._fault(conn, "truncated", "peer closed the connection in the middle of a frame")
        else:
            log.info("%s: %s disconnected", self.uri, conn.peer)
            self._drop(conn)

    @staticmethod
    def _compact(conn: _Conn) -> None:
        remaining = conn.rend - conn.rstart
        conn.rbuf[:remaining] = conn.rbuf[conn.rstart:conn.rend]
        conn.rstart, conn.rend = 0, remaining

    def _parse(self, conn: _Conn) -> bool:
        """Decode the whole frames in the read buffer; False if the connection was closed."""
        buf = conn.rbuf
        start, end = conn.rstart, conn.rend
        unpack_header = framing.HEADER.unpack_from
        max_size = self.max_message_size
        while True:
            if _native_parse is not None and conn.header is None and conn.hello_done:
                # stops where Python must look
                start = _native_parse(buf, start, end, max_size, conn.peer, self._ready)
            if conn.header is None:
                # Before its hello a peer has said nothing about itself: its frame may be no larger than a hello.
                max_size = self.max_message_size if conn.hello_done else min(max_size, LIMITS.max_hello_size)
                if end - start < HEADER_SIZE:
                    break
                magic, version, _flags, n_arrays, meta_len, body_len = unpack_header(buf, start)
                if magic != framing.MAGIC or version != framing.VERSION or meta_len > body_len \
                        or HEADER_SIZE + body_len > max_size:
                    try:  # the checked decoder names the fault
                        framing.decode_header(bytes(buf[start:start + HEADER_SIZE]), max_size)
                    except FrameError as e:
                        self._fault(conn, "header", str(e))
                    return False
                conn.header = (n_arrays, meta_len, body_len)
                start += HEADER_SIZE
            body_len = conn.header[2]
            if end - start >= body_len:
                body = buf[start:start + body_len]  # a bytearray copy the message's arrays can own
                start += body_len
                if not self._finish_frame(conn, body):
                    return False
                conn.header = None
                continue
            if body_len > LIMITS.read_chunk_max - HEADER_SIZE:
                # Too large for the read buffer at its largest: read the rest straight into the frame's own
                # buffer. (A smaller frame stays in the read buffer, which _read grows as the bytes arrive.)
                conn.body = bytearray(buf[start:end])  # what has arrived; _grow_body adds room as more does
                conn.body_filled = end - start
                conn.rstart = conn.rend = 0
                return True
            break
        conn.rstart, conn.rend = start, end
        if start == end:
            conn.rstart = conn.rend = 0
        elif start > len(buf) // 2:
            self._compact(conn)
        return True

    def _finish_frame(self, conn: _Conn, body: bytearray) -> bool:
        assert conn.header is not None
        n_arrays, meta_len, _ = conn.header
        try:
            msg = framing.decode_body(n_arrays, meta_len, body)
        except FrameError as e:
            self._fault(conn, "body", str(e))
            return False
        if not conn.hello_done:
            hello = msg.meta.get(_HELLO_KEY)
            if not isinstance(hello, dict):
                self._fault(conn, "hello", "first frame is not a hello")
                return False
            if hello.get("stream_id") != self.stream_id:
                self._fault(conn, "hello", f"publication is for stream {hello.get('stream_id')!r}, "
                                           f"this subscription serves stream {self.stream_id}")
                return False
            conn.hello_done = True
            return True
        msg.peer = conn.peer
        self._ready.append(msg)
        return True


class TcpSubscription(Subscription, _Reader):
    """The listening end of a TCP channel: several publishers, each delivered in its own order."""

    def __init__(self, uri: str, stream_id: int = 1, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                 certfile: str | None = None, keyfile: str | None = None, cafile: str | None = None,
                 backlog: int = 128, **_: Any) -> None:
        ep = parse_uri(uri)
        opts = _tls_settings(ep, {"certfile": certfile, "keyfile": keyfile, "cafile": cafile})
        super().__init__(ep.scheme)
        self.stream_id = stream_id
        self.max_message_size = max_message_size
        self._kind = ep.scheme
        self._ssl = _server_context(opts) if ep.scheme == "tcps" else None
        self._listener = socket.create_server((ep.host, ep.port), backlog=backlog, reuse_port=False)
        self._listener.setblocking(False)
        port = self._listener.getsockname()[1]
        query = urllib.parse.urlsplit(uri).query
        self.uri = f"{ep.scheme}://{ep.host}:{port}" + (f"?{query}" if query else "")
        # epoll directly: the selectors module's bookkeeping costs microseconds per receive.
        self._epoll = select.epoll()
        self._epoll.register(self._listener.fileno(), select.EPOLLIN)
        self._listen_fd = self._listener.fileno()
        self._conns: dict[int, _Conn] = {}
        self._by_peer: dict[str, _Conn] = {}
        self._closed = False
        self._full_round_at = 0.0
        self._accept_resume = 0.0  # while > 0, accepting is paused (out of descriptors) until this time
        self._accept_backoff = _ACCEPT_BACKOFF_S[0]

    # -- the application's side -------------------------------------------------------------------

    def poll(self, handler: Callable[[Message], None], limit: int = 64) -> int:
        """Deliver up to ``limit`` whole messages to ``handler``; never blocks."""
        if self._closed:
            raise TransportError(f"{self.uri}: subscription is closed")
        if not self._ready:
            conn = self._sole_conn()
            now = time.monotonic()
            if conn is not None and now - self._full_round_at < _FULL_ROUND_S:
                self._read_sole(conn, 0)
            else:
                self._full_round_at = now  # the full round (new connections included) now and then
                self._pump(0.0)
        if not self._ready:
            self._messages.report()  # idle: the counter catches up
            return 0
        return self._deliver(handler, limit)

    def receive(self, timeout: float | None = None) -> Message | None:
        """Wait up to ``timeout`` seconds (None = forever) for one message, sleeping in epoll."""
        if self._closed:
            raise TransportError(f"{self.uri}: subscription is closed")
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._ready:
            conn = self._sole_conn()
            if conn is not None:
                # One plain connection (the usual case): wait, read and decode in one native call.
                self._read_sole(conn, -1 if timeout is None else min(math.ceil(timeout * 1000), _MAX_WAIT_MS))
        if not self._ready:
            self._messages.report()
            while not self._ready:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                self._pump(wait)
                if self._ready or (deadline is not None and time.monotonic() >= deadline):
                    break
            if not self._ready:
                return None
        return self._next_ready()

    @property
    def peers(self) -> list[str]:
        """Addresses of the publications connected now."""
        return [c.peer for c in self._conns.values() if c.hello_done]

    def close(self) -> None:
        """Close every connection and the listening socket."""
        if self._closed:
            return
        self.flush(timeout=1.0)
        self._closed = True
        self._messages.report()
        for conn in list(self._conns.values()):
            self._drop(conn)
        self._epoll.close()
        self._listener.close()

    supports_replies = True

    def reply(self, peer: str, meta: Mapping[str, Any] | None = None, arrays: Sequence[np.ndarray] = ()) -> OfferStatus:
        """Send a message back over the connection ``peer`` (a received message's ``peer``); never blocks.

        Call it from the thread that polls this subscription.
        What the kernel does not take at once waits in the connection's own queue and goes out as the peer
        reads; a peer that lets more than ``LIMITS.reply_queue`` bytes pile up is disconnected. Returns
        ``NOT_CONNECTED`` when that connection is gone.
        """
        conn = self._by_peer.get(peer)
        if conn is None or not conn.hello_done or self._closed:
            return OfferStatus.NOT_CONNECTED
        sent = 0
        if conn.out:
            parts = framing.encode(meta, arrays, self.max_message_size)
        elif self._ssl is None and _native_send is not None:
            r = _native_send(conn.fd, meta, arrays, self.max_message_size)
            if type(r) is int:
                return _OK
            parts, sent = r
            sent = max(sent, 0)  # a failed send: the Python send below meets the error again and names it
        else:
            parts = framing.encode(meta, arrays, self.max_message_size)
        if self._ssl is not None:
            parts = [b"".join(parts)]  # TLS retries a write with the same buffer
        size = sum(map(len, parts))
        if not conn.out and sent == 0:
            try:
                sent = conn.sock.send(parts[0]) if self._ssl is not None else conn.sock.sendmsg(parts[:_IOV_MAX])
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                sent = 0
            except OSError as e:
                self._read_failed(conn, e.errno, f"reply failed: {e}")
                return OfferStatus.NOT_CONNECTED
        if sent < size:
            if conn.out and conn.out_bytes + size - sent > LIMITS.reply_queue:
                self._fault(conn, "slow", f"peer does not read its replies ({conn.out_bytes} bytes waiting)")
                return OfferStatus.NOT_CONNECTED
            if not conn.out:
                self._epoll.modify(conn.fd, select.EPOLLIN | select.EPOLLOUT)
            conn.out_bytes += _copy_unsent(parts, sent, conn.out)
        return _OK

    def flush(self, timeout: float = 1.0) -> bool:
        """Wait up to ``timeout`` s until every queued reply has been handed to the kernel."""
        deadline = time.monotonic() + timeout
        while not self._closed and any(c.out for c in self._conns.values()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._pump(min(remaining, 0.05))
        return True

    # -- internals --------------------------------------------------------------------------------

    def _sole_conn(self) -> _Conn | None:
        """The one connection, when it alone is open, is plain TCP and sits between frames; else None."""
        if _native_read is None or self._ssl is not None or len(self._conns) != 1:
            return None
        for conn in self._conns.values():
            if conn.hello_done and conn.header is None and conn.body is None and not conn.out:
                return conn
        return None

    def _read_sole(self, conn: _Conn, timeout_ms: int) -> None:
        """Wait up to ``timeout_ms`` for the sole connection, read and decode natively; the rest is Python's."""
        try:
            self._read_sole_native(conn, timeout_ms)
        except Exception as e:  # whatever one peer's bytes do, they close that connection, never the server
            self._fault(conn, "internal", f"{type(e).__name__}: {e}")

    def _read_sole_native(self, conn: _Conn, timeout_ms: int) -> None:
        if self._accept_resume and timeout_ms != 0:
            timeout_ms = 1 if timeout_ms < 0 else min(timeout_ms, 1000)  # come back to resume accepting
        listen_fd = -1 if self._accept_resume else self._listen_fd
        start, end, n, err = _native_read(conn.fd, conn.rbuf, conn.rstart, conn.rend, self.max_message_size,
                                          conn.peer, self._ready, timeout_ms, listen_fd, _SPIN_NS)
        conn.rstart, conn.rend = start, end
        if end == len(conn.rbuf):
            self._grow(conn)
        if err:
            self._read_failed(conn, err, os.strerror(err))
        elif n == 0:
            self._disconnected(conn)
        elif end - start >= HEADER_SIZE:
            self._parse(conn)  # what the native path leaves: a frame in pieces, a new dtype, a bad frame
        elif start == end:
            conn.rstart = conn.rend = 0

    def _pump(self, timeout: float | None) -> None:
        """One round of epoll: accept, handshake, read and decode; waits at most ``timeout``."""
        # TLS may hold decrypted bytes that epoll cannot see.
        if self._ssl is not None:
            # TLS may hold decrypted bytes that epoll cannot see.
            pending_tls = [c for c in self._conns.values() if not c.handshaking and c.sock.pending()]  # type: ignore[attr-defined]
            for c in pending_tls:
                self._read(c)
            if pending_tls:
                timeout = 0.0
        if self._accept_resume:
            wait = self._accept_resume - time.monotonic()
            if wait <= 0:
                self._resume_accept()
            elif timeout is None or timeout > wait:
                timeout = wait
        events = self._epoll.poll(-1 if timeout is None else timeout)
        for fd, ev in events:
            if fd == self._listen_fd:
                self._accept()
                continue
            conn = self._conns.get(fd)
            if conn is None:
                continue
            try:
                if conn.handshaking:
                    self._handshake(conn)
                    continue
                if ev & select.EPOLLOUT:
                    self._send_queued(conn)
                if ev & ~select.EPOLLOUT and conn.fd in self._conns:
                    self._read(conn)
            except Exception as e:  # whatever one peer's bytes do, they close that connection, never the server
                self._fault(conn, "internal", f"{type(e).__name__}: {e}")

    def _accept(self) -> None:
        while True:
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in _ACCEPT_ERRNOS:
                    self._pause_accept(e)
                    return
                if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # that one connection failed on its way in
                log.error("%s: accept failed: %s", self.uri, e)
                return
            self._accept_backoff = _ACCEPT_BACKOFF_S[0]
            peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setblocking(False)
                conn = _Conn(sock=sock, peer=peer, fd=sock.fileno())
                if self._ssl is not None:
                    conn.sock = self._ssl.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                    conn.handshaking = True
            except (OSError, ssl.SSLError) as e:
                log.info("%s: connection from %s failed on its way in: %s", self.uri, peer, e)
                sock.close()
                continue
            self._conns[conn.fd] = conn
            self._by_peer[conn.peer] = conn
            self._epoll.register(conn.fd, select.EPOLLIN)
            _connections.labels(self._kind).inc()
            if conn.handshaking:
                self._handshake(conn)

    def _pause_accept(self, e: OSError) -> None:
        """Out of descriptors (or memory): stop accepting for a while and keep serving the open connections."""
        if not self._accept_resume:
            self._epoll.unregister(self._listen_fd)
        self._accept_resume = time.monotonic() + self._accept_backoff
        log.error("%s: cannot accept connections: %s (%d open); serving those, accepting again in %.2f s",
                  self.uri, e.strerror or e, len(self._conns), self._accept_backoff)
        _accept_paused.labels(self._kind).inc()
        self._accept_backoff = min(self._accept_backoff * 2, _ACCEPT_BACKOFF_S[1])

    def _resume_accept(self) -> None:
        self._accept_resume = 0.0
        self._epoll.register(self._listen_fd, select.EPOLLIN)

    def _send_queued(self, conn: _Conn) -> None:
        """Hand queued replies to the kernel as the peer reads them."""
        while conn.out:
            head = conn.out[0]
            try:
                n = conn.sock.send(head)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                return
            except OSError as e:
                self._read_failed(conn, e.errno, f"reply failed: {e}")
                return
            conn.out_bytes -= n
            if n == len(head):
                conn.out.popleft()
            else:
                conn.out[0] = head[n:]
        self._epoll.modify(conn.fd, select.EPOLLIN)

    def _handshake(self, conn: _Conn) -> None:
        assert isinstance(conn.sock, ssl.SSLSocket)
        try:
            conn.sock.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except (ssl.SSLError, OSError) as e:
            self._fault(conn, "tls", f"TLS handshake failed: {e}")
            return
        conn.handshaking = False

    def _fault(self, conn: _Conn, fault: str, detail: str) -> None:
        log.error("%s stream %d: closing connection from %s: %s", self.uri, self.stream_id, conn.peer, detail)
        _frame_errors.labels(self._kind, fault).inc()
        self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        fd = conn.fd
        if fd in self._conns:
            del self._conns[fd]
            if self._by_peer.get(conn.peer) is conn:
                del self._by_peer[conn.peer]
            self._epoll.unregister(fd)
            _connections.labels(self._kind).dec()
        conn.out.clear()
        conn.sock.close()

class _Flusher:
    """One daemon thread per process that drains publications whose socket buffer was full.

    Without it, bytes left in a publication's own buffer would wait for the next ``offer``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: set[TcpPublication] = set()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._thread: threading.Thread | None = None

    def add(self, pub: TcpPublication) -> None:
        with self._lock:
            self._waiting.add(pub)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="blazil-tcp-flusher", daemon=True)
                self._thread.start()
        os.write(self._wake_w, b"x")

    def _run(self) -> None:
        while True:
            with self._lock:
                pubs = list(self._waiting)
            with selectors.DefaultSelector() as sel:
                sel.register(self._wake_r, selectors.EVENT_READ, None)
                for p in pubs:
                    sock = p._sock
                    if sock is not None:
                        try:
                            sel.register(sock, selectors.EVENT_WRITE, p)
                        except (ValueError, OSError):
                            pass  # closed by its owner meanwhile; dropped from the set below
                events = sel.select(0.05 if pubs else None)
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
            ready = {key.data for key, _ in events if key.data is not None}
            for p in pubs:
                with p._lock:
                    if p in ready and p._sock is not None:
                        p._drain()
                    done = p._sock is None or not p._pending
                if done:
                    with self._lock:
                        self._waiting.discard(p)


_FLUSHER = _Flusher()


class _ReplyReader(_Reader):
    """A publication's reading half: the replies its subscriber sends back over the same connection."""

    def __init__(self, pub: TcpPublication, sock: socket.socket) -> None:
        self.uri, self.stream_id, self.max_message_size = pub.uri, pub.stream_id, pub.max_message_size
        self._ready = collections.deque()
        self.conn = _Conn(sock=sock, peer=pub.uri, fd=sock.fileno(), hello_done=True)
        self.broken: str | None = None  # why the connection can no longer be read, once it cannot

    def _fault(self, conn: _Conn, fault: str, detail: str) -> None:
        log.error("%s: closing the connection: %s", self.uri, detail)
        self.broken = self.broken or detail

    def _drop(self, conn: _Conn) -> None:
        self.broken = self.broken or "the subscriber closed the connection"


class TcpPublication(Publication):
    """The connecting end of a TCP channel. Not thread-safe: one sender per publication (and one reader of
    the replies, which may be another thread)."""

    supports_replies = True

    def __init__(self, uri: str, stream_id: int = 1, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                 buffer_limit: int = 4 * 1024 * 1024, connect_timeout: float = 2.0,
                 certfile: str | None = None, keyfile: str | None = None, cafile: str | None = None,
                 check_hostname: bool | None = None, **_: Any) -> None:
        ep = parse_uri(uri)
        super().__init__(ep.scheme)
        self._ep = ep
        self._opts = _tls_settings(ep, {"certfile": certfile, "keyfile": keyfile, "cafile": cafile,
                                        "check_hostname": None if check_hostname is None else int(check_hostname)})
        self._ssl = _client_context(self._opts) if ep.scheme == "tcps" else None
        self.uri = uri
        self.stream_id = stream_id
        self.max_message_size = max_message_size
        self.buffer_limit = buffer_limit
        self.connect_timeout = connect_timeout
        self._sock: socket.socket | None = None
        self._pending: collections.deque[memoryview] = collections.deque()
        self._pending_bytes = 0
        self._next_attempt = 0.0
        self._backoff = _RECONNECT_BACKOFF_S[0]
        self._last_check = 0.0
        self._closed = False
        self._handshaking = False
        self._fast_fd = -1  # the socket's descriptor while the native send path may use it
        self._lock = threading.Lock()  # offer() vs the background flusher vs the reader of replies
        self._reader: _ReplyReader | None = None
        self._lost: str | None = None  # a connection was lost since receive() last said so: why
        self._connect(self.connect_timeout)

    def receive(self, timeout: float | None = None) -> Message | None:
        """Wait up to ``timeout`` s (None = forever) for a message the subscriber sent back (a reply).

        Raises :class:`TransportError` once for every connection that was lost: replies still owed on it
        will never come (the publication itself reconnects on the next offer).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if self._closed:
                    raise TransportError(f"{self.uri}: publication is closed", OfferStatus.CLOSED)
                reader, sock = self._reader, self._sock
                if reader is not None and not reader._ready and sock is not None \
                        and (not self._handshaking or self._handshake()):
                    reader._read(reader.conn)
                    if reader.broken is not None:
                        self._disconnect(reader.broken)
                if reader is not None and reader._ready:
                    return reader._ready.popleft()
                if self._lost is not None:
                    why, self._lost = self._lost, None
                    raise TransportError(f"{self.uri}: connection lost: {why}", OfferStatus.NOT_CONNECTED)
                sock = self._sock
            wait = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
            if wait <= 0:
                return None
            if sock is None:
                time.sleep(wait)
                continue
            try:
                select.select([sock], [], [], wait)  # without the lock: the sender and flusher go on meanwhile
            except (OSError, ValueError):
                time.sleep(wait)  # closed meanwhile; the next round says so

    @property
    def is_connected(self) -> bool:
        """Whether the connection to the subscriber is up (checked without sending)."""
        return self._sock is not None and not self._handshaking and self._alive(force=True)

    def offer(self, meta: Mapping[str, Any] | None = None, arrays: Sequence[np.ndarray] = (), *,
              timeout: float = 0.0) -> OfferStatus:
        """Queue one message for the subscriber, waiting up to ``timeout`` s for a connection or room."""
        if self._closed:
            return OfferStatus.CLOSED
        if self._fast_fd >= 0 and not self._pending and time.monotonic() - self._last_check < _LIVENESS_CHECK_S:
            # The common case, in one native call: a healthy plain connection with nothing queued before this
            # message (so order holds without the flusher's lock: only this thread ever adds to the queue).
            r = _native_send(self._fast_fd, meta, arrays, self.max_message_size)
            if type(r) is int:
                self._messages.add(1)
                return _OK
            parts, sent = r
            if sent > 0:
                with self._lock:
                    self._queue(parts, sent)  # the kernel took part of it; the rest goes first next time
                self._messages.add(1)
                return _OK
        else:
            parts = framing.encode(meta, arrays, self.max_message_size)
        return self._offer_parts(parts, framing.frame_size(parts), 1, timeout)

    def offer_batch(self, messages: Sequence[Message | bytes | bytearray], *, timeout: float = 0.0) -> int:
        """Offer many messages with one system call per ~1000 buffers; return how many were accepted.

        Items may be :class:`Message` objects or frames already encoded with ``framing.encode_bytes``.
        Acceptance is all or nothing per call: either every message is queued in order or none is.
        """
        if self._closed:
            return 0
        parts: list[bytes | memoryview] = []
        for m in messages:
            if isinstance(m, bytes | bytearray):
                framing.decode_header(m, self.max_message_size)  # refuse a malformed pre-encoded frame here
                parts.append(memoryview(m))
            else:
                parts.extend(framing.encode(m.meta, m.arrays, self.max_message_size))
        if not parts:
            return 0
        status = self._offer_parts(parts, sum(map(len, parts)), len(messages), timeout)
        return len(messages) if status == OfferStatus.OK else 0

    def _offer_parts(self, parts: list[bytes | memoryview], size: int, count: int, timeout: float) -> OfferStatus:
        """Queue encoded frames (``count`` messages, ``size`` bytes) whole, waiting up to ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                status = self._try_offer(parts, size)
            if status == OfferStatus.OK:
                self._messages.add(count)
                return status
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return status
            self._wait(status, remaining)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything offered has been handed to the kernel; False on time-out or disconnect."""
        deadline = time.monotonic() + timeout
        while self._pending:
            with self._lock:
                if self._sock is None or (self._handshaking and not self._handshake()) or not self._drain():
                    return False
            remaining = deadline - time.monotonic()
            if not self._pending:
                break
            if remaining <= 0:
                return False
            self._wait(OfferStatus.BACK_PRESSURED, remaining)
        return True

    def close(self) -> None:
        """Send what is buffered (briefly), then close the connection."""
        if self._closed:
            return
        if self._sock is not None and self._pending:
            self.flush(timeout=1.0)
        self._messages.report()
        with self._lock:
            self._closed = True
            self._disconnect()

    # -- internals --------------------------------------------------------------------------------

    def _try_offer(self, parts: list[bytes | memoryview], size: int) -> OfferStatus:
        if self._sock is None or not self._alive():
            if not self._connect(0.0):
                return OfferStatus.NOT_CONNECTED
        if self._handshaking and not self._handshake():
            return OfferStatus.NOT_CONNECTED
        if self._pending and not self._drain():
            return OfferStatus.NOT_CONNECTED
        if self._pending_bytes + size > self.buffer_limit and self._pending:
            return OfferStatus.BACK_PRESSURED
        if self._pending:
            self._queue(parts, 0)
            return OfferStatus.OK
        try:
            sent = self._send(parts)
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            sent = 0
        except OSError as e:
            log.info("%s: connection lost: %s", self.uri, e)
            self._disconnect(f"send failed: {e}")
            return OfferStatus.NOT_CONNECTED
        if sent < size:
            self._queue(parts, sent)
        return OfferStatus.OK

    def _send(self, parts: list[bytes | memoryview]) -> int:
        assert self._sock is not None
        if self._ssl is not None:
            return self._sock.send(b"".join(parts))
        if len(parts) <= _IOV_MAX:
            return self._sock.sendmsg(parts)
        sent = 0
        for i in range(0, len(parts), _IOV_MAX):
            chunk = parts[i:i + _IOV_MAX]
            n = self._sock.sendmsg(chunk)
            sent += n
            if n < sum(map(len, chunk)):
                break
        return sent

    def _queue(self, parts: list[bytes | memoryview], skip: int) -> None:
        # Copy what the kernel did not take: the caller may reuse its arrays once offer returns.
        if not self._pending and not self._closed:
            _FLUSHER.add(self)
        self._pending_bytes += _copy_unsent(parts, skip, self._pending)

    def _drain(self) -> bool:
        """Push buffered bytes to the kernel; False if the connection broke."""
        assert self._sock is not None
        while self._pending:
            head = self._pending[0]
            try:
                n = self._sock.send(head)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                return True
            except OSError as e:
                log.info("%s: connection lost: %s", self.uri, e)
                self._disconnect(f"send failed: {e}")
                return False
            self._pending_bytes -= n
            if n == len(head):
                self._pending.popleft()
            else:
                self._pending[0] = head[n:]
        return True

    def _wait(self, status: OfferStatus, remaining: float) -> None:
        if status == OfferStatus.BACK_PRESSURED and self._sock is not None:
            sel = selectors.DefaultSelector()
            try:
                sel.register(self._sock, selectors.EVENT_WRITE)
                sel.select(min(remaining, 0.05))
            finally:
                sel.close()
        else:
            time.sleep(min(remaining, max(0.0, self._next_attempt - time.monotonic()), 0.05) or 0.001)

    def _alive(self, force: bool = False) -> bool:
        """Peek for EOF/reset from the subscriber (which never sends), at most every 10 ms."""
        now = time.monotonic()
        if not force and now - self._last_check < _LIVENESS_CHECK_S:
            return True
        self._last_check = now
        assert self._sock is not None
        try:
            if isinstance(self._sock, ssl.SSLSocket):
                raw = socket.socket(fileno=self._sock.fileno())
                try:
                    data = raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                finally:
                    raw.detach()
            else:
                data = self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError as e:
            self._disconnect(str(e))
            return False
        if data == b"":
            log.info("%s: subscriber closed the connection", self.uri)
            self._disconnect("the subscriber closed the connection")
            return False
        return True

    def _connect(self, timeout: float) -> bool:
        now = time.monotonic()
        if now < self._next_attempt:
            return False
        try:
            sock = socket.create_connection((self._ep.host, self._ep.port),
                                            timeout=max(timeout, 0.05) if timeout else self.connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            if self._ssl is not None:
                # The handshake goes on in offer(), so a subscriber in the same thread can answer it.
                sock = self._ssl.wrap_socket(sock, server_hostname=self._ep.host, do_handshake_on_connect=False)
                self._handshaking = True
        except (OSError, ssl.SSLError) as e:
            self._connect_failed(f"connect failed: {e}")
            return False
        self._sock = sock
        self._reader = _ReplyReader(self, sock)
        self._fast_fd = sock.fileno() if self._ssl is None and _native_send is not None else -1
        self._last_check = time.monotonic()
        hello = framing.encode_bytes({_HELLO_KEY: {"stream_id": self.stream_id, "version": framing.VERSION}})
        self._queue([hello], 0)
        return True

    def _connect_failed(self, why: str) -> None:
        self._next_attempt = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, _RECONNECT_BACKOFF_S[1])
        log.debug("%s: %s", self.uri, why)

    def _handshake(self) -> bool:
        """Advance the TLS handshake; True once it is complete."""
        assert isinstance(self._sock, ssl.SSLSocket)
        try:
            self._sock.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        except (ssl.SSLError, OSError) as e:
            log.warning("%s: TLS handshake failed: %s", self.uri, e)
            self._disconnect(f"TLS handshake failed: {e}")
            self._connect_failed(f"TLS handshake failed: {e}")
            return False
        self._handshaking = False
        self._backoff = _RECONNECT_BACKOFF_S[0]
        return True

    def _disconnect(self, why: str = "connection closed") -> None:
        self._fast_fd = -1  # before the close: the descriptor's number may be reused at once
        self._reader = None
        if self._sock is not None:
            if not self._closed:
                self._lost = why
            try:
                self._sock.close()
            finally:
                self._sock = None
        self._pending.clear()
        self._pending_bytes = 0
        self._handshaking = False
