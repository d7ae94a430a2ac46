"""Request/reply over the transport core: the one server loop and client that the ledger and fraud services share.

The server subscribes on its listen URI; each client subscribes on a reply URI of its own and names it in
every request (``meta["reply"]``); the server opens one publication back per reply URI (over ``tcps://``
with the certificate settings of its own listen URI). A request carries ``op`` and a request number
``req``; its reply carries ``req`` and ``ok``, then either the result (metadata and arrays) or ``error``
and ``kind`` (``DataError`` travels as such, so a client raises the same error type the server did).
"""

from __future__ import annotations

import collections
import itertools
import logging
import signal
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np

from blazil_ai import metrics
from blazil_ai.errors import BlazilError, ConfigError, DataError
from blazil_ai.transport import Message, Publication, publication, subscription
from blazil_ai.transport.idle import BackoffIdleStrategy

log = logging.getLogger(__name__)

Reply = tuple[dict[str, Any], list[np.ndarray]]


def then(fut: Future[Any], fn: Callable[[Any], Any]) -> Future[Any]:
    """A future of ``fn(fut.result())`` (the error passes through unchanged)."""
    out: Future[Any] = Future()

    def done(f: Future[Any]) -> None:
        try:
            out.set_result(fn(f.result()))
        except BaseException as e:
            out.set_exception(e)

    fut.add_done_callback(done)
    return out


class RpcServer:
    """Serves requests on ``listen`` until ``stop()``; a subclass answers them in ``dispatch``.

    ``part`` names the metrics (``blazil_<part>_server_requests_total``, ``..._server_errors_total``).
    """

    def __init__(self, listen: str, *, part: str, metrics_port: int | None = 0,
                 metrics_host: str = metrics.DEFAULT_HOST) -> None:
        self.sub = subscription(listen)
        self.uri: str = getattr(self.sub, "uri", listen)
        # Replies to tcps:// clients go out with this server's own certificate (clients require one).
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(listen).query)
        self._tls = {k: v[0] for k, v in query.items() if k in ("certfile", "keyfile", "cafile")}
        self._requests = metrics.counter(part, "server_requests", "total", "Requests served", labels=("op",))
        self._errors = metrics.counter(part, "server_errors", "total", "Requests answered with an error",
                                       labels=("op",))
        try:
            self.metrics = metrics.serve(metrics_port, metrics_host) if metrics_port is not None else None
        except BaseException:
            self.sub.close()
            raise
        self._pubs: dict[str, Publication] = {}
        # Filled by callbacks on other threads, drained by serve_forever: deque appends are atomic.
        self._replies: collections.deque[tuple[str, dict[str, Any], list[np.ndarray]]] = collections.deque()
        self._stop = threading.Event()

    def dispatch(self, op: str, meta: dict[str, Any], arrays: list[np.ndarray]) -> Reply | Future[Reply]:
        """Answer one request now, or with a future; raise to answer with an error."""
        raise NotImplementedError

    def _handle(self, msg: Message) -> None:
        meta = msg.meta
        reply, req, op = meta.get("reply"), meta.get("req"), str(meta.get("op"))
        if not isinstance(reply, str):
            log.error("request from %s without a reply URI dropped", msg.peer)
            return
        try:
            answer = self.dispatch(op, meta, msg.arrays)
        except Exception as e:
            self._error(reply, req, op, e)
            return
        self._requests.labels(op).inc()
        if not isinstance(answer, Future):
            self._replies.append((reply, {"req": req, "ok": True, **answer[0]}, answer[1]))
            return

        def done(f: Future[Reply]) -> None:
            try:
                body, arrays = f.result()
                self._replies.append((reply, {"req": req, "ok": True, **body}, arrays))
            except Exception as e:
                self._error(reply, req, op, e)

        answer.add_done_callback(done)

    def _error(self, reply: str, req: Any, op: str, e: BaseException) -> None:
        self._errors.labels(op).inc()
        kind = "DataError" if isinstance(e, DataError) else type(e).__name__
        self._replies.append((reply, {"req": req, "ok": False, "error": str(e), "kind": kind}, []))

    def _send_replies(self) -> int:
        sent = 0
        while self._replies:
            uri, meta, arrays = self._replies.popleft()
            pub = self._pubs.get(uri)
            try:
                if pub is None:
                    opts: dict[str, Any] = self._tls if uri.startswith("tcps://") else {}
                    pub = self._pubs[uri] = publication(uri, **opts)
                pub.send(meta, arrays, timeout=10.0)
            except Exception as e:  # a client that went away must not stop the server
                log.warning("reply to %s failed: %s", uri, e)
                old = self._pubs.pop(uri, None)
                if old is not None:
                    old.close()
            sent += 1
        return sent

    def serve_forever(self) -> None:
        """Poll requests and send replies until stop() is called, then answer what was accepted (<= 5 s)."""
        idle = BackoffIdleStrategy(max_park_s=1e-3)
        while not self._stop.is_set():
            work = self.sub.poll(self._handle, limit=256)
            work += self._send_replies()
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
    """Sends requests to an :class:`RpcServer` and matches replies to them; requests may be pipelined."""

    _counter = itertools.count(1)

    def __init__(self, uri: str, *, service: str, timeout: float = 30.0, reply_uri: str | None = None,
                 **transport_options: Any) -> None:
        self.service = service
        self.timeout = timeout
        # Over tcps:// the replies come back over TLS too; the client's certificate then serves both ways.
        if reply_uri is None:
            reply_uri = "tcps://127.0.0.1:0" if uri.startswith("tcps://") else "tcp://127.0.0.1:0"
        self._sub = subscription(reply_uri, **transport_options)
        self.reply_uri: str = getattr(self._sub, "uri", reply_uri)
        try:
            self._pub = publication(uri, **transport_options)
        except Exception as e:
            self._sub.close()
            raise ConfigError(f"cannot reach the {service} at {uri}: {e}") from e
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
        try:
            self._pub.send({"op": op, "req": req, "reply": self.reply_uri, **(meta or {})}, arrays or [],
                           timeout=self.timeout)
        except Exception as e:
            with self._lock:
                self._waiting.pop(req, None)
            raise BlazilError(f"cannot send to the {self.service}: {e}") from e
        return fut

    def _receive_loop(self) -> None:
        while not self._closed:
            try:
                msg = self._sub.receive(timeout=0.2)
            except Exception:
                if self._closed:
                    return
                raise
            if msg is None:
                continue
            with self._lock:
                entry = self._waiting.pop(msg.meta.get("req"), None)  # type: ignore[arg-type]
            if entry is None:
                continue
            decode, fut = entry
            if not msg.meta.get("ok"):
                err = msg.meta.get("error", "unknown error")
                fut.set_exception(DataError(err) if msg.meta.get("kind") == "DataError" else BlazilError(err))
                continue
            try:
                fut.set_result(decode(msg))
            except Exception as e:
                fut.set_exception(e)

    def close(self) -> None:
        """Close both channels; requests still waiting fail."""
        with self._lock:
            self._closed = True
        self._thread.join(timeout=2)
        self._pub.close()
        self._sub.close()
        for _decode, fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(BlazilError(f"{self.service} client closed before the reply came"))
