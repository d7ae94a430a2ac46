"""The client API every ledger backend offers: ``LedgerClient`` (subclasses implement ``_call``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

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
