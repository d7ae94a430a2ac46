"""Ledger records that mirror the official ``tigerbeetle`` Python client (0.17.9) field for field.

Names, integer widths, defaults and enum values are those of ``tigerbeetle.bindings``; enum declaration
order is TigerBeetle's precedence (when several results apply, the first declared wins). The numpy
dtypes reproduce TigerBeetle's 128-byte wire layouts, with each u128 stored as two little-endian u64
words (``[..., 0]`` low, ``[..., 1]`` high), so a batch can be handed to the engine, the log or the
network without a Python object per event.
"""

from __future__ import annotations

import enum
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from blazil_ai.errors import DataError

AMOUNT_MAX = (1 << 128) - 1
U128_MAX = AMOUNT_MAX
U64_MASK = (1 << 64) - 1
BATCH_MAX = 8189  # TigerBeetle's events per request (1 MiB message less the header, 128 bytes each)
STATUS_OK = 0  # numpy-path status arrays use 0 for "created"; every other value is a *Status member value


class AccountFlags(enum.IntFlag):
    NONE = 0
    LINKED = 1 << 0
    DEBITS_MUST_NOT_EXCEED_CREDITS = 1 << 1
    CREDITS_MUST_NOT_EXCEED_DEBITS = 1 << 2
    HISTORY = 1 << 3
    IMPORTED = 1 << 4
    CLOSED = 1 << 5


class TransferFlags(enum.IntFlag):
    NONE = 0
    LINKED = 1 << 0
    PENDING = 1 << 1
    POST_PENDING_TRANSFER = 1 << 2
    VOID_PENDING_TRANSFER = 1 << 3
    BALANCING_DEBIT = 1 << 4
    BALANCING_CREDIT = 1 << 5
    CLOSING_DEBIT = 1 << 6
    CLOSING_CREDIT = 1 << 7
    IMPORTED = 1 << 8


class AccountFilterFlags(enum.IntFlag):
    NONE = 0
    DEBITS = 1 << 0
    CREDITS = 1 << 1
    REVERSED = 1 << 2


class QueryFilterFlags(enum.IntFlag):
    NONE = 0
    REVERSED = 1 << 0


class CreateAccountStatus(enum.IntEnum):
    CREATED = 0xFFFFFFFF
    LINKED_EVENT_FAILED = 1
    LINKED_EVENT_CHAIN_OPEN = 2
    IMPORTED_EVENT_EXPECTED = 22
    IMPORTED_EVENT_NOT_EXPECTED = 23
    TIMESTAMP_MUST_BE_ZERO = 3
    IMPORTED_EVENT_TIMESTAMP_OUT_OF_RANGE = 24
    IMPORTED_EVENT_TIMESTAMP_MUST_NOT_ADVANCE = 25
    RESERVED_FIELD = 4
    RESERVED_FLAG = 5
    ID_MUST_NOT_BE_ZERO = 6
    ID_MUST_NOT_BE_INT_MAX = 7
    EXISTS_WITH_DIFFERENT_FLAGS = 15
    EXISTS_WITH_DIFFERENT_USER_DATA_128 = 16
    EXISTS_WITH_DIFFERENT_USER_DATA_64 = 17
    EXISTS_WITH_DIFFERENT_USER_DATA_32 = 18
    EXISTS_WITH_DIFFERENT_LEDGER = 19
    EXISTS_WITH_DIFFERENT_CODE = 20
    EXISTS = 21
    FLAGS_ARE_MUTUALLY_EXCLUSIVE = 8
    DEBITS_PENDING_MUST_BE_ZERO = 9
    DEBITS_POSTED_MUST_BE_ZERO = 10
    CREDITS_PENDING_MUST_BE_ZERO = 11
    CREDITS_POSTED_MUST_BE_ZERO = 12
    LEDGER_MUST_NOT_BE_ZERO = 13
    CODE_MUST_NOT_BE_ZERO = 14
    IMPORTED_EVENT_TIMESTAMP_MUST_NOT_REGRESS = 26


