"""``blazil serve``: the fraud-scored transfer service over the transport core, and its client.

Request/reply over the transport core (``blazil_ai.transport.rpc``, as the ledger server). Ops:

* ``submit``: one array of 64-byte REQUEST_DTYPE records -> arrays outcome (u8), score (f32),
  reason (u8), ledger status (u32), in request order, sent once decisions and transfers are durable;
* ``decision`` (``id``), ``decisions`` (``outcome``, ``review_state``, ``account``, ``limit``),
  ``review`` (``id``, ``approve``), ``stats``: JSON-shaped metadata replies;
* ``create_accounts``: one array of 128-byte ACCOUNT_DTYPE records -> status array (0 = created).

Transfer ids travel as decimal strings in metadata (they are 128-bit).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from blazil_ai import metrics
from blazil_ai.errors import ConfigError, DataError
from blazil_ai.fraud.service import DecisionBatch, FraudService
from blazil_ai.fraud.types import DEFAULT_URI, REQUEST_DTYPE
from blazil_ai.futures import then
from blazil_ai.ledger.types import ACCOUNT_DTYPE, u128_to_words
from blazil_ai.transport import Message
from blazil_ai.transport.rpc import Reply, RpcClient, RpcServer

log = logging.getLogger(__name__)


class FraudServer(RpcServer):
    """Serves a FraudService on a transport URI until ``stop()``."""

    ops = ("submit", "decision", "decisions", "review", "stats", "create_accounts")

    def __init__(self, data: str | Path, model: str | Path, listen: str = DEFAULT_URI, *,
                 metrics_port: int | None = 0, metrics_host: str = metrics.DEFAULT_HOST,
                 **service_options: Any) -> None:
        self.service = FraudService(data, model, **service_options)
        try:
            super().__init__(listen, part="fraud", metrics_port=metrics_port, metrics_host=metrics_host)
        except ConfigError:  # names its own address (the /metrics port)
            self.service.close()
            raise
        except Exception as e:
            self.service.close()
            raise ConfigError(f"cannot listen on {listen}: {e}") from e
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="fraud-server")

    def dispatch(self, op: str, meta: dict[str, Any], arrays: list[np.ndarray]) -> Future[Reply]:
        """Transfers go to the scoring ring; queries and reviews run on a small pool."""
        if op == "submit":
            if len(arrays) != 1 or arrays[0].dtype.itemsize != REQUEST_DTYPE.itemsize:
                raise DataError("submit needs one array of 64-byte transfer requests", field="arrays")
            fut = self.service.submit(arrays[0].view(REQUEST_DTYPE).reshape(-1))
            return then(fut, lambda r: ({}, [r.outcome, r.score, r.reason, r.ledger_status]))
        if op not in ("decision", "decisions", "review", "stats", "create_accounts"):
            raise DataError(f"unknown op {op!r}", field="op")
        return self._pool.submit(self._query, op, meta, arrays)

    def _query(self, op: str, meta: dict[str, Any], arrays: list[np.ndarray]) -> Reply:
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

    def close(self) -> None:
        """Stop the service (finishing accepted requests), then release the socket and /metrics."""
        self.service.close()
        self._pool.shutdown(wait=True)
        super().close()


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

    def __init__(self, uri: str = DEFAULT_URI, *, timeout: float = 30.0, reply_uri: str | None = None,
                 **transport_options: Any) -> None:
        self.timeout = timeout
        self._rpc = RpcClient(uri, service="fraud service", timeout=timeout, reply_uri=reply_uri,
                              **transport_options)
        self.reply_uri = self._rpc.reply_uri

    def _send(self, op: str, meta: dict[str, Any], arrays: list[np.ndarray] | None = None,
              decode: Callable[[Message], Any] = lambda m: m.meta) -> Future[Any]:
        return self._rpc.send(op, meta, arrays, decode)

    def submit(self, requests: np.ndarray) -> Future[DecisionBatch]:
        """Send a REQUEST_DTYPE batch; the future gives its DecisionBatch."""
        return self._send("submit", {}, [np.ascontiguousarray(requests)], _decision_batch)

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
        a["id"] = u128_to_words(ids, field="id")
        a["ledger"], a["code"] = ledger, code
        return self._send("create_accounts", {}, [a], _account_status).result(self.timeout)  # type: ignore[no-any-return]

    def close(self) -> None:
        """Close both channels."""
        self._rpc.close()

    def __enter__(self) -> FraudClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _decision_batch(m: Message) -> DecisionBatch:
    a = m.arrays
    return DecisionBatch(a[0].view(np.uint8), a[1].view(np.float32), a[2].view(np.uint8), a[3].view(np.uint32))


def _account_status(m: Message) -> np.ndarray:
    st = m.arrays[0].view(np.uint32)
    return np.where(st == 0xFFFFFFFF, 0, st).astype(np.uint32)
