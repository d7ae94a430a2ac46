"""The same client API on a real TigerBeetle cluster.

Default (the fast path): batches go to TigerBeetle's native client library as raw 128-byte records through
:class:`~blazil_ai.ledger.tigerbeetle_native.NativeClient`, with as many requests in flight as the caller submits
(``create_transfers_async``, ``submit``); replies come back as numpy arrays, converted to this package's
dataclasses only when the caller passed dataclasses.

``native=False`` takes the official client's own path (``tigerbeetle.ClientSync``: one dataclass per event, its
field checks, one request at a time): the reference the fast path is tested against, and the benchmark's anchor.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import numpy as np

from blazil_ai.errors import BlazilError, ConfigError, DataError
from blazil_ai.futures import completed, then
from blazil_ai.ledger import types as T
from blazil_ai.ledger.base import LedgerClient
from blazil_ai.ledger.types import BATCH_MAX, OPERATIONS, Operation


class TigerBeetleClient(LedgerClient):
    """A client of a TigerBeetle cluster at ``addresses`` ("host:port,host:port")."""

    def __init__(self, addresses: str, cluster_id: int = 0, *, timeout_s: float = 30.0, native: bool = True) -> None:
        if not addresses:
            raise ConfigError("tigerbeetle:// address names no replica (expected tigerbeetle://host:port)")
        try:
            import tigerbeetle as tb
        except ImportError as e:  # pragma: no cover - the package is a dependency
            raise ConfigError("the 'tigerbeetle' package is not installed") from e
        self._tb = tb
        self.address = addresses
        self.timeout_s = timeout_s
        self.native = native
        if native:
            from blazil_ai.ledger.tigerbeetle_native import NativeClient
            self._native: Any = NativeClient(cluster_id, addresses)
            self._client: Any = None
        else:
            self._native = None
            self._client = tb.ClientSync(cluster_id=cluster_id, replica_addresses=addresses)

    # ---------------------------------------------------------------- requests

    def submit(self, op: str | Operation, arg: Any) -> Future[Any]:
        """Send one request now and return a future of its raw result; several may be in flight."""
        operation = Operation.of(op)
        if self._native is None:
            return completed(self._official_call, operation, arg)
        return then(self._native.submit(operation, self._body(operation, arg)), lambda raw: _shape(operation, raw))

    def _call(self, op: Operation, arg: Any) -> Any:
        fut = self.submit(op, arg)
        try:
            return fut.result(timeout=self.timeout_s)
        except TimeoutError:
            raise BlazilError(f"tigerbeetle://{self.address}: no answer to {op.key} within {self.timeout_s:g} s "
                              "(is a replica listening there?)") from None

    def _body(self, op: Operation, arg: Any) -> np.ndarray | bytes:
        kind = OPERATIONS[op].event
        if op is Operation.CREATE_ACCOUNTS or op is Operation.CREATE_TRANSFERS:
            batch = T.as_account_array(arg) if op is Operation.CREATE_ACCOUNTS else T.as_transfer_array(arg)
            if len(batch) > BATCH_MAX:
                raise DataError(f"batch of {len(batch)} events exceeds the limit of {BATCH_MAX} events")
            return batch
        if kind is T.ID_DTYPE:
            ids = [int(i) for i in arg]
            if len(ids) > BATCH_MAX:
                raise DataError(f"lookup of {len(ids)} ids exceeds the limit of {BATCH_MAX}")
            return T.u128_to_words(ids, field="id")
        b = self._tb.bindings
        ctype = b.CAccountFilter if kind is T.AccountFilter else b.CQueryFilter
        try:
            return bytes(ctype.from_param(arg))
        except ValueError as e:
            raise DataError(f"{kind.__name__}: {e}") from None

    # ---------------------------------------------------------------- the official client's path

    def _official_call(self, op: Operation, arg: Any) -> Any:
        tb, c = self._tb, self._client
        if op is Operation.CREATE_ACCOUNTS:
            arr = T.as_account_array(arg)
            if arr["reserved"].any():  # the official dataclass has no such field: it could not be sent as given
                i = int(np.nonzero(arr["reserved"])[0][0])
                raise DataError(f"event {i}: reserved must be 0 on the official client's path",
                                field="account.reserved")
            accs = [tb.Account(**{k: getattr(a, k) for k in a.__slots__ if k != "flags"},
                               flags=tb.AccountFlags(int(a.flags))) for a in T.array_to_accounts(arr)]
            return _results(c.create_accounts(accs))
        if op is Operation.CREATE_TRANSFERS:
            trs = [tb.Transfer(**{k: getattr(t, k) for k in t.__slots__ if k != "flags"},
                               flags=tb.TransferFlags(int(t.flags)))
                   for t in T.array_to_transfers(T.as_transfer_array(arg))]
            return _results(c.create_transfers(trs))
        if op is Operation.LOOKUP_ACCOUNTS:
            return T.accounts_to_array([_ours(T.Account, a, T.AccountFlags) for a in c.lookup_accounts(list(arg))])
        if op is Operation.LOOKUP_TRANSFERS:
            return T.transfers_to_array([_ours(T.Transfer, t, T.TransferFlags) for t in c.lookup_transfers(list(arg))])
        if op is Operation.GET_ACCOUNT_BALANCES:
            return [(b.debits_pending, b.debits_posted, b.credits_pending, b.credits_posted, b.timestamp)
                    for b in c.get_account_balances(self._official_filter(arg))]
        fn = getattr(c, op.key)
        rows = fn(self._official_filter(arg))
        if op is Operation.QUERY_ACCOUNTS:
            return T.accounts_to_array([_ours(T.Account, a, T.AccountFlags) for a in rows])
        return T.transfers_to_array([_ours(T.Transfer, t, T.TransferFlags) for t in rows])

    def _official_filter(self, f: Any) -> Any:
        tb = self._tb
        if isinstance(f, T.AccountFilter):
            return tb.AccountFilter(f.account_id, f.user_data_128, f.user_data_64, f.user_data_32, f.code,
                                    f.timestamp_min, f.timestamp_max, f.limit, tb.AccountFilterFlags(int(f.flags)))
        return tb.QueryFilter(f.user_data_128, f.user_data_64, f.user_data_32, f.ledger, f.code, f.timestamp_min,
                              f.timestamp_max, f.limit, tb.QueryFilterFlags(int(f.flags)))

    def close(self) -> None:
        """End the session with the cluster."""
        if self._native is not None:
            self._native.close()
        else:
            self._client.close()


def _shape(op: Operation, raw: np.ndarray) -> Any:
    """A native reply in the form every backend's ``_call`` returns."""
    if op is Operation.CREATE_ACCOUNTS or op is Operation.CREATE_TRANSFERS:
        return raw["status"].copy(), raw["timestamp"].copy()
    if op is Operation.GET_ACCOUNT_BALANCES:
        cols = [T.u128_from_words(raw[f]) for f in ("debits_pending", "debits_posted", "credits_pending",
                                                     "credits_posted")]
        return list(zip(*cols, raw["timestamp"].tolist()))
    return raw


def _results(res: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([int(r.status) for r in res], dtype=np.uint32),
            np.array([r.timestamp for r in res], dtype=np.uint64))


def _ours(cls: type, obj: Any, flags: type) -> Any:
    values = {name: getattr(obj, name) for name in cls.__slots__}  # type: ignore[attr-defined]
    values["flags"] = flags(int(values["flags"]))
    return cls(**values)