class CreateTransferStatus(enum.IntEnum):
    CREATED = 0xFFFFFFFF
    LINKED_EVENT_FAILED = 1
    LINKED_EVENT_CHAIN_OPEN = 2
    IMPORTED_EVENT_EXPECTED = 56
    IMPORTED_EVENT_NOT_EXPECTED = 57
    TIMESTAMP_MUST_BE_ZERO = 3
    IMPORTED_EVENT_TIMESTAMP_OUT_OF_RANGE = 58
    IMPORTED_EVENT_TIMESTAMP_MUST_NOT_ADVANCE = 59
    RESERVED_FLAG = 4
    ID_MUST_NOT_BE_ZERO = 5
    ID_MUST_NOT_BE_INT_MAX = 6
    EXISTS_WITH_DIFFERENT_FLAGS = 36
    EXISTS_WITH_DIFFERENT_PENDING_ID = 40
    EXISTS_WITH_DIFFERENT_TIMEOUT = 44
    EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID = 37
    EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID = 38
    EXISTS_WITH_DIFFERENT_AMOUNT = 39
    EXISTS_WITH_DIFFERENT_USER_DATA_128 = 41
    EXISTS_WITH_DIFFERENT_USER_DATA_64 = 42
    EXISTS_WITH_DIFFERENT_USER_DATA_32 = 43
    EXISTS_WITH_DIFFERENT_LEDGER = 67
    EXISTS_WITH_DIFFERENT_CODE = 45
    EXISTS = 46
    ID_ALREADY_FAILED = 68
    FLAGS_ARE_MUTUALLY_EXCLUSIVE = 7
    DEBIT_ACCOUNT_ID_MUST_NOT_BE_ZERO = 8
    DEBIT_ACCOUNT_ID_MUST_NOT_BE_INT_MAX = 9
    CREDIT_ACCOUNT_ID_MUST_NOT_BE_ZERO = 10
    CREDIT_ACCOUNT_ID_MUST_NOT_BE_INT_MAX = 11
    ACCOUNTS_MUST_BE_DIFFERENT = 12
    PENDING_ID_MUST_BE_ZERO = 13
    PENDING_ID_MUST_NOT_BE_ZERO = 14
    PENDING_ID_MUST_NOT_BE_INT_MAX = 15
    PENDING_ID_MUST_BE_DIFFERENT = 16
    TIMEOUT_RESERVED_FOR_PENDING_TRANSFER = 17
    CLOSING_TRANSFER_MUST_BE_PENDING = 64
    LEDGER_MUST_NOT_BE_ZERO = 19
    CODE_MUST_NOT_BE_ZERO = 20
    DEBIT_ACCOUNT_NOT_FOUND = 21
    CREDIT_ACCOUNT_NOT_FOUND = 22
    ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER = 23
    TRANSFER_MUST_HAVE_THE_SAME_LEDGER_AS_ACCOUNTS = 24
    PENDING_TRANSFER_NOT_FOUND = 25
    PENDING_TRANSFER_NOT_PENDING = 26
    PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT_ID = 27
    PENDING_TRANSFER_HAS_DIFFERENT_CREDIT_ACCOUNT_ID = 28
    PENDING_TRANSFER_HAS_DIFFERENT_LEDGER = 29
    PENDING_TRANSFER_HAS_DIFFERENT_CODE = 30
    EXCEEDS_PENDING_TRANSFER_AMOUNT = 31
    PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT = 32
    PENDING_TRANSFER_ALREADY_POSTED = 33
    PENDING_TRANSFER_ALREADY_VOIDED = 34
    PENDING_TRANSFER_EXPIRED = 35
    IMPORTED_EVENT_TIMESTAMP_MUST_NOT_REGRESS = 60
    IMPORTED_EVENT_TIMESTAMP_MUST_POSTDATE_DEBIT_ACCOUNT = 61
    IMPORTED_EVENT_TIMESTAMP_MUST_POSTDATE_CREDIT_ACCOUNT = 62
    IMPORTED_EVENT_TIMEOUT_MUST_BE_ZERO = 63
    DEBIT_ACCOUNT_ALREADY_CLOSED = 65
    CREDIT_ACCOUNT_ALREADY_CLOSED = 66
    OVERFLOWS_DEBITS_PENDING = 47
    OVERFLOWS_CREDITS_PENDING = 48
    OVERFLOWS_DEBITS_POSTED = 49
    OVERFLOWS_CREDITS_POSTED = 50
    OVERFLOWS_DEBITS = 51
    OVERFLOWS_CREDITS = 52
    OVERFLOWS_TIMEOUT = 53
    EXCEEDS_CREDITS = 54
    EXCEEDS_DEBITS = 55


