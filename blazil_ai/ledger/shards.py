"""Shards: accounts partitioned over N durable ledgers, each with its own engine, log and threads.

An account lives on shard ``key64(id) % N``. A transfer runs on its debit account's shard (a post or
void on its pending transfer's shard; an id that already exists or was burned anywhere, where it is).
Events keep their order on each shard, so a shard-local batch behaves exactly as on one engine.

A plain transfer whose accounts live on two shards is made atomic with two-phase commit through a
clearing account per (shard, ledger):

1. the coordinator logs the intent (fsync);
2. leg A (debit account -> clearing A) and leg B (clearing B -> credit account) are created as pending
   transfers on their shards, in parallel;
3. the decision is logged (fsync): commit if both legs were created, abort otherwise;
4. both legs are posted, or the created ones voided; the coordinator records the transfer itself, so
   lookups and account history show one transfer, not legs.

Recovery replays the coordinator log: an intent without a decision is aborted (its legs voided), a
decision is carried out again (posting or voiding is idempotent), so both sides end posted or both voided.
Validation happens before any leg, in TigerBeetle's precedence; balance-dependent failures come from the
legs, with the first in precedence reported. A cross-shard transfer may be pending: its legs then stay
pending until the transfer is posted (both legs posted, with the amount asked), voided, or expires (the
coordinator voids both legs at the timeout). Linked, balancing or closing flags across shards are refused
with a DataError naming the event.

A batch is not atomic across shards: its shard-local runs and cross-shard transfers are applied one after
another, so a process that dies before acknowledging a batch may leave some of its events applied and
others not. Each event is all-or-nothing, and retrying the batch with the same ids is safe (applied events
answer EXISTS). A single-shard ledger applies a batch as a whole.

On disk: ``shards.json`` (shard count and ledger id, with a crc32), one ledger folder per shard
(``shard-000`` ...) and ``coordinator`` (the coordinator's log), each with a MANIFEST naming the ledger id
and its place, so a missing, extra or foreign shard folder, or a wrong ``shards.json``, is refused by name.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import signal
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from blazil_ai.errors import ConfigError, DataError
from blazil_ai.futures import completed
from blazil_ai.ledger.engine import (
    CREATED,
    EXPIRED,
    PENDING,
    POSTED,
    VOIDED,
    AccountView,
    Engine,
    check_event_timestamp,
    event_dicts,
    key64,
    key64_int,
    resolved_record,
    validate_transfer,
)
from blazil_ai.ledger.manifest import LAYOUT
from blazil_ai.ledger.store import LocalLedger, Request
from blazil_ai.ledger.types import (
    ACCOUNT_DTYPE,
    AMOUNT_MAX,
    BATCH_MAX,
    TRANSFER_DTYPE,
    TRANSFER_PRECEDENCE,
    TRANSIENT_TRANSFER_STATUSES,
    U64_MASK,
    U128_MAX,
    AccountFilter,
    AccountFilterFlags,
    AccountFlags,
    LocalOp,
    Operation,
    QueryFilter,
    QueryFilterFlags,
    TransferFlags,
    as_account_array,
    as_transfer_array,
    backend_op,
    transfers_to_array,
    u128,
    u128_column,
)
from blazil_ai.ledger.types import CreateTransferStatus as CT
from blazil_ai.ledger.wal import WriteAheadLog

CLEARING_HI = 0xFFFF_FFFF_FFFF_FFFE  # high word of clearing-account ids (reserved in a sharded ledger)
KIND_INTENT, KIND_DECISION, KIND_DONE, KIND_EXPIRE = 3, 4, 5, 6
ABORTED = 0  # decision code of an attempt that was rolled back and retried event by event
DECISION_DTYPE = np.dtype([("id", "<u8", (2,)), ("status", "<u4"), ("attempt", "<u4"), ("pad", "V104")])
_POST_VOID = int(TransferFlags.POST_PENDING_TRANSFER | TransferFlags.VOID_PENDING_TRANSFER)


def _crash_point(name: str) -> None:
    # Crash tests kill the process at a named step of the two-phase commit (a real SIGKILL, not an exception).
    if os.environ.get("BLAZIL_LEDGER_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def read_layout(directory: Path) -> int | None:
    """The shard count recorded in a ledger directory, or None for a single-shard ledger."""
    layout = check_layout(Path(directory))
    return None if layout is None else layout[0]


def check_layout(directory: Path) -> tuple[int, str] | None:
    """(shard count, ledger id) of a sharded ledger after checking every shard folder against ``shards.json``;
    None for a directory that is not a sharded ledger. A missing, extra or foreign shard folder, or a missing or
    wrong ``shards.json``, is a DataError naming it."""
    from blazil_ai.ledger import manifest as mf

    f = directory / LAYOUT
    parts = sorted(p.name for p in directory.glob("shard-*")) if directory.is_dir() else []
    if not f.exists():
        if parts or (directory / "coordinator").exists():
            raise DataError(f"the shard layout is missing but the folder holds {', '.join(parts) or 'coordinator'}",
                            path=str(f))
        return None
    try:
        body = json.loads(f.read_text())
        crc = body.pop("crc32")
        if zlib.crc32(json.dumps(body, sort_keys=True).encode()) != crc:
            raise ValueError("checksum mismatch")
        n, ledger_id = int(body["shards"]), str(body["ledger_id"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"cannot read the shard layout ({e})", path=str(f)) from e
    if n < 1:
        raise DataError(f"shard count {n} must be at least 1", path=str(f), field="shards")
    want = [shard_dir(i) for i in range(n)]
    extra = sorted(set(parts) - set(want))
    if extra:
        raise DataError(f"the layout names {n} shards but the folder also holds {', '.join(extra)}", path=str(f))
    for i, name in enumerate([*want, "coordinator"]):
        if not (directory / name).is_dir():
            raise DataError(f"{'shard folder' if i < n else 'coordinator folder'} is missing (the layout "
                            f"{f.name} names {n} shards)", path=str(directory / name))
    for i, name in enumerate([*want, "coordinator"]):
        d = directory / name
        m = mf.read(d)
        role, shard = ("ledger", i) if i < n else ("coordinator", None)
        want_m = (ledger_id, role, shard, n if i < n else None)
        if (m.ledger_id, m.role, m.shard, m.shards) != want_m:
            raise DataError(f"belongs to {_who(m.ledger_id, m.role, m.shard, m.shards)}, not to {_who(*want_m)} "
                            f"({f.name})", path=str(d / mf.NAME))
    return n, ledger_id


def _who(ledger_id: str, role: str, shard: int | None, shards: int | None) -> str:
    if role == "coordinator":
        return f"the coordinator of ledger {ledger_id}"
    if shard is None:
        return f"single-shard ledger {ledger_id}"
    return f"shard {shard} of {shards} of ledger {ledger_id}"


def shard_dir(i: int) -> str:
    """Folder name of shard ``i``."""
    return f"shard-{i:03d}"


def format_sharded(directory: Path, shards: int) -> None:
    """Create an empty ledger of ``shards`` shards (the layout file last: until it exists, it is no ledger)."""
    from blazil_ai.ledger import manifest as mf
    from blazil_ai.ledger.journal import write_atomic
    from blazil_ai.ledger.store import format_ledger

    if shards < 1:
        raise ConfigError("a sharded ledger needs shards >= 1")
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ConfigError(f"{directory} is not an empty folder; a ledger is created only in a new or empty folder")
    directory.mkdir(parents=True, exist_ok=True)
    ledger_id = mf.new_id()
    for i in range(shards):
        format_ledger(directory / shard_dir(i), ledger_id=ledger_id, shard=i, shards=shards)
    format_ledger(directory / "coordinator", role="coordinator", ledger_id=ledger_id)
    body: dict[str, Any] = {"shards": shards, "ledger_id": ledger_id}
    body["crc32"] = zlib.crc32(json.dumps(body, sort_keys=True).encode())
    write_atomic(directory / LAYOUT, json.dumps(body).encode())


def shard_of(account_id: int, n: int) -> int:
    """The shard that owns an account id."""
    return key64_int(account_id) % n


def clearing_id(shard: int, ledger: int, generation: int = 0) -> int:
    """The clearing account of one shard and ledger (a new generation replaces one whose totals are full)."""
    return (CLEARING_HI << 64) | (generation << 48) | (ledger << 16) | shard


def leg_id(tid: int, leg: str, attempt: int) -> int:
    """Deterministic id of one leg transfer, so recovery can find and finish it."""
    d = hashlib.blake2b(tid.to_bytes(16, "little") + leg.encode() + attempt.to_bytes(4, "little"), digest_size=16)
    v = int.from_bytes(d.digest(), "little")
    return v if 0 < v < U128_MAX else 1


def _is_clearing(words: np.ndarray) -> np.ndarray:
    return words[:, 1] == CLEARING_HI


class ShardedLedger:
    """N LocalLedgers behind one coordinator (same request interface as LocalLedger)."""

    def __init__(self, directory: str | Path, shards: int | None = None, *, clock: Callable[[], int] = time.time_ns,
                 fsync: bool = True, create: bool = False, read_only: bool = False, **options: Any) -> None:
        from blazil_ai.ledger import manifest as mf
        from blazil_ai.ledger.store import check_ledger_dir, lock_directory

        self.directory = Path(directory)
        self.read_only = read_only
        existing = check_layout(self.directory)
        if existing is None:
            if not create or read_only or shards is None:
                raise ConfigError(f"{self.directory} is not a sharded ledger (no {LAYOUT}); create one with "
                                  f"'blazil ledger format --shards N {self.directory}' or connect(path, shards=N, "
                                  "create=True)")
            format_sharded(self.directory, shards)
            existing = check_layout(self.directory)
            assert existing is not None
        if shards is not None and shards != existing[0]:
            raise ConfigError(f"ledger {self.directory} has {existing[0]} shards, not {shards}")
        self.n = existing[0]
        self.shards: list[LocalLedger] = []
        try:
            for i in range(self.n):
                self.shards.append(LocalLedger(self.directory / shard_dir(i), clock=clock, fsync=fsync,
                                               read_only=read_only, **options))
        except BaseException:
            for s in self.shards:
                s.close()
            raise
        self.cross = Engine(clock=clock)  # the coordinator's record of cross-shard transfers and burned ids
        self.clearing: dict[tuple[int, int], int] = {}  # (shard, ledger) -> generation of its clearing account
        self.attempts: dict[int, int] = {}  # cross-shard transfer id -> attempt whose legs carry it
        self.next_attempt = 1  # each try of a cross-shard transfer has its own legs (ids from the attempt)
        self._clock = clock
        for sh in self.shards:  # one request's events take timestamps after every shard's last one
            sh.engine.clock = self._shared_clock
        self.cross.clock = self._shared_clock
        self._lock = threading.RLock()
        coord_dir = self.directory / "coordinator"
        self._coord_lock = -1
        try:
            check_ledger_dir(coord_dir)
            self._coord_lock = lock_directory(coord_dir, read_only)
            self.coord = WriteAheadLog(coord_dir, fsync=fsync, writable=not read_only)
            self.coord_seq = 0
            self.unfinished = 0  # cross-shard attempts a read-only open left unfinished
            self._find_clearing()
            self._recover(mf.read(coord_dir).segments)
            if not read_only:
                self.coord.open_segment()
        except BaseException:
            if self._coord_lock >= 0:
                os.close(self._coord_lock)
            for s in self.shards:
                s.close()
            raise

    def _shared_clock(self) -> int:
        return max(int(self._clock()), self.cross.last_timestamp + 1,
                   *(sh.engine.last_timestamp + 1 for sh in self.shards))

    def _spread(self, op: Operation, batch: np.ndarray, home: np.ndarray, i: int, j: int
                ) -> list[tuple[np.ndarray, Future[Any]]]:
        """Submit events i..j to their shards, event k stamped ``base + (k - i)`` wherever it lands, so the
        request's events keep its order in timestamps (and queries) as on one cluster."""
        base = self._shared_clock()
        futs = []
        for s in range(self.n):
            idx = i + np.nonzero(home[i:j] == s)[0]
            if len(idx):
                first = int(idx[0])
                futs.append((idx, self.shards[s].submit(op, batch[idx], base + first - i, idx - first)))
        return futs

    def _find_clearing(self) -> None:
        for s, sh in enumerate(self.shards):
            e = sh.engine
            ids = e.accounts["id"][: e.n_accounts]
            for lo in ids[ids[:, 1] == CLEARING_HI][:, 0].tolist():
                ledger, gen = (lo >> 16) & 0xFFFF_FFFF, lo >> 48
                self.clearing[(s, ledger)] = max(gen, self.clearing.get((s, ledger), 0))

    def _has_history(self, account_id: int) -> bool:
        view = self._account_view(account_id) if account_id not in (0, U128_MAX) else None
        return view is not None and bool(view.flags & AccountFlags.HISTORY)

    def _account_view(self, account_id: int) -> AccountView | None:
        return self.shards[shard_of(account_id, self.n)].engine.account_view(account_id)

    # ---------------------------------------------------------------- interface of LocalLedger

    def submit(self, op: Request | str, arg: Any) -> Future[Any]:
        """Run one request (the coordinator is synchronous) and return a completed future."""
        return completed(self.call, op, arg)

    def call(self, op: Request | str, arg: Any = None) -> Any:
        """Run one request."""
        op = backend_op(op)
        with self._lock:
            if self.read_only and op.writes:
                raise ConfigError(f"ledger {self.directory} is open read-only; {op.key} is refused")
            if not self.read_only:
                self._expire_cross()
            if op is Operation.CREATE_ACCOUNTS:
                return self._create_accounts(as_account_array(arg))
            if op is Operation.CREATE_TRANSFERS:
                return self._create_transfers(as_transfer_array(arg))
            if op is LocalOp.CHECKPOINT:
                return [s.checkpoint() for s in self.shards]
            handler = getattr(self, "_" + op.key, None)  # the reads, _totals and _expire
            if handler is None:
                raise ValueError(f"unknown ledger operation {op.key!r} for a sharded ledger")
            return handler(arg)

    def checkpoint(self) -> list[int]:
        """Checkpoint every shard."""
        return self.call(LocalOp.CHECKPOINT)  # type: ignore[no-any-return]

    def close(self, checkpoint: bool = False) -> None:
        """Close every shard and the coordinator log."""
        for s in self.shards:
            s.close(checkpoint=checkpoint)
        self.coord.close()
        os.close(self._coord_lock)

    def __enter__(self) -> ShardedLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- accounts

    def _create_accounts(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(batch)
        if n > BATCH_MAX:
            raise DataError(f"batch of {n} accounts exceeds the limit of {BATCH_MAX} events")
        if _is_clearing(batch["id"]).any():
            i = int(np.nonzero(_is_clearing(batch["id"]))[0][0])
            raise DataError(f"event {i}: account ids with high word {CLEARING_HI:#x} are reserved for "
                            "clearing accounts in a sharded ledger", field="account.id")
        _refuse_imported(batch, int(AccountFlags.IMPORTED), "account")
        home = (key64(batch["id"]) % np.uint64(self.n)).astype(np.int64)
        self._check_chains(batch["flags"], home, "account")
        status = np.full(n, CREATED, dtype=np.uint32)
        stamps = np.zeros(n, dtype=np.uint64)
        for idx, fut in self._spread(Operation.CREATE_ACCOUNTS, batch, home, 0, n):
            status[idx], stamps[idx] = fut.result()
        return status, stamps

    @staticmethod
    def _check_chains(flags: np.ndarray, home: np.ndarray, kind: str, cross: np.ndarray | None = None) -> None:
        linked = (flags & 1).astype(bool)
        if not linked.any():
            return
        start = None
        for i in range(len(flags)):
            if linked[i] and start is None:
                start = i
            if start is not None:
                if home[i] != home[start] or (cross is not None and cross[i]):
                    raise DataError(f"event {i}: a linked chain starting at event {start} spans shards; "
                                    f"linked {kind}s must all live on one shard")
                if not linked[i]:
                    start = None

    # ---------------------------------------------------------------- transfers

    def _route(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(home shard per event, cross-shard mask); home -1 means "the coordinator's own record"."""
        nn = np.uint64(self.n)
        dr, cr = batch["debit_account_id"], batch["credit_account_id"]
        home = (key64(dr) % nn).astype(np.int64)
        cr_home = (key64(cr) % nn).astype(np.int64)

        def valid(w: np.ndarray) -> np.ndarray:
            return ((w[:, 0] | w[:, 1]) != 0) & ~((w[:, 0] == U64_MASK) & (w[:, 1] == U64_MASK))
        flags = batch["flags"].astype(np.int64)
        post_void = (flags & _POST_VOID) != 0
        cross = valid(dr) & valid(cr) & (home != cr_home) & ~post_void
        key_arr = key64(batch["id"])
        keys = key_arr.tolist()
        ids = None
        # An id that exists (or was burned) anywhere is answered where it is.
        pinned = np.zeros(len(keys), dtype=bool)
        stores = [(-1, self.cross)] + [(s, sh.engine) for s, sh in enumerate(self.shards)]
        for s, eng in stores:
            if eng.transfer_keys.isdisjoint(key_arr) and eng.failed_keys.isdisjoint(keys):
                continue
            ids = ids or u128_column(batch)
            for i, k in enumerate(keys):
                if (k in eng.transfer_keys and eng.transfer_row(ids[i]) is not None) or \
                        (k in eng.failed_keys and ids[i] in eng.failed_ids):
                    home[i] = s
                    cross[i] = s == -1
                    pinned[i] = True
        # A post/void goes where its pending transfer is; one created earlier in this segment, where that
        # event goes; one found nowhere, to the shard its id hashes to (all answer "not found" alike).
        if post_void.any():
            ids = ids or u128_column(batch)
            pids = u128_column(batch, "pending_id")
            pos = {tid: i for i, tid in reversed(list(enumerate(ids)))}
            for i in np.nonzero(post_void & ~pinned)[0].tolist():
                pid = pids[i]
                if self.cross.transfer_row(pid) is not None:  # a cross-shard pending transfer
                    home[i], cross[i] = -1, True
                    continue
                where = self._where(pid)
                first_at = pos.get(pid)
                if where is not None:
                    home[i] = where
                elif first_at is not None and first_at < i:
                    home[i], cross[i] = (-1, True) if cross[first_at] else (int(home[first_at]), False)
                else:
                    home[i] = shard_of(pid, self.n)
        return home, cross

    def _where(self, tid: int) -> int | None:
        for s, sh in enumerate(self.shards):
            if sh.engine.transfer_row(tid) is not None:
                return s
        return None

    def _create_transfers(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(batch)
        if n > BATCH_MAX:
            raise DataError(f"batch of {n} transfers exceeds the limit of {BATCH_MAX} events")
        status = np.full(n, CREATED, dtype=np.uint32)
        stamps = np.zeros(n, dtype=np.uint64)
        if n == 0:
            return status, stamps
        _refuse_imported(batch, int(TransferFlags.IMPORTED), "transfer")
        start = 0
        while start < n:
            # An id seen earlier in the batch may now exist, be burned, or still be free: only the earlier
            # event's outcome says, so the batch is cut there and the rest routed once that is known.
            cut = start + _segment_end(batch[start:])
            seg = batch[start:cut]
            self._settle()
            home, cross = self._route(seg)
            self._check_chains(seg["flags"], np.where(cross, -1, home), "transfer", cross)
            m = len(seg)
            seg_status = status[start:cut]
            seg_stamps = stamps[start:cut]
            i = 0
            while i < m:
                j = i
                if cross[i]:
                    while j < m and cross[j]:
                        j += 1
                    self._cross_run(seg, i, j, seg_status, seg_stamps)
                else:
                    while j < m and not cross[j]:
                        j += 1
                    self._local_run(seg, home, i, j, seg_status, seg_stamps)
                i = j
            start = cut
        return status, stamps

    def _settle(self) -> None:
        # Reads of shard engine state below happen between requests; wait for queued ones to finish.
        for s in self.shards:
            s.call(LocalOp.BARRIER)

    def _local_run(self, batch: np.ndarray, home: np.ndarray, i: int, j: int, status: np.ndarray,
                   stamps: np.ndarray) -> None:
        for idx, fut in self._spread(Operation.CREATE_TRANSFERS, batch, home, i, j):
            status[idx], stamps[idx] = fut.result()

    # ---------------------------------------------------------------- cross-shard two-phase commit

    def _precheck(self, t: dict[str, int]) -> int:
        """TigerBeetle's checks of a transfer whose accounts are on two shards, by the engine's own validator
        over the accounts where they live (balances as they are before this event's legs)."""
        code = check_event_timestamp(t, int(TransferFlags.IMPORTED), False, 0, CT)  # imported: refused before
        if code != CREATED:
            return code
        first = self.cross.check_transfer_id(t)
        if first is not None:
            return first[0]
        return validate_transfer(t, self.cross.clock(), self._account_view, self.cross.timeline)[0]

    def _fail(self, tid: int, code: int) -> None:
        if code in TRANSIENT_TRANSFER_STATUSES:
            self.cross.failed_ids.add(tid)
            self.cross.failed_keys.add(key64_int(tid))

    def _new_attempt(self) -> int:
        self.next_attempt += 1
        return self.next_attempt - 1

    def _answer(self, t: dict[str, int], code: int, index: int, status: np.ndarray, stamps: np.ndarray) -> None:
        """Record a failed cross-shard event: its status, and its timestamp (the object's for EXISTS)."""
        self._fail(t["id"], code)
        status[index] = code
        row = self.cross.transfer_row(t["id"]) if code == CT.EXISTS else None
        stamps[index] = self.cross.transfers["timestamp"][row] if row is not None else self.cross.next_timestamps(1)

    def _cross_run(self, batch: np.ndarray, i: int, j: int, status: np.ndarray, stamps: np.ndarray) -> None:
        events = event_dicts(batch[i:j])
        go: list[int] = []
        go_ids: set[int] = set()
        touched: set[int] = set()  # accounts with history that the group's events move
        for k, t in enumerate(events):
            resolving = bool(t["flags"] & _POST_VOID)
            mine = {a for a in (t["debit_account_id"], t["credit_account_id"]) if self._has_history(a)}
            # An id repeated inside this run, or a post/void, is judged after what came before is done; so is an
            # event on an account with history that the group moves (each transfer gets its own balances row).
            if t["id"] in go_ids or resolving or not touched.isdisjoint(mine):
                self._run_group(events, batch, i, go, status, stamps, attempt=self._new_attempt())
                go, go_ids, touched = [], set(), set()
            touched |= mine
            if resolving:
                self._resolve_cross(t, i + k, status, stamps)
                continue
            code = self._precheck(t)
            if code in _BALANCE_CODES and go:  # the events before it may change the balances it is judged by
                self._run_group(events, batch, i, go, status, stamps, attempt=self._new_attempt())
                go, go_ids, touched = [], set(), set(mine)
                code = self._precheck(t)
            if code != CREATED:
                self._answer(t, code, i + k, status, stamps)
                continue
            if t["flags"] not in (0, int(TransferFlags.PENDING)):
                raise DataError(f"event {i + k}: transfer {t['id']} moves money between shards with flags "
                                f"{TransferFlags(t['flags'])!r}; cross-shard transfers may only be plain or pending "
                                "(no linked, balancing or closing flags)")
            go.append(k)
            go_ids.add(t["id"])
        self._run_group(events, batch, i, go, status, stamps, attempt=self._new_attempt())

    def _record_cross(self, rec: dict[str, int], attempt: int) -> None:
        row = self.cross.insert_transfer(rec)
        self.attempts[rec["id"]] = attempt
        self.next_attempt = max(self.next_attempt, attempt + 1)
        if rec["flags"] & TransferFlags.PENDING:
            if rec["timeout"]:
                heapq.heappush(self.cross.expiry, (rec["timestamp"] + rec["timeout"] * 1_000_000_000, row))

    def _resolve_cross(self, t: dict[str, int], index: int, status: np.ndarray, stamps: np.ndarray) -> None:
        """Post or void a cross-shard pending transfer: both legs, logged so a crash finishes the job."""
        first = self.cross.check_transfer_id(t)
        if t["timestamp"] != 0:
            first = CT.TIMESTAMP_MUST_BE_ZERO, 0
        if first is not None:
            self._answer(t, first[0], index, status, stamps)
            return
        ts = self.cross.next_timestamps(1)
        code, prow, actual, _ = self.cross.check_post_or_void(t, ts, self._account_view)
        if code != CREATED:
            self._answer(t, code, index, status, stamps)
            return
        rec = resolved_record(t, self.cross.transfers[prow], actual, ts)
        attempt = self.attempts[t["pending_id"]]
        intent = transfers_to_array([_Rec(rec)])  # type: ignore[list-item]
        decision = np.zeros(1, dtype=DECISION_DTYPE)
        decision["id"], decision["status"], decision["attempt"] = intent["id"], CREATED, attempt
        self._log(KIND_INTENT, attempt, intent)
        self._log(KIND_DECISION, attempt, decision)  # nothing can fail from here on: the legs are held
        self._settle_resolve(rec, attempt)
        self._record_resolve(rec)
        self._log(KIND_DONE, attempt, decision)
        status[index] = CREATED
        stamps[index] = rec["timestamp"]

    def _record_resolve(self, rec: dict[str, int]) -> None:
        self.cross.insert_transfer(dict(rec))
        prow = self.cross.transfer_row(rec["pending_id"])
        assert prow is not None
        post = rec["flags"] & TransferFlags.POST_PENDING_TRANSFER
        self.cross.pending_state[prow] = POSTED if post else VOIDED

    def _settle_resolve(self, rec: dict[str, int], attempt: int) -> None:
        """Post (the resolved amount) or void both legs of the pending transfer ``rec`` resolves."""
        post = bool(rec["flags"] & TransferFlags.POST_PENDING_TRANSFER)
        kind = "p" if post else "v"
        pid = rec["pending_id"]
        futs = []
        for leg, aid in (("a", rec["debit_account_id"]), ("b", rec["credit_account_id"])):
            arr = np.zeros(1, dtype=TRANSFER_DTYPE)
            lid, lpid = leg_id(rec["id"], kind + leg, 0), leg_id(pid, leg, attempt)
            arr["id"][0] = (lid & U64_MASK, lid >> 64)
            arr["pending_id"][0] = (lpid & U64_MASK, lpid >> 64)
            arr["amount"][0] = (rec["amount"] & U64_MASK, rec["amount"] >> 64) if post else (0, 0)
            arr["flags"] = int(TransferFlags.POST_PENDING_TRANSFER if post else TransferFlags.VOID_PENDING_TRANSFER)
            s = shard_of(aid, self.n)
            futs.append((s, arr, self.shards[s].submit(Operation.CREATE_TRANSFERS, arr)))
        self._settled(futs, "post" if post else "void", _SETTLED)

    def _void_legs(self, tid: int, kind: str) -> None:
        row = self.cross.transfer_row(tid)
        assert row is not None
        p = self.cross.transfers[row]
        attempt = self.attempts.get(tid, 0)
        futs = []
        for leg, field in (("a", "debit_account_id"), ("b", "credit_account_id")):
            arr = np.zeros(1, dtype=TRANSFER_DTYPE)
            lid, lpid = leg_id(tid, kind + leg, 0), leg_id(tid, leg, attempt)
            arr["id"][0] = (lid & U64_MASK, lid >> 64)
            arr["pending_id"][0] = (lpid & U64_MASK, lpid >> 64)
            arr["flags"] = int(TransferFlags.VOID_PENDING_TRANSFER)
            s = shard_of(u128(p[field]), self.n)
            futs.append((s, arr, self.shards[s].submit(Operation.CREATE_TRANSFERS, arr)))
        self._settled(futs, "void", _SETTLED)

    def _expire_cross(self) -> None:
        """Void cross-shard pending transfers whose timeout has passed (logged first, so a crash finishes it)."""
        heap = self.cross.expiry
        now = self.cross.clock()
        due = []
        while heap and heap[0][0] <= now:
            _, row = heapq.heappop(heap)
            if self.cross.pending_state[row] == PENDING:
                due.append(row)
        if not due:
            return
        self._log(KIND_EXPIRE, 0, self.cross.transfers[due].copy())
        for row in due:
            self._void_legs(u128(self.cross.transfers["id"][row]), "x")
            self.cross.pending_state[row] = EXPIRED

    def _ensure_clearing(self, shard: int, ledger: int, generation: int = 0) -> int:
        """The clearing account of (shard, ledger), created at ``generation`` (or the current one) if missing."""
        current = self.clearing.get((shard, ledger))
        if current is not None and current >= generation:
            return clearing_id(shard, ledger, current)
        a = np.zeros(1, dtype=ACCOUNT_DTYPE)
        cid = clearing_id(shard, ledger, generation)
        a["id"][0] = (cid & U64_MASK, cid >> 64)
        a["ledger"], a["code"] = ledger, 1
        self.shards[shard].create_accounts(a)
        self.clearing[(shard, ledger)] = generation
        return cid

    def _legs(self, events: list[dict[str, int]], group: list[int], attempt: int, kind: str) -> dict[int, np.ndarray]:
        """Leg transfers of a group per shard: kind "prepare", "post" or "void"."""
        per: dict[int, list[dict[str, int]]] = {}
        for k in group:
            t = events[k]
            a, b = shard_of(t["debit_account_id"], self.n), shard_of(t["credit_account_id"], self.n)
            for leg, s in (("a", a), ("b", b)):
                if kind == "prepare":
                    cid = self._ensure_clearing(s, t["ledger"])
                    # Legs never time out on their own: the coordinator expires a cross-shard pending transfer.
                    rec = dict(t, id=leg_id(t["id"], leg, attempt), flags=int(TransferFlags.PENDING), timestamp=0,
                               timeout=0)
                    if leg == "a":
                        rec["credit_account_id"] = cid
                    else:
                        rec["debit_account_id"] = cid
                else:
                    flag = (TransferFlags.POST_PENDING_TRANSFER if kind == "post"
                            else TransferFlags.VOID_PENDING_TRANSFER)
                    rec = dict(id=leg_id(t["id"], kind[0] + leg, attempt), debit_account_id=0, credit_account_id=0,
                               amount=AMOUNT_MAX if kind == "post" else 0,  # both mean "the pending amount"
                               pending_id=leg_id(t["id"], leg, attempt), user_data_128=0,
                               user_data_64=0, user_data_32=0, timeout=0, ledger=0, code=0, flags=int(flag),
                               timestamp=0)
                per.setdefault(s, []).append(rec)
        out = {}
        for s, recs in per.items():
            out[s] = transfers_to_array([_Rec(r) for r in recs])  # type: ignore[misc]
        return out

    def _log(self, kind: int, header_ts: int, records: np.ndarray) -> None:
        self.coord_seq += 1
        self.coord.commit(kind, self.coord_seq, header_ts, records)

    def _run_group(self, events: list[dict[str, int]], batch: np.ndarray, offset: int, group: list[int],
                   status: np.ndarray, stamps: np.ndarray, attempt: int, retries: int = 0) -> None:
        if not group:
            return
        base = self.cross.next_timestamps(len(group))
        intent = batch[[offset + k for k in group]].copy()
        intent["timestamp"] = np.arange(base, base + len(group), dtype=np.uint64)
        self._log(KIND_INTENT, attempt, intent)
        _crash_point("after_intent")
        legs = self._legs(events, group, attempt, "prepare")
        results = {s: self.shards[s].submit(Operation.CREATE_TRANSFERS, arr) for s, arr in legs.items()}
        per_event: dict[int, list[int]] = {k: [] for k in group}
        order = {s: [k for k in group for leg_s in (shard_of(events[k]["debit_account_id"], self.n),
                                                    shard_of(events[k]["credit_account_id"], self.n))
                     if leg_s == s] for s in legs}
        for s, fut in results.items():
            st, _ = fut.result()
            for k, code in zip(order[s], st.tolist()):
                per_event[k].append(code)
        _crash_point("after_prepare")
        ok = all(all(c == CREATED for c in codes) for codes in per_event.values())
        decision = np.zeros(len(group), dtype=DECISION_DTYPE)
        decision["id"] = intent["id"]
        decision["attempt"] = attempt
        if ok:
            decision["status"] = CREATED
            self._log(KIND_DECISION, attempt, decision)
            _crash_point("after_decision")
            self._finish(events, [k for k in group if not events[k]["flags"] & TransferFlags.PENDING], attempt, "post")
            _crash_point("after_post")
            for n_, k in enumerate(group):
                rec = dict(events[k], timestamp=int(intent["timestamp"][n_]))
                self._record_cross(rec, attempt)
                status[offset + k] = CREATED
                stamps[offset + k] = rec["timestamp"]
            self._log(KIND_DONE, attempt, decision)
            return
        if len(group) > 1:
            decision["status"] = ABORTED
            self._log(KIND_DECISION, attempt, decision)
            self._finish(events, group, attempt, "void")
            self._log(KIND_DONE, attempt, decision)
            for k in group:  # redo one by one, so only the events that really fail do
                self._run_group(events, batch, offset, [k], status, stamps, self._new_attempt())
            return
        k = group[0]
        failures = [c for c in per_event[k] if c != CREATED]
        code = min(failures, key=lambda c: TRANSFER_PRECEDENCE[c])
        decision["status"] = ABORTED
        self._log(KIND_DECISION, attempt, decision)
        self._finish(events, group, attempt, "void")
        # The legs are voided: the accounts are as before. TigerBeetle's answer is the validator's; if it has
        # none, only a clearing account refused (its totals near 2^128): a new generation takes over.
        actual = self._precheck(events[k])
        if actual != CREATED:
            decision["status"] = actual  # logged, so recovery burns the id of a transient failure again
            self._log(KIND_DECISION, attempt, decision)
        self._log(KIND_DONE, attempt, decision)
        if actual == CREATED and code in _BALANCE_CODES and retries < 4:
            t = events[k]
            for s in {shard_of(t["debit_account_id"], self.n), shard_of(t["credit_account_id"], self.n)}:
                self._ensure_clearing(s, t["ledger"], self.clearing.get((s, t["ledger"]), 0) + 1)
            self._run_group(events, batch, offset, group, status, stamps, self._new_attempt(), retries + 1)
            return
        if actual == CREATED:
            raise DataError(f"event {offset + k}: cross-shard transfer {events[k]['id']} was refused by its legs "
                            f"({CT(code).name}) though its accounts allow it")
        self._fail(events[k]["id"], actual)
        status[offset + k] = actual
        stamps[offset + k] = intent["timestamp"][0]

    def _finish(self, events: list[dict[str, int]], group: list[int], attempt: int, kind: str) -> None:
        legs = self._legs(events, group, attempt, kind)
        futs = [(s, arr, self.shards[s].submit(Operation.CREATE_TRANSFERS, arr)) for s, arr in legs.items()]
        # Voiding an attempt also reaches legs that were never created (their prepare was refused).
        self._settled(futs, kind, _SETTLED if kind == "post" else _VOIDED)

    def _settled(self, futs: list[tuple[int, np.ndarray, Future[Any]]], kind: str, allowed: frozenset[int]) -> None:
        """Wait for the posts or voids of legs; a leg that answers anything outside ``allowed`` no longer matches
        the coordinator's logged decision, which is refused by name (the attempt stays unfinished in the
        coordinator's log, so the next open carries the decision out again)."""
        for s, arr, fut in futs:
            status, _ = fut.result()
            bad = np.flatnonzero(~np.isin(status, list(allowed)))
            if len(bad):
                i = int(bad[0])
                raise DataError(f"shard {s}: the {kind} of cross-shard leg {u128(arr['pending_id'][i]):#x} was "
                                f"answered {CT(int(status[i])).name}; the shards disagree with the coordinator's "
                                "decision")

    def _recover(self, segments: list[int]) -> None:
        intents: dict[tuple[int, int], dict[str, int]] = {}  # (attempt, id) -> event with its timestamp
        decided: dict[tuple[int, int], int] = {}
        expired: list[int] = []
        last_ts = 0
        for entry in self.coord.recover(0, segments):
            self.coord_seq = entry.seq
            recs = np.frombuffer(entry.payload, dtype=np.uint8).reshape(-1, 128).view("V128").ravel()
            self.next_attempt = max(self.next_attempt, entry.timestamp + 1)
            if entry.kind == KIND_INTENT:
                for ev in event_dicts(recs.view(TRANSFER_DTYPE)):
                    intents[(entry.timestamp, ev["id"])] = ev
                    last_ts = max(last_ts, ev["timestamp"])
            elif entry.kind == KIND_DECISION:
                d = recs.view(DECISION_DTYPE)
                for tid, code in zip(u128_column(d), d["status"].tolist()):
                    decided[(entry.timestamp, tid)] = code
                    ev = intents[(entry.timestamp, tid)]
                    if code == CREATED and ev["flags"] & _POST_VOID:
                        self._record_resolve(ev)
                    elif code == CREATED:
                        self._record_cross(dict(ev), entry.timestamp)
                    elif code != ABORTED:
                        self._fail(tid, code)
            elif entry.kind == KIND_EXPIRE:
                for tid in u128_column(recs.view(TRANSFER_DTYPE)):
                    row = self.cross.transfer_row(tid)
                    if row is not None:
                        self.cross.pending_state[row] = EXPIRED
                        expired.append(tid)
            elif entry.kind == KIND_DONE:
                d = recs.view(DECISION_DTYPE)
                for tid in u128_column(d):
                    intents.pop((entry.timestamp, tid), None)
                    decided.pop((entry.timestamp, tid), None)
        self.cross.last_timestamp = max(self.cross.last_timestamp, last_ts)
        if self.read_only:  # inspection: finishing attempts would write to the shards
            self.unfinished = len(intents)
            return
        # Unfinished attempts: carry out the decision, or abort when none was logged.
        for (attempt, tid), ev in sorted(intents.items(), key=lambda kv: kv[1]["timestamp"]):
            code = decided.get((attempt, tid))
            if ev["flags"] & _POST_VOID:
                if code == CREATED:
                    self._settle_resolve(ev, attempt)
                continue
            if code == CREATED and ev["flags"] & TransferFlags.PENDING:
                continue  # both legs stay pending until the transfer is posted, voided or expires
            self._finish([ev], [0], attempt, "post" if code == CREATED else "void")
        for tid in expired:
            self._void_legs(tid, "x")

    # ---------------------------------------------------------------- reads

    def _lookup_accounts(self, ids: list[int]) -> np.ndarray:
        found: dict[int, np.ndarray] = {}
        for s in range(self.n):
            mine = [i for i in ids if shard_of(i, self.n) == s]
            if mine:
                for rec in self.shards[s].call(Operation.LOOKUP_ACCOUNTS, mine):
                    found[u128(rec["id"])] = rec
        rows = [found[i] for i in ids if i in found]
        return np.array(rows, dtype=ACCOUNT_DTYPE) if rows else np.zeros(0, dtype=ACCOUNT_DTYPE)

    def _user_transfers(self, arr: np.ndarray) -> np.ndarray:
        keep = ~(_is_clearing(arr["debit_account_id"]) | _is_clearing(arr["credit_account_id"]))
        return arr[keep]

    def _lookup_transfers(self, ids: list[int]) -> np.ndarray:
        found: dict[int, np.ndarray] = {}
        parts = [self.cross.lookup_transfers(ids)] + [self._user_transfers(s.call(Operation.LOOKUP_TRANSFERS, ids))
                                                      for s in self.shards]
        for part in parts:
            for rec in part:
                found.setdefault(u128(rec["id"]), rec)
        rows = [found[i] for i in ids if i in found]
        return np.array(rows, dtype=TRANSFER_DTYPE) if rows else np.zeros(0, dtype=TRANSFER_DTYPE)

    def _merge(self, parts: list[np.ndarray], reversed_: bool, limit: int) -> np.ndarray:
        arr = np.concatenate(parts) if parts else np.zeros(0, dtype=TRANSFER_DTYPE)
        order = np.argsort(arr["timestamp"], kind="stable")
        if reversed_:
            order = order[::-1]
        return arr[order[: min(limit, BATCH_MAX)]].copy()

    def _get_account_transfers(self, f: AccountFilter) -> np.ndarray:
        wide = AccountFilter(f.account_id, f.user_data_128, f.user_data_64, f.user_data_32, f.code, f.timestamp_min,
                             f.timestamp_max, BATCH_MAX if f.limit else 0, f.flags)
        shard = self.shards[shard_of(f.account_id, self.n)]
        parts = [self._user_transfers(shard.call(Operation.GET_ACCOUNT_TRANSFERS, wide)),
                 self.cross.get_account_transfers(wide)]
        return self._merge(parts, bool(int(f.flags) & AccountFilterFlags.REVERSED), f.limit)

    def _get_account_balances(self, f: AccountFilter) -> list[tuple[int, ...]]:
        """One row per transfer the user sees (a cross-shard transfer's legs are internal): the account's
        balances after the leg that carried it on the account's shard, with the transfer's timestamp."""
        self._settle()
        eng = self.shards[shard_of(f.account_id, self.n)].engine
        row = eng.account_rows.get(f.account_id)
        if row is None or not int(eng.accounts["flags"][row]) & AccountFlags.HISTORY:
            return []
        after = {h[0]: h[1:] for h in eng.history.get(row, [])}
        wide = AccountFilter(f.account_id, f.user_data_128, f.user_data_64, f.user_data_32, f.code, f.timestamp_min,
                             f.timestamp_max, BATCH_MAX, f.flags & ~AccountFilterFlags.REVERSED)
        out: list[tuple[int, ...]] = []
        for t in self._get_account_transfers(wide):
            trow = eng.transfer_row(self._carrier(t, f.account_id))
            if trow is not None and trow in after:
                out.append((*after[trow], int(t["timestamp"])))
        if int(f.flags) & AccountFilterFlags.REVERSED:
            out.reverse()
        return out[: f.limit]

    def _carrier(self, t: np.ndarray, account_id: int) -> int:
        """The id of the transfer that moved ``t``'s money on ``account_id``'s shard: ``t`` itself, or a leg."""
        tid = u128(t["id"])
        if self.cross.transfer_row(tid) is None:
            return tid
        leg = "a" if u128(t["debit_account_id"]) == account_id else "b"
        flags = int(t["flags"])
        if flags & _POST_VOID:
            return leg_id(tid, ("p" if flags & TransferFlags.POST_PENDING_TRANSFER else "v") + leg, 0)
        attempt = self.attempts.get(tid, 0)
        return leg_id(tid, leg if flags & TransferFlags.PENDING else "p" + leg, attempt)

    def _query_accounts(self, f: QueryFilter) -> np.ndarray:
        wide = QueryFilter(f.user_data_128, f.user_data_64, f.user_data_32, f.ledger, f.code, f.timestamp_min,
                           f.timestamp_max, BATCH_MAX if f.limit else 0, f.flags)
        parts = [s.call(Operation.QUERY_ACCOUNTS, wide) for s in self.shards]
        arr = np.concatenate(parts)
        arr = arr[~_is_clearing(arr["id"])]
        order = np.argsort(arr["timestamp"], kind="stable")
        if int(f.flags) & QueryFilterFlags.REVERSED:
            order = order[::-1]
        return arr[order[: min(f.limit, BATCH_MAX)]].copy()

    def _query_transfers(self, f: QueryFilter) -> np.ndarray:
        wide = QueryFilter(f.user_data_128, f.user_data_64, f.user_data_32, f.ledger, f.code, f.timestamp_min,
                           f.timestamp_max, BATCH_MAX if f.limit else 0, f.flags)
        parts = [self._user_transfers(s.call(Operation.QUERY_TRANSFERS, wide)) for s in self.shards]
        parts.append(self.cross.query_transfers(wide))
        return self._merge(parts, bool(int(f.flags) & QueryFilterFlags.REVERSED), f.limit)

    def _totals(self, _arg: Any = None) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.shards:
            for k, v in s.call(LocalOp.TOTALS).items():
                out[k] = out.get(k, 0) + v
        return out

    def _expire(self, arg: Any = None) -> int:
        return sum(s.call(LocalOp.EXPIRE, arg) for s in self.shards)

    def pending_legs(self) -> int:
        """Leg transfers still pending on any shard (0 once every cross-shard transfer is settled)."""
        n = 0
        for s in self.shards:
            e = s.engine
            rows = np.nonzero(e.pending_state[: e.n_transfers] == PENDING)[0]
            t = e.transfers[rows]
            n += int((_is_clearing(t["debit_account_id"]) | _is_clearing(t["credit_account_id"])).sum())
        return n


class _Rec:
    """Attribute access over an event dict, for transfers_to_array."""

    def __init__(self, d: dict[str, int]) -> None:
        self.__dict__.update(d)



def _segment_end(batch: np.ndarray) -> int:
    """Length of the longest prefix without a repeated id (a linked chain is never split)."""
    n = len(batch)
    if len(np.unique(key64(batch["id"]))) == n:
        return n
    seen: set[int] = set()
    linked = (batch["flags"] & 1).astype(bool).tolist()
    chain_start = None
    for k, tid in enumerate(u128_column(batch)):
        if chain_start is None and linked[k]:
            chain_start = k
        if tid in seen and k > 0:
            if chain_start is None or chain_start == k:
                return k
            if chain_start > 0:
                return chain_start
            while k < n and linked[k]:  # the chain holds the repeat: it goes whole, on one shard
                k += 1
            return min(k + 1, n)
        seen.add(tid)
        if chain_start is not None and not linked[k]:
            chain_start = None
    return n



# What a post or void of a leg may answer: done now, or done before (a decision carried out again at recovery);
# a void also reaches legs whose prepare was refused, which do not exist.
_SETTLED = frozenset({CREATED, int(CT.EXISTS)})
_VOIDED = _SETTLED | {int(CT.PENDING_TRANSFER_NOT_FOUND)}

# Failures that depend on balances: an earlier event of the same request may change them.
_BALANCE_CODES = frozenset({
    CT.OVERFLOWS_DEBITS_PENDING, CT.OVERFLOWS_CREDITS_PENDING, CT.OVERFLOWS_DEBITS_POSTED,
    CT.OVERFLOWS_CREDITS_POSTED, CT.OVERFLOWS_DEBITS, CT.OVERFLOWS_CREDITS, CT.EXCEEDS_CREDITS, CT.EXCEEDS_DEBITS,
})


def _refuse_imported(batch: np.ndarray, bit: int, kind: str) -> None:
    imported = np.nonzero(batch["flags"] & bit)[0]
    if len(imported):
        raise DataError(f"event {int(imported[0])}: imported {kind}s (flags.imported) are not supported by a sharded "
                        "ledger; import into a single-shard ledger or a TigerBeetle cluster")
