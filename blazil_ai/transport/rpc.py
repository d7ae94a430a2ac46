"""Request/reply over the transport core: the one server loop and client that the ledger and fraud services share.

The server subscribes on its listen URI and each client connects to it. Over ``tcp://`` and ``tcps://`` a
reply goes back over the connection its request came on (encrypted when that one is): the server never
connects anywhere a request names, a client that stops reading its replies is dropped rather than
stalling the server, and a client learns at once that its connection is gone, so every request still
waiting fails with an error that says so. Aeron channels have no way back: there a client subscribes on a
reply channel of its own, named in every request (``meta["reply"]``), and the server answers only on
``aeron:`` channels. A request carries ``op`` and a request number ``req``; its reply carries ``req`` and
``ok``, then either the result (metadata and arrays) or ``error`` and ``kind`` (``DataError`` travels as
such, so a client raises the same error type the server did).
"""

from __future__ import annotations

import collections
import itertools
import logging
import random
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np

from blazil_ai import metrics
from blazil_ai.errors import BlazilError, ConfigError, DataError
from blazil_ai.transport import Message, OfferStatus, Publication, TransportError, publication, subscription
from blazil_ai.transport.idle import BackoffIdleStrategy

log = logging.getLogger(__name__)

Reply = tuple[dict[str, Any], list[np.ndarray]]
_MAX_REPLY_CHANNELS = 256  # aeron reply channels a server keeps open (least recently opened closed first)
_REPLY_TIMEOUT_S = 0.5  # how long an aeron reply may wait for room before it is dropped