# Precedence rank of each status (its position in the declaration order): lower wins.
TRANSFER_PRECEDENCE = {s.value: i for i, s in enumerate(CreateTransferStatus)}
ACCOUNT_PRECEDENCE = {s.value: i for i, s in enumerate(CreateAccountStatus)}

# Failures that depend on the ledger's state at the time (a retry could succeed): TigerBeetle burns
# the id of such a transfer, so resubmitting it answers ID_ALREADY_FAILED instead of a new outcome.
TRANSIENT_TRANSFER_STATUSES = frozenset({
    CreateTransferStatus.DEBIT_ACCOUNT_NOT_FOUND, CreateTransferStatus.CREDIT_ACCOUNT_NOT_FOUND,
    CreateTransferStatus.PENDING_TRANSFER_NOT_FOUND, CreateTransferStatus.EXCEEDS_CREDITS,
    CreateTransferStatus.EXCEEDS_DEBITS, CreateTransferStatus.DEBIT_ACCOUNT_ALREADY_CLOSED,
    CreateTransferStatus.CREDIT_ACCOUNT_ALREADY_CLOSED,
})


@dataclass(slots=True)
class Account:
    id: int = 0
    debits_pending: int = 0
    debits_posted: int = 0
    credits_pending: int = 0
    credits_posted: int = 0
    user_data_128: int = 0
    user_data_64: int = 0
    user_data_32: int = 0
    ledger: int = 0
    code: int = 0
    flags: AccountFlags = AccountFlags.NONE
    timestamp: int = 0


@dataclass(slots=True)
class Transfer:
    id: int = 0
    debit_account_id: int = 0
    credit_account_id: int = 0
    amount: int = 0
    pending_id: int = 0
    user_data_128: int = 0
    user_data_64: int = 0
    user_data_32: int = 0
    timeout: int = 0
    ledger: int = 0
    code: int = 0
    flags: TransferFlags = TransferFlags.NONE
    timestamp: int = 0


@dataclass(slots=True)
class CreateAccountResult:
    timestamp: int
    status: CreateAccountStatus


@dataclass(slots=True)
class CreateTransferResult:
    timestamp: int
    status: CreateTransferStatus


@dataclass(slots=True)
class AccountFilter:
    account_id: int
    user_data_128: int
    user_data_64: int
    user_data_32: int
    code: int
    timestamp_min: int
    timestamp_max: int
    limit: int
    flags: AccountFilterFlags


@dataclass(slots=True)
class AccountBalance:
    debits_pending: int
    debits_posted: int
    credits_pending: int
    credits_posted: int
    timestamp: int


@dataclass(slots=True)
class QueryFilter:
    user_data_128: int
    user_data_64: int
    user_data_32: int
    ledger: int
    code: int
    timestamp_min: int
    timestamp_max: int
    limit: int
    flags: QueryFilterFlags


_U128 = ("<u8", (2,))

