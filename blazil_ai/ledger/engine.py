"""The in-memory state machine: TigerBeetle's create/lookup/query semantics over numpy columns.

Two ways through ``create_transfers``:

* the vectorised path, taken when every event of a batch is sure to succeed: plain or pending transfers
  (or posts/voids of pending transfers) between existing, open accounts without balance limits or
  history, with fresh unique ids and amounts below 2^40; balances are then applied with one
  ``bincount`` per balance column, ids go into a numpy hash table (:mod:`blazil_ai.ledger.keyindex`)
  in a few array operations;
* the sequential path, event by event with Python integers, in TigerBeetle's precedence, with linked
  chains rolled back through an undo log. It is the reference: the vectorised path must give the same
  state and results, which the property tests check.

Timestamps come from the engine's clock (nanoseconds, strictly increasing); a batch of n events takes n
consecutive timestamps. Replaying the same batches with the same timestamps rebuilds the same state,
which is what the write-ahead log relies on.
"""

from __future__ import annotations

import heapq
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import numpy as np

from blazil_ai.errors import ConfigError, DataError
from blazil_ai.ledger.keyindex import KeyIndex
from blazil_ai.ledger.types import (
    ACCOUNT_DTYPE,
    AMOUNT_MAX,
    BATCH_MAX,
    TRANSFER_DTYPE,
    TRANSIENT_TRANSFER_STATUSES,
    U64_MASK,
    U128_MAX,
    AccountFilter,
    AccountFilterFlags,
    AccountFlags,
    QueryFilter,
    QueryFilterFlags,
    TransferFlags,
    copy_records,
    preallocate,
    set_u128,
    u128,
    u128_from_words,
)
from blazil_ai.ledger.types import CreateAccountStatus as CA
from blazil_ai.ledger.types import CreateTransferStatus as CT

_MIX = np.uint64(0x9E3779B97F4A7C15)
CREATED = 0xFFFFFFFF

# Pending-transfer state per stored transfer row.
NOT_PENDING, PENDING, POSTED, VOIDED, EXPIRED = 0, 1, 2, 3, 4

_TF = TransferFlags
_KNOWN_TRANSFER_FLAGS = int(sum(int(f) for f in TransferFlags))
_KNOWN_ACCOUNT_FLAGS = int(sum(int(f) for f in AccountFlags))
_FAST_AMOUNT_LIMIT = 1 << 40  # per-batch float64 sums stay exact below 2^53
_LIMIT_FLAGS = int(AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS | AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS)
_SLOW_ACCOUNT_FLAGS = _LIMIT_FLAGS | int(AccountFlags.HISTORY | AccountFlags.CLOSED)


def key64(words: np.ndarray) -> np.ndarray:
    """A 64-bit hash key of each u128 in an ``(n, 2)`` word array (used only to find candidates)."""
    return words[:, 0] ^ (words[:, 1] * _MIX)


def key64_int(value: int) -> int:
    """``key64`` of one Python int."""
    return (value & U64_MASK) ^ (((value >> 64) * 0x9E3779B97F4A7C15) & U64_MASK)


def _valid_ids(w: np.ndarray) -> bool:
    """No id in an ``(n, 2)`` word array is 0 or 2^128 - 1."""
    return bool((w[:, 0] | w[:, 1]).all() and ((w[:, 0] & w[:, 1]) != U64_MASK).all())




# Bytes preallocated per transfer of capacity: its record, its pending state, two id-table slots.
BYTES_PER_TRANSFER = TRANSFER_DTYPE.itemsize + 1 + 2 * 16


def check_capacity(capacity: int) -> None:
    """Refuse, naming ``capacity``, a value that is no positive integer or whose storage (allocated and mapped
    at open) would not fit in this machine's memory."""
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
        raise ConfigError(f"capacity {capacity!r}: must be a positive number of transfers")
    need = int(capacity) * BYTES_PER_TRANSFER
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # pragma: no cover - not every system names its memory
        return
    if need > memory // 2:
        raise ConfigError(f"capacity {capacity}: storage for that many transfers takes {need / 2**30:.1f} GiB at "
                          f"open, more than half of this machine's {memory / 2**30:.1f} GiB; give a smaller "
                          f"capacity (storage doubles as a ledger fills past it)")


