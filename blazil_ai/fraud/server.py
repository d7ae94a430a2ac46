"""``blazil serve``: the fraud-scored transfer service over the transport core, and its client.

Request/reply as the ledger server does it: the server subscribes on its listen URI; each client
subscribes on a reply URI of its own and names it in every request (``meta["reply"]``). Ops:

* ``submit``: one array of 64-byte REQUEST_DTYPE records -> arrays outcome (u8), score (f32),
  reason (u8), ledger status (u32), in request order, sent once decisions and transfers are durable;
* ``decision`` (``id``), ``decisions`` (``outcome``, ``review_state``, ``account``, ``limit``),
  ``review`` (``id``, ``approve``), ``stats``: JSON-shaped metadata replies;
* ``create_accounts``: one array of 128-byte ACCOUNT_DTYPE records -> status array (0 = created).

Transfer ids travel as decimal strings in metadata (they are 128-bit).
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from blazil_ai import metrics
from blazil_ai.errors import BlazilError, ConfigError, DataError
from blazil_ai.fraud.service import DecisionBatch, FraudService
from blazil_ai.fraud.types import DEFAULT_URI, REQUEST_DTYPE
from blazil_ai.ledger.types import ACCOUNT_DTYPE
from blazil_ai.transport import Message, publication, subscription
from blazil_ai.transport.idle import BackoffIdleStrategy

log = logging.getLogger(__name__)
_REQUESTS = metrics.counter("fraud", "server_requests", "total", "Requests served", labels=("op",))
_ERRORS = metrics.counter("fraud", "server_errors", "total", "Requests answered with an error", labels=("op",))


class FraudServer:
    """Serves a FraudService on a transport URI until ``stop()``."""

    def __init__(self, data: str | Path, model: str | Path, listen: str = DEFAULT_URI, *,
                 metrics_port: int | None = 0, **service_options: Any) -> None:
        self.service = FraudService(data, model, **service_options)
        try:
            self.sub = subscription(listen)
        except Exception as e:
            self.service.close()
            raise ConfigError(f"cannot listen on {listen}: {e}") from e
        self.uri: str = getattr(self.sub, "uri", listen)
        self.metrics = metrics.serve(metrics_port) if metrics_port is not None else None
        self._pubs: dict[str, Any] = {}
        self._replies: collections.deque[tuple[str, dict[str, Any], list[np.ndarray]]] = collections.deque()
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="fraud-server")
        self._stop = threading.Event()

    def _handle(self, msg: Message) -> None:
        meta = msg.meta
        reply, req, op = meta.get("reply"), meta.get("req"), str(meta.get("op"))
        if not isinstance(reply, str):
            log.error("request from %s without a reply URI dropped", msg.peer)
            return
        _REQUESTS.labels(op).inc()
        try:
            if op == "submit":
                if len(msg.arrays) != 1 or msg.arrays[0].dtype.itemsize != REQUEST_DTYPE.itemsize:
                    raise DataError("submit needs one array of 64-byte transfer requests", field="arrays")
                fut = self.service.submit(msg.arrays[0].view(REQUEST_DTYPE).reshape(-1))

                def done(f: Future[DecisionBatch]) -> None:
                    try:
                        r = f.result()
                        self._replies.append((reply, {"req": req, "ok": True},
                                              [r.outcome, r.score, r.reason, r.ledger_status]))
                    except Exception as e:
                        self._error(reply, req, op, e)
                fut.add_done_callback(done)
                return
            if op not in ("decision", "decisions", "review", "stats", "create_accounts"):
                raise DataError(f"unknown op {op!r}", field="op")
            job = self._pool.submit(self._query, op, meta, msg.arrays)
        except Exception as e:
            self._error(reply, req, op, e)
            return

        def answered(f: Future[Any]) -> None:
            try:
                body, arrays = f.result()
                self._replies.append((reply, {"req": req, "ok": True, **body}, arrays))
            except Exception as e:
                self._error(reply, req, op, e)
        job.add_done_callback(answered)

    def _query(self, op: str, meta: dict[str, Any], arrays: list[np.ndarray]) -> tuple[dict[str, Any], list[Any]]:
        svc = self.service
        if op == "decision":
            d = svc.decision(_tid(meta.get("id")))
            return {"decision": d.to_dict() if d else None}, []
        if op == "decisions":
            found = svc.decisions(outcome=meta.get("outcome"), review_state=meta.get("review_state"),
                                  account=meta.get("account"), limit=int(meta.get("limit", 100)))
            return {"decisions": [d.to_dict() for d in found]}, []
        if op == "review":
            return {"decision": svc.review(_tid(meta.get("id")), bool(meta.get("approve"))).to_dict()}, []
        if op == "stats":
            return {"stats": svc.stats()}, []
        if len(arrays) != 1 or arrays[0].dtype.itemsize != 128:
            raise DataError("create_accounts needs one array of 128-byte account records", field="arrays")
        return {}, [svc.ledger.create_accounts(arrays[0].view(ACCOUNT_DTYPE).reshape(-1))]

    def _error(self, reply: str, req: Any, op: str, e: BaseException) -> None:
        _ERRORS.labels(op).inc()
        kind = "DataError" if isinstance(e, DataError) else type(e).__name__
        self._replies.append((reply, {"req": req, "ok": False, "error": str(e), "kind": kind}, []))

    def _send_replies(self) -> int:
        sent = 0
        while self._replies:
            uri, meta, arrays = self._replies.popleft()
            pub = self._pubs.get(uri)
            try:
                if pub is None:
                    pub = self._pubs[uri] = publication(uri)
                pub.send(meta, arrays, timeout=10.0)
            except Exception as e:  # a client that went away must not stop the server
                log.warning("reply to %s failed: %s", uri, e)
                old = self._pubs.pop(uri, None)
                if old is not None:
                    old.close()
            sent += 1
        return sent

    def serve_forever(self) -> None:
        """Poll requests and send replies until stop() is called."""
        idle = BackoffIdleStrategy(max_park_s=1e-3)
        while not self._stop.is_set():
            work = self.sub.poll(self._handle, limit=256)
            work += self._send_replies()
            idle.idle(work)

    def stop(self) -> None:
        """Ask serve_forever to return."""
        self._stop.set()

    def close(self) -> None:
        """Stop the service (finishing accepted requests), then release the socket and /metrics."""
        self.service.close()
        self._pool.shutdown(wait=True)
        self._send_replies()
        self.sub.close()
        for pub in self._pubs.values():
            pub.close()
        if self.metrics is not None:
            self.metrics.close()


def _tid(value: Any) -> int:
    try:
        tid = int(value)
    except (TypeError, ValueError):
        raise DataError(f"transfer id must be an integer, got {value!r}", field="id") from None
    if tid <= 0:
        raise DataError(f"transfer id must be positive, got {tid}", field="id")
    return tid


class FraudClient:
    """A client of ``blazil serve``; ``submit`` may be pipelined (several batches in flight)."""

    _counter = itertools.count(1)

    def __init__(self, uri: str = DEFAULT_URI, *, timeout: float = 30.0, reply_uri: str = "tcp://127.0.0.1:0",
                 **transport_options: Any) -> None:
        self.timeout = timeout
        self._sub = subscription(reply_uri, **transport_options)
        self.reply_uri: str = getattr(self._sub, "uri", reply_uri)
        try:
            self._pub = publication(uri, **transport_options)
        except Exception as e:
            self._sub.close()
            raise ConfigError(f"cannot reach the fraud service at {uri}: {e}") from e
        self._lock = threading.Lock()
        self._waiting: dict[int, tuple[str, Future[Any]]] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._receive_loop, name="fraud-client", daemon=True)
        self._thread.start()

    def _send(self, op: str, meta: dict[str, Any], arrays: list[np.ndarray] | None = None) -> Future[Any]:
        req = next(self._counter)
        fut: Future[Any] = Future()
        with self._lock:
            if self._closed:
                raise BlazilError("fraud client is closed")
            self._waiting[req] = (op, fut)
        try:
            self._pub.send({"op": op, "req": req, "reply": self.reply_uri, **meta}, arrays or [],
                           timeout=self.timeout)
        except Exception as e:
            with self._lock:
                self._waiting.pop(req, None)
            raise BlazilError(f"cannot send to the fraud service: {e}") from e
        return fut

    def submit(self, requests: np.ndarray) -> Future[DecisionBatch]:
        """Send a REQUEST_DTYPE batch; the future gives its DecisionBatch."""
        return self._send("submit", {}, [np.ascontiguousarray(requests)])

    def decide(self, requests: np.ndarray) -> DecisionBatch:
        """Submit and wait."""
        return self.submit(requests).result(self.timeout)  # type: ignore[no-any-return]

    def decision(self, transfer_id: int) -> dict[str, Any] | None:
        """The stored decision of a transfer, or None."""
        return self._send("decision", {"id": str(transfer_id)}).result(self.timeout)["decision"]  # type: ignore

    def decisions(self, *, outcome: str | None = None, review_state: str | None = None, account: int | None = None,
                  limit: int = 100) -> list[dict[str, Any]]:
        """Recent decisions, newest first."""
        meta = {"outcome": outcome, "review_state": review_state, "account": account, "limit": limit}
        return self._send("decisions", meta).result(self.timeout)["decisions"]  # type: ignore[no-any-return]

    def review(self, transfer_id: int, approve: bool) -> dict[str, Any]:
        """Post (approve) or void (decline) a transfer held for review."""
        return self._send("review", {"id": str(transfer_id), "approve": approve}).result(self.timeout)["decision"]  # type: ignore

    def stats(self) -> dict[str, Any]:
        """Decision counts, the policy in force, what start-up recovered."""
        return self._send("stats", {}).result(self.timeout)["stats"]  # type: ignore[no-any-return]

    def create_accounts(self, ids: list[int], ledger: int = 1, code: int = 1) -> np.ndarray:
        """Create ledger accounts (status per id, 0 = created; 21 = exists)."""
        a = np.zeros(len(ids), dtype=ACCOUNT_DTYPE)
        a["id"][:, 0] = [i & 0xFFFFFFFFFFFFFFFF for i in ids]
        a["id"][:, 1] = [i >> 64 for i in ids]
        a["ledger"], a["code"] = ledger, code
        return self._send("create_accounts", {}, [a]).result(self.timeout)  # type: ignore[no-any-return]

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
            op, fut = entry
            if not msg.meta.get("ok"):
                err = msg.meta.get("error", "unknown error")
                fut.set_exception(DataError(err) if msg.meta.get("kind") == "DataError" else BlazilError(err))
            elif op == "submit":
                a = msg.arrays
                fut.set_result(DecisionBatch(a[0].view(np.uint8), a[1].view(np.float32), a[2].view(np.uint8),
                                             a[3].view(np.uint32)))
            elif op == "create_accounts":
                st = msg.arrays[0].view(np.uint32)
                fut.set_result(np.where(st == 0xFFFFFFFF, 0, st).astype(np.uint32))
            else:
                fut.set_result(msg.meta)

    def close(self) -> None:
        """Close both channels."""
        with self._lock:
            self._closed = True
        self._thread.join(timeout=2)
        self._pub.close()
        self._sub.close()
        for _op, fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(BlazilError("fraud client closed before the reply came"))

    def __enter__(self) -> FraudClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