TRANSFER_DTYPE = np.dtype([
    ("id", _U128), ("debit_account_id", _U128), ("credit_account_id", _U128), ("amount", _U128),
    ("pending_id", _U128), ("user_data_128", _U128), ("user_data_64", "<u8"), ("user_data_32", "<u4"),
    ("timeout", "<u4"), ("ledger", "<u4"), ("code", "<u2"), ("flags", "<u2"), ("timestamp", "<u8"),
])
ACCOUNT_DTYPE = np.dtype([
    ("id", _U128), ("debits_pending", _U128), ("debits_posted", _U128), ("credits_pending", _U128),
    ("credits_posted", _U128), ("user_data_128", _U128), ("user_data_64", "<u8"), ("user_data_32", "<u4"),
    ("reserved", "<u4"), ("ledger", "<u4"), ("code", "<u2"), ("flags", "<u2"), ("timestamp", "<u8"),
])
assert TRANSFER_DTYPE.itemsize == 128 and ACCOUNT_DTYPE.itemsize == 128

RESULT_DTYPE = np.dtype([("timestamp", "<u8"), ("status", "<u4"), ("reserved", "<u4")])  # create_* results
BALANCE_DTYPE = np.dtype([("debits_pending", _U128), ("debits_posted", _U128), ("credits_pending", _U128),
                          ("credits_posted", _U128), ("timestamp", "<u8"), ("reserved", "V56")])
ID_DTYPE = np.dtype(("<u8", (2,)))  # one u128 id: (low, high) words
assert RESULT_DTYPE.itemsize == 16 and BALANCE_DTYPE.itemsize == 128


class Operation(enum.IntEnum):
    """The ledger's operations, numbered as in TigerBeetle's client protocol (``tigerbeetle.bindings.Operation``).

    ``OPERATIONS[op]`` says what each one takes and answers; every layer (client, server, store, shards,
    TigerBeetle backend) dispatches on this table. The lower-case name (``op.key``, e.g. "create_transfers") is
    the client method's name and the one used on the wire and in metrics; :meth:`of` is the one way back.
    """

    LOOKUP_ACCOUNTS = 140
    LOOKUP_TRANSFERS = 141
    GET_ACCOUNT_TRANSFERS = 142
    GET_ACCOUNT_BALANCES = 143
    QUERY_ACCOUNTS = 144
    QUERY_TRANSFERS = 145
    CREATE_ACCOUNTS = 146
    CREATE_TRANSFERS = 147

    @property
    def key(self) -> str:
        """The operation's name as the client API spells it ("create_transfers")."""
        return self.name.lower()

    @property
    def writes(self) -> bool:
        """Whether the operation changes the ledger (refused on a read-only one)."""
        return OPERATIONS[self].writes

    @classmethod
    def of(cls, op: str | int) -> Operation:
        """The operation named by ``op`` (its key, e.g. "create_transfers", or its number); ValueError naming
        anything else."""
        if isinstance(op, Operation):
            return op
        found = _OPERATION_KEYS.get(op) if isinstance(op, str) else _OPERATION_CODES.get(op)
        if found is None:
            raise ValueError(f"unknown ledger operation {op!r}")
        return found


class LocalOp(enum.Enum):
    """Requests that a ledger folder's own backend (one shard or several) answers besides the :class:`Operation`
    s; they never go to a ledger server or a cluster."""

    TOTALS = "totals"  # the sums of every account's balances (verify, inspect)
    EXPIRE = "expire"  # expire the pending transfers whose timeout has passed (arg: now in ns, or None)
    CHECKPOINT = "checkpoint"  # write a checkpoint now
    BARRIER = "barrier"  # answered once everything queued before it is applied and durable

    @property
    def key(self) -> str:
        """The request's name ("totals")."""
        return self.value

    @property
    def writes(self) -> bool:
        """Whether the request changes the ledger (refused on a read-only one)."""
        return self in (LocalOp.EXPIRE, LocalOp.CHECKPOINT)


