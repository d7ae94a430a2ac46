"""The ledger server (``blazil ledger serve``) and its client (``connect("tcp://host:port")``).

Request/reply over the transport core (``blazil_ai.transport.rpc``). Batches travel as raw 128-byte
records, ids as ``(n, 2)`` u64 words, filters as metadata (u128 fields as [low, high]).

Requests from every connection go into the ledger's ring buffer as they arrive, so concurrent clients
share group commits; each reply is sent once its request is durable.

TLS: ``--listen "tcps://host:port?certfile=server.pem&keyfile=server.key&cafile=ca.pem"`` requires a
client certificate signed by ``cafile``; clients connect with
``connect("tcps://host:port", certfile=..., keyfile=..., cafile=...)`` and receive replies over TLS on a
reply channel that in turn requires the server's certificate.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from blazil_ai import metrics
from blazil_ai.errors import DataError
from blazil_ai.futures import then
from blazil_ai.ledger.base import LedgerClient
from blazil_ai.ledger.embedded import open_embedded
from blazil_ai.ledger.types import (
    BALANCE_DTYPE,
    ID_DTYPE,
    OPERATIONS,
    RESULT_DTYPE,
    U64_MASK,
    AccountFilter,
    AccountFilterFlags,
    Operation,
    QueryFilter,
    QueryFilterFlags,
    u128,
    u128_from_words,
    u128_to_words,
)
from blazil_ai.transport.rpc import Reply, RpcClient, RpcServer

log = logging.getLogger(__name__)
_U128_FILTER_FIELDS = ("account_id", "user_data_128")


def filter_to_meta(f: AccountFilter | QueryFilter) -> dict[str, Any]:
    """A filter as msgpack-able metadata (u128 fields as [low, high])."""
    out: dict[str, Any] = {"kind": type(f).__name__}
    for fl in fields(f):
        v = int(getattr(f, fl.name))
        out[fl.name] = [v & U64_MASK, v >> 64] if fl.name in _U128_FILTER_FIELDS else v
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
        values[fl.name] = u128(v) if fl.name in _U128_FILTER_FIELDS else int(v)
    values["flags"] = flag_type(values["flags"])
    return cls(**values)


def wire_operation(name: Any) -> Operation:
    """The operation a request names (``meta["op"]``); DataError naming anything else."""
    try:
        return Operation.of(name)
    except ValueError as e:
        raise DataError(str(e), field="op") from None


def encode_request(op: Operation, arg: Any) -> Reply:
    """The metadata and arrays of one request (``op`` itself goes as ``meta["op"]``)."""
    event = OPERATIONS[op].event
    if event is ID_DTYPE:
        return {}, [u128_to_words(list(arg), field="id")]
    if isinstance(event, np.dtype):
        return {}, [np.ascontiguousarray(arg)]
    return {"filter": filter_to_meta(arg)}, []


def decode_request(op: Operation, meta: dict[str, Any], arrays: list[np.ndarray]) -> Any:
    """The backend argument of one request."""
    event = OPERATIONS[op].event
    if event is ID_DTYPE:
        if len(arrays) != 1 or arrays[0].dtype != np.uint64 or arrays[0].ndim != 2 or arrays[0].shape[1] != 2:
            raise DataError(f"{op.key} needs one (n, 2) uint64 array of ids", field="arrays")
        return u128_from_words(arrays[0])
    if isinstance(event, np.dtype):
        if len(arrays) != 1 or arrays[0].dtype.itemsize != 128:
            raise DataError(f"{op.key} needs one array of 128-byte records", field="arrays")
        return arrays[0].view(event).reshape(-1)
    return meta_to_filter(meta.get("filter") or {})


def encode_reply(op: Operation, result: Any) -> list[np.ndarray]:
    """The arrays of one reply."""
    kind = OPERATIONS[op].result
    if kind is RESULT_DTYPE:
        status, stamps = result
        return [np.asarray(status, dtype=np.uint32), np.asarray(stamps, dtype=np.uint64)]
    if kind is BALANCE_DTYPE:
        vals = [v for row in result for v in row[:4]]
        return [u128_to_words(vals).reshape(-1, 4, 2), np.array([r[4] for r in result], dtype=np.uint64)]
    return [result]


def decode_reply(op: Operation, arrays: list[np.ndarray]) -> Any:
    """The backend-shaped result of one reply."""
    kind = OPERATIONS[op].result
    if kind is RESULT_DTYPE:
        return arrays[0], arrays[1]
    if kind is BALANCE_DTYPE:
        vals = u128_from_words(arrays[0].reshape(-1, 2)) if arrays[0].size else []
        return [(*vals[4 * i: 4 * i + 4], int(ts)) for i, ts in enumerate(arrays[1].tolist())]
    return arrays[0].view(kind).reshape(-1)


class LedgerServer(RpcServer):
    """Serves a ledger directory on a transport URI until ``stop()``."""

    ops = tuple(op.key for op in Operation)

    def __init__(self, data: str | Path, listen: str, *, shards: int | None = None, metrics_port: int | None = 0,
                 metrics_host: str = metrics.DEFAULT_HOST, **ledger_options: Any) -> None:
        self.backend = open_embedded(data, shards=shards, **ledger_options)
        try:
            super().__init__(listen, part="ledger", metrics_port=metrics_port, metrics_host=metrics_host)
        except Exception:
            self.backend.close()
            raise

    def dispatch(self, op: str, meta: dict[str, Any], arrays: list[np.ndarray]) -> Future[Reply]:
        """Queue the request on the ledger's ring buffer; the reply goes out once it is durable."""
        operation = wire_operation(op)
        arg = decode_request(operation, meta, arrays)
        return then(self.backend.submit(operation, arg), lambda result: ({}, encode_reply(operation, result)))

    def close(self) -> None:
        """Release the socket, the reply publications, /metrics and the ledger."""
        super().close()
        self.backend.close()


class RemoteClient(LedgerClient):
    """A client of ``blazil ledger serve``; requests may be pipelined through ``submit``."""

    def __init__(self, uri: str, *, timeout: float = 30.0, reply_uri: str | None = None,
                 **transport_options: Any) -> None:
        self.timeout = timeout
        self._rpc = RpcClient(uri, service="ledger server", timeout=timeout, reply_uri=reply_uri,
                              **transport_options)
        self.reply_uri = self._rpc.reply_uri

    def submit(self, op: Operation | str, arg: Any) -> Future[Any]:
        """Send one request; the future gives the backend-shaped result."""
        operation = Operation.of(op)
        meta, arrays = encode_request(operation, arg)
        return self._rpc.send(operation.key, meta, arrays, decode=lambda m: decode_reply(operation, m.arrays))

    def _call(self, op: Operation, arg: Any) -> Any:
        return self.submit(op, arg).result(timeout=self.timeout)

    def close(self) -> None:
        """Close both channels."""
        self._rpc.close()