class RpcServer:
    """Serves requests on ``listen`` until ``stop()``; a subclass answers them in ``dispatch``.

    ``part`` names the metrics (``blazil_<part>_server_requests_total``, ``..._server_errors_total``),
    labelled by operation: one of ``ops``, or ``unknown`` (a peer cannot grow the metrics without bound).
    """

    ops: tuple[str, ...] = ()

    def __init__(self, listen: str, *, part: str, metrics_port: int | None = 0,
                 metrics_host: str = metrics.DEFAULT_HOST) -> None:
        self.sub = subscription(listen)
        self.uri: str = getattr(self.sub, "uri", listen)
        self._duplex = self.sub.supports_replies
        self._requests = metrics.counter(part, "server_requests", "total", "Requests served", labels=("op",))
        self._errors = metrics.counter(part, "server_errors", "total", "Requests answered with an error",
                                       labels=("op",))
        try:
            self.metrics = metrics.serve(metrics_port, metrics_host) if metrics_port is not None else None
        except BaseException:
            self.sub.close()
            raise
        self._pubs: dict[tuple[str, int], Publication] = {}
        # Filled by callbacks on other threads, drained by serve_forever: deque appends are atomic.
        self._replies: collections.deque[tuple[Any, dict[str, Any], list[np.ndarray]]] = collections.deque()
        self._stop = threading.Event()

    def dispatch(self, op: str, meta: dict[str, Any], arrays: list[np.ndarray]) -> Reply | Future[Reply]:
        """Answer one request now, or with a future; raise to answer with an error."""
        raise NotImplementedError

    def _handle(self, msg: Message) -> None:
        try:
            self._handle_one(msg)
        except Exception:  # one peer's request must never stop the server
            log.exception("request from %s could not be handled", msg.peer)

    def _handle_one(self, msg: Message) -> None:
        meta = msg.meta
        req, op = meta.get("req"), meta.get("op")
        op = op if isinstance(op, str) else repr(op)[:80]
        reply: Any
        if self._duplex:
            reply = msg.peer  # back over the connection the request came on, never where the request says
        else:
            uri, stream = meta.get("reply"), meta.get("reply_stream", 1)
            if not isinstance(uri, str) or not uri.startswith("aeron:") or type(stream) is not int:
                log.error("request from %s dropped: its reply channel %.80r is not an aeron: channel", msg.peer,
                          uri)
                return
            reply = (uri, stream)
        label = op if op in self.ops else "unknown"
        try:
            answer = self.dispatch(op, meta, msg.arrays)
        except Exception as e:
            self._error(reply, req, label, e)
            return
        self._requests.labels(label).inc()
        if not isinstance(answer, Future):
            self._replies.append((reply, {"req": req, "ok": True, **answer[0]}, answer[1]))
            return

        def done(f: Future[Reply]) -> None:
            try:
                body, arrays = f.result()
                self._replies.append((reply, {"req": req, "ok": True, **body}, arrays))
            except Exception as e:
                self._error(reply, req, label, e)

        answer.add_done_callback(done)

    def _error(self, reply: Any, req: Any, op: str, e: BaseException) -> None:
        self._errors.labels(op).inc()
        kind = "DataError" if isinstance(e, DataError) else type(e).__name__
        self._replies.append((reply, {"req": req, "ok": False, "error": str(e), "kind": kind}, []))

    def _send_replies(self) -> int:
        sent = 0
        while self._replies:
            to, meta, arrays = self._replies.popleft()
            try:
                status = self._reply(to, meta, arrays)
            except Exception as e:  # e.g. a result that cannot be encoded: the client still gets an answer
                log.error("reply to %s failed: %s", to, e)
                status = self._reply(to, {"req": meta.get("req"), "ok": False, "kind": type(e).__name__,
                                          "error": f"the reply could not be sent: {e}"}, [])
            if status != OfferStatus.OK:  # a client that went away must not stop the server
                log.info("reply to %s dropped: %s", to, status.name)
            sent += 1
        return sent

    def _reply(self, to: Any, meta: dict[str, Any], arrays: list[np.ndarray]) -> OfferStatus:
        if self._duplex:
            return self.sub.reply(to, meta, arrays)
        pub = self._pubs.get(to)
        try:
            if pub is None:
                while len(self._pubs) >= _MAX_REPLY_CHANNELS:  # the oldest client's channel goes first
                    self._pubs.pop(next(iter(self._pubs))).close()
                pub = self._pubs[to] = publication(to[0], to[1])
            return pub.offer(meta, arrays, timeout=_REPLY_TIMEOUT_S)
        except Exception as e:
            log.warning("reply to %s failed: %s", to, e)
            old = self._pubs.pop(to, None)
            if old is not None:
                old.close()
            return OfferStatus.NOT_CONNECTED

    def serve_forever(self) -> None:
        """Poll requests and send replies until stop() is called, then answer what was accepted (<= 5 s)."""
        idle = BackoffIdleStrategy(max_park_s=1e-3)
        while not self._stop.is_set():
            try:
                work = self.sub.poll(self._handle, limit=256)
                work += self._send_replies()
            except Exception:  # the transport drops a misbehaving peer itself; this is the last line of defence
                log.exception("%s: serving round failed; serving on", self.uri)
                work = 0
                time.sleep(0.01)
            idle.idle(work)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if not self._send_replies():
                time.sleep(0.01)
                if not self._replies:
                    break

    def stop(self) -> None:
        """Ask serve_forever to return."""
        self._stop.set()

    def run(self) -> None:
        """Serve in the foreground until SIGTERM, Ctrl-C or ``stop()``, then close (what the CLI commands do)."""
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        try:
            self.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            self.close()

    def close(self) -> None:
        """Send what is answered, then release the socket, the reply publications and /metrics."""
        self._send_replies()
        self.sub.close()
        for pub in self._pubs.values():
            pub.close()
        if self.metrics is not None:
            self.metrics.close()