class Engine:
    """One ledger's state and its create/lookup/query operations (not thread-safe: one caller at a time)."""

    def __init__(self, clock: Callable[[], int] = time.time_ns, capacity: int = 1 << 16) -> None:
        self.clock = clock
        self.last_timestamp = 0
        self.accounts = np.zeros(1024, dtype=ACCOUNT_DTYPE)
        self.n_accounts = 0
        self.account_rows: dict[int, int] = {}
        self._index_dirty = True
        self._acc_keys = np.zeros(0, dtype=np.uint64)
        self._acc_key_rows = np.zeros(0, dtype=np.int64)
        self._acc_keys_unique = True
        self._dense: np.ndarray | None = None
        # Preallocated and mapped for ``capacity`` transfers; past that, the storage doubles.
        check_capacity(capacity)
        self.transfers = preallocate(capacity, TRANSFER_DTYPE)
        self.pending_state = preallocate(capacity, np.uint8)
        self.n_transfers = 0
        self.transfer_keys = KeyIndex(capacity)  # key64 -> row of the first transfer with that key
        self.transfer_collisions: dict[int, int] = {}  # full id -> row, for ids whose key64 was taken
        self.failed_ids: set[int] = set()  # ids burned by transient failures (ID_ALREADY_FAILED)
        self.failed_keys: set[int] = set()
        self.expiry: list[tuple[int, int]] = []  # (expires_at, row) heap of pending transfers with timeouts
        self.history: dict[int, list[tuple[int, int, int, int, int]]] = {}  # account row -> balances
        self._undo: list[tuple[Any, ...]] | None = None
        self.timeline: Timeline = EngineTimeline(self)  # a sharded ledger puts its global one here
        self.fast_batches = 0
        self.slow_batches = 0

    # ---------------------------------------------------------------- timestamps and storage

    def next_timestamps(self, n: int) -> int:
        """Reserve ``n`` consecutive timestamps and return the first."""
        base = max(int(self.clock()), self.last_timestamp + 1)
        self.last_timestamp = base + n - 1
        return base

    def _grow_transfers(self, extra: int) -> None:
        need = self.n_transfers + extra
        if need <= len(self.transfers):
            return
        cap = max(need, 2 * len(self.transfers))
        t = preallocate(cap, TRANSFER_DTYPE)
        copy_records(t[: self.n_transfers], self.transfers[: self.n_transfers])
        p = preallocate(cap, np.uint8)
        p[: self.n_transfers] = self.pending_state[: self.n_transfers]
        self.transfers, self.pending_state = t, p

    def _grow_accounts(self, extra: int) -> None:
        need = self.n_accounts + extra
        if need <= len(self.accounts):
            return
        a = np.zeros(max(need, 2 * len(self.accounts)), dtype=ACCOUNT_DTYPE)
        copy_records(a[: self.n_accounts], self.accounts[: self.n_accounts])
        self.accounts = a

    def adopt_transfers(self, transfers: np.ndarray, pending_state: np.ndarray) -> None:
        """Make stored transfers (a checkpoint's, in timestamp order) rows 0.. of this empty engine, in the storage
        it allocated at start when they fit (room to double them), in new storage otherwise."""
        m = len(transfers)
        if 2 * m > len(self.transfers):
            self.transfers = preallocate(2 * m, TRANSFER_DTYPE)
            self.pending_state = preallocate(2 * m, np.uint8)
        copy_records(self.transfers[:m], transfers)
        self.pending_state[:m] = pending_state
        self.n_transfers = m
        # For a repeated hash key the first row wins, as on insert; the later rows are collisions, by full id.
        keys = key64(self.transfers["id"][:m])
        self.transfer_keys.insert_first_rows(keys)
        self.transfer_collisions = {}
        if len(self.transfer_keys) < m:
            seen: set[int] = set()
            for row, (k, tid) in enumerate(zip(keys.tolist(), u128_from_words(self.transfers["id"][:m]))):
                if k in seen:
                    self.transfer_collisions[tid] = row
                seen.add(k)

    def transfer_row(self, tid: int) -> int | None:
        """The row of transfer ``tid``, or None."""
        row = self.transfer_keys.get(key64_int(tid))
        if row is None:
            return None
        if u128(self.transfers["id"][row]) == tid:
            return row
        return self.transfer_collisions.get(tid)

    def transfer_at(self, ts: int) -> bool:
        """Whether a stored transfer has timestamp ``ts`` (rows are in timestamp order)."""
        col = self.transfers["timestamp"][: self.n_transfers]
        i = int(np.searchsorted(col, np.uint64(ts)))
        return i < len(col) and int(col[i]) == ts

    def account_at(self, ts: int) -> bool:
        """Whether a stored account has timestamp ``ts`` (rows are in timestamp order)."""
        col = self.accounts["timestamp"][: self.n_accounts]
        i = int(np.searchsorted(col, np.uint64(ts)))
        return i < len(col) and int(col[i]) == ts

    def insert_transfer(self, rec: dict[str, int]) -> int:
        self._grow_transfers(1)
        row = self.n_transfers
        t = self.transfers
        for name in ("id", "debit_account_id", "credit_account_id", "amount", "pending_id", "user_data_128"):
            set_u128(t, name, row, rec[name])
        for name in ("user_data_64", "user_data_32", "timeout", "ledger", "code", "flags", "timestamp"):
            t[name][row] = rec[name]
        self.pending_state[row] = PENDING if rec["flags"] & _TF.PENDING else NOT_PENDING
        self.n_transfers += 1
        k = key64_int(rec["id"])
        if k in self.transfer_keys:
            self.transfer_collisions[rec["id"]] = row
        else:
            self.transfer_keys[k] = row
        if self._undo is not None:
            self._undo.append(("transfer", row, k, rec["id"]))
        return row

    def _rebuild_account_index(self) -> None:
        n = self.n_accounts
        keys = key64(self.accounts["id"][:n])
        order = np.argsort(keys, kind="stable")
        self._acc_keys = keys[order]
        self._acc_key_rows = order.astype(np.int64)
        self._acc_keys_unique = bool(n < 2 or np.all(self._acc_keys[1:] != self._acc_keys[:-1]))
        ids = self.accounts["id"][:n]
        self._dense = None
        if n and not ids[:, 1].any():
            top = int(ids[:, 0].max())
            if top < 4 * n + (1 << 20):
                table = np.full(top + 1, -1, dtype=np.int64)
                table[ids[:, 0].astype(np.int64)] = np.arange(n, dtype=np.int64)
                self._dense = table
        self._index_dirty = False

    def _account_rows_np(self, words: np.ndarray) -> np.ndarray:
        """Rows of the accounts named by an ``(n, 2)`` id array; -1 where not found."""
        if self._index_dirty:
            self._rebuild_account_index()
        table = self._dense
        if table is not None:  # small integer ids: one gather instead of a binary search
            lo = words[:, 0]
            inside = (words[:, 1] == 0) & (lo < len(table))
            return np.where(inside, table[np.where(inside, lo, 0)], -1)
        if len(self._acc_keys) == 0:
            return np.full(len(words), -1, dtype=np.int64)
        q = key64(words)
        pos = np.searchsorted(self._acc_keys, q)
        pos[pos >= len(self._acc_keys)] = 0
        rows = self._acc_key_rows[pos]
        ids = self.accounts["id"][rows]
        ok = (self._acc_keys[pos] == q) & (ids[:, 0] == words[:, 0]) & (ids[:, 1] == words[:, 1])
        return np.where(ok, rows, -1)

    def _stamp_batch(self, n: int, what: str, timestamp: int | None, offsets: np.ndarray | None) -> np.ndarray:
        """Check a batch's size and take its timestamps (or adopt the replayed ones): event i gets the first one
        plus i, or plus ``offsets[i]`` (increasing) when the batch is part of a larger one spread over shards."""
        if n > BATCH_MAX:
            raise DataError(f"batch of {n} {what} exceeds the limit of {BATCH_MAX} events")
        span = n if offsets is None or n == 0 else int(offsets[-1]) + 1
        base = self.next_timestamps(span) if timestamp is None else timestamp
        self.last_timestamp = max(self.last_timestamp, base + span - 1)
        steps = np.arange(n, dtype=np.uint64) if offsets is None else offsets.astype(np.uint64)
        return np.uint64(base) + steps

    # ---------------------------------------------------------------- accounts

    def create_accounts(self, batch: np.ndarray, timestamp: int | None = None,
                        offsets: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Create accounts; returns (status u32 per event, engine codes, and timestamp u64 per event)."""
        n = len(batch)
        times = self._stamp_batch(n, "accounts", timestamp, offsets)
        status = np.full(n, CREATED, dtype=np.uint32)
        stamps = np.zeros(n, dtype=np.uint64)
        ev = event_dicts(batch)
        self._run_chains(n, ev, times, status, stamps, self._create_account, CA)
        return status, stamps

    def _create_account(self, e: dict[str, int], ts: int) -> tuple[int, int]:
        if e["reserved"] != 0:
            return CA.RESERVED_FIELD, 0
        flags = e["flags"]
        if flags & ~_KNOWN_ACCOUNT_FLAGS:
            return CA.RESERVED_FLAG, 0
        aid = e["id"]
        if aid == 0:
            return CA.ID_MUST_NOT_BE_ZERO, 0
        if aid == U128_MAX:
            return CA.ID_MUST_NOT_BE_INT_MAX, 0
        row = self.account_rows.get(aid)
        if row is not None:
            x = self.accounts[row]
            if int(x["flags"]) != flags:
                return CA.EXISTS_WITH_DIFFERENT_FLAGS, 0
            if u128(x["user_data_128"]) != e["user_data_128"]:
                return CA.EXISTS_WITH_DIFFERENT_USER_DATA_128, 0
            if int(x["user_data_64"]) != e["user_data_64"]:
                return CA.EXISTS_WITH_DIFFERENT_USER_DATA_64, 0
            if int(x["user_data_32"]) != e["user_data_32"]:
                return CA.EXISTS_WITH_DIFFERENT_USER_DATA_32, 0
            if int(x["ledger"]) != e["ledger"]:
                return CA.EXISTS_WITH_DIFFERENT_LEDGER, 0
            if int(x["code"]) != e["code"]:
                return CA.EXISTS_WITH_DIFFERENT_CODE, 0
            return CA.EXISTS, int(x["timestamp"])
        if flags & _LIMIT_FLAGS == _LIMIT_FLAGS:
            return CA.FLAGS_ARE_MUTUALLY_EXCLUSIVE, 0
        if e["debits_pending"]:
            return CA.DEBITS_PENDING_MUST_BE_ZERO, 0
        if e["debits_posted"]:
            return CA.DEBITS_POSTED_MUST_BE_ZERO, 0
        if e["credits_pending"]:
            return CA.CREDITS_PENDING_MUST_BE_ZERO, 0
        if e["credits_posted"]:
            return CA.CREDITS_POSTED_MUST_BE_ZERO, 0
        if e["ledger"] == 0:
            return CA.LEDGER_MUST_NOT_BE_ZERO, 0
        if e["code"] == 0:
            return CA.CODE_MUST_NOT_BE_ZERO, 0
        if flags & AccountFlags.IMPORTED:
            # After the idempotency checks, so an import can be retried and answered EXISTS.
            if self.timeline.account_regresses(e["timestamp"]):
                return CA.IMPORTED_EVENT_TIMESTAMP_MUST_NOT_REGRESS, 0
            ts = e["timestamp"]
        self._grow_accounts(1)
        row = self.n_accounts
        a = self.accounts
        a[row] = np.zeros((), dtype=ACCOUNT_DTYPE)
        set_u128(a, "id", row, aid)
        set_u128(a, "user_data_128", row, e["user_data_128"])
        for name in ("user_data_64", "user_data_32", "ledger", "code", "flags"):
            a[name][row] = e[name]
        a["timestamp"][row] = ts
        self.n_accounts += 1
        self.account_rows[aid] = row
        self._index_dirty = True
        if self._undo is not None:
            self._undo.append(("account", row, aid))
        return CREATED, ts

    # ---------------------------------------------------------------- transfers

    def create_transfers(self, batch: np.ndarray, timestamp: int | None = None,
                         offsets: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Create transfers; returns (status u32 per event, engine codes, and timestamp u64 per event)."""
        n = len(batch)
        times = self._stamp_batch(n, "transfers", timestamp, offsets)
        if n:
            self.expire_pending(int(times[0]))
        if n and self._try_fast(batch, times):
            self.fast_batches += 1
            return np.full(n, CREATED, dtype=np.uint32), times
        self.slow_batches += 1
        status = np.full(n, CREATED, dtype=np.uint32)
        stamps = np.zeros(n, dtype=np.uint64)
        ev = event_dicts(batch)
        self._run_chains(n, ev, times, status, stamps, self._create_transfer, CT)
        return status, stamps

    def _try_fast(self, batch: np.ndarray, times: np.ndarray) -> bool:
        """Apply a whole batch with array operations when every event is sure to succeed; False otherwise.

        Two shapes qualify: events that create (plain or pending, no other flag) and events that post or
        void existing pending transfers. Anything that could fail, or that needs an order-dependent rule
        (limits, history, closing, balancing, linked chains, ids repeated or already used), returns False
        and the batch takes the sequential path.
        """
        n = len(batch)
        ids = batch["id"]
        if batch["timestamp"].any():
            return False
        if not (_valid_ids(ids)):
            return False
        keys = key64(ids)
        if self.failed_keys and not self.failed_keys.isdisjoint(keys.tolist()):
            return False
        new_slots = self.transfer_keys.insert_new(keys, self.n_transfers)
        if new_slots is None:  # an id (or its hash key) exists already or repeats within the batch
            return False
        flags = batch["flags"]
        resolve = (flags == int(_TF.POST_PENDING_TRANSFER)) | (flags == int(_TF.VOID_PENDING_TRANSFER))
        self._grow_transfers(n)
        start = self.n_transfers
        # Written in place past the last row: nothing is visible until n_transfers moves.
        dst = self.transfers[start: start + n]
        stored = None
        if resolve.all():
            stored = self._fast_resolve(batch, times, dst)
        elif not (flags & np.uint16(0xFFFF ^ int(_TF.PENDING))).any():
            stored = self._fast_create(batch, times, dst)
        if stored is None:
            self.transfer_keys.rollback(new_slots)
            return False
        pend = stored["flags"] == int(_TF.PENDING)
        self.pending_state[start: start + n] = np.where(pend, PENDING, NOT_PENDING)
        self.n_transfers += n
        timed = np.nonzero(pend & (stored["timeout"] > 0))[0]
        for i in timed.tolist():
            heapq.heappush(self.expiry, (int(times[i]) + int(stored["timeout"][i]) * 1_000_000_000, start + i))
        return True

    def _fast_accounts(self, dr_w: np.ndarray, cr_w: np.ndarray, ledger: np.ndarray | None
                       ) -> tuple[np.ndarray, np.ndarray] | None:
        if not (_valid_ids(dr_w) and _valid_ids(cr_w)):
            return None
        if ((dr_w[:, 0] == cr_w[:, 0]) & (dr_w[:, 1] == cr_w[:, 1])).any():
            return None
        dr = self._account_rows_np(dr_w)
        cr = self._account_rows_np(cr_w)
        if not self._acc_keys_unique or (dr < 0).any() or (cr < 0).any():
            return None
        a = self.accounts
        if ledger is not None and ((a["ledger"][dr] != ledger).any() or (a["ledger"][cr] != ledger).any()):
            return None
        if ((a["flags"][dr] | a["flags"][cr]) & _SLOW_ACCOUNT_FLAGS).any():
            return None
        # High words below 2^62 leave room for this batch's (< 2^53) sums without any u128 overflow.
        few = self.n_accounts <= 2 * (len(dr) + len(cr))  # then scanning every account beats gathering
        touched = None if few else np.concatenate([dr, cr])
        for f in ("debits_pending", "debits_posted", "credits_pending", "credits_posted"):
            high = a[f][: self.n_accounts, 1] if touched is None else a[f][touched, 1]
            if (high >= (1 << 62)).any():
                return None
        return dr, cr

    def _fast_create(self, batch: np.ndarray, times: np.ndarray, dst: np.ndarray) -> np.ndarray | None:
        amt = batch["amount"][:, 0]
        pend = batch["flags"] == int(_TF.PENDING)
        timeout = batch["timeout"]
        if batch["pending_id"].any() or not (batch["ledger"].all() and batch["code"].all()):
            return None
        if batch["amount"][:, 1].any() or (timeout[~pend] != 0).any() or int(amt.max()) >= _FAST_AMOUNT_LIMIT:
            return None
        if pend.any() and int(times[-1]) + int(timeout.max()) * 1_000_000_000 >= 1 << 63:
            return None
        rows = self._fast_accounts(batch["debit_account_id"], batch["credit_account_id"], batch["ledger"])
        if rows is None:
            return None
        dr, cr = rows
        amount = amt.astype(np.float64)
        posted = ~pend
        self._add_words("debits_posted", dr[posted], amount[posted])
        self._add_words("credits_posted", cr[posted], amount[posted])
        if pend.any():
            self._add_words("debits_pending", dr[pend], amount[pend])
            self._add_words("credits_pending", cr[pend], amount[pend])
        copy_records(dst, batch)
        dst["timestamp"] = times
        return dst

    def _fast_resolve(self, batch: np.ndarray, times: np.ndarray, dst: np.ndarray) -> np.ndarray | None:
        n = len(batch)
        pid = batch["pending_id"]
        ids = batch["id"]
        if batch["timeout"].any() or not _valid_ids(pid):
            return None
        if ((pid[:, 0] == ids[:, 0]) & (pid[:, 1] == ids[:, 1])).any():
            return None
        prow = self.transfer_keys.lookup(key64(pid))
        if (prow < 0).any() or len(np.unique(prow)) != n:
            return None
        p = self.transfers[prow]
        if ((p["id"][:, 0] != pid[:, 0]) | (p["id"][:, 1] != pid[:, 1])).any():
            return None
        if ((p["flags"] & np.uint16(0xFFFF ^ int(_TF.PENDING | _TF.LINKED))) != 0).any() or \
                ((p["flags"] & np.uint16(int(_TF.PENDING))) == 0).any():
            return None
        if (self.pending_state[prow] != PENDING).any():
            return None
        ts = times
        timed = p["timeout"] > 0
        if timed.any():
            expires = p["timestamp"][timed] + p["timeout"][timed].astype(np.uint64) * np.uint64(1_000_000_000)
            if (expires <= ts[timed]).any():
                return None
        for f in ("debit_account_id", "credit_account_id"):
            t, q = batch[f], p[f]
            given = (t[:, 0] | t[:, 1]) != 0
            if (given & ((t[:, 0] != q[:, 0]) | (t[:, 1] != q[:, 1]))).any():
                return None
        for f in ("ledger", "code"):
            if ((batch[f] != 0) & (batch[f] != p[f])).any():
                return None
        p_amt = p["amount"]
        if p_amt[:, 1].any() or int(p_amt[:, 0].max()) >= _FAST_AMOUNT_LIMIT:
            return None
        t_amt = batch["amount"]
        post = batch["flags"] == int(_TF.POST_PENDING_TRANSFER)
        # A post of AMOUNT_MAX moves the full pending amount (a void of AMOUNT_MAX exceeds it: not fast).
        everything = post & (t_amt[:, 0] == U64_MASK) & (t_amt[:, 1] == U64_MASK)
        if (~everything & (t_amt[:, 1] != 0)).any():
            return None
        asked = np.where(everything, p_amt[:, 0], t_amt[:, 0])
        if (post & (asked > p_amt[:, 0])).any():
            return None
        if (~post & (asked != 0) & (asked != p_amt[:, 0])).any():
            return None
        rows = self._fast_accounts(p["debit_account_id"], p["credit_account_id"], None)
        if rows is None:
            return None
        dr, cr = rows
        held = p_amt[:, 0].astype(np.float64)
        actual = np.where(post, asked, p_amt[:, 0])
        self._add_words("debits_pending", dr, held, sign=-1)
        self._add_words("credits_pending", cr, held, sign=-1)
        moved = actual.astype(np.float64)
        self._add_words("debits_posted", dr[post], moved[post])
        self._add_words("credits_posted", cr[post], moved[post])
        self.pending_state[prow] = np.where(post, POSTED, VOIDED)
        stored = dst
        copy_records(stored, batch)
        for f in ("debit_account_id", "credit_account_id", "ledger", "code"):
            stored[f] = p[f]
        stored["amount"][:, 0] = actual
        stored["amount"][:, 1] = 0
        ud = stored["user_data_128"]
        zero = (ud[:, 0] | ud[:, 1]) == 0
        ud[zero] = p["user_data_128"][zero]
        stored["user_data_128"] = ud
        for f in ("user_data_64", "user_data_32"):
            stored[f] = np.where(stored[f] == 0, p[f], stored[f])
        stored["timestamp"] = ts
        return stored

    def _add_words(self, field: str, rows: np.ndarray, amount: np.ndarray, sign: int = 1) -> None:
        """Add (or subtract) per-event amounts (< 2^40 each) to a u128 balance column, with carry/borrow."""
        if len(rows) == 0:
            return
        if self.n_accounts <= 1 << 18:  # a dense bincount is cheaper than sorting the rows
            dense = np.bincount(rows, weights=amount, minlength=self.n_accounts)
            uniq = np.nonzero(dense)[0]
            sums = dense[uniq].astype(np.uint64)
        else:
            uniq, inv = np.unique(rows, return_inverse=True)
            sums = np.bincount(inv, weights=amount, minlength=len(uniq)).astype(np.uint64)
        col = self.accounts[field]
        lo = col[uniq, 0]
        if sign > 0:
            new = lo + sums
            col[uniq, 0] = new
            col[uniq, 1] += (new < lo).astype(np.uint64)
        else:
            new = lo - sums
            col[uniq, 0] = new
            col[uniq, 1] -= (new > lo).astype(np.uint64)

    def _run_chains(self, n: int, ev: list[dict[str, int]], times: np.ndarray, status: np.ndarray, stamps: np.ndarray,
                    create: Callable[[dict[str, int], int], tuple[int, int]], enum: Any) -> None:
        """TigerBeetle's execute_create: linked chains, the imported-batch and timestamp checks, then ``create``
        per event. Every result carries a timestamp: the object's for CREATED/EXISTS, the event's otherwise."""
        chain_start: int | None = None
        broken = False
        undo: list[tuple[Any, ...]] = []
        imported_bit = int(TransferFlags.IMPORTED if enum is CT else AccountFlags.IMPORTED)
        batch_imported = n > 0 and bool(ev[0]["flags"] & imported_bit)
        last = int(times[-1]) if n else 0  # the batch's timestamp: an imported event must come before it
        for i in range(n):
            e = ev[i]
            linked = bool(e["flags"] & 1)
            if linked and chain_start is None:
                chain_start = i
                undo = []
            self._undo = undo if chain_start is not None else None
            ts = int(times[i])
            when = ts
            if linked and i == n - 1:
                code = enum.LINKED_EVENT_CHAIN_OPEN
            elif broken:
                code = enum.LINKED_EVENT_FAILED
            else:
                code = check_event_timestamp(e, imported_bit, batch_imported, last, enum)
                if code == CREATED:
                    code, when = create(e, ts)
                    if code != CREATED and code != enum.EXISTS:
                        when = ts
            self._undo = None
            if code != CREATED and chain_start is not None and not broken:
                broken = True
                self._rollback(undo)
                for j in range(chain_start, i):
                    status[j] = enum.LINKED_EVENT_FAILED  # their timestamps stay those they were created with
            status[i] = code
            stamps[i] = when
            if chain_start is not None and (not linked or code == enum.LINKED_EVENT_CHAIN_OPEN):
                chain_start = None
                broken = False

    def _rollback(self, undo: list[tuple[Any, ...]]) -> None:
        for entry in reversed(undo):
            kind = entry[0]
            if kind == "balance":
                _, row, field, old = entry
                set_u128(self.accounts, field, row, old)
            elif kind == "aflags":
                self.accounts["flags"][entry[1]] = entry[2]
            elif kind == "state":
                self.pending_state[entry[1]] = entry[2]
            elif kind == "history":
                self.history[entry[1]].pop()
            elif kind == "transfer":
                _, row, k, tid = entry
                self.n_transfers -= 1
                assert row == self.n_transfers
                self.transfers[row] = np.zeros((), dtype=TRANSFER_DTYPE)
                self.pending_state[row] = NOT_PENDING
                if self.transfer_collisions.get(tid) == row:
                    del self.transfer_collisions[tid]
                elif self.transfer_keys.get(k) == row:
                    del self.transfer_keys[k]
            elif kind == "account":
                _, row, aid = entry
                self.n_accounts -= 1
                del self.account_rows[aid]
                self.accounts[row] = np.zeros((), dtype=ACCOUNT_DTYPE)
                self._index_dirty = True

    def _balance(self, row: int, field: str) -> int:
        return u128(self.accounts[field][row])

    def _set_balance(self, row: int, field: str, value: int) -> None:
        if self._undo is not None:
            self._undo.append(("balance", row, field, self._balance(row, field)))
        set_u128(self.accounts, field, row, value)

    def _set_account_flags(self, row: int, flags: int) -> None:
        if self._undo is not None:
            self._undo.append(("aflags", row, int(self.accounts["flags"][row])))
        self.accounts["flags"][row] = flags

    def _set_state(self, row: int, state: int) -> None:
        if self._undo is not None:
            self._undo.append(("state", row, int(self.pending_state[row])))
        self.pending_state[row] = state

    def _record_history(self, arow: int, trow: int) -> None:
        if not int(self.accounts["flags"][arow]) & AccountFlags.HISTORY:
            return
        b = tuple(self._balance(arow, f) for f in ("debits_pending", "debits_posted", "credits_pending",
                                                   "credits_posted"))
        self.history.setdefault(arow, []).append((trow, *b))  # type: ignore[arg-type]
        if self._undo is not None:
            self._undo.append(("history", arow))

    def _create_transfer(self, t: dict[str, int], ts: int) -> tuple[int, int]:
        code, when = self._create_transfer_inner(t, ts)
        if code in TRANSIENT_TRANSFER_STATUSES:
            self.failed_ids.add(t["id"])
            self.failed_keys.add(key64_int(t["id"]))
        return code, when

    def check_transfer_id(self, t: dict[str, int]) -> tuple[int, int] | None:
        """TigerBeetle's first checks of a transfer after the batch-level ones (flags, id, an existing or
        failed id): the result, or None to go on."""
        if t["flags"] & ~_KNOWN_TRANSFER_FLAGS:
            return CT.RESERVED_FLAG, 0
        tid = t["id"]
        if tid == 0:
            return CT.ID_MUST_NOT_BE_ZERO, 0
        if tid == U128_MAX:
            return CT.ID_MUST_NOT_BE_INT_MAX, 0
        row = self.transfer_row(tid)
        if row is not None:
            return self.transfer_exists(t, row)
        if tid in self.failed_ids:
            return CT.ID_ALREADY_FAILED, 0
        return None

    def account_view(self, account_id: int) -> AccountView | None:
        """The fields of an account that TigerBeetle's transfer checks read, or None if it does not exist."""
        row = self.account_rows.get(account_id)
        if row is None:
            return None
        a = self.accounts
        return AccountView(int(a["ledger"][row]), int(a["flags"][row]), int(a["timestamp"][row]),
                           self._balance(row, "debits_pending"), self._balance(row, "debits_posted"),
                           self._balance(row, "credits_pending"), self._balance(row, "credits_posted"))

    def _create_transfer_inner(self, t: dict[str, int], ts: int) -> tuple[int, int]:
        first = self.check_transfer_id(t)
        if first is not None:
            return first
        if t["flags"] & (_TF.POST_PENDING_TRANSFER | _TF.VOID_PENDING_TRANSFER):
            return self._post_or_void(t, ts)
        code, amount, ts = validate_transfer(t, ts, self.account_view, self.timeline)
        if code != CREATED:
            return code, 0
        flags = t["flags"]
        pending = bool(flags & _TF.PENDING)
        dr = self.account_rows[t["debit_account_id"]]
        cr = self.account_rows[t["credit_account_id"]]
        rec = dict(t)
        rec["amount"] = amount
        rec["timestamp"] = ts
        trow = self.insert_transfer(rec)
        b = self._balance
        if pending:
            self._set_balance(dr, "debits_pending", b(dr, "debits_pending") + amount)
            self._set_balance(cr, "credits_pending", b(cr, "credits_pending") + amount)
            if t["timeout"]:
                heapq.heappush(self.expiry, (ts + t["timeout"] * 1_000_000_000, trow))
        else:
            self._set_balance(dr, "debits_posted", b(dr, "debits_posted") + amount)
            self._set_balance(cr, "credits_posted", b(cr, "credits_posted") + amount)
        if flags & _TF.CLOSING_DEBIT:
            self._set_account_flags(dr, int(self.accounts["flags"][dr]) | AccountFlags.CLOSED)
        if flags & _TF.CLOSING_CREDIT:
            self._set_account_flags(cr, int(self.accounts["flags"][cr]) | AccountFlags.CLOSED)
        self._record_history(dr, trow)
        self._record_history(cr, trow)
        return CREATED, ts

    def check_post_or_void(self, t: dict[str, int], ts: int | None,
                           account: Callable[[int], AccountView | None] | None = None,
                           timeline: Timeline | None = None) -> tuple[int, int, int, int]:
        """TigerBeetle's checks of a post/void (after ``check_transfer_id``) against the pending transfer it
        names, in its order: ``(CREATED, row of the pending transfer, amount to move, timestamp)`` or
        ``(result code, -1, 0, 0)``. ``ts`` is the event's timestamp (None: the clock, read only when the
        pending transfer has a timeout); ``account`` and ``timeline`` default to this engine's."""
        fail = -1, 0, 0
        flags = t["flags"]
        post = bool(flags & _TF.POST_PENDING_TRANSFER)
        void = bool(flags & _TF.VOID_PENDING_TRANSFER)
        if (post and void) or flags & (_TF.PENDING | _TF.BALANCING_DEBIT | _TF.BALANCING_CREDIT
                                       | _TF.CLOSING_DEBIT | _TF.CLOSING_CREDIT):
            return CT.FLAGS_ARE_MUTUALLY_EXCLUSIVE, *fail
        pid = t["pending_id"]
        if pid == 0:
            return CT.PENDING_ID_MUST_NOT_BE_ZERO, *fail
        if pid == U128_MAX:
            return CT.PENDING_ID_MUST_NOT_BE_INT_MAX, *fail
        if pid == t["id"]:
            return CT.PENDING_ID_MUST_BE_DIFFERENT, *fail
        if t["timeout"] != 0:
            return CT.TIMEOUT_RESERVED_FOR_PENDING_TRANSFER, *fail
        prow = self.transfer_row(pid)
        if prow is None:
            return CT.PENDING_TRANSFER_NOT_FOUND, *fail
        p = self.transfers[prow]
        if not int(p["flags"]) & _TF.PENDING:
            return CT.PENDING_TRANSFER_NOT_PENDING, *fail
        if t["debit_account_id"] and t["debit_account_id"] != u128(p["debit_account_id"]):
            return CT.PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT_ID, *fail
        if t["credit_account_id"] and t["credit_account_id"] != u128(p["credit_account_id"]):
            return CT.PENDING_TRANSFER_HAS_DIFFERENT_CREDIT_ACCOUNT_ID, *fail
        if t["ledger"] and t["ledger"] != int(p["ledger"]):
            return CT.PENDING_TRANSFER_HAS_DIFFERENT_LEDGER, *fail
        if t["code"] and t["code"] != int(p["code"]):
            return CT.PENDING_TRANSFER_HAS_DIFFERENT_CODE, *fail
        amount, p_amount = t["amount"], u128(p["amount"])
        # A void of 0 and a post of AMOUNT_MAX mean "the pending amount"; any other amount is taken as asked.
        if (void and amount == 0) or (post and amount == AMOUNT_MAX):
            amount = p_amount
        if amount > p_amount:
            return CT.EXCEEDS_PENDING_TRANSFER_AMOUNT, *fail
        if void and amount < p_amount:
            return CT.PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT, *fail
        state = int(self.pending_state[prow])
        if state == POSTED:
            return CT.PENDING_TRANSFER_ALREADY_POSTED, *fail
        if state == VOIDED:
            return CT.PENDING_TRANSFER_ALREADY_VOIDED, *fail
        timeout = int(p["timeout"])
        if state == EXPIRED or (timeout and int(p["timestamp"]) + timeout * 1_000_000_000
                                <= (self.clock() if ts is None else ts)):
            return CT.PENDING_TRANSFER_EXPIRED, *fail
        ts_actual = ts or 0
        if flags & _TF.IMPORTED:
            if (timeline or self.timeline).transfer_regresses(t["timestamp"]):
                return CT.IMPORTED_EVENT_TIMESTAMP_MUST_NOT_REGRESS, *fail
            ts_actual = t["timestamp"]
        if post:  # the only movement a closed account allows is voiding a pending transfer
            find = account or self.account_view
            dr, cr = find(u128(p["debit_account_id"])), find(u128(p["credit_account_id"]))
            if dr is not None and dr.flags & AccountFlags.CLOSED:
                return CT.DEBIT_ACCOUNT_ALREADY_CLOSED, *fail
            if cr is not None and cr.flags & AccountFlags.CLOSED:
                return CT.CREDIT_ACCOUNT_ALREADY_CLOSED, *fail
        return CREATED, prow, amount, ts_actual

    def _post_or_void(self, t: dict[str, int], ts: int) -> tuple[int, int]:
        code, prow, actual, ts = self.check_post_or_void(t, ts)
        if code != CREATED:
            return code, 0
        post = bool(t["flags"] & _TF.POST_PENDING_TRANSFER)
        p = self.transfers[prow]
        p_flags = int(p["flags"])
        p_dr, p_cr, p_amount = u128(p["debit_account_id"]), u128(p["credit_account_id"]), u128(p["amount"])
        dr = self.account_rows[p_dr]
        cr = self.account_rows[p_cr]
        rec = resolved_record(t, p, actual, ts)
        trow = self.insert_transfer(rec)
        self._release_pending(dr, cr, p_amount)
        if post:
            self._set_balance(dr, "debits_posted", self._balance(dr, "debits_posted") + actual)
            self._set_balance(cr, "credits_posted", self._balance(cr, "credits_posted") + actual)
            self._set_state(prow, POSTED)
        else:
            self._reopen_closed(p_flags, dr, cr)
            self._set_state(prow, VOIDED)
        self._record_history(dr, trow)
        self._record_history(cr, trow)
        return CREATED, ts

    def _release_pending(self, dr: int, cr: int, amount: int) -> None:
        self._set_balance(dr, "debits_pending", self._balance(dr, "debits_pending") - amount)
        self._set_balance(cr, "credits_pending", self._balance(cr, "credits_pending") - amount)

    def _reopen_closed(self, p_flags: int, dr: int, cr: int) -> None:
        if p_flags & _TF.CLOSING_DEBIT:
            self._set_account_flags(dr, int(self.accounts["flags"][dr]) & ~AccountFlags.CLOSED)
        if p_flags & _TF.CLOSING_CREDIT:
            self._set_account_flags(cr, int(self.accounts["flags"][cr]) & ~AccountFlags.CLOSED)

    def transfer_exists(self, t: dict[str, int], row: int) -> tuple[int, int]:
        """The answer to a transfer whose id exists at ``row``: EXISTS (with the stored timestamp) or the first
        field that differs, as TigerBeetle compares them."""
        e = self.transfers[row]
        flags = t["flags"]
        if flags != int(e["flags"]):
            return CT.EXISTS_WITH_DIFFERENT_FLAGS, 0
        if t["pending_id"] != u128(e["pending_id"]):
            return CT.EXISTS_WITH_DIFFERENT_PENDING_ID, 0
        if t["timeout"] != int(e["timeout"]):
            return CT.EXISTS_WITH_DIFFERENT_TIMEOUT, 0
        if flags & (_TF.POST_PENDING_TRANSFER | _TF.VOID_PENDING_TRANSFER):
            prow = self.transfer_row(t["pending_id"])
            assert prow is not None
            return _resolve_exists(t, e, self.transfers[prow])
        for name, code in (("debit_account_id", CT.EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID),
                           ("credit_account_id", CT.EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID)):
            if t[name] != u128(e[name]):
                return code, 0
        amount, e_amount = t["amount"], u128(e["amount"])
        if flags & (_TF.BALANCING_DEBIT | _TF.BALANCING_CREDIT):
            if amount < e_amount:
                return CT.EXISTS_WITH_DIFFERENT_AMOUNT, 0
        elif amount != e_amount:
            return CT.EXISTS_WITH_DIFFERENT_AMOUNT, 0
        for name, code in _USER_DATA:
            if t[name] != _field(e, name):
                return code, 0
        if t["ledger"] != int(e["ledger"]):
            return CT.EXISTS_WITH_DIFFERENT_LEDGER, 0
        if t["code"] != int(e["code"]):
            return CT.EXISTS_WITH_DIFFERENT_CODE, 0
        return CT.EXISTS, int(e["timestamp"])

    def expire_pending(self, now: int) -> int:
        """Void pending transfers whose timeout passed by ``now`` (engine clock); returns how many."""
        done = 0
        while self.expiry and self.expiry[0][0] <= now:
            _, row = heapq.heappop(self.expiry)
            if row >= self.n_transfers or self.pending_state[row] != PENDING:
                continue
            p = self.transfers[row]
            dr = self.account_rows[u128(p["debit_account_id"])]
            cr = self.account_rows[u128(p["credit_account_id"])]
            self._release_pending(dr, cr, u128(p["amount"]))
            self._reopen_closed(int(p["flags"]), dr, cr)
            self.pending_state[row] = EXPIRED
            done += 1
        return done

    def rebuild_expiry(self) -> None:
        """Recreate the timeout heap from stored pending transfers (after loading a checkpoint)."""
        n = self.n_transfers
        rows = np.nonzero((self.pending_state[:n] == PENDING) & (self.transfers["timeout"][:n] > 0))[0]
        t = self.transfers
        self.expiry = [(int(t["timestamp"][r]) + int(t["timeout"][r]) * 1_000_000_000, int(r)) for r in rows]
        heapq.heapify(self.expiry)

    # ---------------------------------------------------------------- reads

    def lookup_accounts(self, ids: list[int]) -> np.ndarray:
        """The accounts that exist among ``ids``, in request order (ACCOUNT_DTYPE)."""
        rows = [r for r in (self.account_rows.get(i) for i in ids) if r is not None]
        return self.accounts[np.array(rows, dtype=np.int64)].copy()

    def lookup_transfers(self, ids: list[int]) -> np.ndarray:
        """The transfers that exist among ``ids``, in request order (TRANSFER_DTYPE)."""
        rows = [r for r in (self.transfer_row(i) for i in ids) if r is not None]
        return self.transfers[np.array(rows, dtype=np.int64)].copy()

    def _account_transfer_rows(self, f: AccountFilter) -> np.ndarray:
        flags = int(f.flags)
        if f.account_id in (0, U128_MAX) or not flags & (AccountFilterFlags.DEBITS | AccountFilterFlags.CREDITS):
            return np.zeros(0, dtype=np.int64)
        if f.limit == 0 or (f.timestamp_max and f.timestamp_min > f.timestamp_max):
            return np.zeros(0, dtype=np.int64)
        t = self.transfers[: self.n_transfers]
        lo, hi = f.account_id & U64_MASK, f.account_id >> 64

        def match(part: np.ndarray) -> np.ndarray:
            mask = np.zeros(len(part), dtype=bool)
            if flags & AccountFilterFlags.DEBITS:
                mask |= (part["debit_account_id"][:, 0] == lo) & (part["debit_account_id"][:, 1] == hi)
            if flags & AccountFilterFlags.CREDITS:
                mask |= (part["credit_account_id"][:, 0] == lo) & (part["credit_account_id"][:, 1] == hi)
            return mask & _common_mask(part, f.user_data_128, f.user_data_64, f.user_data_32, 0, f.code, 0, 0)
        return _scan(t, match, f.timestamp_min, f.timestamp_max, bool(flags & AccountFilterFlags.REVERSED),
                     min(f.limit, BATCH_MAX))

    def get_account_transfers(self, f: AccountFilter) -> np.ndarray:
        """Transfers of one account matching the filter, by timestamp (TRANSFER_DTYPE)."""
        return self.transfers[self._account_transfer_rows(f)].copy()

    def get_account_balances(self, f: AccountFilter) -> list[tuple[int, int, int, int, int]]:
        """(debits_pending, debits_posted, credits_pending, credits_posted, timestamp) after each matching
        transfer of an account with ``flags.history``."""
        row = self.account_rows.get(f.account_id)
        if row is None or not int(self.accounts["flags"][row]) & AccountFlags.HISTORY:
            return []
        wanted = set(self._account_transfer_rows(AccountFilter(
            f.account_id, f.user_data_128, f.user_data_64, f.user_data_32, f.code, f.timestamp_min,
            f.timestamp_max, BATCH_MAX, f.flags & ~AccountFilterFlags.REVERSED)).tolist())
        out = [(dp, dpo, cp, cpo, int(self.transfers["timestamp"][tr]))
               for tr, dp, dpo, cp, cpo in self.history.get(row, []) if tr in wanted]
        if int(f.flags) & AccountFilterFlags.REVERSED:
            out.reverse()
        return out[: f.limit]

    def query_accounts(self, f: QueryFilter) -> np.ndarray:
        """Accounts matching the filter, by timestamp (ACCOUNT_DTYPE)."""
        a = self.accounts[: self.n_accounts]
        return _query(a, f)

    def query_transfers(self, f: QueryFilter) -> np.ndarray:
        """Transfers matching the filter, by timestamp (TRANSFER_DTYPE)."""
        return _query(self.transfers[: self.n_transfers], f)

    def totals(self) -> dict[str, int]:
        """Sums of the four balance columns over all accounts (posted debits equal posted credits)."""
        a = self.accounts[: self.n_accounts]
        return {f: sum(u128_from_words(a[f])) for f in ("debits_pending", "debits_posted", "credits_pending",
                                                         "credits_posted")}


_USER_DATA = (("user_data_128", CT.EXISTS_WITH_DIFFERENT_USER_DATA_128),
              ("user_data_64", CT.EXISTS_WITH_DIFFERENT_USER_DATA_64),
              ("user_data_32", CT.EXISTS_WITH_DIFFERENT_USER_DATA_32))
TIMESTAMP_MAX = (1 << 63) - 1  # TigerBeetle's largest timestamp (the top bit of the u64 is a tombstone)


def _field(rec: np.ndarray, name: str) -> int:
    v = rec[name]
    return u128(v) if v.shape == (2,) else int(v)


class AccountView(NamedTuple):
    """The fields of an account that TigerBeetle's transfer checks read."""

    ledger: int
    flags: int
    timestamp: int
    debits_pending: int
    debits_posted: int
    credits_pending: int
    credits_posted: int


class Timeline(Protocol):
    """Where an imported event's timestamp may go: after every object of its kind, on no other object's."""

    def account_regresses(self, ts: int) -> bool: ...

    def transfer_regresses(self, ts: int) -> bool: ...


class EngineTimeline:
    """The timeline of one engine: rows of each kind are stored in timestamp order."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def account_regresses(self, ts: int) -> bool:
        e = self.engine
        return (e.n_accounts > 0 and ts <= int(e.accounts["timestamp"][e.n_accounts - 1])) or e.transfer_at(ts)

    def transfer_regresses(self, ts: int) -> bool:
        e = self.engine
        return (e.n_transfers > 0 and ts <= int(e.transfers["timestamp"][e.n_transfers - 1])) or e.account_at(ts)


def check_event_timestamp(e: dict[str, int], imported_bit: int, batch_imported: bool, last: int, enum: Any) -> int:
    """TigerBeetle's batch-level checks of an event's timestamp (the first event decides whether the batch
    imports): CREATED to go on, or the result."""
    imported = bool(e["flags"] & imported_bit)
    if imported != batch_imported:
        return int(enum.IMPORTED_EVENT_NOT_EXPECTED if imported else enum.IMPORTED_EVENT_EXPECTED)
    if imported:
        if not 1 <= e["timestamp"] <= TIMESTAMP_MAX:
            return int(enum.IMPORTED_EVENT_TIMESTAMP_OUT_OF_RANGE)
        if e["timestamp"] >= last:
            return int(enum.IMPORTED_EVENT_TIMESTAMP_MUST_NOT_ADVANCE)
    elif e["timestamp"] != 0:
        return int(enum.TIMESTAMP_MUST_BE_ZERO)
    return CREATED


def validate_transfer(t: dict[str, int], ts: int, account: Callable[[int], AccountView | None],
                      timeline: Timeline) -> tuple[int, int, int]:
    """TigerBeetle's checks of a new transfer (not a post/void) after ``check_transfer_id``, in its order:
    ``(CREATED, amount to move, timestamp)`` or ``(result code, 0, 0)``. ``account(id)`` reads an account
    (from one engine, or from the shard that owns it); ``timeline`` judges imported timestamps. The one
    place these rules live: the engine and the sharded coordinator both call it."""
    flags = t["flags"]
    dr_id, cr_id = t["debit_account_id"], t["credit_account_id"]
    if dr_id == 0:
        return CT.DEBIT_ACCOUNT_ID_MUST_NOT_BE_ZERO, 0, 0
    if dr_id == U128_MAX:
        return CT.DEBIT_ACCOUNT_ID_MUST_NOT_BE_INT_MAX, 0, 0
    if cr_id == 0:
        return CT.CREDIT_ACCOUNT_ID_MUST_NOT_BE_ZERO, 0, 0
    if cr_id == U128_MAX:
        return CT.CREDIT_ACCOUNT_ID_MUST_NOT_BE_INT_MAX, 0, 0
    if dr_id == cr_id:
        return CT.ACCOUNTS_MUST_BE_DIFFERENT, 0, 0
    if t["pending_id"] != 0:
        return CT.PENDING_ID_MUST_BE_ZERO, 0, 0
    pending = bool(flags & _TF.PENDING)
    if not pending:
        if t["timeout"] != 0:
            return CT.TIMEOUT_RESERVED_FOR_PENDING_TRANSFER, 0, 0
        if flags & (_TF.CLOSING_DEBIT | _TF.CLOSING_CREDIT):
            return CT.CLOSING_TRANSFER_MUST_BE_PENDING, 0, 0
    if t["ledger"] == 0:
        return CT.LEDGER_MUST_NOT_BE_ZERO, 0, 0
    if t["code"] == 0:
        return CT.CODE_MUST_NOT_BE_ZERO, 0, 0
    dr = account(dr_id)
    if dr is None:
        return CT.DEBIT_ACCOUNT_NOT_FOUND, 0, 0
    cr = account(cr_id)
    if cr is None:
        return CT.CREDIT_ACCOUNT_NOT_FOUND, 0, 0
    if dr.ledger != cr.ledger:
        return CT.ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER, 0, 0
    if t["ledger"] != dr.ledger:
        return CT.TRANSFER_MUST_HAVE_THE_SAME_LEDGER_AS_ACCOUNTS, 0, 0
    if flags & _TF.IMPORTED:
        ts = t["timestamp"]
        if timeline.transfer_regresses(ts):
            return CT.IMPORTED_EVENT_TIMESTAMP_MUST_NOT_REGRESS, 0, 0
        if ts <= dr.timestamp:
            return CT.IMPORTED_EVENT_TIMESTAMP_MUST_POSTDATE_DEBIT_ACCOUNT, 0, 0
        if ts <= cr.timestamp:
            return CT.IMPORTED_EVENT_TIMESTAMP_MUST_POSTDATE_CREDIT_ACCOUNT, 0, 0
        if t["timeout"] != 0:
            return CT.IMPORTED_EVENT_TIMEOUT_MUST_BE_ZERO, 0, 0
    if dr.flags & AccountFlags.CLOSED:
        return CT.DEBIT_ACCOUNT_ALREADY_CLOSED, 0, 0
    if cr.flags & AccountFlags.CLOSED:
        return CT.CREDIT_ACCOUNT_ALREADY_CLOSED, 0, 0
    amount = t["amount"]
    if flags & _TF.BALANCING_DEBIT:
        amount = min(amount, max(0, dr.credits_posted - (dr.debits_posted + dr.debits_pending)))
    if flags & _TF.BALANCING_CREDIT:
        amount = min(amount, max(0, cr.debits_posted - (cr.credits_posted + cr.credits_pending)))
    if pending:
        if amount + dr.debits_pending > U128_MAX:
            return CT.OVERFLOWS_DEBITS_PENDING, 0, 0
        if amount + cr.credits_pending > U128_MAX:
            return CT.OVERFLOWS_CREDITS_PENDING, 0, 0
    if amount + dr.debits_posted > U128_MAX:
        return CT.OVERFLOWS_DEBITS_POSTED, 0, 0
    if amount + cr.credits_posted > U128_MAX:
        return CT.OVERFLOWS_CREDITS_POSTED, 0, 0
    if amount + dr.debits_pending + dr.debits_posted > U128_MAX:
        return CT.OVERFLOWS_DEBITS, 0, 0
    if amount + cr.credits_pending + cr.credits_posted > U128_MAX:
        return CT.OVERFLOWS_CREDITS, 0, 0
    if ts + t["timeout"] * 1_000_000_000 > TIMESTAMP_MAX:
        return CT.OVERFLOWS_TIMEOUT, 0, 0
    if dr.flags & AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS and \
            dr.debits_pending + dr.debits_posted + amount > dr.credits_posted:
        return CT.EXCEEDS_CREDITS, 0, 0
    if cr.flags & AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS and \
            cr.credits_pending + cr.credits_posted + amount > cr.debits_posted:
        return CT.EXCEEDS_DEBITS, 0, 0
    return CREATED, amount, ts


def resolved_record(t: dict[str, int], p: np.ndarray, amount: int, ts: int) -> dict[str, int]:
    """The stored form of a post/void ``t`` of pending transfer ``p``: the pending transfer's accounts, ledger
    and code; its user data where ``t`` gives none; the amount moved; no timeout."""
    rec = dict(t)
    rec.update(debit_account_id=u128(p["debit_account_id"]), credit_account_id=u128(p["credit_account_id"]),
               amount=amount, ledger=int(p["ledger"]), code=int(p["code"]), timeout=0, timestamp=ts)
    for name, _ in _USER_DATA:
        if not rec[name]:
            rec[name] = _field(p, name)
    return rec


def _resolve_exists(t: dict[str, int], e: np.ndarray, p: np.ndarray) -> tuple[int, int]:
    """TigerBeetle's post_or_void_pending_transfer_exists: fields left zero mean "as the pending transfer"."""
    for name, code in (("debit_account_id", CT.EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID),
                       ("credit_account_id", CT.EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID)):
        if t[name] != 0 and t[name] != u128(e[name]):
            return code, 0
    amount, e_amount, p_amount = t["amount"], u128(e["amount"]), u128(p["amount"])
    everything = (amount == 0) if t["flags"] & _TF.VOID_PENDING_TRANSFER else (amount == AMOUNT_MAX)
    if (e_amount != p_amount) if everything else (amount != e_amount):
        return CT.EXISTS_WITH_DIFFERENT_AMOUNT, 0
    for name, code in _USER_DATA:
        if _field(e, name) != (t[name] or _field(p, name)):
            return code, 0
    if t["ledger"] != 0 and t["ledger"] != int(e["ledger"]):
        return CT.EXISTS_WITH_DIFFERENT_LEDGER, 0
    if t["code"] != 0 and t["code"] != int(e["code"]):
        return CT.EXISTS_WITH_DIFFERENT_CODE, 0
    return CT.EXISTS, int(e["timestamp"])


def _common_mask(t: np.ndarray, ud128: int, ud64: int, ud32: int, ledger: int, code: int, tmin: int,
                 tmax: int) -> np.ndarray:
    mask = np.ones(len(t), dtype=bool)
    if ud128:
        mask &= (t["user_data_128"][:, 0] == ud128 & U64_MASK) & (t["user_data_128"][:, 1] == ud128 >> 64)
    if ud64:
        mask &= t["user_data_64"] == ud64
    if ud32:
        mask &= t["user_data_32"] == ud32
    if ledger:
        mask &= t["ledger"] == ledger
    if code:
        mask &= t["code"] == code
    if tmin:
        mask &= t["timestamp"] >= tmin
    if tmax:
        mask &= t["timestamp"] <= tmax
    return mask


_SCAN_BLOCK = 1 << 16


def _scan(t: np.ndarray, match: Callable[[np.ndarray], np.ndarray], tmin: int, tmax: int, reverse: bool,
          limit: int) -> np.ndarray:
    """Rows of ``t`` (stored in timestamp order) that match, in blocks from the requested end, so a recent
    history query with a small limit reads only the newest blocks."""
    ts = t["timestamp"]
    start = int(np.searchsorted(ts, np.uint64(tmin), side="left")) if tmin else 0
    stop = int(np.searchsorted(ts, np.uint64(tmax), side="right")) if tmax else len(t)
    found: list[np.ndarray] = []
    count = 0
    edges = range(stop, start, -_SCAN_BLOCK) if reverse else range(start, stop, _SCAN_BLOCK)
    for edge in edges:
        lo, hi = (max(start, edge - _SCAN_BLOCK), edge) if reverse else (edge, min(stop, edge + _SCAN_BLOCK))
        rows = lo + np.nonzero(match(t[lo:hi]))[0]
        if reverse:
            rows = rows[::-1]
        found.append(rows)
        count += len(rows)
        if count >= limit:
            break
    out = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
    return out[:limit].astype(np.int64)


def _query(records: np.ndarray, f: QueryFilter) -> np.ndarray:
    if f.limit == 0 or (f.timestamp_max and f.timestamp_min > f.timestamp_max):
        return records[:0].copy()
    # Records are stored in timestamp order: find the page by binary search and scan only up to the limit, so
    # paging through a large table costs time in proportion to the pages read, not the table per page.
    rows = _scan(records, lambda t: _common_mask(t, f.user_data_128, f.user_data_64, f.user_data_32, f.ledger,
                                                 f.code, 0, 0),
                 f.timestamp_min, f.timestamp_max, bool(int(f.flags) & QueryFilterFlags.REVERSED),
                 min(f.limit, BATCH_MAX))
    return records[rows].copy()


def event_dicts(batch: np.ndarray) -> list[dict[str, int]]:
    names = batch.dtype.names or ()
    cols: dict[str, list[int]] = {}
    for name in names:
        col = batch[name]
        cols[name] = u128_from_words(col) if col.ndim == 2 else col.tolist()
    return [dict(zip(names, row)) for row in zip(*(cols[n] for n in names))]