def backend_op(op: str | int | Operation | LocalOp) -> Operation | LocalOp:
    """The request ``op`` names for a ledger folder's backend: a LocalOp or an Operation (its key or number);
    ValueError naming anything else."""
    if isinstance(op, (Operation, LocalOp)):
        return op
    local = _LOCAL_KEYS.get(op) if isinstance(op, str) else None
    return local if local is not None else Operation.of(op)


@dataclass(frozen=True)
class OperationKind:
    """What one operation takes (event) and answers (result): a record dtype, or the name of a filter type."""

    event: Any  # np.dtype of the request's records (ID_DTYPE: ids), or the filter class (AccountFilter, QueryFilter)
    result: np.dtype
    writes: bool


OPERATIONS: dict[Operation, OperationKind] = {
    Operation.CREATE_ACCOUNTS: OperationKind(ACCOUNT_DTYPE, RESULT_DTYPE, True),
    Operation.CREATE_TRANSFERS: OperationKind(TRANSFER_DTYPE, RESULT_DTYPE, True),
    Operation.LOOKUP_ACCOUNTS: OperationKind(ID_DTYPE, ACCOUNT_DTYPE, False),
    Operation.LOOKUP_TRANSFERS: OperationKind(ID_DTYPE, TRANSFER_DTYPE, False),
    Operation.GET_ACCOUNT_TRANSFERS: OperationKind(AccountFilter, TRANSFER_DTYPE, False),
    Operation.QUERY_ACCOUNTS: OperationKind(QueryFilter, ACCOUNT_DTYPE, False),
    Operation.QUERY_TRANSFERS: OperationKind(QueryFilter, TRANSFER_DTYPE, False),
    Operation.GET_ACCOUNT_BALANCES: OperationKind(AccountFilter, BALANCE_DTYPE, False),
}
_OPERATION_KEYS = {op.key: op for op in Operation}
_OPERATION_CODES = {int(op): op for op in Operation}
_LOCAL_KEYS = {op.key: op for op in LocalOp}

_WIDTHS: dict[str, int] = {
    name: (128 if dt[name].shape == (2,) else dt[name].base.itemsize * 8)
    for dt in (TRANSFER_DTYPE, ACCOUNT_DTYPE) for name in dt.names or ()
}


def u128(words: np.ndarray) -> int:
    """The Python int of one u128 stored as (low, high) u64 words."""
    return int(words[0]) | (int(words[1]) << 64)


def set_u128(arr: np.ndarray, field: str, row: int, value: int) -> None:
    """Store ``value`` into ``arr[field][row]`` as (low, high) u64 words."""
    arr[field][row, 0] = value & U64_MASK
    arr[field][row, 1] = value >> 64


def u128_column(batch: np.ndarray, field: str = "id") -> list[int]:
    """Python ints of one u128 column of a record array."""
    return [int(lo) | (int(hi) << 64) for lo, hi in batch[field].tolist()]


def u128_from_words(words: np.ndarray) -> list[int]:
    """Python ints from an ``(n, 2)`` array of (low, high) u64 words."""
    lo = words[..., 0].astype(object)
    hi = words[..., 1].astype(object)
    return list((hi << 64) | lo)


def u128_to_words(values: Sequence[int], *, field: str = "value") -> np.ndarray:
    """An ``(n, 2)`` u64 array of (low, high) words; values outside 0..2^128-1 raise DataError."""
    out = np.zeros((len(values), 2), dtype=np.uint64)
    if not len(values):
        return out
    small: Any = None
    large: Any = None
    try:
        small, large = min(values), max(values)
    except TypeError:
        pass
    if not isinstance(small, int) or not isinstance(large, int) or small < 0 or large > U128_MAX:
        for i, v in enumerate(values):
            _check_uint(v, 128, field, i)
    if large <= U64_MASK:  # the common case: every value fits one word
        out[:, 0] = np.fromiter(values, dtype=np.uint64, count=len(values))
        return out
    obj = np.array(values, dtype=object)
    out[:, 0] = (obj & U64_MASK).astype(np.uint64)
    out[:, 1] = (obj >> 64).astype(np.uint64)
    return out