class RpcClient:
    """Sends requests to an :class:`RpcServer` and matches replies to them; requests may be pipelined.

    When the connection to the server is lost, every request still waiting fails at once with an error
    that says so (it may or may not have been carried out); later requests go over a new connection.
    """

    _counter = itertools.count(1)

    def __init__(self, uri: str, *, service: str, timeout: float = 30.0, reply_uri: str | None = None,
                 **transport_options: Any) -> None:
        self.service = service
        self.uri = uri
        self.timeout = timeout
        try:
            self._pub = publication(uri, **transport_options)
        except Exception as e:
            raise ConfigError(f"cannot reach the {service} at {uri}: {e}") from e
        # Over tcp:// and tcps:// replies come back over the same connection; only aeron needs a channel back.
        self._sub = None
        self.reply_uri: str | None = None
        self._reply_stream = random.randrange(1 << 20, 1 << 30)  # an aeron reply stream of this client's own
        if not self._pub.supports_replies:
            try:
                self._sub = subscription(reply_uri or "aeron:ipc", self._reply_stream, **transport_options)
            except Exception:
                self._pub.close()
                raise
            self.reply_uri = getattr(self._sub, "uri", reply_uri or "aeron:ipc")
        self._lock = threading.Lock()
        self._waiting: dict[int, tuple[Callable[[Message], Any], Future[Any]]] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._receive_loop, name=f"{service}-client", daemon=True)
        self._thread.start()

    def send(self, op: str, meta: dict[str, Any] | None = None, arrays: list[np.ndarray] | None = None,
             decode: Callable[[Message], Any] = lambda m: m) -> Future[Any]:
        """Send one request; the future gives ``decode(reply)`` or raises the server's error."""
        req = next(self._counter)
        fut: Future[Any] = Future()
        with self._lock:
            if self._closed:
                raise BlazilError(f"{self.service} client is closed")
            self._waiting[req] = (decode, fut)
        head: dict[str, Any] = {"op": op, "req": req}
        if self.reply_uri is not None:
            head["reply"], head["reply_stream"] = self.reply_uri, self._reply_stream
        try:
            self._pub.send({**head, **(meta or {})}, arrays or [], timeout=self.timeout)
        except Exception as e:
            with self._lock:
                self._waiting.pop(req, None)
            raise BlazilError(f"cannot send to the {self.service} at {self.uri}: {e}") from e
        return fut

    def _receive_loop(self) -> None:
        source: Any = self._sub if self._sub is not None else self._pub
        while not self._closed:
            try:
                msg = source.receive(timeout=0.2)
            except TransportError as e:
                if self._closed:
                    return
                self._fail_waiting(f"the connection to the {self.service} at {self.uri} was lost before the "
                                   f"reply came ({e}); the request may or may not have been carried out")
                continue
            except Exception as e:
                if self._closed:
                    return
                log.exception("%s client: reading replies failed", self.service)
                self._fail_waiting(f"reading replies from the {self.service} at {self.uri} failed: {e}")
                time.sleep(0.05)
                continue
            if msg is None:
                continue
            req = msg.meta.get("req")
            with self._lock:
                entry = self._waiting.pop(req, None) if isinstance(req, int) else None
            if entry is None:
                continue
            decode, fut = entry
            if not msg.meta.get("ok"):
                err = str(msg.meta.get("error", "unknown error"))
                fut.set_exception(DataError(err) if msg.meta.get("kind") == "DataError" else BlazilError(err))
                continue
            try:
                fut.set_result(decode(msg))
            except Exception as e:
                fut.set_exception(e)

    def _fail_waiting(self, why: str) -> None:
        with self._lock:
            waiting = list(self._waiting.values())
            self._waiting.clear()
        if waiting:
            log.warning("%s (%d requests unanswered)", why, len(waiting))
        for _decode, fut in waiting:
            if not fut.done():
                fut.set_exception(BlazilError(why))

    def close(self) -> None:
        """Close the channels; requests still waiting fail."""
        with self._lock:
            self._closed = True
        self._thread.join(timeout=2)
        self._pub.close()
        if self._sub is not None:
            self._sub.close()
        self._fail_waiting(f"{self.service} client closed before the reply came")
