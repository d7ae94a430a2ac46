"""The ledger: TigerBeetle's data model and semantics, embedded and durable, sharded, or on a real cluster.

>>> from blazil_ai import ledger
>>> with ledger.connect("/tmp/my-ledger") as client:          # doctest: +SKIP
...     client.create_accounts([ledger.Account(id=1, ledger=1, code=1), ledger.Account(id=2, ledger=1, code=1)])
...     client.create_transfers([ledger.Transfer(id=ledger.id(), debit_account_id=1, credit_account_id=2,
...                                              amount=10, ledger=1, code=1)])
"""

from blazil_ai.ledger.client import LedgerClient, connect
from blazil_ai.ledger.ring import RingBuffer
from blazil_ai.ledger.types import (
    ACCOUNT_DTYPE,
    AMOUNT_MAX,
    BATCH_MAX,
    STATUS_OK,
    TRANSFER_DTYPE,
    Account,
    AccountBalance,
    AccountFilter,
    AccountFilterFlags,
    AccountFlags,
    CreateAccountResult,
    CreateAccountStatus,
    CreateTransferResult,
    CreateTransferStatus,
    Operation,
    QueryFilter,
    QueryFilterFlags,
    Transfer,
    TransferFlags,
    accounts_to_array,
    array_to_accounts,
    array_to_transfers,
    id,
    transfers_to_array,
)

__all__ = [
    "ACCOUNT_DTYPE", "AMOUNT_MAX", "BATCH_MAX", "STATUS_OK", "TRANSFER_DTYPE", "Account", "AccountBalance",
    "AccountFilter", "AccountFilterFlags", "AccountFlags", "CreateAccountResult", "CreateAccountStatus",
    "CreateTransferResult", "CreateTransferStatus", "LedgerClient", "Operation", "QueryFilter", "QueryFilterFlags",
    "RingBuffer", "Transfer", "TransferFlags", "accounts_to_array", "array_to_accounts", "array_to_transfers",
    "connect", "id", "transfers_to_array",
]
