"""The ledger server (``blazil ledger serve``) and its client (``connect("tcp://host:port")``).

Request/reply over the transport core: the server subscribes on its listen URI; each client subscribes
on a reply URI of its own and names it in every request (``meta["reply"]``); the server opens one
publication back per reply URI. Requests carry ``op`` and a request number ``req``; batches travel as
raw 128-byte records, ids as ``(n, 2)`` u64 words, filters as metadata (u128 fields as [low, high]).

Requests from every connection go into the ledger's ring buffer as they arrive, so concurrent clients
share group commits; each reply is sent once its request is durable.

TLS: ``--listen "tcps://host:port?certfile=server.pem&keyfile=server.key&cafile=ca.pem"`` requires a
client certificate signed by ``cafile``; clients connect with
``connect("tcps://host:port", certfile=..., keyfile=..., cafile=...)`` and receive replies over TLS on a
reply channel that in turn requires the server's certificate.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
import urllib.parse
from concurrent.futures import Future
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from blazil_ai import metrics
from blazil_ai.errors import BlazilError, ConfigError, DataError
from blazil_ai.ledger.client import LedgerClient, open_embedded
from blazil_ai.ledger.types import (
    ACCOUNT_DTYPE,
    TRANSFER_DTYPE,
    AccountFilter,
    AccountFilterFlags,
    QueryFilter,
    QueryFilterFlags,
    u128_from_words,
    u128_to_words,
)
from blazil_ai.transport import Message, publication, subscription
from blazil_ai.transport.idle import BackoffIdleStrategy

log = logging.getLogger(__name__)
_REQUESTS = metrics.counter("ledger", "server_requests", "total", "Requests served", labels=("op",))
_ERRORS = metrics.counter("ledger", "server_errors", "total", "Requests answered with an error", labels=("op",))
_U128_FILTER_FIELDS = ("account_id", "user_data_128")
_OPS = ("create_accounts", "create_transfers", "lookup_accounts", "lookup_transfers", "get_account_transfers",
        "get_account_balances", "query_accounts", "query_transfers")


def filter_to_meta(f: AccountFilter | QueryFilter) -> dict[str, Any]:
    """A filter as msgpack-able metadata (u128 fields as [low, high])."""
    out: dict[str, Any] = {"kind": type(f).__name__}
    for fl in fields(f):
        v = int(getattr(f, fl.name))
        out[fl.name] = [v & ((1 << 64) - 1), v >> 64] if fl.name in _U128_FILTER_FIELDS else v
    return out


def meta_to_filter(meta: dict[str, Any]) -> AccountFilter | QueryFilter:
    """The inverse of filter_to_meta; a malformed filter raises DataError naming the field."""
    kind = meta.get("kind")
    cls: type[AccountFilter] | type[QueryFilter]
    if kind == "AccountFilter":
        cls, flag_type = AccountFilter, AccountFilterFlags
    elif kind == "QueryFilter":
        cls, flag_type = QueryFilter, QueryFilterFlags  # type: ignore[assignment]
    else:
        raise DataError(f"unknown filter kind {kind!r}", field="filter.kind")
    values: dict[str, Any] = {}
    for fl in fields(cls):
        if fl.name not in meta:
            raise DataError("missing", field=f"filter.{fl.name}")
        v = meta[fl.name]
        values[fl.name] = (int(v[0]) | (int(v[1]) << 64)) if fl.name in _U128_FILTER_FIELDS else int(v)
    values["flags"] = flag_type(values["flags"])
    return cls(**values)


def decode_request(meta: dict[str, Any], arrays: list[np.ndarray]) -> Any:
    """The backend argument of one request."""
    op = meta.get("op")
    if op in ("create_accounts", "create_transfers"):
        if len(arrays) != 1 or arrays[0].dtype.itemsize != 128:
            raise DataError(f"{op} needs one array of 128-byte records", field="arrays")
        return arrays[0].view(TRANSFER_DTYPE if op == "create_transfers" else ACCOUNT_DTYPE).reshape(-1)
    if op in ("lookup_accounts", "lookup_transfers"):
        if len(arrays) != 1 or arrays[0].dtype != np.uint64 or arrays[0].ndim != 2 or arrays[0].shape[1] != 2:
            raise DataError(f"{op} needs one (n, 2) uint64 array of ids", field="arrays")
        return u128_from_words(arrays[0])
    if op in _OPS:
        return meta_to_filter(meta.get("filter") or {})
    raise DataError(f"unknown ledger operation {op!r}", field="op")


def encode_reply(op: str, result: Any) -> list[np.ndarray]:
    """The arrays of one reply."""
    if op in ("create_accounts", "create_transfers"):
        status, stamps = result
        return [np.asarray(status, dtype=np.uint32), np.asarray(stamps, dtype=np.uint64)]
    if op == "get_account_balances":
        vals = [v for row in result for v in row[:4]]
        return [u128_to_words(vals).reshape(-1, 4, 2), np.array([r[4] for r in result], dtype=np.uint64)]
    return [result]


def decode_reply(op: str, arrays: list[np.ndarray]) -> Any:
    """The backend-shaped result of one reply."""
    if op in ("create_accounts", "create_transfers"):
        return arrays[0], arrays[1]
    if op == "get_account_balances":
        vals = u128_from_words(arrays[0].reshape(-1, 2)) if arrays[0].size else []
        return [(*vals[4 * i: 4 * i + 4], int(ts)) for i, ts in enumerate(arrays[1].tolist())]
    dtype = ACCOUNT_DTYPE if op in ("lookup_accounts", "query_accounts") else TRANSFER_DTYPE
    return arrays[0].view(dtype).reshape(-1)


class LedgerServer:
    """Serves a ledger directory on a transport URI until ``stop()``."""

    def __init__(self, data: str | Path, listen: str, *, shards: int | None = None, metrics_port: int | None = 0,
                 **ledger_options: Any) -> None:
        self.backend = open_embedded(data, shards=shards, **ledger_options)
        try:
            self.sub = subscription(listen)
        except Exception:
            self.backend.close()
            raise
        self.uri: str = getattr(self.sub, "uri", listen)
        # Replies to tcps:// clients go out with this server's own certificate (clients require one).
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(listen).query)
        self._tls = {k: v[0] for k, v in query.items() if k in ("certfile", "keyfile", "cafile")}
        self.metrics = metrics.serve(metrics_port) if metrics_port is not None else None
        self._pubs: dict[str, Any] = {}
        self._replies: collections.deque[tuple[str, dict[str, Any], list[np.ndarray]]] = collections.deque()
        self._stop = threading.Event()

    def _handle(self, msg: Message) -> None:
        meta = msg.meta
        reply = meta.get("reply")
        req = meta.get("req")
        op = str(meta.get("op"))
        if not isinstance(reply, str):
            log.error("request from %s without a reply URI dropped", msg.peer)
            return
        try:
            arg = decode_request(meta, msg.arrays)
            fut = self.backend.submit(op, arg)
        except Exception as e:
            self._error(reply, req, op, e)
            return
        _REQUESTS.labels(op).inc()

        def done(f: Future[Any]) -> None:
            try:
                self._replies.append((reply, {"req": req, "ok": True}, encode_reply(op, f.result())))
            except Exception as e:
                self._error(reply, req, op, e)
        fut.add_done_callback(done)

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
        """Poll requests and send replies until stop() is called."""
        idle = BackoffIdleStrategy(max_park_s=1e-3)
        while not self._stop.is_set():
            work = self.sub.poll(self._handle, limit=256)
            work += self._send_replies()
            idle.idle(work)
        # Answer what was accepted before stopping.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if not self._send_replies():
                time.sleep(0.01)
                if not self._replies:
                    break

    def stop(self) -> None:
        """Ask serve_forever to return."""
        self._stop.set()

    def close(self) -> None:
        """Release the socket, the reply publications, /metrics and the ledger."""
        self.sub.close()
        for pub in self._pubs.values():
            pub.close()
        if self.metrics is not None:
            self.metrics.close()
        self.backend.close()


class RemoteClient(LedgerClient):
    """A client of ``blazil ledger serve``; requests may be pipelined through ``submit``."""

    _counter = itertools.count(1)

    def __init__(self, uri: str, *, timeout: float = 30.0, reply_uri: str | None = None,
                 **transport_options: Any) -> None:
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
            raise ConfigError(f"cannot reach the ledger server at {uri}: {e}") from e
        self._lock = threading.Lock()
        self._waiting: dict[int, tuple[str, Future[Any]]] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._receive_loop, name="ledger-client", daemon=True)
        self._thread.start()

    def submit(self, op: str, arg: Any) -> Future[Any]:
        """Send one request; the future gives the backend-shaped result."""
        req = next(self._counter)
        meta: dict[str, Any] = {"op": op, "req": req, "reply": self.reply_uri}
        arrays: list[np.ndarray] = []
        if op in ("create_accounts", "create_transfers"):
            arrays = [np.ascontiguousarray(arg)]
        elif op in ("lookup_accounts", "lookup_transfers"):
            arrays = [u128_to_words(list(arg), field="id")]
        else:
            meta["filter"] = filter_to_meta(arg)
        fut: Future[Any] = Future()
        with self._lock:
            if self._closed:
                raise BlazilError("ledger client is closed")
            self._waiting[req] = (op, fut)
            self._pub.send(meta, arrays, timeout=self.timeout)
        return fut

    def _call(self, op: str, arg: Any) -> Any:
        return self.submit(op, arg).result(timeout=self.timeout)

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
            if msg.meta.get("ok"):
                try:
                    fut.set_result(decode_reply(op, msg.arrays))
                except Exception as e:
                    fut.set_exception(e)
            else:
                err = msg.meta.get("error", "unknown error")
                fut.set_exception(DataError(err) if msg.meta.get("kind") == "DataError" else BlazilError(err))

    def close(self) -> None:
        """Close both channels."""
        with self._lock:
            self._closed = True
        self._thread.join(timeout=2)
        self._pub.close()
        self._sub.close()
        for _op, fut in self._waiting.values():
            fut.set_exception(BlazilError("ledger client closed before the reply came"))