def _check_uint(value: Any, bits: int, field: str, index: int) -> None:
    if not isinstance(value, int) or value < 0 or value >= (1 << bits):
        raise DataError(f"event {index}: {value!r} is not an unsigned {bits}-bit integer", field=field)


def _to_array(records: Sequence[Any], dtype: np.dtype, kind: str) -> np.ndarray:
    out = np.zeros(len(records), dtype=dtype)
    for name in dtype.names or ():
        if name == "reserved":
            continue
        values = [getattr(r, name) for r in records]
        bits = _WIDTHS[name]
        if bits == 128:
            out[name] = u128_to_words(values, field=f"{kind}.{name}")
        else:
            try:
                col = np.fromiter(values, dtype=np.uint64, count=len(values))
                if bits < 64 and len(col) and int(col.max()) >= (1 << bits):
                    raise OverflowError
            except (OverflowError, TypeError, ValueError):
                for i, v in enumerate(values):
                    _check_uint(v, bits, f"{kind}.{name}", i)
                raise
            out[name] = col
    return out


def transfers_to_array(transfers: Sequence[Transfer]) -> np.ndarray:
    """Pack Transfer records into a TRANSFER_DTYPE array (bad widths raise DataError naming the event)."""
    return _to_array(transfers, TRANSFER_DTYPE, "transfer")


def accounts_to_array(accounts: Sequence[Account]) -> np.ndarray:
    """Pack Account records into an ACCOUNT_DTYPE array (bad widths raise DataError naming the event)."""
    return _to_array(accounts, ACCOUNT_DTYPE, "account")


def _from_array(arr: np.ndarray, cls: type, flag_type: type) -> list[Any]:
    cols: dict[str, list[Any]] = {}
    for f in fields(cls):
        col = arr[f.name]
        cols[f.name] = u128_from_words(col) if col.ndim == 2 else col.tolist()
    cols["flags"] = [flag_type(v) for v in cols["flags"]]
    names = list(cols)
    return [cls(**dict(zip(names, row))) for row in zip(*cols.values())]


def array_to_transfers(arr: np.ndarray) -> list[Transfer]:
    """Unpack a TRANSFER_DTYPE array into Transfer records."""
    return _from_array(arr, Transfer, TransferFlags)


def array_to_accounts(arr: np.ndarray) -> list[Account]:
    """Unpack an ACCOUNT_DTYPE array into Account records."""
    return _from_array(arr, Account, AccountFlags)


RECORD_DTYPE = np.dtype("V128")


