"""``connect(address)``: one client API over the embedded engine, our ledger server, or a TigerBeetle cluster.

* a directory path: the embedded, durable engine (sharded if it was created with ``shards=N``). The
  directory must hold a ledger: ``create=True`` (or ``blazil ledger format DIR``) makes one, so a mistyped
  path fails naming it instead of opening an empty ledger. ``read_only=True`` opens a ledger for reads
  only and writes nothing to its folder (a backup on a read-only mount can be inspected);
* ``tcp://host:port`` (or ``tcps://``): a ``blazil ledger serve`` process;
* ``tigerbeetle://host:port[,host:port...][?cluster_id=N]``: a TigerBeetle cluster through the official
  ``tigerbeetle.ClientSync``; its results are converted to this package's types.

Batch methods take dataclass lists (and return dataclass results, like the official client) or numpy
arrays in the 128-byte layout (and return a uint32 status array, 0 = created, for callers that need speed).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np

from blazil_ai.errors import ConfigError
from blazil_ai.ledger.types import (
    Account,
    AccountBalance,
    AccountFilter,
    QueryFilter,
    Transfer,
    account_results,
    array_to_accounts,
    array_to_transfers,
    as_account_array,
    as_transfer_array,
    numpy_status,
    transfer_results,
)


def completed_future(fn: Callable[..., Any], *args: Any) -> Future[Any]:
    """Run ``fn(*args)`` now; its result, or the exception it raised, as a completed future."""
    fut: Future[Any] = Future()
    try:
        fut.set_result(fn(*args))
    except Exception as e:
        fut.set_exception(e)
    return fut


class LedgerClient:
    """The operations every backend offers; subclasses implement ``_call(op, arg)`` on numpy batches."""

    def _call(self, op: str, arg: Any) -> Any:
        raise NotImplementedError

    def submit(self, op: str, arg: Any) -> Future[Any]:
        """Start one request and return a future of its raw result (pipelining: several may be in flight)."""
        return completed_future(self._call, op, arg)

    def create_accounts(self, accounts: Sequence[Account] | np.ndarray) -> Any:
        """Create accounts: list of CreateAccountResult, or a uint32 status array (0 = created) for numpy input."""
        status, stamps = self._call("create_accounts", as_account_array(accounts))
        if isinstance(accounts, np.ndarray):
            return numpy_status(status)
        return account_results(status, stamps)

    def create_transfers(self, transfers: Sequence[Transfer] | np.ndarray) -> Any:
        """Create transfers: list of CreateTransferResult, or a uint32 status array (0 = created) for numpy input."""
        status, stamps = self._call("create_transfers", as_transfer_array(transfers))
        if isinstance(transfers, np.ndarray):
            return numpy_status(status)
        return transfer_results(status, stamps)

    def create_transfers_async(self, transfers: np.ndarray) -> Future[Any]:
        """Submit a numpy batch without waiting; the future gives the status array (0 = created)."""
        out: Future[Any] = Future()
        inner = self.submit("create_transfers", as_transfer_array(transfers))

        def done(f: Future[Any]) -> None:
            try:
                out.set_result(numpy_status(f.result()[0]))
            except Exception as e:
                out.set_exception(e)
        inner.add_done_callback(done)
        return out

    def create_results(self, transfers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Numpy batch in, (status with 0 = created, timestamps) out."""
        status, stamps = self._call("create_transfers", as_transfer_array(transfers))
        return numpy_status(status), stamps

    def lookup_accounts(self, ids: Sequence[int]) -> list[Account]:
        """The accounts that exist among ``ids``."""
        return array_to_accounts(self._call("lookup_accounts", [int(i) for i in ids]))

    def lookup_transfers(self, ids: Sequence[int]) -> list[Transfer]:
        """The transfers that exist among ``ids``."""
        return array_to_transfers(self._call("lookup_transfers", [int(i) for i in ids]))

    def get_account_transfers(self, filter: AccountFilter) -> list[Transfer]:  # noqa: A002 - client's name
        """Transfers of one account (history), filtered and limited."""
        return array_to_transfers(self._call("get_account_transfers", filter))

    def get_account_balances(self, filter: AccountFilter) -> list[AccountBalance]:  # noqa: A002
        """Balances after each transfer of an account with ``flags.history``."""
        return [AccountBalance(*row) for row in self._call("get_account_balances", filter)]

    def query_accounts(self, query_filter: QueryFilter) -> list[Account]:
        """Accounts matching the filter."""
        return array_to_accounts(self._call("query_accounts", query_filter))

    def query_transfers(self, query_filter: QueryFilter) -> list[Transfer]:
        """Transfers matching the filter."""
        return array_to_transfers(self._call("query_transfers", query_filter))

    def close(self) -> None:
        """Release the backend."""

    def __enter__(self) -> LedgerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EmbeddedClient(LedgerClient):
    """The in-process durable engine (one shard or several)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def _call(self, op: str, arg: Any) -> Any:
        return self.backend.call(op, arg)

    def submit(self, op: str, arg: Any) -> Future[Any]:
        """Queue a request on the engine's ring buffer; completes when durable."""
        return self.backend.submit(op, arg)  # type: ignore[no-any-return]

    def checkpoint(self) -> int:
        """Write a checkpoint now."""
        return self.backend.checkpoint()  # type: ignore[no-any-return]

    def close(self) -> None:
        """Finish queued requests and release the directory."""
        self.backend.close()


