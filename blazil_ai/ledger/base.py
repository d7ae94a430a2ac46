"""The client API every ledger backend offers: ``LedgerClient`` (subclasses implement ``_call``)."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

from blazil_ai.futures import completed, then
from blazil_ai.ledger.types import (
    Account,
    AccountBalance,
    AccountFilter,
    Operation,
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


class LedgerClient:
    """The operations every backend offers; subclasses implement ``_call(op, arg)`` on numpy batches."""

    def _call(self, op: Operation, arg: Any) -> Any:
        raise NotImplementedError

    def submit(self, op: Operation | str, arg: Any) -> Future[Any]:
        """Start one request and return a future of its raw result (pipelining: several may be in flight)."""
        return completed(self._call, Operation.of(op), arg)

    def create_accounts(self, accounts: Sequence[Account] | np.ndarray) -> Any:
        """Create accounts: list of CreateAccountResult, or a uint32 status array (0 = created) for numpy input."""
        status, stamps = self._call(Operation.CREATE_ACCOUNTS, as_account_array(accounts))
        if isinstance(accounts, np.ndarray):
            return numpy_status(status)
        return account_results(status, stamps)

    def create_transfers(self, transfers: Sequence[Transfer] | np.ndarray) -> Any:
        """Create transfers: list of CreateTransferResult, or a uint32 status array (0 = created) for numpy input."""
        status, stamps = self._call(Operation.CREATE_TRANSFERS, as_transfer_array(transfers))
        if isinstance(transfers, np.ndarray):
            return numpy_status(status)
        return transfer_results(status, stamps)

    def create_transfers_async(self, transfers: np.ndarray) -> Future[Any]:
        """Submit a numpy batch without waiting; the future gives the status array (0 = created)."""
        return then(self.submit(Operation.CREATE_TRANSFERS, as_transfer_array(transfers)), lambda r: numpy_status(r[0]))

    def lookup_accounts(self, ids: Sequence[int]) -> list[Account]:
        """The accounts that exist among ``ids``."""
        return array_to_accounts(self._call(Operation.LOOKUP_ACCOUNTS, [int(i) for i in ids]))

    def lookup_transfers(self, ids: Sequence[int]) -> list[Transfer]:
        """The transfers that exist among ``ids``."""
        return array_to_transfers(self._call(Operation.LOOKUP_TRANSFERS, [int(i) for i in ids]))

    def get_account_transfers(self, filter: AccountFilter) -> list[Transfer]:  # noqa: A002 - client's name
        """Transfers of one account (history), filtered and limited."""
        return array_to_transfers(self._call(Operation.GET_ACCOUNT_TRANSFERS, filter))

    def get_account_balances(self, filter: AccountFilter) -> list[AccountBalance]:  # noqa: A002
        """Balances after each transfer of an account with ``flags.history``."""
        return [AccountBalance(*row) for row in self._call(Operation.GET_ACCOUNT_BALANCES, filter)]

    def query_accounts(self, query_filter: QueryFilter) -> list[Account]:
        """Accounts matching the filter."""
        return array_to_accounts(self._call(Operation.QUERY_ACCOUNTS, query_filter))

    def query_transfers(self, query_filter: QueryFilter) -> list[Transfer]:
        """Transfers matching the filter."""
        return array_to_transfers(self.query_transfers_array(query_filter))

    def query_transfers_array(self, query_filter: QueryFilter) -> np.ndarray:
        """Transfers matching the filter as a TRANSFER_DTYPE array (no Python object per transfer)."""
        return self._call(Operation.QUERY_TRANSFERS, query_filter)  # type: ignore[no-any-return]

    def close(self) -> None:
        """Release the backend."""

    def __enter__(self) -> LedgerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