def copy_records(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[:] = src`` for 128-byte record arrays of one dtype, as one raw copy (numpy copies a structured
    array field by field, about fifteen times slower)."""
    dst.view(RECORD_DTYPE)[...] = src.view(RECORD_DTYPE)


def preallocate(shape: int | tuple[int, ...], dtype: Any) -> np.ndarray:
    """Zeroed storage whose pages are already mapped: one write per 4 KiB page now, so that filling it later
    does not take a page fault (and the kernel's zeroing of the page) inside a request, as static allocation
    at start-up does in TigerBeetle."""
    a = np.zeros(shape, dtype=dtype)
    if a.nbytes >= 1 << 20:
        a.view(np.uint8).reshape(-1)[::4096] = 0
    return a


def own_records(src: np.ndarray) -> np.ndarray:
    """A contiguous copy of a 128-byte record array (see :func:`copy_records`)."""
    return src.view(RECORD_DTYPE).copy().view(src.dtype)


def as_transfer_array(batch: Any) -> np.ndarray:
    """Accept a TRANSFER_DTYPE array (or raw 128-byte records) or a sequence of Transfer records."""
    if isinstance(batch, np.ndarray):
        if batch.dtype == TRANSFER_DTYPE:
            return batch
        if batch.dtype.itemsize == 128 and batch.dtype.kind == "V":
            return batch.view(TRANSFER_DTYPE)
        raise DataError(f"transfer batch has dtype {batch.dtype}, expected TRANSFER_DTYPE (128-byte records)")
    return transfers_to_array(list(batch))


def as_account_array(batch: Any) -> np.ndarray:
    """Accept an ACCOUNT_DTYPE array (or raw 128-byte records) or a sequence of Account records."""
    if isinstance(batch, np.ndarray):
        if batch.dtype == ACCOUNT_DTYPE:
            return batch
        if batch.dtype.itemsize == 128 and batch.dtype.kind == "V":
            return batch.view(ACCOUNT_DTYPE)
        raise DataError(f"account batch has dtype {batch.dtype}, expected ACCOUNT_DTYPE (128-byte records)")
    return accounts_to_array(list(batch))


_TRANSFER_STATUS = {s.value: s for s in CreateTransferStatus}
_ACCOUNT_STATUS = {s.value: s for s in CreateAccountStatus}


def transfer_results(status: np.ndarray, timestamps: np.ndarray) -> list[CreateTransferResult]:
    """Dataclass results from an engine status array (engine codes: CREATED is 0xFFFFFFFF)."""
    members = _TRANSFER_STATUS
    return [CreateTransferResult(t, members[s]) for s, t in zip(status.tolist(), timestamps.tolist())]


def account_results(status: np.ndarray, timestamps: np.ndarray) -> list[CreateAccountResult]:
    """Dataclass results from an engine status array (engine codes: CREATED is 0xFFFFFFFF)."""
    members = _ACCOUNT_STATUS
    return [CreateAccountResult(t, members[s]) for s, t in zip(status.tolist(), timestamps.tolist())]


def numpy_status(status: np.ndarray) -> np.ndarray:
    """Engine codes to the numpy-path convention: 0 for created, the status value otherwise."""
    out = status.astype(np.uint32, copy=True)
    out[out == 0xFFFFFFFF] = STATUS_OK
    return out


class _IdGenerator:
    """ULID-like 128-bit ids: 48 bits of milliseconds, then 80 random bits incremented within a millisecond."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = time.time_ns() // 1_000_000
        self._last_random = int.from_bytes(os.urandom(10), "little")

    def generate(self) -> int:
        with self._lock:
            ms = time.time_ns() // 1_000_000
            if ms <= self._last_ms:
                ms = self._last_ms
            else:
                self._last_ms = ms
                self._last_random = int.from_bytes(os.urandom(10), "little")
            self._last_random += 1
            if self._last_random == 1 << 80:
                ms += 1
                self._last_ms = ms
                self._last_random = 0
            return (ms << 80) | self._last_random


_ids = _IdGenerator()


def id() -> int:  # noqa: A001 - same name as tigerbeetle.id()
    """A time-sortable unique 128-bit id, as ``tigerbeetle.id()`` makes them."""
    return _ids.generate()


__all__ = [
    "ACCOUNT_DTYPE", "AMOUNT_MAX", "BALANCE_DTYPE", "BATCH_MAX", "ID_DTYPE", "OPERATIONS", "RESULT_DTYPE",
    "STATUS_OK", "TRANSFER_DTYPE", "U128_MAX", "U64_MASK", "Account", "AccountBalance", "AccountFilter",
    "AccountFilterFlags", "AccountFlags", "CreateAccountResult", "CreateAccountStatus", "CreateTransferResult",
    "CreateTransferStatus", "LocalOp", "Operation", "OperationKind", "QueryFilter", "QueryFilterFlags", "Transfer",
    "TransferFlags", "account_results", "set_u128", "u128", "u128_column", "accounts_to_array",
    "array_to_accounts", "array_to_transfers", "as_account_array", "as_transfer_array", "backend_op", "id",
    "numpy_status", "transfer_results", "transfers_to_array", "u128_from_words", "u128_to_words",
]