def open_embedded(path: str | os.PathLike[str], *, shards: int | None = None, create: bool = False,
                  read_only: bool = False, **options: Any) -> Any:
    """Open the ledger directory (``create=True``: create it if it holds no ledger yet): a LocalLedger, or a
    ShardedLedger if it has shards."""
    from blazil_ai.ledger.shards import ShardedLedger, read_layout
    from blazil_ai.ledger.store import LocalLedger

    p = Path(path)
    existing = read_layout(p)
    if existing is not None:
        if shards is not None and shards != existing:
            raise ConfigError(f"ledger {p} has {existing} shards; cannot open it with shards={shards}")
        return ShardedLedger(p, read_only=read_only, **options)
    if shards is not None and shards > 1:
        from blazil_ai.ledger.manifest import is_ledger
        if is_ledger(p):
            raise ConfigError(f"ledger {p} has 1 shard; cannot open it with shards={shards}")
        return ShardedLedger(p, shards=shards, create=create, read_only=read_only, **options)
    return LocalLedger(p, create=create, read_only=read_only, **options)


def connect(address: str | os.PathLike[str], **options: Any) -> LedgerClient:
    """A ledger client for a directory, ``tcp://host:port`` (ledger server) or ``tigerbeetle://host:port``.

    For a directory: ``create=True`` creates the ledger when the folder is missing or empty (``shards=N``
    for a sharded one); ``read_only=True`` opens it for reads only, writing nothing there. On a sharded
    ledger a batch is applied shard by shard: each event is atomic, but a batch that was not acknowledged
    (the process died) may be partly applied; retrying it with the same ids is safe."""
    text = os.fspath(address)
    if text.startswith("tigerbeetle://"):
        from blazil_ai.ledger.tigerbeetle_backend import TigerBeetleClient
        u = urlparse(text)
        cluster = int(parse_qs(u.query).get("cluster_id", ["0"])[0])
        return TigerBeetleClient(u.netloc, cluster_id=cluster)
    if text.startswith(("tcp://", "tcps://", "aeron:")):
        from blazil_ai.ledger.server import RemoteClient
        return RemoteClient(text, **options)
    if "://" in text:
        raise ConfigError(f"ledger address {text!r}: use a directory, tcp://host:port or tigerbeetle://host:port")
    return EmbeddedClient(open_embedded(text, **options))
