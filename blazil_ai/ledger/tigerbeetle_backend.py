"""The same client API on a real TigerBeetle cluster, through the official ``tigerbeetle.ClientSync``.

Requests are converted to the official client's dataclasses and its results back to ours (same field
names and enum values), so application code does not change when a cluster replaces the embedded engine.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from blazil_ai.errors import ConfigError
from blazil_ai.ledger import types as T
from blazil_ai.ledger.client import LedgerClient


class TigerBeetleClient(LedgerClient):
    """A client of a TigerBeetle cluster at ``addresses`` ("host:port,host:port")."""

    def __init__(self, addresses: str, cluster_id: int = 0) -> None:
        try:
            import tigerbeetle as tb
        except ImportError as e:  # pragma: no cover - the package is a dependency
            raise ConfigError("the 'tigerbeetle' package is not installed") from e
        self._tb = tb
        if not addresses:
            raise ConfigError("tigerbeetle:// address names no replica (expected tigerbeetle://host:port)")
        self._client = tb.ClientSync(cluster_id=cluster_id, replica_addresses=addresses)

    def _filter(self, f: Any) -> Any:
        tb = self._tb
        if isinstance(f, T.AccountFilter):
            return tb.AccountFilter(f.account_id, f.user_data_128, f.user_data_64, f.user_data_32, f.code,
                                    f.timestamp_min, f.timestamp_max, f.limit, tb.AccountFilterFlags(int(f.flags)))
        return tb.QueryFilter(f.user_data_128, f.user_data_64, f.user_data_32, f.ledger, f.code, f.timestamp_min,
                              f.timestamp_max, f.limit, tb.QueryFilterFlags(int(f.flags)))

    def _call(self, op: str, arg: Any) -> Any:
        tb, c = self._tb, self._client
        if op == "create_accounts":
            accs = [tb.Account(**{k: getattr(a, k) for k in a.__slots__ if k != "flags"},
                               flags=tb.AccountFlags(int(a.flags))) for a in T.array_to_accounts(arg)]
            ares = c.create_accounts(accs)
            return (np.array([int(r.status) for r in ares], dtype=np.uint32),
                    np.array([r.timestamp for r in ares], dtype=np.uint64))
        if op == "create_transfers":
            trs = [tb.Transfer(**{k: getattr(t, k) for k in t.__slots__ if k != "flags"},
                               flags=tb.TransferFlags(int(t.flags))) for t in T.array_to_transfers(arg)]
            res = c.create_transfers(trs)
            return (np.array([int(r.status) for r in res], dtype=np.uint32),
                    np.array([r.timestamp for r in res], dtype=np.uint64))
        if op == "lookup_accounts":
            return T.accounts_to_array([_ours(T.Account, a, T.AccountFlags) for a in c.lookup_accounts(arg)])
        if op == "lookup_transfers":
            return T.transfers_to_array([_ours(T.Transfer, t, T.TransferFlags) for t in c.lookup_transfers(arg)])
        if op == "get_account_transfers":
            return T.transfers_to_array([_ours(T.Transfer, t, T.TransferFlags)
                                         for t in c.get_account_transfers(self._filter(arg))])
        if op == "get_account_balances":
            return [(b.debits_pending, b.debits_posted, b.credits_pending, b.credits_posted, b.timestamp)
                    for b in c.get_account_balances(self._filter(arg))]
        if op == "query_accounts":
            return T.accounts_to_array([_ours(T.Account, a, T.AccountFlags)
                                        for a in c.query_accounts(self._filter(arg))])
        if op == "query_transfers":
            return T.transfers_to_array([_ours(T.Transfer, t, T.TransferFlags)
                                         for t in c.query_transfers(self._filter(arg))])
        raise ValueError(f"unknown ledger operation {op!r}")

    def close(self) -> None:
        """Close the official client."""
        self._client.close()


def _ours(cls: type, obj: Any, flags: type) -> Any:
    values = {name: getattr(obj, name) for name in cls.__slots__}  # type: ignore[attr-defined]
    values["flags"] = flags(int(values["flags"]))
    return cls(**values)
